"""Gradient estimators for the discrete component choice of a Gaussian-mixture actor.

All three take the K reparameterised candidate actions of a state (one per component), their
per-component log-probabilities, the mixing logits and a critic ``q_fn``, and return the
Q-value and log-probability the actor loss ``alpha * log_pi - Q`` is built from, plus the loss
that trains the mixing weights.

- ``frequency`` (PMOE's "frequency approximate gradient", Ren et al. 2021): score every candidate with the critic
  (min of the twin Q), back-propagate the actor loss only through the best one, and train
  alpha(s) by MSE toward the one-hot of the best component (the "frequency approximation" of
  the gradient of the mixing weights: alpha_k(s) -> P(component k is the best at s)).
- ``gumbel`` (Jang et al. 2017): a straight-through hard Gumbel-softmax sample w [B, K] picks
  the action ``sum_k w_k a_k``; gradients reach the logits through the relaxed sample.
- ``reinforce`` (score function, Williams 1992): sample k ~ Cat(alpha); the continuous part is
  reparameterised through component k, the logits get ``-log alpha_k(s) * A_k`` with the
  advantage ``A_k = (Q_k - t log pi_k) - sum_j alpha_j (Q_j - t log pi_j)`` (baseline: the
  alpha-weighted mean over components, so the estimator stays unbiased).

SAC uses all three for its actor loss. PMOE-PPO uses them only to train the mixing weights
against its ranking critic (candidates detached, log-probabilities zero; see
``PPOModule.mixing_loss``): ``frequency`` -> MSE to the best one-hot, ``gumbel`` -> ``-Q`` of
the straight-through choice, ``reinforce`` -> the score-function loss.

Every random draw comes from the ``generator`` passed in (the module's own, checkpointed one).

Shapes: B states, K components, A action dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ESTIMATORS = ("frequency", "gumbel", "reinforce")


@dataclass
class EstimatorOut:
    q: torch.Tensor          # [B] critic value of the action the actor loss uses
    log_prob: torch.Tensor   # [B] log-probability of that action under its component
    mix_loss: torch.Tensor   # scalar, loss that trains the mixing logits
    choice: torch.Tensor     # [B] long, the component used


def frequency_estimator(actions: torch.Tensor, log_probs: torch.Tensor, logits: torch.Tensor,
                        q_fn: Callable[[torch.Tensor], torch.Tensor]) -> EstimatorOut:
    """PMOE: actions [B, K, A], log_probs [B, K], logits [B, K]; q_fn([B, K, A]) -> [B, K]."""
    q_all = q_fn(actions)                                  # [B, K]
    best = q_all.detach().argmax(-1)                       # [B]
    q = q_all.gather(1, best[:, None]).squeeze(1)          # [B], gradient via a_best only
    log_prob = log_probs.gather(1, best[:, None]).squeeze(1)
    target = F.one_hot(best, logits.shape[-1]).to(logits.dtype)
    mix_loss = F.mse_loss(logits.softmax(-1), target)
    return EstimatorOut(q, log_prob, mix_loss, best)


def straight_through_gumbel(logits: torch.Tensor, tau: float = 1.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard one-hot sample of Cat(softmax(logits)) [B, K] whose gradient is that of the relaxed
    sample softmax((logits + g) / tau), g ~ Gumbel(0, 1) (Jang et al. 2017, straight-through)."""
    exp_noise = torch.empty_like(logits).exponential_(generator=generator)  # E ~ Exp(1); -log E ~ Gumbel
    soft = ((logits - exp_noise.log()) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def gumbel_estimator(actions: torch.Tensor, log_probs: torch.Tensor, logits: torch.Tensor,
                     q_fn: Callable[[torch.Tensor], torch.Tensor], tau: float = 1.0,
                     generator: torch.Generator | None = None) -> EstimatorOut:
    """Straight-through Gumbel-softmax over components (hard one-hot forward, soft backward)."""
    w = straight_through_gumbel(logits, tau, generator)    # [B, K]
    action = (w.unsqueeze(-1) * actions).sum(1)            # [B, A] equals one candidate
    q = q_fn(action.unsqueeze(1)).squeeze(1)               # [B]
    log_prob = (w * log_probs).sum(1)                      # [B]
    return EstimatorOut(q, log_prob, logits.new_zeros(()), w.argmax(-1))


def reinforce_estimator(actions: torch.Tensor, log_probs: torch.Tensor, logits: torch.Tensor,
                        q_fn: Callable[[torch.Tensor], torch.Tensor], temperature: float,
                        generator: torch.Generator | None = None) -> EstimatorOut:
    """Score-function gradient for the mixing weights with an alpha-weighted baseline."""
    q_all = q_fn(actions)                                             # [B, K]
    choice = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator).squeeze(1)  # [B] ~ Cat(alpha)
    q = q_all.gather(1, choice[:, None]).squeeze(1)
    log_prob = log_probs.gather(1, choice[:, None]).squeeze(1)
    soft_value = (q_all - temperature * log_probs).detach()           # [B, K]
    probs = logits.softmax(-1)
    advantage = soft_value.gather(1, choice[:, None]).squeeze(1) - (probs.detach() * soft_value).sum(1)
    log_alpha = F.log_softmax(logits, -1).gather(1, choice[:, None]).squeeze(1)
    mix_loss = -(log_alpha * advantage).mean()
    return EstimatorOut(q, log_prob, mix_loss, choice)


def estimate(name: str, actions, log_probs, logits, q_fn, temperature: float = 0.0,
             gumbel_tau: float = 1.0, generator: torch.Generator | None = None) -> EstimatorOut:
    """Dispatch on the config key ``model.estimator``; ``generator`` owns the random draws."""
    if name == "frequency":
        return frequency_estimator(actions, log_probs, logits, q_fn)
    if name == "gumbel":
        return gumbel_estimator(actions, log_probs, logits, q_fn, tau=gumbel_tau, generator=generator)
    if name == "reinforce":
        return reinforce_estimator(actions, log_probs, logits, q_fn, temperature, generator=generator)
    raise ValueError(f"model.estimator must be one of {ESTIMATORS}, got {name!r}")
