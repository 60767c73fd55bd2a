"""LightningModule of M3ViT multi-task dense prediction (training, evaluation, plots).

Losses follow the M3ViT / ATRC multi-task codebases: semseg cross-entropy (ignore 255), depth L1
on valid pixels, normals L1 between unit vectors on valid pixels, edge balanced binary
cross-entropy (positive weight 0.95), summed with per-task weights; plus the MoE gate loss
(cv^2 importance + load, x0.01, summed over the task passes) through ``with_aux``.

Two training schemes (M3ViT ``train_vanilla_distributed``):
  - ``train_mode="all"``: one forward over all tasks, one backward of the summed loss;
  - ``train_mode="one_by_one"``: for each task a single-task forward and its own backward
    (gradients accumulate), then one optimiser step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoo.moe import aux_loss
from zoo.module import ZooModule

from .data import IGNORE
from .metrics import TASK_METRIC, build_task_metric, delta_m
from .model import M3ViT

DEFAULT_LOSS_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normals": 1.0, "edge": 10.0}


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor, edge_pos_weight: float = 0.95) -> torch.Tensor:
    """Per-task training loss on predictions from :class:`M3ViT` and targets from the data."""
    if task == "semseg":
        return F.cross_entropy(pred, target, ignore_index=IGNORE)  # pred [B,C,H,W], target [B,H,W]
    if task == "depth":
        valid = target > 0  # [B, 1, H, W]
        return (pred - target).abs()[valid].mean() if valid.any() else pred.sum() * 0
    if task == "normals":
        valid = (target.norm(dim=1, keepdim=True) > 1e-6).expand_as(target)  # [B, 3, H, W]
        return (pred - target).abs()[valid].mean() if valid.any() else pred.sum() * 0
    if task == "edge":  # balanced BCE (Maninis 2019): w on positives, 1 - w on negatives
        valid = target != IGNORE
        y = (target == 1).float()
        w = torch.where(y > 0, edge_pos_weight, 1 - edge_pos_weight) * valid
        return F.binary_cross_entropy_with_logits(pred, y, weight=w, reduction="sum") / valid.sum().clamp_min(1)
    raise ValueError(f"unknown task {task!r}")


def pathway_flops(model: M3ViT, image: torch.Tensor) -> dict[str, int]:
    """FLOPs (torch.utils.flop_counter) of the all-task forward and of each single-task pathway.

    Returns {"all": F_all, "<task>": F_task, ...} for ``image`` [B, 3, H, W] (use B = 1)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for key, task in [("all", None)] + [(t, t) for t in model.tasks]:
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                model(image, task=task)
            out[key] = int(fc.get_total_flops())
    finally:
        model.train(was_training)
    return out


