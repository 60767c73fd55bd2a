"""Demonstration data for the MoDE policy: built-in scripted demos, and the user's own files.

``--data.root PATH`` reads the formats of ``formats.py`` (robomimic HDF5, Diffusion Policy
zarr replay buffer, LeRobot v2 folder), detected from the path or named by ``data.format``,
or the flat layout of this module, an ``.npz`` or HDF5 (``.h5`` / ``.hdf5``) file with keys:

- ``observations`` [N, obs_dim] float: state observations of all episodes, concatenated;
- ``actions``      [N, act_dim] float: the action taken at each step;
- ``episode_ends`` [E] int: cumulative end index of each episode (exclusive, last == N);
- ``task_ids``     [E] int (optional): task of each episode, 0..T-1 (default all 0);
- ``task_names``   [T] str (optional): the goal text of each task id.

Training samples are (observation history [To, obs_dim], images [To, C, H, W] per image key,
action chunk [H, act_dim], task): the history before the episode start repeats the first
observation and the chunk past the episode end repeats the last action, as Diffusion Policy's
sequence sampler pads, so episodes shorter than the horizon are used as they are. Splits are
by episode (robomimic ``mask/train`` / ``mask/valid`` when the file has them).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data import CheckpointedShuffle, SplitLoaders, numeric_field

from .env import SUITES, TASKS, ImageObs
from .formats import FORMATS, READERS, assemble, detect_format

REQUIRED = ("observations", "actions", "episode_ends")


# ---------------------------------------------------------------------------- reading / checks
def validate_demonstrations(demos: dict, source: str = "<arrays>", act_dim: int | None = None,
                            obs_dim: int | None = None, num_tasks: int | None = None) -> dict:
    """Check a demonstration dict and return it as clean numpy arrays.

    Raises ValueError naming ``source`` and the field for: missing keys, non-numeric values,
    wrong ranks, mismatched lengths, NaN/inf values, bad episode boundaries, task ids out of
    range (negative, or >= ``num_tasks`` when the evaluation env has a fixed task set), an
    action/observation width other than the expected one, empty episodes, image arrays
    whose step count is not N. Episodes shorter than the horizon are kept (padded when sampled).
    """
    missing = [k for k in REQUIRED if k not in demos]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}; a demonstration file needs "
                         f"{list(REQUIRED)} (+ optional 'task_ids'), found {sorted(demos)}")
    obs = numeric_field(demos, "observations", source).astype(np.float32)
    act = numeric_field(demos, "actions", source).astype(np.float32)
    ends = numeric_field(demos, "episode_ends", source)
    for name, arr in (("observations", obs), ("actions", act)):
        if arr.ndim != 2:
            raise ValueError(f"{source}: field '{name}' must be 2-D [N, dim], got shape {arr.shape}")
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0, 0])
            raise ValueError(f"{source}: field '{name}' has NaN/inf values (first at row {bad})")
    if len(obs) != len(act):
        raise ValueError(f"{source}: 'observations' has {len(obs)} rows but 'actions' has {len(act)}")
    if act_dim is not None and act.shape[1] != act_dim:
        raise ValueError(f"{source}: field 'actions' has dimension {act.shape[1]}, expected {act_dim}")
    if obs_dim is not None and obs.shape[1] != obs_dim:
        raise ValueError(f"{source}: field 'observations' has dimension {obs.shape[1]}, expected {obs_dim}")
    if ends.ndim != 1 or len(ends) == 0 or not np.issubdtype(ends.dtype, np.integer):
        raise ValueError(f"{source}: field 'episode_ends' must be a non-empty 1-D integer array, "
                         f"got shape {ends.shape} dtype {ends.dtype}")
    lengths = np.diff(np.concatenate([[0], ends]))
    if (lengths <= 0).any() or ends[-1] != len(act):
        raise ValueError(f"{source}: field 'episode_ends' must be strictly increasing cumulative end "
                         f"indices ending at N={len(act)}, got {ends[:5].tolist()}...{ends[-1]}")
    if "task_ids" in demos and demos["task_ids"] is not None:
        tasks = numeric_field(demos, "task_ids", source)
        if tasks.shape != ends.shape or not np.issubdtype(tasks.dtype, np.integer) or (tasks < 0).any():
            raise ValueError(f"{source}: field 'task_ids' must be non-negative integers of shape "
                             f"{ends.shape} (one per episode), got shape {tasks.shape} dtype {tasks.dtype}")
        if num_tasks is not None and (tasks >= num_tasks).any():
            raise ValueError(f"{source}: field 'task_ids' has task {int(tasks.max())}, out of range for the "
                             f"evaluation environment's {num_tasks} tasks (0..{num_tasks - 1})")
    else:
        tasks = np.zeros(len(ends), dtype=np.int64)
    out = {"observations": obs, "actions": act, "episode_ends": ends.astype(np.int64),
           "task_ids": tasks.astype(np.int64)}
    for key, im in (demos.get("images") or {}).items():
        if im.dtype != np.uint8 or im.ndim != 4 or len(im) != len(act):
            raise ValueError(f"{source}: image key '{key}' must be uint8 [N={len(act)}, C, H, W], got "
                             f"shape {im.shape} dtype {im.dtype}")
    if demos.get("images"):
        out["images"] = dict(demos["images"])
    if demos.get("task_names") is not None and len(demos["task_names"]):
        names = [str(t) for t in np.asarray(demos["task_names"]).reshape(-1)]
        if len(names) <= int(out["task_ids"].max()):
            raise ValueError(f"{source}: {len(names)} task names for task ids up to {int(out['task_ids'].max())}")
        out["task_names"] = names
    return out


def _read_npz(path: Path) -> dict:
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy/zipfile raise EOFError, BadZipFile, ValueError... for a corrupt file
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz archive of named arrays "
                         f"({', '.join(REQUIRED)})")
    try:
        with f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # a truncated member, or a pickled object array (allow_pickle=False)
        raise ValueError(f"{path}: cannot read the archive's arrays ({type(e).__name__}: {e})") from None


def _read_hdf5(path: Path) -> dict:
    try:
        import h5py
    except ImportError:
        raise ImportError(f"reading {path} needs h5py: pip install h5py") from None
    try:
        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    except OSError as e:  # h5py: truncated file, not an HDF5 file
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None


def load_demonstrations(path, format: str = "auto", obs_keys: list | None = None,
                        action_key: str | None = None, task_key: str | None = None,
                        act_dim: int | None = None, obs_dim: int | None = None,
                        num_tasks: int | None = None) -> dict:
    """Read demonstrations in any format of ``formats.py`` (or the flat layout) and validate them.

    Returns the flat dict of ``validate_demonstrations``, plus ``task_names`` where the data has
    task strings, ``images`` for image keys, and ``splits`` (robomimic masks) where present.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"data.format must be one of {list(FORMATS)}, got {format!r}")
    if not path.exists():
        raise FileNotFoundError(f"demonstration data not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    kind = detect_format(path) if format == "auto" else format
    if kind == "flat":
        if path.is_dir():
            raise ValueError(f"{path}: is a folder; a flat demonstration file is one .npz/.h5 file")
        if path.suffix.lower() not in (".npz", ".h5", ".hdf5"):
            raise ValueError(f"{path}: unknown demonstration format {path.suffix!r}; use .npz, .h5 or .hdf5")
        demos = _read_npz(path) if path.suffix.lower() == ".npz" else _read_hdf5(path)
        splits = {}
    else:
        episodes, splits = READERS[kind](path, action_key=action_key, task_key=task_key)
        demos = assemble(episodes, str(path), obs_keys)
    out = validate_demonstrations(demos, str(path), act_dim=act_dim, obs_dim=obs_dim, num_tasks=num_tasks)
    out["format"], out["splits"] = kind, splits
    if "obs_keys" in demos:
        out["obs_keys"] = demos["obs_keys"]
    return out


def save_demonstrations(path, demos: dict) -> Path:
    """Write demonstrations in the plug-in layout (``.npz`` or ``.h5``/``.hdf5``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npz":
        np.savez_compressed(path, **demos)
    else:
        import h5py
        with h5py.File(path, "w") as f:
            for k, v in demos.items():
                f.create_dataset(k, data=v)
    return path


def generate_demonstrations(tasks=TASKS, episodes_per_task: int = 100, noise: float = 0.1,
                            seed: int = 0, min_length: int = 1, suite: str = "manipulation",
                            image_size: int | None = None) -> dict:
    """Roll out the scripted expert of a built-in suite (``env.SUITES``), keeping successful
    episodes of at least ``min_length`` steps, with the task string of each episode.

    ``noise`` is the std of Gaussian noise added to the EXECUTED action (DART-style), while
    the recorded action is the expert's clean action at the perturbed state, so the policy
    sees recoveries from small errors. ``image_size``: also render every step into
    ``images["image"]`` (uint8 [N, 3, S, S]) and keep only the agent's xy as state.
    """
    spec = SUITES[suite]
    rng = np.random.default_rng(seed)
    env = spec["env"](render_mode=None, image_size=image_size or 96)
    obs_l, act_l, img_l, ends, task_l = [], [], [], [], []
    n = 0
    for task in tasks:
        tid = spec["index"](task)
        kept, attempt = 0, 0
        while kept < episodes_per_task:
            obs, _ = env.reset(seed=int(seed * 100_003 + tid * 10_007 + attempt), options={"task": tid})
            attempt += 1
            ep_obs, ep_act, ep_img = [], [], []
            while True:
                a = spec["expert"](obs, tid)
                ep_obs.append(obs)
                ep_act.append(a)
                if image_size:
                    ep_img.append(env.render())
                obs, _, term, trunc, info = env.step(np.clip(a + rng.normal(0, noise, 2), -1, 1))
                if term or trunc:
                    break
            if not info["is_success"] or len(ep_act) < min_length:
                continue
            obs_l += ep_obs
            act_l += ep_act
            img_l += ep_img
            n += len(ep_obs)
            ends.append(n)
            task_l.append(tid)
            kept += 1
    obs = np.asarray(obs_l, np.float32)
    out = {"observations": obs, "actions": np.asarray(act_l, np.float32),
           "episode_ends": np.asarray(ends, np.int64), "task_ids": np.asarray(task_l, np.int64),
           "task_names": [spec["text"][t] for t in spec["tasks"]]}
    if image_size:
        out["observations"] = obs[:, :spec["state_in_image"]]
        out["images"] = {"image": np.ascontiguousarray(np.asarray(img_l, np.uint8).transpose(0, 3, 1, 2))}
    return out


# ---------------------------------------------------------------------------- dataset
class ChunkDataset(Dataset):
    """Every step of the chosen episodes as (obs history, images, action chunk, task) samples.

    Indices before the episode start are clamped to its first step and indices past its end
    to its last step (the padding of Diffusion Policy's ``SequenceSampler``), so an episode of
    any length >= 1 gives one sample per step.
    """

    def __init__(self, demos: dict, episodes: np.ndarray, chunk: int, n_obs_steps: int):
        self.obs = torch.as_tensor(demos["observations"])
        self.act = torch.as_tensor(demos["actions"])
        self.images = {k: torch.as_tensor(v) for k, v in (demos.get("images") or {}).items()}
        ends = demos["episode_ends"]
        starts = np.concatenate([[0], ends[:-1]])
        self.chunk, self.n_obs_steps = chunk, n_obs_steps
        idx, lo, hi, task = [], [], [], []
        for e in episodes:
            s, t = int(starts[e]), int(ends[e])
            idx.append(np.arange(s, t))
            lo.append(np.full(t - s, s))
            hi.append(np.full(t - s, t))
            task.append(np.full(t - s, demos["task_ids"][e]))
        cat = lambda xs: torch.as_tensor(np.concatenate(xs) if xs else np.zeros(0, np.int64))  # noqa: E731
        self.index, self.lo, self.hi, self.task = cat(idx), cat(lo), cat(hi), cat(task)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        t, lo, hi = int(self.index[i]), int(self.lo[i]), int(self.hi[i])
        obs_idx = torch.arange(t - self.n_obs_steps + 1, t + 1).clamp(min=lo)
        act_idx = torch.arange(t, t + self.chunk).clamp(max=hi - 1)
        item = {"obs": self.obs[obs_idx], "action": self.act[act_idx], "task": self.task[i]}
        if self.images:
            item["images"] = {k: v[obs_idx] for k, v in self.images.items()}  # [To, C, H, W] uint8
        return item


def min_max_stats(x: np.ndarray, eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension [min, max] with constant dimensions widened by eps (no division by 0)."""
    lo, hi = x.min(0), x.max(0)
    wide = (hi - lo) < eps
    return np.where(wide, lo - eps, lo).astype(np.float32), np.where(wide, hi + eps, hi).astype(np.float32)


class DiffusionPolicyDataModule(CheckpointedShuffle, SplitLoaders, L.LightningDataModule):
    """Built-in multitask 2-D demos (``root=None``) or the user's demonstrations.

    Args:
        root: None = generate demos with a built-in suite's scripted expert; a path = the
            user's data in one of the formats of ``formats.py`` or the flat layout above.
        format: "auto" (detected from the path), "flat", "robomimic", "zarr" or "lerobot".
        obs_keys: observation keys to use (default: every low-dim key sorted + image keys).
        action_key: the action key (default: ``actions`` robomimic, ``action`` zarr/LeRobot).
        task_key: where the task string of an episode is (robomimic: a demo/data attribute,
            zarr: a ``data/<key>`` array, LeRobot: a column; default: env_name / tasks.jsonl).
        env: environment for closed-loop evaluation: "auto" (the suite's env when root is
            None, none for user files), "builtin", "pusht" (needs the ``[pusht]`` extra) or None.
        suite: built-in tasks: "manipulation" (reach / push / path) or "via" (8 via-point
            tasks with conflicting actions, the MoE-vs-dense benchmark).
        tasks: built-in tasks to generate (names or ids); default all of the suite.
        image_size: built-in data with rendered images of this size (state = agent xy only).
        episodes_per_task, expert_noise: size and diversity of the built-in demos.
        chunk, n_obs_steps: action chunk length H and observation history To (MoDE: 10, 1).
        val_fraction, test_fraction: episode fractions held out (action MSE on them).
        eval_episodes: closed-loop episodes per task in ``test`` (0 = none).
        val_episodes: closed-loop episodes per task at each validation (0 = none); with an
            environment they make ``val/success_rate`` the checkpoint criterion.
    """

    def __init__(self, root: str | None = None, format: str = "auto", obs_keys: list | None = None,
                 action_key: str | None = None, task_key: str | None = None,
                 env: str | None = "auto", suite: str = "manipulation", tasks: list | None = None,
                 image_size: int | None = None, episodes_per_task: int = 100, expert_noise: float = 0.1,
                 chunk: int = 10, n_obs_steps: int = 1, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 batch_size: int = 256, num_workers: int = 0, eval_episodes: int = 20, val_episodes: int = 0,
                 seed: int = 0):
        super().__init__()
        if env not in ("auto", "builtin", "pusht", None):
            raise ValueError(f"data.env must be 'auto', 'builtin', 'pusht' or null, got {env!r}")
        if suite not in SUITES:
            raise ValueError(f"data.suite must be one of {list(SUITES)}, got {suite!r}")
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {list(FORMATS)}, got {format!r}")
        self.root, self.format, self.chunk, self.n_obs_steps = root, format, chunk, n_obs_steps
        self.obs_keys, self.action_key, self.task_key = obs_keys, action_key, task_key
        self.env_name = ("builtin" if root is None else None) if env == "auto" else env
        self.suite, self.spec, self.image_size = suite, SUITES[suite], image_size
        self.tasks = [self.spec["index"](t) for t in (tasks or range(len(self.spec["tasks"])))]
        self.episodes_per_task, self.expert_noise = episodes_per_task, expert_noise
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size, self.num_workers = batch_size, num_workers
        self.eval_episodes, self.val_episodes, self.seed = eval_episodes, val_episodes, seed
        self.init_shuffle(seed)
        self.demos: dict | None = None

    # -------------------------------------------------------------- shapes the model needs
    def prepare(self) -> dict:
        """Load/generate and split the demonstrations once (idempotent); returns the demos."""
        if self.demos is not None:
            return self.demos
        if self.root is None:
            demos = generate_demonstrations([self.spec["tasks"][t] for t in self.tasks], self.episodes_per_task,
                                            self.expert_noise, self.seed, suite=self.suite,
                                            image_size=self.image_size)
            demos = validate_demonstrations(demos, "built-in demos")
            splits = {}
        else:
            obs_dim, act_dim = self.env_dims()
            builtin = self.env_name == "builtin"
            demos = load_demonstrations(self.root, self.format, self.obs_keys, self.action_key, self.task_key,
                                        act_dim=act_dim, obs_dim=obs_dim,
                                        num_tasks=len(self.spec["tasks"]) if builtin else None)
            splits = demos.pop("splits")
        self.split = self._split(len(demos["episode_ends"]), splits)
        starts = np.concatenate([[0], demos["episode_ends"][:-1]])
        rows = np.concatenate([np.arange(starts[e], demos["episode_ends"][e]) for e in self.split["train"]])
        self.obs_stats = min_max_stats(demos["observations"][rows])
        self.act_stats = min_max_stats(demos["actions"][rows])
        self.act_mean = demos["actions"][rows].mean(0).astype(np.float32)  # the mean-action baseline
        self.demos = demos
        return demos

    def _split(self, num_ep: int, masks: dict) -> dict:
        """Episode split: robomimic ``mask/train`` + ``mask/valid`` (valid halved into val and
        test), else random by ``seed`` with ``val_fraction`` / ``test_fraction``."""
        rng = np.random.default_rng(self.seed)
        if "train" in masks and masks.get("valid"):
            valid = rng.permutation(masks["valid"])
            half = max(1, len(valid) // 2)
            test = valid[:half] if len(valid) > 1 else valid
            return {"train": np.sort(masks["train"]), "val": np.sort(valid[half:] if len(valid) > 1 else valid),
                    "test": np.sort(test)}
        perm = rng.permutation(num_ep)
        n_test = int(round(self.test_fraction * num_ep))
        n_val = int(round(self.val_fraction * num_ep))
        if num_ep - n_test - n_val < 1:
            raise ValueError(f"{self.root or 'built-in demos'}: {num_ep} episodes leave none for training "
                             f"after val_fraction={self.val_fraction}, test_fraction={self.test_fraction}")
        return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
                "train": np.sort(perm[n_test + n_val:])}

    @property
    def obs_dim(self) -> int:
        return self.prepare()["observations"].shape[1]

    @property
    def act_dim(self) -> int:
        return self.prepare()["actions"].shape[1]

    @property
    def image_shapes(self) -> dict:
        """{image key: [C, H, W]} of the image observations (empty without images)."""
        return {k: list(v.shape[1:]) for k, v in (self.prepare().get("images") or {}).items()}

    @property
    def num_tasks(self) -> int:
        tasks = self.prepare()["task_ids"]
        return max(int(tasks.max()) + 1, len(self.spec["tasks"]) if self.env_name == "builtin" else 1,
                   len(self.prepare().get("task_names") or []))

    def task_names(self) -> list[str]:
        """Name of each task id (built-in suite names, else the data's task strings)."""
        if self.env_name == "builtin":
            return list(self.spec["tasks"])
        names = self.prepare().get("task_names")
        return list(names) if names else [f"task{i}" for i in range(self.num_tasks)]

    def task_texts(self) -> list[str]:
        """Goal text of each task id, for the text encoder (the task strings where the data has them)."""
        if self.env_name == "builtin" or self.root is None:
            return [self.spec["text"][t] for t in self.spec["tasks"]]
        return self.task_names()

    def eval_tasks(self) -> list[int]:
        """Task ids to evaluate closed loop (built-in: the ones trained on)."""
        return self.tasks if self.env_name == "builtin" else sorted(set(self.prepare()["task_ids"].tolist()))

    def env_dims(self) -> tuple[int | None, int | None]:
        """(obs_dim, act_dim) the evaluation env expects (None, None without an env)."""
        if self.env_name is None:
            return None, None
        env = self.make_env(self.tasks[0] if self.env_name == "builtin" else 0)
        space = env.observation_space
        dims = (self.spec["state_in_image"] if self.image_size else space.shape[0]), env.action_space.shape[0]
        env.close()
        return dims

    def make_env(self, task: int):
        """A fresh evaluation env for ``task`` (None when there is no environment)."""
        if self.env_name == "builtin":
            env = self.spec["env"](task=task)
            return ImageObs(env, self.image_size, self.spec["state_in_image"]) if self.image_size else env
        if self.env_name == "pusht":
            from .pusht import make_pusht_env
            return make_pusht_env()
        return None

    # -------------------------------------------------------------- lightning hooks
    def setup(self, stage: str | None = None):
        demos = self.prepare()
        self.datasets = {k: ChunkDataset(demos, v, self.chunk, self.n_obs_steps) for k, v in self.split.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        sampler = self.shuffle_sampler(ds) if shuffle else None  # checkpointed order (zoo.data)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > self.batch_size)
