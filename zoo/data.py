"""Pieces every task's LightningDataModule shares."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import RandomSampler


class SplitLoaders:
    """Mixin: the four Lightning dataloader hooks from one ``_loader(split, shuffle)``.

    Use as ``class MyData(SplitLoaders, L.LightningDataModule)``; training shuffles, the rest
    do not, and ``predict`` reads the test split.
    """

    def _loader(self, split: str, shuffle: bool):  # overridden by the datamodule
        raise TypeError(f"{type(self).__name__} must define _loader(split, shuffle)")

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader("test", False)


class CheckpointedShuffle:
    """Mixin: training shuffles drawn from the datamodule's own generator, saved in checkpoints.

    A datamodule that builds ``RandomSampler(generator=torch.Generator().manual_seed(seed))``
    anew for every loader repeats epoch 1's order after a resume. Call
    ``self.init_shuffle(seed)`` in ``__init__`` and use ``self.shuffle_sampler(ds)`` as the
    training sampler: Lightning saves ``state_dict()`` in the checkpoint and restores it, so a
    resumed run draws the orders the uninterrupted one drew (the loader's worker base seed still
    comes from the global RNG, which ``ZooModule`` restores).
    """

    shuffle_generator: torch.Generator

    def init_shuffle(self, seed: int) -> None:
        self.shuffle_generator = torch.Generator().manual_seed(int(seed))

    def shuffle_sampler(self, dataset) -> RandomSampler:
        return RandomSampler(dataset, generator=self.shuffle_generator)

    def state_dict(self) -> dict:
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "shuffle_generator" in state:
            self.shuffle_generator.set_state(state["shuffle_generator"])


def numeric_field(d, key: str, source) -> np.ndarray:
    """``d[key]`` as a numeric array, or a ValueError naming the source file and the field."""
    try:
        arr = np.asarray(d[key])
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ValueError(f"{source}: field '{key}' is not a rectangular array ({e})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{source}: field '{key}' must be numeric, got dtype {arr.dtype}")
    return arr
