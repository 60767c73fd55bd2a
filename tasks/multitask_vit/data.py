"""Data for multi-task dense prediction: built-in synthetic scenes and the NYUD/PASCAL folder layout.

A sample is a dict of tensors::

    image   [3, H, W] float  (normalised RGB)
    semseg  [H, W]    long   (class index, 255 = ignore)
    depth   [1, H, W] float  (metres, 0 = invalid)
    normals [3, H, W] float  (unit vectors in camera frame x right, y down, z towards the camera;
                              all-zero = invalid)
    edge    [1, H, W] float  (1 = boundary pixel, 0 = not, 255 = ignore)

Only the tasks that exist are present. ``MultiTaskDataModule(root=None)`` renders
:class:`SyntheticScenes`; ``root=DIR`` reads :class:`MultiTaskFolder`.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from zoo.data import SplitLoaders

ALL_TASKS = ("semseg", "depth", "normals", "edge")
TASK_DIRS = {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edge": "edge"}
IGNORE = 255
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------------------------
# Built-in synthetic scenes
# --------------------------------------------------------------------------------------------
SHAPE_CLASSES = ("sphere", "slab", "cylinder", "pyramid")  # semseg labels 1..4, 0 = background


def _texture(kind: int, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Class-specific albedo pattern in [0, 1] over object-local coordinates u, v."""
    if kind == 0:  # sphere: dots
        return 0.5 + 0.5 * np.cos(freq * u + phase) * np.cos(freq * v + phase)
    if kind == 1:  # slab: diagonal stripes
        return 0.5 + 0.5 * np.sign(np.sin(freq * (u + v) + phase))
    if kind == 2:  # cylinder: vertical stripes
        return 0.5 + 0.5 * np.sin(freq * u + phase)
    return 0.5 + 0.5 * np.sign(np.sin(freq * u + phase) * np.sin(freq * v + phase))  # checker


