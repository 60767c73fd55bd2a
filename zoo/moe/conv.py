"""Convolutional experts as channel groups (AdvMoE, Zhang et al., ICCV 2023, Sec. 3-4).

An MoE convolution holds ``E`` experts, each a group of ``out_channels`` output filters of one
``[E * out_channels, C_in, kh, kw]`` weight. A router scores the experts per *image* and only the
selected group(s) are computed for that image: samples are sorted by expert, each expert runs one
``conv2d`` on its contiguous slice and the results are scattered back (``index_add``), so the
FLOPs of one sample are those of a conv of width ``out_channels`` (the "width ratio" path), not
of the full ``E * out_channels`` conv.

Gates of the top-1 choice ``e*`` (``gate=``), with ``s`` the router scores, ``p = softmax(s)`` and
``sg`` stop-gradient:

- ``"softmax"`` (default): ``y_b = p_{b,e*} * conv_{e*}(x_b)``, the Switch Transformer gate. The
  router's gradient is bounded (``|dp/ds| <= 1/4``) and reaches every score through the softmax.
- ``"straight_through"``: value 1 in the forward pass, gradient of ``p`` in the backward pass,
  ``y_b = (1 + p_{b,e*} - sg(p_{b,e*})) * conv_{e*}(x_b)`` (Bengio et al. 2013's estimator taken
  through the softmax).
- ``"straight_through_scores"``: the AdvMoE public code's ``GetMask``: value 1, identity on the raw
  score, ``y_b = (1 + s_{b,e*} - sg(s_{b,e*})) * conv_{e*}(x_b)``, so
  ``dL/ds_{b,e*} = <dL/dy_b, conv_{e*}(x_b)>``. That gradient grows with the activations and
  nothing bounds the scores: trained by the task loss (the public code discards this gradient,
  its router learns only from its own loss), the scores of a shared router run away by orders of
  magnitude within a few epochs and whole batches flip from one expert to the other.

With ``k > 1`` the outputs of the k chosen groups are summed with their renormalised softmax
weights, whatever ``gate`` says.

Routing can come from (in priority order) ``logits=`` (scores of a router shared across layers,
computed once per image as the public code does), ``route=`` / :func:`zoo.moe.route_with`
(a signal fed to this layer's own router), or the layer input itself (one router per layer, as
the paper describes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .losses import switch_balance_loss
from .routing import RoutedModule, RoutingInfo

GATES = ("softmax", "straight_through", "straight_through_scores")


class ConvRouter(nn.Module):
    """Small CNN router on an image or feature map (AdvMoE Sec. 4: a light conv net scores experts).

    ``conv3x3-BN-ReLU`` per entry of ``widths`` (stride 1 for the first, 2 after), global
    average pool, linear to ``num_experts`` scores. Input ``[B, C, H, W]`` -> logits ``[B, E]``.
    """

    def __init__(self, in_channels: int, num_experts: int, widths: tuple[int, ...] | list[int] = (16, 32)):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"ConvRouter: num_experts must be >= 1, got {num_experts}")
        if len(widths) == 0:
            raise ValueError("ConvRouter: widths must name at least one conv layer")
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_experts)
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # [B, W, H', W']
        return self.fc(h.mean(dim=(2, 3)))  # [B, E]


class MoEConv2d(RoutedModule):
    """Mixture of channel-group conv experts with per-image top-k routing.

    Args:
        in_channels: input channels.
        out_channels: output channels of ONE expert (the active width); the layer stores
            ``num_experts * out_channels`` filters in total.
        kernel_size, stride, padding, dilation, bias: as :class:`torch.nn.Conv2d` (groups=1).
        num_experts: ``E``, number of channel groups.
        k: experts per image (1 = AdvMoE's straight-through top-1).
        router: ``"conv"`` = a :class:`ConvRouter` on this layer's input (or on ``route=``),
            ``None`` = no own router (``logits=`` must be given), or any module mapping
            ``[B, C, H, W] -> [B, E]``.
        router_in_channels: channels of the routing signal if it is not the layer input.
        router_widths: widths of the built-in :class:`ConvRouter`.
        balance_weight: weight of the Switch load-balancing loss put in ``self.aux_loss``
            (0 = none, as AdvMoE, whose router step balances experts with its own loss).
        gate: top-1 gate, ``"softmax"``, ``"straight_through"`` or ``"straight_through_scores"``
            (see the module docstring).

    Forward: ``x [B, C_in, H, W] -> [B, out_channels, H', W']``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 num_experts: int = 2, k: int = 1, stride: int = 1, padding: int = 0, dilation: int = 1,
                 bias: bool = False, router: str | nn.Module | None = "conv",
                 router_in_channels: int | None = None, router_widths: tuple[int, ...] | list[int] = (16,),
                 balance_weight: float = 0.0, gate: str = "softmax"):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MoEConv2d: num_experts must be >= 1, got {num_experts}")
        if gate not in GATES:
            raise ValueError(f"MoEConv2d: gate must be one of {GATES}, got {gate!r}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoEConv2d: k={k} must be between 1 and num_experts={num_experts}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"MoEConv2d: channels must be >= 1, got in={in_channels} out={out_channels}")
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.num_experts, self.k = num_experts, k
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.balance_weight, self.gate = balance_weight, gate
        # experts are the E channel groups of one conv weight: expert e owns rows [e*O, (e+1)*O)
        self.weight = nn.Parameter(torch.empty(num_experts * out_channels, in_channels, *ks))
        self.bias = nn.Parameter(torch.empty(num_experts * out_channels)) if bias else None
        self.reset_parameters()
        if router == "conv":
            router = ConvRouter(router_in_channels or in_channels, num_experts, router_widths)
        elif isinstance(router, str):
            raise ValueError(f"MoEConv2d: unknown router {router!r}; use 'conv', None or an nn.Module")
        self.router = router

    def reset_parameters(self) -> None:
        """Same init as nn.Conv2d, per expert (fan-in does not depend on E)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def expert_weight(self, e: int) -> torch.Tensor:
        """[O, C_in, kh, kw] filters of expert ``e``."""
        return self.weight[e * self.out_channels:(e + 1) * self.out_channels]

    def expert_bias(self, e: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[e * self.out_channels:(e + 1) * self.out_channels]

    def params_per_expert(self) -> int:
        n = self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return n + (self.out_channels if self.bias is not None else 0)

    def inactive_param_count(self) -> int:
        """Filters of the ``E - k`` experts one image does not use."""
        return (self.num_experts - self.k) * self.params_per_expert()

    def conv_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x [n, C_in, H, W]`` -> ``[n, O, H', W']``."""
        return F.conv2d(x, self.expert_weight(e), self.expert_bias(e), self.stride, self.padding, self.dilation)

    def route_logits(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[B, E]`` from this layer's own router on ``route`` (default: ``x``)."""
        if self.router is None:
            raise ValueError("MoEConv2d has no router of its own (router=None): pass logits=[B, E] "
                             "from a shared router")
        return self.router(route if route is not None else x)

    def gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k selection. Returns indices [B, k], gate weights [B, k] (with gradient), probs [B, E]."""
        probs = logits.float().softmax(-1)  # [B, E]
        indices = logits.topk(self.k, dim=-1).indices  # [B, k]
        if self.k == 1:
            if self.gate == "straight_through_scores":
                s = logits.gather(-1, indices)  # [B, 1] raw score: value 1, d/ds = identity
                weights = 1.0 + s - s.detach()
            else:
                p = probs.gather(-1, indices).to(logits.dtype)  # [B, 1]
                weights = p if self.gate == "softmax" else 1.0 + p - p.detach()
        else:
            w = probs.gather(-1, indices)
            weights = (w / w.sum(-1, keepdim=True).clamp_min(1e-9)).to(logits.dtype)
        return indices, weights, probs

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MoEConv2d expects x [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        b = x.shape[0]
        if logits is None:
            route = route if route is not None else self._route_ctx
            logits = self.route_logits(x, route)
        if logits.shape != (b, self.num_experts):
            raise ValueError(f"MoEConv2d: routing logits must be [B={b}, E={self.num_experts}], "
                             f"got {tuple(logits.shape)}")
        indices, weights, probs = self.gates(logits)
        token_index = torch.arange(b, device=x.device).repeat_interleave(self.k)  # [A]
        expert_index = indices.reshape(-1)  # [A]
        w = weights.reshape(-1)  # [A]
        counts = torch.bincount(expert_index, minlength=self.num_experts).tolist()
        if self.k == 1 and max(counts) == b:
            # every image chose one expert: its conv on the batch as it is, no gather or scatter
            y = self.conv_expert(counts.index(b), x)  # [B, O, H', W']
            y = y * w.view(-1, 1, 1, 1).to(y.dtype)
        else:
            # sort the (image, expert) assignments by expert; each expert convolves its own slice only
            order = torch.argsort(expert_index, stable=True)
            ti = token_index[order]
            outs, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    outs.append(self.conv_expert(e, x[ti[start:start + n]]))  # [n, O, H', W']
                    start += n
            out_sorted = torch.cat(outs, 0)  # [A, O, H', W']
            if self.k == 1:  # each image appears once: copy back into place, then gate
                y = out_sorted.new_empty(out_sorted.shape).index_copy(0, ti, out_sorted)  # [B, O, H', W']
                y = y * w.view(-1, 1, 1, 1).to(y.dtype)
            else:
                wi = w[order].view(-1, 1, 1, 1).to(out_sorted.dtype)
                y = x.new_zeros((b,) + out_sorted.shape[1:]).index_add(0, ti, out_sorted * wi)  # [B, O, H', W']

        self.last_logits = logits  # kept with its graph so attacks/losses on the router can use it
        self.last_routing = RoutingInfo(
            token_index=token_index, expert_index=expert_index.detach(), weights=w.detach(),
            kept=torch.ones_like(expert_index, dtype=torch.bool), num_experts=self.num_experts,
            num_tokens=b, token_shape=(b,), probs=probs.detach(), logits=logits.detach(),
            indices=indices.detach())
        if self.training and self.balance_weight > 0:
            self.aux_loss = self.balance_weight * switch_balance_loss(probs, expert_index, self.num_experts)
        else:
            self.aux_loss = x.new_zeros(())
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels} per expert, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, num_experts={self.num_experts}, k={self.k}, "
                f"gate={self.gate}")
