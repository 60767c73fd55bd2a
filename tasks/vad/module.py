"""LightningModule of GS-MoE: staged weak-supervision training and frame-level evaluation.

Training stages (GS-MoE sec. 3 and its ablation, Table 5), each a number of epochs in
``stages`` and run in this order:

==========  ===================================================  ====================
stage       loss                                                 trains
==========  ===================================================  ====================
encoder     top-k MIL on the encoder scores                      task encoder
tgs         MIL + ``tgs_weight`` * TGS on the encoder scores     task encoder
experts     per expert e: MIL + TGS on its class group's         class experts (or the
            anomalous videos and all normal videos               dense head)
gate        MIL + TGS on the final (gated) scores                gate (or dense head)
==========  ===================================================  ====================

Earlier parts are frozen in later stages, as in the paper (encoder pre-trained with MIL, then
TGS fine-tuned, then experts, then the gate). ``joint: true`` trains everything at once with
the sum of all stage losses (quick runs). Variants: ``moe`` (experts + gate), ``mean`` (experts
averaged: the "+experts" row), ``dense`` (the dense twin head), ``encoder`` (MIL / MIL+TGS rows).
"""
from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from zoo.module import ZooModule

from .data import FRAMES_PER_SNIPPET
from .losses import TGSConfig, mil_loss, tgs_loss
from .metrics import FrameVADMetrics
from .model import GSMoE, VARIANTS
from .plots import expert_usage, score_curves

STAGES = ("encoder", "tgs", "experts", "gate")


def group_classes(prototypes: np.ndarray, num_groups: int, seed: int = 0) -> list[int]:
    """K-means of class prototypes [K, C] into ``num_groups`` experts (GS-MoE's cluster variant)."""
    from sklearn.cluster import KMeans

    if not 1 <= num_groups <= len(prototypes):
        raise ValueError(f"expert_groups={num_groups} must be between 1 and the number of "
                         f"classes ({len(prototypes)})")
    labels = KMeans(num_groups, n_init=10, random_state=seed).fit_predict(prototypes)
    # relabel clusters by first appearance so the mapping is stable
    order = {c: i for i, c in enumerate(dict.fromkeys(labels.tolist()))}
    return [order[c] for c in labels.tolist()]


def schedule_warning(stages: dict, max_epochs: int | None, joint: bool = False) -> str | None:
    """The message for a ``trainer.max_epochs`` that cuts the stage schedule short (None = it
    does not): names the stages that will not run, or run short, and the two ways to fix it."""
    if joint or max_epochs is None or max_epochs < 0:
        return None
    end, cut = 0, []
    for name in STAGES:
        n = int(stages.get(name, 0))
        if n <= 0:
            continue
        if max_epochs <= end:
            cut.append(f"{name} ({n} epochs: not run)")
        elif max_epochs < end + n:
            cut.append(f"{name} ({n} epochs: only {max_epochs - end} run)")
        end += n
    if not cut:
        return None
    sched = ", ".join(f"{k}: {v}" for k, v in stages.items() if int(v) > 0)
    return (f"trainer.max_epochs={max_epochs} is shorter than the stage schedule "
            f"model.stages={{{sched}}} ({end} epochs): {'; '.join(cut)}. The model tested "
            f"would not be the configured pipeline. Set --trainer.max_epochs {end}, or shorten "
            f"the stages to fit, e.g. --model.stages '{{encoder: 1, tgs: 1, experts: 1, gate: 1}}' "
            f"--trainer.max_epochs 4.")


