"""Readers of the public I3D feature releases of weakly supervised VAD, as they are downloaded.

Three layouts of per-video snippet features (16 frames per snippet) are read from one folder:

=============  ===================================  ==========================================
layout         a video is                           released by
=============  ===================================  ==========================================
``whole``      one file ``[T, C]``                  any single-crop extraction
``rtfm``       one file ``[T, crops, C]``           RTFM (UCF-Crime, ShanghaiTech: 10 crops, C=2048)
``per_crop``   ``<video>__0.npy`` ... ``__N-1``     UR-DMU (UCF-Crime: 10 crops), XD-Violence
               files of ``[T, C]`` each             (5 crops), C = 1024; lists name every crop file
=============  ===================================  ==========================================

Every video is held as ``[T, C]`` (one crop) or ``[crops, T, C]``. A 3-D file is read with its
crops on axis 1 (RTFM's ``[T, 10, C]``) or axis 0 (``[crops, T, C]``): ``crop_axis`` names it;
left unset, the test frame labels decide (the reading whose Σ T·16 equals their length), then
the axis whose size is the same in every file while the other varies, then the smaller axis.

Video-level classes come from the file names: UCF-Crime's leading letters (``Abuse028_x264`` ->
``Abuse``, a name containing ``Normal`` -> normal) or XD-Violence's tags after ``_label_``
(``..._label_B2-G-0__3`` -> class ``B2``, tags ``(B2, G)``; ``_label_A`` -> normal). Names with
no class (ShanghaiTech's ``01_0015``) need ``anomalous_first`` (RTFM lists its anomalous
training videos first); their test labels then come from the frame labels.

Frame ground truth of the test videos, in any of the releases' forms, always ``T * 16`` frames
per video (what the releases' evaluations compare against ``np.repeat(scores, 16)``):

- concatenated frame labels ``.npy`` in test-list order (RTFM ``gt-ucf.npy`` / ``gt-sh.npy``,
  UR-DMU ``gt-ucf.npy`` / ``xd_gt.npy``, XD-Violence ``gt.npy``): length must be Σ T·16;
- a folder of per-video frame masks ``<video>.npy`` (RTFM's ShanghaiTech ``test_frame_mask/``):
  a shorter mask is padded with its last label (RTFM's ``make_gt_sh.py``), one longer by less
  than a snippet is cut, one longer by a snippet or more is an error;
- an annotation text file: UCF-Crime's ``Temporal_Anomaly_Annotation_for_Testing_Videos.txt``
  (``Abuse028_x264.mp4  Abuse  165  240  -1  -1``, frames inclusive), UR-DMU's
  ``UCF_Annotation.txt`` (the same with the video's frame count after the name), XD-Violence's
  ``annotations.txt`` (``name s1 e1 s2 e2 ...``, end exclusive, as its ``make_gt.py``);
  events are cut at the video's T·16 frames.

Files are validated (readable, numeric, finite, shapes, widths, crops) before anything trains;
the arrays are read again from disk when a batch needs them, so a release of tens of GB is
never held in memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FRAMES_PER_SNIPPET = 16
NORMAL = "Normal"
ANOMALY = "Anomaly"  # the class of videos whose names carry none (see anomalous_first)
CROP_COUNTS = (5, 10)

# file names the releases ship, looked for in DIR, DIR/list and DIR/frame_label
SEARCH_DIRS = ("", "list", "frame_label")
KNOWN = {
    "train_list": ("train.list", "ucf-i3d.list", "shanghai-i3d-train-10crop.list",
                   "UCF_Train.list", "XD_Train.list", "rgb.list"),
    "test_list": ("test.list", "ucf-i3d-test.list", "shanghai-i3d-test-10crop.list",
                  "UCF_Test.list", "XD_Test.list", "rgb_test.list"),
    "gt": ("gt.npy", "gt-ucf.npy", "gt-sh.npy", "xd_gt.npy"),
    "annotations": ("annotations.txt", "Temporal_Anomaly_Annotation_for_Testing_Videos.txt",
                    "UCF_Annotation.txt", "XD_Annotation.txt"),
    "frame_masks": ("test_frame_mask",),
}
_CROP = re.compile(r"^(?P<video>.+)__(?P<crop>\d+)$")
_INT = re.compile(r"-?\d+")


# ------------------------------------------------------------------------------------- names
def _stem(name: str) -> str:
    stem = Path(name.replace("\\", "/")).name
    for suffix in (".npy", ".mp4", ".avi"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem


def split_crop(name: str) -> tuple[str, int | None]:
    """(file stem without the crop suffix, crop index or None): ``X__3.npy`` -> (``X``, 3)."""
    stem = _stem(name)
    m = _CROP.match(stem)
    return (m["video"], int(m["crop"])) if m else (stem, None)


def video_key(name: str) -> str:
    """The name that matches list entries, annotation lines and frame masks: the file stem
    without folders, extension, crop suffix (``__3``) and RTFM's ``_i3d``."""
    stem, _ = split_crop(name)
    return re.sub(r"_i3d$", "", stem)


