"""DDP through Lightning with expert parallelism, on 2 gloo CPU processes, via the real `zoo` CLI.

A small MoE regressor (defined in a file written to tmp_path, loaded by the CLI like any user's
module) is trained:
  - in one process with batch 16, and with `--trainer.strategy ddp --trainer.devices 2
    --expert_parallel true` with batch 8 per rank (the same global batches, unshuffled): the
    weights after training and the validation curve agree;
  - the distributed checkpoint (experts gathered from both ranks, Adam moments included) loads
    in one process and in a 2-rank run (experts sliced again) and gives the same test loss;
  - a 2-rank run stopped after one epoch and resumed from last.ckpt ends where the
    uninterrupted 2-rank run ends (the 2-rank run of the first item).

2-rank runs are ``python -m zoo.cli`` subprocesses (Lightning starts the second rank by running
the same command again); one-process runs call ``zoo.cli.main`` in this process. All runs happen
in one module fixture, in two waves: a launch imports and parses in its first rank before it
starts the second, so one launch alone leaves a core idle, and independent launches overlap.
"""
import csv
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch

from zoo.cli import main

ROOT = Path(__file__).resolve().parent.parent

TOY = textwrap.dedent('''
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from zoo.moe import MoE
    from zoo.module import ZooModule


    class ToyMoE(ZooModule):
        monitor = "val/loss"

        def __init__(self, dim: int = 6, hidden: int = 16, num_experts: int = 4, k: int = 2, lr: float = 1e-2):
            super().__init__()
            self.save_hyperparameters()
            # balance=None: the Switch loss is a product of batch means, not a sum over samples,
            # so it would differ between one batch of 16 and two of 8
            self.model = torch.nn.ModuleDict({
                "moe": MoE(dim, hidden, num_experts=num_experts, k=k, balance=None),
                "out": torch.nn.Linear(dim, 1)})

        def forward(self, x):
            return self.model["out"](x + self.model["moe"](x)).squeeze(-1)

        def _loss(self, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def training_step(self, batch, i):
            return self.with_aux(self._loss(batch))

        def validation_step(self, batch, i):
            self.log("val/loss", self._loss(batch), sync_dist=True)

        def test_step(self, batch, i):
            self.log("test/loss", self._loss(batch), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, foreach=False)


    class ToyData(L.LightningDataModule):
        def __init__(self, batch_size: int = 16, n: int = 96):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            x = torch.randn(n, 6, generator=g)
            y = torch.where(x[:, 0] > 0, x[:, 1] ** 2, -x[:, 2]) + 0.1 * torch.randn(n, generator=g)
            self.ds = TensorDataset(x, y)
            self.batch_size = batch_size

        def _dl(self):
            # Lightning's own distributed sampler always shuffles the training set; an unshuffled
            # one gives each rank every other sample, so 2 x 8 rows are the single run's 16
            sampler = None
            if self.trainer is not None and self.trainer.world_size > 1:
                sampler = DistributedSampler(self.ds, shuffle=False)
            return DataLoader(self.ds, batch_size=self.batch_size, shuffle=False, sampler=sampler)

        train_dataloader = val_dataloader = test_dataloader = _dl
''')

CONFIG = textwrap.dedent('''
    seed_everything: 0
    trainer: {max_epochs: 2, accelerator: cpu, devices: 1, enable_progress_bar: false,
              enable_model_summary: false, log_every_n_steps: 1}
    model: {class_path: ddp_toy.ToyMoE}
    data: {class_path: ddp_toy.ToyData}
''')

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.use_distributed_sampler=false",
       "--expert_parallel=true", "--data.init_args.batch_size=8"]


DP_CONFIG = ROOT / "configs/diffusion_policy/moe.yaml"
DP_TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


LAUNCHED: list[subprocess.Popen] = []


def launch(args, cwd: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    LAUNCHED.append(proc)
    return proc


def finish(procs: dict, results: dict) -> None:
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out)


def here(args, results: dict, name: str) -> None:
    """One-process run through ``zoo.cli.main`` (one intra-op thread, as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([str(a) for a in args])
        results[name] = (rc, "" if rc == 0 else f"zoo.cli.main returned {rc}")
    except Exception:  # noqa: BLE001  reported by the test that needs this run
        results[name] = (1, traceback.format_exc())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, restore_torch_globals, free_ports):
    d = tmp_path_factory.mktemp("ddp")
    (d / "ddp_toy.py").write_text(TOY)
    (d / "toy.yaml").write_text(CONFIG)
    toy = ["--config", d / "toy.yaml"]
    results: dict[str, tuple[int, str]] = {}
    sys.path.insert(0, str(d))  # the one-process runs import ddp_toy as the subprocesses do (PYTHONPATH)
    try:
        # wave 1: three 2-rank fits side by side; the one-process fit in the meantime
        ports = free_ports(3)
        procs = {"ddp": launch(["fit", *toy, *DDP, "--run_dir", d / "ddp"], d, ports[0]),
                 "ddp_first_part": launch(["fit", *toy, *DDP, "--trainer.max_epochs=1", "--run_dir", d / "ddp_resumed"],
                                          d, ports[1]),
                 "dp": launch(["fit", "--config", DP_CONFIG, *DP_TINY, "--trainer.strategy=ddp", "--trainer.devices=2",
                               "--expert_parallel=true", "--run_dir", d / "dp"], d, ports[2])}
        here(["fit", *toy, "--run_dir", d / "single"], results, "single")
        finish(procs, results)
        ok = lambda name: results[name][0] == 0  # noqa: E731
        # wave 2: what reads the first wave's checkpoints
        ports = free_ports(2)
        procs = {}
        if ok("ddp"):
            procs["ddp_test"] = launch(["test", *toy, *DDP, "--run_dir", d / "ddp_test", "--ckpt_path",
                                        d / "ddp" / "checkpoints" / "last.ckpt"], d, ports[0])
        if ok("ddp_first_part"):
            procs["ddp_resume"] = launch(["fit", *toy, *DDP, "--run_dir", d / "ddp_resumed", "--ckpt_path", "last"],
                                         d, ports[1])
        if ok("ddp"):
            here(["test", *toy, "--run_dir", d / "ddp", "--ckpt_path", "last"], results, "ddp_test_one_process")
        if ok("dp"):
            here(["test", "--config", DP_CONFIG, "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
                  "--run_dir", d / "dp", "--ckpt_path", "last"], results, "dp_test_one_process")
        finish(procs, results)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("ddp_toy", None)
        for proc in LAUNCHED:  # after an error above: leave nothing running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return d, results


def output(runs, *names: str) -> str:
    """The named runs' output; each must have exited 0."""
    _, results = runs
    for name in names:
        assert name in results, f"{name} did not run: {[(k, v[0]) for k, v in results.items()]}"
        rc, out = results[name]
        assert rc == 0, f"{name} exited {rc}: {out[-3000:]}"
    return results[names[0]][1]


