"""RL metrics: evaluation-return statistics, learning-curve AUC, component usage and plots.

- ``return_mean`` / ``return_std``: deterministic-policy evaluation returns over N episodes.
- ``curve_auc``: area under the evaluation learning curve (return vs environment steps),
  trapezoidal and divided by the step span, i.e. the time-averaged return over training; the
  sample-efficiency measure PMOE reports (Ren et al. 2021, AUC of the learning curve).
- component usage: which mixture component (expert) the deterministic policy acts with at
  each state; for Pendulum a map over the phase plane (angle, angular velocity).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from zoo.plots import save_figure


def return_stats(returns) -> tuple[float, float]:
    """Mean and (population) std of episode returns."""
    r = np.asarray(returns, dtype=np.float64)
    if r.size == 0:
        raise ValueError("return_stats needs at least one episode return")
    return float(r.mean()), float(r.std())


def curve_auc(steps, returns) -> float:
    """Normalised area under a learning curve: trapezoid over ``steps`` / (last - first step).

    One point gives that point's return; NaN for an empty curve. Steps must increase.
    """
    s = np.asarray(steps, dtype=np.float64)
    r = np.asarray(returns, dtype=np.float64)
    if s.shape != r.shape:
        raise ValueError(f"curve_auc: steps {s.shape} and returns {r.shape} differ in shape")
    if s.size == 0:
        return float("nan")
    if s.size == 1:
        return float(r[0])
    if np.any(np.diff(s) <= 0):
        raise ValueError("curve_auc: steps must be strictly increasing")
    area = np.sum((r[1:] + r[:-1]) * np.diff(s)) / 2
    return float(area / (s[-1] - s[0]))


def pendulum_phase_grid(n: int = 101, max_speed: float = 8.0):
    """States over Pendulum's phase plane: theta in [-pi, pi], theta_dot in [-8, 8].

    Returns (theta [n], theta_dot [n], obs [n*n, 3]) with obs = (cos, sin, theta_dot), row-major
    over (theta_dot, theta)."""
    theta = np.linspace(-math.pi, math.pi, n)
    theta_dot = np.linspace(-max_speed, max_speed, n)
    tt, dd = np.meshgrid(theta, theta_dot)  # [n, n]
    obs = np.stack([np.cos(tt), np.sin(tt), dd], -1).reshape(-1, 3).astype(np.float32)
    return theta, theta_dot, obs


@torch.no_grad()
def component_map(policy, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic component (argmax alpha) [N] and alpha [N, K] of ``policy`` at states obs [N, O]."""
    x = torch.as_tensor(obs, dtype=torch.float32, device=policy.action_scale.device)
    logits = policy.head.mixing_logits(policy.features(x))
    alpha = logits.softmax(-1)
    return alpha.argmax(-1).cpu().numpy(), alpha.cpu().numpy()


def plot_pendulum_components(policy, path: Path, n: int = 101) -> Path:
    """PNG: which expert acts where on the Pendulum phase plane, and its mixing weight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    theta, theta_dot, obs = pendulum_phase_grid(n)
    comp, alpha = component_map(policy, obs)
    k = alpha.shape[1]
    comp = comp.reshape(n, n)
    conf = alpha.max(-1).reshape(n, n)
    colours = plt.get_cmap("tab10").colors[:k]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    extent = (theta[0], theta[-1], theta_dot[0], theta_dot[-1])
    im = axes[0].imshow(comp, origin="lower", extent=extent, aspect="auto",
                        cmap=ListedColormap(colours), norm=BoundaryNorm(np.arange(k + 1) - 0.5, k))
    fig.colorbar(im, ax=axes[0], ticks=range(k), label="component (argmax alpha)")
    axes[0].set_title("acting component")
    im2 = axes[1].imshow(conf, origin="lower", extent=extent, aspect="auto", vmin=1.0 / k, vmax=1.0)
    fig.colorbar(im2, ax=axes[1], label="max alpha(s)")
    axes[1].set_title("mixing-weight confidence")
    for ax in axes:
        ax.set_xlabel("angle theta (0 = upright)")
        ax.set_ylabel("angular velocity")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100, tight=False)


def plot_learning_curves(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], path: Path,
                         title: str = "") -> Path:
    """Mean learning curve with a shaded +-1 std band per method.

    ``curves[name]`` is a list (one per seed) of (steps [T], returns [T]) on the same steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        steps = np.asarray(runs[0][0])
        r = np.stack([np.asarray(run[1]) for run in runs])  # [S, T]
        mean, std = r.mean(0), r.std(0)
        ax.plot(steps, mean, label=f"{name} (n={len(runs)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100, tight=False)
