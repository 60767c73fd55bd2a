"""Behaviour of the shared MoE layer: routing, dispatch, capacity, losses, twins, timm interop."""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoo.moe import (MoE, DenseFFN, MLPExperts, SwiGLUExperts, aux_loss, build_router, dense_twin_hidden, moe_mlp,
                     route_with, routing_stats)
from zoo.moe.dispatch import dispatch
from zoo.moe.losses import switch_balance_loss


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: route again, then loop over tokens and their k experts one call at a time."""
    indices, weights, _ = moe.router(x, None)  # [N, k]
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(moe.out_dim)
        for e, w in zip(indices[t].tolist(), weights[t]):
            if e < moe.num_experts:
                out = out + w * moe.experts.forward_expert(e, x[t:t + 1])[0]
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("router,k", [("topk", 1), ("topk", 2), ("topk", 3), ("switch", 1)])
def test_each_token_goes_to_exactly_k_experts(router, k):
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=6, k=k, router=router)
    moe(torch.randn(50, 16))
    info = moe.last_routing
    assert info.indices.shape == (50, k)
    # k distinct experts per token
    assert all(len(set(row)) == k for row in info.indices.tolist())
    per_token = torch.bincount(info.token_index, minlength=50)
    assert torch.all(per_token == k)
    w = info.weights.view(50, k)
    if router == "topk":  # renormalised top-k gates sum to 1
        torch.testing.assert_close(w.sum(-1), torch.ones(50))
    else:  # switch keeps the raw softmax probability of the chosen expert
        torch.testing.assert_close(w[:, 0], info.probs.max(-1).values)


def test_gates_without_renormalisation_are_raw_probabilities():
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=6, k=2, renormalize=False)
    moe(torch.randn(20, 16))
    info = moe.last_routing
    top2 = info.probs.topk(2, -1).values
    torch.testing.assert_close(info.weights.view(20, 2), top2)
    assert torch.all(top2.sum(-1) < 1)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_gates_equal_the_softmax_formula_in_value_and_gradient(renormalize):
    """The router computes its gates from the k selected logits (a softmax over them, or
    exp(l - logsumexp)); that must equal selecting from the full softmax, gradients included."""
    from zoo.moe.routers import TopKRouter

    torch.manual_seed(3)
    router = TopKRouter(16, 6, k=2, renormalize=renormalize)
    x = torch.randn(40, 16) * 4
    idx, w, logits = router(x)
    probs = logits.softmax(-1)
    ref = probs.gather(-1, probs.topk(2, -1).indices)
    if renormalize:
        ref = ref / ref.sum(-1, keepdim=True)
    assert torch.equal(idx, probs.topk(2, -1).indices)
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    up = torch.randn_like(w)
    g = torch.autograd.grad((w * up).sum(), router.gate.weight, retain_graph=True)[0]
    g_ref = torch.autograd.grad((ref * up).sum(), router.gate.weight)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)  # float32 rounding of sums near 0


@pytest.mark.parametrize("shape", [(40, 16), (4, 10, 16), (2, 3, 5, 16)])
def test_dropless_equals_naive_loop_forward_and_backward(shape):
    torch.manual_seed(1)
    moe = MoE(16, 24, num_experts=5, k=2)
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape
    xr = x.detach().reshape(-1, 16).clone().requires_grad_(True)
    ref = naive_moe(moe, xr)
    torch.testing.assert_close(y.reshape(-1, 16), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (y.reshape(-1, 16) * g).sum().backward()
    grads = [p.grad.clone() for p in moe.experts.parameters()]
    moe.zero_grad()
    (ref * g).sum().backward()
    for got, p in zip(grads, moe.experts.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 16), xr.grad, atol=1e-5, rtol=1e-5)


def test_gate_weights_receive_gradient_through_dispatch():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, balance=None)
    moe(torch.randn(30, 8)).pow(2).sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_capacity_drops_exactly_the_overflow():
    torch.manual_seed(0)
    experts = MLPExperts(3, 4, 8)
    x = torch.randn(10, 4)
    # 7 tokens to expert 0, 2 to expert 1, 1 to expert 2; capacity 3
    expert_index = torch.tensor([0, 0, 1, 0, 0, 2, 0, 1, 0, 0])
    token_index = torch.arange(10)
    weights = torch.ones(10)
    y, kept = dispatch(x, token_index, expert_index, weights, experts, capacity=3,
                       priority=torch.arange(10))
    assert kept.tolist() == [True, True, True, True, False, True, False, True, False, False]
    assert int((~kept).sum()) == 4  # 7 - 3 overflow on expert 0
    for t in range(10):
        if kept[t]:
            torch.testing.assert_close(y[t], experts.forward_expert(int(expert_index[t]), x[t:t + 1])[0])
        else:  # dropped tokens get no expert output; the caller's residual carries them
            assert torch.all(y[t] == 0)


def test_capacity_factor_in_layer_counts_drops_and_prefers_first_choices():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, capacity_factor=1.0)
    with torch.no_grad():  # route almost everything to expert 0 first
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 10.0
    x = torch.randn(16, 8).abs()
    moe(x)
    info = moe.last_routing
    cap = math.ceil(1.0 * 16 * 2 / 4)
    kept_per_expert = torch.bincount(info.expert_index[info.kept], minlength=4)
    assert kept_per_expert.max() <= cap
    demand = torch.bincount(info.expert_index, minlength=4)
    assert info.dropped == int((demand - demand.clamp(max=cap)).sum())
    assert routing_stats(moe)["moe"]["drop_rate"] == pytest.approx(info.dropped / 32)


def test_balance_loss_is_lowest_for_uniform_routing():
    e, n = 4, 400
    uniform_probs = torch.full((n, e), 1 / e)
    uniform_idx = torch.arange(n) % e
    skew_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(n, e)
    skew_idx = torch.zeros(n, dtype=torch.long)
    half_idx = torch.arange(n) % 2
    low = switch_balance_loss(uniform_probs, uniform_idx, e)
    assert low == pytest.approx(1.0)
    assert switch_balance_loss(skew_probs, half_idx, e) > low
    assert switch_balance_loss(skew_probs, skew_idx, e) > switch_balance_loss(skew_probs, half_idx, e)


def test_expert_choice_gives_each_expert_its_capacity():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, router="expert_choice")
    moe(torch.randn(20, 8))
    info = moe.last_routing
    cap = math.ceil(20 * 2 / 4)
    assert torch.bincount(info.expert_index, minlength=4).tolist() == [cap] * 4
    # no expert picks the same token twice
    for e in range(4):
        toks = info.token_index[info.expert_index == e]
        assert len(set(toks.tolist())) == cap


def test_soft_moe_is_permutation_equivariant_across_tokens():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, router="soft", slots_per_expert=2)
    x = torch.randn(3, 10, 8)
    perm = torch.randperm(10)
    y = moe(x)
    y_perm = moe(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], atol=1e-5, rtol=1e-5)
    assert moe.inactive_param_count() == 0


def count_flops(module, *args, **kw):
    with FlopCounterMode(display=False) as counter:
        module(*args, **kw)
    return counter.get_total_flops()


def test_null_experts_reduce_compute_in_the_flop_count():
    torch.manual_seed(0)
    plain = MoE(16, 64, num_experts=4, k=2)
    adaptive = MoE(16, 64, num_experts=4, k=2, null_experts=2, bias=True)
    with torch.no_grad():  # make one null expert attractive for most tokens
        adaptive.router.gate.weight[4:] = 0.0
        adaptive.router.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, -9.0]))
    x = torch.randn(64, 16)
    f_plain = count_flops(plain, x)
    f_null = count_flops(adaptive, x)
    null_share = adaptive.last_routing.null_fraction
    assert 0.3 < null_share <= 0.5  # at most one of a token's two slots is the null expert
    # expert FLOPs scale with the share of slots that ran a real expert
    assert f_null == pytest.approx(f_plain * (1 - null_share), rel=0.05)
    assert routing_stats(adaptive)["moe"]["null_fraction"] == pytest.approx(null_share)


def test_route_changes_routing_but_not_the_expert_input():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=1, route_dim=3)
    x = torch.randn(2, 6, 8)
    outs, experts = [], []
    for c in (torch.tensor([[5.0, 0, 0]]), torch.tensor([[0, 0, -5.0]])):
        y = moe(x, route=c.expand(2, 3))
        experts.append(moe.last_routing.indices.flatten())
        outs.append(y)
    # the routing signal is constant per call, so every token picks the same expert...
    assert all(len(set(e.tolist())) == 1 for e in experts)
    assert experts[0][0] != experts[1][0]
    # ...and each output is exactly that expert applied to x (the route never enters the expert)
    for y, e in zip(outs, experts):
        ref = moe.experts.forward_expert(int(e[0]), x.reshape(-1, 8)).reshape(2, 6, 8)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_route_with_reaches_buried_layers_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), MoE(8, 16, num_experts=4, k=1, route_dim=2))
    x = torch.randn(4, 5, 8)
    with route_with(model, torch.tensor([[9.0, 0.0]]).expand(4, 2)):
        model(x)
    first = model[1].last_routing.indices
    assert len(set(first.flatten().tolist())) == 1
    assert model[1]._route_ctx is None
    with pytest.raises(ValueError, match="route"):
        model(x)  # route_dim=2 but no route given: the router gets x of width 8


def test_multigate_router_selects_the_task_gate():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, router="multigate", num_gates=3)
    x = torch.randn(2, 5, 8)
    moe(x, route=torch.eye(3)[[0, 0]])
    a = moe.last_routing.indices.clone()
    moe(x, route=torch.eye(3)[[1, 1]])
    b = moe.last_routing.indices.clone()
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="one-hot task vector of width 3"):
        moe(x)


def test_dense_to_sparse_router_anneals_from_dense_to_top_k():
    torch.manual_seed(0)
    router = build_router("dense_to_sparse", 8, 6, k=1, anneal_steps=50, tau_max=5.0, tau_min=0.1)
    x = torch.randn(64, 8)
    _, w_early, _ = router(x)
    early = (w_early > 0).sum(-1).float().mean()
    for _ in range(49):
        router(x)
    _, w_late, _ = router(x)
    late = (w_late > 0).sum(-1).float().mean()
    assert router.annealed and early > 2 * late and late >= 1
    router.eval()
    idx, w, _ = router(x)
    assert idx.shape == (64, 1)


def test_noisy_cv2_balance_loss_has_gradient_through_load():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, noise_std=0.25, balance="cv2", balance_weight=1.0)
    moe(torch.randn(64, 8))
    moe.aux_loss.backward()
    assert moe.aux_loss > 0 and moe.router.gate.weight.grad.abs().sum() > 0


def test_shared_experts_always_contribute():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=1, shared_experts=1)
    x = torch.randn(10, 8)
    y = moe(x)
    routed = naive_moe(moe, x)
    torch.testing.assert_close(y, routed + moe.shared.forward_expert(0, x), atol=1e-5, rtol=1e-5)


def test_dense_twin_params_equal_moe_active_params():
    for kw in (dict(dim=64, hidden=256, num_experts=8, k=2), dict(dim=32, hidden=64, num_experts=4, k=1),
               dict(dim=16, hidden=32, num_experts=6, k=3, shared_experts=1)):
        moe = MoE(**kw)
        active = sum(p.numel() for p in moe.parameters()) - moe.inactive_param_count()
        dense = DenseFFN(moe.dim, dense_twin_hidden(moe))
        n_dense = sum(p.numel() for p in dense.parameters())
        assert abs(n_dense - active) <= (moe.dim * 2 + 1) / 2 + 1  # within one hidden unit
        assert active < sum(p.numel() for p in moe.parameters())


def test_aux_loss_sums_every_layer_and_stats_cover_each():
    torch.manual_seed(0)
    model = nn.Sequential(MoE(8, 16, 4, 2), nn.GELU(), MoE(8, 16, 4, 2))
    model(torch.randn(3, 7, 8))
    total = aux_loss(model)
    torch.testing.assert_close(total, model[0].aux_loss + model[2].aux_loss)
    stats = routing_stats(model)
    assert set(stats) == {"0", "2"}
    for s in stats.values():
        assert sum(s["load"]) == pytest.approx(1.0, abs=1e-4)
        assert 0 <= s["entropy"] <= math.log(4) + 1e-6 and "consistency" in s


def test_bad_input_names_the_shape():
    moe = MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match="unknown router"):
        MoE(8, 16, 4, 2, router="nope")
    with pytest.raises(ValueError, match="k=5"):
        MoE(8, 16, 4, 5)


def test_timm_vit_with_moe_in_every_other_block_trains_one_step():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                            num_classes=3, mlp_layer=moe_mlp(num_experts=4, k=2, every=2))
    kinds = [type(b.mlp).__name__ for b in vit.blocks]
    assert kinds == ["Mlp", "MoE", "Mlp", "MoE"]
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = nn.functional.cross_entropy(vit(x), y) + aux_loss(vit)
    loss.backward()
    expert_w = vit.blocks[1].mlp.experts.w1
    before = expert_w.detach().clone()
    assert expert_w.grad is not None and expert_w.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, expert_w)
    assert set(routing_stats(vit)) == {"blocks.1.mlp", "blocks.3.mlp"}


def piecewise_data(n, seed):
    """4 well-separated regions, each with its own nonlinear target function."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, -3.0]])
    region = torch.randint(0, 4, (n,), generator=g)
    local = torch.rand(n, 2, generator=g) * 2 - 1
    x = centers[region] + local
    freq = torch.tensor([[3.0, 0.5], [-2.0, 2.5], [0.5, -3.5], [-3.0, -1.5]])
    y = torch.sin((local * freq[region]).sum(-1) * 1.5) + 0.5 * torch.cos(3 * local[:, 0] * (region.float() - 1.5))
    return x, y[:, None]


