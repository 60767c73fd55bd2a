"""Channel-group conv experts (zoo.moe.conv.MoEConv2d)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoo.moe import aux_loss, routing_stats
from zoo.moe.conv import ConvRouter, MoEConv2d


def _flops(fn, *args, **kw) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args, **kw)
    return fc.get_total_flops()


def test_top1_equals_per_sample_reference():
    torch.manual_seed(0)
    layer = MoEConv2d(3, 5, 3, num_experts=4, padding=1, stride=2, bias=True)
    x = torch.randn(9, 3, 8, 8)
    logits = torch.randn(9, 4)
    y = layer(x, logits=logits)
    chosen = logits.argmax(-1)
    p = logits.softmax(-1)  # default gate: the chosen expert's output times its probability
    ref = torch.stack([p[i, e] * F.conv2d(x[i:i + 1], layer.expert_weight(int(e)), layer.expert_bias(int(e)),
                                          stride=2, padding=1)[0] for i, e in enumerate(chosen)])
    assert y.shape == (9, 5, 4, 4)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.last_routing.indices[:, 0], chosen)
    assert layer.last_routing.token_index.numel() == 9  # each image goes to exactly k=1 expert


@pytest.mark.parametrize("gate", ["softmax", "straight_through_scores"])
@pytest.mark.parametrize("split", [False, True])
def test_gated_output_and_gradients_equal_the_per_image_formula(gate, split):
    """Values and gradients (input, scores, filters) of the layer equal ``gate_b * conv_{e_b}(x_b)``
    written out image by image, both when every image picks one expert (the layer then skips the
    gather/scatter) and when the batch is split."""
    torch.manual_seed(6)
    layer = MoEConv2d(3, 4, 3, num_experts=2, padding=1, router=None, gate=gate)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    raw = torch.tensor([[2.0, 0.0], [1.0, 0.5], [3.0, -1.0], [0.2, 0.1], [1.5, 1.0]])
    if split:
        raw[1], raw[3] = raw[1].flip(0), raw[3].flip(0)
    logits = raw.clone().requires_grad_()
    y = layer(x, logits=logits)
    chosen = raw.argmax(-1)
    assert (len(set(chosen.tolist())) == 2) == split
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = [t.grad.clone() for t in (x, logits, layer.weight)]
    x2, l2 = x.detach().clone().requires_grad_(), raw.clone().requires_grad_()
    layer.zero_grad()
    p = l2.softmax(-1)
    ref = []
    for i, e in enumerate(chosen.tolist()):
        s = p[i, e] if gate == "softmax" else 1 + l2[i, e] - l2[i, e].detach()
        ref.append(s * F.conv2d(x2[i:i + 1], layer.expert_weight(e), padding=1)[0])
    ref = torch.stack(ref)
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, t in zip(got, (x2, l2, layer.weight)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


def test_topk_mixes_groups_with_renormalised_weights():
    torch.manual_seed(1)
    layer = MoEConv2d(2, 3, 1, num_experts=3, k=2, router=None)
    x, logits = torch.randn(4, 2, 5, 5), torch.randn(4, 3)
    y = layer(x, logits=logits)
    w, idx = logits.softmax(-1).topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack([sum(w[i, j] * layer.conv_expert(int(idx[i, j]), x[i:i + 1])[0] for j in range(2))
                       for i in range(4)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_only_chosen_group_is_computed():
    """FLOPs of a top-1 MoE conv equal those of ONE expert-width conv, whatever E is."""
    x = torch.randn(6, 8, 10, 10)
    one = _flops(F.conv2d, x, torch.randn(16, 8, 3, 3), padding=1)
    for e in (2, 4, 8):
        layer = MoEConv2d(8, 16, 3, num_experts=e, padding=1, router=None)
        with torch.no_grad():
            assert _flops(layer, x, logits=torch.randn(6, e)) == one
    full = _flops(F.conv2d, x, torch.randn(16 * 4, 8, 3, 3), padding=1)
    assert full == 4 * one


def test_straight_through_gates_send_gradient_to_router():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 6, 6)
    for gate in ("straight_through", "straight_through_scores"):
        layer = MoEConv2d(3, 4, 3, num_experts=2, padding=1, gate=gate)  # own ConvRouter on the input
        y = layer(x)
        # forward value of the gate is exactly 1: output equals the chosen expert's conv
        chosen = layer.last_routing.indices[:, 0]
        ref = torch.stack([layer.conv_expert(int(e), x[i:i + 1])[0] for i, e in enumerate(chosen)])
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        y.square().sum().backward()
        assert layer.router.fc.weight.grad is not None and layer.router.fc.weight.grad.abs().sum() > 0
    # public GetMask: gradient of the chosen raw score = <dL/dy, y> (identity)
    logits = torch.randn(5, 2, requires_grad=True)
    y = layer(x, logits=logits)
    y.square().sum().backward()
    expected = (2 * y.detach() * y.detach()).flatten(1).sum(1)
    got = logits.grad.gather(1, layer.last_routing.indices)[:, 0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.all(logits.grad.scatter(1, layer.last_routing.indices, 0) == 0)  # other scores: none


def test_softmax_gate_scales_by_probability_and_reaches_every_score():
    torch.manual_seed(3)
    layer = MoEConv2d(3, 4, 3, num_experts=3, padding=1, router=None)  # default gate="softmax"
    x = torch.randn(6, 3, 5, 5)
    logits = torch.randn(6, 3, requires_grad=True)
    y = layer(x, logits=logits)
    p = logits.softmax(-1).detach()
    chosen = logits.argmax(-1)
    ref = torch.stack([p[i, e] * layer.conv_expert(int(e), x[i:i + 1])[0] for i, e in enumerate(chosen)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert (logits.grad != 0).all()  # through the softmax, the unchosen scores learn too


@pytest.mark.parametrize("gate,bounded", [("softmax", True), ("straight_through", True),
                                          ("straight_through_scores", False)])
def test_router_scores_stay_bounded_when_the_loss_keeps_pushing(gate, bounded):
    """The defect behind the MoE CNN's poor clean accuracy: a gate whose router gradient does not
    decay as the router grows confident lets the scores run away. Here the loss always asks for a
    larger output (as the classifier's gradient through the gate often does for many steps); with
    the public code's identity on the raw score each SGD step adds the same amount to the score,
    with a softmax gate the push fades once the choice is clear."""
    torch.manual_seed(4)
    layer = MoEConv2d(2, 3, 3, num_experts=2, padding=1, router=None, gate=gate)
    x = torch.randn(8, 2, 6, 6).abs()
    with torch.no_grad():
        layer.weight.abs_()  # positive outputs: the loss -sum(y) always wants the gate larger
    scores = torch.zeros(2, requires_grad=True)  # router bias shared by every image
    opt = torch.optim.SGD([scores], lr=0.1, momentum=0.9)
    with torch.no_grad():
        scores[0] = 0.1  # expert 0 chosen from the start
    for _ in range(200):
        opt.zero_grad()
        (-layer(x, logits=scores.expand(8, 2)).mean()).backward()
        opt.step()
    gap = float((scores[0] - scores[1]).detach())
    assert gap > 1.0  # the chosen expert's score rose
    assert (gap < 20) == bounded, gap


def test_inactive_params_and_stats():
    layer = MoEConv2d(4, 6, 3, num_experts=4, k=1, router=None, balance_weight=0.1)
    assert layer.inactive_param_count() == 3 * 6 * 4 * 9
    net = torch.nn.Sequential(layer)
    net.train()
    layer(torch.randn(8, 4, 5, 5), logits=torch.randn(8, 4))
    assert float(aux_loss(net)) > 0
    stats = routing_stats(net)
    (s,) = stats.values()
    assert len(s["load"]) == 4 and abs(sum(s["load"]) - 1) < 1e-6


def test_conv_router_and_bad_input():
    r = ConvRouter(3, 5, (4, 8))
    assert r(torch.randn(2, 3, 9, 9)).shape == (2, 5)
    layer = MoEConv2d(3, 4, 3, num_experts=2, router=None)
    with pytest.raises(ValueError, match="logits"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\[B=2, E=2\]"):
        layer(torch.randn(2, 3, 5, 5), logits=torch.randn(2, 3))
    with pytest.raises(ValueError, match="expects x"):
        layer(torch.randn(2, 4, 5, 5), logits=torch.randn(2, 2))
    with pytest.raises(ValueError, match="k=3"):
        MoEConv2d(3, 4, 3, num_experts=2, k=3)
