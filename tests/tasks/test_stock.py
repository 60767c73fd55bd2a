"""Tests of the stock task: IC metrics, no look-ahead, the TopkDropout backtest, the panel
readers and their errors, the MIGA layer against a naive loop, and learning on a known signal."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from tasks.stock.data import (CrossSectionDataset, StockDataModule, chronological_splits, panel_from_prices,
                              price_features, read_panel_file)
from tasks.stock.metrics import (InformationCoefficient, cross_sectional_loss, daily_ic, ic_summary,
                                 risk_metrics, topk_dropout_backtest)
from tasks.stock.model import MIGAHead, StockModel
from tasks.stock.module import GBDTModule, StockModule


def random_prices(num_days=220, num_stocks=6, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    logp = np.cumsum(0.02 * rng.standard_normal((num_days, num_stocks)), axis=0)
    dates = pd.bdate_range("2020-01-01", periods=num_days)
    return pd.DataFrame(100 * np.exp(logp), index=dates, columns=[f"S{i}" for i in range(num_stocks)])


# ----------------------------------------------------------------------------- IC metrics
def test_ic_and_rank_ic_match_scipy_with_ties_and_mask():
    pred = torch.tensor([[0.1, 0.4, 0.4, -0.2, 0.9, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    target = torch.tensor([[0.02, 0.01, 0.03, -0.01, 0.05, 0.0], [3.0, 1.0, 2.0, 2.0, 9.0, -1.0]])
    mask = torch.tensor([[True] * 6, [True, True, True, True, True, False]])
    ic = daily_ic(pred, target, mask)
    ric = daily_ic(pred, target, mask, rank=True)
    for d in range(2):
        m = mask[d].numpy()
        p, t = pred[d].numpy()[m], target[d].numpy()[m]
        assert ic[d].item() == pytest.approx(stats.pearsonr(p, t)[0], abs=1e-6)
        assert ric[d].item() == pytest.approx(stats.spearmanr(p, t)[0], abs=1e-6)
    # fewer than two stocks -> NaN day, skipped by the summary
    one = daily_ic(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([[True, False]]))
    assert torch.isnan(one).all()
    series = np.array([0.1, 0.3, np.nan, -0.1])
    mean, ir = ic_summary(series)
    assert mean == pytest.approx(0.1) and ir == pytest.approx(0.1 / np.std([0.1, 0.3, -0.1], ddof=1))
    metric = InformationCoefficient(rank=True)
    metric.update(pred, target, mask)
    m, r = metric.compute()
    assert m.item() == pytest.approx(ric.mean().item(), abs=1e-6)


def test_ic_loss_is_negative_mean_ic_and_differentiable():
    torch.manual_seed(0)
    pred = torch.randn(3, 10, requires_grad=True)
    target = torch.randn(3, 10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    loss = cross_sectional_loss(pred, target, mask, "ic")
    assert loss.item() == pytest.approx(-daily_ic(pred, target, mask).mean().item(), abs=1e-6)
    loss.backward()
    assert pred.grad.abs().sum() > 0
    # a perfect score (any positive affine map of the label per day) reaches IC = 1
    assert cross_sectional_loss(2 * target + 1, target, mask, "ic").item() == pytest.approx(-1.0, abs=1e-5)
    # pairwise loss is lower for the right order than for the reversed one
    right = cross_sectional_loss(target, target, mask, "pairwise")
    assert right < cross_sectional_loss(-target, target, mask, "pairwise")


# ----------------------------------------------------------------------------- no look-ahead
def test_features_do_not_use_future_prices_and_splits_are_embargoed():
    prices = random_prices()
    panel = panel_from_prices(prices, horizon=5, normalize="rank")
    t0 = 150
    future = prices.copy()
    future.iloc[t0 + 1:] *= np.random.default_rng(1).uniform(0.5, 2.0, size=future.iloc[t0 + 1:].shape)
    shifted = panel_from_prices(future, horizon=5, normalize="rank")
    np.testing.assert_array_equal(panel.features[:t0 + 1], shifted.features[:t0 + 1])
    assert not np.allclose(np.nan_to_num(panel.features[t0 + 1:]), np.nan_to_num(shifted.features[t0 + 1:]))
    # the label of day d uses close[d + 5]: unchanged up to t0 - 5, changed after
    np.testing.assert_array_equal(panel.label[:t0 - 4], shifted.label[:t0 - 4])
    assert not np.allclose(panel.label[t0 - 4], shifted.label[t0 - 4])
    # raw features are what they claim
    raw, names = price_features(prices)
    d = 100
    assert raw[d, 2, names.index("ret5")] == pytest.approx(prices.iloc[d, 2] / prices.iloc[d - 5, 2] - 1, rel=1e-5)
    ma20 = prices.iloc[d, 2] / prices.iloc[d - 19:d + 1, 2].mean() - 1
    assert raw[d, 2, names.index("ma20")] == pytest.approx(ma20, rel=1e-4)
    # chronological splits: every training label ends before the first validation day, etc.
    s = chronological_splits(panel, window=20)
    assert s["train"].max() + panel.horizon < s["valid"].min()
    assert s["valid"].max() + panel.horizon < s["test"].min()
    # a sample's window ends on its own day
    ds = CrossSectionDataset(panel, s["test"], window=20)
    item = ds[0]
    day = int(s["test"][0])
    np.testing.assert_allclose(item["x"][:, -1].numpy(), np.nan_to_num(panel.features[day]))
    np.testing.assert_allclose(item["x"][:, 0].numpy(), np.nan_to_num(panel.features[day - 19]))


# ----------------------------------------------------------------------------- backtest
def test_topk_dropout_backtest_matches_hand_computation():
    oc, cc = 0.001, 0.002
    scores = np.array([[4, 3, 2, 1], [1, 4, 3, 2], [1, 4, 3, 2]], dtype=float)
    returns = np.array([[0.10, 0.0, 0.0, 0.0], [0.0, 0.02, -0.05, 0.0], [0.0, 0.01, 0.01, 0.0]])
    bench = np.array([0.01, 0.0, -0.01])
    bt = topk_dropout_backtest(scores, returns, bench, topk=2, n_drop=1, open_cost=oc, close_cost=cc)
    # day 0: buy stocks 0 and 1 with half the cash each
    p0 = p1 = 0.5 * (1 - oc)
    w0 = 1.0
    p0 *= 1.10
    w1 = p0 + p1
    # day 1: held {1 (score 4), 0 (score 1)}, best outsider 2 (score 3); 0 is the worst -> sell 0, buy 2
    cash = p0 * (1 - cc)
    fee1 = p0 * cc + cash * oc
    p2 = cash * (1 - oc)
    p1 *= 1.02
    p2 *= 0.95
    w2 = p1 + p2
    # day 2: the outsider 3 (score 2) is the worst of {1, 2, 3} -> no trade
    w3 = p1 * 1.01 + p2 * 1.01
    np.testing.assert_allclose(bt["return"], [w1 / w0 - 1, w2 / w1 - 1, w3 / w2 - 1], rtol=1e-12)
    np.testing.assert_allclose(bt["cost"], [oc, fee1 / w1, 0.0], rtol=1e-12)
    np.testing.assert_array_equal(bt["holdings"], [[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]])
    np.testing.assert_allclose(bt["wealth"][-1], w3)
    m = risk_metrics(bt["return"], bench)
    r = bt["return"]
    assert m["annual_return"] == pytest.approx(252 * r.mean())
    assert m["excess_return"] == pytest.approx(252 * (r - bench).mean())
    assert m["information_ratio"] == pytest.approx(math.sqrt(252) * (r - bench).mean() / (r - bench).std(ddof=1))
    assert m["sharpe"] == pytest.approx(math.sqrt(252) * r.mean() / r.std(ddof=1))
    assert m["max_drawdown"] == pytest.approx(w2 / w1 - 1)  # the only fall from a peak
    with pytest.raises(ValueError, match="topk"):
        topk_dropout_backtest(scores, returns, bench, topk=5)


# ----------------------------------------------------------------------------- readers
def long_panel(prices: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for d in prices.index:
        for inst in prices.columns:
            rows.append({"date": d.strftime("%Y-%m-%d"), "instrument": inst, "f0": rng.standard_normal(),
                         "f1": rng.standard_normal(), "label": rng.standard_normal() * 0.01})
    return pd.DataFrame(rows)


def test_long_and_wide_files_load_with_default_keys(tmp_path):
    prices = random_prices(num_days=150, num_stocks=5)
    wide = tmp_path / "prices.csv"
    prices.rename_axis("date").reset_index().to_csv(wide, index=False)
    dm = StockDataModule(root=str(wide))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (1, 5, 20, 15) and dm.panel.benchmark_name == "equal_weight"
    long = long_panel(prices.iloc[:60])
    paths = [tmp_path / "panel.csv", tmp_path / "panel.parquet"]  # parquet via pyarrow ([stock] extra)
    for path in paths:
        long.to_csv(path, index=False) if path.suffix == ".csv" else long.to_parquet(path, index=False)
        dm = StockDataModule(root=str(path))
        dm.setup("fit")
        assert dm.panel.features.shape == (60, 5, 2)
        assert dm.panel.feature_names == ["f0", "f1"]
        row = long.iloc[7]
        d = list(pd.to_datetime(long["date"].unique())).index(pd.Timestamp(row["date"]))
        n = dm.panel.instruments.index(row["instrument"])
        assert dm.panel.label[d, n] == pytest.approx(row["label"])
        assert next(iter(dm.test_dataloader()))["x"].shape == (1, 5, 20, 2)


@pytest.mark.parametrize("case, match", [
    ("duplicate", r"duplicate \(date, instrument\).*'date', 'instrument'"),
    ("unsorted", r"column 'date' is not sorted"),
    ("non_numeric", r"column 'f1' is not numeric"),
    ("no_label", r"missing column 'label'"),
    ("all_nan_day", r"every feature column is NaN on date 2020-01-03"),
    ("no_date", r"missing column 'date'"),
    ("wide_duplicate", r"duplicate row for date"),
    ("wide_all_nan", r"every price is NaN on date"),
])
def test_bad_panel_files_give_clear_errors(tmp_path, case, match):
    prices = random_prices(num_days=8, num_stocks=3)
    df = long_panel(prices)
    if case == "duplicate":
        df = pd.concat([df, df.iloc[[4]]]).sort_values("date", kind="stable")
    elif case == "unsorted":
        df = pd.concat([df.iloc[3:], df.iloc[:3]])
    elif case == "non_numeric":
        df["f1"] = df["f1"].astype(str) + "x"
    elif case == "no_label":
        df = df.drop(columns="label")
    elif case == "all_nan_day":
        df.loc[df["date"] == "2020-01-03", ["f0", "f1"]] = np.nan
    elif case == "no_date":
        df = df.rename(columns={"date": "day"})
    elif case.startswith("wide"):
        df = prices.rename_axis("date").reset_index()
        if case == "wide_duplicate":
            df = pd.concat([df.iloc[:3], df.iloc[2:]])
        else:
            df.iloc[4, 1:] = np.nan
    path = tmp_path / f"{case}.csv"
    df.to_csv(path, index=False)
    with pytest.raises(ValueError, match=match) as err:
        read_panel_file(path)
    assert path.name in str(err.value)


def test_builtin_sp500_panel_offline_with_date_splits():
    pytest.importorskip("skfolio")
    dm = StockDataModule(valid_start="2015-01-02", test_start="2018-01-02")
    dm.setup("fit")
    p = dm.panel
    assert p.features.shape == (8313, 20, 15) and p.benchmark_name == "SP500"
    assert dm.split_period("test")[0] == "2018-01-02" and dm.split_period("test")[1] == "2022-12-20"
    assert dm.split_period("valid")[0] == "2015-01-02"
    v0 = int(np.searchsorted(p.dates, np.datetime64("2015-01-02")))
    assert dm.splits["train"].max() == v0 - p.horizon - 1  # embargo of 5 days before validation
    # rank-normalised features lie in [-1, 1] and every day's ranks are centred
    f = p.features[dm.splits["train"]]
    assert np.nanmin(f) == -1.0 and np.nanmax(f) == 1.0
    assert abs(np.nanmean(f)) < 1e-6


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_panel_file(tmp_path / "nope.csv")
    bad = tmp_path / "panel.txt"
    bad.write_text("date\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_panel_file(bad)


# ----------------------------------------------------------------------------- MIGA layer
def naive_miga(head: MIGAHead, h: torch.Tensor) -> torch.Tensor:
    """Per-token, per-expert loop reference of MIGAHead.forward."""
    indices, weights, _, _ = head.route(h)
    e_per_g, d, nh = head.experts_per_group, head.expert_dim, head.heads
    out = []
    for s in range(h.shape[0]):
        zs, gs = [], []
        for j in range(head.k):
            e = int(indices[s, j])
            zs.append(head.experts.forward_expert(e, h[s:s + 1])[0])
            gs.append(e // e_per_g)
        new = []
        for i in range(head.k):
            g = gs[i]
            q = zs[i] @ head.w_qkv[g][:, :d] + head.b_qkv[g][:d]
            heads_out = []
            for hh in range(nh):
                sl = slice(hh * d // nh, (hh + 1) * d // nh)
                partners = [j for j in range(head.k) if gs[j] == g]
                keys = torch.stack([(zs[j] @ head.w_qkv[g][:, d:2 * d] + head.b_qkv[g][d:2 * d])[sl] for j in partners])
                vals = torch.stack([(zs[j] @ head.w_qkv[g][:, 2 * d:] + head.b_qkv[g][2 * d:])[sl] for j in partners])
                att = torch.softmax(keys @ q[sl] / math.sqrt(d // nh), 0)
                heads_out.append(att @ vals)
            o = torch.cat(heads_out) @ head.w_out[g] + head.b_out[g]
            new.append(head.norm(zs[i] + o))
        out.append(sum(weights[s, j] * head.score(new[j])[0] for j in range(head.k)))
    return torch.stack(out)


@pytest.mark.parametrize("group_limit", [1, None])
def test_miga_head_matches_naive_loop_and_routes_within_groups(group_limit):
    torch.manual_seed(0)
    head = MIGAHead(12, num_groups=3, experts_per_group=3, k=3 if group_limit else 4, expert_hidden=10,
                    expert_dim=8, heads=2, group_limit=group_limit).eval()
    h = torch.randn(25, 12)
    with torch.no_grad():
        torch.testing.assert_close(head(h), naive_miga(head, h), atol=1e-5, rtol=1e-5)
    info = head.last_routing
    groups = info.indices // 3
    assert info.indices.shape == (25, head.k) and info.expert_index.numel() == 25 * head.k
    torch.testing.assert_close(info.weights.view(25, -1).sum(-1), torch.ones(25))
    if group_limit == 1:
        assert (groups == groups[:, :1]).all() and info.extra["shared_group_fraction"] == 1.0
    assert head.aux_loss.item() > 0


def test_dense_twin_has_miga_active_params_and_counts():
    from zoo.flops import param_counts

    miga = StockModel(15, head="miga", hidden=32)
    dense = StockModel(15, head="dense", hidden=32)
    head_active = miga.head.active_param_count()
    dense_head = sum(p.numel() for p in dense.head.parameters())
    assert abs(dense_head - head_active) <= 32 + 2  # one hidden unit of rounding
    total, active = param_counts(miga)
    head_total = sum(p.numel() for p in miga.head.parameters())
    assert total - active == head_total - head_active
    # 16 experts, 2 used; 4 groups' attention, 1 visited
    e = miga.head.experts.params_per_expert()
    assert head_total - head_active == 14 * e + 3 * miga.head.attention_params_per_group()


# ----------------------------------------------------------------------------- learning
def _trainer(tmp_path, epochs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_miga_learns_a_known_signal_on_the_synthetic_panel(tmp_path):
    L.seed_everything(0)
    dm = StockDataModule(source="synthetic", window=1, days_per_batch=8,
                         synthetic=dict(num_days=240, num_stocks=20, num_features=6, num_styles=2,
                                        num_regimes=2, signal=0.9, seed=0))
    module = StockModule(head="miga", hidden=24, num_groups=2, experts_per_group=4, k=2, expert_hidden=24,
                         expert_dim=8, lr=1e-2, topk=5, n_drop=1)
    module.on_data(dm)
    trainer = _trainer(tmp_path, epochs=5)
    trainer.fit(module, dm)
    res = trainer.test(module, dm, verbose=False)[0]
    oracle = daily_ic(torch.from_numpy(dm.panel.extra["oracle"][dm.splits["test"]]),
                      torch.from_numpy(dm.panel.label[dm.splits["test"]])).mean().item()
    assert oracle > 0.8
    assert res["test/ic"] > 0.4 and res["test/rank_ic"] > 0.4  # chance is 0 (+- ~0.02 over 40 days)
    # picking the top 5 by a good score beats the index and an equal-weight hold of all 20
    assert res["test/excess_return"] > 0 and res["test/annual_return"] > res["test/universe_annual_return"]
    assert (tmp_path / "backtest.png").exists() and (tmp_path / "backtest.csv").exists()
    share = pd.read_csv(tmp_path / "holding_share.csv")
    assert len(share) == 20 and share["share_of_days_held"].sum() == pytest.approx(5.0, abs=1e-3)  # 5 held daily


def test_gbdt_baseline_fits_and_checkpoint_roundtrip(tmp_path):
    L.seed_everything(0)
    dm = StockDataModule(source="synthetic", window=1, days_per_batch=16,
                         synthetic=dict(num_days=200, num_stocks=20, num_features=5, signal=0.9, seed=1))
    module = GBDTModule(max_iter=30, min_samples_leaf=20)
    module.on_data(dm)
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(module, dm)
    res = trainer.test(module, dm, verbose=False)[0]
    assert res["test/ic"] > 0.2
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "gbdt.ckpt"
    torch.save(ckpt, path)
    fresh = GBDTModule(max_iter=30)
    fresh.on_load_checkpoint(torch.load(path, weights_only=True))
    x = next(iter(dm.test_dataloader()))["x"]
    torch.testing.assert_close(fresh(x), module(x))