def fit(model, x, y, steps=700, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + aux_loss(model)
        loss.backward()
        opt.step()
    return model


class Regressor(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.inp, self.ffn, self.out = nn.Linear(2, 16), ffn, nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.ffn(self.inp(x)))


def test_moe_fits_a_piecewise_function_better_than_its_dense_twin():
    """Four regions, four Switch experts (top-1, gate = the router's probability, so the router
    learns from the task loss and can give each region its expert), against the dense FFN of
    equal active parameters, on three seeds: the MoE must win on each and by a wide margin on
    the median. (Top-1 with renormalised gates has a constant gate of 1: its router learns only
    from the balance loss, and it won on 1 seed of 3, a result float rounding could flip.)"""
    x, y = piecewise_data(1024, seed=0)
    xt, yt = piecewise_data(1024, seed=1)
    errs = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        moe = MoE(16, 32, num_experts=4, k=1, router="switch")
        dense = DenseFFN(16, dense_twin_hidden(moe))
        torch.manual_seed(seed)
        m = fit(Regressor(moe), x, y)
        torch.manual_seed(seed)
        d = fit(Regressor(dense), x, y)
        with torch.no_grad():
            errs.append((nn.functional.mse_loss(m(xt), yt).item(), nn.functional.mse_loss(d(xt), yt).item()))
    assert all(e_moe < e_dense for e_moe, e_dense in errs), errs
    median = sorted(errs)[1][0], sorted(e for _, e in errs)[1]
    assert median[0] < 0.5 * median[1], errs


def test_dense_twin_hidden_from_a_parameter_count():
    moe = MoE(32, 64, num_experts=4, k=1)
    active = sum(p.numel() for p in moe.parameters()) - moe.inactive_param_count()
    assert dense_twin_hidden(active, dim=32) == dense_twin_hidden(moe)
    h = dense_twin_hidden(1000, dim=10, out_dim=1)
    assert abs(sum(p.numel() for p in DenseFFN(10, h, out_dim=1).parameters()) - 1000) <= 6
    with pytest.raises(ValueError, match="dim="):
        dense_twin_hidden(1000)


def test_swiglu_experts_match_per_expert_formula_and_their_dense_twin():
    torch.manual_seed(3)
    moe = MoE(12, 20, num_experts=4, k=2, expert="swiglu")
    x = torch.randn(30, 12)
    y = moe(x)
    info, ex = moe.last_routing, moe.experts
    ref = torch.zeros_like(y)
    for t, e, w in zip(info.token_index.tolist(), info.expert_index.tolist(), info.weights):
        h = (x[t] @ ex.w1[e] + ex.b1[e]) * F.silu(x[t] @ ex.w3[e] + ex.b3[e])
        ref[t] += w * (h @ ex.w2[e] + ex.b2[e])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # the twin is a SwiGLU FFN with the MoE's active parameter count (within one hidden unit)
    active = sum(p.numel() for p in moe.parameters()) - moe.inactive_param_count()
    dense = DenseFFN(12, dense_twin_hidden(moe), activation="swiglu")
    assert abs(sum(p.numel() for p in dense.parameters()) - active) <= (2 * 12 + 12 + 2) / 2 + 1
    assert dense(x).shape == y.shape
    with pytest.raises(ValueError, match="expert='conv'"):
        MoE(12, 20, expert="conv")


def test_keep_experts_slices_every_batched_weight():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, expert="swiglu")
    full = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    moe.experts.keep_experts(2, 4)
    assert moe.experts.num_experts == 2
    for n, p in moe.experts.named_parameters():
        torch.testing.assert_close(p, full[n][2:4])
    with pytest.raises(ValueError, match="outside"):
        moe.experts.keep_experts(1, 3)