class SyntheticScenes:
    """Renders scenes of textured shapes at different depths under a directional light.

    Each scene is a tilted floor/wall plane (background, class 0) in front of which
    ``shapes_per_image`` objects of four classes (sphere, tilted slab, vertical cylinder,
    four-sided pyramid) are placed at depths in ``depth_range`` metres. Apparent size follows
    perspective (size / depth), so depth is inferable from size and from occlusion; each class has
    its own texture and its own normal field, so semseg relies on texture/shape, depth on size and
    position, normals on shading -- the tasks share the object layout but want different features,
    which is how NYUD/PASCAL tasks share and conflict. Images are Lambertian-shaded
    (``ambient + (1 - ambient) max(0, n.l)``) with a random light per scene, plus Gaussian noise.
    Edges are the 1-pixel boundaries between visible objects (instance changes).

    All randomness comes from ``seed``; ``render(n)`` is deterministic.
    """

    num_classes = 1 + len(SHAPE_CLASSES)

    def __init__(self, img_size: int = 32, shapes_per_image: tuple[int, int] = (2, 4),
                 depth_range: tuple[float, float] = (2.0, 7.0), noise: float = 0.03,
                 texture_contrast: float = 0.5, ambient: float = 0.35, seed: int = 0):
        if img_size < 8:
            raise ValueError(f"img_size must be >= 8, got {img_size}")
        lo, hi = shapes_per_image
        if not 1 <= lo <= hi:
            raise ValueError(f"shapes_per_image must be (min, max) with 1 <= min <= max, got {shapes_per_image}")
        self.img_size, self.shapes_per_image = img_size, (int(lo), int(hi))
        self.depth_range, self.noise = tuple(depth_range), noise
        self.texture_contrast, self.ambient, self.seed = texture_contrast, ambient, seed

    def _scene(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = self.img_size
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
        x = (xs + 0.5) / s * 2 - 1  # [H, W] in [-1, 1], right
        y = (ys + 0.5) / s * 2 - 1  # [H, W] in [-1, 1], down
        # background: a plane receding upwards (floor meeting a far wall)
        tilt = rng.uniform(0.25, 0.6)
        far = self.depth_range[1] + 2.0
        depth = (far - tilt * 2.0 * (y + 1)).astype(np.float32)  # [H, W]
        normal = np.zeros((s, s, 3), np.float32)
        normal[..., 1] = -tilt
        normal[..., 2] = 1.0
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        albedo = np.empty((s, s, 3), np.float32)
        bg_col = rng.uniform(0.35, 0.65, 3)
        bg_tex = 0.9 + 0.1 * rng.standard_normal((s, s, 1)) * 0.5
        albedo[:] = bg_col * bg_tex
        label = np.zeros((s, s), np.int64)
        inst = np.zeros((s, s), np.int64)

        n = rng.integers(self.shapes_per_image[0], self.shapes_per_image[1] + 1)
        z = np.sort(rng.uniform(*self.depth_range, n))[::-1]  # paint far to near
        for i, z0 in enumerate(z):
            cls = int(rng.integers(len(SHAPE_CLASSES)))
            size = rng.uniform(0.9, 1.5) / z0 * 2.0  # perspective: apparent half-size
            cx, cy = rng.uniform(-0.8, 0.8, 2)
            u, v = (x - cx) / size, (y - cy) / size  # object-local coords, unit = half-size
            nrm = np.zeros((s, s, 3), np.float32)
            if cls == 0:  # sphere
                r2 = u ** 2 + v ** 2
                mask = r2 < 1
                h = np.sqrt(np.clip(1 - r2, 0, 1))
                nrm[..., 0], nrm[..., 1], nrm[..., 2] = u, v, h
                dz = -0.5 * h
            elif cls == 1:  # slab: square plane tilted about a random axis
                mask = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
                a, b = rng.uniform(-0.8, 0.8, 2)
                nrm[..., 0], nrm[..., 1], nrm[..., 2] = a, b, 1.0
                dz = 0.25 * (a * u + b * v)
            elif cls == 2:  # vertical cylinder
                mask = (np.abs(u) < 0.6) & (np.abs(v) < 1.0)
                h = np.sqrt(np.clip(1 - (u / 0.6) ** 2, 0, 1))
                nrm[..., 0], nrm[..., 2] = u / 0.6, h
                dz = -0.3 * h
            else:  # four-sided pyramid seen from the front: normal per facet
                mask = (np.abs(u) + np.abs(v)) < 1.0
                horiz = np.abs(u) > np.abs(v)
                nrm[..., 0] = np.where(horiz, np.sign(u), 0.0) * 0.8
                nrm[..., 1] = np.where(horiz, 0.0, np.sign(v)) * 0.8
                nrm[..., 2] = 1.0
                dz = -0.4 * (1 - np.abs(u) - np.abs(v))
            mask &= (z0 + dz) < depth  # z-buffer
            if not mask.any():
                continue
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True).clip(1e-6)
            tex = _texture(cls, u, v, freq=rng.uniform(5.0, 8.0), phase=rng.uniform(0, 6.3))
            col = rng.uniform(0.2, 0.9, 3)
            alb = col * (1 - self.texture_contrast + self.texture_contrast * tex)[..., None]
            depth = np.where(mask, z0 + dz, depth)
            normal = np.where(mask[..., None], nrm, normal)
            albedo = np.where(mask[..., None], alb, albedo)
            label = np.where(mask, cls + 1, label)
            inst = np.where(mask, i + 1, inst)

        light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.8, -0.2), 1.0], np.float32)
        light /= np.linalg.norm(light)
        shade = self.ambient + (1 - self.ambient) * np.clip(normal @ light, 0, None)  # [H, W]
        image = albedo * shade[..., None] + self.noise * rng.standard_normal((s, s, 3))
        edge = np.zeros((s, s), np.float32)
        edge[:, 1:] += inst[:, 1:] != inst[:, :-1]
        edge[1:, :] += inst[1:, :] != inst[:-1, :]
        return {"image": np.clip(image, 0, 1).astype(np.float32), "semseg": label,
                "depth": depth.astype(np.float32), "normals": normal.astype(np.float32),
                "edge": (edge > 0).astype(np.float32)}

    def render(self, n: int) -> dict[str, np.ndarray]:
        """Render ``n`` scenes; returns arrays image [n,H,W,3], semseg [n,H,W], depth [n,H,W],
        normals [n,H,W,3], edge [n,H,W]."""
        rng = np.random.default_rng(self.seed)
        scenes = [self._scene(rng) for _ in range(n)]
        return {k: np.stack([sc[k] for sc in scenes]) for k in scenes[0]}


