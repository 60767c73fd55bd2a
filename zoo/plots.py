"""PNG figures a person would rather look at than numbers: routing heatmaps, comparisons."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path


_save = save_figure


def load_heatmap(load_by_layer: dict[str, list[float]], path: Path, title: str = "expert load") -> Path:
    """Layers (rows) x experts (columns), cell = share of the layer's assignments."""
    names = list(load_by_layer)
    width = max(len(v) for v in load_by_layer.values())
    grid = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        grid[i, :len(load_by_layer[n])] = load_by_layer[n]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * width, 1.0 + 0.45 * len(names)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(width), [f"e{i}" for i in range(width)])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    for i in range(len(names)):
        for j in range(width):
            if not np.isnan(grid[i, j]) and width <= 16:
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < np.nanmax(grid) * 0.6 else "black")
    fig.colorbar(im, ax=ax, label="share of assignments")
    ax.set_title(title)
    return _save(fig, path)


def group_usage_heatmaps(usage: dict[str, np.ndarray], group_names: list[str] | None, path: Path,
                         title: str = "expert usage per group") -> Path:
    """One panel per layer: groups (rows) x experts (columns), each row sums to 1."""
    names = list(usage)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    g, e = next(iter(usage.values())).shape
    labels = group_names if group_names and len(group_names) >= g else [str(i) for i in range(g)]
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, cols * (2.8 + 0.4 * e)), max(2.8, rows * (1.4 + 0.35 * g))),
                             squeeze=False, constrained_layout=True)
    for ax, name in zip(axes.flat, names):
        im = ax.imshow(usage[name], aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(usage[name].shape[1]), [f"e{i}" for i in range(usage[name].shape[1])], fontsize=7)
        ax.set_yticks(range(usage[name].shape[0]), labels[:usage[name].shape[0]], fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="share of routing mass", shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def compare_bars(table: dict[str, dict[str, tuple[float, float]]], path: Path, title: str = "") -> Path:
    """Grouped panels: one per metric, one bar per config with std error bars.

    table: {config: {metric: (mean, std)}}.
    """
    configs = list(table)
    metrics = list(dict.fromkeys(m for row in table.values() for m in row))
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 2.6), squeeze=False)
    colors = plt.cm.tab10(np.arange(len(configs)) % 10)
    for ax, metric in zip(axes.flat, metrics):
        means = [table[c].get(metric, (np.nan, 0))[0] for c in configs]
        stds = [table[c].get(metric, (np.nan, 0))[1] for c in configs]
        ax.bar(range(len(configs)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def curves(series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, xlabel: str,
           ylabel: str, title: str = "") -> Path:
    """Mean curves with a shaded +-std band: series = {label: (x, mean, std)}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, mean, std) in series.items():
        ax.plot(x, mean, label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)