def _node_names(y):
    seen, stack = set(), [y.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack += [n for n, _ in f.next_functions]
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("path", ["fused", "slices", "padded_balanced", "padded_small"])
def test_padded_and_sliced_expert_paths_agree_in_values_and_gradients(path):
    """Training runs the experts as the fused per-expert node, as per-expert autograd slices, or
    as one padded bmm (balanced routing within ``pad_limit``, or a layer under ``pad_small_work``
    multiply-adds); each must give the naive loop's outputs and gradients, and each path must
    really be the one taken."""
    torch.manual_seed(4)
    for expert in ("mlp", "swiglu"):
        moe = MoE(16, 24, num_experts=5, k=2, expert=expert)
        ex = moe.experts
        ex.pad_small_work = 1 << 26 if path == "padded_small" else 0
        ex.pad_limit = 100.0 if path == "padded_balanced" else 0.0
        ex.fused = path == "fused"
        x = torch.randn(37, 16, requires_grad=True)
        y = moe(x)
        names = _node_names(y)
        assert ("BaddbmmBackward0" in names) == path.startswith("padded"), names
        assert ("SortedExpertsBackward" in names) == (path == "fused"), names
        xr = x.detach().clone().requires_grad_(True)
        ref = naive_moe(moe, xr)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ref)
        (y * g).sum().backward()
        grads = [p.grad.clone() for p in moe.experts.parameters()]
        moe.zero_grad()
        (ref * g).sum().backward()
        for got, p in zip(grads, moe.experts.parameters()):
            torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_small_layers_pad_in_training_and_inference_but_not_under_flop_counting():
    """``pad_small_work`` (2^24 multiply-adds by default): a small layer runs through one padded
    bmm in training and in inference, with the per-expert path's values; a layer above the
    threshold runs per expert; counting FLOPs never pads (the count sees only routed rows)."""
    torch.manual_seed(0)
    small, large = MoE(16, 32, num_experts=4, k=2), MoE(64, 256, num_experts=4, k=2)
    assert small.experts.pad_small_work == 1 << 24 and small.experts.padded([10, 0, 5, 3])
    x_small, x_large = torch.randn(64, 16, requires_grad=True), torch.randn(4096, 64, requires_grad=True)
    assert small.experts.row_macs() == 2 * 16 * 32
    assert "BaddbmmBackward0" in _node_names(small(x_small))
    # E x max count x row_macs >= 4 x 2048 x 32768 = 2^28 > 2^24: per expert (the fused node)
    names = _node_names(large(x_large))
    assert "BaddbmmBackward0" not in names and "SortedExpertsBackward" in names
    with torch.no_grad():
        assert small.experts.strategy(x_small, [10, 0, 5, 3]) == "padded"
        y0 = small(x_small)
        with FlopCounterMode(display=False):
            assert not small.experts.padded([10, 0, 5, 3])
        small.experts.pad_small_work = 0
        assert small.experts.strategy(x_small, [10, 0, 5, 3]) == "kernels"
        torch.testing.assert_close(small(x_small), y0, rtol=1e-5, atol=1e-6)
    f_padded_off = count_flops(small, x_small)
    small.experts.pad_small_work = 1 << 24
    assert count_flops(small, x_small) == f_padded_off  # no padded rows counted


