"""Observation and goal encoders of the MoDE policy: a FiLM ResNet-18 for images, text goals.

- ``FiLMResNet``: the ResNet-18 layout (BasicBlocks [2, 2, 2, 2] at widths w, 2w, 4w, 8w;
  w = 64 is ResNet-18, and its parameter names are torchvision's, so a torchvision
  ``resnet18`` state dict loads into it) whose blocks are modulated by the goal embedding as
  in the authors' ``ResNetEncoderWithFiLM``: after a block's second BatchNorm,
  ``out = gamma * out + beta`` with (gamma, beta) from ``SiLU -> Linear`` of the goal, one
  such FiLM generator per stage; global average pool, then a linear map to the token width.
  Random init, or ``weights`` = a path to a state dict (e.g. torchvision's resnet18 weights
  saved with ``torch.save(model.state_dict(), path)``); nothing is downloaded.
- Goal encoders map each task's text to a vector; the denoiser embeds it as the goal token:
  ``"words"`` (default) a learned bag-of-words embedding of the lower-cased task string
  (tasks that share words share parameters), ``"task_id"`` one learned vector per task, and
  ``"clip:<local path or name>"`` the frozen text embedding of a CLIP model loaded with
  ``transformers`` where it is installed (as the authors embed language goals with CLIP).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FiLMBlock(nn.Module):
    """ResNet BasicBlock with FiLM after ``bn2``: ``relu(gamma * bn2(conv2(...)) + beta + skip)``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x, gamma, beta):  # gamma, beta: [B, planes]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) * gamma[:, :, None, None] + beta[:, :, None, None]
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class FiLMResNet(nn.Module):
    """Image [B, C, H, W] uint8 + goal [B, G] -> feature [B, out_dim] (ResNet-18 layout + FiLM)."""

    def __init__(self, goal_dim: int, out_dim: int, width: int = 64, in_channels: int = 3,
                 weights: str | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths, inplanes = [width, 2 * width, 4 * width, 8 * width], width
        self.films = nn.ModuleList()
        for i, planes in enumerate(widths):
            stage = nn.ModuleList([FiLMBlock(inplanes, planes, 1 if i == 0 else 2), FiLMBlock(planes, planes)])
            setattr(self, f"layer{i + 1}", stage)
            # one generator per stage: (gamma, beta) for each of its two blocks
            self.films.append(nn.Sequential(nn.SiLU(), nn.Linear(goal_dim, 4 * planes)))
            inplanes = planes
        self.proj = nn.Linear(8 * width, out_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN[:in_channels] if in_channels == 3
                                                  else (0.5,) * in_channels).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD[:in_channels] if in_channels == 3
                                                 else (0.25,) * in_channels).view(1, -1, 1, 1), persistent=False)
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            own = self.state_dict()
            bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
            if bad:
                raise ValueError(f"{weights}: image encoder weights do not fit image_width={width}, "
                                 f"in_channels={in_channels} (e.g. {bad[0]}: {tuple(state[bad[0]].shape)} vs "
                                 f"{tuple(own[bad[0]].shape)})")
            missing = [k for k in self.load_state_dict(state, strict=False).missing_keys
                       if not k.startswith(("films.", "proj."))]
            if missing:
                raise ValueError(f"{weights}: image encoder weights miss {len(missing)} tensors, e.g. {missing[0]}")

    def forward(self, img: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        x = (img.float() / 255.0 - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i, film in enumerate(self.films):
            mod = film(goal)  # [B, 4 * planes]
            gammas, betas = mod.chunk(2, -1)
            for j, block in enumerate(getattr(self, f"layer{i + 1}")):
                x = block(x, gammas.chunk(2, -1)[j], betas.chunk(2, -1)[j])
        return self.proj(x.mean((2, 3)))


# ---------------------------------------------------------------------------- goal text
def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class GoalEncoder(nn.Module):
    """Task id [B] -> goal vector [B, dim] from the text of each task (see module docstring)."""

    def __init__(self, texts: list[str], dim: int, kind: str = "words"):
        super().__init__()
        self.kind, self.num_tasks = kind, len(texts)
        if kind == "task_id":
            self.table = nn.Embedding(len(texts), dim)
        elif kind == "words":
            vocab = sorted({w for t in texts for w in words(t)})
            self.vocab = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = padding / unknown word
            ids = [[self.vocab[w] for w in words(t)] or [0] for t in texts]
            width = max(len(i) for i in ids)
            self.register_buffer("tokens", torch.tensor([i + [0] * (width - len(i)) for i in ids]), persistent=False)
            self.emb = nn.Embedding(len(vocab) + 1, dim, padding_idx=0)
        elif kind.startswith("clip:"):
            self.register_buffer("text_features", clip_text_features(texts, kind[5:]), persistent=True)
            self.proj = nn.Linear(self.text_features.shape[1], dim, bias=False)
        else:
            raise ValueError(f"goal_encoder must be 'words', 'task_id' or 'clip:<model>', got {kind!r}")

    def forward(self, task: torch.Tensor) -> torch.Tensor:
        if self.kind == "task_id":
            return self.table(task)
        if self.kind == "words":
            tok = self.tokens[task]  # [B, L]
            mask = (tok > 0).float()
            return (self.emb(tok) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.proj(self.text_features[task])


def clip_text_features(texts: list[str], model: str) -> torch.Tensor:
    """Frozen CLIP text embeddings [T, d] of ``texts`` (``transformers``, a local model only)."""
    try:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError:
        raise ImportError("goal_encoder 'clip:...' needs transformers: pip install transformers") from None
    try:
        tok = CLIPTokenizer.from_pretrained(model, local_files_only=True)
        net = CLIPTextModelWithProjection.from_pretrained(model, local_files_only=True).eval()
    except OSError as e:
        raise ValueError(f"goal_encoder clip:{model}: no local CLIP model there ({e})") from None
    with torch.no_grad():
        return net(**tok(texts, padding=True, return_tensors="pt")).text_embeds.float()
