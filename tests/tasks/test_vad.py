"""Tests of the VAD task (GS-MoE): TGS pseudo-labels, top-k MIL, readers, metrics, training."""
from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from tasks.vad.data import (BalancedBatchSampler, VADDataModule, class_from_name,
                            load_kdd_tsad_clips, make_synthetic_split, make_world, pool_segments,
                            read_feature_folder)
from tasks.vad.losses import (TGSConfig, find_peaks, gaussian_splat, mil_loss, tgs_loss,
                              tgs_pseudo_labels, topk_k, topk_mean)
from tasks.vad.formats import LAYOUTS, name_tags, write_release
from tasks.vad.metrics import FrameVADMetrics
from tasks.vad.model import (ClassExperts, CrossAttentionGate, DenseHead, GSMoE, HeadInput,
                             count_params, dense_head_hidden)
from tasks.vad.module import VADModule, group_classes, schedule_warning
from zoo.moe import routing_stats


# ------------------------------------------------------------------------------ TGS
def test_tgs_single_box_peak_extent_and_kernel():
    s = torch.tensor([0.1, 0.1, 0.6, 0.9, 0.8, 0.2, 0.1, 0.1])
    cfg = TGSConfig()
    peaks = find_peaks(s, cfg)
    # one event: peak at 3 (0.9); FWHM run >= 0.45 is [2, 4]
    assert peaks == [(3, 2, 4, pytest.approx(0.9))]
    g = gaussian_splat(8, peaks, cfg)
    sigma = 3 / (2 * math.sqrt(2 * math.log(2)))
    expected = torch.exp(-0.5 * ((torch.arange(8.0) - 3.0) / sigma) ** 2)
    assert torch.allclose(g, expected, atol=1e-6)
    assert g[3] == pytest.approx(1.0) and g[0] < 0.1 and g[7] < 0.01


def test_tgs_two_events_and_suppression_of_side_peaks():
    s = torch.tensor([0.05, 0.9, 0.7, 0.05, 0.05, 0.05, 0.3, 0.05, 0.6, 0.62, 0.05, 0.05])
    peaks = find_peaks(s, TGSConfig())
    # 0.3 is below the 0.5 threshold; 0.6 at 8 lies inside the extent [8, 9] of the peak at 9
    assert [(p, l, r) for p, l, r, _ in peaks] == [(1, 1, 2), (9, 8, 9)]
    g = gaussian_splat(len(s), peaks, TGSConfig())
    assert g[1] > 0.8 and g[9] > 0.8 and g[6] < 0.05  # the sub-threshold bump gets no label
    # an even-width extent is centred between its snippets: equal labels on both
    assert g[1] == pytest.approx(g[2].item(), abs=1e-6)
    assert g[8] == pytest.approx(g[9].item(), abs=1e-6)


def test_tgs_low_curve_keeps_global_max_and_min_distance():
    s = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.31, 0.1])  # nothing above 0.5
    peaks = find_peaks(s, TGSConfig())
    assert [p for p, *_ in peaks] == [4]  # global max always kept; its extent swallows 2
    assert peaks[0][1:3] == (1, 4)  # run >= 0.155
    close = find_peaks(torch.tensor([0.9, 0.1, 0.85, 0.1, 0.1]), TGSConfig(min_distance=3))
    assert [p for p, *_ in close] == [0]  # 2 is within 3 snippets of 0: same event
    far = find_peaks(torch.tensor([0.9, 0.1, 0.85, 0.1, 0.1]), TGSConfig(min_distance=2))
    assert [p for p, *_ in far] == [0, 2]


def test_tgs_amplitude_peak_and_normal_videos_get_zero():
    s = torch.tensor([[0.1, 0.6, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9]])
    labels = torch.tensor([1.0, 0.0])
    target = tgs_pseudo_labels(s, labels, TGSConfig(amplitude="peak"))
    assert target[0, 1] == pytest.approx(0.6)
    assert torch.all(target[1] == 0)
    with pytest.raises(ValueError, match="amplitude"):
        TGSConfig(amplitude="max")
    # the TGS loss is minimal when scores equal the pseudo-label
    cfg = TGSConfig()
    s2 = torch.tensor([[0.05, 0.2, 0.95, 0.2, 0.05]])
    lab = torch.ones(1)
    t = tgs_pseudo_labels(s2, lab, cfg)
    assert tgs_loss(t.clamp(0.01, 0.99), lab, cfg) < tgs_loss(s2, lab, cfg)


