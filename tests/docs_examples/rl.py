"""A user environment file, as tasks/rl/README.md shows it (``--data.root data/my_envs.py``)."""
from __future__ import annotations

from pathlib import Path

# one epoch of 32 env steps over 2 envs (the configs' own budgets are 8k-1M steps)
TINY = ["--trainer.max_epochs", "1", "--data.init_args.num_envs", "2", "--data.init_args.steps_per_batch", "16",
        "--data.init_args.steps_per_epoch", "32", "--data.init_args.eval_episodes", "1",
        "--data.init_args.test_episodes", "1"]


def tiny_for(config: str) -> list[str]:
    """SAC starts learning after a few steps, so the tiny run updates and saves a checkpoint."""
    return ["--model.init_args.learning_starts", "8", "--model.init_args.batch_size", "8"] if "sac" in config else []


MY_ENVS = '''\
"""Registers Reacher2D-v0: push a point to the origin with a bounded force."""
import gymnasium as gym
import numpy as np


class Reacher2D(gym.Env):
    observation_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)
        return self.state.copy(), {}

    def step(self, action):
        pos, vel = self.state
        vel = 0.9 * vel + 0.1 * float(np.clip(action[0], -1.0, 1.0))
        pos = pos + 0.1 * vel
        self.state = np.array([pos, vel], np.float32)
        return self.state.copy(), -float(pos * pos), False, False, {}


if "Reacher2D-v0" not in gym.registry:
    gym.register("Reacher2D-v0", entry_point=Reacher2D, max_episode_steps=50)
'''


def write(name: str, dest: Path) -> None:
    if name != "my_envs.py":
        raise KeyError(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(MY_ENVS)
