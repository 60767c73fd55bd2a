"""Routing records shared by every routed layer.

`RoutingInfo` is what a routed layer remembers about its last forward; `RoutedModule` is the
base class that lets `zoo.moe.aux_loss`, `zoo.moe.routing_stats`, the FLOP/param counters and
the plotting code find a layer without any module-global registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RoutingInfo:
    """What one routed forward did.

    Assignments are kept as flat lists so token-choice (top-k), expert-choice and
    variable-k (dense-to-sparse) routing share one representation:

    - ``token_index`` [A]: the token of each assignment (index into the flattened tokens).
    - ``expert_index`` [A]: the expert of each assignment (``>= num_experts`` = null expert).
    - ``weights`` [A]: the gate weight of each assignment.
    - ``kept`` [A] bool: False where capacity dropped the assignment.
    - ``probs`` [N, E_total]: router probabilities per token (None for soft MoE).
    - ``indices`` [N, k]: token-choice expert indices (None where k is not fixed).
    - ``token_shape``: leading shape of the input (``x.shape[:-1]``), to map tokens back.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    num_experts: int
    num_tokens: int
    token_shape: tuple
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    null_experts: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        """Number of assignments dropped by capacity."""
        return int((~self.kept).sum())

    @property
    def drop_rate(self) -> float:
        n = self.kept.numel()
        return float((~self.kept).sum()) / n if n else 0.0

    @property
    def null_fraction(self) -> float:
        """Share of assignments that went to a null (no-compute) expert."""
        n = self.expert_index.numel()
        if n == 0 or self.null_experts == 0:
            return 0.0
        return float((self.expert_index >= self.num_experts).sum()) / n

    @property
    def load(self) -> torch.Tensor:
        """[E] fraction of real-expert assignments each expert received (kept ones)."""
        e = self.expert_index[self.kept & (self.expert_index < self.num_experts)]
        counts = torch.bincount(e, minlength=self.num_experts).float()
        return counts / counts.sum().clamp_min(1.0)

    def top1_per_token(self) -> torch.Tensor:
        """[N] the highest-weighted expert of each token (-1 for a token with no assignment)."""
        top = torch.full((self.num_tokens,), -1, dtype=torch.long, device=self.token_index.device)
        best = torch.full((self.num_tokens,), -float("inf"), device=self.token_index.device)
        w = self.weights.detach().float()
        best = best.scatter_reduce(0, self.token_index, w, reduce="amax")
        is_best = w >= best[self.token_index]
        top[self.token_index[is_best]] = self.expert_index[is_best]
        return top

    def usage_per_token(self) -> torch.Tensor:
        """[N, E_total] gate mass each token sent to each expert (kept assignments)."""
        total = self.num_experts + self.null_experts
        out = torch.zeros(self.num_tokens, total, device=self.weights.device)
        w = (self.weights.detach().float() * self.kept).abs()
        out.index_put_((self.token_index, self.expert_index), w, accumulate=True)
        return out


class RoutedModule(nn.Module):
    """Base class for any layer that routes: it sets ``self.aux_loss`` and ``self.last_routing``.

    Subclasses override :meth:`inactive_param_count` so active-parameter counts know which
    parameters one sample does not use.
    """

    def __init__(self):
        super().__init__()
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_routing: RoutingInfo | None = None
        self._route_ctx: torch.Tensor | None = None

    def inactive_param_count(self) -> int:
        """Parameters of this layer that one token/sample does not use (default: none)."""
        return 0
