"""MIGA (Mixture-of-Experts with Group Aggregation, arXiv:2410.02241) and its dense twins.

Scoring one trading day: every stock's window ``[T, F]`` goes through a temporal encoder
(GRU, or a causal dilated temporal conv for MIGA-Conv) to ``h`` [H]; a router picks ``k`` of
``G x E`` experts ("style experts", organised in G groups of E); each selected expert maps ``h``
to a hidden vector ``z_j`` [D]; the selected experts of the same group exchange information by
inner-group attention ``z'_j = LN(z_j + W_o^g Attn(W_q^g z_j, W_k^g z_{j'}, W_v^g z_{j'}))``
(``j'`` ranging over the token's selected experts in group g); each ``z'_j`` gives a score
``s_j = w^T z'_j + b`` and the stock's score is the gate-weighted sum ``sum_j g_j s_j``.

The paper describes the router, the groups and the inner-group attention in words only (no code
is public), so these choices are ours (see the task README): ``group_limit`` (default 1) makes
the router pick a style group first (the group holding the most probable expert) and then the
top-k experts inside it, so the k selected experts always share a group and the attention always
has partners; ``group_limit=None`` is plain top-k over all G x E experts, where attention only
links picks that happen to fall in the same group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe import DenseFFN, MLPExperts, RoutedModule, RoutingInfo, build_router
from zoo.moe.losses import router_z_loss, switch_balance_loss


class TemporalEncoder(nn.Module):
    """Per-stock encoder of a feature window: x [S, T, F] -> h [S, H].

    ``kind="gru"``: a GRU, h = last hidden state (MIGA's GRU router/encoder, as in the Qlib port).
    ``kind="conv"``: input projection then ``num_layers`` residual causal Conv1d blocks with
    kernel 3 and dilation 2^l (MIGA-Conv), h = the last time step (it sees the whole window
    when ``2^(num_layers+1) - 1 >= T``).
    """

    def __init__(self, num_features: int, hidden: int = 32, kind: str = "gru", num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if kind not in ("gru", "conv"):
            raise ValueError(f"encoder must be 'gru' or 'conv', got {kind!r}")
        self.kind, self.hidden = kind, hidden
        if kind == "gru":
            self.gru = nn.GRU(num_features, hidden, num_layers=num_layers, batch_first=True,
                              dropout=dropout if num_layers > 1 else 0.0)
        else:
            self.inp = nn.Linear(num_features, hidden)
            self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, 3, dilation=2 ** i) for i in range(num_layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gru":
            out, _ = self.gru(x)  # [S, T, H]
            return self.drop(out[:, -1])
        z = self.inp(x).transpose(1, 2)  # [S, H, T]
        for conv in self.convs:
            pad = conv.dilation[0] * (conv.kernel_size[0] - 1)
            z = z + F.gelu(conv(F.pad(z, (pad, 0))))  # causal: output t sees inputs <= t
        return self.drop(z[:, :, -1])


class MIGAHead(RoutedModule):
    """Grouped experts with inner-group attention; h [S, dim] -> scores [S].

    Args:
        dim: encoder width H.
        num_groups, experts_per_group: G and E (G*E experts in all).
        k: experts per stock.
        expert_hidden, expert_dim: each expert is an MLP ``dim -> expert_hidden -> expert_dim``.
        heads: attention heads of the inner-group attention (``expert_dim % heads == 0``).
        group_limit: number of groups a stock may draw its k experts from (None = no limit).
        router: a token-choice router name of ``zoo.moe.routers`` (its logits are used).
        noise_std: noisy top-k std while training.
        balance_weight, z_weight: Switch balance loss and router z-loss weights.
    """

    def __init__(self, dim: int, num_groups: int = 4, experts_per_group: int = 4, k: int = 2,
                 expert_hidden: int = 32, expert_dim: int = 16, heads: int = 2, group_limit: int | None = 1,
                 router: str = "topk", noise_std: float = 0.0, balance_weight: float = 0.01,
                 z_weight: float = 0.0, activation: str = "gelu"):
        super().__init__()
        total = num_groups * experts_per_group
        if group_limit is not None and not 1 <= group_limit <= num_groups:
            raise ValueError(f"group_limit must be in [1, num_groups={num_groups}] or None, got {group_limit}")
        allowed = total if group_limit is None else group_limit * experts_per_group
        if not 1 <= k <= allowed:
            raise ValueError(f"k={k} must be between 1 and {allowed} (the experts the group limit allows)")
        if expert_dim % heads:
            raise ValueError(f"expert_dim={expert_dim} must be divisible by heads={heads}")
        self.dim, self.num_groups, self.experts_per_group, self.k = dim, num_groups, experts_per_group, k
        self.num_experts, self.expert_dim, self.heads = total, expert_dim, heads
        self.group_limit = None if group_limit is None or group_limit >= num_groups else group_limit
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.router = build_router(router, dim, total, k=k, noise_std=noise_std)
        if getattr(self.router, "kind", "token") != "token":
            raise ValueError(f"MIGA needs a token-choice router, {router!r} is not one")
        self.experts = MLPExperts(total, dim, expert_hidden, out_dim=expert_dim, activation=activation)
        # inner-group attention: one set of projections per group, [G, D, D] (+ bias [G, D])
        d = expert_dim
        self.w_qkv = nn.Parameter(torch.randn(num_groups, d, 3 * d) / math.sqrt(d))
        self.b_qkv = nn.Parameter(torch.zeros(num_groups, 3 * d))
        self.w_out = nn.Parameter(torch.randn(num_groups, d, d) / math.sqrt(d))
        self.b_out = nn.Parameter(torch.zeros(num_groups, d))
        self.norm = nn.LayerNorm(d)
        self.score = nn.Linear(d, 1)

    # ------------------------------------------------------------------ routing
    def route(self, h: torch.Tensor):
        """-> indices [S, k], gate weights [S, k] (sum to 1), logits [S, G*E], probs [S, G*E]."""
        indices, weights, logits = self.router(h)
        probs = logits.float().softmax(-1)
        if self.group_limit is not None:
            # group-limited top-k: keep the `group_limit` groups holding the most probable experts
            grouped = probs.view(-1, self.num_groups, self.experts_per_group)  # [S, G, E]
            top_groups = grouped.amax(-1).topk(self.group_limit, dim=-1).indices  # [S, Gl]
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter(1, top_groups, True)
            masked = torch.where(keep[..., None], grouped, torch.zeros_like(grouped)).flatten(1)
            w, indices = masked.topk(self.k, dim=-1)
            weights = (w / w.sum(-1, keepdim=True).clamp_min(1e-9)).to(h.dtype)
        return indices, weights, logits, probs

    def inner_group_attention(self, z: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """z [S, k, D] hidden outputs of the selected experts, group [S, k] their groups ->
        [S, k, D]; slot j attends to the slots of its own group (itself included)."""
        s, k, d = z.shape
        hd = d // self.heads
        qkv = self._per_group_linear(z, group, self.w_qkv, self.b_qkv)  # [S, k, 3D]
        q, kk, v = qkv.view(s, k, 3, self.heads, hd).unbind(2)  # each [S, k, heads, hd]
        att = torch.einsum("sihc,sjhc->shij", q, kk) / math.sqrt(hd)  # [S, heads, k, k]
        same = (group[:, :, None] == group[:, None, :])[:, None]  # [S, 1, k, k]
        att = att.masked_fill(~same, float("-inf")).softmax(-1)
        o = torch.einsum("shij,sjhc->sihc", att, v).reshape(s, k, d)  # [S, k, D]
        o = self._per_group_linear(o, group, self.w_out, self.b_out)
        return self.norm(z + o)

    @staticmethod
    def _per_group_linear(z: torch.Tensor, group: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``z_j W^{g_j} + b^{g_j}``: z [S, k, D], group [S, k], w [G, D, O], b [G, O] -> [S, k, O].
        One matmul against every group's weights, then a gather (cheaper than per-token bmm)."""
        g, d, o = w.shape
        allg = (z @ w.permute(1, 0, 2).reshape(d, g * o)).view(*z.shape[:2], g, o) + b  # [S, k, G, O]
        return allg.gather(2, group[:, :, None, None].expand(-1, -1, 1, o)).squeeze(2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = h.shape[0]
        indices, weights, logits, probs = self.route(h)  # [S, k]
        token_index = torch.arange(s, device=h.device).repeat_interleave(self.k)  # [S*k]
        expert_index = indices.reshape(-1)
        order = torch.argsort(expert_index, stable=True)
        counts = torch.bincount(expert_index, minlength=self.num_experts)
        z_sorted = self.experts.forward_sorted(h[token_index[order]], counts)  # [S*k, D]
        z = torch.empty_like(z_sorted).index_copy(0, order, z_sorted).view(s, self.k, -1)  # [S, k, D]
        group = torch.div(indices, self.experts_per_group, rounding_mode="floor")  # [S, k]
        z = self.inner_group_attention(z, group)
        slot_scores = self.score(z).squeeze(-1)  # [S, k]
        out = (weights * slot_scores).sum(-1)  # [S]

        aux = h.new_zeros((), dtype=torch.float32)
        if self.balance_weight:
            aux = aux + self.balance_weight * switch_balance_loss(probs, expert_index, self.num_experts)
        if self.z_weight:
            aux = aux + self.z_weight * router_z_loss(logits)
        self.aux_loss = aux
        same = (group[:, :, None] == group[:, None, :]).sum(-1).gt(1).any(-1)  # [S] has a group partner
        self.last_routing = RoutingInfo(
            token_index=token_index.detach(), expert_index=expert_index.detach(),
            weights=weights.reshape(-1).detach(), kept=torch.ones_like(expert_index, dtype=torch.bool),
            num_experts=self.num_experts, num_tokens=s, token_shape=(s,), probs=probs.detach(),
            logits=logits.detach(), indices=indices.detach(),
            extra={"shared_group_fraction": float(same.float().mean()) if s else 0.0,
                   "group_load": torch.bincount(group.reshape(-1), minlength=self.num_groups).tolist()})
        return out

    def attention_params_per_group(self) -> int:
        d = self.expert_dim
        return 3 * d * d + 3 * d + d * d + d

    def inactive_param_count(self) -> int:
        """Unused per stock: G*E - k experts, and the attention of the groups it does not visit."""
        groups_used = min(self.k, self.group_limit or self.num_groups, self.num_groups)
        return ((self.num_experts - self.k) * self.experts.params_per_expert()
                + (self.num_groups - groups_used) * self.attention_params_per_group())

    def active_param_count(self) -> int:
        return sum(p.numel() for p in self.parameters()) - self.inactive_param_count()


class StockModel(nn.Module):
    """Scores the stocks of B trading days: x [B, N, T, F] (mask [B, N]) -> scores [B, N].

    ``head``:
      - ``"miga"``: encoder + :class:`MIGAHead`;
      - ``"dense"``: the same encoder + a ``DenseFFN(H, h, 1)`` whose parameter count equals the
        MIGA head's active parameters (router, k experts, the attention of the visited groups,
        score layer);
      - ``"linear"``: a linear model on the features of the day itself (``x[:, :, -1]``).
    Stocks outside ``mask`` are not encoded or routed; their score is 0.
    """

    def __init__(self, num_features: int, head: str = "miga", encoder: str = "gru", hidden: int = 32,
                 num_layers: int = 1, dropout: float = 0.0, **miga_kw):
        super().__init__()
        if head not in ("miga", "dense", "linear"):
            raise ValueError(f"head must be 'miga', 'dense' or 'linear', got {head!r}")
        self.head_kind, self.num_features = head, num_features
        if head == "linear":
            self.encoder = None
            self.head = nn.Linear(num_features, 1)
            return
        self.encoder = TemporalEncoder(num_features, hidden, encoder, num_layers, dropout)
        if head == "miga":
            self.head = MIGAHead(hidden, **miga_kw)
        else:
            active = MIGAHead(hidden, **miga_kw).active_param_count()
            self.head = DenseFFN(hidden, dense_hidden_for(active, hidden), out_dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.num_features:
            raise ValueError(f"StockModel expects x [B, N, T, {self.num_features}], got {tuple(x.shape)}")
        b, n, t, f = x.shape
        flat = x.reshape(b * n, t, f)  # [B*N, T, F]
        keep = None if mask is None else mask.reshape(-1)
        if keep is not None:
            flat = flat[keep]
        if self.encoder is None:
            s = self.head(flat[:, -1]).squeeze(-1)
        else:
            s = self.head(self.encoder(flat))
            s = s.squeeze(-1) if s.dim() == 2 else s
        if keep is None:
            return s.view(b, n)
        return x.new_zeros(b * n).masked_scatter(keep, s).view(b, n)


def dense_hidden_for(active_params: int, dim: int) -> int:
    """Hidden width h of ``DenseFFN(dim, h, 1)`` (``h * (dim + 2) + 1`` params) closest to
    ``active_params``."""
    return max(1, round((active_params - 1) / (dim + 2)))
