"""Routing statistics: expert load, routing entropy, drop rate, null share, consistency."""
from __future__ import annotations

import math

from torch import nn

from .routing import RoutedModule, RoutingInfo


def routing_entropy(info: RoutingInfo) -> float:
    """Mean per-token entropy (nats) of the router distribution; 0 = confident routing."""
    if info.probs is None or info.probs.numel() == 0:
        return 0.0
    p = info.probs.float().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def load_balance_entropy(info: RoutingInfo) -> float:
    """Entropy of the expert load normalised to [0, 1] (1 = perfectly even load)."""
    load = info.load.clamp_min(1e-12)
    if info.num_experts <= 1:
        return 1.0
    return float(-(load * load.log()).sum() / math.log(info.num_experts))


def routing_consistency(info: RoutingInfo) -> float | None:
    """Share of neighbouring tokens (along the sequence/time axis) with the same top-1 expert.

    The sequence axis is the last leading dimension of the input; None for 1-token sequences.
    """
    if len(info.token_shape) < 2 or info.token_shape[-1] < 2:
        return None
    top = info.top1_per_token().view(-1, info.token_shape[-1])  # [B, T]
    return float((top[:, 1:] == top[:, :-1]).float().mean())


def layer_stats(info: RoutingInfo) -> dict:
    load = info.load
    stats = {
        "load": [round(float(v), 6) for v in load],
        "entropy": routing_entropy(info),
        "load_entropy": load_balance_entropy(info),
        "drop_rate": info.drop_rate,
        "null_fraction": info.null_fraction,
        "utilisation": float((load > 0).float().mean()),
    }
    consistency = routing_consistency(info)
    if consistency is not None:
        stats["consistency"] = consistency
    return stats


def routed_layers(model: nn.Module) -> dict[str, RoutedModule]:
    """Every routed layer of ``model`` by its qualified name (the model itself is named 'moe')."""
    return {name or "moe": m for name, m in model.named_modules() if isinstance(m, RoutedModule)}


def routing_stats(model: nn.Module) -> dict[str, dict]:
    """Per-layer statistics of the last forward: {layer: {load, entropy, drop_rate, ...}}."""
    return {name: layer_stats(m.last_routing) for name, m in routed_layers(model).items()
            if m.last_routing is not None}
