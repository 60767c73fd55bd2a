"""Environments as data: a LightningDataModule whose batches are environment-step indices.

In reinforcement learning the "dataset" is the environment. `RLDataModule` owns the
vectorised training environment and builds evaluation environments; its train dataloader
yields tensors of global environment-step indices (``steps_per_batch`` of them per batch), so
one Lightning epoch is ``steps_per_epoch`` environment steps and the step budget of a run is
``trainer.max_epochs * data.steps_per_epoch``. The algorithm (SAC, PPO) decides in its
``training_step`` what to do with those steps (one env step + one update each for SAC; one
rollout of ``steps_per_batch`` steps for PPO).

Validation and test batches are evaluation-episode seeds; the module plays them with the
deterministic policy.

Environment ids: any registered gymnasium id (``Pendulum-v1``, ``HalfCheetah-v5``) or a
``module:EnvName-v0`` id whose module registers the environment on import, as
``gymnasium.make`` accepts. ``root`` may name a ``.py`` file that registers the user's
environment(s); it is imported before the id is looked up.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

VAL_SEED_OFFSET = 10_000    # evaluation episodes never reuse a training seed
TEST_SEED_OFFSET = 20_000


def import_env_file(root: str | Path) -> None:
    """Import a user's ``.py`` file so the environments it registers become known to gymnasium."""
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"data.root: {path} does not exist (expected a .py file that "
                                f"registers a gymnasium environment)")
    if path.suffix != ".py":
        raise ValueError(f"data.root: {path} must be a .py file that calls gymnasium.register(...)")
    name = f"_zoo_rl_user_env_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def resolve_env_id(env_id: str) -> str:
    """Check ``env_id`` names a registered environment; import ``module:`` prefixes first.

    Returns the id without the module prefix. Raises ValueError with close matches otherwise.
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"data.env_id must be a gymnasium id string, got {env_id!r}")
    if ":" in env_id:
        module, env_id = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"data.env_id: cannot import module {module!r} that should register "
                             f"{env_id!r}: {err}") from None
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"data.env_id: unknown gymnasium environment {env_id!r}{hint} "
                         f"(MuJoCo ids need `pip install -e .[mujoco]`)")
    return env_id


def check_continuous(space: gym.Space, env_id: str) -> None:
    """PMOE/SAC/PPO here act in a flat continuous Box; anything else is a clear error."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"data.env_id: {env_id} has action space {space}; these Gaussian (mixture) "
                         f"policies need a 1-D continuous Box action space, not a discrete one")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(f"data.env_id: {env_id} has an unbounded action space {space}; "
                         f"a bounded Box is needed to scale the squashed actions")


class StepIndices(Dataset):
    """Item ``i`` = the ``steps_per_batch`` environment-step indices of batch ``i`` of an epoch."""

    def __init__(self, steps_per_epoch: int, steps_per_batch: int):
        self.steps_per_batch = steps_per_batch
        self.num_batches = steps_per_epoch // steps_per_batch

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.steps_per_batch
        return torch.arange(start, start + self.steps_per_batch)  # [steps_per_batch]


