"""`zoo predict` writes every task's predictions to <run_dir>/predict/predictions.pt.

Each task runs `zoo predict` in-process on a tiny config (untrained weights: what is checked is
what gets written, its shapes, and that it agrees with the model and the data it came from).
"""
from pathlib import Path

import pytest
import torch

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
COMMON = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TASKS = {
    "stock": ("stock/moe.yaml", ["--data.init_args.window=5", "--data.init_args.days_per_batch=4",
                                 "--data.init_args.source=synthetic",
                                 "--data.init_args.synthetic={num_days: 120, num_stocks: 12}"]),
    "robust_cnn": ("robust_cnn/moe_advmoe.yaml", ["--data.init_args.dataset=digits",
                                                  "--data.init_args.builtin_size=null", "--data.init_args.max_train=96",
                                                  "--data.init_args.max_eval=32", "--data.init_args.batch_size=32",
                                                  "--model.init_args.width=4"]),
    "multitask_vit": ("multitask_vit/moe.yaml", [
        "--data.init_args.num_train=8", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
        "--data.init_args.batch_size=4", "--data.init_args.img_size=16", "--model.init_args.img_size=16",
        "--model.init_args.dim=16", "--model.init_args.depth=2", "--model.init_args.num_heads=2",
        "--model.init_args.num_experts=4", "--model.init_args.task_dim=4", "--model.init_args.decoder_channels=4"]),
    "diffusion_policy": ("diffusion_policy/moe.yaml", [
        "--data.init_args.episodes_per_task=4", "--data.init_args.eval_episodes=0", "--data.init_args.batch_size=32",
        "--model.init_args.dim=16", "--model.init_args.expert_hidden=32", "--model.init_args.depth=1",
        "--model.init_args.num_sampling_steps=2"]),
    "vad": ("vad/moe.yaml", [
        "--data.init_args.num_train_normal=8", "--data.init_args.num_train_anomalous=8",
        "--data.init_args.num_test_normal=4", "--data.init_args.num_test_anomalous=4", "--data.init_args.min_len=16",
        "--data.init_args.max_len=24", "--data.init_args.num_segments=16", "--data.init_args.feature_dim=16",
        "--model.init_args.dim=16", "--model.init_args.expert_hidden=16"]),
    "rl": ("rl/pmoe_sac.yaml", ["--data.init_args.test_episodes=3", "--data.init_args.max_episode_steps=25",
                                "--model.init_args.hidden=32", "--model.init_args.critic_hidden=32",
                                "--model.init_args.expert_hidden=16"]),
}


def predict(task: str, tmp_path: Path, monkeypatch) -> tuple[dict, Path]:
    monkeypatch.chdir(tmp_path)
    config, overrides = TASKS[task]
    run = tmp_path / "run"
    assert main(["predict", "--config", str(CONFIGS / config), *COMMON, *overrides, "--run_dir", str(run)]) == 0
    path = run / "predict" / "predictions.pt"
    return torch.load(path, weights_only=True), run


def test_predict_stock(tmp_path, monkeypatch):
    pred, _ = predict("stock", tmp_path, monkeypatch)
    assert set(pred) == {"day", "score"}
    assert pred["score"].dim() == 2 and pred["score"].shape[0] == pred["day"].shape[0] > 0
    assert torch.isfinite(pred["score"]).any() and bool((pred["day"].diff() > 0).all())  # test days in order


def test_predict_robust_cnn(tmp_path, monkeypatch):
    pred, _ = predict("robust_cnn", tmp_path, monkeypatch)
    assert pred["prob"].shape == (32, 10) and pred["label"].shape == pred["pred"].shape == (32,)
    torch.testing.assert_close(pred["prob"].sum(-1), torch.ones(32))
    assert torch.equal(pred["pred"], pred["prob"].argmax(-1))
    assert len(set(pred["label"].tolist())) > 3  # the test labels of the digits subset


def test_predict_multitask_vit(tmp_path, monkeypatch):
    pred, _ = predict("multitask_vit", tmp_path, monkeypatch)
    assert set(pred) == {"semseg", "depth", "normals", "edge"}
    assert pred["semseg"].shape == (8, 16, 16) and pred["semseg"].dtype == torch.int64
    assert pred["depth"].shape == pred["edge"].shape == (8, 1, 16, 16)
    torch.testing.assert_close(pred["normals"].norm(dim=1), torch.ones(8, 16, 16))
    assert 0 <= float(pred["edge"].min()) and float(pred["edge"].max()) <= 1


def test_predict_diffusion_policy(tmp_path, monkeypatch):
    pred, _ = predict("diffusion_policy", tmp_path, monkeypatch)
    assert pred["action"].shape == pred["demo_action"].shape and pred["action"].shape[0] > 0
    assert torch.isfinite(pred["action"]).all()


def test_predict_vad(tmp_path, monkeypatch):
    pred, _ = predict("vad", tmp_path, monkeypatch)
    assert sorted(pred["index"].tolist()) == list(range(8))  # every test video once
    for s, f, e in zip(pred["snippet_scores"], pred["frame_scores"], pred["expert_scores"]):
        assert 16 <= s.shape[0] <= 24 and f.shape[0] == 16 * s.shape[0] and e.shape[0] == s.shape[0]
        assert torch.equal(f.view(-1, 16)[:, 0], s) and 0 <= float(s.min()) and float(s.max()) <= 1


def test_predict_rl_plays_the_test_episodes(tmp_path, monkeypatch):
    pred, _ = predict("rl", tmp_path, monkeypatch)
    assert pred["return"].shape == (3,) and len(set(pred["seed"].tolist())) == 3
    for ret, obs, act, rew in zip(pred["return"], pred["obs"], pred["action"], pred["reward"]):
        assert obs.shape == (25, 3) and act.shape == (25, 1) and rew.shape == (25,)  # Pendulum, truncated
        assert float(act.abs().max()) <= 2.0  # Pendulum's torque bound
        torch.testing.assert_close(rew.sum(), ret, rtol=1e-5, atol=1e-3)  # the return is the rewards' sum


def test_predict_without_predict_step_says_so():
    from zoo.module import ZooModule

    with pytest.raises(ValueError, match="ZooModule defines no predict_step"):
        ZooModule().predict_step({}, 0)
