"""A small multitask 2-D manipulation environment (gymnasium API) with a scripted expert.

The built-in environment of the MoDE task: a disc-shaped agent moves in the square arena
``[-1, 1]^2`` by velocity commands. The scene always holds a block, a goal and two waypoints;
the task id says what to do with them, so the same observation calls for different actions
in different tasks and the policy has to use its task embedding (the multitask setting of
MoDE, sec. 4, with a learned per-task goal embedding instead of CLIP language goals):

- ``reach``  (0): move the agent onto the goal.
- ``push``   (1): push the block onto the goal (kinematic pushing: overlapping discs are
  separated along the contact normal, the block moving; no friction, no rotation).
- ``path``   (2): visit waypoint A, then waypoint B, then the goal.

Dynamics are plain numpy (no physics package); a step costs a few microseconds.
Observation (12 floats): ``agent xy, block xy, goal xy, waypoint A xy, waypoint B xy,
visited A, visited B``. Action (2 floats in [-1, 1]): velocity, scaled by ``MAX_SPEED``.
Reward: progress towards the task's current target (potential difference of distances)
plus 1 on success, which ends the episode.
"""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from gymnasium import spaces

TASKS = ("reach", "push", "path")
TASK_TEXT = {"reach": "move the agent onto the goal", "push": "push the block onto the goal",
             "path": "visit waypoint a then waypoint b then the goal"}
MAX_STEPS = {"reach": 50, "push": 120, "path": 90}
OBS_DIM, ACT_DIM = 12, 2
MAX_SPEED = 0.05          # arena units per step at |action| = 1
AGENT_R, BLOCK_R = 0.05, 0.08
REACH_TOL, PUSH_TOL, WAYPOINT_TOL = 0.06, 0.08, 0.07


def _index(task, names: tuple, suite: str) -> int:
    """Task name or index -> index into ``names`` (ValueError names the valid tasks)."""
    if isinstance(task, (int, np.integer)) and 0 <= int(task) < len(names):
        return int(task)
    if isinstance(task, str) and task in names:
        return names.index(task)
    raise ValueError(f"unknown task {task!r}; the {suite} has tasks {list(names)} (or 0..{len(names) - 1})")


def task_index(task) -> int:
    """Task name or index -> index into ``TASKS``."""
    return _index(task, TASKS, "built-in env")


class MultiTask2DEnv(gym.Env):
    """Gymnasium env with tasks ``reach`` / ``push`` / ``path`` (see module docstring).

    ``task=None`` draws a task per episode from the reset RNG; ``reset(options={"task": k})``
    fixes it for one episode. ``info`` carries ``task``, ``task_id`` and ``is_success``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task=None, render_mode: str | None = "rgb_array", image_size: int = 96):
        super().__init__()
        self.fixed_task = None if task is None else task_index(task)
        self.render_mode = render_mode
        self.image_size = image_size
        self.observation_space = spaces.Box(-1.0, 1.0, (OBS_DIM,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        self.task_id = 0
        self.t = 0

    # ------------------------------------------------------------------ core API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        task = (options or {}).get("task", self.fixed_task)
        self.task_id = int(rng.integers(len(TASKS))) if task is None else task_index(task)
        # Rejection-sample a scene whose objects do not overlap.
        while True:
            self.agent = rng.uniform(-0.8, 0.8, 2)
            self.block = rng.uniform(-0.5, 0.5, 2)
            self.goal = rng.uniform(-0.6, 0.6, 2)
            self.wp = rng.uniform(-0.7, 0.7, (2, 2))
            pts = np.stack([self.agent, self.block, self.goal, *self.wp])
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 9
            if d.min() > 0.3:
                break
        self.visited = np.zeros(2)
        self.t = 0
        self.success = False
        self._potential = self._distance_to_target()
        return self._obs(), self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(ACT_DIM), -1.0, 1.0)
        self.agent = np.clip(self.agent + MAX_SPEED * a, -1.0 + AGENT_R, 1.0 - AGENT_R)
        gap = self.block - self.agent
        dist = np.linalg.norm(gap)
        if dist < AGENT_R + BLOCK_R:  # kinematic push along the contact normal
            normal = gap / max(dist, 1e-8)
            self.block = self.agent + normal * (AGENT_R + BLOCK_R)
            self.block = np.clip(self.block, -1.0 + BLOCK_R, 1.0 - BLOCK_R)
        if self.task_id == 2:  # waypoints are visited in order
            nxt = int(self.visited.sum())
            if nxt < 2 and np.linalg.norm(self.agent - self.wp[nxt]) < WAYPOINT_TOL:
                self.visited[nxt] = 1.0
                self._potential = self._distance_to_target()
        self.t += 1
        self.success = self._is_success()
        potential = self._distance_to_target()
        reward = (self._potential - potential) + float(self.success)
        self._potential = potential
        truncated = self.t >= MAX_STEPS[TASKS[self.task_id]]
        return self._obs(), float(reward), self.success, truncated and not self.success, self._info()

    def render(self):
        return render_scene(self.agent, self.block, self.goal, self.wp, self.visited,
                            self.task_id, self.image_size)

    # ------------------------------------------------------------------ helpers
    def _obs(self) -> np.ndarray:
        return np.concatenate([self.agent, self.block, self.goal, self.wp.reshape(-1),
                               self.visited]).astype(np.float32)

    def _info(self) -> dict:
        return {"task": TASKS[self.task_id], "task_id": self.task_id, "is_success": self.success}

    def _target_point(self) -> np.ndarray:
        if self.task_id == 1:
            return self.block  # distance block -> goal
        if self.task_id == 2:
            nxt = int(self.visited.sum())
            return self.wp[nxt] if nxt < 2 else self.goal
        return self.goal

    def _distance_to_target(self) -> float:
        if self.task_id == 1:
            return float(np.linalg.norm(self.block - self.goal))
        return float(np.linalg.norm(self.agent - self._target_point()))

    def _is_success(self) -> bool:
        if self.task_id == 0:
            return bool(np.linalg.norm(self.agent - self.goal) < REACH_TOL)
        if self.task_id == 1:
            return bool(np.linalg.norm(self.block - self.goal) < PUSH_TOL)
        return bool(self.visited.all() and np.linalg.norm(self.agent - self.goal) < REACH_TOL)


def _toward(src: np.ndarray, dst: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Velocity command from src to dst, saturating at full speed."""
    return np.clip(gain * (dst - src) / MAX_SPEED, -1.0, 1.0)


