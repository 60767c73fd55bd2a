"""Robustness metrics of AdvMoE (Sec. 5): standard accuracy (SA), robust accuracy (RA) under
PGD / FGSM / the joint classifier+router attack / AutoAttack, and router robustness.

All functions take an ``nn.Module`` in eval mode and images in ``[0, 1]``; they return per-batch
means that the LightningModule averages over the test set (weighted by batch size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import attacks


@dataclass
class AttackConfig:
    """One threat model: ``eps``-ball (``norm``), ``step_size``, ``steps``; defaults = AdvMoE's
    evaluation PGD-10, L-inf 8/255 with step 2/255 and a random start."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "linf"


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits [B, K]`` against ``y [B]`` (0-dim float tensor)."""
    return (logits.argmax(-1) == y).float().mean()


@torch.no_grad()
def expert_choices(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``[B, L]`` top-1 expert of each image at each routing set (None for dense models)."""
    model(x)
    routes = attacks.route_logits(model)
    return torch.stack([r.argmax(-1) for r in routes], 1) if routes else None


def robust_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                   router_weight: float = 6.0, label_targets: bool = False,
                   autoattack: bool = False) -> dict[str, torch.Tensor]:
    """All test metrics of one batch.

    - ``sa``: clean accuracy.
    - ``ra_pgd``: accuracy under PGD on the classifier CE (gradients flow through the routed path
      and, straight-through, into the router).
    - ``ra_fgsm``: accuracy under FGSM with the same ``eps``.
    - MoE only: ``ra_joint`` under PGD on ``CE + router_weight * CE_router`` (the paper's attack on
      classifier and router), ``router_ra`` = share of images whose expert choices all survive a
      PGD attack on the router alone, ``ra_router_attack`` = accuracy under that router attack,
      ``ra_worst`` = accuracy under the per-image worst of the PGD, joint and router attacks.
    - ``ra_autoattack`` (optional, needs ``torchattacks``).
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["sa"] = accuracy(model(x), y)
    x_pgd = attacks.pgd(model, x, attacks.ce_objective(y), cfg.eps, cfg.step_size, cfg.steps, cfg.norm)
    with torch.no_grad():
        correct_pgd = model(x_pgd).argmax(-1) == y
    out["ra_pgd"] = correct_pgd.float().mean()
    x_fgsm = attacks.fgsm(model, x, y, cfg.eps) if cfg.norm == "linf" else x_pgd
    with torch.no_grad():
        out["ra_fgsm"] = accuracy(model(x_fgsm), y)
    clean_choice = expert_choices(model, x)
    if clean_choice is not None:
        targets = attacks.router_targets(model, x, y, label_targets)
        x_joint = attacks.pgd(model, x, attacks.ce_objective(y, router_weight, targets),
                              cfg.eps, cfg.step_size, cfg.steps, cfg.norm)
        x_router = attacks.pgd(model, x, attacks.router_objective(targets),
                               cfg.eps, cfg.step_size, cfg.steps, cfg.norm)
        with torch.no_grad():
            correct_joint = model(x_joint).argmax(-1) == y
            correct_router = model(x_router).argmax(-1) == y
        out["ra_joint"] = correct_joint.float().mean()
        out["ra_router_attack"] = correct_router.float().mean()
        out["router_ra"] = (expert_choices(model, x_router) == clean_choice).all(1).float().mean()
        out["ra_worst"] = (correct_pgd & correct_joint & correct_router).float().mean()
    if autoattack:
        x_aa = attacks.autoattack(model, x, y, cfg.eps, cfg.norm)
        with torch.no_grad():
            out["ra_autoattack"] = accuracy(model(x_aa), y)
    return out
