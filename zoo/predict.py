"""`zoo predict`: every task's ``predict_step`` outputs, collated and saved in the run folder.

Each task's ``predict_step`` returns a dict of per-sample tensors (or lists, for outputs whose
length varies per sample such as a video's snippet scores). :class:`PredictionWriter`
concatenates them over the batches and writes ``<run_dir>/predict/predictions.pt``, which
loads with ``torch.load(path, weights_only=True)``. Under a multi-process strategy every rank
writes ``predictions.rank<r>.pt`` with the samples its sampler gave it.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def _cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_cpu(v) for v in obj]
    return obj


def collate(outputs: list):
    """Batch outputs -> one: dicts key by key, tensors concatenated along dim 0 (a list of
    tensors when their trailing shapes differ), lists joined."""
    outputs = [o for o in outputs if o is not None]
    if not outputs:
        return None
    first = outputs[0]
    if isinstance(first, dict):
        return {k: collate([o[k] for o in outputs]) for k in first}
    if torch.is_tensor(first):
        if all(o.dim() > 0 and o.shape[1:] == first.shape[1:] for o in outputs):
            return torch.cat(outputs)
        return [t for o in outputs for t in (o if o.dim() > 0 else [o])]
    if isinstance(first, (list, tuple)):
        return [item for o in outputs for item in o]
    return outputs


def describe(pred) -> str:
    """One line per key: its shape (or list length)."""
    if isinstance(pred, dict):
        return ", ".join(f"{k} {tuple(v.shape) if torch.is_tensor(v) else f'list[{len(v)}]'}"
                         for k, v in pred.items())
    return str(tuple(pred.shape)) if torch.is_tensor(pred) else type(pred).__name__


class PredictionWriter(L.Callback):
    """Collects ``predict_step`` outputs and saves them as ``path`` (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._outputs: list = []

    def on_predict_epoch_start(self, trainer, pl_module):
        self._outputs = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._outputs.append(_cpu(outputs))

    def on_predict_epoch_end(self, trainer, pl_module):
        pred = collate(self._outputs)
        self._outputs = []
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pred, path)
        print(f"zoo predict: wrote {path} ({describe(pred)})", flush=True)
