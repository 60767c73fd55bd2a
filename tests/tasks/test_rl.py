"""Tests of the RL task (PMOE-SAC / PMOE-PPO): math, estimators, buffer, checkpoints, learning."""
from __future__ import annotations

import importlib.util
import math
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from tasks.rl.buffer import ReplayBuffer
from tasks.rl.data import RLDataModule
from tasks.rl.estimators import estimate
from tasks.rl.metrics import curve_auc
from tasks.rl.model import (MixtureHead, MixturePolicy, gaussian_log_prob, mixture_log_prob,
                            tanh_log_det)
from tasks.rl.module import PPOModule, SACModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "rl"
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def trainer(tmp_path, epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


def small_policy(head="mixture", k=4) -> MixturePolicy:
    return MixturePolicy(3, 2, [-2.0, -1.0], [2.0, 1.0], head=head, hidden=16, num_components=k,
                         expert_hidden=8)


# ---------------------------------------------------------------------------------------------
# Mixture math
# ---------------------------------------------------------------------------------------------
def test_mixture_log_prob_matches_direct_computation():
    torch.manual_seed(0)
    B, K, A = 6, 3, 2
    mean, log_std = torch.randn(B, K, A), torch.randn(B, K, A) * 0.5
    logits, x = torch.randn(B, K), torch.randn(B, A)
    ours = mixture_log_prob(x, mean, log_std, logits)
    # direct: log sum_k alpha_k prod_d N(x_d; mu_kd, sigma_kd), one state and component at a time
    alpha = logits.softmax(-1)
    for b in range(B):
        dens = sum(alpha[b, k] * torch.distributions.Normal(mean[b, k], log_std[b, k].exp()).log_prob(x[b]).sum().exp()
                   for k in range(K))
        assert ours[b].item() == pytest.approx(math.log(dens.item()), abs=1e-5)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1))
    torch.testing.assert_close(ours, ref.log_prob(x), atol=1e-5, rtol=1e-5)


def test_squashed_component_log_prob_matches_change_of_variables():
    """log pi(a) of a = s tanh(u) + b equals the Normal log-density minus log|da/du| (1-D, numeric)."""
    mean, log_std, scale = torch.tensor([[0.3]]), torch.tensor([[-0.5]]), torch.tensor([2.0])
    u = torch.tensor([[0.7]])
    ours = gaussian_log_prob(u, mean, log_std) - tanh_log_det(u, scale)
    eps = 1e-4
    da_du = (scale * torch.tanh(u + eps) - scale * torch.tanh(u - eps)) / (2 * eps)
    direct = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum() - torch.log(da_du).sum()
    assert ours.item() == pytest.approx(direct.item(), abs=1e-3)


def test_dense_baseline_has_equal_active_params():
    for k, eh in ((4, 32), (5, 64)):
        moe = MixturePolicy(17, 6, [-1.0] * 6, [1.0] * 6, head="mixture", hidden=64, num_components=k, expert_hidden=eh)
        dense = MixturePolicy(17, 6, [-1.0] * 6, [1.0] * 6, head="gaussian", hidden=64, num_components=k, expert_hidden=eh)
        total = sum(p.numel() for p in moe.parameters())
        active = total - moe.head.inactive_param_count()
        dense_n = sum(p.numel() for p in dense.parameters())
        assert abs(active - dense_n) / active < 0.01, (active, dense_n)
        assert total > 1.5 * dense_n


def test_sparse_acting_path_equals_all_components():
    torch.manual_seed(1)
    pol = small_policy()
    obs = torch.randn(9, 3)
    params = pol.dist(obs)
    comp = params.logits.argmax(-1)
    expected = pol.to_env(params.mean[torch.arange(9), comp])
    torch.testing.assert_close(pol(obs), expected)
    action, u, chosen = pol.act(obs, deterministic=True)
    torch.testing.assert_close(action, expected)
    assert torch.equal(chosen, comp)


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------
def _estimator_inputs(pol, obs):
    params = pol.dist(obs)
    u = params.mean + params.log_std.exp() * torch.randn_like(params.mean)
    log_probs = gaussian_log_prob(u, params.mean, params.log_std) - tanh_log_det(u, pol.action_scale)
    return pol.to_env(u), log_probs, params.logits


