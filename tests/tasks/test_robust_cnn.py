"""robust_cnn: attacks, routed compute, AdvMoE's alternating schedule, readers, learning."""
import pickle

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tasks.robust_cnn import attacks
from tasks.robust_cnn.data import RobustCNNDataModule, detect_format, read_cifar, read_image_folder
from tasks.robust_cnn.metrics import AttackConfig, robust_metrics
from tasks.robust_cnn.model import RobustCNN, count_flops, flops_matched_ratio
from tasks.robust_cnn.module import RobustCNNModule
from zoo.moe.conv import MoEConv2d

TINY = dict(arch="resnet", width=8, blocks=[1, 1], router_widths=[4])


def _trained_ish(seed=0):
    torch.manual_seed(seed)
    m = RobustCNN(in_channels=1, num_classes=10, moe=True, **TINY)
    with torch.no_grad():
        m.fc.weight.mul_(30)  # confident logits, so the loss reacts to small input changes
    m.eval()
    return m


# ------------------------------------------------------------------ attacks
@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.03), ("l2", 1.0, 0.25)])
def test_pgd_increases_loss_and_stays_in_ball(norm, eps, step):
    model = _trained_ish()
    torch.manual_seed(1)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    x_adv = attacks.pgd(model, x, attacks.ce_objective(y), eps, step, 10, norm)
    x_rand = attacks.pgd(model, x, attacks.ce_objective(y), eps, step, 0, norm)  # 0 steps: x itself
    noise = torch.randn_like(x).sign() * eps if norm == "linf" else torch.randn_like(x)
    noise = noise if norm == "linf" else noise * eps / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
        rand = F.cross_entropy(model((x + noise).clamp(0, 1)), y)
    assert torch.equal(x_rand, x)
    assert adv > clean + 0.2 and adv > rand + 0.2
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # FGSM: one signed step of exactly eps (where not clipped by the box)
    x_f = attacks.fgsm(model, x, y, 0.05)
    inner = (x > 0.05) & (x < 0.95)
    assert torch.allclose((x_f - x).abs()[inner], torch.full_like(x[inner], 0.05), atol=1e-6)


def test_router_attack_flips_expert_choices():
    model = _trained_ish(3)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():  # centre the router so both experts are chosen on clean images
        model(x)
        diff = model.route_logits()[0] @ torch.tensor([1.0, -1.0])
        model.router.fc.bias[0] -= diff.median() + 1e-4
    targets = attacks.router_targets(model, x)
    assert 0.2 < targets[0].float().mean() < 0.8
    x_adv = attacks.pgd(model, x, attacks.router_objective(targets), 0.3, 0.05, 10)
    with torch.no_grad():
        model(x_adv)
    flipped = (model.route_logits()[0].argmax(-1) != targets[0]).float().mean()
    assert flipped > 0.3
    assert targets[0].numel() == 32
    out = robust_metrics(model, x, torch.randint(0, 10, (32,)), AttackConfig(0.3, 0.05, 3))
    assert {"sa", "ra_pgd", "ra_fgsm", "ra_joint", "router_ra", "ra_router_attack", "ra_worst"} <= set(out)
    assert out["ra_worst"] <= min(out["ra_pgd"], out["ra_joint"], out["ra_router_attack"])


# ------------------------------------------------------------------ routed compute
def test_moe_cnn_computes_only_the_chosen_channel_group():
    """Active FLOPs of the top-1 MoE ResNet equal a dense ResNet at the expert width + router."""
    kw = dict(arch="resnet", width=16, blocks=[1, 1, 1], width_ratio=0.5)
    x = torch.rand(1, 1, 14, 14)
    moe2 = RobustCNN(in_channels=1, moe=True, num_experts=2, **kw)
    moe4 = RobustCNN(in_channels=1, moe=True, num_experts=4, **kw)
    half = RobustCNN(in_channels=1, moe=False, **kw)
    full = RobustCNN(in_channels=1, moe=False, **dict(kw, width_ratio=1.0))
    router2 = count_flops(moe2.router, x)
    assert count_flops(moe2, x) - router2 == count_flops(half, x)
    # 4 experts: twice the expert parameters, same backbone FLOPs
    assert count_flops(moe4, x) - count_flops(moe4.router, x) == count_flops(half, x)
    assert count_flops(moe2, x) < 0.5 * count_flops(full, x)
    # a batch with images routed to different experts costs B x one image
    xb = torch.rand(8, 1, 14, 14)
    moe2.eval()
    with torch.no_grad():
        moe2(xb)
    assert len(set(moe2.moe_layers[0].last_routing.indices[:, 0].tolist())) >= 1
    assert count_flops(moe2, xb) == 8 * count_flops(moe2, x)
    # the FLOPs-matched dense twin is within 5% of the MoE's active FLOPs
    r = flops_matched_ratio((1, 14, 14), 10, dict(kw, num_experts=2))
    twin = RobustCNN(in_channels=1, moe=False, **dict(kw, width_ratio=r))
    assert abs(count_flops(twin, x) / count_flops(moe2, x) - 1) < 0.05


