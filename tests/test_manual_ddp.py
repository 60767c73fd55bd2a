"""Manual-optimisation tasks under DDP keep their replicas identical (ZooModule.manual_step).

AdvMoE (robust_cnn) makes two backward passes per training step, each with part of the model
frozen, and M3ViT's one-by-one mode (multitask_vit) one backward per task. DDP's reducer
expects one backward per forward over all parameters, so both used to stop with "parameters
that were not used in producing the loss". They now go through ``ZooModule.local_backward`` and
``sync_gradients``. These tests run 2 gloo ranks through the `zoo` CLI and compare every
rank's weights and buffers at the end of training.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
       "--trainer.enable_progress_bar=false", "--trainer.callbacks+=rank_dump.RankDump"]
CALLBACK = '''
import torch, lightning as L


class RankDump(L.Callback):
    """Every rank saves its final weights and buffers (a checkpoint only holds rank 0's)."""

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"rank{trainer.global_rank}.pt")
'''


ADVMOE = ("robust_cnn/moe_advmoe.yaml", [
    "--data.init_args.dataset=digits", "--data.init_args.builtin_size=null", "--data.init_args.max_train=96",
    "--data.init_args.max_eval=32", "--data.init_args.batch_size=32", "--model.init_args.width=4",
    "--model.init_args.val_steps=1"])
M3VIT = ("multitask_vit/moe_one_by_one.yaml", [
    "--expert_parallel=true", "--data.init_args.num_train=32", "--data.init_args.num_val=8",
    "--data.init_args.num_test=8", "--data.init_args.batch_size=8", "--data.init_args.img_size=16",
    "--model.init_args.img_size=16", "--model.init_args.dim=16", "--model.init_args.depth=2",
    "--model.init_args.num_heads=2", "--model.init_args.num_experts=4", "--model.init_args.task_dim=4",
    "--model.init_args.decoder_channels=4"])


def start_two_ranks(d: Path, config: str, args: list[str], port: int) -> subprocess.Popen:
    d.mkdir(parents=True)
    (d / "rank_dump.py").write_text(CALLBACK)
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port),
           "PYTHONPATH": f"{d}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "zoo.cli", "fit", "--config", str(CONFIGS / config), *args, *DDP,
           "--run_dir", str(d / "run")]
    return subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, free_ports):
    """Both 2-rank fits side by side (a launch imports and parses in its first rank before it
    starts the second, so one launch alone leaves a core idle): name -> (folder, exit code, output)."""
    base = tmp_path_factory.mktemp("manual_ddp")
    ports = free_ports(2)
    procs = {name: (base / name, start_two_ranks(base / name, config, args, port))
             for (name, (config, args)), port in zip({"advmoe": ADVMOE, "m3vit": M3VIT}.items(), ports)}
    results = {}
    for name, (d, proc) in procs.items():
        out, _ = proc.communicate(timeout=600)
        results[name] = (d, proc.returncode, out)
    return results


def fit_two_ranks(runs, name: str) -> tuple[Path, dict, dict]:
    d, rc, out = runs[name]
    assert rc == 0, out[-6000:]
    return d, *(torch.load(d / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def test_advmoe_two_ranks_stay_identical(runs):
    d, a, b = fit_two_ranks(runs, "advmoe")
    saved = torch.load(d / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(a) == set(b) == set(saved) and any(k.startswith("model.router.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # weights and BatchNorm statistics: rank 0's everywhere
        assert torch.equal(a[k], saved[k]), k  # and the checkpoint holds exactly that state


def test_m3vit_one_by_one_two_ranks_expert_parallel(runs):
    d, a, b = fit_two_ranks(runs, "m3vit")
    experts = {k for k in a if ".mlp.experts." in k}
    assert experts and all(a[k].shape[0] == 2 for k in experts)  # 4 experts split 2 + 2
    assert all(not torch.equal(a[k], b[k]) for k in experts)  # each rank trains its own shard
    for k in set(a) - experts:
        assert torch.equal(a[k], b[k]), k  # everything else is an identical replica
    whole = torch.load(d / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in experts:  # the checkpoint holds both shards, rank 0's first
        torch.testing.assert_close(whole[k], torch.cat([a[k], b[k]]), rtol=0, atol=0)
