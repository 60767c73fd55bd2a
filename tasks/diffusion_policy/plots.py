"""Figures of the MoDE task: expert usage across noise levels (the paper's fig. 4) and rollouts."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zoo.plots import save_figure  # noqa: E402


def expert_usage_by_noise(usage: np.ndarray, sigmas: np.ndarray, path: Path,
                          title: str = "MoDE: expert gate weight per noise level") -> Path:
    """usage [L, S, E] (gate weight of each expert at each sigma, per layer) -> one panel per layer."""
    num_layers, _, num_experts = usage.shape
    fig, axes = plt.subplots(1, num_layers, figsize=(2.2 * num_layers + 1, 3.2), squeeze=False, sharey=True)
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(usage[layer].T, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower",
                       extent=(np.log10(sigmas[0]), np.log10(sigmas[-1]), -0.5, num_experts - 0.5))
        ax.set_title(f"block {layer}", fontsize=9)
        ax.set_xlabel("log10 sigma")
        ax.set_yticks(range(num_experts), [f"e{i}" for i in range(num_experts)])
    fig.colorbar(im, ax=axes[0].tolist(), label="gate weight", shrink=0.85)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110, tight=True)


def rollout_strip(frames_by_task: dict[str, list[np.ndarray]], path: Path, panels: int = 5,
                  title: str = "closed-loop rollouts") -> Path:
    """One row per task: ``panels`` frames evenly spaced over the first recorded episode."""
    rows = [(name, frames) for name, frames in frames_by_task.items() if frames]
    if not rows:
        raise ValueError("rollout_strip: no recorded frames")
    fig, axes = plt.subplots(len(rows), panels, figsize=(1.8 * panels, 1.9 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        picks = np.linspace(0, len(frames) - 1, panels).round().astype(int)
        for c, t in enumerate(picks):
            axes[r, c].imshow(frames[t])
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            axes[r, c].set_title(f"{name} t={t}", fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=100, tight=True)
