"""The MoE layer every task uses, its dense twin, and the glue to route on external signals."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .dispatch import Assignments, dispatch, expert_choice, token_choice
from .experts import EXPERTS, DenseFFN, MLPExperts, SwiGLUExperts
from .losses import importance_load_loss, router_z_loss, smooth_load, switch_balance_loss
from .alltoall import expert_parallel_dispatch, world
from .routers import ROUTERS, build_router
from .routing import RoutedModule, RoutingInfo

BALANCE_LOSSES = ("switch", "cv2", None)


class MoE(RoutedModule):
    """Mixture-of-Experts feed-forward layer: ``y = sum_{e in route(x)} g_e(x) * FFN_e(x)``.

    Args:
        dim: token width; ``x`` is ``[..., dim]``.
        hidden: hidden width of each expert MLP.
        num_experts: number of computing experts E.
        k: experts per token (token-choice routers) or average experts per token (expert choice).
        router: a name in ``zoo.moe.routers.ROUTERS`` or a router module (see routers.py contract).
        capacity_factor: None = dropless; a float = each expert keeps at most
            ``ceil(capacity_factor * N * k / E)`` assignments (Switch), the overflow is dropped.
        route_dim: width of ``route=`` when routing on an external signal instead of ``x``.
        shared_experts: always-on experts added to every token's output (DeepSeek-MoE style).
        null_experts: AdaMoE null experts: the router may pick "no expert" for a slot, which costs
            no compute, so the number of experts actually run adapts per token.
        out_dim: output width (default ``dim``).
        expert: "mlp" (``act(x W1) W2``) or "swiglu" (``(x W1) * silu(x W3) W2``).
        noise_std, renormalize, sample_train, num_gates, slots_per_expert: router options.
        balance: "switch" (Fedus 2021), "cv2" (Shazeer 2017 importance + load) or None.
        balance_weight, z_weight: weights of the balance loss and the router z-loss.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 8, k: int = 2,
                 router: str | nn.Module = "topk", capacity_factor: float | None = None,
                 route_dim: int | None = None, shared_experts: int = 0, null_experts: int = 0,
                 out_dim: int | None = None, activation: str = "gelu", expert: str = "mlp",
                 noise_std: float = 0.0, renormalize: bool = True, sample_train: bool = False,
                 balance: str | None = "switch", balance_weight: float = 0.01, z_weight: float = 0.0,
                 num_gates: int = 1, slots_per_expert: int = 1, expert_parallel: bool = False,
                 ep_group=None, **router_kw):
        super().__init__()
        if expert not in EXPERTS:
            raise ValueError(f"MoE expert={expert!r}: choose one of {sorted(EXPERTS)} "
                             "(conv experts are zoo.moe.conv.MoEConv2d)")
        if balance not in BALANCE_LOSSES:
            raise ValueError(f"balance={balance!r}; choose one of {BALANCE_LOSSES}")
        if null_experts and not isinstance(router, nn.Module) and router not in ("topk", "multigate"):
            raise ValueError(f"null_experts need a token-choice top-k router, not {router!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.dim, self.hidden, self.out_dim = dim, hidden, out_dim or dim
        self.num_experts, self.k, self.null_experts = num_experts, k, null_experts
        self.capacity_factor = capacity_factor
        self.balance, self.balance_weight, self.z_weight = balance, balance_weight, z_weight
        self.route_dim = route_dim
        self.experts = self._make_experts(expert, num_experts, activation)
        # expert parallelism: with W ranks in the process group each keeps E/W of the experts
        # (all ranks build the same full set first, so a seeded init matches a single process)
        self.ep_group, self.ep_rank, self.ep_size, self.expert_parallel = None, 0, 1, False
        self.shared = self._make_experts(expert, shared_experts, activation) if shared_experts else None
        if isinstance(router, nn.Module):
            self.router = router
            self.router_name = type(router).__name__
        else:
            if router not in ROUTERS:
                raise ValueError(f"unknown router {router!r}; choose one of {sorted(ROUTERS)}")
            self.router = build_router(
                router, route_dim or dim, num_experts + null_experts, k=k, noise_std=noise_std,
                renormalize=renormalize, sample_train=sample_train, num_gates=num_gates,
                slots_per_expert=slots_per_expert, capacity_factor=capacity_factor or 1.0, **router_kw)
            self.router_name = router
        self.kind = getattr(self.router, "kind", "token")
        if expert_parallel and world(ep_group)[1] > 1:
            self.shard_experts(ep_group)

    # ------------------------------------------------------------------ helpers
    def _flat_route(self, route: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
        """Broadcast ``route`` [..., r] to the tokens' leading shape and flatten to [N, r]."""
        if route is None:
            return None
        missing = len(lead) - (route.dim() - 1)
        if missing > 0:  # e.g. a per-sample signal [B, r] for tokens [B, T, dim]
            route = route.reshape(route.shape[0], *([1] * missing), route.shape[-1])
        try:
            route = route.expand(*lead, route.shape[-1])
        except RuntimeError:
            raise ValueError(f"MoE route= of shape {tuple(route.shape)} does not broadcast to the "
                             f"tokens' leading shape {tuple(lead)}") from None
        return route.reshape(-1, route.shape[-1])

    def _make_experts(self, expert: str, count: int, activation: str):
        if expert == "swiglu":
            return SwiGLUExperts(count, self.dim, self.hidden, self.out_dim)
        return MLPExperts(count, self.dim, self.hidden, self.out_dim, activation)

    def shardable(self, world_size: int) -> str | None:
        """Why this layer cannot be split over ``world_size`` ranks (None when it can)."""
        if self.num_experts % world_size:
            return f"num_experts={self.num_experts} does not divide evenly over {world_size} ranks"
        if self.capacity_factor is not None or self.kind != "token":
            return ("expert parallelism supports dropless token-choice routing only "
                    "(capacity_factor=None, router topk/switch/multigate/dense_to_sparse)")
        return None

    def shard_experts(self, group=None) -> None:
        """Keep this rank's E/W experts and exchange tokens with the others by all-to-all.

        Called at construction when a process group exists, or later (Lightning creates the
        group after the model is built: ``ZooModule.configure_model`` calls
        :func:`zoo.moe.parallel.shard_experts`). Rank r keeps experts ``r*E/W .. (r+1)*E/W-1``.
        """
        if self.expert_parallel:
            return
        rank, size = world(group)
        if size == 1:
            return
        why = self.shardable(size)
        if why:
            raise ValueError(f"expert_parallel: {why}")
        local = self.num_experts // size
        self.experts.keep_experts(rank * local, (rank + 1) * local)
        self.ep_group, self.ep_rank, self.ep_size, self.expert_parallel = group, rank, size, True

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None or self.kind != "token":
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts))

    def inactive_param_count(self) -> int:
        """Expert parameters a token does not use: (E - k) experts for sparse routers."""
        if self.kind == "soft":
            return 0
        return max(self.num_experts - self.k, 0) * self.experts.params_per_expert()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects inputs [..., {self.dim}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.dim)  # [N, dim]
        rf = self._flat_route(route if route is not None else self._route_ctx, lead)
        if self.route_dim is not None and (rf is None or rf.shape[-1] != self.route_dim):
            got = "no route" if rf is None else f"route width {rf.shape[-1]}"
            raise ValueError(f"MoE built with route_dim={self.route_dim} needs route= of shape "
                             f"[..., {self.route_dim}] (via moe(x, route=c) or route_with), got {got}")
        if self.kind == "soft":
            y = self._forward_soft(x, rf)
        else:
            y = self._forward_sparse(xf, rf, lead)
        if self.shared is not None:
            y = y + self.shared.forward_all(xf).sum(0)
        return y.reshape(*lead, self.out_dim)

    def _forward_sparse(self, xf, rf, lead):
        """Token- and expert-choice routing in four steps: route -> assign -> dispatch ->
        experts and combine (``dispatch.py``); then the aux loss and the routing record."""
        indices, weights, logits = self.router(xf, rf)  # 1. route
        routed = self._assign(indices, weights)  # 2. flat (token, expert, gate) triples
        routed, computed, active = self._computed(routed)
        y, kept = self._run_experts(xf, computed)  # 3.+4. sort, capacity, experts, combine
        if active is not None:  # null experts count as kept
            kept = torch.ones_like(active).masked_scatter_(active, kept)
        self._record(xf.shape[0], lead, routed, kept, indices, weights, logits)
        return y

    def _assign(self, indices, weights) -> Assignments:
        if self.kind == "expert":  # indices [E, C] = tokens picked by each expert
            return expert_choice(indices, weights)
        return token_choice(indices, weights, with_priority=self.capacity_factor is not None)

    def _computed(self, routed: Assignments) -> tuple[Assignments, Assignments, torch.Tensor | None]:
        """(the assignments recorded, those that run an expert, which of the recorded ones
        these are (None: all)). Null experts and zero gates (dense-to-sparse) compute nothing;
        zero gates are not recorded either."""
        if not (self.null_experts > 0 or self.router_name == "dense_to_sparse"):
            return routed, routed, None
        routed = routed.select(routed.weight != 0)
        active = routed.expert < self.num_experts
        return routed, routed.select(active), active

    def _run_experts(self, xf, a: Assignments) -> tuple[torch.Tensor, torch.Tensor]:
        if self.expert_parallel:  # dropless: every assignment is kept
            y = expert_parallel_dispatch(xf, a.token, a.expert, a.weight, self.experts, self.num_experts, self.ep_group)
            return y, torch.ones(a.token.numel(), dtype=torch.bool, device=xf.device)
        return dispatch(xf, a, experts=self.experts, capacity=self.capacity(xf.shape[0]))

    def _record(self, n, lead, routed: Assignments, kept, indices, weights, logits) -> None:
        """``aux_loss`` and ``last_routing`` of this forward."""
        # the probabilities carry a gradient only for the balance losses; otherwise they are stats
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.balance is not None and self.kind == "token"):
            probs = logits.float().softmax(-1)
        self.aux_loss = self._aux(logits, probs, routed.expert, weights, indices)
        self.last_routing = RoutingInfo(
            token_index=routed.token.detach(), expert_index=routed.expert.detach(),
            weights=routed.weight.detach(), kept=kept.detach(),
            num_experts=self.num_experts, num_tokens=n, token_shape=tuple(lead),
            probs=probs.detach(), logits=logits.detach(),
            indices=None if self.kind == "expert" else indices.detach(), null_experts=self.null_experts)

    def _forward_soft(self, x, rf):
        """Soft MoE (Puigcerver et al. 2023, eq. 1-3) over the tokens of each sequence."""
        seq = x.reshape(-1, x.shape[-2], self.dim) if x.dim() >= 3 else x.reshape(1, -1, self.dim)
        g, n, _ = seq.shape  # [G, n, dim]
        _, _, logits = self.router(seq.reshape(-1, self.dim), rf)
        logits = logits.view(g, n, -1)  # [G, n, E*S]
        dispatch_w = logits.softmax(dim=1)  # each slot is a convex mix of the tokens
        combine_w = logits.softmax(dim=2)  # each token is a convex mix of the slots
        slots = torch.einsum("gns,gnd->gsd", dispatch_w, seq)  # [G, E*S, dim]
        e, s = self.num_experts, logits.shape[-1] // self.num_experts
        slots = slots.view(g, e, s, self.dim).permute(1, 0, 2, 3).reshape(e, g * s, self.dim)
        out = self.experts.forward_batched(slots)  # [E, G*S, out]
        out = out.view(e, g, s, self.out_dim).permute(1, 0, 2, 3).reshape(g, e * s, self.out_dim)
        y = torch.einsum("gns,gso->gno", combine_w, out)  # [G, n, out]
        per_expert = combine_w.detach().view(g * n, e, s).sum(-1)  # [N, E] share of each expert
        top_w, top_e = per_expert.max(-1)
        num_tokens = g * n
        self.aux_loss = self.z_weight * router_z_loss(logits.view(num_tokens, -1)) if self.z_weight else x.new_zeros(())
        self.last_routing = RoutingInfo(
            token_index=torch.arange(num_tokens, device=x.device), expert_index=top_e, weights=top_w,
            kept=torch.ones(num_tokens, dtype=torch.bool, device=x.device), num_experts=e,
            num_tokens=num_tokens, token_shape=tuple(x.shape[:-1]), probs=per_expert,
            logits=logits.detach().view(num_tokens, -1))
        return y.reshape(-1, self.out_dim)

    def _aux(self, logits, probs, expert_index, weights, indices):
        loss = logits.new_zeros((), dtype=torch.float32)
        e_total = self.num_experts + self.null_experts
        if self.balance == "switch" and self.kind == "token":
            loss = loss + self.balance_weight * switch_balance_loss(probs, expert_index, e_total)
        elif self.balance == "cv2" and self.kind == "token":
            gates = torch.zeros_like(probs).scatter(1, indices, weights.float())  # [N, E]
            clean = getattr(self.router, "last_clean_logits", None)
            noise = getattr(self.router, "noise_std", 0.0)
            if self.training and noise > 0 and clean is not None:
                load = smooth_load(clean.float(), logits.float(), noise, indices.shape[1])
            else:
                load = torch.bincount(indices.reshape(-1), minlength=e_total).float()
            loss = loss + self.balance_weight * importance_load_loss(probs, gates, load)
        if self.z_weight:
            loss = loss + self.z_weight * router_z_loss(logits)
        return loss

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"router={self.router_name}, capacity_factor={self.capacity_factor}, "
                f"null_experts={self.null_experts}")


