"""PMOE policies: Gaussian-mixture heads whose components are experts (Ren et al. 2021).

Policy (the GMM policy of the paper):  pi(a|s) = sum_k alpha_k(s) N(a; mu_k(s), sigma_k(s)),
with the K component heads a batch of experts (`zoo.moe.experts.MLPExperts`) on a shared trunk
and the mixing weights alpha(s) = softmax(router logits) from a `zoo.moe` router. For SAC every
component is squashed by tanh (Haarnoja et al. 2018, app. C); for PPO components are plain
Gaussians on the unclipped action (the environment clips, as CleanRL does).

The dense baseline (``head="gaussian"``) is the same actor with K = 1 and no router: a single
Gaussian whose head width is chosen so the actor has the PMOE actor's *active* parameters
(trunk + router + one expert), see `dense_head_hidden`.

Acting only needs one component: the inference path (``forward``) picks the argmax-alpha
component and runs that expert alone (``MLPExperts.forward_sorted``); training runs all K
(``forward_all``) because the estimator scores every component.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe import RoutedModule, RoutingInfo
from zoo.moe.experts import DenseFFN, MLPExperts, get_activation
from zoo.moe.routers import build_router

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0   # clamp used by SAC and the public PMOE code
SQUASH_EPS = 1e-6                       # keeps log(1 - tanh^2) finite at the action bounds


# ---------------------------------------------------------------------------------------------
# Distribution helpers (all shapes: B states, K components, A action dims)
# ---------------------------------------------------------------------------------------------
def randn_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``t`` from ``generator`` (None = the global RNG)."""
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over the action dims: [..., A] -> [...]."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def tanh_log_det(u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log |d a / d u| for a = scale * tanh(u) + bias, summed over action dims: [..., A] -> [...]."""
    return (torch.log(scale * (1 - torch.tanh(u).pow(2)) + SQUASH_EPS)).sum(-1)


def mixture_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                     logits: torch.Tensor) -> torch.Tensor:
    """Full mixture log-likelihood of the GMM policy, stable via logsumexp.

    x [B, A] (pre-squash for SAC), mean/log_std [B, K, A], logits [B, K] -> [B]
    ``log sum_k alpha_k N(x; mu_k, sigma_k)``.
    """
    comp = gaussian_log_prob(x.unsqueeze(1), mean, log_std)  # [B, K]
    return torch.logsumexp(F.log_softmax(logits, -1) + comp, dim=-1)


@dataclass
class MixtureParams:
    mean: torch.Tensor      # [B, K, A]
    log_std: torch.Tensor   # [B, K, A]
    logits: torch.Tensor    # [B, K]  mixing logits; alpha = softmax(logits)

    @property
    def num_components(self) -> int:
        return self.mean.shape[1]


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------
class MixtureHead(RoutedModule):
    """K Gaussian components from batched experts + mixing weights from a zoo router.

    ``last_routing`` records, for every state of the last forward, the component the
    deterministic policy would act with (argmax alpha) and its weight, plus alpha itself as
    ``probs``, so expert load and routing entropy come from the shared `zoo.moe` statistics.
    PMOE has no balance loss: the mixing head is trained by the estimator (``aux_loss`` = 0).

    Args:
        feat_dim: trunk feature width; act_dim: A; num_components: K.
        expert_hidden: hidden width of each component's MLP.
        state_dependent_std: True = experts output [mean, log_std] (SAC); False = a learned
            per-component log-std vector (PPO, as in CleanRL and the PMOE-PPO code).
        router: zoo router name for the mixing logits (top-1 token choice by default).
        out_scale: multiplies the experts' output-layer init (0.01 for PPO, CleanRL's choice).
    """

    def __init__(self, feat_dim: int, act_dim: int, num_components: int = 4, expert_hidden: int = 64,
                 state_dependent_std: bool = True, router: str = "topk", activation: str = "relu",
                 out_scale: float = 1.0, init_log_std: float = 0.0):
        super().__init__()
        if num_components < 2:
            raise ValueError(f"model.num_components must be >= 2 for a mixture, got {num_components} "
                             f"(use head: gaussian for a single Gaussian)")
        self.num_components, self.act_dim = num_components, act_dim
        self.state_dependent_std = state_dependent_std
        out = 2 * act_dim if state_dependent_std else act_dim
        self.experts = MLPExperts(num_components, feat_dim, expert_hidden, out_dim=out, activation=activation)
        with torch.no_grad():
            self.experts.w2.mul_(out_scale)
            self.experts.b2.mul_(out_scale)
        self.router = build_router(router, feat_dim, num_components, k=1, bias=True)
        if not state_dependent_std:
            self.log_std = nn.Parameter(torch.full((num_components, act_dim), float(init_log_std)))

    def _split(self, out: torch.Tensor, comp: torch.Tensor | None = None):
        """Expert output [..., out] -> mean, clamped log_std (per component ``comp`` if given)."""
        if self.state_dependent_std:
            mean, log_std = out.chunk(2, dim=-1)
        else:
            mean = out
            log_std = self.log_std if comp is None else self.log_std[comp]
            log_std = log_std.expand_as(mean)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def _record(self, logits: torch.Tensor) -> None:
        probs = logits.detach().float().softmax(-1)  # [B, K]
        w, top = probs.max(-1)                        # [B]
        n = logits.shape[0]
        self.last_routing = RoutingInfo(
            token_index=torch.arange(n, device=logits.device), expert_index=top, weights=w,
            kept=torch.ones(n, dtype=torch.bool, device=logits.device),
            num_experts=self.num_components, num_tokens=n, token_shape=(n,),
            probs=probs, logits=logits.detach(), indices=top[:, None])
        self.aux_loss = logits.new_zeros(())

    def mixing_logits(self, h: torch.Tensor) -> torch.Tensor:
        _, _, logits = self.router(h)
        return logits  # [B, K]

    def forward(self, h: torch.Tensor) -> MixtureParams:
        """All components on every state: h [B, F] -> MixtureParams([B, K, A] x2, [B, K])."""
        logits = self.mixing_logits(h)
        out = self.experts.forward_all(h).transpose(0, 1)  # [B, K, out]
        mean, log_std = self._split(out)
        self._record(logits)
        return MixtureParams(mean, log_std, logits)

    def forward_selected(self, h: torch.Tensor, comp: torch.Tensor):
        """Only component ``comp`` [B] of each state (sparse acting): -> mean, log_std [B, A]."""
        order = torch.argsort(comp, stable=True)
        counts = torch.bincount(comp, minlength=self.num_components)
        out_sorted = self.experts.forward_sorted(h[order], counts)  # [B, out] in expert order
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return self._split(out, comp)

    def inactive_param_count(self) -> int:
        """One component acts per state; the other K-1 experts (and their log-stds) idle."""
        per = self.experts.params_per_expert() + (0 if self.state_dependent_std else self.act_dim)
        return (self.num_components - 1) * per


