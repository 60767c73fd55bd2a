"""PPO with a PMOE Gaussian-mixture actor (Ren et al. 2021, the on-policy variant), CleanRL style.

One ``training_step`` = one rollout of ``data.steps_per_batch`` environment steps (``num_envs``
parallel envs) followed by ``update_epochs`` passes of minibatch updates (Schulman et al. 2017;
CleanRL ``ppo_continuous_action.py``):

- acting: k ~ Cat(alpha(s)), u ~ N(mu_k(s), sigma_k); the env gets clip(u) (CleanRL's ClipAction).
- log pi(u|s) is the full mixture log-likelihood ``log sum_k alpha_k N(u; mu_k, sigma_k)``
  (the GMM density), used in the ratio ``r = exp(log pi_new - log pi_old)``.
- advantages: GAE(gamma, lambda) (Schulman et al. 2016) on normalised rewards; time-limit
  truncation bootstraps with gamma V(s_final) instead of cutting the return.
- loss = clipped surrogate + vf_coef * clipped value loss - ent_coef * H_bound
  (+ PMOE: q_loss + mix_weight * mix_loss). H_bound = H(alpha) + sum_k alpha_k H(N_k), an upper
  bound on the mixture entropy (no closed form); ent_coef defaults to 0 as in CleanRL.
- PMOE ranking (``estimator: frequency``): a critic Q(s, u), trained by MSE toward the GAE
  returns of the taken actions, scores one sampled action per component; the mixing weights
  are trained by MSE toward the one-hot of the best component, as in the PMOE-PPO code.
  The baselines of the paper train the mixing weights against the same critic instead:
  ``gumbel`` maximises Q of a straight-through Gumbel-softmax choice (pathwise gradient into
  the logits), ``reinforce`` uses the score function -log alpha_k(s) (Q_k - sum_j alpha_j Q_j)
  with k ~ Cat(alpha) (see estimators.py). ``likelihood`` drops the term (mixing weights
  learn from the ratio alone). The ranking critic is frozen inside the mixing loss: it
  learns only from its own regression.

Observations are normalised by a running mean/std kept in the actor (saved with it) and
rewards by the running std of the discounted return (CleanRL's NormalizeObservation and
NormalizeReward wrappers, clipped to [-10, 10]); unlike the wrappers, both statistics are
updated once per rollout, so one rollout is normalised consistently.

``head: gaussian`` is CleanRL PPO with one Gaussian of the same active parameter count.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from zoo.moe import aux_loss

from .base import RLModule
from .estimators import estimate
from .model import (RunningNorm, SoftQNetwork, ValueNetwork, mixture_log_prob, orthogonal_init,
                    randn_like)

PPO_ESTIMATORS = ("frequency", "gumbel", "reinforce", "likelihood")


class PPOModule(RLModule):
    """PMOE-PPO (``head: mixture``) and PPO (``head: gaussian``).

    Args:
        head, num_components (PMOE-PPO default 5), estimator (frequency | gumbel | reinforce |
            likelihood), mix_weight, gumbel_tau.
        hidden, trunk_layers, expert_hidden: actor trunk and per-component MLP sizes (tanh).
        critic_hidden: width of V and of the ranking critic Q.
        learning_rate, anneal_lr, gamma, gae_lambda, num_minibatches, update_epochs, norm_adv,
        clip_coef, clip_vloss, ent_coef, vf_coef, max_grad_norm, target_kl: CleanRL PPO knobs.
        normalize_obs, normalize_reward: running normalisation of observations / rewards.
        init_log_std: initial log-std of every component.
    """

    def __init__(self, head: str = "mixture", num_components: int = 5, estimator: str = "frequency",
                 mix_weight: float = 1.0, gumbel_tau: float = 1.0, hidden: int = 64, trunk_layers: int = 1, expert_hidden: int = 64,
                 router: str = "topk", critic_hidden: int = 64, learning_rate: float = 3e-4,
                 anneal_lr: bool = True, gamma: float = 0.99, gae_lambda: float = 0.95,
                 num_minibatches: int = 32, update_epochs: int = 10, norm_adv: bool = True,
                 clip_coef: float = 0.2, clip_vloss: bool = True, ent_coef: float = 0.0,
                 vf_coef: float = 0.5, max_grad_norm: float = 0.5, target_kl: float | None = None,
                 normalize_obs: bool = True, normalize_reward: bool = True, init_log_std: float = 0.0,
                 obs_dim: int | None = None, act_dim: int | None = None, action_low: list | None = None,
                 action_high: list | None = None):
        super().__init__()
        if estimator not in PPO_ESTIMATORS:
            raise ValueError(f"model.estimator for PPO must be one of {PPO_ESTIMATORS}, got {estimator!r}")
        self.save_hyperparameters()
        self.iterations = 0
        self._disc_return: np.ndarray | None = None  # running discounted return per env (reward scaling)
        if self._spaces_known():
            self.build_networks()

    def build_networks(self) -> None:
        hp = self.hparams
        self.model = self.build_policy(activation="tanh", squash=False, state_dependent_std=False,
                                       normalize_obs=hp.normalize_obs, out_scale=0.01,
                                       init_log_std=hp.init_log_std)
        orthogonal_init(self.model.trunk)
        self.value = ValueNetwork(hp.obs_dim, hp.critic_hidden)
        orthogonal_init(self.value, out_gain=1.0)
        # PMOE's ranking critic Q(s, u); the dense baseline and the likelihood-only variant need none
        self.qf = (SoftQNetwork(hp.obs_dim, hp.act_dim, hp.critic_hidden, activation="tanh")
                   if self.ranks_components else None)
        self.return_norm = RunningNorm(1, enabled=hp.normalize_reward)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, eps=1e-5, fused=True)

    # ---- rollout ---------------------------------------------------------------------------------
    def scale_rewards(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """Rollout rewards [T, N] / std(discounted return), clipped to [-10, 10] (NormalizeReward).

        The running return statistics are updated with the whole rollout first, so every reward
        of one rollout is scaled by the same std."""
        if not self.hparams.normalize_reward:
            return rewards
        returns = np.empty_like(rewards)
        for t in range(rewards.shape[0]):
            self._disc_return = self._disc_return * self.hparams.gamma + rewards[t]
            returns[t] = self._disc_return
            self._disc_return = np.where(dones[t], 0.0, self._disc_return)
        self.return_norm.update(self.all_ranks(torch.as_tensor(returns, dtype=torch.float32).reshape(-1, 1)))
        return np.clip(rewards / math.sqrt(float(self.return_norm.var[0]) + 1e-8), -10.0, 10.0)

    @torch.no_grad()
    def collect(self, steps: int) -> dict[str, torch.Tensor]:
        """Roll the behaviour policy for ``steps`` vector steps; returns tensors [T, N, ...].

        The observation statistics are frozen during a rollout and updated with all of its
        observations at the end (of every rank, under a multi-process strategy, so all ranks keep
        the same statistics), so stored normalised observations and log-probs agree."""
        hp = self.hparams
        env = self.datamodule.train_env
        n = env.num_envs
        if self._obs is None:
            self._obs = self.reset_train_env()
            self.model.obs_norm.update(self.all_ranks(torch.as_tensor(self._obs)))
            self._disc_return = np.zeros(n)
        rows = torch.arange(n, device=self.device)
        raw_obs, obs_n, raw_u, logps, values = [], [], [], [], []
        rewards, dones, bootstrap = np.zeros((steps, n)), np.zeros((steps, n), bool), np.zeros((steps, n))
        for t in range(steps):
            o = self.model.obs_norm(torch.as_tensor(self._obs, dtype=torch.float32, device=self.device))  # [N, O]
            mean, log_std, logits = self._params(o)                                 # [N, K, A] x2, [N, K]
            k = torch.multinomial(logits.softmax(-1), 1, generator=self.rng).squeeze(1)  # [N] ~ Cat(alpha)
            u = mean[rows, k] + log_std[rows, k].exp() * randn_like(mean[:, 0], self.rng)  # [N, A]
            logp = mixture_log_prob(u, mean, log_std, logits)                       # [N] full mixture
            v = self.value(o)                                                       # [N]
            real_next, next_obs, reward, terminated, done = self.step_train_env(
                self.model.to_env(u).cpu().numpy())
            truncated = done & ~terminated
            if truncated.any():  # bootstrap through time limits: r += gamma V(s_final)
                final = self.model.obs_norm(torch.as_tensor(real_next[truncated], dtype=torch.float32,
                                                            device=self.device))
                bootstrap[t, truncated] = hp.gamma * self.value(final).cpu().numpy()
            rewards[t], dones[t] = reward, done
            raw_obs.append(next_obs), obs_n.append(o), raw_u.append(u), logps.append(logp), values.append(v)
            self._obs = next_obs
        next_value = self.value(self.model.obs_norm(torch.as_tensor(self._obs, dtype=torch.float32,
                                                                    device=self.device)))
        self.model.obs_norm.update(self.all_ranks(torch.as_tensor(np.stack(raw_obs))))  # [W T, N, O]
        scaled = self.scale_rewards(rewards, dones) + bootstrap
        roll = {"obs": torch.stack(obs_n), "u": torch.stack(raw_u), "logp": torch.stack(logps),
                "values": torch.stack(values),
                "rewards": torch.as_tensor(scaled, dtype=torch.float32, device=self.device),
                "dones": torch.as_tensor(dones, dtype=torch.float32, device=self.device)}
        roll["advantages"] = self.gae(roll["rewards"], roll["values"], roll["dones"], next_value)
        roll["returns"] = roll["advantages"] + roll["values"]
        return roll

    def _params(self, obs_n: torch.Tensor):
        p = self.model.dist(obs_n, normalized=True)
        return p.mean, p.log_std, p.logits

    def gae(self, rewards, values, dones, next_value) -> torch.Tensor:
        """GAE: A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} (1-d_t) - V_t.

        rewards/values/dones [T, N] with dones[t] = episode ended at step t; next_value [N]."""
        hp = self.hparams
        adv = torch.zeros_like(rewards)
        last = torch.zeros_like(next_value)
        for t in reversed(range(rewards.shape[0])):
            nonterminal = 1.0 - dones[t]
            nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
            delta = rewards[t] + hp.gamma * nxt * nonterminal - values[t]
            last = delta + hp.gamma * hp.gae_lambda * nonterminal * last
            adv[t] = last
        return adv

    # ---- losses ----------------------------------------------------------------------------------
    @property
    def ranks_components(self) -> bool:
        """PMOE-PPO with a ranking critic (every estimator except ``likelihood``)."""
        return self.hparams.head == "mixture" and self.hparams.estimator != "likelihood"

    def mixing_loss(self, obs_n: torch.Tensor, mean, log_std, logits) -> torch.Tensor:
        """Train alpha(s) against the ranking critic: one sampled action per component [B, K, A]
        (detached: the components learn from the surrogate), scored by a frozen Q, fed to the
        configured estimator (frequency: MSE to the best one-hot; gumbel: -Q of the straight-
        through choice; reinforce: score-function loss)."""
        hp = self.hparams
        cand = (mean + log_std.exp() * randn_like(mean, self.rng)).detach()      # [B, K, A]
        frozen = {name: p.detach() for name, p in self.qf.named_parameters()}
        q_fn = lambda a: torch.func.functional_call(self.qf, frozen, (obs_n, a))  # noqa: E731  [B, M]
        est = estimate(hp.estimator, cand, cand.new_zeros(cand.shape[:2]), logits, q_fn,
                       gumbel_tau=hp.gumbel_tau, generator=self.rng)
        return -est.q.mean() if hp.estimator == "gumbel" else est.mix_loss

    @staticmethod
    def entropy_bound(log_std, logits) -> torch.Tensor:
        """H(alpha) + sum_k alpha_k H(N_k) >= H(mixture); [B]."""
        alpha = logits.softmax(-1)
        comp_h = (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)  # [B, K]
        cat_h = -(alpha * F.log_softmax(logits, -1)).sum(-1)
        return cat_h + (alpha * comp_h).sum(-1)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        t0 = time.perf_counter()
        opt = self.optimizers()
        env = self.datamodule.train_env
        total_iters = max(self.trainer.max_epochs * self.trainer.num_training_batches, 1)
        if hp.anneal_lr:
            for g in opt.param_groups:
                g["lr"] = hp.learning_rate * max(1.0 - self.iterations / total_iters, 0.0)
        roll = self.collect(len(batch) // env.num_envs)
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in roll.items()}  # [T*N, ...]
        size = flat["obs"].shape[0]
        mb = max(size // hp.num_minibatches, 1)
        use_mix = self.ranks_components
        clipfracs = []
        for _ in range(hp.update_epochs):
            perm = torch.randperm(size, generator=self.rng, device=self.device)
            for start in range(0, size, mb):
                idx = perm[start:start + mb]
                obs_n, u = flat["obs"][idx], flat["u"][idx]
                mean, log_std, logits = self._params(obs_n)
                new_logp = mixture_log_prob(u, mean, log_std, logits)  # full mixture likelihood
                log_ratio = new_logp - flat["logp"][idx]
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clipfracs.append(((ratio - 1).abs() > hp.clip_coef).float().mean())
                adv = flat["advantages"][idx]
                if hp.norm_adv and adv.numel() > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - hp.clip_coef, 1 + hp.clip_coef)).mean()
                new_v = self.value(obs_n)
                ret, old_v = flat["returns"][idx], flat["values"][idx]
                if hp.clip_vloss:
                    v_clipped = old_v + (new_v - old_v).clamp(-hp.clip_coef, hp.clip_coef)
                    v_loss = 0.5 * torch.max((new_v - ret) ** 2, (v_clipped - ret) ** 2).mean()
                else:
                    v_loss = 0.5 * ((new_v - ret) ** 2).mean()
                entropy = self.entropy_bound(log_std, logits).mean()
                loss = pg_loss - hp.ent_coef * entropy + hp.vf_coef * v_loss
                if use_mix:
                    q_loss = F.mse_loss(self.qf(obs_n, u), ret)
                    mix_loss = self.mixing_loss(obs_n, mean, log_std, logits)
                    loss = loss + q_loss + hp.mix_weight * mix_loss
                moe_aux = aux_loss(self.model)  # zero for PMOE (no balance loss)
                self.manual_step(loss + moe_aux, opt, max_grad_norm=hp.max_grad_norm)
            if hp.target_kl is not None and approx_kl > hp.target_kl:
                break
        self.iterations += 1
        self.train_seconds += time.perf_counter() - t0
        logs = {"train/pg_loss": pg_loss.detach(), "train/v_loss": v_loss.detach(), "train/approx_kl": approx_kl,
                "train/clipfrac": torch.stack(clipfracs).mean(), "train/entropy_bound": entropy.detach(),
                "train/lr": opt.param_groups[0]["lr"], "train/aux_loss": moe_aux.detach()}
        if use_mix:
            logs.update({"train/q_loss": q_loss.detach(), "train/mix_loss": mix_loss.detach()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(batch))

    # ---- checkpoint --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rl_state"]["iterations"] = self.iterations

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rl_state", {})
        self.iterations = int(state.get("iterations", 0))