@pytest.mark.parametrize("arch,extra", [("vgg", dict(width=4, blocks=[1, 1, 2])), ("wrn", dict(width=4, blocks=[1, 1], widen=2)),
                                        ("densenet", dict(width=4, blocks=[2, 2]))])
def test_all_architectures_in_both_forms(arch, extra):
    x = torch.rand(3, 3, 12, 12)
    for router in ("shared", "per_layer"):
        m = RobustCNN(arch, 3, 7, moe=True, router=router, router_widths=[4], **extra)
        assert m(x).shape == (3, 7)
        assert len(m.route_logits()) == (1 if router == "shared" else len(m.moe_layers)) > 0
        n_router = {id(p) for p in m.router_parameters()}
        assert n_router and n_router.isdisjoint({id(p) for p in m.expert_parameters()})
    d = RobustCNN(arch, 3, 7, moe=False, **extra)
    assert d(x).shape == (3, 7) and d.route_logits() == [] and not any(isinstance(l, MoEConv2d) for l in d.modules())


def test_expert_batchnorm_keeps_each_experts_statistics():
    from tasks.robust_cnn.model import ExpertBatchNorm2d

    torch.manual_seed(5)
    m = RobustCNN(in_channels=1, num_classes=10, moe=True, expert_norm=True, **TINY)
    block = m.blocks[0]
    assert isinstance(block.bn1, ExpertBatchNorm2d) and isinstance(block.bn2, ExpertBatchNorm2d)
    conv = block.conv1
    x = torch.rand(12, conv.in_channels, 6, 6)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(6, 1)  # images alternate between experts
    h = conv(x, logits=logits)
    out = block.bn1(h, conv)
    for e in range(2):
        sel = torch.arange(e, 12, 2)
        ref = torch.nn.functional.batch_norm(h[sel], None, None, training=True)  # fresh BN: weight 1, bias 0
        torch.testing.assert_close(out[sel], ref, atol=1e-5, rtol=1e-4)
    # running statistics are per expert: expert 1 saw only its own images
    torch.testing.assert_close(block.bn1.norms[1].running_mean, 0.1 * h[1::2].mean((0, 2, 3)).detach())
    assert RobustCNN(in_channels=1, moe=False, expert_norm=True, **TINY)(x[:, :1]).shape == (12, 10)


# ------------------------------------------------------------------ alternating schedule
def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


def test_advmoe_alternating_steps_update_only_their_parameters():
    torch.manual_seed(0)
    mod = RobustCNNModule(mode="advmoe", in_channels=1, num_classes=10, input_size=8, epsilon=0.1,
                          train_step_size=0.05, lr=0.1, **TINY)
    (opt_e, opt_r), _ = mod.configure_optimizers()
    mod.manual_backward = lambda loss: loss.backward()  # outside a Trainer
    mod.log = lambda *a, **k: None
    experts, router = mod.model.expert_parameters(), mod.model.router_parameters()
    ids = lambda ps: {id(p) for p in ps}
    assert ids(opt_e.param_groups[0]["params"]) == ids(experts)
    assert ids(opt_r.param_groups[0]["params"]) == ids(router)
    assert ids(experts).isdisjoint(ids(router)) and len(ids(experts)) + len(ids(router)) == len(list(mod.parameters()))
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    mod.train()
    e0, r0 = _snapshot(experts), _snapshot(router)
    mod.expert_step(x, y, opt_e)
    assert not any(_changed(r0, router)) and all(p.grad is None for p in router)
    assert sum(_changed(e0, experts)) >= 0.9 * len(experts)
    assert all(p.requires_grad for p in mod.parameters())  # freezing is undone
    e1, r1 = _snapshot(experts), _snapshot(router)
    mod.router_step(x, y, opt_r)
    assert not any(_changed(e1, experts))
    assert all(_changed(r1, router))


def test_plain_at_on_moe_trains_router_jointly():
    torch.manual_seed(0)
    mod = RobustCNNModule(mode="trades", in_channels=1, num_classes=10, input_size=8, router_lr=0.01, **TINY)
    (opt,), _ = mod.configure_optimizers()
    experts, router = opt.param_groups
    assert {id(p) for p in experts["params"] + router["params"]} == {id(p) for p in mod.parameters()}
    assert {id(p) for p in router["params"]} == {id(p) for p in mod.model.router_parameters()}
    assert (experts["lr"], router["lr"]) == (0.1, 0.01)
    # best checkpoint: by robust accuracy when training adversarially, by clean accuracy otherwise
    assert mod.monitor == "val/ra" and RobustCNNModule(mode="standard", **TINY).monitor == "val/sa"
    with pytest.raises(ValueError, match="advmoe"):
        RobustCNNModule(mode="advmoe", moe=False)


