"""Parameter and FLOP counts: total vs active parameters, FLOPs per sample.

FLOPs are measured with ``torch.utils.flop_counter.FlopCounterMode`` on the module's real
inference forward, so an MoE is charged only for the experts it actually runs (dispatch
computes just the routed slices) and null experts or skipped channel groups cost nothing.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zoo.moe import RoutedModule


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active-per-sample) parameters; routed layers report what a sample leaves unused."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(m.inactive_param_count() for m in model.modules() if isinstance(m, RoutedModule))
    return total, total - inactive


@torch.no_grad()
def forward_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)``."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def module_flops_per_sample(module) -> int:
    """FLOPs of ``module.forward(*module.flops_inputs())`` in eval mode (one sample)."""
    was_training = module.training
    module.eval()
    try:
        return forward_flops(module, *module.flops_inputs())
    finally:
        module.train(was_training)


@torch.no_grad()
def time_forward(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn(*args)``."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def describe(module) -> dict:
    """Total params, active params and FLOPs/sample of a ZooModule's model."""
    net = module.model if getattr(module, "model", None) is not None else module
    total, active = param_counts(net)
    return {"total_params": total, "active_params": active, "flops_per_sample": module_flops_per_sample(module)}
