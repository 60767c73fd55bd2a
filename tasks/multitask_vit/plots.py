"""Figures of the multitask_vit task: predictions next to ground truth for a few test images."""
from __future__ import annotations

from pathlib import Path

import torch

from zoo.plots import save_figure

from .data import IMAGE_MEAN, IMAGE_STD


def _panel(task: str, t: torch.Tensor, is_pred: bool):
    """One [C, H, W] / [H, W] map as (array, imshow kwargs)."""
    if task == "semseg":
        a = t.argmax(0) if is_pred else t.clone()
        return a.numpy(), {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}
    if task == "depth":
        return t[0].numpy(), {"cmap": "viridis"}
    if task == "normals":
        return (t.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1).numpy(), {}
    a = t[0].sigmoid() if is_pred else (t[0] == 1).float()
    return a.numpy(), {"cmap": "gray", "vmin": 0, "vmax": 1}


def plot_predictions(batch: dict, out: dict, path: Path, title: str = "test images: ground truth and prediction per task") -> Path:
    """Grid: one row per image; columns image, then ground truth and prediction of each task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(out)
    n = batch["image"].shape[0]
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    for i in range(n):
        img = (batch["image"][i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        for j, t in enumerate(tasks):
            for c, (src, is_pred) in enumerate(((batch[t][i], False), (out[t][i].float(), True))):
                arr, kw = _panel(t, src, is_pred)
                ax = axes[i, 1 + 2 * j + c]
                ax.imshow(arr, **kw)
                if i == 0:
                    ax.set_title(f"{t} {'pred' if is_pred else 'gt'}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100, tight=False)
