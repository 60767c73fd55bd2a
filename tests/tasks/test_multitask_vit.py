"""Tests of the multitask_vit task (M3ViT): data, metrics, routing, single-task inference, training."""
from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.loggers import CSVLogger
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from tasks.multitask_vit.data import MultiTaskDataModule, SyntheticScenes
from tasks.multitask_vit.metrics import DepthRMSE, EdgeODSF, NormalsAngleError, SemsegMIoU, delta_m
from tasks.multitask_vit.model import M3ViT
from tasks.multitask_vit.module import MultiTaskViTModule, pathway_flops
from zoo.moe import MoE, aux_loss

TINY = dict(img_size=32, patch_size=4, dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_experts=8, k=2,
            decoder_channels=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine extra threads only spin (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trainer(tmp_path, **kw):
    kw.setdefault("logger", False)
    return L.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


def _dm(**kw):
    args = dict(num_train=256, num_val=64, num_test=64, batch_size=32, seed=0)
    args.update(kw)
    return MultiTaskDataModule(**args)


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny multi-gate M3ViT trained briefly, with its per-task validation losses before/after."""
    torch.manual_seed(0)
    dm = _dm()
    module = MultiTaskViTModule(moe=True, routing="multigate", lr=3e-3, warmup_epochs=0, **TINY)
    module.on_data(dm)
    batch = next(iter(dm.val_dataloader()))

    def val_losses():
        module.eval()
        with torch.no_grad():
            out = module(batch["image"])
            return {t: float(v) for t, v in module._losses(out, batch).items()}

    before = val_losses()
    module.train()
    _trainer(tmp_path_factory.mktemp("fit"), max_epochs=3, limit_val_batches=0).fit(module, dm)
    return module, dm, batch, before, val_losses()


def test_short_run_lowers_every_task_loss(trained):
    _, _, _, before, after = trained
    assert set(before) == {"semseg", "depth", "normals", "edge"}
    for t in before:
        assert after[t] < 0.9 * before[t], f"{t}: val loss {before[t]:.4f} -> {after[t]:.4f}"


def test_task_ids_route_differently_after_training(trained):
    module, _, batch, _, _ = trained
    model = module.model.eval()
    experts = {}
    with torch.no_grad():
        for t in model.tasks:
            model(batch["image"], task=t)
            experts[t] = [torch.sort(m.last_routing.indices, dim=-1).values for m in model.moe_layers]  # [N, k]
            assert all(idx.shape[1] == 2 for idx in experts[t])  # exactly k experts per token
    for a in model.tasks:
        for b in model.tasks:
            if a < b:
                differ = np.mean([float((ia != ib).any(-1).float().mean()) for ia, ib in zip(experts[a], experts[b])])
                assert differ > 0.2, f"tasks {a} and {b} pick the same experts for {1 - differ:.0%} of tokens"
    # control: the task-agnostic router routes every task identically
    shared = M3ViT(routing="shared", **TINY).eval()
    x = batch["image"][:4]
    with torch.no_grad():
        shared(x, task="semseg")
        i0 = [m.last_routing.indices.clone() for m in shared.moe_layers]
        shared(x, task="depth")
        assert all(torch.equal(a, m.last_routing.indices) for a, m in zip(i0, shared.moe_layers))


def test_one_by_one_gradients_equal_summed_loss():
    """With gate noise off, a backward per task accumulates exactly the gradient of the summed loss."""
    torch.manual_seed(1)
    module = MultiTaskViTModule(noise_std=0.0, train_mode="one_by_one", **TINY)
    batch = next(iter(_dm(num_train=16, batch_size=8).train_dataloader()))
    module.train()
    module.one_by_one_backward(batch)
    g1 = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    out = module(batch["image"])
    (module._weighted(module._losses(out, batch)) + aux_loss(module.model)).backward()
    g2 = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert g1.keys() == g2.keys() and len(g1) > 20
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_one_by_one_training_steps_once_per_batch_and_learns(tmp_path):
    torch.manual_seed(0)
    dm = _dm(num_train=128, num_val=32, tasks=["semseg", "depth"])
    module = MultiTaskViTModule(train_mode="one_by_one", lr=3e-3, warmup_epochs=0, **TINY)
    module.on_data(dm)
    batch = next(iter(dm.val_dataloader()))

    def losses():  # batch statistics in BN (few steps leave running stats unsettled)
        with torch.no_grad():
            return {t: float(v) for t, v in module._losses(module(batch["image"]), batch).items()}

    before = losses()
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0)
    trainer.fit(module, dm)
    assert module.tasks == ("semseg", "depth")
    assert trainer.global_step == 3 * 4  # one optimiser step per batch, two backward passes each
    after = losses()
    for t in before:
        assert after[t] < 0.95 * before[t], f"{t}: {before[t]:.4f} -> {after[t]:.4f}"


# ------------------------------------------------------------------------- single-task inference
def test_single_task_inference_runs_one_decoder_and_saves_flops():
    torch.manual_seed(0)
    model = M3ViT(**TINY).eval()
    calls = []
    for name, head in model.heads.items():
        head.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x, task="normals")
    assert list(out) == ["normals"] and calls == ["normals"]
    assert torch.allclose(out["normals"].norm(dim=1), torch.ones(1, 32, 32), atol=1e-5)

    flops = pathway_flops(model, x)
    # per-task routing: the all-task forward is exactly one encoder pass + decoder per task
    assert flops["all"] == sum(flops[t] for t in model.tasks)
    assert all(flops[t] < 0.3 * flops["all"] for t in model.tasks)
    # only that task's gate runs: same FLOPs as a model with one (task-agnostic) gate
    shared = pathway_flops(M3ViT(routing="shared", **TINY).eval(), x)
    assert all(flops[t] == shared[t] for t in model.tasks)
    # dense multi-task: one shared encoder pass, so single-task saves exactly the other decoders
    dense = M3ViT(moe=False, **TINY).eval()
    fd = pathway_flops(dense, x)
    head = {}
    for t in dense.tasks:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            dense.heads[t](torch.zeros(1, 64, 64))
        head[t] = fc.get_total_flops()
    for t in dense.tasks:
        assert fd["all"] - fd[t] == sum(head[u] for u in dense.tasks if u != t)


def test_dense_twin_has_equal_active_params():
    moe, dense = M3ViT(**TINY), M3ViT(moe=False, **TINY)
    moe_layer = moe.moe_layers[0]
    twin = dense.encoder.blocks[1].mlp
    active = sum(p.numel() for p in moe_layer.parameters()) - moe_layer.inactive_param_count()
    # equal up to rounding the hidden width to an integer (one hidden unit = dim + out + 1 params)
    assert abs(sum(p.numel() for p in twin.parameters()) - active) <= 2 * 64 + 1
    assert isinstance(moe.encoder.blocks[1].mlp, MoE) and not isinstance(moe.encoder.blocks[0].mlp, MoE)
    assert len(moe.moe_layers) == 2 and not dense.moe_layers


def test_checkpoint_reload_identical(tmp_path):
    torch.manual_seed(0)
    dm = _dm(num_train=64, num_val=32, num_test=32)
    # a subset of the data's tasks, with a logger: module and data hparams must not clash
    module = MultiTaskViTModule(routing="task_embed", tasks=["depth", "normals", "edge"], **TINY)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                       logger=CSVLogger(tmp_path))
    trainer.fit(module, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = MultiTaskViTModule.load_from_checkpoint(path, weights_only=True)
    x = next(iter(dm.test_dataloader()))["image"][:4]
    module.eval(), loaded.eval()
    with torch.no_grad():
        a, b = module(x), loaded(x)
    for t in a:
        torch.testing.assert_close(a[t], b[t])
    # setup() with the datamodule must not rebuild (and so re-initialise) a loaded model
    loaded.on_data(dm)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["depth"], a["depth"])
    assert list(a) == ["depth", "normals", "edge"]


# -------------------------------------------------------------------------------------- metrics
def test_delta_m_matches_hand_computation():
    mt = {"semseg_miou": 0.50, "depth_rmse": 0.60, "normals_mean_angle": 20.0, "edge_odsf": 0.70}
    st = {"semseg_miou": 0.40, "depth_rmse": 0.50, "normals_mean_angle": 25.0, "edge_odsf": 0.70}
    hand = 100 / 4 * ((0.5 - 0.4) / 0.4 - (0.6 - 0.5) / 0.5 - (20 - 25) / 25 + 0)
    assert delta_m(mt, st) == pytest.approx(hand) == pytest.approx(6.25)
    with pytest.raises(ValueError, match="metrics differ"):
        delta_m({"semseg_miou": 0.5}, {"depth_rmse": 0.4})


def test_metrics_against_hand_values():
    m = SemsegMIoU(3)
    logits = torch.zeros(1, 3, 1, 4)
    pred = torch.tensor([0, 1, 1, 2])
    logits[0, pred, 0, torch.arange(4)] = 1
    m.update(logits, torch.tensor([[[0, 1, 2, 255]]]))
    # class 0: 1/1, class 1: tp 1, union 2, class 2: tp 0, union 1 (pixel 3 ignored)
    assert float(m.compute()) == pytest.approx((1 + 0.5 + 0) / 3)
    d = DepthRMSE()
    d.update(torch.tensor([[[[1.0, 2.0, 5.0]]]]), torch.tensor([[[[2.0, 2.0, 0.0]]]]))
    assert float(d.compute()) == pytest.approx(math.sqrt(1 / 2))
    n = NormalsAngleError()
    gt = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2).clone()
    pr = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]).view(1, 3, 1, 2)
    n.update(pr, gt)
    assert float(n.compute()) == pytest.approx(45.0)
    e = EdgeODSF(tolerance=1)
    gt_e = torch.zeros(1, 1, 8, 8)
    gt_e[..., 4, :] = 1
    e.update(torch.where(gt_e > 0, 5.0, -5.0), gt_e)
    assert float(e.compute()) == pytest.approx(1.0)
    e2 = EdgeODSF(tolerance=1)
    shifted = torch.roll(gt_e, 1, dims=2)  # one pixel off: matched within tolerance 1
    e2.update(torch.where(shifted > 0, 5.0, -5.0), gt_e)
    assert float(e2.compute()) == pytest.approx(1.0)
    e3 = EdgeODSF(tolerance=0)
    e3.update(torch.where(shifted > 0, 5.0, -5.0), gt_e)
    assert float(e3.compute()) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------- data
def test_synthetic_scenes_are_consistent():
    a = SyntheticScenes(24, seed=3).render(16)
    b = SyntheticScenes(24, seed=3).render(16)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["image"].shape == (16, 24, 24, 3) and a["semseg"].max() <= 4
    assert np.allclose(np.linalg.norm(a["normals"], axis=-1), 1, atol=1e-4)
    assert (a["depth"] > 0).all()
    # every edge pixel sits where the label or depth changes against its left/upper neighbour
    e = a["edge"].astype(bool)
    seg = a["semseg"]
    change = np.zeros_like(e)
    change[:, :, 1:] |= seg[:, :, 1:] != seg[:, :, :-1]
    change[:, 1:, :] |= seg[:, 1:, :] != seg[:, :-1, :]
    assert change[~e].sum() == 0  # a class change is always an edge
    assert 0.02 < e.mean() < 0.3
    assert len(np.unique(seg)) == 5


def _write_folder(root, n=2, size=(6, 8), tasks=("semseg", "depth", "normals", "edge")):
    dirs = {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edge": "edge"}
    (root / "images").mkdir(parents=True)
    for t in tasks:
        (root / dirs[t]).mkdir()
    rng = np.random.default_rng(0)
    h, w = size
    ids = [f"im{i}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        if "semseg" in tasks:
            seg = rng.integers(0, 3, (h, w)).astype(np.uint8)
            seg[0, 0] = 255
            Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        if "depth" in tasks:
            np.save(root / "depth" / f"{i}.npy", rng.uniform(0.5, 3, (h, w)).astype(np.float32))
        if "normals" in tasks:
            nrm = rng.normal(size=(h, w, 3))
            np.save(root / "normals" / f"{i}.npy", (nrm / np.linalg.norm(nrm, axis=-1, keepdims=True)).astype(np.float32))
        if "edge" in tasks:
            Image.fromarray((rng.random((h, w)) > 0.8).astype(np.uint8) * 255).save(root / "edge" / f"{i}.png")
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "val.txt").write_text(ids[0] + "\n")
    return ids


def test_folder_reader_loads_tasks_and_classes(tmp_path):
    _write_folder(tmp_path)
    dm = MultiTaskDataModule(root=str(tmp_path), img_size=8, batch_size=2)
    assert dm.tasks == ("semseg", "depth", "normals", "edge")
    dm.setup()
    assert dm.num_classes == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["semseg"].shape == (2, 8, 8)
    assert batch["depth"].shape == (2, 1, 8, 8) and batch["normals"].shape == (2, 3, 8, 8)
    assert set(batch["edge"].unique().tolist()) <= {0.0, 1.0, 255.0}
    assert len(dm.splits["test"]) == 1  # no test.txt: val.txt is used
    # a folder with only depth trains only depth
    only = tmp_path / "only_depth"
    _write_folder(only, tasks=("depth",))
    dm2 = MultiTaskDataModule(root=str(only), img_size=8)
    assert dm2.tasks == ("depth",)
    module = MultiTaskViTModule(img_size=8, patch_size=4, dim=16, depth=2, num_heads=2, num_experts=4, k=2)
    module.on_data(dm2)
    assert module.tasks == ("depth",) and list(module.model.heads) == ["depth"]


@pytest.mark.parametrize("breakage, exc, match", [
    ("missing_label", FileNotFoundError, r"segmentation/im1\.png"),
    ("missing_image", FileNotFoundError, r"images/im1\.png"),
    ("size_mismatch", ValueError, r"depth/im1\.npy.*shape"),
    ("label_range", ValueError, r"segmentation/im1\.png.*out of range"),
    ("nan_depth", ValueError, r"depth/im0\.npy.*NaN"),
    ("bad_normals", ValueError, r"normals/im0\.npy.*unit"),
    ("no_split", FileNotFoundError, r"train\.txt"),
    ("unknown_id", FileNotFoundError, r"images/ghost"),
])
def test_folder_reader_errors(tmp_path, breakage, exc, match):
    _write_folder(tmp_path)
    num_classes = None
    if breakage == "missing_label":
        (tmp_path / "segmentation" / "im1.png").unlink()
    elif breakage == "missing_image":
        (tmp_path / "images" / "im1.png").unlink()
    elif breakage == "size_mismatch":
        np.save(tmp_path / "depth" / "im1.npy", np.ones((5, 5), np.float32))
    elif breakage == "label_range":
        Image.fromarray(np.full((6, 8), 7, np.uint8)).save(tmp_path / "segmentation" / "im1.png")
        num_classes = 3
    elif breakage == "nan_depth":
        np.save(tmp_path / "depth" / "im0.npy", np.full((6, 8), np.nan, np.float32))
    elif breakage == "bad_normals":
        np.save(tmp_path / "normals" / "im0.npy", np.full((6, 8, 3), 2.0, np.float32))
    elif breakage == "no_split":
        (tmp_path / "train.txt").unlink()
    elif breakage == "unknown_id":
        (tmp_path / "train.txt").write_text("im0\nghost\n")
    with pytest.raises(exc, match=match):
        dm = MultiTaskDataModule(root=str(tmp_path), img_size=8, num_classes=num_classes)
        dm.setup()


def test_unknown_task_and_missing_task_folder(tmp_path):
    _write_folder(tmp_path, tasks=("depth",))
    with pytest.raises(FileNotFoundError, match="segmentation"):
        MultiTaskDataModule(root=str(tmp_path), tasks=["semseg"])
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskDataModule(tasks=["saliency"])
    with pytest.raises(ValueError, match="not in this model"):
        M3ViT(tasks=("depth",), **TINY)(torch.zeros(1, 3, 32, 32), task="semseg")