class EpisodeSeeds(Dataset):
    """One item: the reset seeds of all evaluation episodes [n] (one batch). A single item also
    means that under a multi-process strategy every rank plays every episode (the distributed
    sampler pads one item to every rank), so all ranks log the same evaluation of the same weights."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.seeds)  # [n]


class RLDataModule(LightningDataModule):
    """Any continuous-action gymnasium id (built in: Pendulum-v1, MountainCarContinuous-v0;
    MuJoCo ids with the [mujoco] extra; your own as ``module:Env-v0`` or a registering ``.py``
    file as ``root``), served as environment-step indices (training) and episode seeds (eval).

    Args:
        env_id: gymnasium id or ``module:EnvName-v0``.
        root: None, or a ``.py`` file registering the user's environment(s).
        num_envs: parallel training environments (``SyncVectorEnv``, same-step autoreset).
        steps_per_batch: env steps (all envs together) handled by one ``training_step``.
        steps_per_epoch: env steps per Lightning epoch (one evaluation point each epoch).
        eval_episodes: deterministic evaluation episodes per validation epoch (learning curve).
        test_episodes: deterministic evaluation episodes at test time.
        seed: root of every seed of the run: the training environments' per-epoch resets and the
            module's sampler are derived from it (with the rank), evaluation episodes use
            ``seed + 10000 + i`` (validation) and ``seed + 20000 + i`` (test);
            None = the run's ``seed_everything`` value (``PL_GLOBAL_SEED``), so every seed of
            ``zoo compare`` also sees different episodes.
        max_episode_steps: optional time-limit override.
        env_kwargs: extra keyword arguments for ``gymnasium.make``.
    """

    def __init__(self, env_id: str = "Pendulum-v1", root: str | None = None, num_envs: int = 1,
                 steps_per_batch: int = 1, steps_per_epoch: int = 1000, eval_episodes: int = 5,
                 test_episodes: int = 10, seed: int | None = None, max_episode_steps: int | None = None,
                 env_kwargs: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        for name in ("num_envs", "steps_per_batch", "steps_per_epoch", "eval_episodes", "test_episodes"):
            if int(getattr(self.hparams, name)) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self.hparams, name)}")
        if steps_per_batch % num_envs:
            raise ValueError(f"data.steps_per_batch={steps_per_batch} must be a multiple of "
                             f"data.num_envs={num_envs}")
        if steps_per_epoch % steps_per_batch:
            raise ValueError(f"data.steps_per_epoch={steps_per_epoch} must be a multiple of "
                             f"data.steps_per_batch={steps_per_batch}")
        if root is not None:
            import_env_file(root)
        self.env_id = resolve_env_id(env_id)
        probe = self.make_env()
        check_continuous(probe.action_space, env_id)
        if not isinstance(probe.observation_space, gym.spaces.Box) or len(probe.observation_space.shape) != 1:
            raise ValueError(f"data.env_id: {env_id} has observation space {probe.observation_space}; "
                             f"a flat Box observation is needed (wrap image/dict observations first)")
        self.observation_space = probe.observation_space
        self.action_space = probe.action_space
        probe.close()
        self.obs_dim = int(self.observation_space.shape[0])
        self.act_dim = int(self.action_space.shape[0])
        self.train_env: gym.vector.VectorEnv | None = None

    # ---- environments -------------------------------------------------------------------
    @property
    def seed(self) -> int:
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def make_env(self) -> gym.Env:
        """One environment of ``env_id`` (with the time-limit and kwargs overrides)."""
        kw = dict(self.hparams.env_kwargs or {})
        if self.hparams.max_episode_steps is not None:
            kw["max_episode_steps"] = int(self.hparams.max_episode_steps)
        return gym.make(self.env_id, **kw)

    def make_vector_env(self, num_envs: int, autoreset: bool) -> gym.vector.SyncVectorEnv:
        """``num_envs`` copies in one SyncVectorEnv; SAME_STEP autoreset puts the true last
        observation of a finished episode in ``info["final_obs"]`` (needed for bootstrapping)."""
        mode = AutoresetMode.SAME_STEP if autoreset else AutoresetMode.DISABLED
        return gym.vector.SyncVectorEnv([self.make_env for _ in range(num_envs)], autoreset_mode=mode)

    def setup(self, stage: str | None = None) -> None:
        if self.train_env is None and stage in (None, "fit"):
            self.train_env = self.make_vector_env(self.hparams.num_envs, autoreset=True)

    def teardown(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_env is not None:
            self.train_env.close()
            self.train_env = None

    # ---- dataloaders --------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = StepIndices(self.hparams.steps_per_epoch, self.hparams.steps_per_batch)
        return DataLoader(ds, batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        seeds = [self.seed + VAL_SEED_OFFSET + i for i in range(self.hparams.eval_episodes)]
        return DataLoader(EpisodeSeeds(seeds), batch_size=None, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        seeds = [self.seed + TEST_SEED_OFFSET + i for i in range(self.hparams.test_episodes)]
        return DataLoader(EpisodeSeeds(seeds), batch_size=None, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """`zoo predict` plays the test episodes (same seeds) and saves them."""
        return self.test_dataloader()
