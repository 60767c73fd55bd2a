"""MoDE: a diffusion transformer policy whose FFNs are noise-routed mixtures of SwiGLU experts.

Reuss et al., "Efficient Diffusion Transformer Policies with Mixture of Expert Denoisers for
Multitask Learning" (ICLR 2025). Details follow the authors' code (MoDeDiT / NoiseBlockMoE):

- noise embedding ``e_sigma = W2 (W1 (log(sigma) / 4) + b1)`` (Linear(1, D) -> Linear(D, D));
  it is (a) prepended as a token, (b) added to the RMS-normalised input of every
  self-attention, and (c) the ONLY input of every router (sec. 3.1, "noise-conditioned
  routing"), so expert selection depends on the noise level and not on the token;
- sequence ``[noise, task, obs_1..obs_To, act_1..act_H]`` with learned positions, causal
  self-attention with QK-RMSNorm, RMSNorm pre-norm blocks, linear action head;
- router ``Linear(D, 2D) -> GELU -> Linear(2D, E)`` (CondRouterMLP), softmax, top-k at
  evaluation and multinomial sampling of k experts without replacement in training;
  gate weights renormalised over the chosen k; both router layers initialised
  normal(0, 0.02) with zero biases (``router_init="normal"``, as CondRouterMLP._init_weights);
- load balancing in the authors' form (``balance="mode"``): per layer
  ``E * sum_e mean_tokens(g_e) * n_e / N`` with g the renormalised top-k gates (0 for experts
  not chosen) and n_e the tokens sent to e, averaged over the layers;
- optional routing on noise + goal (``route_on="noise+goal"``, the authors'
  ``use_goal_in_routing``); the default routes on the noise embedding only;
- attention-probability dropout 0.3 and goal-embedding dropout 0.1 (elementwise, as
  ``mask_cond``) while training, the authors' CALVIN values;
- experts are SwiGLU MLPs (``(x W1) * silu(x W3) W2``), kept as batched weights;
- expert caching (sec. 3.2): since routing depends only on sigma, the experts and gate
  weights of every layer at every sampling step are known before sampling; each is fused
  into ONE SwiGLU MLP whose hidden layer concatenates the k chosen experts and whose output
  projection carries the gate weights, and the router is dropped (`build_expert_cache`).

The dense twin replaces every MoE by one SwiGLU FFN with the same active parameter count.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe import MoE, RoutingInfo, SwiGLUExperts, dense_twin_hidden
from zoo.moe.parallel import gather_experts
from zoo.moe.routers import TopKRouter

from .encoders import FiLMResNet, GoalEncoder


# ---------------------------------------------------------------------------- experts
# SwiGLUExperts (batched, sliceable for expert parallelism) live in zoo.moe.experts.
class SwiGLUFFN(nn.Module):
    """Dense SwiGLU FFN (the dense twin, and the fused cached expert): ``(xW1) * silu(xW3) W2``."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, device=None, dtype=None):
        super().__init__()
        out_dim = out_dim or dim
        self.dim, self.hidden, self.out_dim = dim, hidden, out_dim
        self.w1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.w3 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        # `route` is accepted and ignored so the dense twin drops in where the MoE was.
        return self.w2(self.w1(x) * F.silu(self.w3(x)))


def swiglu_params(dim: int, hidden: int, out_dim: int) -> int:
    return 2 * (dim * hidden + hidden) + hidden * out_dim + out_dim


