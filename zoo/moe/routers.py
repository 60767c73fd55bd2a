"""Routers: small modules that map a routing signal to expert assignments.

Every router is called as ``router(x, route)`` with ``x`` [N, dim] the tokens and ``route``
[N, r] an optional external signal (None = route on ``x``), and returns
``(indices, weights, logits)``:

- token choice (``kind = "token"``): indices/weights [N, k]; a weight of exactly 0 marks an
  unused slot (dense-to-sparse routing selects a variable number of experts per token);
- expert choice (``kind = "expert"``): indices/weights [E, C] hold the tokens each expert picked;
- soft (``kind = "soft"``): indices/weights are None and logits [N, E*S] score tokens per slot.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    """Top-k softmax gate (Shazeer et al. 2017, eq. 3-5; GShard/Switch use k=2/k=1).

    ``noise_std`` > 0 adds Gaussian noise to the logits while training (noisy top-k).
    ``renormalize`` rescales the k selected probabilities to sum to 1; False keeps the raw
    softmax probabilities (Switch, M3ViT). ``sample_train`` draws the k experts from the softmax
    without replacement while training instead of taking the arg-top-k (MoDE).
    """

    kind = "token"

    def __init__(self, in_dim: int, num_experts: int, k: int = 2, noise_std: float = 0.0,
                 renormalize: bool = True, sample_train: bool = False, bias: bool = False):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"router k={k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.k = num_experts, k
        self.noise_std, self.renormalize, self.sample_train = noise_std, renormalize, sample_train
        self.gate = nn.Linear(in_dim, num_experts, bias=bias)
        self.last_clean_logits: torch.Tensor | None = None

    def compute_logits(self, x: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        return self.gate(route if route is not None else x)  # [N, E]

    def forward(self, x, route=None):
        logits = self.compute_logits(x, route)
        self.last_clean_logits = logits
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        scores = logits.float()
        if self.training and self.sample_train:
            indices = torch.multinomial(scores.detach().softmax(-1), self.k, replacement=False)
        else:  # softmax is monotone: the top-k logits are the top-k probabilities
            indices = scores.topk(self.k, dim=-1).indices
        top = scores.gather(-1, indices)  # [N, k]
        if self.renormalize:  # p_i / sum_{j in top k} p_j = softmax over the k selected logits
            weights = top.softmax(-1)
        else:  # the raw softmax probability p_i = exp(l_i - logsumexp(l))
            weights = (top - scores.logsumexp(-1, keepdim=True)).exp()
        return indices, weights.to(x.dtype), logits


class SwitchRouter(TopKRouter):
    """Switch Transformer gate (Fedus et al. 2021): top-1, weight = the raw softmax probability."""

    def __init__(self, in_dim: int, num_experts: int, k: int = 1, **kw):
        kw.pop("renormalize", None)
        super().__init__(in_dim, num_experts, k=1, renormalize=False, **kw)


class MultiGateRouter(TopKRouter):
    """One gate per task sharing the experts (M3ViT multi-gate, MMoE).

    ``route`` is a one-hot (or soft) task vector [N, G]; the logits are the selected task's
    gate applied to the token: ``logits = sum_g route_g * (x W_g)``.
    """

    def __init__(self, in_dim: int, num_experts: int, k: int = 2, num_gates: int = 2, **kw):
        super().__init__(in_dim, num_experts, k=k, **kw)
        self.num_gates = num_gates
        self.gate = nn.Linear(in_dim, num_experts * num_gates, bias=kw.get("bias", False))

    def compute_logits(self, x, route):
        if route is None or route.shape[-1] != self.num_gates:
            raise ValueError(
                f"multigate router needs route= a one-hot task vector of width {self.num_gates}, "
                f"got {None if route is None else tuple(route.shape)}")
        all_logits = self.gate(x).view(x.shape[0], self.num_gates, self.num_experts)  # [N, G, E]
        return torch.einsum("nge,ng->ne", all_logits, route.to(all_logits.dtype))


class DenseToSparseRouter(nn.Module):
    """EvoMoE's dense-to-sparse gate (Nie et al. 2021, sec. 3.3).

    While training, ``g = softmax((x W + gumbel) / tau)`` with tau annealed geometrically from
    ``tau_max`` to ``tau_min`` over ``anneal_steps`` forwards; every expert whose gate exceeds
    ``threshold`` is used (at least the best one), so routing starts dense and becomes sparse.
    After annealing, and always in eval, it is plain top-k.
    """

    kind = "token"

    def __init__(self, in_dim: int, num_experts: int, k: int = 1, tau_max: float = 2.0,
                 tau_min: float = 0.3, anneal_steps: int = 1000, threshold: float = 0.001,
                 bias: bool = False, **_):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.tau_max, self.tau_min, self.anneal_steps = tau_max, tau_min, anneal_steps
        self.threshold = threshold
        self.gate = nn.Linear(in_dim, num_experts, bias=bias)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def temperature(self) -> float:
        frac = min(int(self.step) / max(self.anneal_steps, 1), 1.0)
        return self.tau_max * (self.tau_min / self.tau_max) ** frac

    @property
    def annealed(self) -> bool:
        return int(self.step) >= self.anneal_steps

    def forward(self, x, route=None):
        logits = self.gate(route if route is not None else x)  # [N, E]
        if not self.training or self.annealed:
            probs = logits.float().softmax(-1)
            w, indices = probs.topk(self.k, dim=-1)
            return indices, (w / w.sum(-1, keepdim=True)).to(x.dtype), logits
        self.step += 1
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))
        probs = ((logits + gumbel) / self.temperature).float().softmax(-1)  # [N, E]
        w, indices = probs.sort(dim=-1, descending=True)
        keep = w > self.threshold
        keep[:, 0] = True
        return indices, (w * keep).to(x.dtype), logits


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

    ``C = ceil(capacity_factor * N * k / E)`` so on average a token is seen by k experts;
    the weight of (token, expert) is the token's softmax probability for that expert.
    """

    kind = "expert"

    def __init__(self, in_dim: int, num_experts: int, k: int = 2, capacity_factor: float = 1.0,
                 bias: bool = False, **_):
        super().__init__()
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.gate = nn.Linear(in_dim, num_experts, bias=bias)

    def capacity(self, num_tokens: int) -> int:
        c = math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts)
        return max(1, min(c, num_tokens))

    def forward(self, x, route=None):
        logits = self.gate(route if route is not None else x)  # [N, E]
        probs = logits.float().softmax(-1)
        w, tokens = probs.t().topk(self.capacity(x.shape[0]), dim=-1)  # [E, C]
        return tokens, w.to(x.dtype), logits


