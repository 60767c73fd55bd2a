"""One autograd node for the sorted expert computation: gather, per-expert GEMMs, weighted combine.

Built from autograd primitives, a dropless MoE layer of E experts records about 6E + 8 nodes
(E ``addmm`` per expert layer, activations, a ``cat`` of the outputs, an ``unbind`` whose
backward stacks E weight gradients, the gather, the gate product and the scatter).
:class:`SortedExperts` does the same arithmetic with explicit forward and backward passes that
write every expert's rows straight into one output buffer and every expert's weight gradient
straight into its slot of the ``[E, ...]`` gradient, so nothing is concatenated or stacked, and
frees each expert's saved activations as soon as backward has used them. Measured at 1k tokens
(d=256, h=1024, E=8, k=2, interleaved A/B on the 2-core CPU): 2-3 % faster than the autograd
version (1.22x vs 1.24x the dense FFN with 1 thread, 1.44x vs 1.49x with 2), and peak memory of
fwd+bwd 0.96x / 0.98x the dense FFN at 8k / 32k tokens (``benchmarks/moe_layer.py``).

It runs for :class:`~zoo.moe.experts.MLPExperts` with a named activation (gelu, relu, silu,
tanh) and :class:`~zoo.moe.experts.SwiGLUExperts`, under autograd and without autocast.
Inference (no autograd) runs the same per-expert kernels through :func:`sorted_forward`, without
the node (it would save nothing, and its bookkeeping measured 5-10 % slower at 1-256 tokens).
Anything else uses the plain ops, which compute the same values (``tests/moe/test_fused.py``
checks values and gradients against them). On the CPU the experts of one layer run side by side
on the intra-op threads where that pays (:mod:`zoo.moe.threads`). Double backward
(``create_graph=True``, e.g. a gradient penalty) is not supported by the node: set
``experts.fused = False`` for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .threads import run_spans

_FORWARD = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def _act_backward(name: str, grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """d act(pre) / d pre applied to ``grad`` (``post`` = act(pre))."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, post, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    return torch.ops.aten.tanh_backward(grad, post)


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that has rows."""
    spans, lo = [], 0
    for e, c in enumerate(counts):
        if c:
            spans.append((e, lo, lo + c))
        lo += c
    return spans


def combine_rows(rows_out: torch.Tensor, rows: torch.Tensor, unsort: torch.Tensor | None, num_out: int,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
    """Sum sorted rows into their tokens, ``gate``-weighted when given:
    ``y[rows[a]] += gate[a] * rows_out[a]`` -> [num_out, width].

    With ``unsort``, each token's k rows are gathered next to each other and reduced by one
    batched ``[1, k] @ [k, width]`` product, so no weighted copy of the rows is made."""
    if unsort is not None:
        # k gathers and adds: 0.69-0.75x the time of one gather and a sum over the middle axis
        # of [num_out, k, width] (1,024 tokens, k=2, width 256, 1 and 2 threads; benchmarks/moe_ops.py)
        if gate is None:
            slots = unsort.view(num_out, -1)
            y = rows_out.index_select(0, slots[:, 0])
            for j in range(1, slots.shape[1]):
                y.add_(rows_out.index_select(0, slots[:, j]))
            return y
        gathered = rows_out.index_select(0, unsort).view(num_out, -1, rows_out.shape[-1])
        g = gate.to(rows_out.dtype).index_select(0, unsort).view(num_out, 1, -1)
        return torch.bmm(g, gathered).view(num_out, -1)
    if gate is not None:
        rows_out = rows_out * gate.to(rows_out.dtype).unsqueeze(-1)
    return rows_out.new_zeros(num_out, rows_out.shape[-1]).index_add_(0, rows, rows_out)


def _graph_kept() -> bool:
    """Whether this backward keeps the graph (``retain_graph=True``): then nothing saved may be
    freed, since a second backward will need it. Unknown (older torch) counts as kept."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def _row_cost(params) -> int:
    """Multiply-adds one row costs in the forward: the weight matrices of one expert."""
    return sum(p[0].numel() for p in params if p.dim() == 3)


def _grads_like(params, full: bool):
    # an expert without rows gets an exact zero gradient; otherwise every slot is overwritten
    make = torch.empty_like if full else torch.zeros_like
    return [make(p) for p in params]


