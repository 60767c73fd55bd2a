"""Per-task speed: each task's default MoE config against its dense twin, train step and inference.

    python benchmarks/task_speed.py [--out FILE.csv] [--tasks vad,stock,...] [--repeats N]
                                    [--warmup N] [--threads N]

For every task the two configs are built exactly as ``zoo fit`` builds them (the data hook
included) and both models see real batches from the task's datamodule:

- train step: one ``training_step`` as Lightning runs it (forward, loss with the aux losses,
  backward and optimizer step; manual optimisation where the module does its own), timed
  from Lightning's ``on_train_batch_start`` to ``on_train_batch_end``, so loading the batch is
  not counted. The two models train in one process, each inside its own ``Trainer.fit`` on its
  own thread, and take turns step by step (only one of them runs at any moment), so a
  neighbour's load falls on both alike.
- inference: the task's predict path on one batch of its predict split (vad: the scores of one
  video; diffusion_policy: a DDIM action chunk with MoDE's expert caching; RL: ``act`` on a
  batch of observations from the replay buffer), alternating MoE and dense, under
  ``torch.inference_mode``.

Medians over ``--repeats`` after ``--warmup`` untimed steps. ``active_flops_ratio`` is the MoE's
FLOPs per sample over the dense twin's (``zoo flops``). Writes the CSV (``--out``) and prints the
same as a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLUMNS = ["task", "moe_config", "dense_config", "active_flops_ratio", "train_ratio", "infer_ratio",
           "train_ms_moe", "train_ms_dense", "infer_ms_moe", "infer_ms_dense"]


@dataclass
class Task:
    moe: str
    dense: str
    #: overrides for both configs: a training phase in which the experts train
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    #: consecutive train steps timed as one sample (their mean), where the step's work repeats
    #: with a period (SAC updates the actor every ``policy_frequency`` = 2 steps)
    period: int = 1


TASKS = {
    # the staged recipe trains the experts only from epoch 16 on; joint = every part in each step
    "vad": Task("configs/vad/moe.yaml", "configs/vad/dense.yaml", ["--model.init_args.joint=true"],
                "joint stage (experts, gate and encoder train together)"),
    "stock": Task("configs/stock/moe.yaml", "configs/stock/dense.yaml"),
    "diffusion_policy": Task("configs/diffusion_policy/moe.yaml", "configs/diffusion_policy/dense.yaml"),
    "multitask_vit": Task("configs/multitask_vit/moe.yaml", "configs/multitask_vit/dense.yaml"),
    "robust_cnn": Task("configs/robust_cnn/moe.yaml", "configs/robust_cnn/dense.yaml"),
    # gradient updates from the first step on (the config waits 500 env steps)
    "rl": Task("configs/rl/pmoe_sac.yaml", "configs/rl/sac.yaml", ["--model.init_args.learning_starts=1"],
               "SAC updates from the first env step; a train sample is 2 steps (one actor update)", period=2),
}


class Turns:
    """Two threads that take turns: ``wait(i)`` blocks until it is i's turn (or the other is done)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.turn, self.done = 0, [False, False]

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i or self.done[1 - i])

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self.cond:
            self.done[i] = self.done[i] or finished
            self.turn = 1 - i
            self.cond.notify_all()


def _step_timer(turns: Turns, i: int, warmup: int, repeats: int, period: int = 1):
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Times every training batch. A model runs only while it holds the turn: from the start
        of its fit (setup hooks) to the end of its first batch, then from the other's batch end
        to its own next one, so nothing of one model (data loading, epoch hooks) overlaps the
        other's timed step."""

        def __init__(self):
            self.times: list[float] = []
            self.seen = 0
            self.t0 = self.block = 0.0

        def on_fit_start(self, trainer, pl_module):
            turns.wait(i)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.block += time.perf_counter() - self.t0
            self.seen += 1
            if self.seen % period == 0:
                if self.seen > warmup * period:
                    self.times.append(self.block / period)
                self.block = 0.0
            enough = len(self.times) >= repeats
            if enough:
                trainer.should_stop = True
            turns.pass_on(i, finished=enough)
            if not enough:
                turns.wait(i)

        def on_fit_end(self, trainer, pl_module):
            turns.pass_on(i, finished=True)

    return StepTimer()


def build(config: str, overrides: list[str], run_dir: Path):
    """(module, datamodule, the config's trainer) as ``zoo fit`` builds them."""
    from zoo.lightning_cli import instantiate

    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    return instantiate(ROOT / config, [*quiet, *overrides], run_dir=run_dir)


