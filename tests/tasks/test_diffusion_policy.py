"""Tests of the MoDE diffusion-policy task (tasks/diffusion_policy)."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tasks.diffusion_policy.data import (ChunkDataset, DiffusionPolicyDataModule, generate_demonstrations,
                                         load_demonstrations, save_demonstrations)
from tasks.diffusion_policy.edm import (edm_loss, edm_scalings, exponential_sigmas, precondition,
                                        sample_ddim, sample_log_logistic)
from tasks.diffusion_policy.env import TASKS, VIA_TASKS, MultiTask2DEnv, ViaPointEnv, scripted_action, via_action
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
    """Give the routers strong sigma-dependent preferences (their init is normal(0, 0.02))."""
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
    obs = torch.randn(6, 1, 12)
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
    obs, task, x = torch.randn(5, 1, 12), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5, 10, 2)
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
        model(torch.randn(2, 9, 2), torch.ones(2), torch.randn(2, 1, 12), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="obs must be"):
        model(torch.randn(2, 10, 2), torch.ones(2), torch.randn(2, 1, 11), torch.zeros(2, dtype=torch.long))


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
    # the via suite: same observation for every task; the opposite task's expert mostly fails
    tasks = list(range(len(VIA_TASKS)))
    make = lambda k: ViaPointEnv(task=k)  # noqa: E731
    for task in tasks:
        own = evaluate_policy(lambda o, t: np.stack([via_action(oo[-1], int(tt)) for oo, tt in zip(o, t)])[:, None],
                              make, [task], episodes=10, execute_steps=1)
        other = evaluate_policy(lambda o, t: np.stack([via_action(oo[-1], (int(tt) + 4) % 8) for oo, tt in zip(o, t)])[:, None],
                                make, [task], episodes=10, execute_steps=1)
        rand = evaluate_policy(lambda o, t: rng.uniform(-1, 1, (len(o), 10, 2)), make, [task], episodes=10)
        assert own["success"][task] == 1.0 and other["success"][task] <= 0.3 and rand["success"][task] <= 0.1
    assert ViaPointEnv().reset(seed=0)[0].shape == (5,)


def test_pusht_env_runs_closed_loop_when_the_extra_is_installed():
    pytest.importorskip("gym_pusht")
    from tasks.diffusion_policy.pusht import make_pusht_env

    rng = np.random.default_rng(0)
    res = evaluate_policy(lambda o, t: rng.uniform(100, 400, (len(o), 10, 2)), lambda k: make_pusht_env(),
                          [0], episodes=1, record=1)
    assert res["length"][0] == 300 and res["success"][0] == 0.0
    assert max(res["frames"][0][0][0].shape[:2]) <= 136  # recorded frames are downsampled


def test_chunk_dataset_pads_at_episode_edges_and_keeps_short_episodes():
    demos = {"observations": np.arange(24, dtype=np.float32).reshape(12, 2),
             "actions": np.arange(12, dtype=np.float32)[:, None],
             "episode_ends": np.array([5, 12]), "task_ids": np.array([0, 1])}
    ds = ChunkDataset(demos, np.array([1]), chunk=4, n_obs_steps=3)
    first, last = ds[0], ds[len(ds) - 1]
    assert first["obs"][:, 0].tolist() == [10, 10, 10] and first["action"][:, 0].tolist() == [5, 6, 7, 8]
    assert last["action"][:, 0].tolist() == [11, 11, 11, 11] and int(last["task"]) == 1
    # an episode shorter than both horizons: one sample per step, padded on both sides
    short = ChunkDataset({**demos, "episode_ends": np.array([2, 12])}, np.array([0]), chunk=4, n_obs_steps=3)
    assert len(short) == 2
    assert short[0]["obs"][:, 0].tolist() == [0, 0, 0] and short[0]["action"][:, 0].tolist() == [0, 1, 1, 1]
    assert short[1]["obs"][:, 0].tolist() == [0, 0, 2] and short[1]["action"][:, 0].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_demo_file_roundtrip_and_errors(tmp_path, suffix):
    if suffix == ".h5":
        pytest.importorskip("h5py")
    demos = generate_demonstrations(["reach", "path"], episodes_per_task=3, seed=1)
    path = save_demonstrations(tmp_path / f"demos{suffix}", demos)
    back = load_demonstrations(path, act_dim=2)
    for key in ("observations", "actions", "episode_ends", "task_ids"):
        np.testing.assert_array_equal(back[key], demos[key])

    def bad(**changes):
        d = {**demos, **changes}
        d = {k: v for k, v in d.items() if v is not None}
        return save_demonstrations(tmp_path / f"bad{suffix}", d)

    with pytest.raises(ValueError, match="bad.*'actions' has dimension 3, expected 2"):
        load_demonstrations(bad(actions=np.zeros((len(demos["actions"]), 3), np.float32)), act_dim=2)
    empty = demos["episode_ends"].copy()
    empty[1] = empty[0]
    with pytest.raises(ValueError, match="'episode_ends' must be strictly increasing"):
        load_demonstrations(bad(episode_ends=empty))
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
    demos.pop("task_ids"), demos.pop("task_names")
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
    """A short MoDE run on the easiest task (reach); ~100 optimiser steps. The demos come from
    a LeRobot v2 folder in which every third episode is cut to 4 steps (shorter than the chunk),
    evaluated closed loop in the built-in env."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("dp_run")
    folder = EX.write_lerobot(root / "lerobot_reach", EX.shorten(generate_demonstrations(["reach"], 40, seed=0)))
    dm = DiffusionPolicyDataModule(root=str(folder), env="builtin", tasks=["reach"], batch_size=64,
                                   eval_episodes=20, val_fraction=0.05, test_fraction=0.05)
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
          f"action MSE {res['test/action_mse']:.3f} vs mean action {mean_action_mse(dm):.3f}")
    assert res["test/success_reach"] >= rand["success"][0] + 0.3, (res, rand)
    assert res["test/action_mse"] < mean_action_mse(dm)
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
    obs, task = torch.randn(3, 1, 12), torch.tensor([0, 0, 0])
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


