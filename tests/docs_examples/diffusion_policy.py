"""Tiny demonstration datasets in the layouts tasks/diffusion_policy/README.md documents.

The writers build each layout with the format's own library (h5py, zarr, pyarrow), from the
built-in scripted demos, independently of the task's readers; tests/tasks/test_diffusion_policy.py
uses them too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--data.init_args.episodes_per_task", "3", "--data.init_args.eval_episodes", "1",
        "--data.init_args.val_episodes", "0", "--data.init_args.batch_size", "32",
        "--model.init_args.dim", "16", "--model.init_args.expert_hidden", "32",
        "--model.init_args.depth", "1", "--model.init_args.num_sampling_steps", "2",
        "--model.init_args.image_width", "4"]


def builtin_demos(episodes_per_task: int = 4, tasks=("reach", "path"), seed: int = 0, image_size=None) -> dict:
    from tasks.diffusion_policy.data import generate_demonstrations

    return generate_demonstrations(list(tasks), episodes_per_task, seed=seed, image_size=image_size)


def shorten(demos: dict, every: int = 3, keep: int = 4) -> dict:
    """Cut every ``every``-th episode to its first ``keep`` steps (shorter than a 10-step chunk)."""
    ends = demos["episode_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    lengths = [min(e - s, keep) if i % every == 0 else e - s for i, (s, e) in enumerate(zip(starts, ends))]
    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    return {**demos, "observations": demos["observations"][rows], "actions": demos["actions"][rows],
            "episode_ends": np.cumsum(lengths)}


def _episodes(demos: dict):
    ends = demos["episode_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    return [slice(int(s), int(e)) for s, e in zip(starts, ends)]


def _text(demos: dict, e: int) -> str:
    return demos["task_names"][int(demos["task_ids"][e])]


def write_robomimic(path: Path, demos: dict, valid_every: int = 4) -> Path:
    """robomimic: data/demo_N/{actions, obs/robot0_eef_pos, obs/object[, obs/agentview_image]},
    mask/train + mask/valid, data.attrs env_args (JSON) and a per-demo ``lang`` attribute."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    obs = demos["observations"]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "PointReach", "type": 1, "env_kwargs": {}})
        names = []
        for e, sl in enumerate(_episodes(demos)):
            demo = data.create_group(f"demo_{e}")
            demo.attrs["num_samples"] = sl.stop - sl.start
            demo.attrs["lang"] = _text(demos, e)
            demo.create_dataset("actions", data=demos["actions"][sl])
            demo.create_dataset("obs/robot0_eef_pos", data=obs[sl, :2])
            if obs.shape[1] > 2:
                demo.create_dataset("obs/object", data=obs[sl, 2:])
            if demos.get("images"):
                demo.create_dataset("obs/agentview_image", data=demos["images"]["image"][sl].transpose(0, 2, 3, 1))
            names.append(f"demo_{e}")
        data.attrs["total"] = len(demos["actions"])
        valid = [n for i, n in enumerate(names) if i % valid_every == valid_every - 1]
        f.create_dataset("mask/train", data=np.array([n for n in names if n not in valid], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(valid, dtype="S"))
    return path


def write_zarr(path: Path, demos: dict) -> Path:
    """Diffusion Policy replay buffer (zarr format 2): data/{state, keypoint, action[, img]},
    meta/episode_ends; ``path`` ending in .zip gives a ZipStore, else a directory store."""
    import zarr

    path.parent.mkdir(parents=True, exist_ok=True)
    store = zarr.storage.ZipStore(str(path), mode="w") if path.suffix == ".zip" else str(path)
    root = zarr.open_group(store, mode="w", zarr_format=2)
    obs = demos["observations"]
    root.create_array("data/state", data=obs[:, :2])
    if obs.shape[1] > 2:
        root.create_array("data/keypoint", data=obs[:, 2:].reshape(len(obs), -1, 2))
    root.create_array("data/action", data=demos["actions"])
    if demos.get("images"):
        root.create_array("data/img", data=demos["images"]["image"].transpose(0, 2, 3, 1).astype(np.float32))
    root.create_array("meta/episode_ends", data=demos["episode_ends"].astype(np.int64))
    if path.suffix == ".zip":
        store.close()
    return path


def write_lerobot(path: Path, demos: dict, episodes_per_chunk: int = 1000) -> Path:
    """LeRobot v2: meta/info.json, meta/tasks.jsonl, meta/episodes.jsonl and
    data/chunk-<c:03d>/episode_<e:06d>.parquet with observation.state, action, timestamp,
    frame_index, episode_index, index, task_index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    obs, act = demos["observations"], demos["actions"]
    texts = sorted({_text(demos, e) for e in range(len(demos["episode_ends"]))})
    (path / "meta").mkdir(parents=True, exist_ok=True)
    features = {"observation.state": {"dtype": "float32", "shape": [obs.shape[1]], "names": None},
                "action": {"dtype": "float32", "shape": [act.shape[1]], "names": None},
                **{k: {"dtype": "int64", "shape": [1], "names": None}
                   for k in ("frame_index", "episode_index", "index", "task_index")},
                "timestamp": {"dtype": "float32", "shape": [1], "names": None}}
    episodes = _episodes(demos)
    info = {"codebase_version": "v2.0", "robot_type": "point", "fps": 10, "total_episodes": len(episodes),
            "total_frames": len(act), "total_tasks": len(texts), "chunks_size": episodes_per_chunk,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "features": features}
    (path / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    (path / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                       for i, t in enumerate(texts)))
    lines = []
    for e, sl in enumerate(episodes):
        n = sl.stop - sl.start
        lines.append(json.dumps({"episode_index": e, "tasks": [_text(demos, e)], "length": n}) + "\n")
        table = pa.table({
            "observation.state": pa.array(list(obs[sl]), type=pa.list_(pa.float32())),
            "action": pa.array(list(act[sl]), type=pa.list_(pa.float32())),
            "timestamp": pa.array(np.arange(n, dtype=np.float32) / 10),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, e, np.int64)),
            "index": pa.array(np.arange(sl.start, sl.stop, dtype=np.int64)),
            "task_index": pa.array(np.full(n, texts.index(_text(demos, e)), np.int64)),
        })
        out = path / "data" / f"chunk-{e // episodes_per_chunk:03d}" / f"episode_{e:06d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    (path / "meta" / "episodes.jsonl").write_text("".join(lines))
    return path


def write(name: str, dest: Path) -> None:
    """The README's ``data/<name>`` examples."""
    dest = Path(dest)
    if name == "lift_low_dim.hdf5":
        write_robomimic(dest, builtin_demos())
    elif name == "lift_image.hdf5":
        write_robomimic(dest, builtin_demos(image_size=16))
    elif name == "pusht_replay.zarr":
        write_zarr(dest, shorten(builtin_demos()))
    elif name == "pusht_replay.zarr.zip":
        write_zarr(dest, builtin_demos())
    elif name == "lerobot_reach":
        write_lerobot(dest, builtin_demos())
    else:
        raise KeyError(name)
