"""Auxiliary routing losses. Each returns an unweighted 0-dim tensor; layers weight them."""
from __future__ import annotations

import torch


def switch_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6).

    ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of assignments routed to expert i and
    ``P_i`` the mean router probability of expert i. It equals 1 for uniform routing and grows
    as routing concentrates (up to E).

    probs: [N, E] router probabilities; expert_index: [A] chosen expert of each assignment.
    """
    if probs.numel() == 0:
        return probs.new_zeros(())
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)[:num_experts].to(probs.dtype)
    f = counts / counts.sum().clamp_min(1.0)
    p = probs.mean(0)[:num_experts]
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean of logsumexp(logits)^2."""
    if logits.numel() == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean^2 (Shazeer et al. 2017, eq. 6)."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean().pow(2) + 1e-10)


def smooth_load(clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, k: int) -> torch.Tensor:
    """Shazeer's differentiable load estimate (2017, appendix A, eq. 8-10).

    P(expert i stays in the top-k when only its own noise is redrawn) =
    Phi((clean_i - threshold_i) / noise_std), where the threshold is the k-th largest noisy
    logit of the other experts. Returns [E] expected token counts.
    """
    n, e = noisy_logits.shape
    top = noisy_logits.topk(min(k + 1, e), dim=-1).values  # [N, k+1]
    in_thresh = top[:, k - 1:k]  # k-th largest, threshold for experts outside the top-k
    out_thresh = top[:, k:k + 1] if e > k else top[:, k - 1:k]  # (k+1)-th, for experts inside
    is_in = noisy_logits >= in_thresh
    normal = torch.distributions.Normal(0.0, 1.0)
    p_in = normal.cdf((clean_logits - out_thresh) / noise_std)
    p_out = normal.cdf((clean_logits - in_thresh) / noise_std)
    return torch.where(is_in, p_in, p_out).sum(0)


def importance_load_loss(probs: torch.Tensor, gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """cv^2(importance) + cv^2(load) (Shazeer et al. 2017, sec. 4; M3ViT's auxiliary loss).

    gates: [N, E] gate values after top-k (zeros elsewhere); load: [E] token counts per expert.
    """
    return cv_squared(gates.sum(0)) + cv_squared(load)