class SoftRouter(nn.Module):
    """Soft MoE (Puigcerver et al. 2023): S slots per expert, each a convex mix of all tokens.

    Returns logits [N, E*S] = x Phi (Phi normalised, with a learned scale, as sec. 2.3 advises).
    """

    kind = "soft"

    def __init__(self, in_dim: int, num_experts: int, k: int = 1, slots_per_expert: int = 1, **_):
        super().__init__()
        self.num_experts, self.slots_per_expert, self.k = num_experts, slots_per_expert, k
        self.phi = nn.Parameter(torch.randn(in_dim, num_experts * slots_per_expert) / math.sqrt(in_dim))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, route=None):
        src = route if route is not None else x
        logits = F.normalize(src, dim=-1) @ (self.scale * F.normalize(self.phi, dim=0))
        return None, None, logits  # [N, E*S]


ROUTERS = {
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "multigate": MultiGateRouter,
    "dense_to_sparse": DenseToSparseRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
}


def build_router(name: str, in_dim: int, num_experts: int, k: int = 2, **kw) -> nn.Module:
    """Build a router by name (see ``ROUTERS``); extra keywords go to its constructor."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}") from None
    # MoE passes every routing option it has; each router takes the ones it declares.
    accepted = set()
    for c in cls.__mro__:
        if "__init__" in vars(c):
            accepted |= set(inspect.signature(c.__init__).parameters)
    return cls(in_dim, num_experts, k=k, **{key: v for key, v in kw.items() if key in accepted})
