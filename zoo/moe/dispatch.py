"""Sort-and-slice dispatch: the only place where capacity, dropping and scattering live.

A routed forward is four steps; this module holds the middle two and the records between them:

1. route (``routers.py``): indices and gate weights per token (or per expert);
2. assign: flat (token, expert, gate) triples, :class:`Assignments`, one small function per
   router kind (:func:`token_choice`, :func:`expert_choice`);
3. dispatch (:func:`sort_by_expert`, :func:`apply_capacity`): sort the assignments by expert
   so each expert computes one contiguous slice, and with ``capacity`` keep at most that many
   per expert, taken in ``priority`` order (lower first); the rest are dropped (output 0; the
   caller's residual connection carries the token through);
4. experts and combine (:meth:`zoo.moe.experts.BatchedExperts.combine_sorted`): each expert on
   its slice, results summed into their tokens weighted by the gate.

:func:`dispatch` runs steps 3 and 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import BatchedExperts


@dataclass
class Assignments:
    """Flat (token, expert, gate) triples of one routed forward, all [A].

    ``priority`` orders the assignments for capacity (lower kept first; None = no capacity);
    ``per_token=k`` declares exactly k assignments per token, token-major
    (``token = arange(N).repeat_interleave(k)``), so the combine can gather instead of scatter.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    priority: torch.Tensor | None = None
    per_token: int | None = None

    def select(self, mask: torch.Tensor) -> "Assignments":
        """The assignments where ``mask`` [A] is True (no longer k per token)."""
        return Assignments(self.token[mask], self.expert[mask], self.weight[mask],
                           None if self.priority is None else self.priority[mask])


def token_choice(indices: torch.Tensor, weights: torch.Tensor, with_priority: bool = False) -> Assignments:
    """Token-choice routing, indices/weights [N, k] -> N*k assignments, token-major. With
    ``with_priority``, every token's first choice goes before anyone's second (GShard)."""
    n, k = indices.shape
    token = torch.arange(n, device=indices.device).repeat_interleave(k)
    priority = torch.arange(k, device=indices.device).repeat(n) * n + token if with_priority else None
    return Assignments(token, indices.reshape(-1), weights.reshape(-1), priority, per_token=k)


def expert_choice(indices: torch.Tensor, weights: torch.Tensor) -> Assignments:
    """Expert-choice routing, indices/weights [E, C] (the tokens each expert picked) -> E*C
    assignments, expert-major."""
    e, c = indices.shape
    expert = torch.arange(e, device=indices.device).repeat_interleave(c)
    return Assignments(indices.reshape(-1), expert, weights.reshape(-1))


@dataclass
class Sorted:
    """Assignments sorted by expert (stable), ready for the experts: ``rows`` [A'] the token of
    each kept one, ``expert``/``gate`` [A'], ``counts`` [E] per expert, ``unsort`` [A] or None
    (see :meth:`BatchedExperts.combine_sorted`), ``kept`` [A] bool in the input order, or None
    when nothing was dropped."""

    rows: torch.Tensor
    expert: torch.Tensor
    gate: torch.Tensor
    counts: torch.Tensor
    unsort: torch.Tensor | None
    kept: torch.Tensor | None


def sort_by_expert(a: Assignments, num_experts: int) -> tuple[Sorted, torch.Tensor]:
    """Step 3a: the assignments in (priority, then) expert order; also returns the permutation
    (sorted position -> input position)."""
    perm = a.priority.argsort(stable=True) if a.priority is not None else None
    expert = a.expert if perm is None else a.expert[perm]
    order = torch.argsort(expert, stable=True)
    if perm is not None:
        order = perm[order]
    ei = a.expert[order]
    counts = torch.bincount(ei, minlength=num_experts)
    unsort = None
    if a.per_token is not None and a.priority is None:
        # the sorted position of every token-major assignment: a gather combines each token's k rows
        unsort = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    return Sorted(a.token[order], ei, a.weight[order], counts, unsort, None), order


def apply_capacity(s: Sorted, order: torch.Tensor, capacity: int) -> Sorted:
    """Step 3b: keep the first ``capacity`` assignments of each expert (in sorted order)."""
    n = s.rows.numel()
    starts = torch.cumsum(s.counts, 0) - s.counts
    position = torch.arange(n, device=s.rows.device) - starts[s.expert]  # rank inside its expert
    keep = position < capacity
    kept = torch.empty(n, dtype=torch.bool, device=keep.device)
    kept[order] = keep  # back in the caller's assignment order
    return Sorted(s.rows[keep], s.expert[keep], s.gate[keep], s.counts.clamp(max=capacity), None, kept)


def dispatch(x: torch.Tensor, token_index: torch.Tensor | Assignments, expert_index: torch.Tensor | None = None,
             weights: torch.Tensor | None = None, experts: BatchedExperts | None = None, capacity: int | None = None,
             priority: torch.Tensor | None = None, per_token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``experts`` on the assigned tokens and combine (steps 3 and 4).

    Called as ``dispatch(x, assignments, experts=..., capacity=...)`` or with the flat tensors:
    x: [N, dim]; token_index, expert_index, weights: [A]; priority: [A] (lower = kept first);
    ``per_token=k``: exactly k assignments per token, token-major (see :class:`Assignments`).
    Returns y [N, out] = sum over kept assignments a of weights[a] * expert[e_a](x[t_a]),
    and kept [A] bool (in the input order of the assignments).
    """
    if isinstance(token_index, Assignments):
        a = token_index
    else:
        a = Assignments(token_index, expert_index, weights, priority, per_token)
    if a.per_token is not None and a.token.numel() != x.shape[0] * a.per_token:
        raise ValueError(f"dispatch(per_token={a.per_token}) needs {x.shape[0] * a.per_token} assignments "
                         f"for {x.shape[0]} tokens, got {a.token.numel()}")
    s, order = sort_by_expert(a, experts.num_experts)
    if capacity is not None:
        s = apply_capacity(s, order, capacity)
    y = experts.combine_sorted(x, s.rows, s.expert, s.counts, s.gate, s.unsort)  # [N, out]
    kept = s.kept if s.kept is not None else torch.ones(a.token.numel(), dtype=torch.bool, device=x.device)
    return y, kept