def name_tags(name: str) -> tuple[str | None, tuple[str, ...]]:
    """(class, all tags) from a UCF-Crime or XD-Violence name; class None = the name has none."""
    stem, _ = split_crop(name)
    if "_label_" in stem:  # XD-Violence: _label_B2-G-0, "0" pads the three slots, A = normal
        tags = tuple(t for t in stem.split("_label_")[-1].split("-") if t and t != "0")
        if not tags:
            return None, ()
        return (NORMAL if tags[0] == "A" else tags[0]), tags
    if "normal" in stem.lower():
        return NORMAL, (NORMAL,)
    m = re.match(r"[A-Za-z]+", stem)
    return (m.group(0), (m.group(0),)) if m else (None, ())


def class_from_name(name: str) -> str:
    """Video class from a UCF-Crime or XD-Violence style file name (see module docstring)."""
    cls, _ = name_tags(name)
    if cls is None:
        raise ValueError(f"cannot read a class from the file name {name!r}: expected a leading "
                         f"class name such as 'Abuse028_x264.npy' or an XD-style '_label_B1' "
                         f"(names without a class: set data.anomalous_first)")
    return cls


# ------------------------------------------------------------------------------------- files
def find_file(root: Path, given: str | None, key: str, required: bool) -> Path | None:
    """``given`` (relative to root) or the one release file name of ``KNOWN[key]`` present."""
    if given is not None:
        p = Path(given) if Path(given).is_absolute() else root / given
        if not p.exists():
            raise FileNotFoundError(f"{key.replace('_', ' ')} file not found: {p} "
                                    f"(data.{key} = {given!r})")
        return p
    found = [root / d / n for d in SEARCH_DIRS for n in KNOWN[key] if (root / d / n).exists()]
    if len(found) > 1:
        raise ValueError(f"{root}: several {key.replace('_', ' ')} files: "
                         f"{', '.join(str(f.relative_to(root)) for f in found)}; "
                         f"name the one to use with data.{key}")
    if not found and required:
        looked = ", ".join(KNOWN[key])
        raise FileNotFoundError(f"{key.replace('_', ' ')} file not found in {root} (looked for "
                                f"{looked} in DIR, DIR/list, DIR/frame_label; or set data.{key})")
    return found[0] if found else None


class _Index:
    """Where each .npy under root lies, by file name (built once, on the first miss), so lists
    written on another machine (``G:\\UCF_Train_ten_crop_i3d\\Abuse001_x264_i3d.npy``) resolve."""

    def __init__(self, root: Path):
        self.root, self._by_name = root, None

    def find(self, name: str) -> list[Path]:
        if self._by_name is None:
            self._by_name = {}
            for p in sorted(self.root.rglob("*.npy")):
                self._by_name.setdefault(p.name, []).append(p)
        return self._by_name.get(name, [])