def scripted_action(obs: np.ndarray, task_id: int, rng: np.random.Generator | None = None,
                    noise: float = 0.0) -> np.ndarray:
    """The scripted expert: a closed-form controller per task, computed from the observation.

    ``push`` orbits the block at a safe radius until it is behind the block (seen from the
    goal), then drives through the block centre towards the goal. ``noise`` adds Gaussian
    action noise (for diverse demonstrations).
    """
    agent, block, goal = obs[0:2], obs[2:4], obs[4:6]
    wp, visited = obs[6:10].reshape(2, 2), obs[10:12]
    if task_id == 0:
        a = _toward(agent, goal)
    elif task_id == 2:
        nxt = int(round(float(visited.sum())))
        a = _toward(agent, wp[nxt] if nxt < 2 else goal)
    else:
        d = goal - block
        u = d / max(np.linalg.norm(d), 1e-8)
        rel = agent - block
        ang_agent = math.atan2(rel[1], rel[0])
        ang_behind = math.atan2(-u[1], -u[0])
        diff = (ang_behind - ang_agent + math.pi) % (2 * math.pi) - math.pi
        if abs(diff) > 0.35:  # go around the block on a ring of safe radius
            ring = AGENT_R + BLOCK_R + 0.05
            step = math.copysign(min(abs(diff), 0.7), diff)
            tgt = block + ring * np.array([math.cos(ang_agent + step), math.sin(ang_agent + step)])
            a = _toward(agent, tgt)
        else:  # aim through the block centre along the push line
            contact = block - u * (AGENT_R + BLOCK_R - 0.02)
            a = _toward(agent, contact + u * 0.05, gain=0.7)
    if noise > 0 and rng is not None:
        a = a + rng.normal(0.0, noise, 2)
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def render_scene(agent, block, goal, wp, visited, task_id: int, size: int = 96) -> np.ndarray:
    """Rasterise the scene into an RGB uint8 array [size, size, 3] (numpy only)."""
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    px = (xx + 0.5) / size * 2 - 1
    py = 1 - (yy + 0.5) / size * 2

    def disc(c, r, color, ring=False):
        d = np.hypot(px - c[0], py - c[1])
        m = (np.abs(d - r) < 2.0 / size) if ring else (d < r)
        img[m] = color

    disc(goal, PUSH_TOL if task_id == 1 else REACH_TOL, (60, 170, 60), ring=True)
    for i in range(2):
        disc(wp[i], WAYPOINT_TOL, (150, 150, 150) if visited[i] else (230, 150, 40), ring=True)
    disc(block, BLOCK_R, (70, 110, 200))
    disc(agent, AGENT_R, (200, 50, 50))
    return img


# ---------------------------------------------------------------------------- via-point suite
VIA_TASKS = tuple(f"via_{d}" for d in ("e", "ne", "n", "nw", "w", "sw", "s", "se"))
VIA_RADIUS, VIA_TOL, VIA_MAX_STEPS = 0.4, 0.08, 60


