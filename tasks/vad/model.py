"""GS-MoE: class experts over a task encoder, combined by a cross-attention gate.

D'Amicantonio, Majhi et al., "Mixture of Experts Guided by Gaussian Splatters Matters: A new
Approach to Weakly-Supervised Video Anomaly Detection", ICCV 2025 (arXiv 2508.06318).

- :class:`TaskEncoder` (sec. 3.1): the UR-DMU-style temporal model -- a temporal conv embedding
  (kernel 3) and a transformer encoder -- giving task-aware snippet features f [B, T, D] and
  coarse snippet scores, trained with top-k MIL and then TGS (``losses.py``).
- :class:`ClassExperts` (sec. 3.3): one expert per anomaly class (or per K-means cluster of
  classes), each a small transformer block (temporal self-attention + LayerNorm) followed by an
  MLP to one snippet logit. The E blocks are kept as batched weights ``[E, ...]`` and the MLPs
  are a :class:`zoo.moe.MLPExperts`, so all experts run as a few batched matmuls.
- :class:`CrossAttentionGate` (sec. 3.4): projects each expert's logit to a token, adds an
  expert embedding, lets each snippet's head input h_t (:class:`HeadInput`: projected input
  snippets + scaled task-aware features) cross-attend over the E expert tokens, and maps
  [h_t, context_t] through an MLP; the final logit is the attention-weighted
  mixture of expert logits plus that MLP's correction. It is a :class:`zoo.moe.RoutedModule`:
  its attention weights are the routing (``probs`` [N, E], top-1 assignment per snippet), so
  routing statistics and per-class usage plots come from the zoo.
- :class:`DenseHead`: the dense twin of experts + gate -- one transformer block and one
  :class:`zoo.moe.DenseFFN` whose hidden width makes its parameters equal to the experts' and
  gate's (all experts are active for every snippet, so total = active).

Inputs may carry crops (``[B, crops, T, C]``, e.g. the 10 crops of UCF-Crime I3D features):
crops are folded into the batch and their snippet probabilities averaged, as UR-DMU does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe import DenseFFN, MLPExperts, RoutedModule, RoutingInfo

VARIANTS = ("moe", "mean", "dense", "encoder")
EXPERT_INPUTS = ("task", "both", "input")


def band_mask(T: int, window: int | None, device=None) -> torch.Tensor | None:
    """Boolean [T, T] attention mask allowing |i - j| <= window (None = global attention)."""
    if window is None:
        return None
    t = torch.arange(T, device=device)
    return (t[:, None] - t[None, :]).abs() <= window


class TaskEncoder(nn.Module):
    """Temporal task encoder: conv embedding, dilated temporal convs, local self-attention.

    x [B, T, C] -> Conv1d(k=3) + ReLU (UR-DMU's embedding) -> residual dilated Conv1d blocks
    (dilations 1, 2, 4, RTFM's pyramid of dilated convolutions) -> ``attn_layers`` pre-norm
    transformer layers whose attention is limited to a band of +-``attn_window`` snippets ->
    LayerNorm -> MLP head. Global attention (``attn_window: null``) lets every snippet see the
    whole video, and with video-level labels only it learns a video classifier rather than
    where the event is; a band keeps scores local.
    """

    def __init__(self, in_dim: int, dim: int = 64, attn_layers: int = 1, heads: int = 4,
                 dropout: float = 0.1, dilations: tuple = (1, 2, 4), attn_window: int | None = 4):
        super().__init__()
        self.attn_window = attn_window
        self.embed = nn.Conv1d(in_dim, dim, kernel_size=3, padding=1)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, 3, padding=d, dilation=d) for d in dilations)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(attn_layers))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (features [B, T, D], logits [B, T])."""
        h = F.relu(self.embed(x.transpose(1, 2)))               # [B, D, T]
        for conv in self.convs:
            h = h + self.drop(F.gelu(conv(h)))
        h = h.transpose(1, 2)                                    # [B, T, D]
        mask = band_mask(h.shape[1], self.attn_window, h.device)
        for layer in self.layers:  # PyTorch masks are True where attention is NOT allowed
            h = layer(h, src_mask=None if mask is None else ~mask)
        f = self.norm(h)
        return f, self.head(self.drop(f)).squeeze(-1)


class ExpertBlocks(nn.Module):
    """E independent pre-norm transformer attention blocks as batched weights.

    For expert e: h_e = x + W_o,e MHA(LN_e(x) W_qkv,e). x [B, T, D] -> [E, B, T, D].
    """

    def __init__(self, num_experts: int, dim: int, heads: int = 4, attn_window: int | None = 4):
        super().__init__()
        self.attn_window = attn_window
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.num_experts, self.dim, self.heads = num_experts, dim, heads
        self.ln_w = nn.Parameter(torch.ones(num_experts, dim))
        self.ln_b = nn.Parameter(torch.zeros(num_experts, dim))
        self.w_qkv = nn.Parameter(torch.empty(num_experts, dim, 3 * dim))
        self.b_qkv = nn.Parameter(torch.zeros(num_experts, 3 * dim))
        self.w_o = nn.Parameter(torch.empty(num_experts, dim, dim))
        self.b_o = nn.Parameter(torch.zeros(num_experts, dim))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.w_qkv, -bound, bound)
        nn.init.uniform_(self.w_o, -bound, bound)

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, H, D = self.num_experts, self.heads, self.dim
        B, T, _ = x.shape
        xn = F.layer_norm(x, (D,))                                                  # [B, T, D]
        xn = xn.unsqueeze(0) * self.ln_w[:, None, None] + self.ln_b[:, None, None]  # [E, B, T, D]
        qkv = torch.einsum("ebtd,edf->ebtf", xn, self.w_qkv) + self.b_qkv[:, None, None]
        q, k, v = qkv.view(E * B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)        # [E*B, H, T, dh]
        mask = band_mask(T, self.attn_window, x.device)                            # [T, T] or None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                # [E*B, H, T, dh]
        a = a.transpose(1, 2).reshape(E, B, T, D)
        return x.unsqueeze(0) + torch.einsum("ebtd,edf->ebtf", a, self.w_o) + self.b_o[:, None, None]


class ClassExperts(nn.Module):
    """One expert per class group: transformer block + MLP -> snippet logit.

    f [B, T, D] -> logits [B, T, E]. The MLPs are a ``zoo.moe.MLPExperts`` run on each
    expert's own tokens with ``forward_batched`` ([E, B*T, D] -> [E, B*T, 1]).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, heads: int = 4,
                 attn_window: int | None = 4):
        super().__init__()
        self.num_experts = num_experts
        self.blocks = ExpertBlocks(num_experts, dim, heads, attn_window)
        self.mlp = MLPExperts(num_experts, dim, hidden, out_dim=1)

    def params_per_expert(self) -> int:
        return self.blocks.params_per_expert() + self.mlp.params_per_expert()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B, T, D = f.shape
        h = self.blocks(f).reshape(self.num_experts, B * T, D)      # [E, B*T, D]
        logits = self.mlp.forward_batched(h)                         # [E, B*T, 1]
        return logits.view(self.num_experts, B, T).permute(1, 2, 0)  # [B, T, E]


class CrossAttentionGate(RoutedModule):
    """GS-MoE gate: snippet features cross-attend over projected expert logits (sec. 3.4).

    token_{t,e} = W_p l_{t,e} + emb_e,  e = 1..E                 # expert logit -> token [D]
    c_t, a_t = MHA(query = f_t, keys/values = token_{t,1..E})    # a_t [E] attention weights
    logit_t = sum_e a_{t,e} l_{t,e} + MLP([f_t, c_t])            # MLP's last layer starts at 0

    The query projection and the MLP's last layer start at zero, so the gate starts as the plain
    average of the experts' logits (uniform attention) and learns where to look from there. With
    ``task_token=True`` the task encoder's own logit l_{t,0} joins as one more token (e = 0), so
    the gate can fall back on the task-aware score where no expert is confident.

    Every expert is evaluated for every snippet (the paper's dense mixture). The routing record
    holds the attention on the E experts (renormalised) as ``probs`` and each snippet's
    most-attended expert as its assignment; ``extra["task_share"]`` is the mean weight left on
    the task token (0 without one).
    """

    def __init__(self, num_experts: int, dim: int, heads: int = 4, task_token: bool = False):
        super().__init__()
        self.num_experts, self.task_token = num_experts, task_token
        self.proj = nn.Linear(1, dim)
        self.expert_emb = nn.Parameter(torch.randn(num_experts + int(task_token), dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))
        # start as the plain average of the experts: query projection 0 -> uniform attention,
        # correction MLP 0 -> no correction; both learn from there
        nn.init.zeros_(self.attn.in_proj_weight[:dim])
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, f: torch.Tensor, expert_logits: torch.Tensor,
                task_logits: torch.Tensor) -> torch.Tensor:
        """f [B, T, D], expert_logits [B, T, E], task_logits [B, T] -> final logits [B, T]."""
        B, T, D = f.shape
        E = self.num_experts
        logits = expert_logits
        if self.task_token:
            logits = torch.cat([task_logits.unsqueeze(-1), expert_logits], -1)
        logits = logits.reshape(B * T, -1)                                   # [N, E(+1)]
        q = f.reshape(B * T, 1, D)                                           # [N, 1, D]
        tokens = self.proj(logits.unsqueeze(-1)) + self.expert_emb           # [N, E(+1), D]
        ctx, attn = self.attn(q, tokens, tokens, need_weights=True)  # [N, 1, D], [N, 1, E(+1)]
        a = attn.squeeze(1)                                                  # [N, E(+1)]
        mix = (a * logits).sum(-1)                                           # [N]
        out = mix + self.mlp(torch.cat([q.squeeze(1), ctx.squeeze(1)], -1)).squeeze(-1)
        a_exp = a[:, int(self.task_token):].detach()
        a_exp = a_exp / a_exp.sum(-1, keepdim=True).clamp_min(1e-12)         # [N, E]
        top_w, top_e = a_exp.max(-1)
        n = B * T
        self.aux_loss = f.new_zeros(())
        self.last_routing = RoutingInfo(
            token_index=torch.arange(n, device=f.device), expert_index=top_e, weights=top_w,
            kept=torch.ones(n, dtype=torch.bool, device=f.device), num_experts=E, num_tokens=n,
            token_shape=(B, T), probs=a_exp, logits=None,
            extra={"task_share": float(a[:, 0].detach().mean()) if self.task_token else 0.0})
        return out.view(B, T)


class DenseHead(nn.Module):
    """Dense twin of experts + gate: one attention block and one DenseFFN to a correction of the
    task encoder's logit (its last layer starts at 0, like the gate's MLP):
    logit_t = l_{t,0} + FFN(block(f))_t."""

    def __init__(self, dim: int, hidden: int, heads: int = 4, attn_window: int | None = 4):
        super().__init__()
        self.block = ExpertBlocks(1, dim, heads, attn_window)
        self.ffn = DenseFFN(dim, hidden, out_dim=1)
        nn.init.zeros_(self.ffn.fc2.weight)
        nn.init.zeros_(self.ffn.fc2.bias)

    def forward(self, f: torch.Tensor, task_logits: torch.Tensor) -> torch.Tensor:
        return task_logits + self.ffn(self.block(f)[0]).squeeze(-1)  # [B, T]


class HeadInput(nn.Module):
    """What experts, gate and the dense head read, besides the task-aware features f.

    ``input``: h = LN(W x), a projection of the input snippets; ``both``: h = LN(W x) + alpha f
    with a learnt scalar alpha starting at 0, so the heads start from the input snippets and
    take in the task-aware features as far as that helps. (``task``, the paper's wiring, is
    h = f and needs no module.)
    """

    def __init__(self, in_dim: int, dim: int, mode: str = "both"):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.task_scale = nn.Parameter(torch.zeros(())) if mode == "both" else None

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """x [B, T, C], f [B, T, D] -> [B, T, D]."""
        h = self.norm(self.proj(x))
        return h if self.task_scale is None else h + self.task_scale * f


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dense_head_hidden(num_experts: int, dim: int, expert_hidden: int, heads: int = 4,
                      task_token: bool = False) -> int:
    """Hidden width h whose :class:`DenseHead` has the parameters of experts + gate.

    DenseHead(h) = block(1 expert) + (dim + 1) h + h + 1 parameters, solved for h."""
    target = count_params(ClassExperts(num_experts, dim, expert_hidden, heads)) + \
        count_params(CrossAttentionGate(num_experts, dim, heads, task_token))
    block = ExpertBlocks(1, dim, heads).params_per_expert()
    return max(1, round((target - block - 1) / (dim + 2)))


class GSMoE(nn.Module):
    """Task encoder + class experts + gate (``variant="moe"``) and its ablations.

    variant: ``moe`` (experts + cross-attention gate), ``mean`` (experts averaged, no gate),
    ``dense`` (the dense twin head), ``encoder`` (the MIL/TGS baseline: encoder scores only).
    ``forward`` returns final snippet probabilities [B, T]; :meth:`forward_parts` returns every
    branch's logits for training.
    """

    def __init__(self, in_dim: int, num_experts: int = 4, dim: int = 64, expert_hidden: int = 64,
                 attn_layers: int = 1, heads: int = 4, dropout: float = 0.1,
                 attn_window: int | None = 4, variant: str = "moe", expert_input: str = "both",
                 gate_task_token: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if expert_input not in EXPERT_INPUTS:
            raise ValueError(f"expert_input must be one of {EXPERT_INPUTS}, got {expert_input!r}")
        self.variant, self.in_dim, self.num_experts = variant, in_dim, num_experts
        self.input_proj = HeadInput(in_dim, dim, expert_input) if expert_input != "task" and \
            variant in ("moe", "mean", "dense") else None
        self.encoder = TaskEncoder(in_dim, dim, attn_layers, heads, dropout, attn_window=attn_window)
        self.experts = self.gate = self.dense = None
        if variant in ("moe", "mean"):
            self.experts = ClassExperts(num_experts, dim, expert_hidden, heads, attn_window)
        if variant == "moe":
            self.gate = CrossAttentionGate(num_experts, dim, heads, gate_task_token)
        if variant == "dense":
            hidden = dense_head_hidden(num_experts, dim, expert_hidden, heads, gate_task_token)
            self.dense = DenseHead(dim, hidden, heads, attn_window)

    def head_params(self) -> int:
        """Parameters beyond the task encoder (experts + gate, or the dense head)."""
        return sum(count_params(m) for m in (self.input_proj, self.experts, self.gate, self.dense)
                   if m is not None)

    def forward_parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, T, C] or [B, crops, T, C] -> dict of probabilities averaged over crops:
        ``encoder`` [B, T], ``experts`` [B, T, E] (if any), ``final`` [B, T]."""
        if x.dim() == 4:
            B, n_crops = x.shape[:2]
            x = x.flatten(0, 1)
        elif x.dim() == 3:
            B, n_crops = x.shape[0], 1
        else:
            raise ValueError(f"GSMoE expects [B, T, C] or [B, crops, T, C], got {tuple(x.shape)}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"GSMoE was built for {self.in_dim}-d features, got {x.shape[-1]}")

        def crop_mean(logits):  # sigmoid, then average crops (UR-DMU)
            p = torch.sigmoid(logits)
            return p.view(B, n_crops, *p.shape[1:]).mean(1)

        f, enc = self.encoder(x)
        out = {"encoder": crop_mean(enc)}
        if self.input_proj is not None:  # the heads' input [B*crops, T, D]
            f = self.input_proj(x, f)
        if self.experts is not None:
            exp_logits = self.experts(f)                 # [B*crops, T, E]
            out["experts"] = crop_mean(exp_logits)
            if self.gate is not None:
                out["final"] = crop_mean(self.gate(f, exp_logits, enc))
            else:
                out["final"] = out["experts"].mean(-1)
        elif self.dense is not None:
            out["final"] = crop_mean(self.dense(f, enc))
        else:
            out["final"] = out["encoder"]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)["final"]