@dataclass
class Entry:
    path: Path
    where: str        # "list:line"
    key: str          # video key
    crop: int | None  # crop index of a per-crop file


def read_list(list_path: Path, index: _Index | None = None) -> list[Entry]:
    """The entries of a list file: one feature path per line, absolute, relative to the data
    root, or (written elsewhere) found by file name under the root."""
    if not list_path.is_file():
        raise FileNotFoundError(f"list file not found: {list_path}")
    root = index.root if index is not None else list_path.parent
    index = index or _Index(root)
    entries = []
    for n, line in enumerate(list_path.read_text().splitlines(), 1):
        raw = line.strip()
        if not raw or raw.startswith("#"):
            continue
        raw = raw.replace("\\", "/")
        p = Path(raw)
        candidates = [p] if p.is_absolute() else [root / p, list_path.parent / p]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            same = index.find(p.name)
            if len(same) > 1:
                raise ValueError(f"{list_path}:{n}: {p.name} is found in several places under "
                                 f"{root} ({same[0]}, {same[1]}); write its path in the list")
            if not same:
                raise FileNotFoundError(f"{list_path}:{n}: feature file not found: {raw} "
                                        f"(not at that path, nor by name under {root})")
            hit = same[0]
        entries.append(Entry(hit, f"{list_path}:{n}", video_key(p.name), split_crop(p.name)[1]))
    if not entries:
        raise ValueError(f"{list_path}: the list names no feature files")
    return entries


def _open(path: Path) -> np.ndarray:
    """A memory map of a feature file, checked for rank and type (the values stay on disk)."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path}: features must be numeric, got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{path}: features must be [T, C], [T, crops, C] or [crops, T, C], "
                         f"got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{path}: features are empty (shape {x.shape})")
    return x


def _check_finite(path: Path, x: np.ndarray) -> None:
    step = max(1, (1 << 24) // max(1, x[0].size))  # ~16M values at a time
    for a in range(0, x.shape[0], step):
        if not np.isfinite(x[a:a + step]).all():
            raise ValueError(f"{path}: features contain NaN or inf")


@dataclass
class FeatureFiles:
    """Where one video's features lie and how to read them as [T, C] or [crops, T, C]."""

    paths: list[Path]          # one whole file, or one file per crop (crop order)
    crop_axis: int | None = None  # of a 3-D whole file: 1 = [T, crops, C], 0 = [crops, T, C]
    raw_shape: tuple = ()      # shape of paths[0] on disk

    @property
    def shape(self) -> tuple:
        if len(self.paths) > 1:
            return (len(self.paths),) + tuple(self.raw_shape)
        s = tuple(self.raw_shape)
        if len(s) == 3 and self.crop_axis == 1:
            return (s[1], s[0], s[2])
        return s

    def load(self) -> np.ndarray:
        if len(self.paths) > 1:
            return np.stack([np.load(p, allow_pickle=False) for p in self.paths]).astype(np.float32)
        x = np.load(self.paths[0], allow_pickle=False)
        if x.ndim == 3 and self.crop_axis == 1:
            x = x.transpose(1, 0, 2)
        return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Listed:
    """A video of a list before its crop axis and labels are settled."""

    key: str
    where: str                 # list:line of its first file
    files: FeatureFiles
    tags: tuple = field(default_factory=tuple)
    class_name: str | None = None


