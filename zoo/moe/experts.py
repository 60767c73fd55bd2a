"""Experts kept as batched weights so compute is a few large matmuls.

`MLPExperts` holds E two-layer MLPs as tensors ``w1 [E, dim, hidden]``, ``w2 [E, hidden, out]``.
Tokens sorted by expert are computed slice by slice (one GEMM per expert, no per-token loop);
`forward_all` and `forward_batched` run every expert at once with `bmm`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def get_activation(name: str):
    if callable(name):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLPExperts(nn.Module):
    """E independent MLPs ``out = act(x W1_e + b1_e) W2_e + b2_e`` stored as batched weights."""

    def __init__(self, num_experts: int, dim: int, hidden: int, out_dim: int | None = None,
                 activation: str = "gelu"):
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"MLPExperts needs positive sizes, got num_experts={num_experts}, "
                             f"dim={dim}, hidden={hidden}")
        out_dim = out_dim or dim
        self.num_experts, self.dim, self.hidden, self.out_dim = num_experts, dim, hidden, out_dim
        self.activation = activation
        self.act = get_activation(activation)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_dim))
        self.reset_parameters()

    def reset_parameters(self):
        # Same law as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per expert.
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def keep_experts(self, lo: int, hi: int) -> None:
        """Keep only experts ``lo .. hi-1`` (this rank's shard under expert parallelism)."""
        if not 0 <= lo < hi <= self.num_experts:
            raise ValueError(f"keep_experts({lo}, {hi}) outside 0..{self.num_experts}")
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))
        self.num_experts = hi - lo

    def params_per_expert(self) -> int:
        return self.dim * self.hidden + self.hidden + self.hidden * self.out_dim + self.out_dim

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x`` [n, dim] -> [n, out]."""
        h = self.act(torch.addmm(self.b1[e], x, self.w1[e]))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def forward_sorted(self, x_sorted: torch.Tensor, counts) -> torch.Tensor:
        """Tokens grouped by expert (``counts[e]`` rows for expert e, in order) -> [sum, out]."""
        counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
        # unbind once: one backward node stacks the per-expert grads, instead of E select-backwards
        # that each materialise a zero tensor of the full [E, ...] weight
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        outs = []
        for e, xs in enumerate(torch.split(x_sorted, counts)):
            if xs.shape[0]:
                h = self.act(torch.addmm(b1[e], xs, w1[e]))
                outs.append(torch.addmm(b2[e], h, w2[e]))
        if not outs:
            return x_sorted.new_zeros(0, self.out_dim)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Equal-sized buckets ``x`` [E, C, dim] -> [E, C, out] (expert choice, soft MoE)."""
        h = self.act(torch.baddbmm(self.b1[:, None, :], x, self.w1))
        return torch.baddbmm(self.b2[:, None, :], h, self.w2)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: x [N, dim] -> [E, N, out] (mixtures such as PMOE)."""
        return self.forward_batched(x.unsqueeze(0).expand(self.num_experts, *x.shape))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"out_dim={self.out_dim}, activation={self.activation}")


class DenseFFN(nn.Module):
    """The dense twin of an MoE layer: one MLP ``dim -> hidden -> out_dim``."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, activation: str = "gelu"):
        super().__init__()
        out_dim = out_dim or dim
        self.dim, self.hidden, self.out_dim = dim, hidden, out_dim
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        # `route` is accepted (and ignored) so a dense twin drops in wherever an MoE was.
        return self.fc2(self.act(self.fc1(x)))