def test_frequency_estimator_routes_gradient_only_to_best_component():
    torch.manual_seed(2)
    pol = small_policy(k=4)
    obs = torch.randn(1, 3)
    target = torch.tensor([1.5, -0.5])
    q_fn = lambda a: -((a - target) ** 2).sum(-1)  # noqa: E731  critic: closeness to a target action
    actions, log_probs, logits = _estimator_inputs(pol, obs)
    est = estimate("frequency", actions, log_probs, logits, q_fn)
    best = int(q_fn(actions.detach()).argmax(-1))
    assert int(est.choice) == best
    (0.2 * est.log_prob - est.q).mean().backward(retain_graph=True)
    experts = pol.head.experts
    for e in range(4):
        grads = [experts.w1.grad[e], experts.b1.grad[e], experts.w2.grad[e], experts.b2.grad[e]]
        norm = sum(float(g.abs().sum()) for g in grads)
        assert (norm > 0) if e == best else (norm == 0.0), (e, best, norm)
    assert pol.head.router.gate.weight.grad is None or float(pol.head.router.gate.weight.grad.abs().sum()) == 0
    # the mixing loss (MSE to the one-hot of the best) moves alpha(s) toward the best component
    pol.zero_grad()
    alpha_before = logits.softmax(-1)[0, best].item()
    est.mix_loss.backward()
    with torch.no_grad():
        for p in pol.parameters():
            if p.grad is not None:
                p -= 1.0 * p.grad
    assert pol.dist(obs).logits.softmax(-1)[0, best].item() > alpha_before


@pytest.mark.parametrize("name", ["gumbel", "reinforce"])
def test_baseline_estimators_train_the_mixing_weights(name):
    torch.manual_seed(3)
    pol = small_policy(k=3)
    obs = torch.randn(32, 3)
    q_fn = lambda a: -(a ** 2).sum(-1)  # noqa: E731
    actions, log_probs, logits = _estimator_inputs(pol, obs)
    est = estimate(name, actions, log_probs, logits, q_fn, temperature=0.1)
    assert est.q.shape == (32,) and est.log_prob.shape == (32,) and est.choice.shape == (32,)
    loss = (0.1 * est.log_prob - est.q).mean() + est.mix_loss
    loss.backward()
    assert float(pol.head.router.gate.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="estimator"):
        estimate("straight", actions, log_probs, logits, q_fn)