# --------------------------------------------------------------------------------------------
# Tensors from numpy arrays (shared by synthetic data and the folder reader)
# --------------------------------------------------------------------------------------------
def to_tensors(arrays: dict[str, np.ndarray], tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """numpy HWC arrays ([n, H, W, ...]) -> channel-first tensors of the sample format above."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    out = {"image": (torch.from_numpy(arrays["image"]).permute(0, 3, 1, 2).float() - mean) / std}
    if "semseg" in tasks:
        out["semseg"] = torch.from_numpy(arrays["semseg"]).long()  # [n, H, W]
    if "depth" in tasks:
        out["depth"] = torch.from_numpy(arrays["depth"]).float()[:, None]  # [n, 1, H, W]
    if "normals" in tasks:
        out["normals"] = torch.from_numpy(arrays["normals"]).permute(0, 3, 1, 2).float()  # [n, 3, H, W]
    if "edge" in tasks:
        out["edge"] = torch.from_numpy(arrays["edge"]).float()[:, None]  # [n, 1, H, W]
    return out


class TensorDictDataset(Dataset):
    """A dataset over a dict of equally long tensors; item i is {key: tensor[i]}."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all fields must have the same length, got {lengths}")
        self.tensors = tensors
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# --------------------------------------------------------------------------------------------
# The user's own data: NYUD-v2 / PASCAL-Context multi-task folder layout
# --------------------------------------------------------------------------------------------
def _open_image(path: Path):
    """PIL image with its pixels loaded; an empty, truncated or non-image file is a ValueError."""
    from PIL import Image
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, "image file is truncated"
        raise ValueError(f"{path}: unreadable image ({e})") from None
    return im


def _read_image(path: Path) -> np.ndarray:
    with _open_image(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]


def _read_label_png(path: Path) -> np.ndarray:
    with _open_image(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: expected a single-channel PNG of class indices, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)  # [H, W]


def _read_npy(path: Path, task: str) -> np.ndarray:
    """A float label map from ``.npy``; an empty, truncated, pickled or non-numeric file is a ValueError."""
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises EOFError, ValueError, OSError... for a corrupt file
        raise ValueError(f"{path}: cannot read {task} as .npy ({type(e).__name__}: {e})") from None
    if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{path}: {task} must be a numeric array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)}")
    return a.astype(np.float32)