def time_train(modules, datamodules, trainers, warmup: int, repeats: int, period: int = 1,
               root_dirs=(None, None)) -> list[list[float]]:
    """Per-step seconds of the two modules (means over ``period`` consecutive steps), trained in
    turns on two threads; whatever a module writes (RL's learning curve) goes under ``root_dirs``."""
    import lightning as L

    turns = Turns()
    timers = [_step_timer(turns, i, warmup, repeats, period) for i in range(2)]
    errors: list[BaseException] = []

    def fit(i: int) -> None:
        cfg = trainers[i]
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=max(int(cfg.max_epochs or 1), 1000),
            limit_train_batches=cfg.limit_train_batches, limit_val_batches=0, num_sanity_val_steps=0,
            gradient_clip_val=cfg.gradient_clip_val, gradient_clip_algorithm=cfg.gradient_clip_algorithm,
            accumulate_grad_batches=cfg.accumulate_grad_batches, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[timers[i]],
            default_root_dir=root_dirs[i] or cfg.default_root_dir)
        try:
            trainer.fit(modules[i], datamodule=datamodules[i])
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            turns.pass_on(i, finished=True)

    threads = [threading.Thread(target=fit, args=(i,), name=f"fit-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for timer, m in zip(timers, modules):
        if not timer.times:
            raise RuntimeError(f"{type(m).__name__}: the training ran out of batches before any timed step")
    return [t.times for t in timers]


def _first_batch(loader):
    return next(iter(loader))


def inference_fn(task: str, module, datamodule):
    """A no-argument callable running the task's inference once on one real batch."""
    module.eval()
    if task == "rl":
        obs = module.buffer.sample(module.hparams.batch_size, device=module.device)["obs"]
        return lambda: module.model.act(obs, deterministic=True)
    datamodule.setup("predict")
    loader = datamodule.predict_dataloader() if task != "multitask_vit" else datamodule.test_dataloader()
    batch = _first_batch(loader)
    return lambda: module.predict_step(batch, 0)


def time_infer(fns, warmup: int, repeats: int) -> list[list[float]]:
    times = [[], []]
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                fns[i]()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[i].append(dt)
    return times


def measure(task: str, warmup: int, repeats: int) -> dict:
    from zoo.flops import describe

    spec = TASKS[task]
    with tempfile.TemporaryDirectory() as tmp:
        built = [build(c, spec.overrides, Path(tmp) / name) for name, c in (("moe", spec.moe), ("dense", spec.dense))]
        modules, datamodules, trainers = map(list, zip(*built))
        flops = [describe(m)["flops_per_sample"] for m in modules]
        train = time_train(modules, datamodules, trainers, warmup, repeats, spec.period,
                           root_dirs=[str(Path(tmp) / name) for name in ("moe", "dense")])
        fns = [inference_fn(task, m, d) for m, d in zip(modules, datamodules)]
        # on a fresh thread of its own, as each fit ran: timed on this (main) thread after the fits,
        # multi-threaded inference measured up to 100x slower (vad: 180 ms against 1.5 ms)
        infer = []
        worker = threading.Thread(target=lambda: infer.extend(time_infer(fns, warmup, repeats)), name="infer")
        worker.start()
        worker.join()
        if not infer:
            raise RuntimeError(f"{task}: the inference timing failed (see the traceback above)")
    med = [[statistics.median(t) * 1e3 for t in pair] for pair in (train, infer)]
    return {"task": task, "moe_config": spec.moe, "dense_config": spec.dense,
            "active_flops_ratio": flops[0] / flops[1] if flops[1] else math.nan,
            "train_ratio": med[0][0] / med[0][1], "infer_ratio": med[1][0] / med[1][1],
            "train_ms_moe": med[0][0], "train_ms_dense": med[0][1],
            "infer_ms_moe": med[1][0], "infer_ms_dense": med[1][1]}


def markdown(rows: list[dict]) -> str:
    head = ["task", "MoE config", "dense config", "active FLOPs MoE/dense", "train MoE/dense",
            "inference MoE/dense", "train ms MoE", "train ms dense", "infer ms MoE", "infer ms dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], f"`{r['moe_config']}`", f"`{r['dense_config']}`", f"{r['active_flops_ratio']:.2f}",
                 f"{r['train_ratio']:.2f}", f"{r['infer_ratio']:.2f}"]
        cells += [f"{r[c]:.2f}" for c in COLUMNS[6:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/task_speed.csv"))
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    ap.add_argument("--repeats", type=int, default=25, help="timed train steps and inference calls per model")
    ap.add_argument("--warmup", type=int, default=5, help="untimed train steps and inference calls first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        ap.error(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as the zoo command does
    import lightning  # noqa: F401  (it sets its loggers' level on import; quieten them after)

    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available", seeds, tips
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        rows.append(measure(task, args.warmup, args.repeats))
        r = rows[-1]
        print(f"{task}: train {r['train_ratio']:.2f}x, inference {r['infer_ratio']:.2f}x "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"# MoE vs dense twin per task ({torch.get_num_threads()} threads, medians of {args.repeats})\n")
    print(markdown(rows))
    notes = [f"- {t}: {TASKS[t].note}" for t in tasks if TASKS[t].note]
    if notes:
        print("\n" + "\n".join(notes))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