class SortedExperts(torch.autograd.Function):
    """``y = experts(x[rows])`` in expert-sorted order, optionally gate-weighted and summed per token.

    Arguments of :meth:`apply`: x [N, dim]; rows [A] or None (x already sorted); gate [A] or
    None (return the [A, out] expert outputs); num_out (rows of the combined output);
    unsort [A] or None: when every token has exactly ``A / num_out`` assignments, numbered
    token-major before sorting, ``unsort[j]`` is the sorted position of assignment j; the
    combine and the input gradient are then a gather and a sum over each token's k rows
    instead of a scatter-add;
    counts (python list, rows per expert); kind ("mlp:<activation>" or "swiglu"); threaded
    (whether the experts may run side by side on the CPU, :mod:`zoo.moe.threads`); then the
    expert parameters (w1, b1, w2, b2) or (w1, b1, w3, b3, w2, b2).
    """

    @staticmethod
    def forward(ctx, x, rows, gate, num_out, unsort, counts, kind, threaded, *params):
        spans = _spans(counts)
        out = x.new_empty(sum(counts), params[-1].shape[-1])
        # everything per expert happens on the thread that runs the expert (zoo.moe.threads):
        # the gather of its rows, its GEMMs; the inputs and hidden activations stay per expert,
        # [count_e, ...] blocks that the allocator recycles step after step
        inputs, hidden = [None] * len(spans), [None] * len(spans)
        per_expert = _per_expert(params)

        def expert(j, e, lo, hi):
            xe = x[lo:hi] if rows is None else x.index_select(0, rows[lo:hi])
            inputs[j] = xe
            hidden[j] = _expert_forward(kind, per_expert[e], xe, out[lo:hi])

        run_spans(expert, spans, x, threaded, _row_cost(params))
        ctx.spans, ctx.kind, ctx.num_rows, ctx.combined = spans, kind, x.shape[0], gate is not None
        ctx.threaded, ctx.x_dtype = threaded, x.dtype
        # intermediates live on ctx (not save_for_backward) so backward can drop each one as
        # soon as it is used, as autograd frees a node's saved tensors: one expert's hidden
        # activations at a time instead of all of them until the end
        ctx.num_experts, ctx.hidden, ctx.inputs = params[0].shape[0], hidden, inputs
        if gate is None:
            ctx.out = None
            ctx.save_for_backward(rows, None, None, *params)
            return out
        # the unweighted outputs are kept only when the gate needs a gradient
        ctx.out = out if ctx.needs_input_grad[2] else None
        if unsort is None and ctx.out is None:
            y = combine_rows(out.mul_(gate.to(out.dtype).unsqueeze(-1)), rows, None, num_out)
        else:
            y = combine_rows(out, rows, unsort, num_out, gate)
        ctx.save_for_backward(rows, gate, unsort, *params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        rows, gate, unsort, *params = ctx.saved_tensors
        spans, kind, hidden, inputs, out = ctx.spans, ctx.kind, ctx.hidden, ctx.inputs, ctx.out
        free = not _graph_kept()
        if free:
            ctx.out = None
        grad_y = grad_y.contiguous()
        num_rows = sum(hi - lo for _, lo, hi in spans)
        # the gate gradient <d y / d out_a, out_a>, per row in the outputs' dtype
        grad_gate = grad_y.new_empty(num_rows) if out is not None else None
        g = gate.to(grad_y.dtype).unsqueeze(-1) if ctx.combined else None
        need_x = ctx.needs_input_grad[0]
        grads = _grads_like(params, len(spans) == ctx.num_experts)
        gxs = grad_y.new_empty(num_rows, params[0].shape[1], dtype=ctx.x_dtype) if need_x else None
        ones = grad_y.new_ones(max(hi - lo for _, lo, hi in spans)) if spans else None
        per_expert, grads_per_expert = _per_expert(params), _per_expert(grads)

        def expert(j, e, lo, hi):
            saved, xe = hidden[j], inputs[j]
            if free:
                hidden[j] = inputs[j] = None
            if g is None:
                ge = grad_y[lo:hi]
            else:  # this expert's rows of the output gradient, times their gates
                ge = grad_y.index_select(0, rows[lo:hi])
                if grad_gate is not None:  # row dots: 0.81-0.95x a [rows,1,1] bmm (benchmarks/moe_ops.py)
                    torch.linalg.vecdot(ge, out[lo:hi], out=grad_gate[lo:hi])
                ge.mul_(g[lo:hi])
            _expert_backward(kind, per_expert[e], grads_per_expert[e], saved, xe, ge,
                             gxs[lo:hi] if need_x else None, ones)

        run_spans(expert, spans, grad_y, ctx.threaded, _row_cost(params))
        if free:
            ctx.hidden = ctx.inputs = None
        grad_x = None
        if need_x:
            grad_x = gxs if rows is None else combine_rows(gxs, rows, unsort, ctx.num_rows)
        if grad_gate is not None:
            grad_gate = grad_gate.to(gate.dtype)
        return (grad_x, None, grad_gate, None, None, None, None, None, *grads)


def _per_expert(tensors) -> list[tuple[torch.Tensor, ...]]:
    """[(t[e] for t in tensors) for each expert e]: one ``unbind`` per tensor instead of one
    ``select`` per tensor and expert (the same views; a few microseconds less per expert)."""
    return list(zip(*(t.unbind(0) for t in tensors)))


def _expert_forward(kind: str, pe, xe: torch.Tensor, out: torch.Tensor) -> tuple:
    """One expert, parameters ``pe`` (its slices of w1, b1[, w3, b3], w2, b2), on its rows
    ``xe``, written into ``out``; returns what backward needs."""
    # the hidden layer's bias is added after the product instead of by addmm (which copies it
    # into the output for the GEMM to read back): 0.97-0.99x the time (benchmarks/moe_ops.py)
    if kind == "swiglu":
        w1, b1, w3, b3 = pe[:4]
        p1, p3 = torch.mm(xe, w1).add_(b1), torch.mm(xe, w3).add_(b3)
        h = p1 * F.silu(p3)
        saved = (p1, p3, h)
    else:
        w1, b1 = pe[:2]
        pre = torch.mm(xe, w1).add_(b1)
        h = _FORWARD[kind[4:]](pre)
        saved = (pre, h)
    torch.addmm(pe[-1], h, pe[-2], out=out)
    return saved


def _expert_backward(kind: str, pe, grads, saved: tuple, xe, ge, gx, ones) -> None:
    """One expert's weight gradients into ``grads`` (one tensor per parameter, shaped like its
    parameters ``pe``) and, when ``gx`` is given, its input gradient into ``gx``, from the output
    gradient ``ge`` of its rows ``xe``.

    The bias gradients (column sums) are matrix-vector products with ``ones`` (at least as many
    ones as rows): ``g.t() @ 1`` took 0.57-0.69x the time of ``sum(g, 0)`` for the hidden layer's
    [rows, 1024] and 0.88-1.06x for the output's [rows, 256] at 256-1,024 rows, one thread
    (``benchmarks/moe_ops.py``)."""
    h = saved[-1]
    gw2, gb2 = grads[-2:]
    ones = ones[:ge.shape[0]]
    torch.mm(h.t(), ge, out=gw2)
    torch.mv(ge.t(), ones, out=gb2)
    gh = torch.mm(ge, pe[-2].t())  # [count_e, hidden]
    if kind == "swiglu":
        p1, p3, _ = saved
        gp1 = gh * F.silu(p3)
        gp3 = torch.ops.aten.silu_backward(gh.mul_(p1), p3)
        pairs = ((gp1, 0), (gp3, 2))
    else:
        pre, _ = saved
        pairs = ((_act_backward(kind[4:], gh, pre, h), 0),)
    for n, (gp, i) in enumerate(pairs):
        torch.mm(xe.t(), gp, out=grads[i])
        torch.mv(gp.t(), ones, out=grads[i + 1])
        if gx is not None:
            if n == 0:
                torch.mm(gp, pe[i].t(), out=gx)
            else:
                gx.addmm_(gp, pe[i].t())


#: the activations the explicit kernels know (an ``MLPExperts`` with another runs on autograd)
FUSED_ACTIVATIONS = tuple(_FORWARD)


def can_fuse(experts, x: torch.Tensor, grad: bool = True) -> str | None:
    """The kind to run ``experts`` on ``x`` through :class:`SortedExperts` (``grad=True``: only
    under autograd) or :func:`sorted_forward` (``grad=False``: only without it), or None.

    None also under autocast (the explicit kernels do not autocast) and when one of the expert
    tensors differs from ``x`` in dtype or device."""
    kind = experts.fused_kind() if getattr(experts, "fused", False) else None
    if kind is None or torch.is_grad_enabled() != grad or torch.is_autocast_enabled(x.device.type):
        return None
    for p in experts.parameters():
        if p.dtype != x.dtype or p.device != x.device:
            return None
    return kind


def sorted_forward(x_sorted: torch.Tensor, counts: list[int], kind: str, threaded: bool, params) -> torch.Tensor:
    """Inference: the experts on their sorted rows -> [A, out], written into one buffer (no
    concatenation, nothing kept), side by side on the CPU when :mod:`zoo.moe.threads` says so."""
    out = x_sorted.new_empty(x_sorted.shape[0], params[-1].shape[-1])
    per_expert = _per_expert(params)
    run_spans(lambda j, e, lo, hi: _expert_forward(kind, per_expert[e], x_sorted[lo:hi], out[lo:hi]),
              _spans(counts), x_sorted, threaded, _row_cost(params))
    return out


def expert_params(experts, kind: str) -> list[torch.Tensor]:
    names = ("w1", "b1", "w3", "b3", "w2", "b2") if kind == "swiglu" else ("w1", "b1", "w2", "b2")
    return [getattr(experts, n) for n in names]