# ------------------------------------------------------------------------------ the field's formats
def _examples():
    """tests/docs_examples/diffusion_policy.py: writers of each layout (h5py / zarr / pyarrow)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs_examples" / "diffusion_policy.py"
    spec = importlib.util.spec_from_file_location("docs_examples_diffusion_policy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX = _examples()


@pytest.fixture(scope="module")
def reach_demos():
    """Built-in reach + path demos; episodes 0, 3 and 6 are cut to 4 steps (< the 10-step chunk)."""
    return EX.shorten(generate_demonstrations(["reach", "path"], episodes_per_task=4, seed=3))


def test_robomimic_zarr_and_lerobot_read_back_the_written_demos(tmp_path, reach_demos):
    d = reach_demos
    obs, act = d["observations"], d["actions"]
    texts = [d["task_names"][t] for t in d["task_ids"]]
    # robomimic: keys sorted (object, robot0_eef_pos), mask/train + mask/valid, per-demo text attribute
    rm = load_demonstrations(EX.write_robomimic(tmp_path / "lift.hdf5", d), task_key="lang")
    assert rm["format"] == "robomimic" and rm["obs_keys"] == ["object", "robot0_eef_pos"]
    np.testing.assert_array_equal(rm["observations"], np.concatenate([obs[:, 2:], obs[:, :2]], 1))
    np.testing.assert_array_equal(rm["actions"], act)
    np.testing.assert_array_equal(rm["episode_ends"], d["episode_ends"])
    assert [rm["task_names"][t] for t in rm["task_ids"]] == texts
    assert rm["splits"] == {"train": [0, 1, 2, 4, 5, 6], "valid": [3, 7]}
    # without task_key the env name of data.attrs["env_args"] is the one task
    assert load_demonstrations(tmp_path / "lift.hdf5")["task_names"] == ["PointReach"]
    only = load_demonstrations(tmp_path / "lift.hdf5", obs_keys=["robot0_eef_pos"])
    np.testing.assert_array_equal(only["observations"], obs[:, :2])
    # zarr replay buffer: directory store and .zarr.zip, keypoint [N, 5, 2] flattened
    for name in ("replay.zarr", "replay.zarr.zip"):
        zr = load_demonstrations(EX.write_zarr(tmp_path / name, d))
        assert zr["format"] == "zarr" and zr["obs_keys"] == ["keypoint", "state"]
        np.testing.assert_array_equal(zr["observations"], np.concatenate([obs[:, 2:], obs[:, :2]], 1))
        np.testing.assert_array_equal(zr["episode_ends"], d["episode_ends"])
        assert (zr["task_ids"] == 0).all()
    # LeRobot v2 folder: tasks from meta/tasks.jsonl through the task_index column
    lr = load_demonstrations(EX.write_lerobot(tmp_path / "lerobot", d, episodes_per_chunk=3))
    assert lr["format"] == "lerobot" and len(list((tmp_path / "lerobot" / "data").iterdir())) == 3
    np.testing.assert_array_equal(lr["observations"], obs)
    np.testing.assert_array_equal(lr["actions"], act)
    assert [lr["task_names"][t] for t in lr["task_ids"]] == texts


def test_robomimic_image_keys_go_to_the_image_encoder(tmp_path):
    demos = generate_demonstrations(["reach"], episodes_per_task=2, seed=1, image_size=12)
    rm = load_demonstrations(EX.write_robomimic(tmp_path / "img.hdf5", demos))
    assert rm["obs_keys"] == ["robot0_eef_pos"] and rm["images"]["agentview_image"].shape[1:] == (3, 12, 12)
    np.testing.assert_array_equal(rm["images"]["agentview_image"], demos["images"]["image"])
    zr = load_demonstrations(EX.write_zarr(tmp_path / "img.zarr", demos))  # float 0..255 pixels -> uint8
    np.testing.assert_array_equal(zr["images"]["img"], demos["images"]["image"])


def _robomimic_with(tmp_path, edit, image_size=None):
    import h5py

    path = EX.write_robomimic(tmp_path / "bad.hdf5", generate_demonstrations(["reach"], episodes_per_task=3, seed=2,
                                                                              image_size=image_size))
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def _zarr_with(tmp_path, edit):
    import zarr

    path = EX.write_zarr(tmp_path / "bad.zarr", generate_demonstrations(["reach"], episodes_per_task=3, seed=2))
    edit(zarr.open_group(str(path), mode="a"))
    return path


def _lerobot_with(tmp_path, edit):
    path = EX.write_lerobot(tmp_path / "bad_lerobot", generate_demonstrations(["reach"], episodes_per_task=3, seed=2))
    edit(path)
    return path


def _replace(f, key, data):
    del f[key]
    f.create_dataset(key, data=data)


def _nan_row(f):
    x = f["data/demo_1/obs/object"][()]
    x[4, 1] = np.nan
    _replace(f, "data/demo_1/obs/object", x)


def _rewrite_parquet(path, fn):
    import pyarrow.parquet as pq

    file = sorted(path.glob("data/chunk-*/episode_*.parquet"))[1]
    pq.write_table(fn(pq.read_table(file)), file)


def _frame_gap(t):
    import pyarrow as pa

    frames = np.arange(t.num_rows)
    frames[3:] += 1
    return t.set_column(t.column_names.index("frame_index"), "frame_index", pa.array(frames))


FORMAT_CASES = {
    "robomimic missing obs key": (lambda p: _robomimic_with(p, lambda f: f["data/demo_2/obs"].pop("object")),
                                  {}, ["bad.hdf5", "data/demo_2", "missing observation key 'object'"]),
    "robomimic obs/action lengths differ": (
        lambda p: _robomimic_with(p, lambda f: _replace(f, "data/demo_1/actions", f["data/demo_1/actions"][:-2])),
        {}, ["bad.hdf5", "data/demo_1", "'object' has", "the actions have"]),
    "robomimic NaN observation": (lambda p: _robomimic_with(p, _nan_row), {},
                                  ["bad.hdf5", "data/demo_1", "'object'", "NaN/inf", "step 4"]),
    "robomimic image shapes differ": (
        lambda p: _robomimic_with(p, lambda f: _replace(f, "data/demo_2/obs/agentview_image",
                                                        f["data/demo_2/obs/agentview_image"][:, :6, :6]), 8),
        {}, ["bad.hdf5", "data/demo_2", "image key 'agentview_image'", "(3, 6, 6)", "(3, 8, 8)"]),
    "robomimic unknown obs key asked": (lambda p: _robomimic_with(p, lambda f: None), {"obs_keys": ["joint_pos"]},
                                        ["bad.hdf5", "data/demo_0", "missing observation key 'joint_pos'"]),
    "robomimic empty demo": (
        lambda p: _robomimic_with(p, lambda f: [_replace(f, f"data/demo_0/{k}", f[f"data/demo_0/{k}"][:0])
                                               for k in ("actions", "obs/object", "obs/robot0_eef_pos")]),
        {}, ["bad.hdf5", "data/demo_0 is empty"]),
    "zarr empty episode": (lambda p: _zarr_with(p, lambda g: g["meta/episode_ends"].__setitem__(slice(0, 1), 0)),
                           {}, ["bad.zarr", "episode 0 is empty"]),
    "zarr missing episode_ends": (lambda p: _zarr_with(p, lambda g: g["meta"].__delitem__("episode_ends")),
                                  {}, ["bad.zarr", "missing array 'meta/episode_ends'"]),
    "zarr state shorter than action": (
        lambda p: _zarr_with(p, lambda g: g["data"].create_array("state", data=np.zeros((5, 2), np.float32),
                                                                 overwrite=True)),
        {}, ["bad.zarr", "'data/state' has 5 steps"]),
    "lerobot missing action column": (lambda p: _lerobot_with(p, lambda d: _rewrite_parquet(d, lambda t: t.drop(["action"]))),
                                      {}, ["episode_000001.parquet", "missing column 'action'"]),
    "lerobot frame_index gap": (lambda p: _lerobot_with(p, lambda d: _rewrite_parquet(d, _frame_gap)),
                                {}, ["episode_000001.parquet", "frame_index", "without gaps"]),
    "unknown folder layout": (lambda p: (p / "mystery").mkdir() or p / "mystery", {},
                              ["mystery", "unknown layout"]),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_format_readers_reject_bad_input_naming_file_and_key(tmp_path, case):
    make, kw, needles = FORMAT_CASES[case]
    with pytest.raises(ValueError) as err:
        load_demonstrations(make(tmp_path), **kw)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_cli_exits_2_on_a_bad_dataset(tmp_path, capsys):
    from pathlib import Path

    from zoo.cli import main

    bad = FORMAT_CASES["robomimic NaN observation"][0](tmp_path)
    cfg = Path(__file__).resolve().parents[2] / "configs" / "diffusion_policy" / "moe.yaml"
    rc = main(["fit", "--config", str(cfg), "--data.init_args.root", str(bad), "--run_dir", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert rc == 2 and "bad.hdf5" in out.err + out.out and "NaN/inf" in out.err + out.out


# ------------------------------------------------------------------------------ MoDE's own details
def test_router_init_follows_the_authors_and_zero_init_ties():
    torch.manual_seed(0)
    normal = MoDEDenoiser(4, 2, 1, dim=32, depth=2, heads=4).eval()
    zero = MoDEDenoiser(4, 2, 1, dim=32, depth=2, heads=4, router_init="zero").eval()
    last = normal.moe_layers()[0].router.gate[2]
    assert abs(float(last.weight.std()) - 0.02) < 0.004 and float(last.bias.abs().max()) == 0
    embs = normal.noise_embedding(exponential_sigmas(10)[:-1])
    for moe in zero.moe_layers():  # all logits 0: every sigma ties to the same pair of experts
        pairs = {tuple(sorted(moe.route_of(e)[0].tolist())) for e in zero.noise_embedding(exponential_sigmas(10)[:-1])}
        assert len(pairs) == 1
    probs = normal.moe_layers()[0].router.gate(embs).softmax(-1)
    assert float(probs.std(0).max()) > 0  # sigma-dependent from the start


def test_mode_balance_loss_is_k_when_uniform_and_e_when_collapsed_and_averaged_over_layers():
    from tasks.diffusion_policy.model import mode_balance_loss
    from zoo.moe import aux_loss

    n, e = 400, 4
    uniform = torch.tensor([[0, 1], [2, 3]]).repeat(n // 2, 1)
    half = torch.full((n, 2), 0.5)
    assert torch.isclose(mode_balance_loss(half, uniform, e), torch.tensor(2.0))  # k
    assert torch.isclose(mode_balance_loss(half, torch.tensor([[0, 1]]).repeat(n, 1), e), torch.tensor(4.0))  # E
    torch.manual_seed(0)
    model = MoDEDenoiser(4, 2, 1, dim=16, depth=3, heads=2, balance_weight=1.0).train()
    model(torch.randn(8, 10, 2), torch.rand(8) + 0.1, torch.randn(8, 1, 4), torch.zeros(8, dtype=torch.long))
    per_layer = [mode_balance_loss(m.last_routing.weights.view(-1, 2), m.last_routing.indices, e)
                 for m in model.moe_layers()]
    assert torch.isclose(aux_loss(model), torch.stack(per_layer).mean(), atol=1e-6)


def test_dense_twins_at_active_and_total_params():
    kw = dict(dim=32, depth=2, heads=4)
    _, active = param_counts(MoDEDenoiser(12, 2, 3, **kw))
    total, _ = param_counts(MoDEDenoiser(12, 2, 3, **kw))
    assert abs(param_counts(MoDEDenoiser(12, 2, 3, ffn="dense", **kw))[0] - active) / active < 0.01
    assert abs(param_counts(MoDEDenoiser(12, 2, 3, ffn="dense_total", **kw))[0] - total) / total < 0.01


# ------------------------------------------------------------------------------ image and text goals
def test_film_resnet_is_resnet18_and_loads_torchvision_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from tasks.diffusion_policy.encoders import FiLMResNet

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    enc = FiLMResNet(goal_dim=8, out_dim=16, width=64, weights=str(tmp_path / "r18.pt"))
    trunk = {k: v for k, v in enc.state_dict().items() if not k.startswith(("films.", "proj."))}
    assert set(trunk) == {k for k in ref.state_dict() if not k.startswith("fc.")}
    assert torch.equal(enc.layer3[0].downsample[0].weight, ref.layer3[0].downsample[0].weight)
    # with identity FiLM (gamma 1, beta 0) it computes torchvision's trunk exactly
    enc.eval(), ref.eval()
    for film in enc.films:
        torch.nn.init.zeros_(film[1].weight)
        planes = film[1].out_features // 4
        film[1].bias.data = torch.cat([torch.ones(2 * planes), torch.zeros(2 * planes)])
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = (img.float() / 255 - enc.mean) / enc.std
    trunk_ref = torch.nn.Sequential(*list(ref.children())[:-1])(x).flatten(1)
    assert torch.allclose(enc(img, torch.zeros(2, 8)),
                          enc.proj(trunk_ref), atol=1e-4)


def test_words_goal_encoder_shares_words_between_tasks():
    from tasks.diffusion_policy.encoders import GoalEncoder

    enc = GoalEncoder(["push the red block", "push the blue block", "open drawer"], 8)
    g = enc(torch.tensor([0, 1, 2, 0]))
    assert torch.equal(g[0], g[3]) and not torch.allclose(g[0], g[1])
    assert set(enc.vocab) == {"push", "the", "red", "blue", "block", "open", "drawer"}


def mean_action_mse(dm) -> float:
    """MSE of predicting the training episodes' mean action for every held-out chunk."""
    test_act = torch.cat([b["action"] for b in dm.test_dataloader()])
    return float((test_act - dm.datasets["train"].act.mean(0)).pow(2).mean())


