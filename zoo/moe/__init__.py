"""The shared Mixture-of-Experts backbone (DESIGN.md section 2)."""
from .conv import ConvRouter, MoEConv2d
from .experts import BatchedExperts, DenseFFN, MLPExperts, SwiGLUExperts
from .layer import MoE, aux_loss, dense_twin_hidden, moe_mlp, route_with
from .routers import ROUTERS, build_router
from .routing import RoutedModule, RoutingInfo
from .stats import routed_layers, routing_stats

__all__ = ["MoE", "DenseFFN", "MLPExperts", "SwiGLUExperts", "BatchedExperts", "dense_twin_hidden", "aux_loss", "routing_stats",
           "routed_layers", "route_with", "moe_mlp", "build_router", "ROUTERS", "RoutedModule",
           "RoutingInfo", "MoEConv2d", "ConvRouter"]
