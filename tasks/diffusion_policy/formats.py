"""Readers of the demonstration formats robot-learning datasets ship in.

Every reader returns the same thing: a list of episodes, each ``{"name": str, "obs": {key:
array [T, ...]}, "action": array [T, A], "task": str | None}``, plus split hints, and
``assemble`` turns them into the flat arrays the datamodule trains on (checking them on the
way). Formats, detected from the path (``detect_format``) or named by ``data.format``:

- ``robomimic``: HDF5 with ``data/demo_N/obs/<key>`` and ``data/demo_N/actions``, optional
  ``mask/<filter>`` arrays of demo names (``train`` / ``valid``) and ``data.attrs["env_args"]``
  (JSON; its ``env_name`` is the task string unless ``task_key`` names a demo/data attribute).
- ``zarr``: the Diffusion Policy replay buffer, ``data/<key>`` arrays of all steps and
  ``meta/episode_ends``; a directory store or a ``.zarr.zip`` (read with ``zarr``).
- ``lerobot``: a LeRobot v2 dataset folder, ``meta/info.json`` + ``meta/tasks.jsonl`` and
  ``data/chunk-*/episode_*.parquet`` with ``observation.*``, ``action``, ``episode_index``,
  ``frame_index``, ``task_index`` columns (read with ``pyarrow``; ``lerobot`` is not needed).
- ``flat``: one ``.npz`` / HDF5 file of concatenated ``observations``, ``actions``,
  ``episode_ends`` (+ optional ``task_ids``), see ``data.py``.

Observation keys: ``obs_keys`` selects them (default: every low-dimensional key, sorted,
flattened and concatenated into the state vector); keys whose name ends in ``image`` or
``img`` (or whose steps are ``[H, W, C]`` arrays) are image observations for the image encoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMATS = ("auto", "flat", "robomimic", "zarr", "lerobot")


def is_image_key(key: str, arr: np.ndarray | None = None) -> bool:
    name = key.lower().rsplit(".", 1)[-1]
    return name.endswith("image") or name.endswith("img") or (arr is not None and arr.ndim == 4)


# ---------------------------------------------------------------------------- detection
def detect_format(path: Path) -> str:
    """The format of ``path`` from its files (ValueError naming the path when none fits)."""
    if not path.exists():
        raise FileNotFoundError(f"demonstration data not found: {path}")
    if path.is_dir():
        if (path / "meta" / "info.json").is_file():
            return "lerobot"
        if any((path / m).exists() for m in (".zgroup", "zarr.json")) or path.suffix == ".zarr":
            return "zarr"
        raise ValueError(f"{path}: unknown layout for a folder; expected a LeRobot dataset "
                         f"(meta/info.json + data/chunk-*/episode_*.parquet) or a zarr replay buffer "
                         f"(.zgroup or zarr.json, data/<key>, meta/episode_ends)")
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zarr"
    if name.endswith(".npz"):
        return "flat"
    if name.endswith((".h5", ".hdf5")):
        h5py = _h5py(path)
        try:
            with h5py.File(path, "r") as f:
                data = f.get("data")
                if isinstance(data, h5py.Group) and any(k.startswith("demo") for k in data.keys()):
                    return "robomimic"
        except OSError as e:
            raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
        return "flat"
    raise ValueError(f"{path}: unknown demonstration format {path.suffix!r}; use a robomimic HDF5 "
                     f"(.hdf5), a zarr replay buffer (folder or .zarr.zip), a LeRobot folder, or a flat "
                     f".npz/.h5 file")


def _h5py(path):
    try:
        import h5py
    except ImportError:
        raise ImportError(f"reading {path} needs h5py: pip install 'moe-zoo[diffusion_policy]'") from None
    return h5py


# ---------------------------------------------------------------------------- readers
def _demo_order(name: str):
    tail = name.rsplit("_", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def read_robomimic(path: Path, action_key: str | None = None, task_key: str | None = None):
    """robomimic HDF5 -> (episodes, split hints {"train": [i], "valid": [i]} from ``mask/``)."""
    h5py = _h5py(path)
    action_key = action_key or "actions"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise ValueError(f"{path}: missing group 'data' (robomimic layout data/demo_N/obs/<key>)")
        data = f["data"]
        env_task = None
        if "env_args" in data.attrs:
            try:
                env_task = json.loads(data.attrs["env_args"]).get("env_name")
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"{path}: data.attrs['env_args'] is not a JSON object") from None
        names = sorted((k for k in data.keys() if isinstance(data[k], h5py.Group)), key=_demo_order)
        episodes = []
        for name in names:
            demo = data[name]
            where = f"data/{name}"
            if action_key not in demo:
                raise ValueError(f"{path}: {where} has no '{action_key}' dataset (found {sorted(demo.keys())})")
            if "obs" not in demo or not isinstance(demo["obs"], h5py.Group):
                raise ValueError(f"{path}: {where} has no 'obs' group (robomimic layout {where}/obs/<key>)")
            task = env_task
            if task_key is not None:
                attrs = demo.attrs if task_key in demo.attrs else data.attrs
                if task_key not in attrs:
                    raise ValueError(f"{path}: task_key '{task_key}' is neither an attribute of {where} nor of data")
                task = attrs[task_key]
                task = task.decode() if isinstance(task, bytes) else str(task)
            episodes.append({"name": where, "action": demo[action_key][()], "task": task,
                             "obs": {k: demo["obs"][k][()] for k in demo["obs"].keys()
                                     if isinstance(demo["obs"][k], h5py.Dataset)}})
        splits = {}
        if "mask" in f:
            index = {n: i for i, n in enumerate(names)}
            for filt in ("train", "valid"):
                if filt in f["mask"]:
                    members = [m.decode() if isinstance(m, bytes) else str(m) for m in f["mask"][filt][()]]
                    unknown = [m for m in members if m not in index]
                    if unknown:
                        raise ValueError(f"{path}: mask/{filt} names demos not in data/: {unknown[:3]}")
                    splits[filt] = sorted(index[m] for m in members)
    if not episodes:
        raise ValueError(f"{path}: group 'data' holds no demos (expected data/demo_0, data/demo_1, ...)")
    return episodes, splits


def read_zarr(path: Path, action_key: str | None = None, task_key: str | None = None):
    """Diffusion Policy replay buffer (``data/<key>``, ``meta/episode_ends``) -> episodes."""
    try:
        import zarr
    except ImportError:
        raise ImportError(f"reading {path} needs zarr: pip install 'moe-zoo[diffusion_policy]'") from None
    action_key = action_key or "action"
    try:
        store = zarr.storage.ZipStore(str(path), mode="r") if path.is_file() else str(path)
        root = zarr.open_group(store, mode="r")
    except Exception as e:  # zarr raises several types for a folder/zip that is not a store
        raise ValueError(f"{path}: not a readable zarr store ({type(e).__name__}: {e})") from None
    for group in ("data", "meta"):
        if group not in root:
            raise ValueError(f"{path}: missing group '{group}' (replay buffer layout data/<key>, meta/episode_ends)")
    if "episode_ends" not in root["meta"]:
        raise ValueError(f"{path}: missing array 'meta/episode_ends'")
    data = {k: np.asarray(root["data"][k][...]) for k in root["data"].array_keys()}
    if action_key not in data:
        raise ValueError(f"{path}: missing array 'data/{action_key}' (found {sorted(data)})")
    ends = np.asarray(root["meta"]["episode_ends"][...])
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer) or len(ends) == 0:
        raise ValueError(f"{path}: 'meta/episode_ends' must be a non-empty 1-D integer array, got shape "
                         f"{ends.shape} dtype {ends.dtype}")
    n = len(data[action_key])
    if (np.diff(np.concatenate([[0], ends])) < 0).any() or ends[-1] != n:
        raise ValueError(f"{path}: 'meta/episode_ends' must be non-decreasing end indices ending at the "
                         f"{n} steps of 'data/{action_key}', got {ends[:5].tolist()}...{int(ends[-1])}")
    for k, v in data.items():
        if len(v) != n:
            raise ValueError(f"{path}: 'data/{k}' has {len(v)} steps but 'data/{action_key}' has {n}")
    if task_key is not None and task_key not in data:
        raise ValueError(f"{path}: task_key 'data/{task_key}' not found (found {sorted(data)})")
    episodes, start = [], 0
    for e, end in enumerate(ends.tolist()):
        sl = slice(start, end)
        task = None
        if task_key is not None and end > start:
            task = str(data[task_key][start])
        episodes.append({"name": f"episode {e}", "action": data[action_key][sl], "task": task,
                         "obs": {k: v[sl] for k, v in data.items() if k not in (action_key, task_key)}})
        start = end
    return episodes, {}


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON-lines file ({e})") from None


def _column(table, key: str, source: str) -> np.ndarray:
    col = table.column(key).combine_chunks()
    try:
        values = col.to_numpy(zero_copy_only=False)
    except Exception as e:  # pyarrow: nested types it cannot convert
        raise ValueError(f"{source}: column '{key}' is not numeric ({e})") from None
    if values.dtype == object:  # list columns: one array per row
        try:
            values = np.stack([np.asarray(v, dtype=np.float64) for v in values])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: column '{key}' has rows of different lengths or non-numbers ({e})") from None
    return values


def read_lerobot(path: Path, action_key: str | None = None, task_key: str | None = None):
    """LeRobot v2 dataset folder -> episodes (low-dimensional ``observation.*`` features)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'moe-zoo[diffusion_policy]'") from None
    action_key = action_key or "action"
    info_path = path / "meta" / "info.json"
    try:
        info = json.loads(info_path.read_text())
    except ValueError as e:
        raise ValueError(f"{info_path}: not valid JSON ({e})") from None
    features = info.get("features")
    if not isinstance(features, dict):
        raise ValueError(f"{info_path}: missing 'features' (LeRobot v2 meta/info.json)")
    tasks = {}
    if (path / "meta" / "tasks.jsonl").is_file():
        tasks = {int(t["task_index"]): str(t["task"]) for t in _jsonl(path / "meta" / "tasks.jsonl")}
    files = sorted(path.glob("data/chunk-*/episode_*.parquet"))
    if not files:
        raise ValueError(f"{path}: no data/chunk-*/episode_*.parquet files (LeRobot v2 layout)")
    obs_cols = sorted(k for k, v in features.items()
                      if k.startswith("observation.") and v.get("dtype") not in ("video", "image"))
    task_col = task_key or "task_index"
    episodes = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a broken file
            raise ValueError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None
        src = str(file)
        for key in (action_key, "episode_index", "frame_index", *obs_cols):
            if key not in table.column_names:
                raise ValueError(f"{src}: missing column '{key}' (found {table.column_names})")
        ep_index = _column(table, "episode_index", src)
        frames = _column(table, "frame_index", src)
        for ep in np.unique(ep_index):
            rows = np.flatnonzero(ep_index == ep)
            order = rows[np.argsort(frames[rows], kind="stable")]
            if not np.array_equal(frames[order], np.arange(len(order))):
                raise ValueError(f"{src}: episode {int(ep)} has frame_index {frames[order][:6].tolist()}..., "
                                 f"expected 0..{len(order) - 1} without gaps")
            task = None
            if task_col in table.column_names:
                value = table.column(task_col)[int(order[0])].as_py()
                task = tasks.get(int(value), str(value)) if task_col == "task_index" else str(value)
            sub = table.take(order)
            episodes.append({"name": f"{file.name} episode {int(ep)}", "action": _column(sub, action_key, src),
                             "task": task, "obs": {k: _column(sub, k, src) for k in obs_cols}})
    return episodes, {}


