"""MoE and dense CNNs of AdvMoE (Zhang et al., "Robust Mixture-of-Expert Training for
Convolutional Neural Networks", ICCV 2023): ResNet (CIFAR stem), VGG-bn, WideResNet, DenseNet-BC.

MoE form (Sec. 3, Fig. 1): every conv inside the residual/dense blocks (and every VGG conv but
the first) is a :class:`zoo.moe.conv.MoEConv2d` whose ``E`` experts are channel groups of width
``round(width_ratio * planes)``; the stem, shortcuts (ResNet) and transitions (DenseNet) stay
dense. Routing is per image, top-1 with a straight-through gate by default. ``router="shared"``
scores experts once with a small CNN on the input image and every MoE layer follows that choice
(public code); ``router="per_layer"`` gives each MoE layer its own small CNN router on its input
(the paper's formulation).

Dense form: the same network with plain convs of width ``round(width_ratio * planes)``:
``width_ratio=1`` is the full-width dense model (about the MoE's total parameters for
``E * width_ratio = 1``) and :func:`flops_matched_ratio` finds the width whose FLOPs equal the MoE's
active FLOPs (router included).

Every model maps images ``[B, C, H, W]`` in ``[0, 1]`` to logits ``[B, num_classes]`` and exposes
:meth:`RobustCNN.route_logits` (the routing scores of its last forward, with their graph) so
attacks and the router loss can target the router.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zoo.moe.conv import ConvRouter, MoEConv2d

ARCHS = ("resnet", "vgg", "wrn", "densenet")
DEFAULT_BLOCKS = {"resnet": [2, 2, 2, 2], "vgg": [2, 2, 3, 3, 3], "wrn": [4, 4, 4], "densenet": [16, 16, 16]}
DEFAULT_WIDTH = {"resnet": 64, "vgg": 64, "wrn": 16, "densenet": 12}


class ConvFactory:
    """Builds the block convs of one network: dense ``nn.Conv2d`` or :class:`MoEConv2d`."""

    def __init__(self, moe: bool, width_ratio: float, num_experts: int, k: int, router: str,
                 router_widths: list[int], balance_weight: float, gate: str = "softmax",
                 expert_norm: bool = False):
        self.moe, self.ratio, self.num_experts, self.k = moe, width_ratio, num_experts, k
        self.router, self.router_widths, self.balance_weight = router, router_widths, balance_weight
        self.gate, self.expert_norm = gate, expert_norm

    def width(self, planes: int) -> int:
        return max(1, int(round(self.ratio * planes)))

    def __call__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 moe: bool = True) -> nn.Module:
        """``cout`` is already the active width (use :meth:`width`)."""
        if not (self.moe and moe):
            return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        return MoEConv2d(cin, cout, kernel, num_experts=self.num_experts, k=self.k, stride=stride,
                         padding=padding, router="conv" if self.router == "per_layer" else None,
                         router_widths=self.router_widths, balance_weight=self.balance_weight,
                         gate=self.gate)

    def norm(self, conv: nn.Module, channels: int) -> nn.Module:
        """BatchNorm after ``conv``: one per expert if ``expert_norm`` and ``conv`` is an MoE conv."""
        if self.expert_norm and isinstance(conv, MoEConv2d):
            return ExpertBatchNorm2d(channels, conv.num_experts)
        return nn.BatchNorm2d(channels)


class ExpertBatchNorm2d(nn.Module):
    """BatchNorm with its own statistics and affine parameters per expert of the preceding MoE conv.

    Image ``b`` is normalised by the BatchNorm of the expert the conv chose for it (its top choice
    when ``k > 1``), so an expert's channel ``c`` is never mixed with another expert's channel ``c``
    in the batch statistics. The routing is read from ``conv.last_routing``.
    """

    def __init__(self, channels: int, num_experts: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, conv: MoEConv2d) -> torch.Tensor:
        choice = conv.last_routing.indices[:, 0]  # [B]
        out = torch.empty_like(x)
        for e, bn in enumerate(self.norms):
            idx = (choice == e).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_copy(0, idx, bn(x[idx]))
        return out


def conv_fwd(conv: nn.Module, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """Run a block conv, handing shared routing scores to MoE convs."""
    return conv(x, logits=logits) if isinstance(conv, MoEConv2d) else conv(x)


def norm_fwd(norm: nn.Module, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the BatchNorm that follows ``conv`` (per-expert norms read the conv's routing)."""
    return norm(x, conv) if isinstance(norm, ExpertBatchNorm2d) else norm(x)


