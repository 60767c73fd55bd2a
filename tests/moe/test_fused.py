"""The fused sorted-expert node (zoo.moe.fused.SortedExperts) against the autograd version."""
import pytest
import torch

from zoo.moe import MoE
from zoo.moe.experts import BatchedExperts, MLPExperts, SwiGLUExperts
from zoo.moe.fused import can_fuse


@pytest.fixture(autouse=True)
def per_expert_paths(monkeypatch):
    """Both sides take the per-expert paths even if small layers are ever padded by default
    (``BatchedExperts.pad_small_work``)."""
    monkeypatch.setattr(BatchedExperts, "pad_small_work", 0)


def _pair(**kw):
    torch.manual_seed(0)
    fused = MoE(16, 24, **kw)
    plain = MoE(16, 24, **kw)
    plain.load_state_dict(fused.state_dict())
    plain.experts.fused = False
    if plain.shared is not None:
        plain.shared.fused = False
    return fused, plain


def _grad_fn_names(y):
    seen, stack = set(), [y.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack += [n for n, _ in f.next_functions]
    return {type(f).__name__ for f in seen}


CASES = [
    dict(num_experts=8, k=2),
    dict(num_experts=8, k=2, activation="relu"),
    dict(num_experts=8, k=2, activation="silu"),
    dict(num_experts=8, k=2, activation="tanh"),
    dict(num_experts=8, k=2, expert="swiglu"),
    dict(num_experts=64, k=1),  # most experts get no token: their gradient must be exactly 0
    dict(num_experts=8, k=2, capacity_factor=0.5),  # dropped assignments
    dict(num_experts=4, k=2, null_experts=2),  # assignments to null experts compute nothing
    dict(num_experts=4, k=2, router="expert_choice"),
    dict(num_experts=4, k=1, router="switch", shared_experts=1),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_fused_equals_autograd_values_and_gradients(kw):
    fused, plain = _pair(**kw)
    x1 = torch.randn(3, 20, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = fused(x1), plain(x2)
    assert "SortedExpertsBackward" in _grad_fn_names(y1)
    assert "SortedExpertsBackward" not in _grad_fn_names(y2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    if kw.get("num_experts") == 64:
        used = set(fused.last_routing.expert_index.tolist())
        unused = [e for e in range(64) if e not in used]
        assert unused and fused.experts.w1.grad[unused].abs().max() == 0


@pytest.mark.parametrize("cls", [MLPExperts, SwiGLUExperts])
def test_forward_sorted_fused_equals_slices(cls):
    torch.manual_seed(1)
    ex = cls(5, 8, 12, out_dim=4)
    counts = [3, 0, 7, 1, 4]
    x1 = torch.randn(sum(counts), 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1 = ex.forward_sorted(x1, counts)
    ex.fused = False
    y2 = ex.forward_sorted(x2, counts)
    ref = torch.cat([ex.forward_expert(e, xs) for e, xs in enumerate(torch.split(x2.detach(), counts)) if len(xs)])
    torch.testing.assert_close(y1, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y1)
    grads1 = torch.autograd.grad(y1, [x1, *ex.parameters()], g)
    grads2 = torch.autograd.grad(y2, [x2, *ex.parameters()], g)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert grads1[1][1].abs().max() == 0  # expert 1 had no rows


def test_fused_without_input_grad_and_under_no_grad():
    fused, plain = _pair(num_experts=4, k=2)
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert can_fuse(fused.experts, x) is None  # inference runs the plain ops
        torch.testing.assert_close(fused(x), plain(x), atol=1e-6, rtol=1e-5)
    fused(x).sum().backward()  # x needs no grad: only the parameters get one
    plain(x).sum().backward()
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_fused_bfloat16_matches_autograd():
    fused, plain = _pair(num_experts=4, k=2)
    fused, plain = fused.to(torch.bfloat16), plain.to(torch.bfloat16)
    x = torch.randn(12, 16, dtype=torch.bfloat16, requires_grad=True)
    assert can_fuse(fused.experts, x) == "mlp:gelu"
    torch.testing.assert_close(fused(x), plain(x), atol=2e-2, rtol=2e-2)


def test_fused_falls_back_where_it_must():
    ex = MLPExperts(2, 8, 8, activation=torch.nn.functional.elu)  # a callable activation
    assert can_fuse(ex, torch.randn(1, 8)) is None
    ex = MLPExperts(2, 8, 8)
    assert can_fuse(ex, torch.randn(1, 8, dtype=torch.float64)) is None  # dtype differs from weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert can_fuse(ex, torch.randn(1, 8)) is None
    ex.fused = False
    assert can_fuse(ex, torch.randn(1, 8)) is None


def test_double_backward_needs_the_autograd_version():
    fused, plain = _pair(num_experts=4, k=2)
    x = torch.randn(6, 16, requires_grad=True)
    g, = torch.autograd.grad(plain(x).pow(2).sum(), x, create_graph=True)
    g.sum().backward()  # the autograd version supports a gradient penalty
    g, = torch.autograd.grad(fused(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        g.sum().backward()


def test_fused_backward_twice_with_retain_graph():
    fused, plain = _pair(num_experts=4, k=2)
    x = torch.randn(9, 16)
    y1, y2 = fused(x).pow(2).sum(), plain(x).pow(2).sum()
    y1.backward(retain_graph=True)
    y1.backward()  # the saved activations survive a retained graph
    y2.backward(retain_graph=True)
    y2.backward()
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