def group_videos(entries: list[Entry]) -> list[Listed]:
    """Entries grouped into videos (per-crop files stacked), every file opened and validated."""
    kinds = {e.crop is None for e in entries}
    if len(kinds) > 1:
        a = next(e for e in entries if e.crop is not None)
        b = next(e for e in entries if e.crop is None)
        raise ValueError(f"the folder mixes layouts: {a.where}: {a.path.name} is one file per "
                         f"crop ('__<i>.npy') but {b.where}: {b.path.name} is a whole video")
    videos: dict[str, list[Entry]] = {}
    for e in entries:
        videos.setdefault(e.key, []).append(e)
    out = []
    for key, group in videos.items():
        if group[0].crop is None:
            if len(group) > 1:
                raise ValueError(f"{group[1].where}: video {key!r} is listed twice "
                                 f"(first at {group[0].where})")
            x = _open(group[0].path)
            _check_finite(group[0].path, x)
            files = FeatureFiles([group[0].path], raw_shape=x.shape)
        else:
            crops = {}
            for e in group:
                if e.crop in crops:
                    raise ValueError(f"{e.where}: crop {e.crop} of video {key!r} is listed twice")
                crops[e.crop] = e
            order = sorted(crops)
            if order != list(range(len(order))):
                missing = sorted(set(range(max(order) + 1)) - set(order))
                raise ValueError(f"{group[0].where}: video {key!r} has crop files "
                                 f"{order} but not {missing} ({key}__{missing[0]}.npy)")
            first = None
            for c in order:
                e = crops[c]
                x = _open(e.path)
                if x.ndim != 2:
                    raise ValueError(f"{e.path}: a per-crop file must be [T, C], got {x.shape}")
                _check_finite(e.path, x)
                if first is None:
                    first = (e.path, x.shape)
                elif x.shape != first[1]:
                    raise ValueError(f"{e.path}: crop {c} of video {key!r} has shape {x.shape} "
                                     f"but crop 0 ({first[0].name}) has {first[1]}: the crops of "
                                     f"a video must have the same snippets and width")
            files = FeatureFiles([crops[c].path for c in order], raw_shape=first[1])
        cls, tags = name_tags(group[0].path.name)
        out.append(Listed(key, group[0].where, files, tags, cls))
    return out


def check_consistent(videos: list[Listed]) -> None:
    """One layout, one crop count, one feature width over every video of the folder."""
    ref = videos[0]
    for v in videos[1:]:
        a, b = ref.files, v.files
        if (len(a.paths) > 1) != (len(b.paths) > 1) or len(a.raw_shape) != len(b.raw_shape):
            raise ValueError(f"the folder mixes layouts: {ref.where}: {a.paths[0].name} has "
                             f"{_describe(a)} but {v.where}: {b.paths[0].name} has {_describe(b)}")
        if len(a.paths) != len(b.paths):
            raise ValueError(f"{v.where}: video {v.key!r} has {len(b.paths)} crop files but "
                             f"{ref.key!r} ({ref.where}) has {len(a.paths)}: every video needs "
                             f"the same crops")
        if b.raw_shape[-1] != a.raw_shape[-1]:
            raise ValueError(f"{b.paths[0]}: feature width {b.raw_shape[-1]} differs from "
                             f"{a.raw_shape[-1]} of {a.paths[0].name}")


def _describe(f: FeatureFiles) -> str:
    if len(f.paths) > 1:
        return f"{len(f.paths)} per-crop files"
    return f"shape {tuple(f.raw_shape)} ({len(f.raw_shape)}-D)"


