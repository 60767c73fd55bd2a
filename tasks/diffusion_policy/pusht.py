"""Optional Push-T environment (extra ``[pusht]``: ``pip install gym-pusht``).

Use with your own Push-T demonstrations in the plug-in layout (state observations
``[agent x, agent y, block x, block y, block angle]``, actions = target agent position in
pixels, one task): ``--data.root pusht_demos.npz --data.env pusht``. Closed-loop success is
gym-pusht's ``info["is_success"]`` (goal coverage > 95%). Runs offline; set
``SDL_VIDEODRIVER=dummy`` on a headless machine.
"""
from __future__ import annotations

import os

import gymnasium as gym


class _SingleTask(gym.Wrapper):
    """Accepts (and drops) the ``options={"task": k}`` the evaluator passes; Push-T has one task."""

    def reset(self, *, seed=None, options=None):
        options = {k: v for k, v in (options or {}).items() if k != "task"} or None
        return self.env.reset(seed=seed, options=options)


def make_pusht_env(render_mode: str = "rgb_array") -> gym.Env:
    """``gym_pusht/PushT-v0`` with state observations (ImportError explains the extra)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        import gym_pusht  # noqa: F401  (registers the env id)
    except ImportError:
        raise ImportError("data.env='pusht' needs the optional Push-T extra: pip install 'gym-pusht' "
                          "(installs pymunk<7, pygame, opencv)") from None
    return _SingleTask(gym.make("gym_pusht/PushT-v0", obs_type="state", render_mode=render_mode))