class GaussianHead(nn.Module):
    """Dense baseline: one Gaussian, returned with K = 1 so the algorithms are K-agnostic."""

    def __init__(self, feat_dim: int, act_dim: int, hidden: int = 64, state_dependent_std: bool = True,
                 activation: str = "relu", out_scale: float = 1.0, init_log_std: float = 0.0):
        super().__init__()
        self.num_components, self.act_dim = 1, act_dim
        self.state_dependent_std = state_dependent_std
        self.net = DenseFFN(feat_dim, hidden, out_dim=2 * act_dim if state_dependent_std else act_dim,
                            activation=activation)
        with torch.no_grad():
            self.net.fc2.weight.mul_(out_scale)
            self.net.fc2.bias.mul_(out_scale)
        if not state_dependent_std:
            self.log_std = nn.Parameter(torch.full((1, act_dim), float(init_log_std)))

    def _split(self, out):
        if self.state_dependent_std:
            mean, log_std = out.chunk(2, dim=-1)
        else:
            mean, log_std = out, self.log_std[0].expand_as(out)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def mixing_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h.new_zeros(h.shape[0], 1)

    def forward(self, h: torch.Tensor) -> MixtureParams:
        mean, log_std = self._split(self.net(h))  # [B, A]
        return MixtureParams(mean.unsqueeze(1), log_std.unsqueeze(1), self.mixing_logits(h))

    def forward_selected(self, h: torch.Tensor, comp: torch.Tensor):
        return self._split(self.net(h))


def dense_head_hidden(feat_dim: int, act_dim: int, num_components: int, expert_hidden: int,
                      state_dependent_std: bool = True) -> int:
    """Width of the dense Gaussian head whose params equal PMOE's active head params.

    Active PMOE head = router (F*K + K) + one expert (F*h + h + h*out + out) [+ A log-stds];
    dense head = F*h_d + h_d + h_d*out + out [+ A]. Solve for h_d (rounded).
    """
    out = 2 * act_dim if state_dependent_std else act_dim
    router = feat_dim * num_components + num_components
    return expert_hidden + round(router / (feat_dim + 1 + out))


# ---------------------------------------------------------------------------------------------
# Actor and critics
# ---------------------------------------------------------------------------------------------
def mlp(sizes: list[int], activation: str, final_activation: bool = True) -> nn.Sequential:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(act())
    return nn.Sequential(*layers)