# --------------------------------------------------------------------------- blocks
class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN + shortcut."""

    def __init__(self, make: ConvFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = make(cin, cout, 3, stride, 1)
        self.bn1 = make.norm(self.conv1, cout)
        self.conv2 = make(cout, cout, 3, 1, 1)
        self.bn2 = make.norm(self.conv2, cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x, logits=None):
        out = F.relu(norm_fwd(self.bn1, self.conv1, conv_fwd(self.conv1, x, logits)))
        out = norm_fwd(self.bn2, self.conv2, conv_fwd(self.conv2, out, logits))
        return F.relu(out + self.shortcut(x))


class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3."""

    def __init__(self, make: ConvFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), make(cin, cout, 3, stride, 1)
        self.bn2, self.conv2 = make.norm(self.conv1, cout), make(cout, cout, 3, 1, 1)
        self.shortcut = None if stride == 1 and cin == cout else make(cin, cout, 1, stride, 0)

    def forward(self, x, logits=None):
        a = F.relu(self.bn1(x))
        out = F.relu(norm_fwd(self.bn2, self.conv1, conv_fwd(self.conv1, a, logits)))
        out = conv_fwd(self.conv2, out, logits)
        return out + (x if self.shortcut is None else conv_fwd(self.shortcut, a, logits))


class DenseLayer(nn.Module):
    """DenseNet-BC layer (Huang et al. 2017): BN-ReLU-conv1x1(4g)-BN-ReLU-conv3x3(g), concatenated."""

    def __init__(self, make: ConvFactory, cin: int, growth: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), make(cin, 4 * growth, 1)
        self.bn2, self.conv2 = make.norm(self.conv1, 4 * growth), make(4 * growth, growth, 3, 1, 1)

    def forward(self, x, logits=None):
        h = conv_fwd(self.conv1, F.relu(self.bn1(x)), logits)
        h = conv_fwd(self.conv2, F.relu(norm_fwd(self.bn2, self.conv1, h)), logits)
        return torch.cat([x, h], 1)


