"""M3ViT: a task-conditioned Mixture-of-Experts ViT for multi-task dense prediction.

Liang et al., "M3ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning
with Model-Accelerator Co-design", NeurIPS 2022 (code: VITA-Group/M3ViT).

- Encoder (sec. 3.2): a timm ``VisionTransformer`` whose MLP in every other block (blocks 1, 3,
  ...) is a ``zoo.moe.MoE`` with E experts and top-k routing.
- Task-dependent gating (sec. 3.2, "task-dependent gating"): either one gate per task sharing the
  experts (``routing="multigate"``, the repository's main setting) or one gate on
  ``concat(token, task embedding)`` (``routing="task_embed"``, the embedding is an MLP of the
  task's one-hot, as the repository's ``gate_task_represent``). ``routing="shared"`` is the
  task-agnostic ablation (one token-routed encoder pass for all tasks).
- Gate details from the code: logits without bias, Gaussian noise of std 1/E while training,
  softmax over all experts then top-k *without* renormalising, auxiliary loss
  ``cv^2(importance) + cv^2(load)`` weighted 0.01 (Shazeer 2017 eq. 6-10).
- Because routing depends on the task, the encoder runs once per task (one pass per task in a
  multi-task forward); single-task inference (sec. 3.3) runs one pass with that task's gate only,
  its k selected experts per token and its own decoder.
- Decoders: a light SETR-PUP-like progressive upsampling head per task (the repository's
  ``VisionTransformerUpHead``): conv3x3 + BN + ReLU, x2 bilinear upsampling stages, conv1x1.

The dense twin (``moe=False``) replaces each MoE MLP by a ``DenseFFN`` of equal active parameters
(``dense_twin_hidden``) and shares one encoder pass across all tasks (the usual multi-task
baseline); with a single task in ``tasks`` it is the single-task dense baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from zoo.moe import DenseFFN, MoE, dense_twin_hidden, route_with
from zoo.moe.routers import TopKRouter

ROUTINGS = ("multigate", "task_embed", "shared")
TASK_CHANNELS = {"depth": 1, "normals": 3, "edge": 1}  # semseg: num_classes


class TaskRouter(TopKRouter):
    """Noisy top-k gate whose logits depend on the task (M3ViT ``NoisyGate_VMoE``).

    ``route`` is the task signal for every token, [N, r]:

    - ``mode="multigate"``: r = T, a one-hot task vector; logits = x W_t with one gate matrix
      W_t [dim, E] per task (no bias). When all tokens carry the same task (single-task inference,
      a per-task encoder pass) only that task's gate is evaluated.
    - ``mode="task_embed"``: r = task embedding width; logits = concat(x, emb) W (no bias).

    Noise, softmax-then-top-k and ``renormalize`` come from ``zoo.moe.routers.TopKRouter``.
    """

    def __init__(self, in_dim: int, num_experts: int, k: int, num_tasks: int, mode: str = "multigate",
                 task_dim: int = 0, noise_std: float = 0.0, renormalize: bool = False):
        super().__init__(in_dim, num_experts, k=k, noise_std=noise_std, renormalize=renormalize)
        if mode not in ("multigate", "task_embed"):
            raise ValueError(f"TaskRouter mode={mode!r}; choose 'multigate' or 'task_embed'")
        self.mode, self.num_tasks, self.task_dim = mode, num_tasks, task_dim
        if mode == "multigate":
            del self.gate
            self.weight = nn.Parameter(torch.empty(num_tasks, in_dim, num_experts))  # [T, dim, E]
            bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            self.gate = nn.Linear(in_dim + task_dim, num_experts, bias=False)

    def compute_logits(self, x: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        want = self.num_tasks if self.mode == "multigate" else self.task_dim
        if route is None or route.shape[-1] != want:
            raise ValueError(f"TaskRouter({self.mode}) needs route= of width {want} per token, got "
                             f"{None if route is None else tuple(route.shape)}; wrap the forward in "
                             f"zoo.moe.route_with(model, task_signal)")
        if self.mode == "task_embed":
            return self.gate(torch.cat([x, route.to(x.dtype)], dim=-1))  # [N, E]
        first = route[:1]
        if torch.equal(route, first.expand_as(route)) and float(first.max()) == 1.0 and float(first.sum()) == 1.0:
            return x @ self.weight[int(first.argmax())]  # [N, E]: only this task's gate runs
        per_task = torch.einsum("nd,tde->nte", x, self.weight)  # [N, T, E]
        return torch.einsum("nte,nt->ne", per_task, route.to(x.dtype))


class _AlternatingMLP:
    """``mlp_layer`` factory for timm's ``VisionTransformer``: call i (block i) returns timm's dense
    ``Mlp`` for even i and ``make_odd(in_features, hidden)`` for odd i (MoE in every other block,
    M3ViT/V-MoE placement). A fresh router is built per layer, which ``zoo.moe.moe_mlp`` cannot do
    when the router is a module."""

    def __init__(self, make_odd):
        self.make_odd, self.calls = make_odd, 0

    def __call__(self, in_features, hidden_features=None, out_features=None, act_layer=None,
                 drop=0.0, bias=True, **_):
        i, self.calls = self.calls, self.calls + 1
        hidden = hidden_features or 4 * in_features
        if i % 2 == 1:
            return self.make_odd(in_features, hidden)
        return Mlp(in_features, hidden, out_features, act_layer=act_layer or nn.GELU, drop=drop, bias=bias)


class PUPHead(nn.Module):
    """SETR-PUP-like decoder (Zheng et al. 2021; M3ViT ``VisionTransformerUpHead``).

    tokens [B, N, D] -> LayerNorm -> grid [B, D, h, w] -> conv3x3+BN+ReLU ->
    ``log2(img/h)`` x (x2 bilinear, conv3x3+BN+ReLU) -> conv1x1 -> [B, out, H, W].
    """

    def __init__(self, dim: int, out_channels: int, grid: int, img_size: int, channels: int = 16):
        super().__init__()
        self.grid, self.img_size = grid, img_size
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        layers = [nn.Conv2d(dim, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for _ in range(max(0, int(round(math.log2(img_size / grid))))):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        x = self.norm(tokens).transpose(1, 2).reshape(b, d, self.grid, self.grid)  # [B, D, h, w]
        x = self.out(self.body(x))
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return x  # [B, out, H, W]


class M3ViT(nn.Module):
    """Multi-task ViT with task-conditioned MoE MLPs (``moe=True``) or its dense twin.

    Args:
        tasks: task names, a subset of ("semseg", "depth", "normals", "edge").
        num_classes: semseg classes.
        img_size, patch_size, dim, depth, num_heads, mlp_ratio: the timm ViT (no class token).
        moe: MoE MLPs in odd blocks (True) or dense twins of equal active params (False).
        num_experts, k: E experts, top-k per token (paper: 16, top-4).
        routing: "multigate" | "task_embed" | "shared" (see module docstring).
        task_dim: task-embedding width for ``routing="task_embed"``.
        noise_std: gate noise std while training (None = 1/E as in M3ViT).
        balance_weight: weight of cv^2(importance)+cv^2(load) (M3ViT: 0.01).
        decoder_channels: width of each PUP head.
        depth_init, depth_scale: the depth head predicts ``depth_init + depth_scale * out`` (mean and
            std of the training depths, metres), so it starts at the data's mean and scale.
    """

    def __init__(self, tasks=("semseg", "depth", "normals", "edge"), num_classes: int = 5,
                 img_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, moe: bool = True, num_experts: int = 8,
                 k: int = 2, routing: str = "multigate", task_dim: int = 16,
                 noise_std: float | None = None, balance_weight: float = 0.01,
                 decoder_channels: int = 16, depth_init: float = 0.0, depth_scale: float = 1.0):
        super().__init__()
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("M3ViT needs at least one task")
        for t in tasks:
            if t not in ("semseg", *TASK_CHANNELS):
                raise ValueError(f"unknown task {t!r}; choose from semseg, {', '.join(TASK_CHANNELS)}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r}; choose one of {ROUTINGS}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.tasks, self.num_tasks, self.num_classes = tasks, len(tasks), num_classes
        self.moe, self.routing = moe, routing
        self.img_size, self.grid = img_size, img_size // patch_size
        noise = 1.0 / num_experts if noise_std is None else noise_std

        def make_moe(d: int, hidden: int) -> MoE:
            kw = dict(num_experts=num_experts, k=k, noise_std=noise, renormalize=False,
                      balance="cv2", balance_weight=balance_weight)
            if routing == "shared":
                return MoE(d, hidden, router="topk", **kw)
            router = TaskRouter(d, num_experts, k, self.num_tasks, mode=routing, task_dim=task_dim,
                                noise_std=noise, renormalize=False)
            return MoE(d, hidden, router=router, route_dim=self.num_tasks if routing == "multigate" else task_dim, **kw)

        def make_dense(d: int, hidden: int) -> DenseFFN:
            return DenseFFN(d, dense_twin_hidden(make_moe(d, hidden)))

        self.encoder = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, num_classes=0, global_pool="", class_token=False,
            mlp_layer=_AlternatingMLP(make_moe if moe else make_dense))
        self.moe_layers = [m for m in self.encoder.modules() if isinstance(m, MoE)]
        self.task_embed = None
        if moe and routing == "task_embed":  # M3ViT gate_task_represent: MLP(one-hot) + LayerNorm
            self.task_embed = nn.Sequential(nn.Linear(self.num_tasks, task_dim), nn.GELU(),
                                            nn.Linear(task_dim, task_dim), nn.LayerNorm(task_dim, eps=1e-6))
        out_ch = {"semseg": num_classes, **TASK_CHANNELS}
        self.heads = nn.ModuleDict({t: PUPHead(dim, out_ch[t], self.grid, img_size, decoder_channels) for t in tasks})
        self.depth_init, self.depth_scale = depth_init, depth_scale
        self.routing_by_task: dict[str, list] = {}

    @property
    def per_task_encoder(self) -> bool:
        """True when routing depends on the task, so each task needs its own encoder pass."""
        return self.moe and self.routing != "shared"

    def task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"task index {task} out of range for tasks {self.tasks}")
            return task
        if task not in self.tasks:
            raise ValueError(f"task {task!r} not in this model's tasks {self.tasks}")
        return self.tasks.index(task)

    def task_signal(self, t: int, batch: int, device) -> torch.Tensor:
        """Routing signal of task t for a batch: [B, 1, T] one-hot or [B, 1, task_dim] embedding."""
        onehot = F.one_hot(torch.tensor(t, device=device), self.num_tasks).float()  # [T]
        sig = self.task_embed(onehot) if self.task_embed is not None else onehot
        return sig.view(1, 1, -1).expand(batch, 1, sig.shape[-1])

    def encode(self, x: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """Image [B, 3, H, W] -> tokens [B, N, D]; ``t`` selects the task's routing."""
        if not self.per_task_encoder:
            return self.encoder.forward_features(x)
        if t is None:
            raise ValueError("task-conditioned routing needs a task index for the encoder pass")
        with route_with(self.encoder, self.task_signal(t, x.shape[0], x.device)):
            return self.encoder.forward_features(x)  # [B, N, D]

    def _decode(self, task: str, tokens: torch.Tensor) -> torch.Tensor:
        y = self.heads[task](tokens)
        if task == "depth":
            return self.depth_init + self.depth_scale * y
        return F.normalize(y, dim=1) if task == "normals" else y

    def forward(self, x: torch.Tensor, task: str | int | None = None) -> dict[str, torch.Tensor]:
        """All tasks (``task=None``) or single-task inference (one encoder pass with that task's
        gates, one decoder). Returns {task: prediction [B, C_t, H, W]} (semseg/edge logits,
        depth metres, unit normals). The MoE layers' ``aux_loss`` holds the sum over the passes
        of this forward (M3ViT accumulates the gate loss over task passes)."""
        tasks = self.tasks if task is None else (self.tasks[self.task_index(task)],)
        out, acc = {}, [None] * len(self.moe_layers)
        self.routing_by_task = {}
        shared = None if self.per_task_encoder else self.encode(x)
        for name in tasks:
            if shared is None:
                tokens = self.encode(x, self.tasks.index(name))
                for i, m in enumerate(self.moe_layers):
                    acc[i] = m.aux_loss if acc[i] is None else acc[i] + m.aux_loss
            else:
                tokens = shared
            self.routing_by_task[name] = [m.last_routing for m in self.moe_layers]
            out[name] = self._decode(name, tokens)
        if shared is None:
            for m, a in zip(self.moe_layers, acc):
                m.aux_loss = a
        return out
