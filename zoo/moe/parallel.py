"""Expert parallelism for whole models: split every MoE layer's experts over the ranks, keep
them out of DDP's all-reduce, and keep checkpoints whole.

The token exchange itself (dropless all-to-all, DeepSpeed-MoE / tutel / megablocks style) is
:mod:`zoo.moe.alltoall`, which the layer calls; this module sits above :class:`~zoo.moe.layer.MoE`.
Expert weights are not replicas: exclude them from DDP's gradient all-reduce with
:func:`ddp_ignore_expert_params`.

Under Lightning the model is built before the process group exists, so
:func:`shard_experts` splits a built model later (``ZooModule.configure_model``, turned on by
the config's top-level ``expert_parallel: true``), and :func:`gather_expert_checkpoint` /
:func:`slice_expert_checkpoint` keep checkpoints whole: a file written by a W-rank run holds
every expert and loads in one process, and the reverse.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .alltoall import expert_parallel_dispatch, world
from .layer import MoE

__all__ = ["world", "expert_parallel_dispatch", "expert_param_names", "ddp_ignore_expert_params",
           "sharded_layers", "shard_experts", "gather_expert_state", "slice_expert_state",
           "gather_expert_checkpoint", "slice_expert_checkpoint", "gather_experts"]


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert weights sharded by expert parallelism (not replicas across ranks)."""
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, MoE) and m.expert_parallel:
            prefix = f"{mod_name}." if mod_name else ""
            names += [f"{prefix}experts.{p}" for p, _ in m.experts.named_parameters()]
    return names


def ddp_ignore_expert_params(model: nn.Module) -> list[str]:
    """Tell DDP (call before wrapping) not to all-reduce the sharded expert weights."""
    from torch.nn.parallel import DistributedDataParallel

    names = expert_param_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


# ---------------------------------------------------------------------- whole models
def sharded_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: MoE} for every layer of ``model`` currently split over ranks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE) and m.expert_parallel}


