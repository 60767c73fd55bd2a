"""What SAC and PPO share: building from the env's spaces, evaluation, learning curve, test metrics.

`RLModule` is a `zoo.module.ZooModule` with manual optimisation. ``self.model`` is the actor
(`MixturePolicy`), so parameter/FLOP counts, routing statistics and plots describe the policy;
critics live next to it. Subclasses implement ``build_networks`` and ``training_step``.

Each validation epoch plays ``data.eval_episodes`` deterministic episodes and appends
(env steps, mean return) to the learning curve (plus one point before training starts);
``test_step`` plays ``data.test_episodes`` episodes and logs ``test/return_mean``,
``test/return_std``, ``test/curve_auc`` and ``test/steps_per_s``.

Reproducibility and exact resume: every random draw of the algorithms (warm-up actions,
component and action sampling, estimator noise, PPO minibatch order) comes from one
``torch.Generator`` the module owns (``self.rng``, seeded from ``data.seed`` and the rank,
saved in checkpoints), never from an unseeded gymnasium space or the global RNG that Lightning
also draws from. The training environments are reset at the start of every epoch with seeds
derived from (``data.seed``, rank, epoch), so the simulator state and its RNG at an epoch
boundary are a function of the seed alone and a run resumed from an epoch-end checkpoint
replays exactly what the uninterrupted run does (an episode running at the end of an epoch is
cut there, as a time-limit truncation: bootstrapped, not terminal).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from zoo.module import ZooModule

from .metrics import curve_auc, plot_pendulum_components, return_stats
from .model import MixtureHead, MixturePolicy


class RLModule(ZooModule):
    monitor = "val/return_mean"
    monitor_mode = "max"

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.env_steps = 0                 # environment steps taken by training so far
        self.train_seconds = 0.0           # wall time inside training_step (acting + updates)
        self.curve_steps: list[int] = []   # learning curve: env steps at each evaluation
        self.curve_returns: list[float] = []
        self._obs: np.ndarray | None = None           # current observation of the training envs
        self._episode_return: np.ndarray | None = None
        self.rng = torch.Generator()                  # every random draw of training (see module doc)
        self._pending_rng_state: torch.Tensor | None = None  # sampler state read from a checkpoint

    # ---- construction from the environment ---------------------------------------------------
    def on_data(self, datamodule) -> None:
        """Read the env's spaces, store them in hparams (so checkpoints rebuild) and build."""
        spec = dict(obs_dim=datamodule.obs_dim, act_dim=datamodule.act_dim,
                    action_low=[float(v) for v in datamodule.action_space.low],
                    action_high=[float(v) for v in datamodule.action_space.high])
        if all(self.hparams.get(k) == v for k, v in spec.items()) and self.model is not None:
            return
        self.hparams.update(spec)
        self.build_networks()

    def _spaces_known(self) -> bool:
        return all(self.hparams.get(k) is not None for k in ("obs_dim", "act_dim", "action_low", "action_high"))

    def build_networks(self) -> None:
        """Build actor/critics once the spaces are known (SAC and PPO each define theirs)."""
        raise TypeError(f"{type(self).__name__} must define build_networks()")

    def build_policy(self, **kw) -> "MixturePolicy":
        """The mixture (or single-Gaussian) policy from the shared hparams; ``kw`` holds what
        SAC and PPO set differently (activation, squashing, std parameterisation, init)."""
        hp = self.hparams
        return MixturePolicy(hp.obs_dim, hp.act_dim, hp.action_low, hp.action_high, head=hp.head,
                             hidden=hp.hidden, trunk_layers=hp.trunk_layers,
                             num_components=hp.num_components, expert_hidden=hp.expert_hidden,
                             router=hp.router, **kw)

    def flops_inputs(self) -> tuple:
        return (torch.zeros(1, self.hparams.obs_dim),)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action [B, A] for observations [B, O] (the inference path)."""
        return self.model(obs)

    def batch_size_of(self, batch) -> int:
        return len(batch)

    @property
    def datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ValueError("the RL modules need an RLDataModule (pass datamodule= to the Trainer)")
        return dm

    def derived_seed(self, *keys: int) -> int:
        """A 32-bit seed from (``data.seed``, this rank, *keys): every rank of a multi-process run
        gets its own streams. Keys used: (0,) the sampler ``self.rng``; (1, epoch, env index) the
        training-env resets; (2,) the replay buffer's sampler."""
        entropy = [self.datamodule.seed, self.global_rank, *map(int, keys)]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def on_fit_start(self) -> None:
        if self.model is None:
            self.on_data(self.datamodule)
        self.rng = torch.Generator(device=self.device)
        if self._pending_rng_state is not None:  # resuming: continue the saved sampler stream
            self.rng.set_state(self._pending_rng_state)
            self._pending_rng_state = None
        else:
            self.rng.manual_seed(self.derived_seed(0))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._obs = None  # every epoch starts its training envs from a reset seeded by the epoch

    # ---- training-environment helpers ----------------------------------------------------------
    def reset_train_env(self) -> np.ndarray:
        """Reset every training env with a seed derived from (data.seed, rank, epoch, env index)."""
        env = self.datamodule.train_env
        seeds = [self.derived_seed(1, self.current_epoch, i) for i in range(env.num_envs)]
        obs, _ = env.reset(seed=seeds)
        self._episode_return = np.zeros(env.num_envs)
        return obs

    def random_actions(self, n: int) -> np.ndarray:
        """``n`` actions uniform in the action bounds [n, A], drawn from ``self.rng`` (a gymnasium
        space's own ``sample()`` is seeded from OS entropy unless seeded, so it is not used)."""
        low, high = self.model.action_low, self.model.action_high
        u = torch.rand(n, low.shape[0], generator=self.rng, device=low.device)
        return (low + u * (high - low)).cpu().numpy()

    def step_train_env(self, action: np.ndarray):
        """One vector step; returns (next_obs for the buffer, obs to continue from, reward,
        terminated, done) with true final observations substituted where an episode ended."""
        env = self.datamodule.train_env
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated | truncated
        real_next = obs.copy()
        if "final_obs" in info:
            for i in np.nonzero(info["_final_obs"])[0]:
                real_next[i] = info["final_obs"][i]
        self._episode_return += reward
        for i in np.nonzero(done)[0]:
            self.log("train/episode_return", float(self._episode_return[i]), on_step=True, on_epoch=False)
            self._episode_return[i] = 0.0
        self.env_steps += env.num_envs * self.trainer.world_size  # global: every rank steps its own envs
        return real_next, obs, reward, terminated, done

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, seeds, keep_states: bool = False, trace: list | None = None):
        """Play one deterministic episode per seed, all in lockstep (batched policy forward).

        Returns (returns [n], env steps played, visited observations [T, O] or None). With
        ``trace`` (a list), each episode's (observations, actions, rewards) are appended to
        it as arrays [T_i, O], [T_i, A], [T_i], in seed order."""
        dm = self.datamodule
        envs = [dm.make_env() for _ in seeds]
        obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]
        returns = np.zeros(len(envs))
        active, played, visited = list(range(len(envs))), 0, []
        steps = [([], [], []) for _ in envs] if trace is not None else None
        was_training = self.model.training
        self.model.eval()
        while active:
            batch_obs = np.stack([obs[i] for i in active]).astype(np.float32)  # [n_active, O]
            if keep_states:
                visited.append(batch_obs)
            x = torch.as_tensor(batch_obs, device=self.device)
            actions = self.model.act(x, deterministic=True)[0].cpu().numpy()
            still = []
            for a, i in zip(actions, active):
                if steps is not None:
                    steps[i][0].append(obs[i])
                    steps[i][1].append(a)
                obs[i], r, term, trunc, _ = envs[i].step(a)
                returns[i] += r
                if steps is not None:
                    steps[i][2].append(r)
                played += 1
                if not (term or trunc):
                    still.append(i)
            active = still
        for env in envs:
            env.close()
        self.model.train(was_training)
        if steps is not None:
            trace += [(np.stack(o).astype(np.float32), np.stack(a).astype(np.float32),
                       np.asarray(r, dtype=np.float32)) for o, a, r in steps]
        return returns, played, (np.concatenate(visited) if keep_states else None)

    def _add_curve_point(self, mean: float) -> None:
        if self.curve_steps and self.curve_steps[-1] == self.env_steps:
            self.curve_returns[-1] = mean
        else:
            self.curve_steps.append(self.env_steps)
            self.curve_returns.append(mean)

    def on_train_start(self) -> None:
        if not self.curve_steps:  # return of the untrained policy: step 0 of the learning curve
            seeds = self.datamodule.val_dataloader().dataset.seeds
            self._add_curve_point(return_stats(self.evaluate(seeds)[0])[0])

    def on_fit_end(self) -> None:
        """Write the learning curve (env steps, mean evaluation return) as learning_curve.csv."""
        if self.trainer.is_global_zero and self.curve_steps:
            lines = ["env_steps,return_mean"] + [f"{s},{r:.6g}" for s, r in zip(self.curve_steps, self.curve_returns)]
            (self.run_dir / "learning_curve.csv").write_text("\n".join(lines) + "\n")

    def validation_step(self, batch, batch_idx):
        if self.trainer.sanity_checking:
            return
        returns, _, _ = self.evaluate(batch.tolist())
        mean, std = return_stats(returns)
        self._add_curve_point(mean)
        self.log("val/return_mean", mean, batch_size=len(batch))
        self.log("val/return_std", std, batch_size=len(batch))
        self.log("val/env_steps", float(self.env_steps), batch_size=len(batch))

    def predict_step(self, batch, batch_idx):
        """One deterministic episode per seed of the test split: the seed, the return, and the
        episode itself (observations [T, O], actions [T, A], rewards [T] per episode)."""
        trace = []
        returns, _, _ = self.evaluate(batch.tolist(), trace=trace)
        return {"seed": batch, "return": torch.as_tensor(returns, dtype=torch.float32),
                "obs": [torch.from_numpy(o) for o, _, _ in trace],
                "action": [torch.from_numpy(a) for _, a, _ in trace],
                "reward": [torch.from_numpy(r) for _, _, r in trace]}

    def test_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        returns, played, states = self.evaluate(batch.tolist(), keep_states=True)
        eval_speed = played / max(time.perf_counter() - t0, 1e-9)
        mean, std = return_stats(returns)
        n = len(batch)
        self.log("test/return_mean", mean, batch_size=n)
        self.log("test/return_std", std, batch_size=n)
        self.log("test/curve_auc", curve_auc(self.curve_steps, self.curve_returns), batch_size=n)
        speed = self.env_steps / self.train_seconds if self.train_seconds > 0 else float("nan")
        self.log("test/steps_per_s", speed, batch_size=n)
        self.log("test/eval_steps_per_s", eval_speed, batch_size=n)
        # zoo compare's inference samples/s counts `batch_size_of(batch)` (= episodes) per test
        # batch; count the evaluated states instead, so the column reads policy steps per second.
        self.test_samples += played - self.batch_size_of(batch)
        if isinstance(self.model.head, MixtureHead):
            self._component_usage(states)

    @torch.no_grad()
    def _component_usage(self, states: np.ndarray) -> None:
        """Which expert acts in which evaluation states: routing over every visited state (for
        the shared load/entropy statistics and heatmaps), the entropy of that usage, and for
        Pendulum the usage split into upright vs swinging states (the phase-plane PNG is drawn
        in ``on_test_epoch_end``)."""
        x = torch.as_tensor(states, device=self.device)
        logits = self.model.head.mixing_logits(self.model.features(x))
        self.model.head._record(logits)  # last_routing now covers all evaluation states
        usage = torch.bincount(logits.argmax(-1), minlength=self.model.num_components).float()
        usage = usage / usage.sum()
        entropy = -(usage * usage.clamp_min(1e-12).log()).sum() / np.log(self.model.num_components)
        self.log("test/component_usage_entropy", float(entropy), batch_size=len(states))
        if self._is_pendulum():
            upright = torch.as_tensor(states[:, 0] > np.cos(np.pi / 6)).long()  # cos(theta) > cos 30deg
            self.record_routing(1 - upright, ["upright |theta|<30deg", "swinging"])

    def _is_pendulum(self) -> bool:
        return self.datamodule.env_id.startswith("Pendulum") and self.hparams.obs_dim == 3

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        # drawn here, outside test_step, so the PNG does not count in zoo's inference timing
        if isinstance(self.model.head, MixtureHead) and self._is_pendulum() and self.trainer.is_global_zero:
            plot_pendulum_components(self.model, self.run_dir / "pendulum_components.png")

    # ---- checkpointed training state -----------------------------------------------------------
    def rank_state(self) -> dict:
        """What differs between the ranks of a data-parallel run: the sampler stream here,
        plus the replay buffer in SAC. Saved for every rank (see :meth:`on_save_checkpoint`)."""
        return {"sampler_rng": self.rng.get_state()}

    def load_rank_state(self, state: dict) -> None:
        if "sampler_rng" in state:
            self._pending_rng_state = state["sampler_rng"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Shared counters once, and :meth:`rank_state` of every rank as ``rl_state["ranks"]``.

        Lightning builds the checkpoint on every rank and rank 0 writes it, so the per-rank
        states (replay buffers, sampler streams) are gathered to rank 0 first; without that a
        resumed multi-process run would give every rank rank 0's buffer."""
        super().on_save_checkpoint(checkpoint)
        mine = self.rank_state()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            ranks = [None] * world if self.global_rank == 0 else None
            torch.distributed.gather_object(mine, ranks, dst=0)
        else:
            ranks = [mine]
        checkpoint["rl_state"] = {"env_steps": self.env_steps, "train_seconds": self.train_seconds,
                                  "curve_steps": list(self.curve_steps),
                                  "curve_returns": list(self.curve_returns), "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rl_state", {})
        steps = [int(s) for s in state.get("curve_steps", [])]
        if len(self.curve_steps) > len(steps) and self.curve_steps[:len(steps)] == steps:
            # Testing the best checkpoint right after fit (zoo compare): the learning curve,
            # step count and speed describe the whole run, not the epoch the checkpoint is from.
            return
        ranks = state.get("ranks", [state])  # checkpoints before per-rank states: one, top level
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        if len(ranks) != world and rank == 0:
            print(f"zoo: the checkpoint holds the replay/sampler state of {len(ranks)} rank(s) and this run "
                  f"has {world}: rank r resumes rank r's state, ranks without one start a fresh buffer "
                  "and sampler stream", flush=True)
        if rank < len(ranks):
            self.load_rank_state(ranks[rank])
        self.env_steps = int(state.get("env_steps", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.curve_steps = steps
        self.curve_returns = [float(r) for r in state.get("curve_returns", [])]
