"""PNGs of the VAD task: snippet score curves against ground truth, and expert usage per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zoo.plots import save_figure


def score_curves(curves: list[dict], path: Path, title: str = "") -> Path:
    """One panel per video: final score (and the encoder's) over snippets, shaded ground truth.

    curves: dicts with ``name``, ``final`` [T], optional ``encoder`` [T], ``gt`` [T] in {0,1}.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(curves))
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.7 * n), squeeze=False)
    for ax, c in zip(axes[:, 0], curves):
        t = np.arange(len(c["final"]))
        ax.fill_between(t, 0, np.asarray(c["gt"], dtype=float), step="mid", color="tab:red",
                        alpha=0.2, label="ground truth")
        if c.get("encoder") is not None:
            ax.plot(t, c["encoder"], color="tab:gray", lw=1, label="encoder")
        ax.plot(t, c["final"], color="tab:blue", lw=1.5, label="final")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(c["name"], fontsize=7)
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("snippet")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, tight=False)


def expert_usage(usage: np.ndarray, row_names: list[str], expert_names: list[str], path: Path,
                 title: str = "") -> Path:
    """Heatmap [groups, experts] of the gate's mean attention weight on each expert."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(expert_names), 1.0 + 0.5 * len(row_names)))
    im = ax.imshow(usage, cmap="viridis", vmin=0, vmax=max(1e-6, float(usage.max())))
    ax.set_xticks(range(len(expert_names)), expert_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
    for i in range(usage.shape[0]):
        for j in range(usage.shape[1]):
            ax.text(j, i, f"{usage[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if usage[i, j] < 0.6 * usage.max() else "black")
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_xlabel("expert")
    ax.set_ylabel("video class (all its snippets)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, tight=False)
