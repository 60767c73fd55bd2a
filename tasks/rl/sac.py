"""Soft Actor-Critic with a PMOE Gaussian-mixture actor (Ren et al. 2021), CleanRL style.

One ``training_step`` handles ``data.steps_per_batch`` environment steps; for each step:
act (uniform random before ``learning_starts``, else component k ~ Cat(alpha(s)) and a ~ pi_k),
store the transition, then one gradient update (Haarnoja et al. 2018, Alg. 1; CleanRL
``sac_continuous_action.py``):

1. critic:  y = r + gamma (1 - d) [min_j Q'_j(s', a') - t log pi_k'(a'|s')],  a' from the
   behaviour policy at s' and log pi_k' the log-density of the component that produced it
   (PMOE's entropy convention); loss = sum_j MSE(Q_j(s, a), y).
2. actor (every ``policy_frequency`` steps, ``policy_frequency`` times): one reparameterised
   candidate per component, a_k = tanh(mu_k + sigma_k eps) [B, K, A]; the estimator
   (``frequency`` = PMOE, ``gumbel``, ``reinforce``, see estimators.py) picks what the loss
   ``t log pi - min_j Q_j`` uses and trains the mixing weights.
3. temperature: loss = -log t (log pi + target_entropy), target_entropy = -A.
4. targets: Polyak average with ``tau`` every ``target_network_frequency`` steps.

``head: gaussian`` turns this into plain SAC with a single Gaussian of equal active params.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from zoo.moe import aux_loss

from .base import RLModule
from .buffer import ReplayBuffer
from .estimators import ESTIMATORS, estimate
from .model import SoftQNetwork, gaussian_log_prob, randn_like, tanh_log_det


class SACModule(RLModule):
    """PMOE-SAC (``head: mixture``) and SAC (``head: gaussian``).

    Args:
        head: "mixture" (PMOE) or "gaussian" (dense baseline).
        num_components: K mixture components / experts (PMOE default 4).
        estimator: gradient estimator for the component choice: frequency | gumbel | reinforce.
        mix_weight: weight of the mixing-weight loss (MSE to the best one-hot for frequency).
        gumbel_tau: Gumbel-softmax temperature.
        hidden, trunk_layers, expert_hidden: actor trunk width/depth and per-expert hidden width.
        router: zoo router producing the mixing logits.
        critic_hidden: width of the twin Q networks.
        buffer_size, batch_size, learning_starts, gamma, tau, policy_lr, q_lr, policy_frequency,
        target_network_frequency, autotune, alpha: SAC hyper-parameters as in CleanRL.
        save_buffer: keep the replay buffer in checkpoints (resumable training).
        log_every: log losses every this many gradient updates (Lightning's ``self.log`` costs
            more than a small SAC update, so logging each one would dominate the run time).
        obs_dim, act_dim, action_low, action_high: filled from the env by ``on_data``.
    """

    def __init__(self, head: str = "mixture", num_components: int = 4, estimator: str = "frequency",
                 mix_weight: float = 1.0, gumbel_tau: float = 1.0, hidden: int = 256, trunk_layers: int = 2,
                 expert_hidden: int = 64, router: str = "topk", critic_hidden: int = 256,
                 buffer_size: int = 1_000_000, batch_size: int = 256, learning_starts: int = 5000,
                 gamma: float = 0.99, tau: float = 0.005, policy_lr: float = 3e-4, q_lr: float = 1e-3,
                 policy_frequency: int = 2, target_network_frequency: int = 1, autotune: bool = True,
                 alpha: float = 0.2, save_buffer: bool = True, log_every: int = 100, obs_dim: int | None = None,
                 act_dim: int | None = None, action_low: list | None = None, action_high: list | None = None):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"model.estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.save_hyperparameters()
        self.updates = 0      # gradient updates done (critic steps)
        self._logged_at = 0   # value of `updates` at the last logged update
        if self._spaces_known():
            self.build_networks()

    def build_networks(self) -> None:
        hp = self.hparams
        self.model = self.build_policy(activation="relu", squash=True, state_dependent_std=True)
        self.qf1 = SoftQNetwork(hp.obs_dim, hp.act_dim, hp.critic_hidden)
        self.qf2 = SoftQNetwork(hp.obs_dim, hp.act_dim, hp.critic_hidden)
        self.qf1_target = copy.deepcopy(self.qf1).requires_grad_(False)
        self.qf2_target = copy.deepcopy(self.qf2).requires_grad_(False)
        self.log_alpha = torch.nn.Parameter(torch.tensor(float(np.log(hp.alpha))), requires_grad=hp.autotune)
        self.target_entropy = -float(hp.act_dim)
        self.buffer = ReplayBuffer(hp.buffer_size, hp.obs_dim, hp.act_dim)

    def configure_optimizers(self):
        hp = self.hparams
        # fused Adam: one kernel per step instead of ~10 per parameter (small nets are op-bound)
        q_opt = torch.optim.Adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=hp.q_lr, fused=True)
        actor_opt = torch.optim.Adam(self.model.parameters(), lr=hp.policy_lr, fused=True)
        alpha_opt = torch.optim.Adam([self.log_alpha], lr=hp.q_lr, fused=True)
        return [q_opt, actor_opt, alpha_opt]

    # ---- policy pieces -----------------------------------------------------------------------
    def sample_all_components(self, obs: torch.Tensor):
        """One reparameterised action per component: actions [B, K, A], log pi_k [B, K], logits [B, K]."""
        params = self.model.dist(obs)
        u = params.mean + params.log_std.exp() * randn_like(params.mean, self.rng)   # [B, K, A]
        log_probs = gaussian_log_prob(u, params.mean, params.log_std) - tanh_log_det(u, self.model.action_scale)
        return self.model.to_env(u), log_probs, params.logits

    def sample_behaviour(self, obs: torch.Tensor):
        """Behaviour-policy action at obs: k ~ Cat(alpha(s)), a ~ pi_k; -> a [B, A], log pi_k(a) [B]."""
        actions, log_probs, logits = self.sample_all_components(obs)
        k = torch.multinomial(logits.softmax(-1), 1, generator=self.rng).squeeze(1)  # [B] ~ Cat(alpha)
        idx = k[:, None]
        return actions.gather(1, idx[:, :, None].expand(-1, 1, actions.shape[-1])).squeeze(1), \
            log_probs.gather(1, idx).squeeze(1)

    def min_q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return torch.min(self.qf1(obs, actions), self.qf2(obs, actions))

    # ---- one gradient update ---------------------------------------------------------------------
    def update(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One critic (+ delayed actor and temperature) update; returns scalars to log."""
        hp = self.hparams
        q_opt, actor_opt, alpha_opt = self.optimizers()
        obs, actions, rewards = data["obs"], data["actions"], data["rewards"]
        next_obs, terminated = data["next_obs"], data["terminated"]
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():
            next_a, next_log_pi = self.sample_behaviour(next_obs)
            q_next = torch.min(self.qf1_target(next_obs, next_a), self.qf2_target(next_obs, next_a))
            target = rewards + hp.gamma * (1 - terminated) * (q_next - alpha * next_log_pi)  # [B]
        q1, q2 = self.qf1(obs, actions), self.qf2(obs, actions)
        qf_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.manual_step(qf_loss, q_opt)
        logs = {"train/qf_loss": qf_loss.detach(), "train/q1": q1.detach().mean()}

        if self.updates % hp.policy_frequency == 0:
            for _ in range(hp.policy_frequency):  # TD3-style delayed updates, compensated (CleanRL)
                cand, log_probs, logits = self.sample_all_components(obs)
                est = estimate(hp.estimator, cand, log_probs, logits, lambda a: self.min_q(obs, a),
                               temperature=float(alpha), gumbel_tau=hp.gumbel_tau, generator=self.rng)
                actor_loss = (alpha * est.log_prob - est.q).mean()
                if hp.head == "mixture":
                    actor_loss = actor_loss + hp.mix_weight * est.mix_loss
                moe_aux = aux_loss(self.model)  # zero for PMOE (no balance loss), kept for routers that add one
                self.manual_step(actor_loss + moe_aux, actor_opt)
                if hp.autotune:
                    alpha_loss = (-self.log_alpha.exp() * (est.log_prob.detach() + self.target_entropy)).mean()
                    self.manual_step(alpha_loss, alpha_opt)
                    alpha = self.log_alpha.exp().detach()
            logs.update({"train/actor_loss": actor_loss.detach(), "train/mix_loss": est.mix_loss.detach(),
                         "train/aux_loss": moe_aux.detach(),
                         "train/alpha": alpha, "train/log_pi": est.log_prob.detach().mean()})
            if hp.head == "mixture":
                usage = torch.bincount(est.choice, minlength=hp.num_components).float() / len(est.choice)
                logs["train/best_component_entropy"] = -(usage * usage.clamp_min(1e-12).log()).sum()

        if self.updates % hp.target_network_frequency == 0:
            with torch.no_grad():
                for net, tgt in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
                    for p, tp in zip(net.parameters(), tgt.parameters()):
                        tp.lerp_(p, hp.tau)
        self.updates += 1
        return logs

    # ---- environment interaction ------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        t0 = time.perf_counter()
        env = self.datamodule.train_env
        if self._obs is None:
            self._obs = self.reset_train_env()
        logs = None
        for _ in range(len(batch) // env.num_envs):
            if self.env_steps < hp.learning_starts:
                action = self.random_actions(env.num_envs)
            else:
                obs_t = torch.as_tensor(self._obs, dtype=torch.float32, device=self.device)
                action = self.model.act(obs_t, generator=self.rng)[0].cpu().numpy()
            real_next, next_obs, reward, terminated, _ = self.step_train_env(action)
            self.buffer.add(self._obs, action, reward, real_next, terminated)
            self._obs = next_obs
            if self.env_steps >= hp.learning_starts:
                step_logs = self.update(self.buffer.sample(hp.batch_size, device=self.device))
                if "train/actor_loss" in step_logs and self.updates - self._logged_at >= hp.log_every:
                    logs, self._logged_at = step_logs, self.updates
        self.train_seconds += time.perf_counter() - t0
        if logs:
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(batch))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if len(self.buffer) == 0:  # a fresh run (a resumed one restored the buffer and its sampler)
            self.buffer.rng = np.random.default_rng(self.derived_seed(2))

    # ---- checkpoint: replay buffer, update counter ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rl_state"]["updates"] = self.updates
        checkpoint["rl_state"]["logged_at"] = self._logged_at

    def rank_state(self) -> dict:
        state = super().rank_state()
        if self.hparams.save_buffer:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_rank_state(self, state: dict) -> None:
        super().load_rank_state(state)
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rl_state", {})
        self.updates = int(state.get("updates", 0))
        self._logged_at = int(state.get("logged_at", 0))