class MultiTaskViTModule(ZooModule):
    """M3ViT (``moe=True``) or its dense multi-/single-task baseline (``moe=False``).

    Args:
        tasks: tasks to train (None = every task the data provides). One task = single-task model.
        num_classes: semseg classes (None = from the data).
        img_size: must match the data's ``img_size``.
        patch_size, dim, depth, num_heads, mlp_ratio, moe, num_experts, k, routing, task_dim,
        noise_std, balance_weight, decoder_channels: see :class:`tasks.multitask_vit.model.M3ViT`.
        train_mode: "all" (summed loss, one backward) or "one_by_one" (a backward per task).
        loss_weights: per-task loss weights (missing tasks use the defaults above).
        edge_pos_weight: positive-class weight of the balanced edge BCE.
        lr, weight_decay, warmup_epochs: AdamW with linear warm-up then cosine decay per epoch.
        depth_init, depth_scale: depth = depth_init + depth_scale * head output (None = mean/std
            of the training depths).
        single_task_reference: {metric name: single-task value} (e.g. {"depth_rmse": 0.52}); when
            it covers every task's metric, ``test/delta_m`` is logged.
        num_plot_images: test images drawn in predictions.png.
    """

    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, tasks: list[str] | None = None, num_classes: int | None = None,
                 img_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, moe: bool = True, num_experts: int = 8,
                 k: int = 2, routing: str = "multigate", task_dim: int = 16,
                 noise_std: float | None = None, balance_weight: float = 0.01,
                 decoder_channels: int = 16, train_mode: str = "all",
                 loss_weights: dict[str, float] | None = None, edge_pos_weight: float = 0.95,
                 lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: int = 1,
                 depth_init: float | None = None, depth_scale: float | None = None,
                 single_task_reference: dict[str, float] | None = None,
                 num_plot_images: int = 4):
        super().__init__()
        if train_mode not in ("all", "one_by_one"):
            raise ValueError(f"train_mode={train_mode!r}; choose 'all' or 'one_by_one'")
        self.save_hyperparameters()
        self.automatic_optimization = train_mode == "all"
        self._adapted = False
        self._build()

    # ------------------------------------------------------------------ model
    def _build(self):
        hp = self.hparams
        tasks = tuple(hp.tasks) if hp.tasks is not None else ("semseg", "depth", "normals", "edge")
        self.model = M3ViT(
            tasks=tasks, num_classes=hp.num_classes or 5, img_size=hp.img_size, patch_size=hp.patch_size,
            dim=hp.dim, depth=hp.depth, num_heads=hp.num_heads, mlp_ratio=hp.mlp_ratio, moe=hp.moe,
            num_experts=hp.num_experts, k=hp.k, routing=hp.routing, task_dim=hp.task_dim,
            noise_std=hp.noise_std, balance_weight=hp.balance_weight,
            decoder_channels=hp.decoder_channels, depth_init=hp.depth_init or 0.0,
            depth_scale=hp.depth_scale or 1.0)
        self.tasks = self.model.tasks
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(hp.loss_weights or {})}
        self.metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({t: build_task_metric(t, hp.num_classes or 5) for t in self.tasks})
            for stage in ("val", "test")})

    def on_data(self, datamodule) -> None:
        """Take tasks, num_classes and the mean depth from the data, then rebuild the model."""
        hp = self.hparams
        data_tasks = tuple(getattr(datamodule, "tasks", ()))
        if hp.tasks is None:
            hp.tasks = list(data_tasks)
        missing = [t for t in hp.tasks if t not in data_tasks]
        if missing:
            raise ValueError(f"model.tasks {list(hp.tasks)} include {missing}, which the data does not "
                             f"provide (data tasks: {list(data_tasks)})")
        if getattr(datamodule, "img_size", hp.img_size) != hp.img_size:
            raise ValueError(f"model.img_size={hp.img_size} but data.img_size={datamodule.img_size}")
        datamodule.setup("fit")
        if "semseg" in hp.tasks:
            if hp.num_classes is None:
                hp.num_classes = datamodule.num_classes
            elif datamodule.num_classes is not None and datamodule.num_classes > hp.num_classes:
                raise ValueError(f"model.num_classes={hp.num_classes} but the data has "
                                 f"{datamodule.num_classes} classes")
        if "depth" in hp.tasks and (hp.depth_init is None or hp.depth_scale is None):
            d = datamodule.splits["train"].tensors["depth"]
            d = d[d > 0]
            if d.numel() < 2:
                raise ValueError("depth task: the training split has fewer than 2 valid (> 0) depth pixels")
            hp.depth_init = float(d.mean()) if hp.depth_init is None else hp.depth_init
            hp.depth_scale = float(d.std()) if hp.depth_scale is None else hp.depth_scale
        if (tuple(hp.tasks), hp.num_classes or 5, hp.depth_init or 0.0, hp.depth_scale or 1.0) != (
                self.tasks, self.model.num_classes, self.model.depth_init, self.model.depth_scale):
            self._build()  # shapes decided by the data; a reloaded checkpoint already matches
        self._adapted = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and not self._adapted:
            self.on_data(dm)

    def forward(self, image: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
        return self.model(image, task=task)

    def flops_inputs(self) -> tuple:
        return (torch.zeros(1, 3, self.hparams.img_size, self.hparams.img_size, device=self.device),)

    # ------------------------------------------------------------------ training
    def _losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {t: task_loss(t, out[t], batch[t], self.hparams.edge_pos_weight) for t in out}

    def _weighted(self, losses: dict) -> torch.Tensor:
        return sum(self.loss_weights[t] * v for t, v in losses.items())

    def training_step(self, batch, batch_idx):
        bs = batch["image"].shape[0]
        if self.automatic_optimization:
            losses = self._losses(self.model(batch["image"]), batch)
            for t, v in losses.items():
                self.log(f"train/loss_{t}", v.detach(), batch_size=bs)
            return self.with_aux(self._weighted(losses))
        opt = self.optimizers()
        opt.zero_grad()
        # one backward per task: DDP's reducer (one backward per forward) is bypassed and the
        # accumulated gradients are averaged over the ranks once, before the step
        losses, aux_total = self.one_by_one_backward(batch, self.local_backward)
        self.sync_gradients(opt)
        opt.step()
        for t, v in losses.items():
            self.log(f"train/loss_{t}", v, batch_size=bs)
        self.log("train/task_loss", self._weighted(losses), batch_size=bs)
        self.log("train/aux_loss", aux_total, batch_size=bs)
        return None

    def one_by_one_backward(self, batch: dict, backward=torch.autograd.backward) -> tuple[dict, torch.Tensor]:
        """M3ViT "one by one": for each task a single-task forward (its gates, its decoder) and a
        backward of ``w_t L_t + aux_t``; gradients accumulate for one optimiser step.
        Returns the detached task losses {task: L_t} and the summed aux loss."""
        losses, aux_total = {}, torch.zeros((), device=batch["image"].device)
        for t in self.tasks:
            loss_t = self._losses(self.model(batch["image"], task=t), batch)[t]
            aux = aux_loss(self.model).to(loss_t.device)
            backward(self.loss_weights[t] * loss_t + aux)
            losses[t] = loss_t.detach()
            aux_total = aux_total + aux.detach()
        return losses, aux_total

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        if not self.automatic_optimization:
            sch = self.lr_schedulers()
            if sch is not None:
                sch.step()

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 or "pos_embed" in n else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        epochs = max(int(getattr(self.trainer, "max_epochs", 1) or 1), 1) if self._trainer is not None else 1
        warm = min(hp.warmup_epochs, epochs - 1)

        def factor(e: int) -> float:  # linear warm-up, then cosine to 0 (per epoch)
            if e < warm:
                return (e + 1) / (warm + 1)
            prog = (e - warm) / max(epochs - warm, 1)
            return 0.5 * (1 + torch.cos(torch.tensor(prog * torch.pi)).item())

        sch = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "epoch"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, stage: str) -> dict:
        out = self.model(batch["image"])
        losses = self._losses(out, batch)
        bs = batch["image"].shape[0]
        for t, v in losses.items():
            self.log(f"{stage}/loss_{t}", v, batch_size=bs)
            self.metrics[stage][t].update(out[t], batch[t])
        self.log(f"{stage}/loss", self._weighted(losses), batch_size=bs, prog_bar=stage == "val")
        return out

    def _log_metrics(self, stage: str) -> dict[str, float]:
        values = {}
        for t, m in self.metrics[stage].items():
            values[TASK_METRIC[t][0]] = float(m.compute())
            m.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})
        return values

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def predict_step(self, batch, batch_idx):
        """Each task's dense output for the test images: ``semseg`` class map [B, H, W],
        ``depth`` [B, 1, H, W], ``normals`` unit vectors [B, 3, H, W], ``edge`` probability
        [B, 1, H, W] (the tasks the model was trained on)."""
        out = self.model(batch["image"])
        pred = {}
        for t, v in out.items():
            if t == "semseg":
                pred[t] = v.argmax(1)
            elif t == "normals":
                pred[t] = torch.nn.functional.normalize(v, dim=1)
            elif t == "edge":
                pred[t] = v.sigmoid()
            else:
                pred[t] = v
        return pred

    def test_step(self, batch, batch_idx):
        out = self._eval_step(batch, "test")
        b = batch["image"].shape[0]
        # expert usage per task (a "group" per task pass) -> routing_by_group.png
        if self.model.moe_layers and self.model.per_task_encoder:
            last = [m.last_routing for m in self.model.moe_layers]
            for i, t in enumerate(self.tasks):
                for m, info in zip(self.model.moe_layers, self.model.routing_by_task[t]):
                    m.last_routing = info
                self.record_routing(torch.full((b,), i), list(self.tasks))
            for m, info in zip(self.model.moe_layers, last):
                m.last_routing = info
        if batch_idx == 0:
            n = self.hparams.num_plot_images
            self._plot_batch = ({k: v[:n].detach().cpu() for k, v in batch.items()},
                                {k: v[:n].detach().cpu() for k, v in out.items()})

    def on_test_epoch_end(self):
        values = self._log_metrics("test")
        ref = self.hparams.single_task_reference
        if ref and all(k in ref for k in values):
            self.log("test/delta_m", delta_m(values, {k: ref[k] for k in values}))
        img = self.flops_inputs()[0]
        flops = pathway_flops(self.model, img)
        single = sum(flops[t] for t in self.tasks) / len(self.tasks)
        self.log_dict({"test/mflops_all_tasks": flops["all"] / 1e6, "test/mflops_single_task": single / 1e6})
        super().on_test_epoch_end()
        if getattr(self, "_plot_batch", None) is not None and self.trainer.is_global_zero:
            from .plots import plot_predictions
            plot_predictions(*self._plot_batch, self.run_dir / "predictions.png")
