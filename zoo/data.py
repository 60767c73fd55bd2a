"""Pieces every task's LightningDataModule shares."""
from __future__ import annotations


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
