"""Tests of the MoDE diffusion-policy task (tasks/diffusion_policy)."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from tasks.diffusion_policy.data import (ChunkDataset, DiffusionPolicyDataModule, generate_demonstrations,
                                         load_demonstrations, save_demonstrations)
from tasks.diffusion_policy.edm import (edm_loss, edm_scalings, exponential_sigmas, precondition,
                                        sample_ddim, sample_log_logistic)
from tasks.diffusion_policy.env import TASKS, MultiTask2DEnv, scripted_action
from tasks.diffusion_policy.metrics import evaluate_policy
from tasks.diffusion_policy.model import MoDEDenoiser, SwiGLUExperts, swiglu_params
from tasks.diffusion_policy.module import DiffusionPolicyModule
from zoo.flops import param_counts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # 2 shared cores: intra-op threads only add contention for these tiny models
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trainer(tmp_path, epochs, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kw)


def random_router(model: MoDEDenoiser, std: float = 2.0):
    """Give the routers sigma-dependent preferences (their last layer starts at zero)."""
    g = torch.Generator().manual_seed(1)
    for moe in model.moe_layers():
        w = moe.router.gate[2].weight
        w.data = torch.randn(w.shape, generator=g) * std


# ------------------------------------------------------------------------------ EDM closed forms
def gaussian_denoiser(mu, s):
    """Exact posterior mean for data N(mu, s^2): D*(x; sigma) = mu + s^2/(s^2+sigma^2) (x - mu)."""
    def d(x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return d


def test_edm_scalings_give_unit_variance_input_and_target():
    g = torch.Generator().manual_seed(0)
    sd = 0.5
    for sigma in (0.01, 0.5, 5.0, 80.0):
        y = torch.randn(200_000, generator=g) * sd
        x = y + sigma * torch.randn(200_000, generator=g)
        c_skip, c_out, c_in = edm_scalings(torch.tensor(sigma), sd)
        assert torch.isclose((c_in * x).std(), torch.tensor(1.0), atol=0.01)
        assert torch.isclose(((y - c_skip * x) / c_out).std(), torch.tensor(1.0), atol=0.01)
        # for N(0, sd^2) data the skip path alone is the exact posterior mean (F* = 0)
        assert torch.allclose(c_skip * x, gaussian_denoiser(0.0, sd)(x, torch.tensor([sigma])))


def test_preconditioned_optimal_network_matches_gaussian_posterior_and_minimises_loss():
    mu, s, sd = 0.3, 0.8, 0.5
    d_star = gaussian_denoiser(mu, s)

    def f_star(x_in, sigma, shift=0.0):  # the raw network that makes D exact: (D* - c_skip x) / c_out
        c_skip, c_out, c_in = (c.reshape(-1, 1) for c in edm_scalings(sigma, sd))
        x = x_in / c_in
        return (d_star(x, sigma) - c_skip * x) / c_out + shift

    g = torch.Generator().manual_seed(0)
    sigma = sample_log_logistic((4000,), generator=g)
    x = torch.randn(4000, 8, generator=g) * 3
    assert torch.allclose(precondition(f_star, x, sigma, sd), d_star(x, sigma), atol=1e-5)

    y = mu + s * torch.randn(4000, 8, generator=g)
    noise = torch.randn(4000, 8, generator=g)
    loss = edm_loss(f_star, y, sigma, noise, sd)
    c_out = edm_scalings(sigma, sd)[1]
    closed = (s ** 2 * sigma ** 2 / (s ** 2 + sigma ** 2) / c_out ** 2).mean()  # posterior var / c_out^2
    assert abs(float(loss) - float(closed)) / float(closed) < 0.05
    assert edm_loss(lambda a, b: f_star(a, b, shift=0.2), y, sigma, noise, sd) > loss + 0.03


def test_ddim_follows_the_probability_flow_ode_in_closed_form():
    mu, sigma_max = 0.7, 80.0
    x_t = torch.randn(256, 3, generator=torch.Generator().manual_seed(0)) * sigma_max
    # point mass: D = mu, the ODE solution x(sigma) = mu + sigma/sigma_max (x_T - mu) is hit exactly
    sig = exponential_sigmas(10, 1e-3, sigma_max)
    seen = []
    out = sample_ddim(lambda x, s, i: torch.full_like(x, mu), x_t.clone(), sig,
                      callback=lambda i, x, den: seen.append(x.clone()))
    for i, x in enumerate(seen):
        assert torch.allclose(x, mu + sig[i] / sigma_max * (x_t - mu), atol=1e-4)
    assert torch.allclose(out, torch.full_like(out, mu))
    # Gaussian N(mu, s^2): x(0) = mu + s / sqrt(s^2 + sigma_max^2) (x_T - mu)
    s = 0.4
    exact = mu + s / math.sqrt(s ** 2 + sigma_max ** 2) * (x_t - mu)
    err = {n: float((sample_ddim(lambda x, sg, i: gaussian_denoiser(mu, s)(x, sg), x_t.clone(),
                                 exponential_sigmas(n, 1e-3, sigma_max)) - exact).abs().max())
           for n in (100, 400)}
    assert err[400] < 0.01 * float(exact.abs().max())
    assert 3.0 < err[100] / err[400] < 5.0  # DDIM is a first-order solver: error ~ 1 / steps
    # 10 steps: each DDIM step is affine for a linear denoiser, x_{i+1} - mu = [r_i + (1 - r_i) a_i] (x_i - mu)
    # with r_i = sigma_{i+1} / sigma_i and a_i = s^2 / (s^2 + sigma_i^2)
    few = sample_ddim(lambda x, sg, i: gaussian_denoiser(mu, s)(x, sg), x_t.clone(), sig)
    sd = sig.double()
    r, a = sd[1:] / sd[:-1], s ** 2 / (s ** 2 + sd[:-1] ** 2)
    gain = float(torch.prod(r + (1 - r) * a))
    assert torch.allclose(few, mu + gain * (x_t - mu), rtol=1e-4, atol=1e-5)


def test_noise_density_and_schedule():
    sigma = sample_log_logistic((100_000,), generator=torch.Generator().manual_seed(0))
    assert float(sigma.min()) >= 1e-3 and float(sigma.max()) <= 80.0
    assert abs(float(sigma.median()) - 0.5) < 0.02  # median = exp(loc) = sigma_data
    # CDF of the (truncation-negligible) log-logistic at sigma = 1: sigmoid(log(1/0.5)/0.5)
    assert abs(float((sigma < 1.0).float().mean()) - float(torch.sigmoid(torch.tensor(math.log(2) / 0.5)))) < 0.01
    sig = exponential_sigmas(10, 1e-3, 80.0)
    assert sig.shape == (11,) and sig[-1] == 0
    assert torch.allclose(sig[[0, 9]], torch.tensor([80.0, 1e-3]), rtol=1e-5)
    ratios = sig[1:10] / sig[:9]
    assert torch.allclose(ratios, ratios[0].expand(9), rtol=1e-4)


# ------------------------------------------------------------------------------ model / caching
def test_swiglu_experts_match_per_expert_loop_and_count_params():
    torch.manual_seed(0)
    ex = SwiGLUExperts(4, 8, 16)
    x = torch.randn(10, 8)
    counts = torch.tensor([3, 0, 5, 2])
    out = ex.forward_sorted(x, counts)
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        xs = x[start:start + c]
        start += c
        ref.append((xs @ ex.w1[e] + ex.b1[e]) * torch.nn.functional.silu(xs @ ex.w3[e] + ex.b3[e]) @ ex.w2[e] + ex.b2[e])
    assert torch.allclose(out, torch.cat(ref), atol=1e-6)
    assert ex.params_per_expert() == swiglu_params(8, 16, 8)
    assert torch.allclose(ex.forward_all(x)[2], ex.forward_expert(2, x), atol=1e-6)


def test_expert_cache_equals_uncached_on_fixed_noise():
    torch.manual_seed(0)
    module = DiffusionPolicyModule(dim=32, depth=3, heads=4, ema_decay=0)
    random_router(module.model)
    module.eval()
    cache = module.expert_cache_for(module.sigmas())
    used = {tuple(f.experts) for step in cache for f in step}
    assert len(used) > 1, "routers should pick different experts at different noise levels"
    obs = torch.randn(6, 2, 12)
    task = torch.tensor([0, 1, 2, 0, 1, 2])
    noise = torch.randn(6, 10, 2, generator=torch.Generator().manual_seed(3))
    cached = module.sample(obs, task, use_cache=True, noise=noise)
    uncached = module.sample(obs, task, use_cache=False, noise=noise)
    assert torch.allclose(cached, uncached, atol=1e-5)
    # the routing a cached step records is exactly what the routers choose at that sigma
    x = torch.randn(6, 10, 2)
    for i, sigma in enumerate(module.sigmas()[:-1]):
        module.model(x, sigma.expand(6), obs, task)
        for moe, fused in zip(module.model.moe_layers(), cache[i]):
            live = moe.last_routing
            moe.set_cached_routing(fused, live.token_shape)
            rec = moe.last_routing
            assert torch.equal(live.indices.sort(-1).values, rec.indices.sort(-1).values)
            assert torch.allclose(live.usage_per_token(), rec.usage_per_token(), atol=1e-6)
    # the cached path runs no router: no MoE layer forward happens
    for moe in module.model.moe_layers():
        moe.last_routing = None
    module.sample(obs, task, use_cache=True, noise=noise)
    assert all(moe.last_routing is None for moe in module.model.moe_layers())


def test_routing_is_constant_within_a_noise_level():
    torch.manual_seed(0)
    model = MoDEDenoiser(12, 2, 3, dim=32, depth=2, heads=4).eval()
    random_router(model)
    obs, task, x = torch.randn(5, 2, 12), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5, 10, 2)
    for sigma in exponential_sigmas(10)[:-1]:
        model(x, sigma.expand(5), obs, task)
        for moe in model.moe_layers():
            chosen = moe.last_routing.indices.sort(-1).values  # [B * T, k]
            assert (chosen == chosen[0]).all()


def test_dense_twin_has_equal_active_params():
    moe = MoDEDenoiser(12, 2, 3, dim=48, depth=3, heads=4, ffn="moe")
    dense = MoDEDenoiser(12, 2, 3, dim=48, depth=3, heads=4, ffn="dense")
    total_m, active_m = param_counts(moe)
    total_d, active_d = param_counts(dense)
    assert total_d == active_d < total_m
    assert abs(active_d - active_m) / active_m < 0.01


def test_model_rejects_bad_shapes():
    model = MoDEDenoiser(12, 2, 3, dim=32, depth=1, heads=4)
    with pytest.raises(ValueError, match="actions must be"):
        model(torch.randn(2, 9, 2), torch.ones(2), torch.randn(2, 2, 12), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="obs must be"):
        model(torch.randn(2, 10, 2), torch.ones(2), torch.randn(2, 2, 11), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------ env and data
def test_env_expert_solves_tasks_and_random_does_not():
    env = MultiTask2DEnv()
    rng = np.random.default_rng(0)
    for task in range(len(TASKS)):
        expert = evaluate_policy(lambda o, t: np.stack([scripted_action(oo[-1], int(tt)) for oo, tt in zip(o, t)])[:, None],
                                 lambda k: MultiTask2DEnv(task=k), [task], episodes=10, execute_steps=1)
        rand = evaluate_policy(lambda o, t: rng.uniform(-1, 1, (len(o), 10, 2)), lambda k: MultiTask2DEnv(task=k),
                               [task], episodes=10)
        assert expert["success"][task] == 1.0 and rand["success"][task] <= 0.1
    assert env.reset(seed=0)[0].shape == (12,) and env.render().shape == (96, 96, 3)


def test_pusht_env_runs_closed_loop_when_the_extra_is_installed():
    pytest.importorskip("gym_pusht")
    from tasks.diffusion_policy.pusht import make_pusht_env

    rng = np.random.default_rng(0)
    res = evaluate_policy(lambda o, t: rng.uniform(100, 400, (len(o), 10, 2)), lambda k: make_pusht_env(),
                          [0], episodes=1, record=1)
    assert res["length"][0] == 300 and res["success"][0] == 0.0
    assert max(res["frames"][0][0][0].shape[:2]) <= 136  # recorded frames are downsampled


def test_chunk_dataset_pads_at_episode_edges():
    demos = {"observations": np.arange(24, dtype=np.float32).reshape(12, 2),
             "actions": np.arange(12, dtype=np.float32)[:, None],
             "episode_ends": np.array([5, 12]), "task_ids": np.array([0, 1])}
    ds = ChunkDataset(demos, np.array([1]), chunk=4, n_obs_steps=3)
    first, last = ds[0], ds[len(ds) - 1]
    assert first["obs"][:, 0].tolist() == [10, 10, 10] and first["action"][:, 0].tolist() == [5, 6, 7, 8]
    assert last["action"][:, 0].tolist() == [11, 11, 11, 11] and int(last["task"]) == 1


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_demo_file_roundtrip_and_errors(tmp_path, suffix):
    if suffix == ".h5":
        pytest.importorskip("h5py")
    demos = generate_demonstrations(["reach", "path"], episodes_per_task=3, seed=1)
    path = save_demonstrations(tmp_path / f"demos{suffix}", demos)
    back = load_demonstrations(path, chunk=10, act_dim=2)
    for key in demos:
        np.testing.assert_array_equal(back[key], demos[key])

    def bad(**changes):
        d = {**demos, **changes}
        d = {k: v for k, v in d.items() if v is not None}
        return save_demonstrations(tmp_path / f"bad{suffix}", d)

    with pytest.raises(ValueError, match="bad.*'actions' has dimension 3, expected 2"):
        load_demonstrations(bad(actions=np.zeros((len(demos["actions"]), 3), np.float32)), act_dim=2)
    short = demos["episode_ends"].copy()
    short[0] = 4
    with pytest.raises(ValueError, match="episode 0 has 4 steps, shorter than the action chunk"):
        load_demonstrations(bad(episode_ends=short), chunk=10)
    nan_obs = demos["observations"].copy()
    nan_obs[7, 1] = np.nan
    with pytest.raises(ValueError, match="'observations' has NaN/inf values \\(first at row 7\\)"):
        load_demonstrations(bad(observations=nan_obs))
    with pytest.raises(ValueError, match="missing field.*episode_ends"):
        load_demonstrations(bad(episode_ends=None))
    with pytest.raises(ValueError, match="'task_ids' must be"):
        load_demonstrations(bad(task_ids=np.zeros(2, np.int64)))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_demonstrations(tmp_path / f"nope{suffix}")


def test_user_file_must_match_the_evaluation_env(tmp_path):
    demos = generate_demonstrations(["reach"], episodes_per_task=3, seed=4)
    demos["actions"] = demos["actions"][:, :1]
    path = save_demonstrations(tmp_path / "one_d.npz", demos)
    with pytest.raises(ValueError, match="one_d.npz: field 'actions' has dimension 1, expected 2"):
        DiffusionPolicyDataModule(root=str(path), env="builtin").prepare()
    assert DiffusionPolicyDataModule(root=str(path)).act_dim == 1  # no env: any action width


def test_user_file_trains_and_reports_offline_mse_without_env(tmp_path):
    torch.manual_seed(0)
    demos = generate_demonstrations(["reach"], episodes_per_task=12, seed=2)
    demos["observations"] = demos["observations"][:, :6]  # a user's own observation layout
    demos.pop("task_ids")
    path = save_demonstrations(tmp_path / "mine.npz", demos)
    dm = DiffusionPolicyDataModule(root=str(path), batch_size=64)
    module = DiffusionPolicyModule(dim=16, depth=1, heads=2, num_sampling_steps=3)
    module.on_data(dm)
    assert dm.env_name is None and module.hparams.obs_dim == 6 and module.hparams.num_tasks == 1
    t = trainer(tmp_path, 1, limit_train_batches=2)
    t.fit(module, dm)
    res = t.test(module, dm, verbose=False)[0]
    assert "test/action_mse" in res and "test/success_rate" not in res and np.isfinite(res["test/action_mse"])


# ------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short MoDE run on the easiest task (reach); ~100 optimiser steps."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("dp_run")
    dm = DiffusionPolicyDataModule(tasks=["reach"], episodes_per_task=40, batch_size=64, eval_episodes=20,
                                   val_fraction=0.05, test_fraction=0.05)
    module = DiffusionPolicyModule(dim=32, depth=2, heads=4, lr=2e-2, warmup_steps=10, ema_decay=0.95)
    module.on_data(dm)
    t = trainer(root, 12)
    t.fit(module, dm)
    return module, dm, t, root


def test_short_training_beats_random_policy_on_reach(trained):
    module, dm, t, root = trained
    res = t.test(module, dm, verbose=False)[0]
    rng = np.random.default_rng(0)
    rand = evaluate_policy(lambda o, tk: rng.uniform(-1, 1, (len(o), 10, 2)), dm.make_env, [0],
                           episodes=20, seed=module.hparams.eval_seed)
    print(f"reach success: trained {res['test/success_reach']:.2f}, random {rand['success'][0]:.2f}; "
          f"action MSE {res['test/action_mse']:.3f}")
    assert res["test/success_reach"] >= rand["success"][0] + 0.3, (res, rand)
    assert res["test/action_mse"] < 0.3
    assert (root / "expert_usage_by_noise.png").exists() and (root / "rollouts.png").exists()
    assert (root / "routing_by_group.png").exists()


def test_routing_differs_across_noise_levels_after_training(trained):
    module = trained[0]
    usage, sigmas = module.noise_routing_table(num=10)  # [L, S, E]
    chosen = [{tuple(np.flatnonzero(row)) for row in layer} for layer in usage]
    assert max(len(c) for c in chosen) >= 2, chosen


def test_checkpoint_reloads_to_identical_outputs(trained, tmp_path):
    module, dm, t, _ = trained
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = DiffusionPolicyModule.load_from_checkpoint(path, weights_only=True)
    obs, task = torch.randn(3, 2, 12), torch.tensor([0, 0, 0])
    noise = torch.randn(3, 10, 2)
    module.eval(), loaded.eval()
    assert torch.equal(loaded.obs_lo, module.obs_lo) and torch.equal(loaded.act_hi, module.act_hi)
    assert torch.allclose(module.sample(obs, task, noise=noise), loaded.sample(obs, task, noise=noise), atol=1e-6)
    # data given to a restored policy must fit it; its normalisation statistics are kept
    other = generate_demonstrations(["reach"], episodes_per_task=4, seed=5)
    dm2 = DiffusionPolicyDataModule(root=str(save_demonstrations(tmp_path / "d.npz", other)))
    loaded.on_data(dm2)
    assert torch.equal(loaded.obs_lo, module.obs_lo)
    other["observations"] = other["observations"][:, :6]
    dm3 = DiffusionPolicyDataModule(root=str(save_demonstrations(tmp_path / "d6.npz", other)))
    with pytest.raises(ValueError, match="obs_dim=12 vs 6"):
        loaded.on_data(dm3)
