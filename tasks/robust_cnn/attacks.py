"""White-box attacks in the ``[0, 1]`` image box: FGSM, PGD (L-inf / L2, random start), the
TRADES inner maximisation, and attacks on the router of an MoE CNN (AdvMoE Sec. 4-5).

Every attack maximises an *objective* ``f(model, x_adv) -> scalar`` by (projected) signed /
normalised gradient ascent on the input only (``torch.autograd.grad`` w.r.t. ``x``), so model
parameter gradients are never touched. Objectives:

- :func:`ce_objective`: ``CE(f(x'), y) + w_r * sum_l CE(r_l(x'), t_l)`` -- the classifier loss,
  plus (``w_r > 0``) a term pushing each routing score ``r_l`` away from its target choice
  ``t_l`` (AdvMoE's evaluation attack ``CE + beta * CE_router``, public ``adv_val``).
- :func:`trades_objective`: ``KL(p(x) || p(x')) + w_r * sum_l KL(q_l(x) || q_l(x'))`` -- the TRADES
  inner maximisation (Zhang et al. 2019, eq. 5), extended to the routing distributions ``q_l`` as
  AdvMoE's training attack does.
- :func:`router_objective`: ``sum_l CE(r_l(x'), t_l)`` only -- the attack on the router used
  to measure router robustness (public ``adv_val_router``).

Router targets ``t_l`` are the clean expert choices (or ``y mod E``, the public code's router
labels, when ``label_targets=True``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Objective = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def route_logits(model: nn.Module) -> list[torch.Tensor]:
    """Routing scores of ``model``'s last forward ([] for dense models)."""
    fn = getattr(model, "route_logits", None)
    return fn() if callable(fn) else []


@torch.no_grad()
def router_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                   label_targets: bool = False) -> list[torch.Tensor]:
    """Target expert per image and routing score set: the clean argmax, or ``y mod E``."""
    model(x)
    routes = route_logits(model)
    if label_targets:
        if y is None:
            raise ValueError("label_targets=True needs the labels y")
        return [y % r.shape[-1] for r in routes]
    return [r.argmax(-1) for r in routes]


def ce_objective(y: torch.Tensor, router_weight: float = 0.0,
                 targets: list[torch.Tensor] | None = None) -> Objective:
    def f(model, x):
        loss = F.cross_entropy(model(x), y, reduction="sum")
        if router_weight and targets:
            loss = loss + router_weight * sum(F.cross_entropy(r, t, reduction="sum")
                                              for r, t in zip(route_logits(model), targets))
        return loss
    return f


def trades_objective(nat_logits: torch.Tensor, nat_routes: list[torch.Tensor] | None = None,
                     router_weight: float = 0.0) -> Objective:
    p_nat = nat_logits.detach().softmax(-1)
    q_nat = [r.detach().softmax(-1) for r in (nat_routes or [])]

    def f(model, x):
        loss = F.kl_div(model(x).log_softmax(-1), p_nat, reduction="sum")
        if router_weight and q_nat:
            loss = loss + router_weight * sum(F.kl_div(r.log_softmax(-1), q, reduction="sum")
                                              for r, q in zip(route_logits(model), q_nat))
        return loss
    return f


def router_objective(targets: list[torch.Tensor]) -> Objective:
    def f(model, x):
        model(x)
        routes = route_logits(model)
        if not routes:
            raise ValueError("router attack on a model without routing scores (dense model)")
        return sum(F.cross_entropy(r, t, reduction="sum") for r, t in zip(routes, targets))
    return f


def _l2_normalise(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def pgd(model: nn.Module, x: torch.Tensor, objective: Objective, eps: float, step_size: float, steps: int,
        norm: str = "linf", random_start: bool | str = True, clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Projected gradient ascent (Madry et al. 2018) on ``objective`` inside the ``eps`` ball.

    ``random_start``: True = uniform in the ball (L-inf) / uniform-radius direction (L2);
    ``"trades"`` = ``0.001 * N(0, 1)`` (TRADES / AdvMoE training); False = start at ``x``.
    Returns ``x_adv`` (detached) with ``||x_adv - x|| <= eps`` and ``x_adv`` in ``clip``.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"attack norm must be 'linf' or 'l2', got {norm!r}")
    x = x.detach()
    if eps <= 0 or steps <= 0:
        return x.clone()
    if random_start == "trades":
        delta = 0.001 * torch.randn_like(x)
    elif random_start:
        if norm == "linf":
            delta = torch.empty_like(x).uniform_(-eps, eps)
        else:
            d = _l2_normalise(torch.randn_like(x))
            delta = d * eps * torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
    else:
        delta = torch.zeros_like(x)
    x_adv = (x + _project(delta, eps, norm)).clamp(*clip)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(model, x_adv)
            grad, = torch.autograd.grad(loss, x_adv)
        step = grad.sign() if norm == "linf" else _l2_normalise(grad)
        x_adv = x + _project(x_adv.detach() + step_size * step - x, eps, norm)
        x_adv = x_adv.clamp(*clip).detach()
    return x_adv


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one signed step of size ``eps``."""
    return pgd(model, x, ce_objective(y), eps, eps, 1, "linf", random_start=False, clip=clip)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               version: str = "standard", seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020) through the optional ``torchattacks`` package."""
    try:
        import torchattacks
    except ImportError as e:  # optional dependency
        raise ImportError("AutoAttack evaluation needs `pip install torchattacks`") from e
    atk = torchattacks.AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=eps,
                                  version=version, n_classes=int(model.fc.out_features), seed=seed)
    return atk(x, y).detach()