@pytest.mark.parametrize("cls", [MLPExperts, SwiGLUExperts])
@pytest.mark.parametrize("grad", [True, False])
def test_forward_grouped_padded_equals_forward_sorted(cls, grad):
    """``forward_grouped`` (the layer's dispatch, also under expert parallelism) pads small
    layers; it must equal ``forward_sorted`` (always per expert) in values and, in training, in
    every gradient, with an expert that gets no rows and uneven counts."""
    torch.manual_seed(2)
    ex = cls(5, 12, 20, out_dim=7)
    counts = torch.tensor([6, 0, 11, 1, 3])
    x = torch.randn(int(counts.sum()), 12)
    rows = torch.randperm(x.shape[0])
    expert_index = torch.repeat_interleave(torch.arange(5), counts)
    assert ex.padded(counts.tolist())
    outs, grads = [], []
    for padded in (True, False):
        xi = x.clone().requires_grad_(grad)
        ex.zero_grad()
        with torch.set_grad_enabled(grad):
            y = ex.forward_grouped(xi, rows, expert_index, counts) if padded else ex.forward_sorted(xi[rows], counts)
        if grad:
            assert ("BaddbmmBackward0" in _node_names(y)) == padded
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads.append([xi.grad.clone()] + [p.grad.clone() for p in ex.parameters()])
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