def dense_twin_hidden(moe: MoE | RoutedModule | int, dim: int | None = None, out_dim: int | None = None,
                      swiglu: bool | None = None) -> int:
    """Hidden width h whose ``DenseFFN(dim, h, out_dim)`` has the MoE's active parameter count.

    ``moe`` is an ``MoE`` (dim/out_dim read from it), any other ``RoutedModule`` or a plain
    active-parameter count (then pass ``dim``, and ``out_dim`` if it differs). Active = all
    parameters minus those a token does not use (router and shared experts count).
    ``DenseFFN`` has ``h * (dim + out + 1) + out`` parameters; with ``swiglu`` (the default for
    an ``MoE(expert="swiglu")``) it is ``DenseFFN(..., activation="swiglu")`` with
    ``h * (2 * dim + out + 2) + out``.
    """
    if isinstance(moe, nn.Module):
        active = sum(p.numel() for p in moe.parameters()) - moe.inactive_param_count()
        dim = dim or getattr(moe, "dim", None)
        out_dim = out_dim or getattr(moe, "out_dim", None) or dim
        if swiglu is None:
            swiglu = isinstance(getattr(moe, "experts", None), SwiGLUExperts)
    else:
        active = int(moe)
        out_dim = out_dim or dim
    if not dim:
        raise ValueError("dense_twin_hidden needs dim= when given a parameter count or a custom layer")
    per_hidden = 2 * dim + out_dim + 2 if swiglu else dim + out_dim + 1
    return max(1, round((active - out_dim) / per_hidden))


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of every routed layer in ``model`` from its last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, RoutedModule) and torch.is_tensor(m.aux_loss)]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    device = losses[0].device
    return torch.stack([loss.to(device).float().reshape(()) for loss in losses]).sum()


