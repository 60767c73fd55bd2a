"""Metrics of the MoDE task: closed-loop success / return, held-out action MSE, inference cost.

- ``evaluate_policy``: N episodes per task with fixed reset seeds, all episodes of a task
  stepped in lockstep so one batched policy call plans every live episode's next chunk
  (receding horizon: ``execute_steps`` actions of each chunk are executed, then re-plan).
  Success is the env's ``info["is_success"]`` (built-in env and gym-pusht both set it).
- ``ActionMSE``: mean squared error of sampled action chunks against held-out demos, in
  the demos' original (unnormalised) units.
- ``count_flops``: FLOPs of one call measured with ``torch.utils.flop_counter``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torchmetrics import Metric

from zoo.flops import time_forward

# (obs [B, To, O] or {key: [B, To, ...]}, task [B]) -> actions [B, H, A]
Policy = Callable[[np.ndarray | dict, np.ndarray], np.ndarray]


def _small(frame: np.ndarray, size: int = 128) -> np.ndarray:
    """Stride-downsample a rendered frame to at most ~``size`` pixels a side (memory)."""
    step = max(1, int(np.ceil(frame.shape[0] / size)))
    return frame[::step, ::step]


def evaluate_policy(policy: Policy, make_env: Callable[[int], object], tasks: list[int],
                    episodes: int = 20, n_obs_steps: int = 2, execute_steps: int = 10,
                    seed: int = 10_000, record: int = 0) -> dict:
    """Closed-loop evaluation; returns ``{"success": {task: rate}, "return": {task: mean},
    "frames": {task: [episode frames ...]}}`` (frames for the first ``record`` episodes)."""
    out = {"success": {}, "return": {}, "length": {}, "frames": {}}
    for task in tasks:
        envs = [make_env(task) for _ in range(episodes)]
        obs = [env.reset(seed=seed + 1000 * task + i, options={"task": task})[0] for i, env in enumerate(envs)]
        hist = [[o] * n_obs_steps for o in obs]
        done = np.zeros(episodes, bool)
        success = np.zeros(episodes, bool)
        ret = np.zeros(episodes)
        length = np.zeros(episodes, int)
        frames = [[_small(env.render())] for env in envs[:record]]
        while not done.all():
            live = np.flatnonzero(~done)
            obs_b = stack_history([hist[i][-n_obs_steps:] for i in live])
            chunk = policy(obs_b, np.full(len(live), task, np.int64))  # [B, H, A]
            for j, i in enumerate(live):
                for a in chunk[j, :execute_steps]:
                    o, r, term, trunc, info = envs[i].step(a)
                    hist[i].append(o)
                    ret[i] += r
                    length[i] += 1
                    if i < record:
                        frames[i].append(_small(envs[i].render()))
                    if term or trunc:
                        done[i], success[i] = True, bool(info.get("is_success", False))
                        break
        out["success"][task] = float(success.mean())
        out["return"][task] = float(ret.mean())
        out["length"][task] = float(length.mean())
        out["frames"][task] = frames
        for env in envs:
            env.close()
    return out


def stack_history(histories: list[list]) -> np.ndarray | dict:
    """Observation histories of B episodes -> [B, To, ...] (dict observations: one array per key)."""
    if isinstance(histories[0][0], dict):
        return {k: np.stack([np.stack([o[k] for o in h]) for h in histories]) for k in histories[0][0]}
    return np.stack([np.stack(h) for h in histories]).astype(np.float32)


class ActionMSE(Metric):
    """Mean squared error between predicted and demonstrated action chunks (all elements)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor):
        if pred.shape != target.shape:
            raise ValueError(f"ActionMSE: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        self.sse += (pred.double() - target.double()).pow(2).sum()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.sse / self.count.clamp_min(1)).float()


def count_flops(fn: Callable, *args) -> int:
    """Total FLOPs of ``fn(*args)`` counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def time_ms(fn: Callable, *args, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds (``zoo.flops.time_forward``)."""
    return time_forward(fn, *args, repeats=repeats, warmup=warmup) * 1e3