def choose_crop_axis(videos: list[Listed], test: list[Listed], gt_len: int | None,
                     override: int | None) -> tuple[int | None, str]:
    """The crop axis of 3-D whole files (None for other layouts) and why."""
    shapes = [v.files.raw_shape for v in videos if len(v.files.paths) == 1]
    if not shapes or len(shapes[0]) != 3:
        return None, "no 3-D files"
    if override is not None:
        if override not in (0, 1):
            raise ValueError(f"data.crop_axis must be 0 ([crops, T, C]), 1 ([T, crops, C]) or "
                             f"null, got {override!r}")
        return override, "data.crop_axis"
    if gt_len is not None:
        fits = [a for a in (1, 0)
                if sum(v.files.raw_shape[1 - a] for v in test) * FRAMES_PER_SNIPPET == gt_len]
        if len(fits) == 1:
            return fits[0], "the length of the frame labels"
    const = [a for a in (1, 0) if len({s[a] for s in shapes}) == 1 and len({s[1 - a] for s in shapes}) > 1]
    if len(const) == 1:
        return const[0], "the axis of the same size in every file"
    if len({s[0] for s in shapes}) > 1 and len({s[1] for s in shapes}) > 1:
        raise ValueError(f"the 3-D feature files differ in both leading axes (e.g. {shapes[0]} "
                         f"and {shapes[-1]}): they hold different crop counts")
    a0, a1 = shapes[0][0], shapes[0][1]
    if a0 == a1:
        raise ValueError(f"cannot tell the crop axis of {videos[0].files.paths[0].name} "
                         f"{shapes[0]}: set data.crop_axis (1 = RTFM's [T, crops, C], "
                         f"0 = [crops, T, C])")
    return (1 if a1 < a0 else 0), "the smaller axis"


# ------------------------------------------------------------------------------ frame labels
def read_frame_labels_npy(path: Path) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False).reshape(-1)
    except Exception as err:  # numpy raises several types for an empty or truncated file
        raise ValueError(f"{path}: not a readable .npy array of frame labels ({err})") from None
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: frame labels must be 0 or 1")
    return labels.astype(np.uint8)


def fit_mask(mask: np.ndarray, frames: int, path: Path) -> np.ndarray:
    """A per-video frame mask brought to ``frames`` = T * 16 (pad with the last label)."""
    n = mask.shape[0]
    if n > frames + FRAMES_PER_SNIPPET - 1:
        raise ValueError(f"{path}: {n} frame labels but the video has {frames // 16} snippets "
                         f"({frames} frames); features and labels disagree")
    if n >= frames:
        return mask[:frames]
    return np.concatenate([mask, np.full(frames - n, mask[-1] if n else 0, mask.dtype)])


@dataclass
class Annotation:
    where: str
    class_name: str | None
    spans: list   # [(start, end_exclusive, end as written)]
    nframes: int | None = None