# ------------------------------------------------------------------ readers
def _write_cifar(root, n=6, side=4, labels_key="labels", n_batches=2, classes=3):
    rng = np.random.default_rng(0)
    for i in range(1, n_batches + 1):
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8),
                         labels_key.encode(): list(rng.integers(0, classes, n))}, f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8),
                     labels_key: list(range(n)) if classes > n else [i % classes for i in range(n)]}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(classes)]}, f)


def test_cifar_reader_and_datamodule(tmp_path):
    _write_cifar(tmp_path)
    assert detect_format(tmp_path) == "cifar"
    tx, ty, sx, sy, names = read_cifar(tmp_path)
    assert tx.shape == (12, 3, 4, 4) and sx.shape == (6, 3, 4, 4) and names == ["c0", "c1", "c2"]
    dm = RobustCNNDataModule(root=str(tmp_path), val_fraction=0.25, test_fraction=0.0, batch_size=4)
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (3, 4, 3)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 4, 4) and 0 <= xb.min() and xb.max() <= 1
    mod = RobustCNNModule(mode="standard", **TINY)
    mod.on_data(dm)
    assert mod.model(xb).shape == (4, 3) and mod.flops_inputs()[0].shape == (1, 3, 4, 4)


def test_cifar_reader_errors(tmp_path):
    _write_cifar(tmp_path, n_batches=3)
    (tmp_path / "data_batch_2").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        read_cifar(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 47), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"data_batch_2.*'data'"):
        read_cifar(tmp_path)
    _write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 48), np.uint8), b"labels": [0, 7]}, f)
    with pytest.raises(ValueError, match=r"test_batch: label 7 out of range \[0, 3\)"):
        read_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        read_cifar(tmp_path)
    _write_cifar(tmp_path, labels_key="fine_labels")
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 48), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="data_batch_1: field 'fine_labels' has 2 entries"):
        read_cifar(tmp_path)


def _write_folder(root, split, classes=("cat", "dog"), n=3, size=(6, 6), mode="RGB"):
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.full((*size, 3) if mode == "RGB" else size, 30 * i + (100 if c == "dog" else 0), np.uint8)
            Image.fromarray(arr, mode=mode).save(root / split / c / f"{i}.png")


def test_image_folder_reader(tmp_path):
    _write_folder(tmp_path, "train")
    _write_folder(tmp_path, "val", n=2)
    assert detect_format(tmp_path) == "imagefolder"
    tx, ty, vx, vy, classes = read_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and tx.shape == (6, 3, 6, 6) and vx.shape == (4, 3, 6, 6)
    assert ty.tolist() == [0, 0, 0, 1, 1, 1]
    dm = RobustCNNDataModule(root=str(tmp_path), image_size=4)
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (3, 4, 2)
    assert dm.tensors["test"][0].shape == (4, 3, 4, 4)
    # grey images without val/: 1 channel, seeded split
    grey = tmp_path / "grey"
    _write_folder(grey, "train", n=5, mode="L")
    dm = RobustCNNDataModule(root=str(grey), val_fraction=0.2, test_fraction=0.0)
    assert dm.in_channels == 1 and len(dm.tensors["train"][0]) == 8 and len(dm.tensors["val"][0]) == 2


def test_image_folder_errors(tmp_path):
    _write_folder(tmp_path, "train")
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd\.png: image is 5x7.*image_size"):
        read_image_folder(tmp_path)
    (tmp_path / "train" / "dog" / "odd.png").unlink()
    _write_folder(tmp_path, "val", classes=("cat", "cow"))
    with pytest.raises(ValueError, match=r"\['cow'\] do not exist"):
        read_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RobustCNNDataModule(root=str(tmp_path / "nope"))


# ------------------------------------------------------------------ learning
def test_short_run_on_digits_learns_and_reloads(tmp_path):
    torch.manual_seed(0)
    L.seed_everything(0)
    dm = RobustCNNDataModule(dataset="digits", batch_size=64, max_eval=120)
    mod = RobustCNNModule(mode="standard", lr=0.05, test_steps=2, val_steps=1, **TINY)
    mod.on_data(dm)
    assert (mod.hparams.in_channels, mod.hparams.input_size, mod.hparams.num_classes) == (1, 8, 10)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(mod, dm)
    (res,) = trainer.test(mod, dm, verbose=False)
    assert res["test/sa"] > 0.6  # chance is 0.1
    assert res["test/ra_pgd"] <= res["test/sa"]
    assert 0 <= res["test/router_ra"] <= 1
    assert (trainer.default_root_dir and (tmp_path / "routing_by_group.png").exists())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = RobustCNNModule.load_from_checkpoint(path, weights_only=True)
    x = dm.tensors["test"][0][:8]
    mod.eval(), again.eval()
    torch.testing.assert_close(again(x), mod(x))