@contextlib.contextmanager
def route_with(model: nn.Module, route: torch.Tensor):
    """Make every routed layer in ``model`` route on ``route`` for the forwards inside the block.

    ``route`` is [B, r] (one signal per sample, broadcast over its tokens) or any shape that
    broadcasts to the layer's tokens. It reaches layers buried in modules that only pass ``x``
    (e.g. timm's ``Block`` calls ``self.mlp(x)``).
    """
    layers = [m for m in model.modules() if isinstance(m, RoutedModule)]
    previous = [m._route_ctx for m in layers]
    for m in layers:
        m._route_ctx = route
    try:
        yield model
    finally:
        for m, p in zip(layers, previous):
            m._route_ctx = p


def moe_mlp(num_experts: int = 8, k: int = 2, every: int = 1, **moe_kw):
    """A factory for timm's ``VisionTransformer(mlp_layer=...)``.

    timm builds blocks in order and calls ``mlp_layer(in_features=..., hidden_features=...,
    act_layer=..., drop=...)`` once per block. The i-th call (0-based) returns an MoE when
    ``i % every == every - 1`` (so ``every=2`` puts MoE MLPs in every other block, starting with
    the second, as V-MoE and M3ViT do) and timm's dense ``Mlp`` otherwise. ``hidden_features``
    becomes each expert's hidden width.
    """
    calls = {"n": 0}

    def make(in_features: int, hidden_features: int | None = None, out_features: int | None = None,
             act_layer=None, drop: float = 0.0, **kw):
        i = calls["n"]
        calls["n"] += 1
        hidden = hidden_features or 4 * in_features
        if i % every == every - 1:
            return MoE(in_features, hidden, num_experts=num_experts, k=k, out_dim=out_features, **moe_kw)
        from timm.layers import Mlp
        kw = {key: v for key, v in kw.items() if key in ("norm_layer", "bias", "use_conv")}
        return Mlp(in_features, hidden, out_features, act_layer=act_layer or nn.GELU, drop=drop, **kw)

    return make


__all__ = ["MoE", "DenseFFN", "dense_twin_hidden", "aux_loss", "route_with", "moe_mlp"]
