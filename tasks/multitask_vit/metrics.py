"""Metrics of multi-task dense prediction (NYUD-v2 / PASCAL-Context protocol, as in M3ViT).

- :class:`SemsegMIoU`      semantic segmentation mean IoU (higher is better), ignore label 255.
- :class:`DepthRMSE`       depth root-mean-square error in metres over valid (> 0) pixels (lower).
- :class:`NormalsAngleError` mean angular error in degrees over valid normals (lower).
- :class:`EdgeODSF`        optimal-dataset-scale F-score of edges (higher). Simplified: a predicted
  edge pixel counts as correct when a ground-truth edge lies within ``tolerance`` pixels (and vice
  versa for recall), measured by max-pool dilation, instead of the SEISM bipartite matching.
- :func:`delta_m`          multi-task performance change vs single-task baselines (Maninis 2019,
  used by M3ViT):  dm = 100/T sum_t (-1)^{l_t} (M_mt,t - M_st,t) / M_st,t,  l_t = 1 if lower is better.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

IGNORE = 255

# task -> (metric name logged under test/, lower_is_better)
TASK_METRIC = {"semseg": ("semseg_miou", False), "depth": ("depth_rmse", True),
               "normals": ("normals_mean_angle", True), "edge": ("edge_odsf", False)}


class SemsegMIoU(Metric):
    """Mean IoU over classes from an accumulated confusion matrix (classes absent from both
    prediction and ground truth are left out of the mean)."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor):
        """logits [B, C, H, W], target [B, H, W] long."""
        pred = logits.argmax(1)
        valid = target != self.ignore_index
        idx = target[valid] * self.num_classes + pred[valid]
        self.confmat += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def compute(self) -> torch.Tensor:
        cm = self.confmat.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        return (tp[present] / union[present]).mean().float() if present.any() else torch.tensor(0.0)


class DepthRMSE(Metric):
    """sqrt(sum (d_pred - d)^2 / #valid) over all valid pixels (d > 0) of the dataset."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor):
        """pred, target [B, 1, H, W] metres."""
        valid = target > 0
        self.sq += ((pred - target)[valid].double() ** 2).sum()
        self.n += valid.sum()

    def compute(self) -> torch.Tensor:
        return (self.sq / self.n.clamp_min(1)).sqrt().float()


class NormalsAngleError(Metric):
    """Mean angle in degrees between predicted and ground-truth normals over valid pixels
    (ground truth non-zero); predictions are L2-normalised first."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("deg", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor):
        """pred, target [B, 3, H, W]."""
        valid = target.norm(dim=1) > 1e-6  # [B, H, W]
        cos = (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(1).clamp(-1, 1)
        self.deg += torch.rad2deg(torch.acos(cos[valid].double())).sum()
        self.n += valid.sum()

    def compute(self) -> torch.Tensor:
        return (self.deg / self.n.clamp_min(1)).float()


class EdgeODSF(Metric):
    """Optimal-dataset-scale F-score: precision/recall counts summed over the dataset for each of
    ``num_thresholds`` thresholds on sigmoid(logits); the best F over thresholds is reported.

    Matching with tolerance ``t`` pixels: a predicted edge pixel is a true positive when a
    ground-truth edge lies in its (2t+1)^2 window; a ground-truth edge pixel is recalled when a
    predicted edge lies in its window (dilation-based, not SEISM's bipartite matching).
    Ground-truth pixels equal to 255 are ignored.
    """

    full_state_update = False

    def __init__(self, num_thresholds: int = 19, tolerance: int = 1):
        super().__init__()
        self.register_buffer("thresholds", torch.linspace(0.05, 0.95, num_thresholds))
        self.tolerance = tolerance
        for name in ("pred_pos", "pred_tp", "gt_pos", "gt_hit"):
            self.add_state(name, torch.zeros(num_thresholds, dtype=torch.float64), dist_reduce_fx="sum")

    def _dilate(self, m: torch.Tensor) -> torch.Tensor:
        r = self.tolerance
        return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r) if r > 0 else m

    def update(self, logits: torch.Tensor, target: torch.Tensor):
        """logits [B, 1, H, W], target [B, 1, H, W] in {0, 1, 255}."""
        valid = (target != IGNORE).float()
        gt = (target == 1).float() * valid
        gt_d = self._dilate(gt)
        prob = logits.sigmoid()
        for i, th in enumerate(self.thresholds):
            pr = (prob >= th).float() * valid
            self.pred_pos[i] += pr.sum()
            self.pred_tp[i] += (pr * gt_d).sum()
            self.gt_pos[i] += gt.sum()
            self.gt_hit[i] += (gt * self._dilate(pr)).sum()

    def compute(self) -> torch.Tensor:
        p = self.pred_tp / self.pred_pos.clamp_min(1)
        r = self.gt_hit / self.gt_pos.clamp_min(1)
        f = 2 * p * r / (p + r).clamp_min(1e-12)
        return f.max().float()


def build_task_metric(task: str, num_classes: int | None = None) -> Metric:
    """The metric M3ViT reports for a task (see TASK_METRIC for names and directions)."""
    if task == "semseg":
        if num_classes is None:
            raise ValueError("semseg metric needs num_classes")
        return SemsegMIoU(num_classes)
    if task == "depth":
        return DepthRMSE()
    if task == "normals":
        return NormalsAngleError()
    if task == "edge":
        return EdgeODSF()
    raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_METRIC)}")


def delta_m(multi: dict[str, float], single: dict[str, float],
            lower_is_better: dict[str, bool] | None = None) -> float:
    """Multi-task performance in percent (Maninis et al. 2019, eq. in M3ViT sec. 4.1):

        dm = 100 / T * sum_t (-1)^{l_t} (M_mt,t - M_st,t) / M_st,t

    ``multi`` and ``single`` map metric names (e.g. ``"depth_rmse"``) to values; directions come
    from ``lower_is_better`` or, for the standard names, from :data:`TASK_METRIC`.
    """
    if set(multi) != set(single):
        raise ValueError(f"delta_m: metrics differ, multi-task {sorted(multi)} vs single-task {sorted(single)}")
    if not multi:
        raise ValueError("delta_m: no metrics given")
    directions = {m: low for m, low in TASK_METRIC.values()}
    directions.update(lower_is_better or {})
    total = 0.0
    for name, mt in multi.items():
        if name not in directions:
            raise ValueError(f"delta_m: direction of metric {name!r} unknown; pass lower_is_better")
        st = single[name]
        if st == 0 or not math.isfinite(st):
            raise ValueError(f"delta_m: single-task value of {name!r} is {st}; cannot normalise")
        sign = -1.0 if directions[name] else 1.0
        total += sign * (mt - st) / st
    return 100.0 * total / len(multi)
