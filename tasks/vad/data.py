"""Data for weakly supervised video anomaly detection (WSVAD).

Three sources, one representation (:class:`Video`: snippet features ``[T, C]`` or
``[crops, T, C]``, a video-level label and class, and frame-level ground truth for testing):

1. Built-in (``root: null``): :func:`make_synthetic_split`, weakly labelled "videos" of snippet
   features. Normal videos follow a drifting latent process; anomalous ones contain 1-3 events of
   one anomaly class, each class with its own feature signature and temporal profile
   (short burst, long ramp-up drift, periodic pulses). Difficulty, number of classes, lengths and
   feature width are keys of :class:`VADDataModule`.
2. A feature release as downloaded (``root: DIR``): RTFM's 10-crop ``[T, 10, C]`` files, UR-DMU's
   and XD-Violence's one-file-per-crop ``<video>__<i>.npy``, or plain ``[T, C]`` files, with their
   list files and the frame labels or annotation text they ship (:mod:`tasks.vad.formats`,
   :func:`read_feature_folder`). Classes come from the UCF-Crime / XD-Violence file names.
3. A real signal (``source: kdd_tsad_135``, extra ``[vad-real]``): the UCR/KDD-2021 anomaly
   series that ``aeon`` ships, cut into clips with clip-level labels only (:func:`load_kdd_tsad_clips`).

Training follows UR-DMU: each training video is mean-pooled to ``num_segments`` snippets so
videos batch together, and every batch holds as many normal as anomalous videos.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from zoo.data import CheckpointedShuffle

from .formats import (ANOMALY, FRAMES_PER_SNIPPET, NORMAL, FeatureFiles, _Index,  # noqa: F401
                      check_consistent, choose_crop_axis, class_from_name, find_file, fit_mask,
                      group_videos, read_annotations, read_frame_labels_npy, read_list, video_key)

PROFILES = ("burst", "drift", "periodic")


@dataclass
class Video:
    """One video as snippet features plus its weak (video-level) and frame-level labels."""

    name: str
    data: np.ndarray | FeatureFiles  # [T, C] or [crops, T, C] float32, or the files holding it
    class_name: str                  # NORMAL or an anomaly class (the first tag of an XD name)
    frame_gt: np.ndarray | None = None  # [T * frames_per_snippet] {0,1}, test videos only
    tags: tuple = ()                 # every tag of a multi-label XD-Violence name

    @property
    def features(self) -> np.ndarray:
        """[T, C] or [crops, T, C] float32 (read from disk each time for a feature folder)."""
        return self.data if isinstance(self.data, np.ndarray) else self.data.load()

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def label(self) -> int:
        return int(self.class_name != NORMAL)

    @property
    def num_snippets(self) -> int:
        return self.shape[-2]

    @property
    def feature_dim(self) -> int:
        return self.shape[-1]


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
# The releases' feature folders (layouts and label files: formats.py)
# --------------------------------------------------------------------------------------------
def _check_class(cls: str, classes: list[str], where: str) -> None:
    if cls != NORMAL and cls not in classes:
        raise ValueError(f"{where}: unknown class {cls!r}; known classes are {classes} "
                         f"(set data.classes to declare them)")


def _frame_truth(root: Path, test: list[Video], files: dict, crop_note: str) -> None:
    """Attach ``frame_gt`` ([T * 16] in {0, 1}) to every test video from the one label source
    found: concatenated frame labels, per-video frame masks, or an annotation text file."""
    fps = FRAMES_PER_SNIPPET
    if files["gt"] is not None:
        labels = read_frame_labels_npy(files["gt"])
        need = sum(v.num_snippets * fps for v in test)
        if labels.shape[0] != need:
            raise ValueError(f"{files['gt']}: has {labels.shape[0]} frame labels but the videos "
                             f"of {files['test_list']} need {need} ({fps} frames per snippet, "
                             f"concatenated in list order{crop_note})")
        start = 0
        for v in test:
            n = v.num_snippets * fps
            v.frame_gt = labels[start:start + n]
            start += n
        return
    if files["frame_masks"] is not None:
        folder = files["frame_masks"]
        for v in test:
            n = v.num_snippets * fps
            mask_path = folder / f"{v.name}.npy"
            if mask_path.is_file():
                v.frame_gt = fit_mask(read_frame_labels_npy(mask_path), n, mask_path)
            elif v.class_name not in (None, NORMAL):
                raise ValueError(f"{folder}: no frame mask {v.name}.npy for the anomalous test "
                                 f"video {v.name!r}")
            else:
                v.frame_gt = np.zeros(n, np.uint8)
        return
    if files["annotations"] is None:
        raise FileNotFoundError(
            f"{root}: need frame ground truth for the test videos: concatenated frame labels "
            f"(gt.npy, gt-ucf.npy, gt-sh.npy, xd_gt.npy), a folder of per-video masks "
            f"(test_frame_mask/) or annotations.txt (UCF-Crime / UR-DMU / XD-Violence text), in "
            f"DIR, DIR/list or DIR/frame_label, or named by data.gt / data.frame_masks / "
            f"data.annotations")
    ann_path = files["annotations"]
    ann = read_annotations(ann_path)
    by_name = {v.name: v for v in test}
    for key, a in ann.items():
        if key not in by_name:
            raise ValueError(f"{a.where}: names video {key!r}, which is not in "
                             f"{files['test_list']}")
    for v in test:
        n = v.num_snippets * fps
        v.frame_gt = np.zeros(n, dtype=np.uint8)
        a = ann.get(v.name)
        if a is None:
            if v.class_name not in (None, NORMAL):
                raise ValueError(f"{ann_path}: no annotation line for anomalous test video "
                                 f"{v.name!r}")
            continue
        for s, e, written in a.spans:
            if s >= n:
                raise ValueError(f"{a.where}: event {s}-{written} of {v.name!r} starts after the "
                                 f"video's {n} frames ({v.num_snippets} snippets x {fps}); "
                                 f"features and annotation disagree")
            v.frame_gt[s:min(e, n)] = 1


def read_feature_folder(root: str | Path, train_list: str | None = None,
                        test_list: str | None = None, gt: str | None = None,
                        annotations: str | None = None, frame_masks: str | None = None,
                        classes: list[str] | None = None, crop_axis: int | None = None,
                        anomalous_first: int | None = None):
    """Read a release's feature folder (``formats.py``); returns (train, test, class names).

    Every file name of the releases is found by itself (``formats.KNOWN``); each key names a
    file relative to ``root`` instead. Nothing is returned unless every file is valid.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root is not a folder: {root}")
    files = {"train_list": find_file(root, train_list, "train_list", True),
             "test_list": find_file(root, test_list, "test_list", True)}
    for key, given in (("gt", gt), ("frame_masks", frame_masks), ("annotations", annotations)):
        files[key] = find_file(root, given, key, False)
    explicit = {"gt": gt, "frame_masks": frame_masks, "annotations": annotations}
    found = [k for k in explicit if files[k] is not None]
    keep = [k for k in found if explicit[k] is not None] or found[:1]  # named ones, else the
    files.update({k: None for k in found if k not in keep})  # first: frame labels, as the
    if len(keep) > 1:                                          # releases' evaluations use
        raise ValueError(f"{root}: name one frame ground truth, not {' and '.join(keep)}")
    index = _Index(root)
    train_l = group_videos(read_list(files["train_list"], index))
    test_l = group_videos(read_list(files["test_list"], index))
    check_consistent(train_l + test_l)
    gt_len = None
    if files["gt"] is not None and len(train_l[0].files.raw_shape) == 3:
        gt_len = read_frame_labels_npy(files["gt"]).shape[0]
    axis, why = choose_crop_axis(train_l + test_l, test_l, gt_len, crop_axis)
    crop_note = ""
    if axis is not None:
        crop_note = f"; 3-D files read as {'[T, crops, C]' if axis == 1 else '[crops, T, C]'} ({why})"

    def videos(listed, is_train):
        out = []
        for i, v in enumerate(listed):
            v.files.crop_axis = axis
            cls = v.class_name
            if anomalous_first is not None:
                cls = (ANOMALY if i < anomalous_first else NORMAL) if is_train else None
            elif cls is None:
                raise ValueError(f"{v.where}: cannot read a class from the file name "
                                 f"{v.files.paths[0].name!r} (expected e.g. 'Abuse028_x264' or "
                                 f"an XD-Violence '_label_B1'); for names without a class set "
                                 f"data.anomalous_first (RTFM's ShanghaiTech list: 63)")
            out.append(Video(v.key, v.files, cls, tags=v.tags))
        return out

    train, test = videos(train_l, True), videos(test_l, False)
    if classes is None:
        classes = sorted({v.class_name for v in train} - {NORMAL})
    for lv, v in zip(train_l, train):
        _check_class(v.class_name, classes, lv.where + f" ({lv.files.paths[0].name})")
    if not classes or all(v.label == 0 for v in train) or all(v.label == 1 for v in train):
        raise ValueError(f"{files['train_list']}: weak supervision needs both normal videos "
                         f"('Normal' in the name, '_label_A') and anomalous videos in the "
                         f"train list")
    for lv, v in zip(test_l, test):
        if v.class_name is not None:
            _check_class(v.class_name, classes, lv.where + f" ({lv.files.paths[0].name})")
    _frame_truth(root, test, files, crop_note)
    for v in test:  # names without a class: the frame labels say which videos are anomalous
        if v.class_name is None:
            v.class_name = ANOMALY if v.frame_gt.any() else NORMAL
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
        # built-in videos are pooled once; a folder's are read from disk when drawn
        self.feats = [pool_segments(v.data, num_segments) if isinstance(v.data, np.ndarray)
                      else None for v in videos]

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        v = self.videos[i]
        x = self.feats[i] if self.feats[i] is not None else pool_segments(v.features, self.num_segments)
        return {"features": torch.from_numpy(x), "label": torch.tensor(float(v.label)),
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
    """Weakly supervised VAD data: built-in generator, an I3D feature release as downloaded
    (RTFM [T, 10, C], UR-DMU / XD-Violence per-crop files, plain [T, C]), or aeon's KDD series.

    Args:
        root: ``null`` = built-in data (or ``source``); a feature release's folder
            (RTFM, UR-DMU, XD-Violence layouts, see ``formats.py``).
        train_list, test_list, gt, annotations, frame_masks: file names relative to ``root``;
            ``null`` = found by the names the releases ship (``formats.KNOWN``).
        crop_axis: of 3-D feature files, 1 = ``[T, crops, C]`` (RTFM), 0 = ``[crops, T, C]``;
            ``null`` = decided from the frame-label length and the shapes.
        anomalous_first: for names that carry no class (ShanghaiTech): the first N videos of
            the train list are anomalous, the rest normal (RTFM's list: 63).
        source: with ``root: null``, ``synthetic`` or ``kdd_tsad_135`` (needs aeon).
        num_segments: snippets per training video after mean pooling (UR-DMU uses 200 on
            UCF-Crime; 64 = the built-in video length).
        classes: anomaly class names; ``null`` = taken from the train list file names.
        num_classes, feature_dim, min_len, max_len, difficulty, shared_fraction: built-in data
            (difficulty divides every event's amplitude: 1 = default, 2 = half as strong).
        num_train_normal, num_train_anomalous, num_test_normal, num_test_anomalous: built-in sizes.
    """

    def __init__(self, root: str | None = None, source: str = "synthetic",
                 train_list: str | None = None, test_list: str | None = None,
                 gt: str | None = None, annotations: str | None = None,
                 frame_masks: str | None = None, crop_axis: int | None = None,
                 anomalous_first: int | None = None,
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
            train, test, classes = read_feature_folder(
                h.root, h.train_list, h.test_list, h.gt, h.annotations, h.frame_masks, h.classes,
                h.crop_axis, h.anomalous_first)
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
        s = self.train_videos[0].shape
        return s[0] if len(s) == 3 else 1

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