def read_annotations(path: Path) -> dict[str, Annotation]:
    """Temporal annotations in UCF-Crime's, UR-DMU's or XD-Violence's text format (see the
    module docstring): {video key: Annotation}, spans end-exclusive."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    out, fmt = {}, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{n}"
        name, rest = parts[0], parts[1:]
        cls, nframes = None, None
        if len(rest) >= 2 and _INT.fullmatch(rest[0]) and not _INT.fullmatch(rest[1]):
            kind, nframes, cls, rest = "urdmu", int(rest[0]), rest[1], rest[2:]
        elif rest and not _INT.fullmatch(rest[0]):
            kind, cls, rest = "ucf", rest[0], rest[1:]
        else:
            kind = "xd"
        if fmt is None:
            fmt = (kind, where)
        elif (kind == "xd") != (fmt[0] == "xd"):
            raise ValueError(f"{where}: this line is in {_FORMATS[kind]} format but {fmt[1]} is "
                             f"in {_FORMATS[fmt[0]]} format; one file holds one format")
        try:
            nums = [int(v) for v in rest]
        except ValueError:
            raise ValueError(f"{where}: expected 'video [frames] class start end [start end ...]' "
                             f"or 'video start end ...' with integer frames, got {line!r}") from None
        if len(nums) % 2:
            raise ValueError(f"{where}: odd number of frame bounds in {line!r}")
        spans = []
        for s, e in zip(nums[::2], nums[1::2]):
            if s < 0 or e < 0:
                continue
            if e < s:
                raise ValueError(f"{where}: event end {e} is before its start {s}")
            spans.append((s, e + 1 if kind != "xd" else e, e))  # UCF: inclusive; XD: exclusive
        key = video_key(name)
        if key in out:
            raise ValueError(f"{where}: video {key!r} is annotated twice (first at "
                             f"{out[key].where})")
        out[key] = Annotation(where, cls, spans, nframes)
    return out


_FORMATS = {"ucf": "UCF-Crime's 'video class s e ...'", "urdmu": "UR-DMU's 'video frames class s e ...'",
            "xd": "XD-Violence's 'video s e ...'"}


# ------------------------------------------------------------------------------------ writers
UCF_CLASSES = ("Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting",
               "RoadAccidents", "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism")
XD_TAGS = ("B1", "B2", "B4", "B5", "B6", "G")
LAYOUTS = ("rtfm", "rtfm_txt", "urdmu", "xd", "shanghai")


def _runs(gt: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end_exclusive)] of the runs of 1 in a frame-label vector."""
    d = np.diff(np.r_[0, gt.astype(np.int8), 0])
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def write_release(dest: Path, layout: str, train: list, test: list, crops: int | None = None,
                  crop_noise: float = 0.05, seed: int = 0) -> dict:
    """Write videos (``data.Video``: features ``[T, C]``, class, frame labels) as a folder in a
    release's layout, as downloaded (``LAYOUTS``):

    - ``rtfm``: ``features/<video>_i3d.npy`` of ``[T, 10, C]``, ``list/ucf-i3d.list`` and
      ``list/ucf-i3d-test.list`` holding the Windows paths RTFM's lists ship with (found here by
      file name), anomalous videos first, ``list/gt-ucf.npy``;
    - ``rtfm_txt``: the same with UCF-Crime's
      ``Temporal_Anomaly_Annotation_for_Testing_Videos.txt`` instead of ``gt-ucf.npy``;
    - ``urdmu``: ``dataset/<Class>/<video>__<i>.npy`` (10 crops of ``[T, C]``),
      ``list/UCF_Train.list`` / ``list/UCF_Test.list`` naming every crop file,
      ``frame_label/gt-ucf.npy`` and ``list/UCF_Annotation.txt``;
    - ``xd``: ``RGB/<name>_label_<tags>__<i>.npy`` (5 crops), ``list/rgb.list`` /
      ``list/rgb_test.list`` with absolute paths of another machine, ``annotations.txt``;
    - ``shanghai``: ``features/<scene>_<n>_i3d.npy`` of ``[T, 10, C]`` (names without a class),
      anomalous training videos first, ``test_frame_mask/<video>.npy`` per anomalous test video
      (one snippet shorter than T * 16: the reader pads it with its last label).

    Classes are renamed to UCF-Crime classes or XD-Violence tags in order of appearance. Each
    crop is the video's features plus ``crop_noise`` Gaussian noise. Returns
    ``{"classes": {built-in class: release name}, "anomalous_first": n}``.
    """
    if layout not in LAYOUTS:
        raise KeyError(f"unknown layout {layout!r}; layouts are {LAYOUTS}")
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    crops = crops or (5 if layout == "xd" else 10)
    names = sorted({v.class_name for v in train + test} - {NORMAL})
    pool = XD_TAGS if layout == "xd" else UCF_CLASSES
    if len(names) > len(pool):
        raise ValueError(f"{len(names)} classes; the {layout} layout names at most {len(pool)}")
    rename = dict(zip(names, pool))
    counter: dict = {}

    def release_name(v, split: str) -> str:
        cls = rename.get(v.class_name, NORMAL)
        i = counter[cls] = counter.get(cls, 0) + 1
        if layout == "xd":
            tag = "A" if cls == NORMAL else f"{cls}-0-0"
            return f"Movie.{split}.{i:03d}__#00-00-{i:02d}_00-01-{i:02d}_label_{tag}"
        if layout == "shanghai":  # scene_clip, no class in the name
            j = counter["all"] = counter.get("all", 0) + 1
            return f"{(j % 12) + 1:02d}_{j:04d}"
        return f"Normal_Videos_{i:03d}_x264" if cls == NORMAL else f"{cls}{i:03d}_x264"

    def stack(x):  # [T, C] -> [crops, T, C]
        return (x[None] + crop_noise * rng.normal(size=(crops,) + x.shape)).astype(np.float32)

    lists = {"train": [], "test": []}
    gts, ann_lines = [], []
    for split, videos in (("train", train), ("test", test)):
        ordered = sorted(videos, key=lambda v: v.class_name == NORMAL)  # anomalous first
        for v in ordered:
            name = release_name(v, split)
            x = stack(v.features)
            cls = rename.get(v.class_name, NORMAL)
            if layout in ("rtfm", "rtfm_txt", "shanghai"):
                path = dest / "features" / f"{name}_i3d.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, x.transpose(1, 0, 2))                      # [T, crops, C]
                folder = "SH_Train_ten_crop_i3d" if layout == "shanghai" else "UCF_Train_ten_crop_i3d"
                lists[split].append(f"G:\\{folder.replace('Train', split.capitalize())}\\{path.name}")
            else:
                sub = dest / ("RGB" if layout == "xd" else f"dataset/{cls if cls != NORMAL else 'Normal'}")
                sub.mkdir(parents=True, exist_ok=True)
                for c in range(crops):
                    np.save(sub / f"{name}__{c}.npy", x[c])
                    lists[split].append(
                        f"/media/user/i3d-features/RGB/{name}__{c}.npy" if layout == "xd"
                        else f"{sub.relative_to(dest).as_posix()}/{name}__{c}.npy")
            if split == "test":
                gt = v.frame_gt.astype(np.uint8)
                gts.append(gt)
                spans = _runs(gt)
                if layout == "shanghai" and cls != NORMAL:
                    (dest / "test_frame_mask").mkdir(parents=True, exist_ok=True)
                    np.save(dest / "test_frame_mask" / f"{name}.npy", gt[:-7])  # padded back
                elif layout == "xd" and spans:
                    ann_lines.append(" ".join([name] + [f"{s} {e}" for s, e in spans]))
                elif layout in ("rtfm_txt", "urdmu"):
                    bounds = [f"{s}  {e - 1}" for s, e in spans] + ["-1  -1"] * max(0, 2 - len(spans))
                    head = f"{name}.mp4  {len(gt)}  {cls}" if layout == "urdmu" else f"{name}.mp4  {cls}"
                    ann_lines.append("  ".join([head] + bounds))
    lst = dest / "list"
    lst.mkdir(parents=True, exist_ok=True)
    list_names = {"rtfm": ("ucf-i3d.list", "ucf-i3d-test.list"),
                  "rtfm_txt": ("ucf-i3d.list", "ucf-i3d-test.list"),
                  "shanghai": ("shanghai-i3d-train-10crop.list", "shanghai-i3d-test-10crop.list"),
                  "urdmu": ("UCF_Train.list", "UCF_Test.list"), "xd": ("rgb.list", "rgb_test.list")}
    for split, fname in zip(("train", "test"), list_names[layout]):
        (lst / fname).write_text("\n".join(lists[split]) + "\n")
    if layout == "rtfm":
        np.save(lst / "gt-ucf.npy", np.concatenate(gts).astype(float))  # RTFM stores floats
    elif layout == "urdmu":
        (dest / "frame_label").mkdir(exist_ok=True)
        np.save(dest / "frame_label" / "gt-ucf.npy", np.concatenate(gts).astype(float))
        (lst / "UCF_Annotation.txt").write_text("\n".join(ann_lines) + "\n")
    elif layout == "rtfm_txt":
        (dest / "Temporal_Anomaly_Annotation_for_Testing_Videos.txt").write_text("\n".join(ann_lines) + "\n")
    elif layout == "xd":
        (dest / "annotations.txt").write_text("\n".join(ann_lines) + "\n")
    return {"classes": rename, "anomalous_first": sum(v.class_name != NORMAL for v in train)}