READERS = {"robomimic": read_robomimic, "zarr": read_zarr, "lerobot": read_lerobot}


# ---------------------------------------------------------------------------- assembly
def _as_image(arr: np.ndarray, source: str, where: str, key: str) -> np.ndarray:
    """Image steps [T, H, W, C] (uint8, or float in [0, 1] / [0, 255]) -> uint8 [T, C, H, W]."""
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{source}: {where} image key '{key}' must be [T, H, W, C] with C in 1/3/4, "
                         f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{source}: {where} image key '{key}' must be numeric, got dtype {arr.dtype}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{source}: {where} image key '{key}' has NaN/inf pixels")
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def assemble(episodes: list[dict], source: str, obs_keys: list[str] | None = None) -> dict:
    """Episodes of any reader -> the flat demonstration dict of ``data.validate_demonstrations``.

    Selects ``obs_keys`` (default: all low-dim keys of the first episode, sorted; image keys
    go to ``images``), and raises ValueError naming ``source``, the episode and the key for a
    missing key, an empty episode, observation and action lengths that differ within an
    episode, NaN/inf values, and widths or image shapes that change between episodes.
    """
    if not episodes:
        raise ValueError(f"{source}: no episodes")
    first = episodes[0]["obs"]
    if obs_keys is None:
        low = sorted(k for k, v in first.items() if not is_image_key(k, np.asarray(v)))
        img = sorted(k for k, v in first.items() if is_image_key(k, np.asarray(v)))
    else:
        low = [k for k in obs_keys if not is_image_key(k, np.asarray(first[k]) if k in first else None)]
        img = [k for k in obs_keys if k not in low]
    if not low and not img:
        raise ValueError(f"{source}: no observation keys to use (found {sorted(first)}); set data.obs_keys")
    obs_l, act_l, img_l, tasks, ends, n = [], [], {k: [] for k in img}, [], [], 0
    widths, shapes = {}, {}
    for ep in episodes:
        where = ep["name"]
        act = np.asarray(ep["action"])
        if act.ndim == 1:
            act = act[:, None]
        if len(act) == 0:
            raise ValueError(f"{source}: {where} is empty (0 steps)")
        if act.ndim != 2 or not np.issubdtype(act.dtype, np.number):
            raise ValueError(f"{source}: {where} actions must be a numeric [T, act_dim] array, got shape "
                             f"{act.shape} dtype {act.dtype}")
        if not np.isfinite(act).all():
            bad = int(np.argwhere(~np.isfinite(act))[0, 0])
            raise ValueError(f"{source}: {where} actions have NaN/inf values (first at step {bad})")
        parts = []
        for k in low + img:
            if k not in ep["obs"]:
                raise ValueError(f"{source}: {where} is missing observation key '{k}' "
                                 f"(found {sorted(ep['obs'])})")
            v = np.asarray(ep["obs"][k])
            if len(v) != len(act):
                raise ValueError(f"{source}: {where} observation key '{k}' has {len(v)} steps but the "
                                 f"actions have {len(act)}")
            if k in img:
                im = _as_image(v, source, where, k)
                if shapes.setdefault(k, im.shape[1:]) != im.shape[1:]:
                    raise ValueError(f"{source}: {where} image key '{k}' has shape {im.shape[1:]} (C, H, W), "
                                     f"other episodes have {shapes[k]}")
                img_l[k].append(im)
                continue
            if not np.issubdtype(v.dtype, np.number):
                raise ValueError(f"{source}: {where} observation key '{k}' must be numeric, got dtype {v.dtype}")
            v = v.reshape(len(v), -1).astype(np.float32)
            if not np.isfinite(v).all():
                bad = int(np.argwhere(~np.isfinite(v))[0, 0])
                raise ValueError(f"{source}: {where} observation key '{k}' has NaN/inf values (first at step {bad})")
            if widths.setdefault(k, v.shape[1]) != v.shape[1]:
                raise ValueError(f"{source}: {where} observation key '{k}' has width {v.shape[1]}, other "
                                 f"episodes have {widths[k]}")
            parts.append(v)
        if act_l and act.shape[1] != act_l[0].shape[1]:
            raise ValueError(f"{source}: {where} actions have width {act.shape[1]}, other episodes have "
                             f"{act_l[0].shape[1]}")
        obs_l.append(np.concatenate(parts, 1) if parts else np.zeros((len(act), 0), np.float32))
        act_l.append(act.astype(np.float32))
        tasks.append(ep.get("task"))
        n += len(act)
        ends.append(n)
    names = sorted({t for t in tasks if t is not None})
    out = {"observations": np.concatenate(obs_l), "actions": np.concatenate(act_l),
           "episode_ends": np.asarray(ends, np.int64), "obs_keys": low}
    if names:
        out["task_names"] = names
        out["task_ids"] = np.asarray([names.index(t) if t is not None else 0 for t in tasks], np.int64)
    if img:
        out["images"] = {k: np.concatenate(v) for k, v in img_l.items()}
    return out