def state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def column(path: Path, key: str) -> list[float]:
    return [float(r[key]) for r in csv.DictReader(open(path)) if r.get(key)]


def test_ddp_expert_parallel_matches_one_process_and_checkpoints_travel(runs):
    workdir = runs[0]
    single, ddp = workdir / "single", workdir / "ddp"
    out = output(runs, "ddp", "single")
    assert "1 MoE layer(s) split over 2 ranks (4 expert tensors excluded" in out, out[-2000:]

    a, b = state(single), state(ddp)
    # the distributed file holds the whole model: all 4 experts, gathered from both ranks
    assert b["state_dict"]["model.moe.experts.w1"].shape == (4, 6, 16)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], atol=2e-5, rtol=1e-4, msg=k)
    # Adam's moments of the experts were gathered too (they are what a resumed run continues from)
    slots = b["zoo_expert_slots"][0]
    assert sorted(slots.values()) == sorted(f"model.moe.experts.{n}" for n in ("w1", "b1", "w2", "b2"))
    for idx, key in slots.items():
        m_a = a["optimizer_states"][0]["state"][idx]["exp_avg"]
        m_b = b["optimizer_states"][0]["state"][idx]["exp_avg"]
        assert m_b.shape == a["state_dict"][key].shape
        torch.testing.assert_close(m_b, m_a, atol=1e-5, rtol=1e-4, msg=key)
    # the validation curve (mean over both ranks' halves) is the single-process curve
    va, vb = column(single / "metrics.csv", "val/loss"), column(ddp / "metrics.csv", "val/loss")
    assert len(va) == len(vb) == 2 and va[-1] < va[0]
    assert vb == pytest.approx(va, rel=1e-4)

    # the distributed checkpoint in one process, and sliced back onto 2 ranks: same test loss
    output(runs, "ddp_test_one_process", "ddp_test")
    one = column(ddp / "test" / "metrics.csv", "test/loss")
    two = column(workdir / "ddp_test" / "test" / "metrics.csv", "test/loss")
    assert len(one) == len(two) == 1
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    assert one[0] == pytest.approx(va[-1], rel=1e-4)  # val and test read the same data here


def test_ddp_expert_parallel_resume_is_exact(runs):
    workdir = runs[0]
    straight, resumed = workdir / "ddp", workdir / "ddp_resumed"  # straight: the uninterrupted 2-epoch run above
    output(runs, "ddp", "ddp_first_part", "ddp_resume")
    a, b = state(straight), state(resumed)
    assert {r["epoch"] for r in csv.DictReader(open(resumed / "metrics.csv")) if r["epoch"]} == {"0", "1"}
    assert b["epoch"] == a["epoch"] and b["global_step"] == a["global_step"] == 12
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], atol=1e-6, rtol=1e-6, msg=k)


def test_a_task_trains_on_two_ranks_with_split_experts_and_its_checkpoint_tests_in_one(runs):
    """diffusion_policy: SwiGLU experts split over 2 ranks, EMA weights and expert caching; the
    checkpoint (experts and their EMA copy gathered) is tested in a single process."""
    run = runs[0] / "dp"
    out = output(runs, "dp", "dp_test_one_process")
    assert "MoE layer(s) split over 2 ranks" in out, out[-2000:]
    ckpt = state(run)
    experts = [k for k in ckpt["state_dict"] if k.endswith("ffn.experts.w1")]
    assert experts and all(ckpt["state_dict"][k].shape[0] == 4 for k in experts)
    assert all(ckpt["ema_state"][k.removeprefix("model.")].shape[0] == 4 for k in experts)
    metrics = {k: float(v) for row in csv.DictReader(open(run / "test" / "metrics.csv")) for k, v in row.items()
               if k.startswith("test/") and v}
    # the deployed sampler (expert cache built from the gathered experts) predicts actions
    assert 0 <= metrics["test/action_mse"] < 10 and 0 <= metrics["test/success_rate"] <= 1, metrics
