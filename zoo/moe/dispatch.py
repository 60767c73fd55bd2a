"""Sort-and-slice dispatch: the only place where capacity, dropping and scattering live.

Assignments (token, expert, weight) are sorted by expert so each expert computes one
contiguous slice with one GEMM, and results are scattered back with ``index_add`` weighted by
the gate. With ``capacity`` set, each expert keeps at most that many assignments, taken in
``priority`` order (lower first), and the rest are dropped (their output is 0; the caller's
residual connection carries the token through).
"""
from __future__ import annotations

import torch

from .experts import BatchedExperts


def dispatch(x: torch.Tensor, token_index: torch.Tensor, expert_index: torch.Tensor,
             weights: torch.Tensor, experts: BatchedExperts, capacity: int | None = None,
             priority: torch.Tensor | None = None, per_token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``experts`` on the assigned tokens and combine.

    x: [N, dim]; token_index, expert_index, weights: [A]; priority: [A] (lower = kept first).
    ``per_token=k`` declares that the assignments are token-major with exactly k per token
    (``token_index = arange(N).repeat_interleave(k)``, dropless top-k routing); each token's
    outputs are then summed by a gather instead of a scatter-add.
    Returns y [N, out] = sum over kept assignments a of weights[a] * expert[e_a](x[t_a]),
    and kept [A] bool (in the input order of the assignments).
    """
    num_assign = token_index.numel()
    order0 = priority.argsort(stable=True) if priority is not None else None
    if order0 is not None:
        token_index, expert_index, weights = token_index[order0], expert_index[order0], weights[order0]
    order = torch.argsort(expert_index, stable=True)
    ti, ei, w = token_index[order], expert_index[order], weights[order]
    counts = torch.bincount(ei, minlength=experts.num_experts)
    kept_sorted = torch.ones(num_assign, dtype=torch.bool, device=x.device)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(num_assign, device=x.device) - starts[ei]  # rank inside its expert
        kept_sorted = position < capacity
        ti, w = ti[kept_sorted], w[kept_sorted]
        counts = counts.clamp(max=capacity)
    # index_select's backward is an index_add (fast); x[ti] would backprop through index_put
    ei_kept = ei if capacity is None else ei[kept_sorted]
    unsort = None
    if per_token is not None and capacity is None:
        if num_assign != x.shape[0] * per_token:
            raise ValueError(f"dispatch(per_token={per_token}) needs {x.shape[0] * per_token} assignments "
                             f"for {x.shape[0]} tokens, got {num_assign}")
        unsort = torch.empty_like(order).index_copy_(0, order, torch.arange(num_assign, device=x.device))
    y = experts.combine_sorted(x, ti, ei_kept, counts, w, unsort)  # [N, out]
    if capacity is None:
        return y, kept_sorted
    # map "kept" back to the caller's assignment order
    kept = torch.empty(num_assign, dtype=torch.bool, device=x.device)
    perm = order if order0 is None else order0[order]
    kept[perm] = kept_sorted
    return y, kept
