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

from .fused import FUSED_ACTIVATIONS, SortedExperts, can_fuse, combine_rows, expert_params, sorted_forward

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


class BatchedExperts(nn.Module):
    """Base of E experts stored as batched weights whose leading dim is the expert.

    A subclass defines ``forward_expert(e, x)``, ``forward_batched(x [E, C, dim])`` and
    ``params_per_expert()``; every parameter's first dim must be E (that is what
    :meth:`keep_experts` slices for expert parallelism).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"{type(self).__name__} needs positive sizes, got num_experts={num_experts}, "
                             f"dim={dim}, hidden={hidden}")
        self.num_experts, self.dim, self.hidden, self.out_dim = num_experts, dim, hidden, out_dim or dim
        self._layers: list[tuple[str, str, int]] = []

    def _add_layer(self, w: str, b: str, fan_in: int, fan_out: int) -> None:
        """Batched weight ``w [E, fan_in, fan_out]`` and bias ``b [E, fan_out]``."""
        setattr(self, w, nn.Parameter(torch.empty(self.num_experts, fan_in, fan_out)))
        setattr(self, b, nn.Parameter(torch.empty(self.num_experts, fan_out)))
        self._layers.append((w, b, fan_in))

    def reset_parameters(self):
        # Same law as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per expert.
        for w, b, fan_in in self._layers:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(getattr(self, w), -bound, bound)
            nn.init.uniform_(getattr(self, b), -bound, bound)

    def keep_experts(self, lo: int, hi: int) -> None:
        """Keep only experts ``lo .. hi-1`` (this rank's shard under expert parallelism)."""
        if not 0 <= lo < hi <= self.num_experts:
            raise ValueError(f"keep_experts({lo}, {hi}) outside 0..{self.num_experts}")
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))
        self.num_experts = hi - lo

    #: run the experts as one padded ``bmm`` when the busiest expert's rows times E are at most
    #: this multiple of the assignments (balanced routing), else one GEMM per expert slice.
    #: Off by default: on the 2-core CPU the padded path measured slower than the slices at every
    #: size (fwd+bwd, d=256, h=1024, E=8, k=2: 1.26/1.01/1.30x dense vs 1.21/0.87/1.16x at
    #: 1k/8k/32k tokens); set e.g. 1.25 to try it where one batched GEMM pays (accelerators).
    pad_limit: float = 0.0

    #: run small layers as one padded ``bmm`` per expert layer whatever the balance: when E x
    #: (the busiest expert's rows) x (multiply-adds per row) is at most this. There the
    #: per-expert ops' fixed costs (4-9 ops per expert, each a few microseconds on the CPU)
    #: outweigh the padded rows' work. Measured fwd+bwd, one thread, padded / per-expert time:
    #: 0.58-0.79 at 5e6 (32x128, 256 tokens, E=8; ``benchmarks/moe_small.py``) and 0.34 at 7e6
    #: (SwiGLU 32x128, 256 tokens, E=4, medians of 200), but 1.06-1.14 at 4.4e7 (the same layer
    #: at 1,536 tokens, MoDE's size), so the crossover is set at ``2^24``: every task layer at its
    #: default size stays per expert. It applies to the layer's own dispatch
    #: (:meth:`combine_sorted`, :meth:`forward_grouped`); :meth:`forward_sorted`, which task heads
    #: with their own routing call, stays per expert. Same values as the per-expert path up to
    #: float rounding; 0 switches it off. Never while FLOPs are counted (a dispatch mode is
    #: active): FLOP counts see only the routed rows.
    pad_small_work: int = 1 << 24

    #: run sorted tokens through :class:`zoo.moe.fused.SortedExperts` (one autograd node with
    #: explicit GEMMs into shared buffers) where the expert type allows; False forces the
    #: autograd version (same values; needed only for double backward)
    fused: bool = True

    #: on the CPU with more than one intra-op thread, run groups of experts side by side, one
    #: thread each (:mod:`zoo.moe.threads`; same values); False keeps them one after another
    threaded: bool = True

    def combine_sorted(self, x: torch.Tensor, rows: torch.Tensor, expert_index: torch.Tensor,
                       counts: torch.Tensor, gate: torch.Tensor, unsort: torch.Tensor | None = None) -> torch.Tensor:
        """``y[t] = sum_a gate[a] * expert[e_a](x[t])`` over assignments a with ``rows[a] = t``.

        x: [N, dim]; rows, expert_index, gate: [A], sorted by expert; counts: [E] -> y [N, out].
        ``unsort`` [A] (optional): when each token has exactly A/N assignments, the sorted
        position of each assignment in token-major order; the sum is then a gather instead
        of a scatter-add. One strategy runs (:meth:`strategy`): ``padded``
        (:meth:`_rows_padded`), ``fused`` (training: one autograd node, :mod:`zoo.moe.fused`),
        ``kernels`` (inference: the same per-expert kernels without the node) or ``slices``
        (per-expert autograd ops, :meth:`_slices`).
        """
        counts_l = counts.tolist()  # the layer's one host sync: how many rows each expert gets
        strategy = self.strategy(x, counts_l)
        if strategy == "kernels":  # inference: the explicit per-expert kernels, then the combine
            return combine_rows(self._sorted_kernels(x.index_select(0, rows), counts_l), rows, unsort, x.shape[0], gate)
        if strategy == "fused":
            kind = can_fuse(self, x)
            return SortedExperts.apply(x, rows, gate, x.shape[0], unsort, counts_l, kind, self.threaded,
                                       *expert_params(self, kind))
        if strategy == "padded":
            out = self._rows_padded(x.index_select(0, rows), expert_index, counts, counts_l)
        else:
            out = self._slices(x.index_select(0, rows), counts_l)
        return combine_rows(out, rows, unsort, x.shape[0], gate)

    def strategy(self, x: torch.Tensor, counts: list[int]) -> str:
        """How these per-expert row counts run: "padded", "fused", "kernels" or "slices"."""
        if self.padded(counts):
            return "padded"
        if can_fuse(self, x) is not None:
            return "fused"
        return "kernels" if can_fuse(self, x, grad=False) is not None else "slices"

    def row_macs(self) -> int:
        """Multiply-adds of one row through one expert (its weight matrices)."""
        return sum(p[0].numel() for p in self.parameters() if p.dim() == 3)

    def padded(self, counts: list[int]) -> bool:
        """Whether these per-expert row counts run as one zero-padded batched GEMM
        (:attr:`pad_limit`, :attr:`pad_small_work`). Never while a dispatch mode (FLOP counting,
        fake tensors) is active: FLOP counts see only the routed rows."""
        a = sum(counts)
        if a == 0 or torch._C._len_torch_dispatch_stack():
            return False
        rows = max(counts) * len(counts)
        return rows <= self.pad_limit * a or rows * self.row_macs() <= self.pad_small_work

    def fused_kind(self) -> str | None:
        """The :class:`~zoo.moe.fused.SortedExperts` kernel kind of this expert type, or None
        when it runs on autograd ops (every subclass that is not exactly MLP or SwiGLU)."""
        return None

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # defined by every subclass
        raise TypeError(f"{type(self).__name__} must define forward_expert(e, x) and forward_batched(x)")

    def forward_grouped(self, x: torch.Tensor, rows: torch.Tensor, expert_index: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        """Experts on ``x[rows]``, assignments already sorted by expert -> [A, out] in that order.

        rows, expert_index: [A] (expert_index non-decreasing); counts: [E] rows per expert.
        Padded (:meth:`padded`) or per-expert slices, without the combine."""
        counts_l = counts.tolist()
        if rows.numel() == 0:
            return x.new_zeros(0, self.out_dim)
        if self.padded(counts_l):
            return self._rows_padded(x.index_select(0, rows), expert_index, counts, counts_l)
        return self.forward_sorted(x.index_select(0, rows), counts_l)

    def _rows_padded(self, x_sorted: torch.Tensor, expert_index: torch.Tensor | None, counts: torch.Tensor | None,
                     counts_l: list[int]) -> torch.Tensor:
        """Sorted rows through one :meth:`forward_batched` on a zero-padded ``[E, max count, dim]``
        buffer -> [A, out] in the same order. One batched GEMM per expert layer, whose weight
        gradients come out already stacked; the padded rows are never read back, so they add
        nothing to any gradient. ``expert_index``/``counts`` (tensors) are derived from
        ``counts_l`` when not given."""
        e, c, a = len(counts_l), max(counts_l), x_sorted.shape[0]
        if counts is None:
            counts = torch.tensor(counts_l, device=x_sorted.device)
        if expert_index is None:
            expert_index = torch.repeat_interleave(torch.arange(e, device=x_sorted.device), counts, output_size=a)
        starts = torch.cumsum(counts, 0) - counts
        slot = expert_index * c + (torch.arange(a, device=x_sorted.device) - starts[expert_index])  # [A]
        buf = x_sorted.new_zeros(e * c, x_sorted.shape[-1]).index_copy(0, slot, x_sorted)
        out = self.forward_batched(buf.view(e, c, -1))  # [E, c, out]
        return out.reshape(e * c, -1).index_select(0, slot)

    def _sorted_kernels(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """The explicit per-expert kernels of :mod:`zoo.moe.fused` where this expert type has them:
        the fused autograd node in training, :func:`sorted_forward` in inference; else None."""
        kind = can_fuse(self, x_sorted)
        if kind is not None:
            return SortedExperts.apply(x_sorted, None, None, 0, None, counts, kind, self.threaded,
                                       *expert_params(self, kind))
        kind = can_fuse(self, x_sorted, grad=False)
        if kind is not None:
            return sorted_forward(x_sorted, counts, kind, self.threaded, expert_params(self, kind))
        return None

    def forward_sorted(self, x_sorted: torch.Tensor, counts) -> torch.Tensor:
        """Tokens grouped by expert (``counts[e]`` rows for expert e, in order) -> [sum, out],
        always per expert (the kernels of :mod:`zoo.moe.fused` or :meth:`_slices`): the exact
        rows, whatever the size. :meth:`forward_grouped` is the same with small layers padded."""
        counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
        out = self._sorted_kernels(x_sorted, counts)
        return out if out is not None else self._slices(x_sorted, counts)

    def _slices(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The autograd per-expert path: :meth:`forward_expert` on each expert's slice."""
        outs = [self.forward_expert(e, xs) for e, xs in enumerate(torch.split(x_sorted, counts)) if xs.shape[0]]
        if not outs:
            return x_sorted.new_zeros(0, self.out_dim)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: x [N, dim] -> [E, N, out] (mixtures such as PMOE)."""
        return self.forward_batched(x.unsqueeze(0).expand(self.num_experts, *x.shape))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"out_dim={self.out_dim}")


class MLPExperts(BatchedExperts):
    """E independent MLPs ``out = act(x W1_e + b1_e) W2_e + b2_e`` stored as batched weights."""

    def __init__(self, num_experts: int, dim: int, hidden: int, out_dim: int | None = None,
                 activation: str = "gelu"):
        super().__init__(num_experts, dim, hidden, out_dim)
        self.activation = activation
        self.act = get_activation(activation)
        self._add_layer("w1", "b1", dim, hidden)
        self._add_layer("w2", "b2", hidden, self.out_dim)
        self.reset_parameters()

    def params_per_expert(self) -> int:
        return self.dim * self.hidden + self.hidden + self.hidden * self.out_dim + self.out_dim

    def fused_kind(self) -> str | None:
        if type(self) is MLPExperts and isinstance(self.activation, str) and self.activation in FUSED_ACTIVATIONS:
            return f"mlp:{self.activation}"
        return None

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x`` [n, dim] -> [n, out]."""
        h = self.act(torch.addmm(self.b1[e], x, self.w1[e]))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def _slices(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
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

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class SwiGLUExperts(BatchedExperts):
    """E SwiGLU MLPs ``out = ((x W1_e + b1_e) * silu(x W3_e + b3_e)) W2_e + b2_e`` (Shazeer 2020,
    the FFN of LLaMA-style and MoDE transformers), batched like :class:`MLPExperts` plus the
    gate projection ``w3 [E, dim, hidden]``, ``b3 [E, hidden]``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__(num_experts, dim, hidden, out_dim)
        self._add_layer("w1", "b1", dim, hidden)
        self._add_layer("w3", "b3", dim, hidden)
        self._add_layer("w2", "b2", hidden, self.out_dim)
        self.reset_parameters()

    def params_per_expert(self) -> int:
        return 2 * (self.dim * self.hidden + self.hidden) + self.hidden * self.out_dim + self.out_dim

    def fused_kind(self) -> str | None:
        return "swiglu" if type(self) is SwiGLUExperts else None

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens x [n, dim] -> [n, out]."""
        h = torch.addmm(self.b1[e], x, self.w1[e]) * F.silu(torch.addmm(self.b3[e], x, self.w3[e]))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Buckets x [E, C, dim] -> [E, C, out]."""
        h = torch.baddbmm(self.b1[:, None], x, self.w1) * F.silu(torch.baddbmm(self.b3[:, None], x, self.w3))
        return torch.baddbmm(self.b2[:, None], h, self.w2)


EXPERTS = {"mlp": MLPExperts, "swiglu": SwiGLUExperts}


class DenseFFN(nn.Module):
    """The dense twin of an MoE layer: one MLP ``dim -> hidden -> out_dim``.

    ``activation="swiglu"`` gives the twin of ``MoE(expert="swiglu")``:
    ``fc2((fc1 x) * silu(fc3 x))``, with ``2 * (dim * h + h) + h * out + out`` parameters.
    """

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, activation: str = "gelu"):
        super().__init__()
        out_dim = out_dim or dim
        self.dim, self.hidden, self.out_dim = dim, hidden, out_dim
        self.swiglu = activation == "swiglu"
        self.fc1 = nn.Linear(dim, hidden)
        self.fc3 = nn.Linear(dim, hidden) if self.swiglu else None
        self.fc2 = nn.Linear(hidden, out_dim)
        self.act = F.silu if self.swiglu else get_activation(activation)

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        # `route` is accepted (and ignored) so a dense twin drops in wherever an MoE was.
        if self.swiglu:
            return self.fc2(self.fc1(x) * self.act(self.fc3(x)))
        return self.fc2(self.act(self.fc1(x)))