def _resize(a: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize an [H, W] or [H, W, C] array to [size, size(, C)] with torch interpolation."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float()
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    if mode == "nearest":
        t = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t[0, 0] if a.ndim == 2 else t[0].permute(1, 2, 0)
    return t.numpy()


class MultiTaskFolder:
    """Reader for the folder layout of the NYUD-v2 / PASCAL-Context multi-task codebases::

        DIR/images/<id>.png|jpg        RGB image
        DIR/segmentation/<id>.png      class index per pixel, 255 = ignore        (optional task)
        DIR/depth/<id>.npy             [H, W] float metres, 0 = invalid           (optional task)
        DIR/normals/<id>.npy           [H, W, 3] unit vectors, zeros = invalid    (optional task)
        DIR/edge/<id>.png              0 = no edge, >0 = edge (255 = ignore)       (optional task)
        DIR/train.txt, DIR/val.txt     one id per line (DIR/test.txt optional, else val.txt)

    A task is used when its folder exists (or only the tasks named in ``tasks``). Every file is
    checked before training: missing ids, label/image size mismatch, labels out of range, NaNs
    and non-unit normals raise one ``FileNotFoundError``/``ValueError`` naming the file.
    Images and labels are resized to ``img_size`` x ``img_size`` (bilinear for images, nearest for
    labels; normals renormalised).
    """

    def __init__(self, root: str | Path, tasks: tuple[str, ...] | None = None,
                 num_classes: int | None = None, img_size: int = 32):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} is not a directory")
        if not (self.root / "images").is_dir():
            raise FileNotFoundError(f"{self.root / 'images'}: missing images/ folder")
        present = tuple(t for t in ALL_TASKS if (self.root / TASK_DIRS[t]).is_dir())
        if tasks is None:
            tasks = present
        for t in tasks:
            if t not in ALL_TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {ALL_TASKS}")
            if t not in present:
                raise FileNotFoundError(f"task {t!r} requested but {self.root / TASK_DIRS[t]} does not exist")
        if not tasks:
            raise FileNotFoundError(
                f"{self.root}: no task folders found; expected some of {[TASK_DIRS[t] for t in ALL_TASKS]}")
        self.tasks, self.img_size = tuple(tasks), img_size
        self._num_classes = num_classes

    def ids(self, split: str) -> list[str]:
        path = self.root / f"{split}.txt"
        if split == "test" and not path.exists():
            path = self.root / "val.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: split list file missing (one image id per line)")
        ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not ids:
            raise ValueError(f"{path}: split list is empty")
        return ids

    def _image_path(self, i: str) -> Path:
        for ext in (".png", ".jpg", ".jpeg"):
            p = self.root / "images" / f"{i}{ext}"
            if p.exists():
                return p
        raise FileNotFoundError(f"{self.root / 'images' / i}.png|jpg: image for id {i!r} is missing")

    def _task_path(self, task: str, i: str) -> Path:
        ext = ".npy" if task in ("depth", "normals") else ".png"
        p = self.root / TASK_DIRS[task] / f"{i}{ext}"
        if not p.exists():
            raise FileNotFoundError(f"{p}: {task} label for id {i!r} is missing")
        return p

    def _load_one(self, i: str) -> dict[str, np.ndarray]:
        ip = self._image_path(i)
        img = _read_image(ip)
        hw = img.shape[:2]
        out = {"image": _resize(img, self.img_size, "bilinear")}
        for t in self.tasks:
            p = self._task_path(t, i)
            if t in ("semseg", "edge"):
                a = _read_label_png(p)
            else:
                a = _read_npy(p, t)
            want = hw + ((3,) if t == "normals" else ())
            if t == "depth" and a.ndim == 3 and a.shape[-1] == 1:
                a = a[..., 0]
            if a.shape != want:
                raise ValueError(f"{p}: {t} has shape {a.shape} but image {ip.name} needs {want}")
            if t in ("depth", "normals") and not np.isfinite(a).all():
                raise ValueError(f"{p}: {t} contains NaN or inf")
            if t == "depth" and (a < 0).any():
                raise ValueError(f"{p}: depth has negative values (min {a.min():.3g}); use 0 for invalid")
            if t == "normals":
                norm = np.linalg.norm(a, axis=-1)
                bad = (norm > 1e-6) & (np.abs(norm - 1) > 0.05)
                if bad.any():
                    raise ValueError(f"{p}: normals must be unit vectors (or all zero = invalid); "
                                     f"{int(bad.sum())} pixels have norm outside [0.95, 1.05]")
            if t == "semseg":
                valid = a[a != IGNORE]
                if valid.size and valid.min() < 0:
                    raise ValueError(f"{p}: negative class index {valid.min()}")
                if self._num_classes is not None and valid.size and valid.max() >= self._num_classes:
                    raise ValueError(f"{p}: class index {valid.max()} out of range for num_classes="
                                     f"{self._num_classes} (255 = ignore)")
                a = _resize(a, self.img_size, "nearest").astype(np.int64)
            elif t == "edge":
                a = np.where(a == IGNORE, IGNORE, (a > 0)).astype(np.float32)
                a = _resize(a, self.img_size, "nearest")
            elif t == "depth":
                a = _resize(a, self.img_size, "nearest")
            else:
                a = _resize(a, self.img_size, "nearest")
                n = np.linalg.norm(a, axis=-1, keepdims=True)
                a = np.where(n > 1e-6, a / np.maximum(n, 1e-6), 0.0).astype(np.float32)
            out[t] = a
        return out

    def load(self, split: str) -> dict[str, np.ndarray]:
        """All samples of a split as stacked arrays (see :meth:`SyntheticScenes.render`)."""
        samples = [self._load_one(i) for i in self.ids(split)]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    def infer_num_classes(self, arrays: dict[str, np.ndarray]) -> int:
        if self._num_classes is not None:
            return self._num_classes
        seg = arrays["semseg"]
        valid = seg[seg != IGNORE]
        return int(valid.max()) + 1 if valid.size else 1


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------
class MultiTaskDataModule(SplitLoaders, L.LightningDataModule):
    """Multi-task dense prediction: built-in synthetic scenes (root=None) or a NYUD-v2/PASCAL-style
    folder (images/, segmentation/, depth/*.npy, normals/*.npy, edge/, train.txt, val.txt).

    Args:
        root: None for the built-in :class:`SyntheticScenes`; a folder in the
            :class:`MultiTaskFolder` layout otherwise.
        tasks: tasks to load (None = all available). The model trains the tasks it is given;
            a single-task model simply ignores the other fields.
        num_classes: semseg classes for folder data (None = max label + 1 over train/val/test).
        img_size: side length images are rendered/resized to.
        num_train, num_val, num_test: synthetic split sizes.
        shapes_per_image, depth_range, noise, texture_contrast: synthetic difficulty.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the synthetic scenes.
    """

    def __init__(self, root: str | None = None, tasks: list[str] | None = None,
                 num_classes: int | None = None, img_size: int = 32, num_train: int = 1024,
                 num_val: int = 256, num_test: int = 256, shapes_per_image: tuple[int, int] = (2, 4),
                 depth_range: tuple[float, float] = (2.0, 7.0), noise: float = 0.03,
                 texture_contrast: float = 0.5, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        # no save_hyperparameters(): keys shared with the module (tasks, num_classes, img_size) would
        # clash when Lightning merges both into the logger's hparams
        self.hparams_data = dict(num_classes=num_classes, num_train=num_train, num_val=num_val,
                                 num_test=num_test, shapes_per_image=shapes_per_image,
                                 depth_range=depth_range, noise=noise, texture_contrast=texture_contrast,
                                 seed=seed)
        self.root = root
        if tasks is not None:
            for t in tasks:
                if t not in ALL_TASKS:
                    raise ValueError(f"data.tasks: unknown task {t!r}; choose from {ALL_TASKS}")
        self._tasks_arg = tuple(tasks) if tasks is not None else None
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.splits: dict[str, TensorDictDataset] = {}
        self.tasks: tuple[str, ...] = ()
        self.num_classes: int | None = None
        self._prepare_meta()

    def _prepare_meta(self):
        """Decide tasks and num_classes up front (the module's on_data reads them)."""
        if self.root is None:
            self.tasks = self._tasks_arg or ALL_TASKS
            self.num_classes = SyntheticScenes.num_classes
        else:
            self.folder = MultiTaskFolder(self.root, self._tasks_arg, self.hparams_data["num_classes"],
                                          self.img_size)
            self.tasks = self.folder.tasks
            self.num_classes = self.hparams_data["num_classes"]

    def setup(self, stage: str | None = None):
        if self.splits:
            return
        hp = self.hparams_data
        if self.root is None:
            sizes = {"train": hp["num_train"], "val": hp["num_val"], "test": hp["num_test"]}
            arrays = {}
            for j, (split, n) in enumerate(sizes.items()):
                gen = SyntheticScenes(self.img_size, tuple(hp["shapes_per_image"]), tuple(hp["depth_range"]),
                                      hp["noise"], hp["texture_contrast"], seed=hp["seed"] * 1000 + j)
                arrays[split] = gen.render(n)
        else:
            arrays = {s: self.folder.load(s) for s in ("train", "val", "test")}
            if "semseg" in self.tasks:
                if self.num_classes is None:
                    self.num_classes = max(self.folder.infer_num_classes(a) for a in arrays.values())
        self.splits = {s: TensorDictDataset(to_tensors(a, self.tasks)) for s, a in arrays.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, drop_last=False)
