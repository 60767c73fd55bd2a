"""The token exchange of expert parallelism: each rank holds E/W experts, tokens travel by all-to-all.

The exchange follows DeepSpeed-MoE / tutel / megablocks, dropless:

1. every rank routes its own tokens (the router is replicated) and sorts its assignments by
   global expert id, so the assignments for rank r (experts ``r*E/W .. (r+1)*E/W - 1``) are
   one contiguous block;
2. the per-rank counts are exchanged first (``all_to_all_single`` on integers), then the token
   rows and their local expert ids;
3. each rank sorts what it received by local expert, runs one GEMM per expert slice, restores
   the received order and sends the outputs back with the reverse all-to-all;
4. the sender combines outputs with its gate weights (``index_add``).

The token exchanges are an autograd function whose backward is the reverse exchange, so
gradients reach the inputs on the sending rank and the expert weights on the owning rank.
Works with gloo (CPU) and nccl (CUDA). This module knows experts only as a
:class:`~zoo.moe.experts.BatchedExperts`; splitting whole models, DDP and checkpoints are in
:mod:`zoo.moe.parallel`, above the layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .experts import BatchedExperts


def world(group=None) -> tuple[int, int]:
    """(rank, world size) of ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


class _AllToAll(torch.autograd.Function):
    """Rows ``x[sum(send[:r]) : sum(send[:r+1])]`` go to rank r; the backward sends the gradient
    rows back the way they came (the same exchange with the counts swapped)."""

    @staticmethod
    def forward(ctx, x, recv_counts, send_counts, group):
        ctx.counts, ctx.group = (recv_counts, send_counts), group
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_counts, send_counts = ctx.counts
        back = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), send_counts, recv_counts, group=ctx.group)
        return back, None, None, None


def _exchange(x: torch.Tensor, recv_counts: list[int], send_counts: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows: ``send_counts[r]`` rows go to rank r."""
    return _AllToAll.apply(x, recv_counts, send_counts, group)


def expert_parallel_dispatch(x: torch.Tensor, token_index: torch.Tensor, expert_index: torch.Tensor,
                             weights: torch.Tensor, local_experts: BatchedExperts, num_experts: int,
                             group=None) -> torch.Tensor:
    """Dropless expert-parallel counterpart of :func:`zoo.moe.dispatch.dispatch`.

    x: [N, dim] this rank's tokens; token_index, expert_index (global ids), weights: [A].
    Returns y [N, out] = sum_a weights[a] * expert[e_a](x[t_a]), experts living on their ranks.
    """
    _, w = world(group)
    e_local = local_experts.num_experts
    order = torch.argsort(expert_index, stable=True)
    ti, ei, gw = token_index[order], expert_index[order], weights[order]
    dest = torch.div(ei, e_local, rounding_mode="floor")
    send_counts = torch.bincount(dest, minlength=w)
    recv_counts = _exchange_counts(send_counts, group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = _exchange(x.index_select(0, ti), recv, send, group)  # [R, dim]
    recv_e = torch.empty(sum(recv), dtype=ei.dtype, device=ei.device)
    dist.all_to_all_single(recv_e, (ei % e_local).contiguous(), recv, send, group=group)
    by_expert = torch.argsort(recv_e, stable=True)
    counts = torch.bincount(recv_e, minlength=e_local)
    out_sorted = local_experts.forward_grouped(recv_x, by_expert, recv_e.index_select(0, by_expert), counts)
    out = torch.empty_like(out_sorted).index_copy(0, by_expert, out_sorted)  # received order
    back = _exchange(out, send, recv, group)  # [A, out] aligned with ti
    y = x.new_zeros(x.shape[0], local_experts.out_dim)
    return y.index_add(0, ti, back * gw.unsqueeze(-1).to(back.dtype))
