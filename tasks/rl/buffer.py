"""A uniform replay buffer whose whole state (contents, cursor, sampling RNG) is checkpointable."""
from __future__ import annotations

import numpy as np
import torch


class ReplayBuffer:
    """Ring buffer of transitions (s, a, r, s', terminated) in preallocated float32 arrays.

    ``terminated`` excludes time-limit truncation, so bootstrapping continues through a
    truncated episode's last state (Pardo et al. 2018). Sampling uses its own seeded
    generator, saved by `state_dict`, so a resumed run samples the same minibatches.
    """

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"model.buffer_size must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, obs_dim), np.float32)        # [N, O]
        self.actions = np.zeros((capacity, act_dim), np.float32)    # [N, A]
        self.rewards = np.zeros(capacity, np.float32)               # [N]
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)   # [N, O]
        self.terminated = np.zeros(capacity, np.float32)            # [N]
        self.pos, self.size = 0, 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated) -> None:
        """Add a batch of transitions from vectorised envs: obs [n, O], actions [n, A], rewards [n]."""
        obs = np.asarray(obs, np.float32).reshape(-1, self.obs.shape[1])
        n = obs.shape[0]
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx] = obs
        self.actions[idx] = np.asarray(actions, np.float32).reshape(n, -1)
        self.rewards[idx] = np.asarray(rewards, np.float32).reshape(n)
        self.next_obs[idx] = np.asarray(next_obs, np.float32).reshape(n, -1)
        self.terminated[idx] = np.asarray(terminated, np.float32).reshape(n)
        self.pos = int((self.pos + n) % self.capacity)
        self.size = int(min(self.size + n, self.capacity))

    def sample(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        """Uniform minibatch (with replacement) as float tensors."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self.rng.integers(0, self.size, size=batch_size)
        return {f: torch.as_tensor(getattr(self, f)[idx], device=device) for f in self.FIELDS}

    def state_dict(self) -> dict:
        """Stored transitions (filled part only), cursor and sampler RNG; torch-serialisable."""
        data = {f: torch.from_numpy(getattr(self, f)[: self.size].copy()) for f in self.FIELDS}
        return {"capacity": self.capacity, "pos": self.pos, "size": self.size,
                "rng": self.rng.bit_generator.state, **data}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"checkpoint replay buffer capacity {state['capacity']} != "
                             f"model.buffer_size {self.capacity}")
        size = int(state["size"])
        for f in self.FIELDS:
            getattr(self, f)[:size] = state[f].numpy()
        self.pos, self.size = int(state["pos"]), size
        self.rng.bit_generator.state = state["rng"]
