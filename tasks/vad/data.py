"""Data for weakly supervised video anomaly detection (WSVAD).

Three sources, one representation (:class:`Video`: snippet features ``[T, C]`` or
``[crops, T, C]``, a video-level label and class, and frame-level ground truth for testing):

1. Built-in (``root: null``): :func:`make_synthetic_split`, weakly labelled "videos" of snippet
   features. Normal videos follow a drifting latent process; anomalous ones contain 1-3 events of
   one anomaly class, each class with its own feature signature and temporal profile
   (short burst, long ramp-up drift, periodic pulses). Difficulty, number of classes, lengths and
   feature width are keys of :class:`VADDataModule`.
2. The field's format (``root: DIR``), as UCF-Crime / XD-Violence feature releases used by
   RTFM (Tian et al. 2021) and UR-DMU (Zhou et al. 2023)::

       DIR/train.list        one .npy path per line, relative to DIR
       DIR/test.list
       DIR/<video>.npy       [T, C] or [crops, T, C] I3D-style snippet features (16 frames each)
       DIR/gt.npy            frame labels of the test videos concatenated in test.list order
                             (T * 16 frames per video)  -- or --
       DIR/annotations.txt   "video class start1 end1 [start2 end2 ...]" in frames, -1 = none

   The class of a video comes from its file name: the leading letters for UCF-Crime names
   (``Abuse028_x264.npy`` -> ``Abuse``, ``Normal_Videos_003_x264.npy`` -> normal) or the tag
   after ``_label_`` for XD-Violence names (``..._label_B1-0-0`` -> ``B1``, ``_label_A`` -> normal).
3. A real signal (``source: kdd_tsad_135``, extra ``[vad-real]``): the UCR/KDD-2021 anomaly
   series that ``aeon`` ships, cut into clips with clip-level labels only (:func:`load_kdd_tsad_clips`).

Training follows UR-DMU: each training video is mean-pooled to ``num_segments`` snippets so
videos batch together, and every batch holds as many normal as anomalous videos.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from zoo.data import CheckpointedShuffle

FRAMES_PER_SNIPPET = 16
NORMAL = "Normal"
PROFILES = ("burst", "drift", "periodic")


@dataclass
class Video:
    """One video as snippet features plus its weak (video-level) and frame-level labels."""

    name: str
    features: np.ndarray            # [T, C] or [crops, T, C] float32
    class_name: str                 # NORMAL or an anomaly class
    frame_gt: np.ndarray | None = None  # [T * frames_per_snippet] {0,1}, test videos only

    @property
    def label(self) -> int:
        return int(self.class_name != NORMAL)

    @property
    def num_snippets(self) -> int:
        return self.features.shape[-2]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[-1]


# --------------------------------------------------------------------------------------------
# Built-in generator
# --------------------------------------------------------------------------------------------
@dataclass
class SyntheticWorld:
    """The fixed structure shared by every split: normal subspace and class signatures."""

    basis: np.ndarray        # [C, r] normal latent -> features
    signatures: np.ndarray   # [K, C] unit anomaly direction per class
    amplitudes: np.ndarray   # [K] event strength per class (before difficulty)
    profiles: list           # [K] temporal profile name per class
    class_names: list        # [K]


def make_world(num_classes: int, feature_dim: int, seed: int, latent_dim: int = 8,
               shared_fraction: float = 0.0) -> SyntheticWorld:
    """Draw the normal subspace and one signature + profile per anomaly class.

    Signatures are random unit directions outside the normal subspace. With
    ``shared_fraction`` > 0, consecutive classes share that fraction of their direction with
    opposite signs (class 2j moves along +u_j, class 2j+1 along -u_j, each plus its own private
    part), so one linear read-out cannot serve both and a detector must model each class's
    pattern separately. Profiles cycle burst / drift / periodic.
    """
    if num_classes < 1 or feature_dim < 4:
        raise ValueError(f"synthetic data needs num_classes >= 1 and feature_dim >= 4, "
                         f"got {num_classes}, {feature_dim}")
    rng = np.random.default_rng(seed)
    r = min(latent_dim, feature_dim // 2)
    basis = np.linalg.qr(rng.normal(size=(feature_dim, feature_dim)))[0]
    normal_basis = basis[:, :r] * 1.0                               # [C, r]
    free = basis[:, r:]                                             # directions normals never use
    sigs = []
    for c in range(num_classes):
        u = free @ rng.normal(size=free.shape[1])
        u /= np.linalg.norm(u)
        if c % 2 == 1:  # partner of class c-1: shares its direction with opposite sign
            shared = -sigs[c - 1]["u"]
        else:
            shared = u
        private = free @ rng.normal(size=free.shape[1])
        private -= (private @ shared) * shared
        private /= np.linalg.norm(private)
        s = math.sqrt(shared_fraction) * shared + math.sqrt(1 - shared_fraction) * private
        sigs.append({"u": shared, "s": s / np.linalg.norm(s)})
    signatures = np.stack([d["s"] for d in sigs]).astype(np.float32)
    amplitudes = (1.0 + 0.6 * rng.random(num_classes)).astype(np.float32)
    profiles = [PROFILES[c % len(PROFILES)] for c in range(num_classes)]
    names = [f"{p.capitalize()}{c}" for c, p in enumerate(profiles)]
    return SyntheticWorld(normal_basis.astype(np.float32), signatures, amplitudes, profiles, names)


def _event_profile(profile: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Temporal envelope [length] in [0, 1] of one event."""
    t = np.arange(length)
    if profile == "burst":
        return np.ones(length)
    if profile == "drift":  # slow ramp-up: weak at onset, strongest at the end
        return 0.25 + 0.75 * (t + 1) / length
    period = int(rng.integers(4, 7))
    return ((t % period) < max(1, period // 2)).astype(float)


def _event_length(profile: str, num_snippets: int, rng: np.random.Generator) -> int:
    if profile == "burst":
        return int(rng.integers(2, 5))
    frac = rng.uniform(0.2, 0.35) if profile == "drift" else rng.uniform(0.25, 0.4)
    return max(4, int(frac * num_snippets))


def synth_video(world: SyntheticWorld, rng: np.random.Generator, num_snippets: int,
                class_index: int | None, difficulty: float, noise: float = 0.2) -> tuple:
    """One video: features [T, C] and snippet labels [T].

    Normal content: x_t = B (m + z_t + t * v) + noise, with a per-video scene offset m, an AR(1)
    latent z_t (rho = 0.9) and a slow drift v (about 0.5 over the video) in the normal subspace B. An anomalous video
    (``class_index`` set) adds ``amplitude / difficulty * envelope(t) * signature`` over 1-3
    non-overlapping events of its class.
    """
    c_dim, r = world.basis.shape
    m = 0.5 * rng.normal(size=r)
    v = rng.normal(size=r) * (0.5 / num_snippets)
    z = np.zeros((num_snippets, r))
    z[0] = rng.normal(size=r)
    for t in range(1, num_snippets):
        z[t] = 0.9 * z[t - 1] + math.sqrt(1 - 0.81) * rng.normal(size=r)
    latent = m + z + np.arange(num_snippets)[:, None] * v
    x = latent @ world.basis.T + noise * rng.normal(size=(num_snippets, c_dim))
    labels = np.zeros(num_snippets, dtype=np.uint8)
    if class_index is not None:
        profile = world.profiles[class_index]
        amp = world.amplitudes[class_index] / max(difficulty, 1e-6)
        for _ in range(int(rng.integers(1, 4))):
            length = min(_event_length(profile, num_snippets, rng), num_snippets // 2)
            free = [s for s in range(0, num_snippets - length + 1)
                    if not labels[max(0, s - 1):s + length + 1].any()]
            if not free:
                break
            start = int(rng.choice(free))
            env = _event_profile(profile, length, rng)
            x[start:start + length] += amp * env[:, None] * world.signatures[class_index]
            labels[start:start + length] = 1
    return x.astype(np.float32), labels


def make_synthetic_split(world: SyntheticWorld, num_normal: int, num_anomalous: int,
                         min_len: int, max_len: int, difficulty: float, seed: int,
                         frames_per_snippet: int = FRAMES_PER_SNIPPET) -> list[Video]:
    """A list of normal then anomalous videos (anomalous ones cycle through the classes)."""
    if not 4 <= min_len <= max_len:
        raise ValueError(f"need 4 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = np.random.default_rng(seed)
    videos = []
    k = len(world.class_names)
    for i in range(num_normal + num_anomalous):
        cls = None if i < num_normal else (i - num_normal) % k
        T = int(rng.integers(min_len, max_len + 1))
        x, lab = synth_video(world, rng, T, cls, difficulty)
        name = f"Normal_{i:04d}" if cls is None else f"{world.class_names[cls]}_{i:04d}"
        videos.append(Video(name, x, NORMAL if cls is None else world.class_names[cls],
                            np.repeat(lab, frames_per_snippet)))
    return videos


# --------------------------------------------------------------------------------------------
# Readers of the field's formats
# --------------------------------------------------------------------------------------------
def class_from_name(name: str) -> str:
    """Video class from a UCF-Crime or XD-Violence style file name (see module docstring)."""
    stem = Path(name).name
    for suffix in (".npy", ".mp4", ".avi"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    if "_label_" in stem:  # XD-Violence: "..._label_B1-0-0", label A = normal
        tag = stem.split("_label_")[-1].split("-")[0]
        return NORMAL if tag == "A" else tag
    if "normal" in stem.lower():
        return NORMAL
    m = re.match(r"[A-Za-z]+", stem)
    if m is None:
        raise ValueError(f"cannot read a class from the file name {name!r}: expected a leading "
                         f"class name such as 'Abuse028_x264.npy' or an XD-style '_label_B1'")
    return m.group(0)


def video_key(name: str) -> str:
    """Name used to match list entries with annotation lines: the stem without feature suffixes."""
    stem = Path(name).name
    for suffix in (".npy", ".mp4", ".avi"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"(_i3d|__\d+)$", "", stem)


def read_list(list_path: Path) -> list[Path]:
    """Feature paths of a list file (relative to the list's folder, or absolute)."""
    if not list_path.is_file():
        raise FileNotFoundError(f"list file not found: {list_path}")
    root = list_path.parent
    paths = []
    for n, line in enumerate(list_path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line.split()[0])
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise FileNotFoundError(f"{list_path}:{n}: feature file not found: {p}")
        paths.append(p)
    if not paths:
        raise ValueError(f"{list_path}: the list names no feature files")
    return paths


def load_features(path: Path, feature_dim: int | None = None) -> np.ndarray:
    """A feature file as float32 [T, C] or [crops, T, C], validated."""
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    if x.ndim not in (2, 3):
        raise ValueError(f"{path}: features must be [T, C] or [crops, T, C], got shape {x.shape}")
    if x.shape[-2] < 1:
        raise ValueError(f"{path}: features have no snippets (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path}: features must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: features contain NaN or inf")
    if feature_dim is not None and x.shape[-1] != feature_dim:
        raise ValueError(f"{path}: feature width {x.shape[-1]} differs from {feature_dim} "
                         f"of the other videos")
    return x


def read_annotations(path: Path) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """Temporal annotations ``video class s1 e1 [s2 e2 ...]`` (frames, inclusive, -1 = none).

    The class column may be left out (XD-Violence style ``video s1 e1 ...``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        name, rest = parts[0], parts[1:]
        cls = None
        if rest and not re.fullmatch(r"-?\d+", rest[0]):
            cls, rest = rest[0], rest[1:]
        try:
            nums = [int(v) for v in rest]
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'video class start end [start end ...]' "
                             f"with integer frames, got {line!r}") from None
        if len(nums) % 2:
            raise ValueError(f"{path}:{n}: odd number of frame bounds in {line!r}")
        spans = [(s, e) for s, e in zip(nums[::2], nums[1::2]) if s >= 0 and e >= 0]
        for s, e in spans:
            if e < s:
                raise ValueError(f"{path}:{n}: event end {e} is before its start {s}")
        out[video_key(name)] = (cls or class_from_name(name), spans)
    return out


def _check_class(cls: str, classes: list[str], where: str) -> None:
    if cls != NORMAL and cls not in classes:
        raise ValueError(f"{where}: unknown class {cls!r}; known classes are {classes} "
                         f"(set data.classes to declare them)")


def read_feature_folder(root: str | Path, train_list: str = "train.list",
                        test_list: str = "test.list", gt: str = "gt.npy",
                        annotations: str = "annotations.txt", classes: list[str] | None = None,
                        frames_per_snippet: int = FRAMES_PER_SNIPPET):
    """Read the plug-in layout; returns (train videos, test videos, class names)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root is not a folder: {root}")
    train_paths = read_list(root / train_list)
    test_paths = read_list(root / test_list)
    train, dim = [], None
    for p in train_paths:
        x = load_features(p, dim)
        dim = x.shape[-1]
        train.append(Video(video_key(p.name), x, class_from_name(p.name)))
    if classes is None:
        classes = sorted({v.class_name for v in train} - {NORMAL})
    for p, v in zip(train_paths, train):
        _check_class(v.class_name, classes, str(p))
    if not classes or all(v.label == 0 for v in train) or all(v.label == 1 for v in train):
        raise ValueError(f"{root / train_list}: weak supervision needs both normal videos "
                         f"('Normal' in the name) and anomalous videos in the train list")
    test = []
    for p in test_paths:
        v = Video(video_key(p.name), load_features(p, dim), class_from_name(p.name))
        _check_class(v.class_name, classes, str(p))
        test.append(v)
    gt_path, ann_path = root / gt, root / annotations
    if gt_path.is_file():
        try:
            labels = np.load(gt_path, allow_pickle=False).reshape(-1)
        except Exception as err:  # numpy raises several types for an empty or truncated file
            raise ValueError(f"{gt_path}: not a readable .npy array of frame labels ({err})") from None
        need = sum(v.num_snippets * frames_per_snippet for v in test)
        if labels.shape[0] != need:
            raise ValueError(f"{gt_path}: has {labels.shape[0]} frame labels but the videos of "
                             f"{root / test_list} need {need} ({frames_per_snippet} frames per "
                             f"snippet, concatenated in list order)")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{gt_path}: frame labels must be 0 or 1")
        start = 0
        for v in test:
            n = v.num_snippets * frames_per_snippet
            v.frame_gt = labels[start:start + n].astype(np.uint8)
            start += n
    elif ann_path.is_file():
        ann = read_annotations(ann_path)
        for v in test:
            n = v.num_snippets * frames_per_snippet
            v.frame_gt = np.zeros(n, dtype=np.uint8)
            if v.name not in ann:
                if v.label:
                    raise ValueError(f"{ann_path}: no annotation line for anomalous test video "
                                     f"{v.name!r}")
                continue
            cls, spans = ann[v.name]
            _check_class(cls, classes, f"{ann_path} ({v.name})")
            for s, e in spans:
                if s >= n:
                    raise ValueError(f"{ann_path}: event {s}-{e} of {v.name!r} starts after the "
                                     f"video's {n} frames ({v.num_snippets} snippets x "
                                     f"{frames_per_snippet}); features and annotation disagree")
                v.frame_gt[s:min(e + 1, n)] = 1
    else:
        raise FileNotFoundError(f"{root}: need frame ground truth for the test videos, either "
                                f"{gt} (concatenated frame labels) or {annotations}")
    return train, test, classes


# --------------------------------------------------------------------------------------------
# Real signal: UCR/KDD-2021 series shipped by aeon
# --------------------------------------------------------------------------------------------
def load_kdd_tsad_clips(clip_len: int = 256, snippet: int = 8, stride: int = 32, seed: int = 0):
    """The KDD-2021 series 135 (``aeon.datasets.load_kdd_tsad_135``) as weakly labelled clips.

    The heart-rate series (7501 points, one labelled anomaly of 12 points) is z-scored and cut
    into clips of ``clip_len`` points every ``stride`` points; each clip is a "video" of
    ``clip_len // snippet`` snippets whose features are the snippet's points minus the clip
    median, their first differences and their std ([T, 2*snippet + 1]). A clip is anomalous when
    it overlaps the anomaly, and only that clip-level label is used for training. Anomalous clips
    alternate between train and test (the event sits at a different offset in each), normal
    clips are split at random. There is a single physical event, so this is a sanity check of
    localisation from clip-level labels, not a benchmark of generalisation.
    Returns (train, test, classes).
    """
    try:
        from aeon.datasets import load_kdd_tsad_135
    except ImportError:
        raise ImportError("the real-data source 'kdd_tsad_135' needs aeon: "
                          "pip install 'moe-zoo[vad-real]' (or pip install aeon)") from None
    series, labels = load_kdd_tsad_135()
    series = np.asarray(series, dtype=np.float64)
    labels = np.asarray(labels).astype(np.uint8)
    series = (series - series.mean()) / (series.std() + 1e-8)
    clips = []
    for s in range(0, len(series) - clip_len + 1, stride):
        seg = series[s:s + clip_len].reshape(-1, snippet)                    # [T, snippet]
        lab = labels[s:s + clip_len].reshape(-1, snippet).max(1)             # [T]
        feats = np.concatenate([seg - np.median(seg), np.diff(seg, axis=1, prepend=seg[:, :1]),
                                seg.std(1, keepdims=True)], axis=1).astype(np.float32)
        cls = "Anomaly" if lab.any() else NORMAL
        gt = np.repeat(lab, FRAMES_PER_SNIPPET).astype(np.uint8)
        clips.append(Video(f"{cls}_kdd135_{s:05d}", feats, cls, gt))
    anomalous = [i for i, v in enumerate(clips) if v.label]
    if len(anomalous) < 2:
        raise ValueError("kdd_tsad_135: fewer than two anomalous clips; lower the clip stride")
    rng = np.random.default_rng(seed)
    normals = rng.permutation([i for i, v in enumerate(clips) if not v.label])
    test_ids = set(anomalous[1::2]) | set(normals[: len(normals) // 2].tolist())
    train = [v for i, v in enumerate(clips) if i not in test_ids]
    test = [v for i, v in enumerate(clips) if i in test_ids]
    return train, test, ["Anomaly"]


# --------------------------------------------------------------------------------------------
# Datasets, sampler, datamodule
# --------------------------------------------------------------------------------------------
def pool_segments(x: np.ndarray, num_segments: int) -> np.ndarray:
    """Mean-pool snippets [..., T, C] to [..., S, C] over S equal spans (UR-DMU's training
    input); a span that holds no snippet repeats the nearest one."""
    T = x.shape[-2]
    edges = np.linspace(0, T, num_segments + 1).astype(int)
    out = np.empty(x.shape[:-2] + (num_segments, x.shape[-1]), dtype=np.float32)
    for i in range(num_segments):
        a, b = edges[i], edges[i + 1]
        out[..., i, :] = x[..., a:b, :].mean(-2) if b > a else x[..., min(a, T - 1), :]
    return out


class TrainVideos(Dataset):
    """Pooled training videos: dict(features [S, C] or [crops, S, C], label, cls)."""

    def __init__(self, videos: list[Video], classes: list[str], num_segments: int):
        self.videos, self.classes, self.num_segments = videos, classes, num_segments
        self.feats = [pool_segments(v.features, num_segments) for v in videos]

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        v = self.videos[i]
        return {"features": torch.from_numpy(self.feats[i]), "label": torch.tensor(float(v.label)),
                "cls": torch.tensor(self.classes.index(v.class_name) if v.label else -1)}


class TestVideos(Dataset):
    """Full-length test videos, one per batch: dict(features, label, cls, frame_gt, index)."""

    def __init__(self, videos: list[Video], classes: list[str]):
        self.videos, self.classes = videos, classes

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        v = self.videos[i]
        return {"features": torch.from_numpy(v.features), "label": torch.tensor(float(v.label)),
                "cls": torch.tensor(self.classes.index(v.class_name) if v.label else -1),
                "frame_gt": torch.from_numpy(v.frame_gt.astype(np.int64)),
                "index": torch.tensor(i)}


class BalancedBatchSampler(BatchSampler):
    """Batches of ``batch_size // 2`` normal and ``batch_size // 2`` anomalous videos
    (UR-DMU/RTFM draw one normal and one abnormal loader per step).

    The order comes from ``sampler`` (a shuffling sampler over the training set): its indices
    are split by label and paired; an epoch covers the larger group once and draws the smaller
    one again as needed. It follows PyTorch's ``BatchSampler`` API, so under a distributed
    strategy Lightning re-creates it around a ``DistributedSampler`` and every rank balances
    its own shard of the videos.
    """

    def __init__(self, sampler, batch_size: int, labels: list[int], drop_last: bool = False):
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 to pair normal and anomalous videos, "
                             f"got {batch_size}")
        super().__init__(sampler, batch_size, drop_last)
        self.labels = [int(y) for y in labels]
        if set(self.labels) != {0, 1}:
            raise ValueError("the training videos must include both normal and anomalous videos")
        self.half = batch_size // 2

    def _groups(self) -> tuple[list[int], list[int]]:
        """The sampler's indices split into (normal, anomalous), in the sampler's order. A shard
        with no video of one label (tiny data over many ranks) borrows that label's videos from
        the whole set, so every batch stays paired."""
        order = [int(i) for i in self.sampler]
        groups = []
        for label in (0, 1):
            group = [i for i in order if self.labels[i] == label]
            groups.append(group or [i for i, y in enumerate(self.labels) if y == label])
        return groups[0], groups[1]

    def __len__(self):
        # counted without iterating a shuffling sampler: every draw from its generator here would
        # shift the epoch orders (Lightning asks for the length several times per epoch)
        if isinstance(self.sampler, RandomSampler) and not self.sampler.replacement:
            anom = sum(self.labels[i] for i in range(len(self.sampler.data_source)))
            counts = (len(self.sampler.data_source) - anom, anom)
        else:
            counts = tuple(len(g) for g in self._groups())
        return math.ceil(max(counts) / self.half)

    def __iter__(self):
        norm, anom = self._groups()
        n_batches = math.ceil(max(len(norm), len(anom)) / self.half)
        n = n_batches * self.half

        def cycle(group):  # repeat the (already shuffled) group until it has n entries
            return (group * math.ceil(n / len(group)))[:n]

        norm, anom = cycle(norm), cycle(anom)
        for b in range(n_batches):
            sl = slice(b * self.half, (b + 1) * self.half)
            yield norm[sl] + anom[sl]


class VADDataModule(CheckpointedShuffle, L.LightningDataModule):
    """Weakly supervised VAD data: built-in generator, a feature folder, or aeon's KDD series.

    Args:
        root: ``null`` = built-in data (or ``source``); a folder in the plug-in layout.
        source: with ``root: null``, ``synthetic`` or ``kdd_tsad_135`` (needs aeon).
        num_segments: snippets per training video after mean pooling (UR-DMU uses 200 on
            UCF-Crime; 64 = the built-in video length).
        classes: anomaly class names; ``null`` = taken from the train list file names.
        num_classes, feature_dim, min_len, max_len, difficulty, shared_fraction: built-in data
            (difficulty divides every event's amplitude: 1 = default, 2 = half as strong).
        num_train_normal, num_train_anomalous, num_test_normal, num_test_anomalous: built-in sizes.
    """

    def __init__(self, root: str | None = None, source: str = "synthetic",
                 train_list: str = "train.list", test_list: str = "test.list",
                 gt: str = "gt.npy", annotations: str = "annotations.txt",
                 classes: list[str] | None = None, num_segments: int = 64, batch_size: int = 16,
                 num_workers: int = 0, num_classes: int = 4, feature_dim: int = 32,
                 min_len: int = 64, max_len: int = 64, difficulty: float = 1.0,
                 shared_fraction: float = 0.5, num_train_normal: int = 120,
                 num_train_anomalous: int = 120, num_test_normal: int = 40,
                 num_test_anomalous: int = 60, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.init_shuffle(seed)
        self.train_videos = self.val_videos = self.test_videos = None
        self.classes: list[str] = []
        self.world: SyntheticWorld | None = None
        self._load()

    # the data is small: read/generate and validate once, at construction, so a bad file fails
    # before any training starts and the module can size itself from `feature_dim`/`classes`.
    def _load(self):
        h = self.hparams
        if h.root is not None:
            train, test, classes = read_feature_folder(h.root, h.train_list, h.test_list, h.gt,
                                                       h.annotations, h.classes)
            val = test  # the lineage (RTFM, UR-DMU) selects on the test list; no val split exists
        elif h.source == "kdd_tsad_135":
            train, test, classes = load_kdd_tsad_clips(seed=h.seed)
            val = test
        elif h.source == "synthetic":
            self.world = make_world(h.num_classes, h.feature_dim, seed=h.seed,
                                    shared_fraction=h.shared_fraction)
            split = dict(min_len=h.min_len, max_len=h.max_len, difficulty=h.difficulty)
            train = make_synthetic_split(self.world, h.num_train_normal, h.num_train_anomalous,
                                         seed=h.seed + 1, **split)
            val = make_synthetic_split(self.world, max(4, h.num_test_normal // 2),
                                       max(4, h.num_test_anomalous // 2), seed=h.seed + 2, **split)
            test = make_synthetic_split(self.world, h.num_test_normal, h.num_test_anomalous,
                                        seed=h.seed + 3, **split)
            classes = list(self.world.class_names)
        else:
            raise ValueError(f"data.source must be 'synthetic' or 'kdd_tsad_135', got {h.source!r}")
        self.train_videos, self.val_videos, self.test_videos = train, val, test
        self.classes = list(classes)

    @property
    def feature_dim(self) -> int:
        return self.train_videos[0].feature_dim

    @property
    def num_crops(self) -> int:
        f = self.train_videos[0].features
        return f.shape[0] if f.ndim == 3 else 1

    def class_prototypes(self) -> np.ndarray:
        """[K, C] mean feature of each class's anomalous training videos minus the normal mean
        (the input of the K-means grouping of classes into experts)."""
        def mean(vs):
            return np.mean([v.features.reshape(-1, v.feature_dim).mean(0) for v in vs], 0)
        normal = mean([v for v in self.train_videos if not v.label])
        return np.stack([mean([v for v in self.train_videos if v.class_name == c]) - normal
                         for c in self.classes])

    def train_dataloader(self):
        ds = TrainVideos(self.train_videos, self.classes, self.hparams.num_segments)
        order = self.shuffle_sampler(ds)  # its generator is saved in checkpoints: exact resume
        sampler = BalancedBatchSampler(order, self.hparams.batch_size,
                                       labels=[v.label for v in self.train_videos])
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return DataLoader(TestVideos(self.val_videos, self.classes), batch_size=1,
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self):
        return DataLoader(TestVideos(self.test_videos, self.classes), batch_size=1,
                          num_workers=self.hparams.num_workers)

    def predict_dataloader(self):
        return self.test_dataloader()