class RunningNorm(nn.Module):
    """Running mean/variance observation normaliser (parallel-variance update), kept as buffers
    so it is saved with the model and frozen at evaluation time. Output clipped to [-clip, clip]."""

    def __init__(self, dim: int, clip: float = 10.0, enabled: bool = True):
        super().__init__()
        self.enabled, self.clip = enabled, clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = x.reshape(-1, self.mean.shape[0]).to(self.mean.dtype)
        b_mean, b_var, b = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b
        self.mean += delta * b / total
        self.var.copy_((self.var * self.count + b_var * b + delta.pow(2) * self.count * b / total) / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return ((x - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-self.clip, self.clip)


class MixturePolicy(nn.Module):
    """Actor: obs -> (optional running norm) -> MLP trunk -> mixture (or Gaussian) head.

    ``forward(obs)`` is the deterministic inference path: the argmax-alpha component's mean,
    squashed (SAC) or clipped (PPO) into the action bounds. [B, O] -> [B, A].
    """

    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, head: str = "mixture",
                 hidden: int = 256, trunk_layers: int = 2, num_components: int = 4, expert_hidden: int = 64,
                 router: str = "topk", activation: str = "relu", squash: bool = True,
                 state_dependent_std: bool = True, normalize_obs: bool = False, out_scale: float = 1.0,
                 init_log_std: float = 0.0):
        super().__init__()
        if head not in ("mixture", "gaussian"):
            raise ValueError(f"model.head must be 'mixture' or 'gaussian', got {head!r}")
        self.squash = squash
        self.obs_norm = RunningNorm(obs_dim, enabled=normalize_obs)
        self.trunk = mlp([obs_dim] + [hidden] * trunk_layers, activation)
        head_kw = dict(state_dependent_std=state_dependent_std, activation=activation,
                       out_scale=out_scale, init_log_std=init_log_std)
        if head == "mixture":
            self.head = MixtureHead(hidden, act_dim, num_components, expert_hidden, router=router, **head_kw)
        else:
            width = dense_head_hidden(hidden, act_dim, num_components, expert_hidden, state_dependent_std)
            self.head = GaussianHead(hidden, act_dim, width, **head_kw)
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)

    @property
    def num_components(self) -> int:
        return self.head.num_components

    def features(self, obs: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Trunk features [B, H]; ``normalized=True`` when obs already went through ``obs_norm``."""
        return self.trunk(obs if normalized else self.obs_norm(obs))

    def dist(self, obs: torch.Tensor, normalized: bool = False) -> MixtureParams:
        """Every component's parameters and the mixing logits for a batch of states."""
        return self.head(self.features(obs, normalized))

    def to_env(self, u: torch.Tensor) -> torch.Tensor:
        """Pre-squash sample/mean u [..., A] -> action in the env's bounds."""
        if self.squash:
            return torch.tanh(u) * self.action_scale + self.action_bias
        return torch.maximum(torch.minimum(u, self.action_high), self.action_low)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False, normalized: bool = False,
            generator: torch.Generator | None = None):
        """Behaviour policy: pick a component (argmax or ~ Cat(alpha)), then act with it alone.

        ``generator`` owns the draws (None = the global torch RNG).
        Returns (env_action [B, A], raw action u [B, A] (unsquashed sample), component [B])."""
        h = self.features(obs, normalized)
        logits = self.head.mixing_logits(h)  # [B, K]
        if deterministic:
            comp = logits.argmax(-1)
        else:
            comp = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # [B] ~ Cat(alpha)
        mean, log_std = self.head.forward_selected(h, comp)  # [B, A]
        u = mean if deterministic else mean + randn_like(mean, generator) * log_std.exp()
        return self.to_env(u), u, comp

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.features(obs)
        logits = self.head.mixing_logits(h)
        comp = logits.argmax(-1)
        if isinstance(self.head, MixtureHead):
            self.head._record(logits)
        mean, _ = self.head.forward_selected(h, comp)
        return self.to_env(mean)


class SoftQNetwork(nn.Module):
    """Q(s, a) MLP. Accepts actions [B, A] -> [B] or one action per component [B, M, A] -> [B, M]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2, activation: str = "relu"):
        super().__init__()
        self.net = mlp([obs_dim + act_dim] + [hidden] * layers + [1], activation, final_activation=False)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if action.dim() == 3:  # [B, M, A]: broadcast the state over the M candidate actions
            obs = obs.unsqueeze(1).expand(-1, action.shape[1], -1)
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


class ValueNetwork(nn.Module):
    """State value V(s) for PPO (CleanRL init: orthogonal, output gain 1)."""

    def __init__(self, obs_dim: int, hidden: int = 64, layers: int = 2, activation: str = "tanh"):
        super().__init__()
        self.net = mlp([obs_dim] + [hidden] * layers + [1], activation, final_activation=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)  # [B]


def orthogonal_init(module: nn.Module, out_gain: float = 1.0) -> None:
    """CleanRL PPO init: orthogonal(sqrt 2) hidden layers, orthogonal(out_gain) last layer, zero bias."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        nn.init.orthogonal_(lin.weight, out_gain if i == len(linears) - 1 else math.sqrt(2))
        nn.init.zeros_(lin.bias)


__all__ = ["LOG_STD_MIN", "LOG_STD_MAX", "randn_like", "gaussian_log_prob", "tanh_log_det", "mixture_log_prob",
           "MixtureParams", "MixtureHead", "GaussianHead", "dense_head_hidden", "MixturePolicy",
           "SoftQNetwork", "ValueNetwork", "RunningNorm", "orthogonal_init", "get_activation"]
