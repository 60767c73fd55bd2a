"""Weak-supervision losses: top-k MIL (RTFM/UR-DMU) and temporal Gaussian splatting (GS-MoE).

Top-k MIL (Tian et al. 2021, RTFM eq. 2; Zhou et al. 2023, UR-DMU eq. 11): a video's score is
the mean of its k highest snippet scores, k = T // 16 + 1, trained with BCE against the
video-level label.

Temporal Gaussian Splatting, TGS (D'Amicantonio, Majhi et al. 2025, GS-MoE sec. 3.2): the
abnormal score curve of an anomalous video is turned into a dense pseudo-label by splatting one
Gaussian kernel per detected peak, and BCE(scores, pseudo-label) is added to the MIL loss. The
paper leaves peak and width selection loose; the rules used here (all keys of :class:`TGSConfig`):

1. Candidate peaks are local maxima, ``s[t] >= s[t-1]`` and ``s[t] >= s[t+1]`` (a missing
   neighbour at the curve's ends counts as lower), with height ``s[t] >= peak_threshold``.
   The global maximum is always a peak: the video is known to be anomalous, so it holds at
   least one event (the same assumption top-k MIL makes).
2. Peaks are taken in decreasing height; one that falls inside the extent of a taken peak, or
   within ``min_distance`` snippets of its centre, belongs to the same event and is skipped.
3. The extent of a peak p of height h is the widest run [l, r] around p with
   ``s[t] >= width_ratio * h`` (``width_ratio = 0.5``: full width at half maximum).
4. The kernel is centred on the extent's midpoint mu = (l + r) / 2 with the extent as its full
   width at half maximum: sigma = max(sigma_min, (r - l + 1) / (2 sqrt(2 ln 2))).
5. The pseudo-label is the union (maximum) of the kernels, each with amplitude 1 (``amplitude =
   "one"``: a peak marks a confident event) or its peak height (``"peak"``), so it lies in [0, 1].
   Normal videos get an all-zero pseudo-label (their weak label is exact).

Pseudo-labels are computed from the detached scores of the branch being trained (self-training)
or, for the heads (experts, gate, dense head), optionally from the task encoder's scores
(``tgs_source: encoder`` in ``VADModule``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def topk_k(num_snippets: int) -> int:
    """k of top-k MIL: T // 16 + 1 (RTFM, UR-DMU)."""
    return num_snippets // 16 + 1


def topk_mean(scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Mean of the k largest snippet scores: [..., T] -> [...]."""
    k = topk_k(scores.shape[-1]) if k is None else k
    return scores.topk(min(k, scores.shape[-1]), dim=-1).values.mean(-1)


def mil_loss(scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
             k: int | None = None) -> torch.Tensor:
    """Top-k MIL BCE. scores [B, T] (or [B, T, E] per expert, moved to [B, E, T]) in (0, 1);
    labels [B]; weight [B] or [B, E] masks which videos train which score curve."""
    if scores.dim() == 3:  # per-expert curves
        scores = scores.transpose(1, 2)  # [B, E, T]
        labels = labels[:, None].expand(scores.shape[:2])
    video = topk_mean(scores, k).clamp(1e-6, 1 - 1e-6)
    loss = F.binary_cross_entropy(video, labels.to(video.dtype), reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass
class TGSConfig:
    peak_threshold: float = 0.5
    width_ratio: float = 0.5
    min_distance: int = 2
    sigma_min: float = 0.5
    amplitude: str = "one"  # "one" | "peak"

    def __post_init__(self):
        if self.amplitude not in ("one", "peak"):
            raise ValueError(f"TGS amplitude must be 'one' or 'peak', got {self.amplitude!r}")
        if not 0 < self.width_ratio <= 1:
            raise ValueError(f"TGS width_ratio must be in (0, 1], got {self.width_ratio}")


def find_peaks(curve: torch.Tensor, cfg: TGSConfig) -> list[tuple[int, int, int, float]]:
    """Peaks of one score curve [T] as (peak index, left, right, height), rules 1-3 above."""
    s = curve.detach().float().cpu().tolist()  # plain floats: this loop runs per video per step
    T = len(s)
    cands = [t for t in range(T)
             if (t == 0 or s[t] >= s[t - 1]) and (t == T - 1 or s[t] >= s[t + 1])
             and s[t] >= cfg.peak_threshold]
    top = max(range(T), key=lambda t: (s[t], -t))  # the global maximum (first if tied)
    if top not in cands:
        cands.append(top)
    cands.sort(key=lambda t: (-s[t], t))
    peaks = []
    for p in cands:
        if any(l <= p <= r or abs(p - c) < cfg.min_distance for c, l, r, _ in peaks):
            continue
        h = s[p]
        floor = cfg.width_ratio * h
        l = p
        while l > 0 and s[l - 1] >= floor:
            l -= 1
        r = p
        while r < T - 1 and s[r + 1] >= floor:
            r += 1
        peaks.append((p, l, r, h))
    return peaks


def gaussian_splat(T: int, peaks: list[tuple[int, int, int, float]], cfg: TGSConfig) -> torch.Tensor:
    """Union of one Gaussian per peak over t = 0..T-1 (rules 4-5): [T] in [0, 1]."""
    t = torch.arange(T, dtype=torch.float32)
    out = torch.zeros(T)
    for _, l, r, h in peaks:
        mu = 0.5 * (l + r)
        sigma = max(cfg.sigma_min, (r - l + 1) * FWHM_TO_SIGMA)
        amp = 1.0 if cfg.amplitude == "one" else h
        out = torch.maximum(out, amp * torch.exp(-0.5 * ((t - mu) / sigma) ** 2))
    return out.clamp(0.0, 1.0)


def tgs_pseudo_labels(scores: torch.Tensor, labels: torch.Tensor, cfg: TGSConfig) -> torch.Tensor:
    """Dense pseudo-labels [B, T] (or [B, T, E]) from detached scores; zeros for normal videos."""
    flat = scores.detach()
    per_expert = flat.dim() == 3
    if per_expert:
        B, T, E = flat.shape
        flat = flat.permute(0, 2, 1).reshape(B * E, T)
        labs = labels.repeat_interleave(E)
    else:
        labs = labels
    out = torch.zeros_like(flat, dtype=torch.float32, device="cpu")
    for i in range(flat.shape[0]):
        if labs[i] > 0.5:
            out[i] = gaussian_splat(flat.shape[1], find_peaks(flat[i], cfg), cfg)
    out = out.to(scores.device, scores.dtype)
    if per_expert:
        out = out.view(B, E, T).permute(0, 2, 1)
    return out


def tgs_loss(scores: torch.Tensor, labels: torch.Tensor, cfg: TGSConfig,
             weight: torch.Tensor | None = None,
             source: torch.Tensor | None = None) -> torch.Tensor:
    """BCE(scores, TGS pseudo-label), averaged over snippets of the videos ``weight`` selects.

    scores [B, T] or [B, T, E] in (0, 1); labels [B]; weight None, [B] or [B, E]. The
    pseudo-label is splatted from ``source`` [B, T] (a teacher curve, e.g. the task encoder's
    scores) when given, else from the detached ``scores`` themselves."""
    if source is None:
        target = tgs_pseudo_labels(scores, labels, cfg)
    else:
        target = tgs_pseudo_labels(source, labels, cfg)
        if scores.dim() == 3:
            target = target.unsqueeze(-1).expand_as(scores)
    loss = F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    loss = loss.mean(1)  # [B] or [B, E]
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)
