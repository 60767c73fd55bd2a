"""PMOE-SAC on 2 gloo ranks through the `zoo` CLI: a resumed run equals an uninterrupted one.

Each rank steps its own environments into its own replay buffer, so a checkpoint written by
rank 0 must carry every rank's buffer and sampler stream (``rl_state["ranks"]``); before that,
a resumed run gave rank 1 rank 0's buffer and diverged from the uninterrupted run.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_rl import _metric_rows as rows  # tests/tasks is on sys.path under pytest
from test_rl import _tensors_equal as same

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "rl" / "pmoe_sac.yaml"
ARGS = ["--data.init_args.steps_per_epoch=40", "--data.init_args.steps_per_batch=10",
        "--model.init_args.learning_starts=20", "--model.init_args.batch_size=16",
        "--model.init_args.buffer_size=500", "--model.init_args.log_every=5",
        "--model.init_args.hidden=32", "--model.init_args.critic_hidden=32",
        "--model.init_args.expert_hidden=16", "--data.init_args.eval_episodes=1",
        "--data.init_args.test_episodes=1", "--data.init_args.max_episode_steps=30",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


def launch(run_dir: Path, port: int, epochs: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    cmd = [sys.executable, "-m", "zoo.cli", "fit", "--config", str(CONFIG), *ARGS,
           f"--trainer.max_epochs={epochs}", "--run_dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait(*procs: subprocess.Popen) -> None:
    outs = [(p, p.communicate(timeout=600)[0]) for p in procs]
    for p, out in outs:
        assert p.returncode == 0, out[-6000:]


def test_sac_ddp_resume_restores_every_ranks_buffer(tmp_path, free_ports):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ports = free_ports(3)
    # the uninterrupted run and the first part side by side: a launch imports and parses in its
    # first rank before it starts the second, so one launch alone leaves a core idle
    wait(launch(straight, ports[0], 2), launch(resumed, ports[1], 1))
    wait(launch(resumed, ports[2], 2, "--ckpt_path", "last"))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    ranks = a["rl_state"]["ranks"]
    assert len(ranks) == 2
    # 40 env steps per epoch over both ranks, each rank holding the transitions of its own envs
    assert a["rl_state"]["env_steps"] == 80
    assert [r["buffer"]["size"] for r in ranks] == [40, 40]
    obs0, obs1 = (r["buffer"]["obs"] for r in ranks)
    assert not torch.equal(obs0, obs1)  # different env seeds per rank
    assert not torch.equal(ranks[0]["sampler_rng"], ranks[1]["sampler_rng"])
    same(a["state_dict"], b["state_dict"], "state_dict")
    same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    a["rl_state"].pop("train_seconds"), b["rl_state"].pop("train_seconds")
    same(a["rl_state"], b["rl_state"], "rl_state")
    assert rows(resumed) == rows(straight)