def _fixed_loss(module, batch) -> float:
    """EDM loss of ``module`` on ``batch`` at fixed sigmas and noise (eval mode, no dropout)."""
    from tasks.diffusion_policy.edm import edm_loss

    g = torch.Generator().manual_seed(0)
    y = module.norm_act(batch["action"])
    sigma = sample_log_logistic((y.shape[0],), generator=g)
    module.model.eval()
    with torch.no_grad():
        loss = edm_loss(module.model, y, sigma, torch.randn(y.shape, generator=g), 0.5,
                        obs=module.norm_obs(batch["obs"]), task=batch["task"], images=batch["images"])
    module.model.train()
    return float(loss)


def test_image_and_text_goal_policy_trains_on_builtin_image_data(tmp_path):
    """Built-in reach/path with rendered 16 px images (state = agent xy only; the goal and
    waypoints are only in the pixels), a FiLM ResNet-18-layout encoder and the words goal
    encoder: ~50 steps halve the denoising loss, the image encoder and the goal words learn,
    and the closed-loop test runs on image observations (checkpoint criterion: val success)."""
    L.seed_everything(0)
    dm = DiffusionPolicyDataModule(tasks=["reach", "path"], image_size=16, episodes_per_task=8, batch_size=32,
                                   eval_episodes=2, val_episodes=1)
    module = DiffusionPolicyModule(dim=32, depth=1, heads=4, image_width=8, num_sampling_steps=3, lr=1e-2,
                                   warmup_steps=5, ema_decay=0)
    module.on_data(dm)
    assert module.monitor == "val/success_rate" and module.hparams.image_shapes == {"image": [3, 16, 16]}
    assert module.hparams.goal_texts[:2] == ["move the agent onto the goal", "push the block onto the goal"]
    dm.setup("fit")
    batch = next(iter(DataLoader(dm.datasets["train"], batch_size=256, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))))
    assert batch["images"]["image"].shape[1:] == (1, 3, 16, 16) and batch["images"]["image"].dtype == torch.uint8
    before = _fixed_loss(module, batch)
    conv0 = module.model.image_enc["image"].conv1.weight.detach().clone()
    words0 = module.model.goal_enc.emb.weight.detach().clone()
    t = trainer(tmp_path, 6, check_val_every_n_epoch=6)
    t.fit(module, dm)
    after = _fixed_loss(module, batch)
    print(f"image + text-goal policy: fixed-batch EDM loss {before:.3f} -> {after:.3f} in {t.global_step} steps")
    assert after < 0.5 * before
    assert not torch.allclose(module.model.image_enc["image"].conv1.weight, conv0)
    assert not torch.allclose(module.model.goal_enc.emb.weight, words0)
    res = t.test(module, dm, verbose=False)[0]
    assert 0.0 <= res["test/success_rate"] <= 1.0 and "test/success_path" in res
