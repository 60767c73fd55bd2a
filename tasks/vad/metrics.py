"""Frame-level metrics of weakly supervised VAD (the UCF-Crime / XD-Violence protocol).

Snippet scores are repeated over the frames of their snippet (16 frames per I3D snippet), all
test videos are concatenated, and the frame labels are scored with

- ``auc``: frame-level ROC-AUC over every test video (UCF-Crime's headline number),
- ``ap``: the area under the frame-level precision-recall curve by the trapezoid rule,
  ``sklearn.metrics.auc(recall, precision)`` over ``precision_recall_curve`` -- what the
  evaluation code of RTFM, UR-DMU and XD-Violence reports as AP (XD-Violence's headline number),
- ``ap_step``: step-wise average precision (``sklearn.metrics.average_precision_score``), which
  is lower than ``ap`` whenever the curve has gaps; kept for comparison with other fields,
- ``auc_a`` / ``ap_a``: ``auc`` / ``ap`` on the anomalous test videos only (Wu et al. 2020's AUC_A),
- ``auc/<class>``: ROC-AUC on the normal videos plus the videos of one anomaly class.

ROC-AUC comes from torchmetrics (``binary_auroc``, equal to ``auc(roc_curve)``); ``ap`` and
``ap_step`` from scikit-learn, on CPU, so they are the releases' numbers to the last digit.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc


def frame_scores(snippet_scores: torch.Tensor, num_frames: int,
                 frames_per_snippet: int = 16) -> torch.Tensor:
    """Repeat snippet scores [T] over their frames: [T * frames_per_snippet] -> first ``num_frames``."""
    if num_frames != snippet_scores.shape[0] * frames_per_snippet:
        raise ValueError(f"ground truth has {num_frames} frames but the video has "
                         f"{snippet_scores.shape[0]} snippets x {frames_per_snippet} frames")
    return snippet_scores.repeat_interleave(frames_per_snippet)


def _auc(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.numel() == 0 or target.min() == target.max():
        return torch.tensor(float("nan"))
    return binary_auroc(scores, target)


def _ap(scores: torch.Tensor, target: torch.Tensor, stepwise: bool = False) -> torch.Tensor:
    """The field's AP: trapezoid area under the precision-recall curve (``stepwise``: the
    step-wise average precision instead)."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve

    if target.numel() == 0 or target.max() == 0:
        return torch.tensor(float("nan"))
    y, s = target.cpu().numpy(), scores.detach().double().cpu().numpy()
    if stepwise:
        return torch.tensor(float(average_precision_score(y, s)))
    precision, recall, _ = precision_recall_curve(y, s)
    return torch.tensor(float(auc(recall, precision)))


class FrameVADMetrics(Metric):
    """Accumulates per-video snippet scores and frame labels; ``compute`` returns a dict of
    ``auc``, ``ap``, ``ap_step``, ``auc_a``, ``ap_a`` and ``auc/<class>`` for every class seen.

    Under a distributed strategy every state is gathered from all ranks before computing, so
    the numbers cover every rank's videos. A ``DistributedSampler`` pads the test set by
    repeating videos so the ranks get equal shares; given each video's dataset index
    (``video``), a video scored on two ranks is counted once.
    """

    full_state_update = False

    def __init__(self, class_names: list[str] | None = None, frames_per_snippet: int = 16):
        super().__init__()
        self.class_names = list(class_names or [])
        self.frames_per_snippet = frames_per_snippet
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("video_cls", default=[], dist_reduce_fx="cat")
        self.add_state("frame_key", default=[], dist_reduce_fx="cat")

    def update(self, snippet_scores: torch.Tensor, frame_gt: torch.Tensor, cls: int,
               video: int | None = None) -> None:
        """One video: snippet_scores [T], frame_gt [T * fps] in {0,1}, cls (-1 = normal),
        video = its index in the test set (optional; duplicates are then counted once)."""
        s = frame_scores(snippet_scores.detach().float().flatten(), frame_gt.numel(),
                         self.frames_per_snippet)
        y = frame_gt.flatten().long()
        self.scores.append(s)
        self.targets.append(y)
        self.video_cls.append(torch.full_like(y, int(cls)))
        # (video, frame) identity: video * 2^32 + frame; -1 = anonymous, never deduplicated
        key = torch.arange(y.numel(), device=y.device) + (int(video) << 32) if video is not None \
            else torch.full_like(y, -1)
        self.frame_key.append(key)

    def compute(self) -> dict[str, torch.Tensor]:
        cat = (lambda x: torch.cat(x) if isinstance(x, list) else x)
        s, y, c, key = cat(self.scores), cat(self.targets), cat(self.video_cls), cat(self.frame_key)
        named = key >= 0
        if named.any():  # keep the first copy of every (video, frame) scored more than once
            uniq, inverse = torch.unique(key[named], return_inverse=True)
            pos = torch.arange(inverse.numel(), device=key.device)
            first = torch.full((uniq.numel(),), inverse.numel(), device=key.device, dtype=pos.dtype)
            first = first.scatter_reduce(0, inverse, pos, reduce="amin")
            keep = ~named
            keep[torch.nonzero(named).flatten()[first]] = True
            s, y, c = s[keep], y[keep], c[keep]
        anom = c >= 0
        out = {"auc": _auc(s, y), "ap": _ap(s, y), "ap_step": _ap(s, y, stepwise=True),
               "auc_a": _auc(s[anom], y[anom]),
               "ap_a": _ap(s[anom], y[anom])}
        for k in sorted(set(c[anom].tolist())):
            name = self.class_names[k] if k < len(self.class_names) else str(k)
            sel = (c == -1) | (c == k)
            out[f"auc/{name}"] = _auc(s[sel], y[sel])
        return out
