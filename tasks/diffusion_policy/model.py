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
  gate weights renormalised over the chosen k; last router layer zero-initialised;
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
    The last layer starts at zero so all experts begin equally likely (MoDE's default init).
    """

    def __init__(self, route_dim: int, num_experts: int, k: int = 2, sample_train: bool = True):
        super().__init__(route_dim, num_experts, k=k, renormalize=True, sample_train=sample_train)
        self.gate = nn.Sequential(nn.Linear(route_dim, 2 * route_dim), nn.GELU(),
                                  nn.Linear(2 * route_dim, num_experts))
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)

    def compute_logits(self, x, route):
        if route is None:
            raise ValueError("NoiseRouter routes on the noise embedding only: call moe(x, route=noise_emb)")
        return self.gate(route)  # [N, E]


class NoiseMoE(MoE):
    """zoo ``MoE`` with SwiGLU experts and the MoDE noise router (routes only on ``route=``)."""

    def __init__(self, dim: int, hidden: int, num_experts: int = 4, k: int = 2,
                 sample_train: bool = True, balance_weight: float = 0.01):
        super().__init__(dim, hidden, num_experts=num_experts, k=k,
                         router=NoiseRouter(dim, num_experts, k, sample_train=sample_train),
                         route_dim=dim, balance="switch", balance_weight=balance_weight)
        self.experts = SwiGLUExperts(num_experts, dim, hidden)

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

    def forward(self, x: torch.Tensor, c: torch.Tensor, fused: nn.Module | None = None) -> torch.Tensor:
        # x: [B, T, D]; c: [B, 1, D] noise embedding
        x = x + self.attn(self.norm1(x) + c)
        h = self.norm2(x)
        return x + (fused(h) if fused is not None else self.ffn(h, route=c))


class MoDEDenoiser(nn.Module):
    """The raw network F(c_in x; sigma, obs, task) of the EDM denoiser (see ``edm.precondition``).

    Args:
        obs_dim, act_dim: state observation and action widths.
        num_tasks: number of task ids (learned task embeddings; MoDE uses CLIP goals instead).
        chunk: action chunk length H predicted per denoising pass.
        n_obs_steps: observation history length To.
        dim, depth, heads: transformer width, blocks, heads.
        ffn: "moe" (noise-routed SwiGLU experts) or "dense" (SwiGLU twin of equal active params).
        num_experts, k, expert_hidden: MoE layout (MoDE: 4 experts, top-2, hidden 4D).
        sample_train: multinomial top-k while training (MoDE) instead of arg-top-k.
        balance_weight: weight of the Switch load-balancing loss (MoDE: 0.01 from scratch).
    Shapes: ``forward(x [B, H, A], sigma [B], obs [B, To, obs_dim], task [B]) -> [B, H, A]``.
    """

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int = 1, chunk: int = 10,
                 n_obs_steps: int = 2, dim: int = 64, depth: int = 4, heads: int = 4,
                 ffn: str = "moe", num_experts: int = 4, k: int = 2, expert_hidden: int | None = None,
                 sample_train: bool = True, balance_weight: float = 0.01, causal: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if ffn not in ("moe", "dense"):
            raise ValueError(f"ffn must be 'moe' or 'dense', got {ffn!r}")
        self.obs_dim, self.act_dim, self.num_tasks = obs_dim, act_dim, num_tasks
        self.chunk, self.n_obs_steps, self.dim, self.ffn_kind = chunk, n_obs_steps, dim, ffn
        expert_hidden = expert_hidden or 4 * dim
        self.sigma_emb = nn.Linear(1, dim)
        self.sigma_linear = nn.Linear(dim, dim, bias=False)
        self.task_emb = nn.Embedding(num_tasks, dim)
        self.obs_emb = nn.Linear(obs_dim, dim)
        self.act_emb = nn.Linear(act_dim, dim)
        self.prefix = 2 + n_obs_steps  # noise token, task token, obs tokens
        self.pos_emb = nn.Parameter(torch.zeros(1, self.prefix + chunk, dim))
        nn.init.normal_(self.pos_emb, std=0.02)

        def make_ffn() -> nn.Module:
            moe = NoiseMoE(dim, expert_hidden, num_experts, k, sample_train, balance_weight)
            return moe if ffn == "moe" else SwiGLUFFN(dim, swiglu_twin_hidden(moe))

        self.blocks = nn.ModuleList([NoiseBlock(dim, heads, make_ffn(), causal, dropout) for _ in range(depth)])
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, act_dim)

    def noise_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma [B] -> [B, D]: ``Linear(D, D)(Linear(1, D)(log(sigma) / 4))``."""
        return self.sigma_linear(self.sigma_emb((sigma.log() / 4).reshape(-1, 1)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, task: torch.Tensor,
                fused: list | None = None) -> torch.Tensor:
        """x: [B, H, A] scaled noisy actions; sigma [B]; obs [B, To, obs_dim]; task [B] long.

        ``fused``: one cached expert per block (from ``build_expert_cache``) for this step.
        """
        b = x.shape[0]
        if x.shape[1:] != (self.chunk, self.act_dim):
            raise ValueError(f"actions must be [B, {self.chunk}, {self.act_dim}], got {tuple(x.shape)}")
        if obs.shape[1:] != (self.n_obs_steps, self.obs_dim):
            raise ValueError(f"obs must be [B, {self.n_obs_steps}, {self.obs_dim}], got {tuple(obs.shape)}")
        c = self.noise_embedding(sigma.expand(b) if sigma.numel() == 1 else sigma)[:, None]  # [B, 1, D]
        tokens = torch.cat([c, self.task_emb(task)[:, None], self.obs_emb(obs), self.act_emb(x)], 1)
        h = tokens + self.pos_emb  # [B, 2 + To + H, D]
        for i, block in enumerate(self.blocks):
            h = block(h, c, None if fused is None else fused[i])
        return self.head(self.norm(h[:, self.prefix:]))  # [B, H, A]

    def moe_layers(self) -> list[NoiseMoE]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, NoiseMoE)]

    @torch.no_grad()
    def build_expert_cache(self, sigmas: torch.Tensor) -> list[list[SwiGLUFFN]]:
        """Expert caching (MoDE sec. 3.2): for each sampling sigma, one fused MLP per block.

        sigmas: [S] the solver's noise levels (without the final 0). Returns ``cache[s][layer]``.
        Dense blocks are returned as they are (nothing to fuse).
        """
        was = self.training
        self.eval()
        embs = self.noise_embedding(sigmas.reshape(-1))  # [S, D]
        cache = [[blk.ffn.fuse(e) if isinstance(blk.ffn, NoiseMoE) else blk.ffn for blk in self.blocks]
                 for e in embs]
        self.train(was)
        return cache