class VADModule(ZooModule):
    """GS-MoE for weakly supervised VAD.

    Args:
        variant: ``moe`` | ``mean`` | ``dense`` | ``encoder`` (see module docstring).
        stages: epochs per stage, e.g. ``{encoder: 6, tgs: 3, experts: 4, gate: 3}``; stages
            not named are skipped; epochs past the last stage continue it.
        joint: train encoder, experts and gate together from the first epoch.
        expert_groups: ``class`` = one expert per anomaly class; an int K = K experts over a
            K-means clustering of the class prototypes.
        tgs_weight: weight of the TGS BCE; ``heads_tgs``: also use TGS for experts/gate/dense;
            ``tgs_source``: the heads' pseudo-labels come from their own scores (``self``) or
            from the task encoder's (``encoder``, a fixed teacher after the tgs stage).
        peak_threshold, width_ratio, min_distance, sigma_min, amplitude: TGS rules (losses.py).
        in_dim, class_names, class_to_expert, snippets: set from the data by ``on_data``
            (feature width, anomaly classes, class -> expert map, snippets per FLOPs sample).
        expert_input: what experts, gate and dense head read: ``task`` = the task-aware
            features f (the paper's wiring); ``input`` = LN(W x), a projection of the input
            snippets; ``both`` = LN(W x) + alpha f, alpha learnt from 0 (``model.HeadInput``).
        gate_task_token: the gate also attends to the task encoder's logit as one more token.
    """

    # best-checkpointing watches the validation AUC of the final stage only: an earlier stage's
    # model is not the configured pipeline (its gate or experts are untrained), so
    # ``val/auc_final_stage`` is -1 until the last scheduled stage starts.
    monitor = "val/auc_final_stage"
    monitor_mode = "max"

    def __init__(self, variant: str = "moe", stages: dict | None = None, joint: bool = False,
                 dim: int = 32, expert_hidden: int = 32, attn_layers: int = 0,
                 attn_window: int | None = 2, heads: int = 4, dropout: float = 0.1,
                 expert_input: str = "task", gate_task_token: bool = False,
                 expert_groups: str | int = "class",
                 tgs_weight: float = 1.0, heads_tgs: bool = True, tgs_source: str = "self",
                 peak_threshold: float = 0.5,
                 width_ratio: float = 0.5, min_distance: int = 2, sigma_min: float = 0.5,
                 amplitude: str = "one", lr: float = 3e-3, weight_decay: float = 1e-4,
                 snippets: int = 64, in_dim: int | None = None,
                 class_names: list[str] | None = None, class_to_expert: list[int] | None = None,
                 plot_videos: int = 8):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        stages = dict(stages or {"encoder": 6, "tgs": 10, "experts": 8, "gate": 4})
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; stages are {STAGES}")
        if tgs_source not in ("self", "encoder"):
            raise ValueError(f"tgs_source must be 'self' or 'encoder', got {tgs_source!r}")
        if expert_groups != "class" and not isinstance(expert_groups, int):
            raise ValueError(f"expert_groups must be 'class' or an int, got {expert_groups!r}")
        self.save_hyperparameters()
        self.hparams.stages = stages
        self.tgs_cfg = TGSConfig(peak_threshold, width_ratio, min_distance, sigma_min, amplitude)
        self._metrics: dict[str, FrameVADMetrics] = {}
        self._curves, self._usage = [], {}
        self.build_model()

    # ------------------------------------------------------------------ model from data
    def build_model(self) -> None:
        h = self.hparams
        if h.in_dim is None:  # built for real once the data is known (on_data)
            self.model = GSMoE(8, 1, h.dim, h.expert_hidden, h.attn_layers, h.heads, h.dropout,
                               h.attn_window, h.variant, h.expert_input, h.gate_task_token)
            return
        num_experts = max(self.class_to_expert) + 1
        self.model = GSMoE(h.in_dim, num_experts, h.dim, h.expert_hidden, h.attn_layers,
                           h.heads, h.dropout, h.attn_window, h.variant, h.expert_input,
                           h.gate_task_token)
        self._metrics = {}  # metric states hold the class names of the data

    @property
    def class_to_expert(self) -> list[int]:
        h = self.hparams
        if h.class_to_expert is not None:
            return list(h.class_to_expert)
        return list(range(len(h.class_names or [None])))

    def on_data(self, datamodule) -> None:
        """Feature width, class names and the class -> expert map come from the data."""
        h = self.hparams
        names = list(datamodule.classes)
        if h.expert_groups == "class":
            mapping = list(range(len(names)))
        else:
            mapping = group_classes(datamodule.class_prototypes(), int(h.expert_groups))
        changed = (h.in_dim, h.class_names, h.class_to_expert) != (
            datamodule.feature_dim, names, mapping)
        h.in_dim, h.class_names, h.class_to_expert = datamodule.feature_dim, names, mapping
        h.snippets = datamodule.hparams.num_segments
        if changed or self.model.in_dim != h.in_dim:
            self.build_model()

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and self.hparams.in_dim is None:
            self.on_data(dm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Snippet anomaly scores [B, T] from features [B, T, C] or [B, crops, T, C]."""
        return self.model(x)

    def flops_inputs(self) -> tuple:
        return (torch.zeros(1, self.hparams.snippets, self.model.in_dim, device=self.device),)

    # ------------------------------------------------------------------ stages
    def stage_at(self, epoch: int) -> str:
        if self.hparams.joint:
            return "joint"
        end = 0
        last = None
        for name in STAGES:
            n = int(self.hparams.stages.get(name, 0))
            if n <= 0:
                continue
            end += n
            last = name
            if epoch < end:
                return name
        if last is None:
            raise ValueError("stages name no epochs; give at least one stage a positive count")
        return last

    def _set_trainable(self, stage: str) -> None:
        """Freeze what the stage does not train.

        Frozen parameters keep ``requires_grad`` (so under DDP every parameter takes part in
        every step and plain ``ddp`` needs no ``find_unused_parameters``); their gradients are
        dropped in :meth:`on_before_optimizer_step`, and AdamW skips gradient-less parameters,
        so they neither move nor decay."""
        m = self.model
        train_experts = stage in ("experts", "joint") or (stage == "gate" and m.gate is None)
        train_dense = stage in ("experts", "gate", "joint")
        trainable = {
            "encoder": stage in ("encoder", "tgs", "joint"),
            "experts": train_experts,
            "input_proj": train_dense if m.dense is not None else train_experts,
            "gate": stage in ("gate", "joint"),
            "dense": train_dense,
        }
        self._frozen = [p for name, flag in trainable.items() if not flag
                        and getattr(m, name) is not None for p in getattr(m, name).parameters()]

    def on_before_optimizer_step(self, optimizer) -> None:
        """Drop the gradients of the parts the current stage freezes (after DDP's all-reduce)."""
        for p in getattr(self, "_frozen", []):
            p.grad = None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        trainer = self.trainer
        msg = None if trainer.fast_dev_run else schedule_warning(
            self.hparams.stages, trainer.max_epochs, self.hparams.joint)
        if msg:
            rank_zero_warn("\n" + "!" * 88 + "\n" + msg + "\n" + "!" * 88, category=UserWarning)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._stage = self.stage_at(self.current_epoch)
        self._set_trainable(self._stage)

    def _expert_mask(self, labels: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """[B, E]: normal videos train every expert, anomalous ones only their class's expert."""
        E = self.model.num_experts
        mapping = torch.as_tensor(self.class_to_expert, device=labels.device)
        w = torch.zeros(labels.shape[0], E, device=labels.device)
        w[labels < 0.5] = 1.0
        anom = (labels > 0.5).nonzero().flatten()
        w[anom, mapping[cls[anom]]] = 1.0
        return w

    def stage_loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, dict]:
        """The loss of one batch in ``stage`` and its named parts."""
        x, y, cls = batch["features"], batch["label"], batch["cls"]
        m, cfg, w = self.model, self.tgs_cfg, self.hparams.tgs_weight
        heads_tgs = self.hparams.heads_tgs
        if stage in ("experts", "gate") and m.encoder.training:
            m.encoder.eval()  # frozen: no dropout
        parts = m.forward_parts(x)
        teacher = parts["encoder"].detach() if self.hparams.tgs_source == "encoder" else None
        terms = {}
        if stage in ("encoder", "tgs", "joint") or (m.variant == "encoder"):
            terms["mil_encoder"] = mil_loss(parts["encoder"], y)
            if stage in ("tgs", "joint") or (m.variant == "encoder" and stage != "encoder"):
                terms["tgs_encoder"] = w * tgs_loss(parts["encoder"], y, cfg)
        if m.experts is not None and (stage in ("experts", "joint")
                                      or (stage == "gate" and m.gate is None)):
            mask = self._expert_mask(y, cls)
            terms["mil_experts"] = mil_loss(parts["experts"], y, mask)
            if heads_tgs:
                terms["tgs_experts"] = w * tgs_loss(parts["experts"], y, cfg, mask, teacher)
        if (m.gate is not None and stage in ("gate", "joint")) or \
                (m.dense is not None and stage in ("experts", "gate", "joint")):
            terms["mil_final"] = mil_loss(parts["final"], y)
            if heads_tgs:
                terms["tgs_final"] = w * tgs_loss(parts["final"], y, cfg, source=teacher)
        return sum(terms.values()), terms

    def training_step(self, batch, batch_idx):
        stage = getattr(self, "_stage", None) or self.stage_at(self.current_epoch)
        loss, terms = self.stage_loss(batch, stage)
        # every parameter joins the graph (zero gradient where the stage does not use it), so
        # DDP's reducer gets a gradient for each one in every stage
        loss = loss + 0.0 * sum(p.sum() for p in self.model.parameters())
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()},
                      batch_size=batch["label"].shape[0])
        return self.with_aux(loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ evaluation
    def _metric(self, split: str) -> FrameVADMetrics:
        if split not in self._metrics:
            self._metrics[split] = FrameVADMetrics(self.hparams.class_names).to(self.device)
        return self._metrics[split]

    def _eval_step(self, batch, split: str) -> dict:
        parts = self.model.forward_parts(batch["features"])
        met = self._metric(split)
        for i in range(batch["label"].shape[0]):
            met.update(parts["final"][i], batch["frame_gt"][i], int(batch["cls"][i]),
                       int(batch["index"][i]))
        return parts

    def _log_metrics(self, split: str) -> dict:
        met = self._metric(split)
        res = met.compute()
        met.reset()
        logs = {f"{split}/{k.replace('/', '_')}": v for k, v in res.items()}
        # torchmetrics already gathered every rank's videos: the values agree on all ranks
        self.log_dict(logs, sync_dist=True)
        return res

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        res = self._log_metrics("val")
        final = self.stage_at(self.current_epoch) == self.stage_at(10 ** 9)
        self.log("val/auc_final_stage", res["auc"] if final else torch.tensor(-1.0), sync_dist=True)

    def on_test_epoch_start(self):
        super().on_test_epoch_start()
        self._curves, self._usage = [], {}
        self._metric("test").reset()

    def predict_step(self, batch, batch_idx):
        """Per test video (one per batch): its index in the test list, anomaly probability per
        snippet [T] and per frame [16 T] (a snippet's score on each of its frames), and, with
        class experts, each expert's probability per snippet [T, E]."""
        parts = self.model.forward_parts(batch["features"])
        pred = {"index": batch["index"], "snippet_scores": list(parts["final"]),
                "frame_scores": [p.repeat_interleave(FRAMES_PER_SNIPPET) for p in parts["final"]]}
        if "experts" in parts:
            pred["expert_scores"] = list(parts["experts"])
        return pred

    def test_step(self, batch, batch_idx):
        parts = self._eval_step(batch, "test")
        names = ["Normal"] + list(self.hparams.class_names or [])
        group = batch["cls"] + 1  # 0 = normal, 1.. = anomaly classes
        self.record_routing(group, names)
        if self.model.gate is not None:
            probs = self.model.gate.last_routing.probs                   # [B*T, E]
            T = batch["features"].shape[-2]
            crops = probs.shape[0] // (batch["label"].shape[0] * T)
            per_video = probs.view(-1, crops * T, probs.shape[-1]).mean(1)  # [B, E]
            for g, u in zip(group.tolist(), per_video.cpu()):
                acc = self._usage.setdefault(g, [torch.zeros_like(u), 0])
                acc[0] += u
                acc[1] += 1
        self._keep_curve(batch, parts)

    def _keep_curve(self, batch, parts) -> None:
        """Keep a few test videos (normal and each class, round robin) for the score plot."""
        limit = self.hparams.plot_videos
        c = int(batch["cls"][0])
        seen = [cv["cls"] for cv in self._curves]
        if len(self._curves) >= limit or seen.count(c) >= max(1, limit // (len(
                self.hparams.class_names or []) + 1)):
            return
        gt = batch["frame_gt"][0].view(-1, 16).max(1).values.cpu().numpy()
        name = (["Normal"] + list(self.hparams.class_names or []))[c + 1]
        self._curves.append({"cls": c, "name": f"{name} #{int(batch['index'][0])}",
                             "final": parts["final"][0].cpu().numpy(),
                             "encoder": parts["encoder"][0].cpu().numpy(), "gt": gt})

    def on_test_epoch_end(self):
        self._log_metrics("test")
        if self.trainer.is_global_zero:
            self.save_task_plots()
        super().on_test_epoch_end()

    def save_task_plots(self) -> list:
        """score_curves.png (a few test videos) and expert_usage.png (gate attention per class)."""
        saved = []
        tag = f"GS-MoE ({self.hparams.variant})"
        if self._curves:
            curves = sorted(self._curves, key=lambda c: c["cls"])
            saved.append(score_curves(curves, self.run_dir / "score_curves.png",
                                      title=f"{tag}: test scores vs ground truth"))
        if self._usage:
            names = ["Normal"] + list(self.hparams.class_names or [])
            rows = sorted(self._usage)
            usage = np.stack([(self._usage[g][0] / self._usage[g][1]).numpy() for g in rows])
            experts = [f"E{e}:" + "+".join(n for n, k in zip(self.hparams.class_names,
                                                             self.class_to_expert) if k == e)
                       for e in range(self.model.num_experts)]
            saved.append(expert_usage(usage, [names[g] for g in rows], experts,
                                      self.run_dir / "expert_usage.png",
                                      title=f"{tag}: mean gate attention per class"))
        return saved