def shard_experts(model: nn.Module, group=None, grad_scale: float | None = None) -> dict[str, str]:
    """Split every MoE layer of ``model`` that can be split over the ranks of ``group``.

    For use after the process group exists (Lightning builds the model first). Layers that
    cannot be split (capacity dropping, soft or expert-choice routing, E not divisible by W)
    stay replicated. ``grad_scale`` multiplies the sharded experts' gradients: under DDP the
    replicated weights get the *mean* of the ranks' gradients, while an expert receives the
    *sum* over every rank's tokens through the all-to-all, so DDP training passes ``1/W`` to
    make one step equal a single-process step on the global batch.
    Returns {layer: "sharded" | reason it stayed replicated}.
    """
    _, size = world(group)
    report = {}
    if size == 1:
        return report
    for name, m in model.named_modules():
        if not isinstance(m, MoE) or m.expert_parallel:
            continue
        why = m.shardable(size)
        if why:
            report[name] = why
            continue
        m.shard_experts(group)
        if grad_scale is not None and grad_scale != 1.0:
            for p in m.experts.parameters():
                p.register_hook(lambda g, s=grad_scale: g * s)
        report[name] = "sharded"
    return report


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on all ranks) along dim 0, in rank order."""
    _, size = world(group)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts)


def _expert_params(module: nn.Module, sharded_only: bool = True) -> dict[int, tuple[str, nn.Module, nn.Parameter]]:
    """id(param) -> (state_dict key, layer, param) for the (sharded) expert weights."""
    out = {}
    for name, m in module.named_modules():
        if not isinstance(m, MoE) or (sharded_only and not m.expert_parallel):
            continue
        prefix = f"{name}." if name else ""
        for pname, p in m.experts.named_parameters():
            out[id(p)] = (f"{prefix}experts.{pname}", m, p)
    return out


def _optimizer_slots(optimizer, expert: dict) -> list[tuple[int, nn.Parameter]]:
    """(index in the optimizer's state_dict, param) of the expert weights it trains."""
    slots, idx = [], 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in expert:
                slots.append((idx, p))
            idx += 1
    return slots


def gather_expert_state(model: nn.Module, state: dict) -> list[str]:
    """Gather (collectively) the sharded expert entries of a state dict keyed like ``model``'s
    own (e.g. an EMA copy of the weights a task keeps in its checkpoint). In place."""
    keys = []
    for key, m, p in _expert_params(model).values():
        t = state.get(key)
        if torch.is_tensor(t) and t.shape == p.shape:
            state[key] = _gather_rows(t, m.ep_group)
            keys.append(key)
    return keys


def _cut(t, m, p):
    """This rank's rows of a full expert tensor ``t`` (anything else comes back unchanged)."""
    full = (m.num_experts, *p.shape[1:])
    if not torch.is_tensor(t) or tuple(t.shape) != full or full == tuple(p.shape):
        return t
    lo = m.ep_rank * p.shape[0]
    return t[lo:lo + p.shape[0]].clone()


def slice_expert_state(model: nn.Module, state: dict) -> list[str]:
    """Cut the full expert entries of a state dict keyed like ``model``'s down to this rank's
    shard (the reverse of :func:`gather_expert_state`). In place."""
    keys = []
    for key, m, p in _expert_params(model).values():
        t = state.get(key)
        new = _cut(t, m, p)
        if new is not t:
            state[key] = new
            keys.append(key)
    return keys


def gather_expert_checkpoint(module: nn.Module, checkpoint: dict, optimizers=()) -> list[str]:
    """Replace this rank's expert shards in a Lightning ``checkpoint`` by the full expert set.

    Collective: every rank must call it (Lightning's ``on_save_checkpoint`` runs on all ranks;
    only rank 0 writes). Model weights and the optimiser's per-parameter state tensors (Adam's
    moments) are gathered, so the file loads in a single process, and in a W-rank run through
    :func:`slice_expert_checkpoint`. Also records which optimiser state slot belongs to which
    expert weight (``checkpoint["zoo_expert_slots"]``, written by single processes too), so a
    later sharded run can cut the optimiser state before its optimisers exist. Returns the
    gathered keys.
    """
    every = _expert_params(module, sharded_only=False)
    checkpoint["zoo_expert_slots"] = [{idx: every[id(p)][0] for idx, p in _optimizer_slots(opt, every)}
                                      for opt in optimizers]
    expert = _expert_params(module)
    if not expert:
        return []
    keys = gather_expert_state(module, checkpoint.get("state_dict", {}))
    for opt_state, opt in zip(checkpoint.get("optimizer_states", []), optimizers):
        for idx, p in _optimizer_slots(opt, expert):
            per_param = opt_state["state"].get(idx)
            if per_param is None:
                continue
            group = expert[id(p)][1].ep_group
            # a new dict: optimizer.state_dict() hands out the live per-parameter state
            opt_state["state"][idx] = {k: _gather_rows(v, group) if torch.is_tensor(v) and v.shape == p.shape else v
                                       for k, v in per_param.items()}
    return keys


def slice_expert_checkpoint(module: nn.Module, checkpoint: dict) -> list[str]:
    """Cut the full expert tensors of ``checkpoint`` down to this rank's shard (in place).

    The reverse of :func:`gather_expert_checkpoint`, for loading into a sharded model: the
    model weights by key, the optimiser state through ``checkpoint["zoo_expert_slots"]``.
    Tensors that already have the shard's shape are left alone. Returns the sliced keys.
    """
    expert = {key: (m, p) for key, m, p in _expert_params(module).values()}
    if not expert:
        return []

    keys = slice_expert_state(module, checkpoint.get("state_dict", {}))
    slots = checkpoint.get("zoo_expert_slots") or []
    for opt_state, slot_keys in zip(checkpoint.get("optimizer_states", []), slots):
        for idx, key in slot_keys.items():
            per_param = opt_state.get("state", {}).get(idx)
            if per_param is not None and key in expert:
                opt_state["state"][idx] = {k: _cut(v, *expert[key]) for k, v in per_param.items()}
    return keys


def gather_experts(moe: nn.Module) -> nn.Module:
    """A detached copy of ``moe.experts`` holding all E experts (collective under expert
    parallelism: every rank must call it, e.g. to fuse chosen experts for inference caching)."""
    import copy

    experts = moe.experts
    if not getattr(moe, "expert_parallel", False):
        return experts
    full = copy.deepcopy(experts)
    with torch.no_grad():
        for name, p in experts.named_parameters(recurse=False):
            setattr(full, name, nn.Parameter(_gather_rows(p, moe.ep_group), requires_grad=False))
    full.num_experts = moe.num_experts
    return full
