"""The LightningModule base every task module derives from.

It adds the MoE auxiliary loss to the task loss, logs routing statistics every epoch,
accumulates expert usage during testing (overall and per class/task/noise level) and saves
routing heatmaps as PNG into the run folder, counts test samples and step time for the
throughput column of ``zoo compare``, and saves RNG states in checkpoints so a resumed run
continues exactly where it stopped.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from zoo.moe import aux_loss, routed_layers
from zoo.moe import parallel


def _first_tensor(obj):
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


class ZooModule(L.LightningModule):
    """Shared base: set ``self.model`` to the network that holds the routed layers.

    Subclass contract (see DESIGN.md section 3):
      - ``training_step`` returns ``self.with_aux(task_loss)``;
      - test metrics are logged as ``test/<name>`` (``zoo compare`` collects every one);
      - ``record_routing(group_ids, group_names)`` after a test forward adds to the
        per-group expert-usage heatmap;
      - ``flops_inputs()`` gives the inputs of ``self.forward`` for one sample;
      - ``on_data(datamodule)`` may rebuild the model from data-decided shapes.
    Subclasses overriding the ``on_*`` hooks below must call ``super()``.
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    model: nn.Module | None
    #: set by the CLI from the config's top-level ``expert_parallel: true``: under a multi-process
    #: strategy (``--trainer.strategy ddp``) every MoE layer that can be split keeps E/W experts
    expert_parallel: bool = False

    def __init__(self):
        super().__init__()
        self.model = None
        self._reset_routing_acc("train")
        self._reset_routing_acc("test")
        self._group_usage: dict[str, torch.Tensor] = {}
        self._group_names: list[str] | None = None
        self.test_samples = 0
        self.test_step_time = 0.0

    # ------------------------------------------------------------------ losses
    def with_aux(self, task_loss: torch.Tensor, stage: str = "train") -> torch.Tensor:
        """``task_loss + zoo.moe.aux_loss(self.model)``, logging both parts."""
        aux = aux_loss(self.model) if self.model is not None else task_loss.new_zeros(())
        aux = aux.to(task_loss.device)
        self.log(f"{stage}/task_loss", task_loss.detach(), prog_bar=False)
        self.log(f"{stage}/aux_loss", aux.detach(), prog_bar=False)
        return task_loss + aux

    # ------------------------------------------------------------------ routing stats
    def _layers(self):
        return routed_layers(self.model) if self.model is not None else {}

    def _reset_routing_acc(self, stage: str):
        setattr(self, f"_{stage}_acc", {})

    def _accumulate(self, stage: str):
        acc = getattr(self, f"_{stage}_acc")
        for name, layer in self._layers().items():
            info = layer.last_routing
            if info is None:
                continue
            e = info.expert_index[info.kept & (info.expert_index < info.num_experts)]
            counts = torch.bincount(e.cpu(), minlength=info.num_experts).double()
            entry = acc.setdefault(name, {"counts": torch.zeros(info.num_experts, dtype=torch.float64),
                                          "assign": 0, "dropped": 0, "null": 0, "entropy": 0.0, "batches": 0})
            entry["counts"] += counts
            entry["assign"] += info.expert_index.numel()
            entry["dropped"] += info.dropped
            entry["null"] += int((info.expert_index >= info.num_experts).sum())
            if info.probs is not None:
                p = info.probs.float().clamp_min(1e-12)
                entry["entropy"] += float(-(p * p.log()).sum(-1).mean())
            entry["batches"] += 1

    def accumulate_routing(self, stage: str = "test") -> None:
        """Add every routed layer's last forward to the epoch totals (call after extra forwards,
        e.g. each denoising step; the base already does it once per train/test batch)."""
        self._accumulate(stage)

    def routing_summary(self, stage: str = "train") -> dict[str, dict]:
        """Per-layer load fractions, mean entropy, drop rate and null share accumulated so far."""
        out = {}
        for name, a in getattr(self, f"_{stage}_acc").items():
            load = a["counts"] / a["counts"].sum().clamp_min(1.0)
            out[name] = {"load": load.tolist(), "entropy": a["entropy"] / max(a["batches"], 1),
                         "drop_rate": a["dropped"] / max(a["assign"], 1),
                         "null_fraction": a["null"] / max(a["assign"], 1)}
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._accumulate("train")

    def on_train_epoch_start(self):
        self._reset_routing_acc("train")
        # Resuming: apply the saved RNG state only now, after the sanity-check validation (whose
        # dataloader iterator draws a seed) and right before this epoch's shuffling, so a resumed
        # run draws exactly what the uninterrupted run drew. On resume Lightning has already built
        # this epoch's train iterator (which drew its base seed); an uninterrupted run builds it
        # after this hook, so that one draw is replayed before the sampler draws its shuffle seed.
        state = getattr(self, "_pending_rng", None)
        if state is not None:
            self._pending_rng = None
            _set_rng_state(state)
            torch.empty((), dtype=torch.int64).random_()

    def _sync_routing_acc(self, stage: str) -> None:
        """Sum the routing totals over the ranks of a distributed run (every rank calls it)."""
        try:
            trainer = self.trainer
        except RuntimeError:
            return
        if trainer.world_size <= 1:
            return
        acc = getattr(self, f"_{stage}_acc")
        for name in sorted(acc):
            a = acc[name]
            packed = torch.cat([a["counts"], torch.tensor([a["assign"], a["dropped"], a["null"], a["entropy"],
                                                            a["batches"]], dtype=torch.float64)])
            packed = trainer.strategy.reduce(packed.to(self.device), reduce_op="sum").cpu()
            e = a["counts"].numel()
            a["counts"] = packed[:e]
            a["assign"], a["dropped"], a["null"] = (int(v) for v in packed[e:e + 3])
            a["entropy"], a["batches"] = float(packed[e + 3]), int(packed[e + 4])

    def on_train_epoch_end(self):
        self._sync_routing_acc("train")
        logs = {}
        for name, s in self.routing_summary("train").items():
            e = len(s["load"])
            logs[f"routing/{name}/entropy"] = s["entropy"]
            logs[f"routing/{name}/drop_rate"] = s["drop_rate"]
            logs[f"routing/{name}/null_fraction"] = s["null_fraction"]
            logs[f"routing/{name}/max_load_ratio"] = max(s["load"]) * e  # 1 = perfectly balanced
            for i, v in enumerate(s["load"]):
                logs[f"routing/{name}/load_e{i}"] = v
        if logs:
            self.log_dict(logs, sync_dist=True)  # already summed over ranks: the mean changes nothing

    # ------------------------------------------------------------------ test-time usage
    def record_routing(self, group_ids: torch.Tensor, group_names: list[str] | None = None):
        """Add the last forward's expert usage to per-group totals (class, task, noise level).

        ``group_ids`` [B] gives each sample's group; each routed layer's tokens are split evenly
        over the B samples (the layer saw ``B * tokens_per_sample`` tokens). Layers whose token
        count is not a multiple of B are skipped.
        """
        group_ids = torch.as_tensor(group_ids).reshape(-1).cpu().long()
        if group_names is not None:
            self._group_names = list(group_names)
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
        if self._group_names is not None:
            num_groups = max(num_groups, len(self._group_names))
        for name, layer in self._layers().items():
            info = layer.last_routing
            if info is None or group_ids.numel() == 0 or info.num_tokens % group_ids.numel():
                continue
            per_token_group = group_ids.repeat_interleave(info.num_tokens // group_ids.numel())
            usage = info.usage_per_token().cpu()[:, :info.num_experts]  # [N, E]
            usage = usage / usage.sum(-1, keepdim=True).clamp_min(1e-12)
            total = torch.zeros(num_groups, info.num_experts, dtype=torch.float64)
            total.index_add_(0, per_token_group, usage.double())
            prev = self._group_usage.get(name)
            if prev is not None and prev.shape[0] < num_groups:
                prev = torch.cat([prev, torch.zeros(num_groups - prev.shape[0], prev.shape[1], dtype=prev.dtype)])
            self._group_usage[name] = total if prev is None else prev + total

    def group_usage(self) -> dict[str, np.ndarray]:
        """{layer: [G, E]} share of each group's routing mass on each expert."""
        out = {}
        for name, u in self._group_usage.items():
            out[name] = (u / u.sum(-1, keepdim=True).clamp_min(1e-12)).numpy()
        return out

    def on_test_epoch_start(self):
        self._reset_routing_acc("test")
        self._group_usage, self._group_names = {}, None
        self.test_samples, self.test_step_time = 0, 0.0

    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self.test_samples += self.batch_size_of(batch)
        self._t0 = time.perf_counter()

    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_step_time += time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        self._accumulate("test")

    def on_test_epoch_end(self):
        self._sync_routing_acc("test")
        self.save_routing_plots()

    def save_routing_plots(self) -> list[Path]:
        """Write routing_load.png (layers x experts) and routing_by_group.png into run_dir."""
        from zoo import plots

        saved = []
        summary = self.routing_summary("test")
        if summary and self.trainer.is_global_zero:
            path = self.run_dir / "routing_load.png"
            plots.load_heatmap({k: v["load"] for k, v in summary.items()}, path,
                               title=f"{type(self).__name__}: expert load per layer (test)")
            saved.append(path)
            usage = self.group_usage()
            if usage:
                path = self.run_dir / "routing_by_group.png"
                plots.group_usage_heatmaps(usage, self._group_names, path,
                                           title=f"{type(self).__name__}: expert usage per group (test)")
                saved.append(path)
        return saved

    # ------------------------------------------------------------------ helpers for the harness
    @property
    def run_dir(self) -> Path:
        """The folder of this run (logs, checkpoints, PNGs); created on first use."""
        try:
            trainer = self.trainer
        except RuntimeError:
            trainer = None
        if trainer is None:
            path = Path("runs/unattached")
        else:
            # trainer.log_dir without its broadcast: that is a collective call, and this property
            # is also used by rank 0 alone (plots), which would leave the other ranks waiting
            logger = trainer.loggers[0] if trainer.loggers else None
            path = Path(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
                        or trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def batch_size_of(self, batch) -> int:
        t = _first_tensor(batch)
        return int(t.shape[0]) if t is not None and t.dim() else 1

    def flops_inputs(self) -> tuple:
        """Inputs of ``self.forward`` for one sample; default: ``example_input_array`` cut to 1."""
        example = getattr(self, "example_input_array", None)
        if example is None:
            raise TypeError(f"{type(self).__name__} must override flops_inputs() or set "
                            "example_input_array so FLOPs per sample can be measured")
        example = example if isinstance(example, tuple) else (example,)
        return tuple(e[:1] if torch.is_tensor(e) else e for e in example)

    def on_data(self, datamodule) -> None:
        """Called by the harness once the datamodule is built, before fit/test/flops."""

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch, batch_idx):
        """``zoo predict``: a dict of per-sample outputs (see ``zoo/predict.py``).

        All six tasks override this. For a new task module that does not, `zoo predict` stops
        with one line naming the class (the CLI turns ValueError into ``zoo: error:``, exit 2),
        instead of Lightning's default, which calls ``forward`` on a raw batch dict and fails
        deep inside the model."""
        raise ValueError(f"{type(self).__name__} defines no predict_step(batch, batch_idx) returning a dict "
                         "of per-sample outputs, so `zoo predict` has nothing to write for it")

    # ------------------------------------------------------------------ expert parallelism
    def configure_model(self) -> None:
        """Split the experts over the ranks once the process group exists (Lightning builds the
        model in every process before it creates the group, and calls this hook after)."""
        if not self.expert_parallel or self.model is None:
            return
        rank, size = parallel.world()
        if size == 1 or parallel.sharded_layers(self.model):
            return
        report = parallel.shard_experts(self.model, grad_scale=1.0 / size)
        names = parallel.ddp_ignore_expert_params(self)  # expert shards are not DDP replicas
        if not report and rank == 0:
            print("expert_parallel: this model has no zoo.moe.MoE layer to split; its experts stay "
                  "replicated (plain data parallelism)")
        elif rank == 0:
            kept = {k: v for k, v in report.items() if v != "sharded"}
            print(f"expert_parallel: {len(report) - len(kept)} MoE layer(s) split over {size} ranks "
                  f"({len(names)} expert tensors excluded from DDP's all-reduce)"
                  + "".join(f"; {k} stays replicated: {v}" for k, v in kept.items()))

    # ------------------------------------------------------------------ manual optimisation
    def local_backward(self, loss: torch.Tensor) -> None:
        """``manual_backward`` with DDP's gradient reducer switched off.

        DDP's reducer expects one backward pass per forward, reaching every parameter. Manual
        training steps with several backward passes, each through a different part of the
        model, break that: AdvMoE's expert step and router step, M3ViT's one task at a time,
        SAC's critic, actor and temperature. Such steps call this, then :meth:`sync_gradients`
        (or do both with :meth:`manual_step`). In a single process it is ``manual_backward``."""
        if self._trainer is not None and self.trainer.world_size > 1:
            with self.trainer.strategy.block_backward_sync():
                self.manual_backward(loss)
        else:
            self.manual_backward(loss)

    def sync_gradients(self, optimizer) -> None:
        """Average the gradients of ``optimizer``'s parameters over the ranks in one all-reduce.

        A parameter without a gradient on some rank counts as zero there, as in DDP. It keeps
        ``grad=None`` only when no rank has a gradient for it, so frozen parts stay untouched
        by the step. Expert shards of expert parallelism are skipped: they are not replicas,
        and their gradient already carries the 1/W factor. Buffers (BatchNorm statistics) are
        then set to rank 0's, which is what DDP does before every forward and what the
        checkpoint, written by rank 0, holds."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return
        for buf in self.buffers():
            torch.distributed.broadcast(buf, src=0)
        shard_names = set(parallel.expert_param_names(self))
        shards = {id(p) for n, p in self.named_parameters() if n in shard_names}
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in shards]
        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        torch.distributed.all_reduce(present)
        flat /= self.trainer.world_size
        for p, g, n in zip(params, flat.split([q.numel() for q in params]), present.tolist()):
            p.grad = g.view_as(p).clone() if n > 0 else None

    def manual_step(self, loss: torch.Tensor, optimizer, max_grad_norm: float | None = None) -> None:
        """One manual optimiser step that is also correct under DDP: ``zero_grad``,
        :meth:`local_backward`, :meth:`sync_gradients`, optional grad-norm clip, ``step``."""
        optimizer.zero_grad()
        self.local_backward(loss)
        self.sync_gradients(optimizer)
        if max_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()

    def all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, ...] of every rank concatenated along dim 0 (``x`` itself in one process),
        for statistics that must agree over the ranks (e.g. running normalisers)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1:
            return x
        out = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.cat(out)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint):
        checkpoint["zoo_rng"] = _get_rng_state()
        checkpoint["zoo_model_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # sharded experts are gathered (collectively) so the file holds the whole model
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        parallel.gather_expert_checkpoint(self, checkpoint, optimizers)

    def on_load_checkpoint(self, checkpoint):
        self._pending_rng = checkpoint.get("zoo_rng")
        parallel.slice_expert_checkpoint(self, checkpoint)


def _get_rng_state() -> dict:
    """RNG states as tensors, lists and strings, so checkpoints load with weights_only=True."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [int(v) for v in np_state[1]] + [int(np_state[2])],
            "python": repr(random.getstate())}


def _set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(np_state[:-1], dtype=np.uint32), int(np_state[-1])))
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