def test_tgs_teacher_source_labels_every_expert_alike():
    teacher = torch.tensor([[0.05, 0.1, 0.9, 0.2, 0.05, 0.05]])
    student = torch.full((1, 6, 3), 0.5)  # flat curves: their own peaks would be arbitrary
    cfg = TGSConfig()
    expected = tgs_pseudo_labels(teacher, torch.ones(1), cfg)
    per_snippet = torch.nn.functional.binary_cross_entropy(
        student, expected.unsqueeze(-1).expand_as(student), reduction="none").mean(1)
    got = tgs_loss(student, torch.ones(1), cfg, source=teacher)
    assert got == pytest.approx(per_snippet.mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------ MIL
def test_mil_topk_selection():
    assert topk_k(32) == 3 and topk_k(15) == 1 and topk_k(64) == 5
    s = torch.zeros(2, 32)
    s[0, [3, 10, 20]] = torch.tensor([0.9, 0.8, 0.7])
    s[0, 5] = 0.5  # 4th largest: not in the top-3
    assert topk_mean(s)[0] == pytest.approx(0.8)
    # gradient flows only into the k selected snippets
    s = s.clone().requires_grad_(True)
    mil_loss(s.clamp(0.01, 0.99), torch.tensor([1.0, 0.0])).backward()
    nz = set(torch.nonzero(s.grad[0]).flatten().tolist())
    assert nz == {3, 10, 20}
    # per-expert form with a mask: only the masked (video, expert) pairs count
    se = torch.full((2, 16, 3), 0.5)
    w = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    assert mil_loss(se, torch.tensor([1.0, 0.0]), w) == pytest.approx(math.log(2), rel=1e-4)


# ------------------------------------------------------------------------------ readers
def _write_folder(root, T=(5, 4, 6), dim=8, crops=False, gt="npy"):
    rng = np.random.default_rng(0)
    names_train = ["Abuse001_x264.npy", "Arson002_x264.npy", "Normal_Videos_001_x264.npy",
                   "Normal_Videos_002_x264.npy"]
    names_test = ["Abuse010_x264.npy", "Normal_Videos_100_x264.npy", "Arson011_x264.npy"]
    (root / "feats").mkdir()
    for n in names_train:
        np.save(root / "feats" / n, rng.normal(size=(3, 7, dim) if crops else (7, dim)).astype(np.float32))
    for n, t in zip(names_test, T):
        np.save(root / "feats" / n, rng.normal(size=(3, t, dim) if crops else (t, dim)).astype(np.float32))
    (root / "train.list").write_text("".join(f"feats/{n}\n" for n in names_train))
    (root / "test.list").write_text("".join(f"feats/{n}\n" for n in names_test))
    if gt == "npy":
        labels = np.zeros(sum(T) * 16, dtype=np.uint8)
        labels[16:40] = 1  # Abuse010, frames 16..39
        labels[(T[0] + T[1]) * 16 + 5:(T[0] + T[1]) * 16 + 9] = 1
        np.save(root / "gt.npy", labels)
    else:
        (root / "annotations.txt").write_text(
            "Abuse010_x264.mp4  Abuse  16  39  -1  -1\nArson011_x264.mp4 Arson 5 8\n")
    return names_test


@pytest.mark.parametrize("gt", ["npy", "txt"])
def test_reader_gt_npy_and_annotations_agree(tmp_path, gt):
    _write_folder(tmp_path, gt=gt)
    train, test, classes = read_feature_folder(tmp_path)
    assert classes == ["Abuse", "Arson"]
    assert [v.class_name for v in train] == ["Abuse", "Arson", "Normal", "Normal"]
    assert [v.num_snippets for v in test] == [5, 4, 6]
    assert test[0].frame_gt.sum() == 24 and test[0].frame_gt[16] == 1 and test[0].frame_gt[40] == 0
    assert test[1].frame_gt.sum() == 0 and test[2].frame_gt[5:9].sum() == 4


def test_datamodule_plugin_layout_with_crops(tmp_path):
    _write_folder(tmp_path, crops=True)
    dm = VADDataModule(root=str(tmp_path), num_segments=4, batch_size=2)
    assert dm.feature_dim == 8 and dm.num_crops == 3 and dm.classes == ["Abuse", "Arson"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].shape == (2, 3, 4, 8)
    assert batch["label"].tolist() == [0.0, 1.0]  # one normal and one anomalous per pair
    tb = next(iter(dm.test_dataloader()))
    assert tb["features"].shape == (1, 3, 5, 8) and tb["frame_gt"].shape == (1, 80)
    model = GSMoE(8, 2, dim=16, expert_hidden=8)
    assert model(batch["features"]).shape == (2, 4)


def test_reader_errors_name_the_file(tmp_path):
    names = _write_folder(tmp_path)
    feats = tmp_path / "feats"
    # length mismatch between features and gt.npy
    np.save(feats / names[0], np.zeros((9, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"gt\.npy.*need"):
        read_feature_folder(tmp_path)
    np.save(feats / names[0], np.zeros((5, 8), dtype=np.float32))
    # NaN features
    bad = np.zeros((5, 8), dtype=np.float32)
    bad[2, 3] = np.nan
    np.save(feats / names[0], bad)
    with pytest.raises(ValueError, match=r"Abuse010_x264\.npy.*NaN"):
        read_feature_folder(tmp_path)
    np.save(feats / names[0], np.zeros((5, 8), dtype=np.float32))
    # wrong width
    np.save(feats / names[0], np.zeros((5, 6), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Abuse010_x264\.npy.*width 6"):
        read_feature_folder(tmp_path)
    np.save(feats / names[0], np.zeros((5, 8), dtype=np.float32))
    # unknown class in the test list
    np.save(feats / "Robbery003_x264.npy", np.zeros((5, 8), dtype=np.float32))
    (tmp_path / "test.list").write_text("feats/Robbery003_x264.npy\n")
    with pytest.raises(ValueError, match=r"Robbery003_x264\.npy.*unknown class 'Robbery'"):
        read_feature_folder(tmp_path)
    # missing feature file named by the list
    (tmp_path / "test.list").write_text("feats/Missing001_x264.npy\n")
    with pytest.raises(FileNotFoundError, match=r"test\.list:1.*Missing001"):
        read_feature_folder(tmp_path)
    # no ground truth at all
    (tmp_path / "test.list").write_text("".join(f"feats/{n}\n" for n in names))
    (tmp_path / "gt.npy").unlink()
    with pytest.raises(FileNotFoundError, match="gt.npy.*annotations.txt"):
        read_feature_folder(tmp_path)
    # annotation beyond the video's frames
    (tmp_path / "annotations.txt").write_text("Abuse010_x264 Abuse 500 600\nArson011_x264 Arson 1 2\n")
    with pytest.raises(ValueError, match=r"annotations\.txt.*Abuse010.*starts after"):
        read_feature_folder(tmp_path)
    # missing list
    (tmp_path / "train.list").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.list"):
        VADDataModule(root=str(tmp_path))


def test_class_names_and_pooling():
    assert class_from_name("Abuse028_x264.npy") == "Abuse"
    assert class_from_name("Normal_Videos_003_x264.npy") == "Normal"
    assert class_from_name("v=abc__#1_label_B1-0-0.npy") == "B1"
    assert class_from_name("v=abc__#1_label_A.npy") == "Normal"
    x = np.arange(10, dtype=np.float32)[:, None].repeat(2, 1)
    p = pool_segments(x, 5)
    assert np.allclose(p[:, 0], [0.5, 2.5, 4.5, 6.5, 8.5])
    assert pool_segments(x[:3], 6).shape == (6, 2)  # short videos repeat snippets


def test_balanced_sampler_and_synthetic_ground_truth():
    labels = [0] * 10 + [1] * 4
    s = BalancedBatchSampler(range(14), batch_size=4, labels=labels)
    batches = list(s)
    assert len(batches) == len(s) == 5
    assert all(sum(i >= 10 for i in b) == 2 for b in batches)
    assert sorted({i for b in batches for i in b}) == list(range(14))  # every video is drawn
    # a distributed shard (every other index, as DistributedSampler gives rank 0 of 2) is
    # balanced within itself and holds only the shard's videos
    shard = BalancedBatchSampler(range(0, 14, 2), batch_size=4, labels=labels)
    assert {i for b in shard for i in b} == set(range(0, 14, 2))
    assert all(sum(i >= 10 for i in b) == 2 for b in shard) and len(shard) == 3
    world = make_world(3, 16, seed=0)
    vids = make_synthetic_split(world, 2, 6, 32, 32, difficulty=1.0, seed=1)
    for v in vids:
        gt = v.frame_gt.reshape(-1, 16)
        assert (gt == gt[:, :1]).all()  # 16 frames per snippet share a label
        assert (gt.sum() > 0) == bool(v.label)
        if v.label:  # event snippets move along the class signature
            k = world.class_names.index(v.class_name)
            proj = v.features @ world.signatures[k]
            assert proj[gt[:, 0] == 1].mean() > proj[gt[:, 0] == 0].mean() + 0.5


def test_kdd_tsad_clips_when_aeon_is_installed():
    pytest.importorskip("aeon")
    train, test, classes = load_kdd_tsad_clips()
    assert classes == ["Anomaly"]
    assert sum(v.label for v in train) >= 2 and sum(v.label for v in test) >= 2
    names = {v.name for v in train}
    assert not names & {v.name for v in test}
    assert all(v.features.shape == (32, 17) for v in train)


# ------------------------------------------------------------------------------ metrics
def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    met = FrameVADMetrics(["A", "B"])
    padded = FrameVADMetrics(["A", "B"])  # as under DDP: some videos scored twice (by two ranks)
    all_s, all_y, vids = [], [], []
    for i, cls in enumerate([-1, 0, 1, -1, 0, 1]):
        T = int(rng.integers(4, 9))
        s = torch.tensor(rng.random(T), dtype=torch.float32)
        y = torch.zeros(T * 16, dtype=torch.long)
        if cls >= 0:
            y[16:16 * 3 + 5] = 1
        met.update(s, y, cls)
        for _ in range(1 + (i % 2)):
            padded.update(s, y, cls, video=i)
        fs = np.repeat(s.numpy(), 16)
        all_s.append(fs), all_y.append(y.numpy()), vids.append(np.full(T * 16, cls))
    s, y, c = map(np.concatenate, (all_s, all_y, vids))
    out = met.compute()
    assert float(out["auc"]) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    # AP as RTFM / UR-DMU / XD-Violence compute it: trapezoid area under the PR curve
    pr_auc = lambda yy, ss: auc(*precision_recall_curve(yy, ss)[1::-1])  # noqa: E731
    assert float(out["ap"]) == pytest.approx(pr_auc(y, s), abs=1e-7)
    assert float(out["ap_step"]) == pytest.approx(average_precision_score(y, s), abs=1e-7)
    assert abs(float(out["ap"]) - float(out["ap_step"])) > 1e-3  # the two rules differ here
    a = c >= 0
    assert float(out["auc_a"]) == pytest.approx(roc_auc_score(y[a], s[a]), abs=1e-6)
    assert float(out["ap_a"]) == pytest.approx(pr_auc(y[a], s[a]), abs=1e-7)
    sel = (c == -1) | (c == 1)
    assert float(out["auc/B"]) == pytest.approx(roc_auc_score(y[sel], s[sel]), abs=1e-6)
    dedup = padded.compute()
    assert all(float(dedup[k]) == pytest.approx(float(v), abs=1e-7) for k, v in out.items())
    with pytest.raises(ValueError, match="frames"):
        met.update(torch.zeros(3), torch.zeros(40, dtype=torch.long), -1)


# ------------------------------------------------------------------------------ model
def test_dense_twin_has_the_parameters_of_experts_and_gate():
    for E, dim, hidden in [(4, 32, 32), (7, 64, 48), (2, 16, 8)]:
        moe_head = count_params(ClassExperts(E, dim, hidden)) + count_params(CrossAttentionGate(E, dim))
        dense = count_params(DenseHead(dim, dense_head_hidden(E, dim, hidden)))
        assert abs(dense - moe_head) <= dim + 2  # one hidden unit of rounding
    moe, dense = GSMoE(20, 4, variant="moe"), GSMoE(20, 4, variant="dense")
    assert abs(moe.head_params() - dense.head_params()) <= 34
    assert count_params(moe) == pytest.approx(count_params(dense), abs=34)


def test_experts_are_independent_and_gate_routes():
    torch.manual_seed(0)
    experts = ClassExperts(3, 16, 8)
    f = torch.randn(2, 10, 16)
    out = experts(f)
    assert out.shape == (2, 10, 3)
    with torch.no_grad():  # changing expert 1's weights changes only expert 1's logits
        experts.mlp.w2[1].mul_(2.0)
        experts.blocks.w_o[1].add_(0.1)
    out2 = experts(f)
    assert torch.allclose(out[..., [0, 2]], out2[..., [0, 2]], atol=1e-6)
    assert not torch.allclose(out[..., 1], out2[..., 1])
    # local attention: a change at t=0 does not reach t >= 3 with a window of 2 (after 1 block)
    f2 = f.clone()
    f2[:, 0] += 5.0
    d = (experts(f2) - out2).abs().amax((0, 2))
    assert d[3:].max() < 1e-5 and d[0] > 1e-3
    gate = CrossAttentionGate(3, 16)
    task = torch.randn(2, 10)
    y = gate(f, out2, task)
    assert y.shape == (2, 10)
    # query projection and correction MLP start at zero: the gate starts as the experts' average
    assert torch.allclose(y, out2.mean(-1), atol=1e-5)
    info = gate.last_routing
    assert torch.allclose(info.probs.sum(-1), torch.ones(20), atol=1e-5)
    assert info.extra["task_share"] == 0.0
    with_task = CrossAttentionGate(3, 16, task_token=True)
    y2 = with_task(f, out2, task)  # the task logit is one more token to attend to
    assert torch.allclose(y2, torch.cat([task[..., None], out2], -1).mean(-1), atol=1e-5)
    assert with_task.last_routing.extra["task_share"] == pytest.approx(0.25, abs=1e-5)
    stats = routing_stats(torch.nn.ModuleDict({"gate": gate}))
    assert set(stats) == {"gate"} and abs(sum(stats["gate"]["load"]) - 1) < 1e-5


def test_head_input_modes():
    torch.manual_seed(0)
    x, f = torch.randn(2, 6, 10), torch.randn(2, 6, 16)
    both = HeadInput(10, 16, "both")
    ln = both.norm(both.proj(x))
    assert torch.allclose(both(x, f), ln)  # alpha starts at 0: the heads start from the input
    with torch.no_grad():
        both.task_scale.fill_(0.5)
    assert torch.allclose(both(x, f), ln + 0.5 * f)
    assert HeadInput(10, 16, "input").task_scale is None
    assert GSMoE(10, 2, dim=16, expert_input="task").input_proj is None
    with pytest.raises(ValueError, match="expert_input"):
        GSMoE(10, 2, dim=16, expert_input="raw")


def test_kmeans_grouping_of_classes():
    protos = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [9, 0]], dtype=float)
    g = group_classes(protos, 3)
    assert g[0] == g[1] and g[2] == g[3] and len(set(g)) == 3 and g[0] == 0
    with pytest.raises(ValueError, match="expert_groups"):
        group_classes(protos, 6)


# ------------------------------------------------------------------------------ training
def _tiny_dm(**kw):
    args = dict(num_classes=3, feature_dim=16, min_len=32, max_len=32, num_segments=32,
                shared_fraction=0.5,
                num_train_normal=48, num_train_anomalous=48, num_test_normal=16,
                num_test_anomalous=24, batch_size=8, seed=0)
    args.update(kw)
    return VADDataModule(**args)


def _fit(module, dm, epochs, root):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        num_sanity_val_steps=0, check_val_every_n_epoch=epochs)
    trainer.fit(module, datamodule=dm)
    return trainer, trainer.test(module, datamodule=dm, verbose=False)[0]


def test_staged_training_on_an_rtfm_folder_finds_the_anomalies(tmp_path):
    """The built-in videos written as RTFM's release ([T, crops, C] files, lists of Windows
    paths, gt-ucf.npy), read back, trained through every stage (the paper's wiring)."""
    torch.manual_seed(0)
    built_in = _tiny_dm(batch_size=4)
    write_release(tmp_path / "rtfm", "rtfm", built_in.train_videos, built_in.test_videos, crops=2,
                  crop_noise=0.0)
    dm = VADDataModule(root=str(tmp_path / "rtfm"), num_segments=32, batch_size=4)
    assert dm.num_crops == 2 and len(dm.test_videos) == len(built_in.test_videos)
    module = VADModule(variant="moe", stages={"encoder": 4, "tgs": 2, "experts": 6, "gate": 2},
                       dim=16, expert_hidden=16, expert_input="both")
    module.on_data(dm)
    assert module.model.num_experts == 3 and module.hparams.in_dim == 16
    assert [module.stage_at(e) for e in range(16)] == ["encoder"] * 4 + ["tgs"] * 2 + \
        ["experts"] * 6 + ["gate"] * 4  # epochs past the schedule continue the last stage
    trainer, res = _fit(module, dm, 14, tmp_path)
    assert res["test/auc"] > 0.7, res          # chance is 0.5
    assert res["test/auc_a"] > 0.6, res
    for name in ("score_curves.png", "expert_usage.png", "routing_by_group.png"):
        assert (module.run_dir / name).stat().st_size > 1000
    # checkpoint round trip gives identical scores
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = VADModule.load_from_checkpoint(ckpt, weights_only=True)
    x = torch.from_numpy(dm.test_videos[0].features)[None]               # [1, crops, T, C]
    module.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(module(x), loaded(x), atol=1e-6)


def test_frozen_parts_do_not_move_in_later_stages(tmp_path):
    torch.manual_seed(0)
    dm = _tiny_dm(num_train_normal=16, num_train_anomalous=16, num_test_normal=4,
                  num_test_anomalous=6)
    module = VADModule(variant="moe", stages={"encoder": 1, "gate": 1}, dim=16, expert_hidden=8)
    module.on_data(dm)
    batch = next(iter(dm.train_dataloader()))
    module._set_trainable("gate")
    enc = [p.clone() for p in module.model.encoder.parameters()]
    exp = [p.clone() for p in module.model.experts.parameters()]
    opt = module.configure_optimizers()
    loss, terms = module.stage_loss(batch, "gate")
    assert set(terms) == {"mil_final", "tgs_final"}
    loss.backward()
    module.on_before_optimizer_step(opt)  # drops the frozen parts' gradients
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(enc, module.model.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(exp, module.model.experts.parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.gate.parameters())
    # every parameter gets a gradient in every stage (plain DDP needs that); the frozen parts'
    # gradients are dropped before the optimizer step
    for stage in ("encoder", "tgs", "experts", "gate"):
        module.zero_grad(set_to_none=True)
        module._stage = stage
        module._set_trainable(stage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a trainer
            module.training_step(batch, 0).backward()
        assert all(p.grad is not None for p in module.model.parameters()), stage
        module.on_before_optimizer_step(opt)
        dropped = {id(p) for p in module._frozen}
        assert all((p.grad is None) == (id(p) in dropped) for p in module.model.parameters())
        enc = {id(p) for p in module.model.encoder.parameters()}
        assert (enc <= dropped) == (stage in ("experts", "gate")), stage
    # expert stage: each anomalous video trains only its class's expert
    mask = module._expert_mask(batch["label"], batch["cls"])
    assert (mask[batch["label"] == 0] == 1).all()
    assert (mask[batch["label"] == 1].sum(1) == 1).all()


# ------------------------------------------------------------------------------ release layouts
def _release_videos():
    world = make_world(2, 8, seed=0, shared_fraction=0.5)
    train = make_synthetic_split(world, 3, 4, 6, 9, 1.0, seed=1)
    test = make_synthetic_split(world, 2, 3, 6, 9, 1.0, seed=2)
    return train, test


def _anomalous_first(videos):
    return sorted(videos, key=lambda v: v.class_name == "Normal")


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """The same built-in videos written in every release layout, and the videos themselves."""
    base = tmp_path_factory.mktemp("releases")
    train, test = _release_videos()
    return {lay: (write_release(base / lay, lay, train, test), base / lay) for lay in LAYOUTS}, train, test


def test_every_release_layout_reads_back_the_same_videos(releases):
    folders, train, test = releases
    loaded = {}
    for lay, (info, root) in folders.items():
        dm = VADDataModule(root=str(root), num_segments=4, batch_size=2,
                           anomalous_first=info["anomalous_first"] if lay == "shanghai" else None)
        assert dm.num_crops == (5 if lay == "xd" else 10) and dm.feature_dim == 8, lay
        for got, want in zip(dm.train_videos + dm.test_videos, _anomalous_first(train) + _anomalous_first(test)):
            x = got.features                                                # [crops, T, C]
            assert x.shape == (dm.num_crops,) + want.features.shape, lay
            assert np.abs(x.mean(0) - want.features).max() < 0.2, lay     # crops = video + noise
            assert got.label == want.label, (lay, got.name)
        for got, want in zip(dm.test_videos, _anomalous_first(test)):
            assert np.array_equal(got.frame_gt, want.frame_gt), (lay, got.name)  # T * 16 frames
        loaded[lay] = dm
        batch = next(iter(dm.train_dataloader()))
        assert batch["features"].shape == (2, dm.num_crops, 4, 8) and batch["label"].tolist() == [0.0, 1.0]
    assert loaded["rtfm"].classes == ["Abuse", "Arrest"] and loaded["xd"].classes == ["B1", "B2"]
    assert loaded["shanghai"].classes == ["Anomaly"]
    # RTFM's [T, 10, C] files and UR-DMU's per-crop files of the same crops give the same arrays
    for a, b in zip(loaded["rtfm"].test_videos, loaded["urdmu"].test_videos):
        assert a.name == b.name and np.array_equal(a.features, b.features)
    # gt-ucf.npy, UCF-Crime's annotation text (frames inclusive) and XD's (end exclusive) agree
    for a, b in zip(loaded["rtfm"].test_videos, loaded["rtfm_txt"].test_videos):
        assert np.array_equal(a.frame_gt, b.frame_gt)
    # UR-DMU ships gt-ucf.npy and UCF_Annotation.txt ('video frames class s e ...'): the frame
    # labels are used unless the annotation file is named, and both give the same labels
    named = VADDataModule(root=str(folders["urdmu"][1]), annotations="list/UCF_Annotation.txt")
    for a, b in zip(loaded["urdmu"].test_videos, named.test_videos):
        assert np.array_equal(a.frame_gt, b.frame_gt)


def test_xd_names_and_multi_label_tags():
    assert name_tags("Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6__3.npy") == ("G", ("G", "B2", "B6"))
    assert name_tags("v=S-7rRLrxnVQ__#1_label_B4-0-0__0.npy") == ("B4", ("B4",))
    assert class_from_name("v=x__#00-01-00_00-02-00_label_A__0.npy") == "Normal"  # not class 'A__0'
    assert name_tags("01_0015_i3d.npy") == (None, ())                              # ShanghaiTech
    assert class_from_name("Abuse001_x264_i3d.npy") == "Abuse"


def _rtfm_files(root, T=(12, 7, 9), crops=10, C=8):
    rng = np.random.default_rng(0)
    names = ["Abuse001_x264", "Normal_Videos001_x264", "Abuse028_x264"]
    for n, t in zip(names, T):
        np.save(root / f"{n}_i3d.npy", rng.normal(size=(t, crops, C)).astype(np.float32))
    (root / "train.list").write_text("Abuse001_x264_i3d.npy\nNormal_Videos001_x264_i3d.npy\n")
    (root / "test.list").write_text("Abuse028_x264_i3d.npy\n")
    return names


def test_rtfm_crop_axis_rule_and_override(tmp_path):
    # T differs between files, crops do not: [T, 10, C] is read as 10 crops of T snippets
    _rtfm_files(tmp_path)
    np.save(tmp_path / "gt.npy", np.zeros(9 * 16))
    dm = VADDataModule(root=str(tmp_path), num_segments=4, batch_size=2)
    assert dm.test_videos[0].shape == (10, 9, 8) and dm.num_crops == 10
    # every file [10, 10, C]: only the frame-label length (10 * 16) or data.crop_axis settles it
    _rtfm_files(tmp_path, T=(10, 10, 10))
    np.save(tmp_path / "gt.npy", np.zeros(10 * 16))
    with pytest.raises(ValueError, match="crop_axis"):
        VADDataModule(root=str(tmp_path))
    assert VADDataModule(root=str(tmp_path), crop_axis=0).num_crops == 10
    # same shape [12, 10, C] everywhere: the frame labels decide, then the smaller axis
    _rtfm_files(tmp_path, T=(12, 12, 12))
    np.save(tmp_path / "gt.npy", np.zeros(10 * 16))   # fits [crops=12, T=10, C]
    assert VADDataModule(root=str(tmp_path)).test_videos[0].shape == (12, 10, 8)
    np.save(tmp_path / "gt.npy", np.zeros(12 * 16))
    assert VADDataModule(root=str(tmp_path)).test_videos[0].shape == (10, 12, 8)
    np.save(tmp_path / "gt.npy", np.zeros(100))
    with pytest.raises(ValueError, match=r"gt\.npy: has 100 frame labels but .* need 192 .*\[T, crops, C\]"):
        VADDataModule(root=str(tmp_path))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _drop_line(path, needle):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(l for l in lines if needle not in l) + "\n")


def _first_anomalous_crop(root, crop, sub="dataset"):
    return sorted((root / sub).rglob(f"Abuse001_x264__{crop}.npy"))[0]


BAD_RELEASES = {
    "missing crop file in the list": ("urdmu", lambda r: _drop_line(r / "list/UCF_Train.list", "Abuse001_x264__3.npy"),
                                      ["UCF_Train.list:1", "'Abuse001_x264'", "not [3]", "Abuse001_x264__3.npy"]),
    "crop file missing on disk": ("urdmu", lambda r: _first_anomalous_crop(r, 4).unlink(),
                                  ["UCF_Train.list:5", "Abuse001_x264__4.npy", "not found"]),
    "crops of different lengths": ("urdmu", lambda r: np.save(_first_anomalous_crop(r, 2), np.zeros((3, 8), np.float32)),
                                   ["Abuse001_x264__2.npy", "crop 2", "(3, 8)", "same snippets and width"]),
    "crops of different widths": ("urdmu", lambda r: np.save(_first_anomalous_crop(r, 1), np.zeros((6, 5), np.float32)),
                                  ["Abuse001_x264__1.npy", "crop 1", "(6, 5)"]),
    "per-crop and whole files mixed": ("rtfm", lambda r: (np.save(r / "features/Abuse009_x264__0.npy", np.zeros((6, 8), np.float32)),
                                                          (r / "list/ucf-i3d.list").open("a").write("Abuse009_x264__0.npy\n")),
                                       ["mixes layouts", "ucf-i3d.list:", "Abuse009_x264__0.npy", "whole video"]),
    "2-D file among 3-D files": ("rtfm", lambda r: np.save(sorted((r / "features").glob("Normal*"))[0], np.zeros((6, 8), np.float32)),
                                 ["mixes layouts", "Normal_Videos_001_x264_i3d.npy", "(6, 8) (2-D)"]),
    "frame labels do not match": ("rtfm", lambda r: np.save(r / "list/gt-ucf.npy", np.zeros(50)),
                                  ["gt-ucf.npy", "50 frame labels", "ucf-i3d-test.list"]),
    "frame mask longer than the video": ("shanghai", lambda r: np.save(sorted((r / "test_frame_mask").glob("*.npy"))[0], np.zeros(999)),
                                         ["test_frame_mask", "999 frame labels", "disagree"]),
    "annotation names no listed video": ("xd", lambda r: (r / "annotations.txt").open("a").write("Ghost.Movie__#1_label_B1-0-0 10 40\n"),
                                         ["annotations.txt:4", "'Ghost.Movie__#1_label_B1-0-0'", "not in", "rgb_test.list"]),
    "annotation formats mixed": ("xd", lambda r: (r / "annotations.txt").open("a").write("Abuse028_x264.mp4 Abuse 1 5 -1 -1\n"),
                                 ["annotations.txt:4", "UCF-Crime", "XD-Violence"]),
    "NaN in one crop": ("xd", lambda r: np.save(sorted((r / "RGB").glob("*label_B1*__3.npy"))[0], np.full((6, 8), np.nan, np.float32)),
                        ["__3.npy", "NaN or inf"]),
}


@pytest.mark.parametrize("case", list(BAD_RELEASES))
def test_bad_release_folders_give_one_error_naming_the_file(releases, tmp_path, case):
    layout, corrupt, needles = BAD_RELEASES[case]
    info, src = releases[0][layout]
    root = _copy(src, tmp_path / layout)
    corrupt(root)
    kw = {"anomalous_first": info["anomalous_first"]} if layout == "shanghai" else {}
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        VADDataModule(root=str(root), **kw)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_release_folder_through_the_cli_exits_2(releases, tmp_path, capsys):
    from zoo.cli import main

    root = _copy(releases[0]["urdmu"][1], tmp_path / "urdmu")
    _drop_line(root / "list/UCF_Train.list", "Abuse001_x264__3.npy")
    assert main(["fit", "--config", "configs/vad/moe.yaml", "--data.root", str(root),
                 "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "UCF_Train.list:1" in err and "not [3]" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_short_max_epochs_warns_naming_the_stages(tmp_path):
    msg = schedule_warning({"encoder": 6, "tgs": 10, "experts": 8, "gate": 4}, 8)
    assert "tgs (10 epochs: only 2 run)" in msg and "experts (8 epochs: not run)" in msg
    assert "gate (4 epochs: not run)" in msg and "--trainer.max_epochs 28" in msg
    assert schedule_warning({"encoder": 6, "tgs": 10}, 16) is None
    assert schedule_warning({"encoder": 6, "tgs": 10}, 4, joint=True) is None
    dm = _tiny_dm(num_train_normal=4, num_train_anomalous=4, num_test_normal=2, num_test_anomalous=2)
    module = VADModule(stages={"encoder": 1, "experts": 2}, dim=16, expert_hidden=16)
    with pytest.warns(UserWarning, match=r"max_epochs=1 .*experts \(2 epochs: not run\)"):
        _fit(module, dm, 1, tmp_path)