def via_point(goal: np.ndarray, task_id: int) -> np.ndarray:
    """Via point of task ``task_id``: the goal shifted by VIA_RADIUS in the task's compass direction."""
    ang = task_id * 2 * math.pi / len(VIA_TASKS)
    return goal + VIA_RADIUS * np.array([math.cos(ang), math.sin(ang)])


class ViaPointEnv(gym.Env):
    """Eight tasks that need conflicting actions from the same observation.

    The agent must reach the goal *through* a via point that lies 0.4 from the goal in the
    task's compass direction (``via_e``, ``via_ne``, ... ``via_se``), which is not shown: the
    observation ``[agent xy, goal xy, via visited]`` is the same for every task, so the action
    field of each task points a different way (opposite tasks point opposite ways) and the
    policy must get the route from its goal conditioning. Success: the via point was visited
    (within 0.08), then the goal reached (within 0.06), in at most 60 steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task=None, render_mode: str | None = "rgb_array", image_size: int = 96):
        super().__init__()
        self.fixed_task = None if task is None else via_task_index(task)
        self.render_mode, self.image_size = render_mode, image_size
        self.observation_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        self.task_id, self.t = 0, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        task = (options or {}).get("task", self.fixed_task)
        self.task_id = int(rng.integers(len(VIA_TASKS))) if task is None else via_task_index(task)
        self.goal = rng.uniform(-0.45, 0.45, 2)
        while True:
            self.agent = rng.uniform(-0.9, 0.9, 2)
            if np.linalg.norm(self.agent - self.goal) > 0.3:
                break
        self.via = via_point(self.goal, self.task_id)
        self.visited, self.t, self.success = 0.0, 0, False
        self._potential = self._distance()
        return self._obs(), self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(ACT_DIM), -1.0, 1.0)
        self.agent = np.clip(self.agent + MAX_SPEED * a, -1.0, 1.0)
        if not self.visited and np.linalg.norm(self.agent - self.via) < VIA_TOL:
            self.visited = 1.0
            self._potential = self._distance()
        self.t += 1
        self.success = bool(self.visited and np.linalg.norm(self.agent - self.goal) < REACH_TOL)
        potential = self._distance()
        reward = (self._potential - potential) + float(self.success)
        self._potential = potential
        truncated = self.t >= VIA_MAX_STEPS and not self.success
        return self._obs(), float(reward), self.success, truncated, self._info()

    def render(self):
        return render_scene(self.agent, np.full(2, 9.0), self.goal, np.stack([self.via, np.full(2, 9.0)]),
                            np.array([self.visited, 0.0]), 0, self.image_size)

    def _distance(self) -> float:
        return float(np.linalg.norm(self.agent - (self.goal if self.visited else self.via)))

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.agent, self.goal, [self.visited]]).astype(np.float32)

    def _info(self) -> dict:
        return {"task": VIA_TASKS[self.task_id], "task_id": self.task_id, "is_success": self.success}


def via_task_index(task) -> int:
    """Task name or index -> index into ``VIA_TASKS``."""
    return _index(task, VIA_TASKS, "via suite")


def via_action(obs: np.ndarray, task_id: int) -> np.ndarray:
    """Scripted expert of the via suite: to the task's via point, then to the goal."""
    agent, goal, visited = obs[0:2], obs[2:4], obs[4]
    target = goal if visited > 0.5 else via_point(goal, task_id)
    return _toward(agent, target).astype(np.float32)


# ---------------------------------------------------------------------------- suites, image obs
SUITES = {
    "manipulation": {"env": MultiTask2DEnv, "tasks": TASKS, "expert": scripted_action, "index": task_index,
                     "text": TASK_TEXT, "state_in_image": 2},
    "via": {"env": ViaPointEnv, "tasks": VIA_TASKS, "expert": via_action, "index": via_task_index,
            "text": {t: f"go through the {t[4:]} side of the goal" for t in VIA_TASKS}, "state_in_image": 2},
}


class ImageObs(gym.Wrapper):
    """Observation ``{"state": obs[:state_dims], "image": render()}`` (uint8 [S, S, 3]): the
    policy sees only the agent's own coordinates as state and the rest of the scene as pixels."""

    def __init__(self, env: gym.Env, image_size: int, state_dims: int = 2):
        env.image_size = image_size
        super().__init__(env)
        self.state_dims = state_dims

    def _wrap(self, obs):
        return {"state": obs[:self.state_dims], "image": self.env.render()}

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        return self._wrap(obs), info

    def step(self, action):
        obs, *rest = self.env.step(action)
        return (self._wrap(obs), *rest)