class VGGStage(nn.Module):
    """VGG-bn stage: ``n`` x (conv3x3-BN-ReLU) then 2x2 max-pool (skipped below 2x2 maps)."""

    def __init__(self, make: ConvFactory, cin: int, cout: int, n: int, first_dense: bool):
        super().__init__()
        self.convs = nn.ModuleList(make(cin if i == 0 else cout, cout, 3, 1, 1, moe=not (first_dense and i == 0))
                                   for i in range(n))
        self.bns = nn.ModuleList(make.norm(conv, cout) for conv in self.convs)

    def forward(self, x, logits=None):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(norm_fwd(bn, conv, conv_fwd(conv, x, logits)))
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class Transition(nn.Module):
    """DenseNet-BC transition: BN-ReLU-conv1x1 (compression 0.5)-avgpool2 (skipped below 2x2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x, logits=None):
        x = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


# --------------------------------------------------------------------------- network
class RobustCNN(nn.Module):
    """One of four CNN families in MoE or dense form.

    Args:
        arch: ``"resnet"`` (CIFAR stem, BasicBlock; blocks [2,2,2,2] = ResNet-18), ``"vgg"``
            (VGG-bn; convs per stage [2,2,3,3,3] = VGG-16-bn), ``"wrn"`` (WideResNet; blocks per
            group [4,4,4] with ``widen`` 10 = WRN-28-10), ``"densenet"`` (DenseNet-BC; layers per
            block [16,16,16] with growth ``width`` 12 = DenseNet-BC-100).
        in_channels, num_classes: from the data.
        moe: MoE (True) or dense (False) form.
        width: base width (ResNet/VGG first stage, WRN stem, DenseNet growth rate).
        blocks: per-stage block/conv/layer counts (None = the full-size default above).
        widen: WRN widening factor.
        width_ratio: active width of every block conv relative to ``planes`` (AdvMoE ``ratio``).
        num_experts, k: channel-group experts per MoE conv and experts per image.
        router: ``"shared"`` (one CNN router on the image) or ``"per_layer"``.
        router_widths: conv widths of the router CNN(s).
        balance_weight: Switch balance loss per MoE layer (0 = AdvMoE default).
        gate: top-1 gate of the MoE convs (:class:`zoo.moe.conv.MoEConv2d`): ``"softmax"``,
            ``"straight_through"`` or the public code's ``"straight_through_scores"``.
        expert_norm: one BatchNorm per expert after each MoE conv instead of one shared.
    """

    def __init__(self, arch: str = "resnet", in_channels: int = 3, num_classes: int = 10, moe: bool = True,
                 width: int | None = None, blocks: list[int] | None = None, widen: int = 10,
                 width_ratio: float = 0.5, num_experts: int = 2, k: int = 1, router: str = "shared",
                 router_widths: list[int] | None = None, balance_weight: float = 0.0,
                 gate: str = "softmax", expert_norm: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
        if router not in ("shared", "per_layer"):
            raise ValueError(f"model.router must be 'shared' or 'per_layer', got {router!r}")
        if not width_ratio > 0:
            raise ValueError(f"model.width_ratio must be > 0, got {width_ratio}")
        self.arch, self.moe, self.router_mode = arch, moe, router
        width = width or DEFAULT_WIDTH[arch]
        blocks = list(blocks or DEFAULT_BLOCKS[arch])
        router_widths = list(router_widths or [16, 32])
        make = ConvFactory(moe, width_ratio, num_experts, k, router, router_widths, balance_weight,
                           gate, expert_norm)
        self.router = ConvRouter(in_channels, num_experts, router_widths) if moe and router == "shared" else None
        stages: list[nn.Module] = []
        if arch == "resnet":
            c = make.width(width)
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for i, n in enumerate(blocks):
                cout = make.width(width * 2 ** i)
                for j in range(n):
                    stages.append(BasicBlock(make, c, cout, 2 if (i > 0 and j == 0) else 1))
                    c = cout
            self.head_norm = nn.Identity()
        elif arch == "vgg":
            self.stem, c = nn.Identity(), in_channels
            for i, n in enumerate(blocks):
                cout = make.width(width * 2 ** min(i, 3))
                stages.append(VGGStage(make, c, cout, n, first_dense=i == 0))
                c = cout
            self.head_norm = nn.Identity()
        elif arch == "wrn":
            c = width
            self.stem = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
            for i, n in enumerate(blocks):
                cout = make.width(width * widen * 2 ** i)
                for j in range(n):
                    stages.append(WideBlock(make, c, cout, 2 if (i > 0 and j == 0) else 1))
                    c = cout
            self.head_norm = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        else:  # densenet-BC
            growth = make.width(width)
            c = 2 * growth
            self.stem = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
            for i, n in enumerate(blocks):
                for _ in range(n):
                    stages.append(DenseLayer(make, c, growth))
                    c += growth
                if i < len(blocks) - 1:
                    stages.append(Transition(c, c // 2))
                    c //= 2
            self.head_norm = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(stages)
        self.fc = nn.Linear(c, num_classes)
        self.moe_layers = [m for m in self.modules() if isinstance(m, MoEConv2d)]
        self._router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x) if self.router is not None else None  # [B, E] shared scores
        self._router_logits = logits
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, logits)
        h = self.head_norm(h)
        return self.fc(h.mean(dim=(2, 3)))  # [B, num_classes]

    def route_logits(self) -> list[torch.Tensor]:
        """Routing scores ``[B, E]`` of the last forward (one shared, or one per MoE layer); [] if dense."""
        if not self.moe:
            return []
        if self.router is not None:
            return [self._router_logits]
        return [m.last_logits for m in self.moe_layers]

    def router_parameters(self) -> list[nn.Parameter]:
        """Parameters of the router(s): what AdvMoE's router step updates."""
        return [p for n, p in self.named_parameters() if n.startswith("router.") or ".router." in n]

    def expert_parameters(self) -> list[nn.Parameter]:
        """Everything but the router(s): experts and the dense backbone (AdvMoE's expert step)."""
        ids = {id(p) for p in self.router_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]


def count_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward on ``sample`` counted by ``torch.utils.flop_counter`` (eval mode)."""
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(sample)
    model.train(was)
    return int(fc.get_total_flops())


def flops_matched_ratio(image_shape: tuple[int, int, int], num_classes: int, moe_kwargs: dict,
                        tol: float = 0.01) -> float:
    """Dense ``width_ratio`` whose FLOPs/sample match the MoE's active FLOPs (router included).

    Bisection on the ratio (FLOPs grow monotonically with width); ``moe_kwargs`` are the
    :class:`RobustCNN` keyword arguments of the MoE model.
    """
    sample = torch.zeros(1, *image_shape)
    kw = {k: v for k, v in moe_kwargs.items() if k not in ("moe", "in_channels", "num_classes")}
    target = count_flops(RobustCNN(in_channels=image_shape[0], num_classes=num_classes, moe=True, **kw), sample)
    lo, hi = 0.05, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        kw["width_ratio"] = mid
        f = count_flops(RobustCNN(in_channels=image_shape[0], num_classes=num_classes, moe=False, **kw), sample)
        if abs(f - target) <= tol * target:
            return mid
        lo, hi = (mid, hi) if f < target else (lo, mid)
    return (lo + hi) / 2