# ---------------------------------------------------------------------------------------------
# Replay buffer, metrics, data
# ---------------------------------------------------------------------------------------------
def test_replay_buffer_keeps_and_samples_what_it_stored():
    buf = ReplayBuffer(5, obs_dim=2, act_dim=1, seed=0)
    for t in range(7):  # wraps: transitions 2..6 remain
        buf.add(np.full((1, 2), t), np.full((1, 1), -t), [10.0 * t], np.full((1, 2), t + 1), [t % 2])
    assert len(buf) == 5
    batch = buf.sample(200)
    stored = set(range(2, 7))
    ts = batch["obs"][:, 0].long().tolist()
    assert set(ts) == stored  # every stored transition is sampled, nothing overwritten comes back
    for i, t in enumerate(ts):
        assert batch["actions"][i, 0] == -t and batch["rewards"][i] == 10.0 * t
        assert batch["next_obs"][i, 0] == t + 1 and batch["terminated"][i] == t % 2
    clone = ReplayBuffer(5, 2, 1, seed=123)
    clone.load_state_dict(buf.state_dict())
    a, b = buf.sample(16), clone.sample(16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(4, 2, 1).load_state_dict(buf.state_dict())


def test_curve_auc():
    assert curve_auc([0, 10, 20], [0.0, 10.0, 10.0]) == pytest.approx(7.5)
    assert curve_auc([5], [-3.0]) == -3.0
    assert math.isnan(curve_auc([], []))
    with pytest.raises(ValueError, match="increasing"):
        curve_auc([0, 0], [1.0, 2.0])


def test_bad_env_ids_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown gymnasium environment 'Pendulm-v1'.*Pendulum-v1"):
        RLDataModule("Pendulm-v1")
    with pytest.raises(ValueError, match="discrete"):
        RLDataModule("CartPole-v1")
    with pytest.raises(ValueError, match="cannot import module"):
        RLDataModule("no_such_module_xyz:Thing-v0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RLDataModule("Pendulum-v1", root=str(tmp_path / "missing.py"))


def test_user_environment_from_module_id_and_root_file(tmp_path, monkeypatch):
    src = textwrap.dedent("""
        import gymnasium as gym
        from gymnasium.envs.classic_control.pendulum import PendulumEnv
        if "ZooTestPendulum-v0" not in gym.registry:
            gym.register("ZooTestPendulum-v0", entry_point=PendulumEnv, max_episode_steps=20)
    """)
    (tmp_path / "zoo_user_envs.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    dm = RLDataModule("zoo_user_envs:ZooTestPendulum-v0")
    assert dm.env_id == "ZooTestPendulum-v0" and dm.obs_dim == 3 and dm.act_dim == 1
    (tmp_path / "other_envs.py").write_text(src.replace("ZooTestPendulum", "ZooTestPendulumRoot"))
    dm = RLDataModule("ZooTestPendulumRoot-v0", root=str(tmp_path / "other_envs.py"))
    assert dm.env_id == "ZooTestPendulumRoot-v0"
    sys.modules.pop("zoo_user_envs", None)


def test_configs_differ_only_in_model_head():
    pairs = [("pmoe_sac", "sac"), ("pmoe_ppo", "ppo")]
    for env in ("halfcheetah", "hopper"):
        pairs += [(f"{env}_pmoe_sac", f"{env}_sac"), (f"{env}_pmoe_ppo", f"{env}_ppo")]
    for moe_name, dense_name in pairs:
        moe = yaml.safe_load((CONFIGS / f"{moe_name}.yaml").read_text())
        dense = yaml.safe_load((CONFIGS / f"{dense_name}.yaml").read_text())
        assert moe["model"]["init_args"].pop("head") == "mixture"
        assert dense["model"]["init_args"].pop("head") == "gaussian"
        assert moe == dense, moe_name


# ---------------------------------------------------------------------------------------------
# Training, checkpoints
# ---------------------------------------------------------------------------------------------
def tiny_sac(**kw) -> SACModule:
    args = dict(hidden=32, expert_hidden=16, critic_hidden=32, batch_size=32, learning_starts=50, buffer_size=1000)
    args.update(kw)
    return SACModule(**args)


def test_checkpoint_reload_reproduces_actions_and_buffer(tmp_path):
    L.seed_everything(0)
    dm = RLDataModule("Pendulum-v1", steps_per_batch=10, steps_per_epoch=60, eval_episodes=1,
                      test_episodes=1, max_episode_steps=30)
    model = tiny_sac()
    model.on_data(dm)
    tr = trainer(tmp_path, epochs=2)
    tr.fit(model, dm)
    assert model.env_steps == 120 and len(model.buffer) == 120 and model.updates == 71
    assert model.curve_steps == [0, 60, 120]
    path = tmp_path / "rl.ckpt"
    tr.save_checkpoint(path)
    loaded = SACModule.load_from_checkpoint(path, weights_only=True)
    obs = torch.randn(16, 3)
    torch.testing.assert_close(loaded(obs), model(obs))
    torch.manual_seed(7)
    a1 = loaded.model.act(obs)[0]
    torch.manual_seed(7)
    a2 = model.model.act(obs)[0]
    torch.testing.assert_close(a1, a2)
    assert len(loaded.buffer) == 120 and loaded.env_steps == 120 and loaded.updates == 71
    np.testing.assert_array_equal(loaded.buffer.obs, model.buffer.obs)
    assert loaded.curve_returns == model.curve_returns
    routing = tr.callback_metrics
    assert "routing/head/entropy" in routing


def test_ppo_rollout_log_probs_match_update_and_run(tmp_path):
    L.seed_everything(0)
    dm = RLDataModule("Pendulum-v1", num_envs=2, steps_per_batch=128, steps_per_epoch=128, eval_episodes=1,
                      test_episodes=2, max_episode_steps=40)
    model = PPOModule(num_components=3, num_minibatches=4, update_epochs=2)
    model.on_data(dm)
    tr = trainer(tmp_path, epochs=1)
    tr.fit(model, dm)  # one rollout + update
    assert model.env_steps == 128 and model.iterations == 1
    # the stored behaviour log-probs are the full-mixture likelihood the ratio uses: ratio == 1 before updating
    dm.setup("fit")
    model._obs = None
    with torch.no_grad():
        roll = model.collect(8)
        o, u = roll["obs"].reshape(-1, 3), roll["u"].reshape(-1, 1)
        torch.testing.assert_close(mixture_log_prob(u, *model._params(o)), roll["logp"].reshape(-1))
    assert torch.isfinite(roll["advantages"]).all()
    metrics = tr.test(model, dm, verbose=False)[0]
    for key in ("test/return_mean", "test/return_std", "test/curve_auc", "test/steps_per_s"):
        assert math.isfinite(metrics[key]), key
    assert -16.3 * 40 <= metrics["test/return_mean"] <= 0  # Pendulum reward is in [-16.3, 0]


def random_policy_return(dm: RLDataModule, seeds) -> float:
    rng = np.random.default_rng(0)
    total = []
    for s in seeds:
        env = dm.make_env()
        env.reset(seed=int(s))
        env.action_space.seed(int(rng.integers(1 << 30)))
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            ret += r
            done = term or trunc
        total.append(ret)
    return float(np.mean(total))


def test_pmoe_sac_learns_pendulum_beyond_random(tmp_path):
    """~3k env steps of PMOE-SAC on Pendulum beat the uniform-random policy by > 200 return.

    Repeated runs of this exact test gave -437, -780 and -839 against random -1209 (the run is
    not bit-reproducible across processes yet, see tasks/rl/README.md), so the margin is 200."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = RLDataModule("Pendulum-v1", steps_per_batch=25, steps_per_epoch=1500, eval_episodes=2, test_episodes=5)
    model = SACModule(hidden=64, expert_hidden=32, critic_hidden=64, batch_size=64, learning_starts=500,
                      buffer_size=5000)
    model.on_data(dm)
    tr = trainer(tmp_path, epochs=2)
    tr.fit(model, dm)
    metrics = tr.test(model, dm, verbose=False)[0]
    random_return = random_policy_return(dm, dm.test_dataloader().dataset.seeds)
    assert metrics["test/return_mean"] > random_return + 200, (metrics, random_return)
    assert isinstance(model.model.head, MixtureHead)
    assert (tmp_path / "pendulum_components.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="mujoco extra not installed")
@pytest.mark.parametrize("cfg", ["halfcheetah_pmoe_sac", "hopper_pmoe_ppo"])
def test_mujoco_configs_build_and_step(cfg, tmp_path):
    conf = yaml.safe_load((CONFIGS / f"{cfg}.yaml").read_text())
    data_args = dict(conf["data"]["init_args"], steps_per_batch=64 if "ppo" in cfg else 1,
                     steps_per_epoch=64, eval_episodes=1, test_episodes=1, max_episode_steps=30)
    dm = RLDataModule(**data_args)
    model_args = dict(conf["model"]["init_args"], hidden=32, expert_hidden=16, critic_hidden=32)
    if "sac" in cfg:
        model_args.update(learning_starts=32, batch_size=16, buffer_size=200)
        model = SACModule(**model_args)
    else:
        model_args.update(num_minibatches=2, update_epochs=1)
        model = PPOModule(**model_args)
    model.on_data(dm)
    tr = trainer(tmp_path, epochs=1)
    tr.fit(model, dm)
    assert model.env_steps == 64
    assert torch.isfinite(model(torch.zeros(2, dm.obs_dim))).all()