# ---------------------------------------------------------------------------- router / MoE
class NoiseRouter(TopKRouter):
    """MoDE's router MLP ``Linear(D, 2D) -> GELU -> Linear(2D, E)`` on the noise embedding.

    Softmax over experts; top-k at evaluation, k experts sampled without replacement from the
    softmax in training (``sample_train``); the k gate weights are renormalised to sum to 1.
    ``init="normal"``: every router layer normal(0, 0.02), biases 0 (the authors' CondRouterMLP),
    so an untrained router already prefers different experts at different noise levels;
    ``init="zero"``: the last layer starts at 0 (all experts equally likely at every sigma;
    arg-top-k then breaks the tie towards experts 0 and 1).
    """

    def __init__(self, route_dim: int, num_experts: int, k: int = 2, sample_train: bool = True,
                 init: str = "normal"):
        super().__init__(route_dim, num_experts, k=k, renormalize=True, sample_train=sample_train)
        if init not in ("normal", "zero"):
            raise ValueError(f"router_init must be 'normal' or 'zero', got {init!r}")
        self.gate = nn.Sequential(nn.Linear(route_dim, 2 * route_dim), nn.GELU(),
                                  nn.Linear(2 * route_dim, num_experts))
        for layer in (self.gate[0], self.gate[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if init == "zero":
            nn.init.zeros_(self.gate[2].weight)

    def compute_logits(self, x, route):
        if route is None:
            raise ValueError("NoiseRouter routes on the noise embedding only: call moe(x, route=noise_emb)")
        return self.gate(route)  # [N, E]


class NoiseMoE(MoE):
    """zoo ``MoE`` with SwiGLU experts and the MoDE noise router (routes only on ``route=``).

    ``balance="mode"``: the authors' load-balancing term, divided by ``num_layers`` so that
    the sum over layers ``zoo.moe.aux_loss`` collects is their mean over layers; ``"switch"``:
    the Switch loss on the full softmax (zoo's default form).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 4, k: int = 2,
                 sample_train: bool = True, balance_weight: float = 0.01, balance: str = "mode",
                 router_init: str = "normal", num_layers: int = 1):
        if balance not in ("mode", "switch"):
            raise ValueError(f"balance must be 'mode' or 'switch', got {balance!r}")
        super().__init__(dim, hidden, num_experts=num_experts, k=k,
                         router=NoiseRouter(dim, num_experts, k, sample_train=sample_train, init=router_init),
                         route_dim=dim, balance="switch", balance_weight=balance_weight)
        self.balance_form, self.num_layers = balance, num_layers
        self.experts = SwiGLUExperts(num_experts, dim, hidden)

    def _aux(self, logits, probs, expert_index, weights, indices):
        if self.balance_form != "mode":
            return super()._aux(logits, probs, expert_index, weights, indices)
        return self.balance_weight * mode_balance_loss(weights, indices, self.num_experts) / self.num_layers

    @torch.no_grad()
    def route_of(self, noise_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode routing of ONE noise embedding [D] -> (indices [k], weights [k])."""
        logits = self.router.gate(noise_emb[None])  # [1, E]
        probs = logits.float().softmax(-1)
        idx = probs.topk(self.k, dim=-1).indices  # [1, k]
        w = probs.gather(-1, idx)
        return idx[0], (w / w.sum(-1, keepdim=True).clamp_min(1e-9))[0].to(noise_emb.dtype)

    @torch.no_grad()
    def fuse(self, noise_emb: torch.Tensor) -> SwiGLUFFN:
        """Expert caching: one SwiGLU MLP equal to this layer at the noise level ``noise_emb``.

        ``sum_j g_j [(x W1_j + b1_j) * silu(x W3_j + b3_j)] W2_j + g_j b2_j`` is a SwiGLU MLP
        with hidden ``k * hidden``: W1, W3 concatenated over the chosen experts, the output
        projection stacked with each block scaled by its gate, the output bias mixed.
        """
        idx, w = self.route_of(noise_emb)
        ex = gather_experts(self)  # all E experts, also when they are split over ranks
        fused = nn.utils.skip_init(SwiGLUFFN, self.dim, self.k * self.hidden, self.out_dim,
                                   device=ex.w1.device, dtype=ex.w1.dtype)  # weights are set below
        fused.w1.weight.copy_(torch.cat([ex.w1[e].t() for e in idx.tolist()], 0))  # [kH, D]
        fused.w1.bias.copy_(torch.cat([ex.b1[e] for e in idx.tolist()]))
        fused.w3.weight.copy_(torch.cat([ex.w3[e].t() for e in idx.tolist()], 0))
        fused.w3.bias.copy_(torch.cat([ex.b3[e] for e in idx.tolist()]))
        fused.w2.weight.copy_(torch.cat([g * ex.w2[e].t() for e, g in zip(idx.tolist(), w)], 1))  # [out, kH]
        fused.w2.bias.copy_(sum(g * ex.b2[e] for e, g in zip(idx.tolist(), w)))
        fused.experts = tuple(idx.tolist())  # plain attributes: the routing this MLP stands for
        fused.gates = w.detach().clone()
        return fused

    def set_cached_routing(self, fused: SwiGLUFFN, token_shape: tuple):
        """Record in ``last_routing`` the routing a cached step stands for (every token of the
        batch -> ``fused.experts`` with ``fused.gates``), without running the router."""
        n, k = math.prod(token_shape), len(fused.experts)
        dev = fused.gates.device
        experts = torch.tensor(fused.experts, device=dev)
        probs = torch.zeros(self.num_experts, device=dev).index_put_((experts,), fused.gates.float())
        self.last_routing = RoutingInfo(
            token_index=torch.arange(n, device=dev).repeat_interleave(k), expert_index=experts.repeat(n),
            weights=fused.gates.repeat(n), kept=torch.ones(n * k, dtype=torch.bool, device=dev),
            num_experts=self.num_experts, num_tokens=n, token_shape=tuple(token_shape),
            probs=probs.expand(n, -1), indices=experts.expand(n, -1))


def mode_balance_loss(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The authors' balance term of one layer: ``E * sum_e mean_n(g_ne) * (n_e / N)``.

    weights, indices: [N, k] renormalised gates and chosen experts. g_ne is the gate of expert e
    for token n (0 when not chosen), n_e the number of tokens sent to e. Uniform routing gives
    k; all tokens on the same k experts give E (for k = 2 and equal gates).
    """
    n = indices.shape[0]
    if n == 0:
        return weights.new_zeros((), dtype=torch.float32)
    gates = torch.zeros(n, num_experts, device=weights.device).scatter(1, indices, weights.float())
    frac = torch.bincount(indices.reshape(-1), minlength=num_experts).float() / n
    return num_experts * (gates.mean(0) * frac).sum()


def swiglu_twin_hidden(moe: NoiseMoE) -> int:
    """Hidden width of the dense SwiGLU FFN whose parameters equal the MoE's ACTIVE ones
    (router + k experts): ``zoo.moe.dense_twin_hidden`` for SwiGLU experts."""
    return dense_twin_hidden(moe, swiglu=True)


# ---------------------------------------------------------------------------- transformer
class NoiseAttention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm (MoDE's ``Attention(qk_norm=True)``)."""

    def __init__(self, dim: int, heads: int, causal: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} must be divisible by heads {heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, T, d/h]
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class NoiseBlock(nn.Module):
    """``x += Attn(RMSNorm(x) + c)``; ``x += FFN(RMSNorm(x), route=c)`` with c the noise embedding.

    (MoDE's NoiseBlockMoE adds the residual to the normalised stream after attention; we keep
    the standard pre-norm residual.)
    """

    def __init__(self, dim: int, heads: int, ffn: nn.Module, causal: bool = True, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = NoiseAttention(dim, heads, causal, dropout)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, c: torch.Tensor, fused: nn.Module | None = None,
                route: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, D]; c: [B, 1, D] noise embedding; route: [B, 1, D] router input (default c)
        x = x + self.attn(self.norm1(x) + c)
        h = self.norm2(x)
        return x + (fused(h) if fused is not None else self.ffn(h, route=c if route is None else route))


class MoDEDenoiser(nn.Module):
    """The raw network F(c_in x; sigma, obs, goal) of the EDM denoiser (see ``edm.precondition``).

    Args:
        obs_dim, act_dim: state observation and action widths (obs_dim 0: images only).
        num_tasks: number of task ids; ``goal_texts`` (one string per task) feed ``goal_encoder``.
        chunk: action chunk length H predicted per denoising pass (MoDE: 10).
        n_obs_steps: observation history length To (MoDE: 1).
        dim, depth, heads: transformer width, blocks, heads.
        ffn: "moe" (noise-routed SwiGLU experts), "dense" (SwiGLU twin of equal ACTIVE params)
            or "dense_total" (SwiGLU FFN with the MoE layer's TOTAL params).
        num_experts, k, expert_hidden: MoE layout (MoDE: 4 experts, top-2, hidden 4D).
        sample_train: multinomial top-k while training (MoDE) instead of arg-top-k.
        balance, balance_weight: load-balancing form ("mode" / "switch") and weight.
        router_init: "normal" (MoDE) or "zero" (last router layer at 0).
        route_on: "noise" (MoDE default) or "noise+goal" (router input e_sigma + goal token).
        attn_dropout, goal_dropout: dropout on attention probabilities / goal features (training).
        image_shapes: {key: [C, H, W]} image observations, each encoded by a FiLM ResNet-18
            (``image_width`` 64 = ResNet-18; ``image_weights`` a state-dict path) into one token
            per observation step.
    Shapes: ``forward(x [B, H, A], sigma [B], obs [B, To, obs_dim], task [B],
    images {key: [B, To, C, H, W] uint8}) -> [B, H, A]``.
    """

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int = 1, chunk: int = 10,
                 n_obs_steps: int = 1, dim: int = 64, depth: int = 4, heads: int = 4,
                 ffn: str = "moe", num_experts: int = 4, k: int = 2, expert_hidden: int | None = None,
                 sample_train: bool = True, balance_weight: float = 0.01, causal: bool = True,
                 attn_dropout: float = 0.3, goal_dropout: float = 0.1, balance: str = "mode",
                 router_init: str = "normal", route_on: str = "noise", goal_texts: list | None = None,
                 goal_encoder: str = "words", image_shapes: dict | None = None, image_width: int = 64,
                 image_weights: str | None = None):
        super().__init__()
        if ffn not in ("moe", "dense", "dense_total"):
            raise ValueError(f"ffn must be 'moe', 'dense' or 'dense_total', got {ffn!r}")
        if route_on not in ("noise", "noise+goal"):
            raise ValueError(f"route_on must be 'noise' or 'noise+goal', got {route_on!r}")
        self.obs_dim, self.act_dim, self.num_tasks = obs_dim, act_dim, num_tasks
        self.chunk, self.n_obs_steps, self.dim, self.ffn_kind = chunk, n_obs_steps, dim, ffn
        self.route_on, self.goal_dropout = route_on, goal_dropout
        self.image_shapes = {k: list(v) for k, v in (image_shapes or {}).items()}
        if obs_dim == 0 and not self.image_shapes:
            raise ValueError("the policy needs state observations (obs_dim > 0) or image keys")
        expert_hidden = expert_hidden or 4 * dim
        self.sigma_emb = nn.Linear(1, dim)
        self.sigma_linear = nn.Linear(dim, dim, bias=False)
        texts = list(goal_texts or [f"task {i}" for i in range(num_tasks)])
        texts += [f"task {i}" for i in range(len(texts), num_tasks)]
        self.goal_enc = GoalEncoder(texts, dim, goal_encoder)
        self.obs_emb = nn.Linear(obs_dim, dim) if obs_dim else None
        self.image_enc = nn.ModuleDict({k.replace(".", "_"): FiLMResNet(dim, dim, image_width, shape[0], image_weights)
                                        for k, shape in self.image_shapes.items()})
        self.act_emb = nn.Linear(act_dim, dim)
        self.obs_tokens = n_obs_steps * (int(obs_dim > 0) + len(self.image_shapes))
        self.prefix = 2 + self.obs_tokens  # noise token, goal token, observation tokens
        self.pos_emb = nn.Parameter(torch.zeros(1, self.prefix + chunk, dim))
        nn.init.normal_(self.pos_emb, std=0.02)

        def make_ffn() -> nn.Module:
            moe = NoiseMoE(dim, expert_hidden, num_experts, k, sample_train, balance_weight, balance,
                           router_init, depth)
            if ffn == "moe":
                return moe
            if ffn == "dense":
                return SwiGLUFFN(dim, swiglu_twin_hidden(moe))
            total = sum(p.numel() for p in moe.parameters())
            return SwiGLUFFN(dim, max(1, round((total - dim) / (3 * dim + 2))))  # params = total

        self.blocks = nn.ModuleList([NoiseBlock(dim, heads, make_ffn(), causal, attn_dropout) for _ in range(depth)])
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, act_dim)

    def noise_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma [B] -> [B, D]: ``Linear(D, D)(Linear(1, D)(log(sigma) / 4))``."""
        return self.sigma_linear(self.sigma_emb((sigma.log() / 4).reshape(-1, 1)))

    def goal_embedding(self, task: torch.Tensor) -> torch.Tensor:
        """task [B] -> [B, D] goal features; while training each feature is zeroed with
        probability ``goal_dropout`` (the authors' ``mask_cond``, no rescaling)."""
        g = self.goal_enc(task)
        if self.training and self.goal_dropout > 0:
            g = g * torch.bernoulli(torch.full_like(g, 1 - self.goal_dropout))
        return g

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, task: torch.Tensor,
                images: dict | None = None, fused: list | None = None) -> torch.Tensor:
        """x: [B, H, A] scaled noisy actions; sigma [B]; obs [B, To, obs_dim]; task [B] long;
        images {key: [B, To, C, H, W]}. ``fused``: one cached expert per block (``build_expert_cache``)."""
        b = x.shape[0]
        if x.shape[1:] != (self.chunk, self.act_dim):
            raise ValueError(f"actions must be [B, {self.chunk}, {self.act_dim}], got {tuple(x.shape)}")
        if obs.shape[1:] != (self.n_obs_steps, self.obs_dim):
            raise ValueError(f"obs must be [B, {self.n_obs_steps}, {self.obs_dim}], got {tuple(obs.shape)}")
        c = self.noise_embedding(sigma.expand(b) if sigma.numel() == 1 else sigma)[:, None]  # [B, 1, D]
        goal = self.goal_embedding(task)  # [B, D]
        per_step = [self.obs_emb(obs)[:, :, None]] if self.obs_emb is not None else []  # [B, To, 1, D]
        for key, shape in self.image_shapes.items():
            img = (images or {}).get(key)
            want = (self.n_obs_steps, *shape)
            if img is None or tuple(img.shape[1:]) != want:
                got = "none" if img is None else tuple(img.shape)
                raise ValueError(f"image key '{key}' must be [B, {', '.join(map(str, want))}], got {got}")
            feat = self.image_enc[key.replace(".", "_")](img.flatten(0, 1), goal.repeat_interleave(self.n_obs_steps, 0))
            per_step.append(feat.view(b, self.n_obs_steps, 1, -1))
        obs_tok = torch.cat(per_step, 2).flatten(1, 2)  # [B, To * tokens per step, D]
        tokens = torch.cat([c, goal[:, None], obs_tok, self.act_emb(x)], 1)
        h = tokens + self.pos_emb  # [B, 2 + obs tokens + H, D]
        route = c + goal[:, None] if self.route_on == "noise+goal" else c
        for i, block in enumerate(self.blocks):
            h = block(h, c, None if fused is None else fused[i], route)
        return self.head(self.norm(h[:, self.prefix:]))  # [B, H, A]

    def moe_layers(self) -> list[NoiseMoE]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, NoiseMoE)]

    @torch.no_grad()
    def build_expert_cache(self, sigmas: torch.Tensor) -> list[list[SwiGLUFFN]]:
        """Expert caching (MoDE sec. 3.2): for each sampling sigma, one fused MLP per block.

        sigmas: [S] the solver's noise levels (without the final 0). Returns ``cache[s][layer]``.
        Dense blocks are returned as they are (nothing to fuse). Only for noise-only routing.
        """
        if self.route_on != "noise":
            raise ValueError("expert caching needs route_on='noise' (with the goal in the routing the "
                             "experts depend on the task, not only on sigma)")
        was = self.training
        self.eval()
        embs = self.noise_embedding(sigmas.reshape(-1))  # [S, D]
        cache = [[blk.ffn.fuse(e) if isinstance(blk.ffn, NoiseMoE) else blk.ffn for blk in self.blocks]
                 for e in embs]
        self.train(was)
        return cache
