"""LightningModules of the stock task: MIGA / dense / linear (:class:`StockModule`) and the
scikit-learn gradient-boosting baseline (:class:`GBDTModule`), sharing one evaluation:
daily IC/RankIC/ICIR on validation and test, and the TopkDropout backtest on test.
"""
from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from zoo.module import ZooModule

from .metrics import (TRADING_DAYS, InformationCoefficient, cross_sectional_loss, daily_ic, ic_summary,
                      plot_backtest, risk_metrics, topk_dropout_backtest)
from .model import StockModel


class CrossSectionalEval:
    """Validation/test bookkeeping shared by the stock modules (a mixin over ZooModule).

    Needs ``self.hparams`` with ``topk, n_drop, open_cost, close_cost`` and ``self.predict_scores``.
    """

    monitor = "val/ic"
    monitor_mode = "max"

    def _init_eval(self):
        self.val_ic = InformationCoefficient()
        self.val_rank_ic = InformationCoefficient(rank=True)
        self._test_days: list[np.ndarray] = []
        self._test_scores: list[np.ndarray] = []
        self._test_labels: list[np.ndarray] = []
        self.last_backtest: dict | None = None

    def batch_size_of(self, batch) -> int:
        return int(batch["x"].shape[0])

    def flops_inputs(self) -> tuple:
        hp = self.hparams
        return (torch.zeros(1, hp.num_stocks, hp.seq_len, hp.num_features),)

    def on_data(self, datamodule) -> None:
        """Take the feature count, universe size and window from the data; rebuild if they differ."""
        shapes = {"num_features": datamodule.num_features, "num_stocks": datamodule.num_stocks,
                  "seq_len": datamodule.hparams.window}
        rebuild = shapes["num_features"] != self.hparams.num_features
        self.hparams.update(shapes)
        if rebuild:
            self.build_model()

    def validation_step(self, batch, batch_idx):
        pred = self.predict_scores(batch)
        self.val_ic.update(pred, batch["y"], batch["mask"])
        self.val_rank_ic.update(pred, batch["y"], batch["mask"])

    def on_validation_epoch_end(self):
        ic, icir = self.val_ic.compute()
        ric, _ = self.val_rank_ic.compute()
        self.log_dict({"val/ic": ic, "val/icir": icir, "val/rank_ic": ric}, prog_bar=True)
        self.val_ic.reset()
        self.val_rank_ic.reset()

    def on_test_epoch_start(self):
        super().on_test_epoch_start()
        self._test_days, self._test_scores, self._test_labels = [], [], []

    def test_step(self, batch, batch_idx):
        pred = self.predict_scores(batch)
        mask = batch["mask"]
        stock = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[mask]  # stock of each routed token
        dm = getattr(self.trainer, "datamodule", None)
        names = list(dm.panel.instruments) if getattr(dm, "panel", None) is not None else None
        self.record_routing(stock, names)
        pred = torch.where(batch["mask"], pred, torch.full_like(pred, float("nan")))
        self._test_days.append(batch["day"].cpu().numpy())
        self._test_scores.append(pred.detach().float().cpu().numpy())
        label = torch.where(mask, batch["y"], torch.full_like(batch["y"], float("nan")))
        self._test_labels.append(label.cpu().numpy())

    def on_test_epoch_end(self):
        super().on_test_epoch_end()
        days = np.concatenate(self._test_days)
        scores = np.concatenate(self._test_scores)  # [D, N]
        labels = np.concatenate(self._test_labels)
        s, y = torch.from_numpy(scores), torch.from_numpy(labels)
        ic, icir = ic_summary(daily_ic(s, y, None))
        ric, ricir = ic_summary(daily_ic(s, y, None, rank=True))
        metrics = {"test/ic": ic, "test/icir": icir, "test/rank_ic": ric, "test/rank_icir": ricir}
        dm = getattr(self.trainer, "datamodule", None)
        panel = getattr(dm, "panel", None)
        if panel is None:
            warnings.warn("stock test without a StockDataModule: no backtest, only IC metrics")
        else:
            hp = self.hparams
            ok = np.isfinite(panel.benchmark[days]) & np.isfinite(panel.returns[days]).any(1)
            d = days[ok]
            bt = topk_dropout_backtest(scores[ok], panel.returns[d], panel.benchmark[d], topk=hp.topk,
                                       n_drop=hp.n_drop, open_cost=hp.open_cost, close_cost=hp.close_cost)
            metrics.update({f"test/{k}": v for k, v in risk_metrics(bt["return"], bt["benchmark"]).items()})
            metrics["test/turnover"] = float(bt["turnover"].mean())
            metrics["test/bench_annual_return"] = float(np.mean(bt["benchmark"]) * TRADING_DAYS)
            # equal-weight buy of every stock, no costs: what a random top-k pick earns on average
            universe = np.where(np.isfinite(panel.returns[d]), panel.returns[d], 0.0).sum(1) / \
                np.maximum(np.isfinite(panel.returns[d]).sum(1), 1)
            metrics["test/universe_annual_return"] = float(universe.mean() * TRADING_DAYS)
            bt["dates"] = panel.dates[d]
            self.last_backtest = bt
            self._save_backtest(bt, panel.benchmark_name, panel.instruments)
        self.log_dict({k: float(v) for k, v in metrics.items()})

    def _save_backtest(self, bt: dict, benchmark_name: str, instruments: list[str]) -> None:
        try:
            out = self.run_dir
        except (AttributeError, RuntimeError):
            return
        if out is None:
            return
        hp = self.hparams
        title = (f"{type(self).__name__} TopkDropout k={hp.topk} n_drop={hp.n_drop} "
                 f"({str(bt['dates'][0])[:10]}..{str(bt['dates'][-1])[:10]})")
        plot_backtest(bt["dates"], bt, out / "backtest.png", title=title, benchmark_name=benchmark_name)
        with open(out / "backtest.csv", "w") as f:
            f.write("date,return,cost,turnover,benchmark\n")
            for i in range(len(bt["dates"])):
                f.write(f"{str(bt['dates'][i])[:10]},{bt['return'][i]:.8f},{bt['cost'][i]:.8f},"
                        f"{bt['turnover'][i]:.6f},{bt['benchmark'][i]:.8f}\n")
        share = bt["holdings"].mean(0)  # [N] fraction of test days each stock was held
        with open(out / "holding_share.csv", "w") as f:
            f.write("instrument,share_of_days_held\n")
            for i in np.argsort(-share, kind="stable"):
                f.write(f"{instruments[i]},{share[i]:.4f}\n")


class StockModule(CrossSectionalEval, ZooModule):
    """MIGA and its neural twins, trained on daily cross-sections.

    Args:
        head: ``"miga"`` | ``"dense"`` | ``"linear"`` (see :class:`tasks.stock.model.StockModel`).
        encoder: ``"gru"`` | ``"conv"`` (MIGA-Conv); hidden, num_layers, dropout: its size.
        num_groups, experts_per_group, k, expert_hidden, expert_dim, attn_heads, group_limit,
        noise_std, balance_weight, z_weight: the MIGA head (:class:`tasks.stock.model.MIGAHead`).
        loss: ``"ic"`` (negative daily Pearson IC), ``"mse"`` or ``"pairwise"``.
        lr, weight_decay: Adam.
        topk, n_drop, open_cost, close_cost: the TopkDropout backtest (costs as fractions; 5 and
            15 bps by default; k=5, n_drop=1 for a 20-stock universe).
        num_features, num_stocks, seq_len: set from the data (its window) by ``on_data``.
    """

    def __init__(self, head: str = "miga", encoder: str = "gru", hidden: int = 32, num_layers: int = 1,
                 dropout: float = 0.0, num_groups: int = 4, experts_per_group: int = 4, k: int = 2,
                 expert_hidden: int = 32, expert_dim: int = 16, attn_heads: int = 2,
                 group_limit: int | None = 1, noise_std: float = 0.0, balance_weight: float = 0.01,
                 z_weight: float = 0.0, loss: str = "ic", lr: float = 1e-3, weight_decay: float = 0.0,
                 topk: int = 5, n_drop: int = 1, open_cost: float = 0.0005, close_cost: float = 0.0015,
                 num_features: int = 15, num_stocks: int = 20, seq_len: int = 20):
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("ic", "mse", "pairwise"):
            raise ValueError(f"loss must be 'ic', 'mse' or 'pairwise', got {loss!r}")
        self.build_model()
        self._init_eval()

    def build_model(self) -> None:
        hp = self.hparams
        miga = {} if hp.head != "miga" and hp.head != "dense" else dict(
            num_groups=hp.num_groups, experts_per_group=hp.experts_per_group, k=hp.k,
            expert_hidden=hp.expert_hidden, expert_dim=hp.expert_dim, heads=hp.attn_heads,
            group_limit=hp.group_limit, noise_std=hp.noise_std, balance_weight=hp.balance_weight,
            z_weight=hp.z_weight)
        self.model = StockModel(hp.num_features, head=hp.head, encoder=hp.encoder, hidden=hp.hidden,
                                num_layers=hp.num_layers, dropout=hp.dropout, **miga)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, mask)  # [B, N]

    def predict_scores(self, batch) -> torch.Tensor:
        return self.model(batch["x"], batch["mask"])

    def training_step(self, batch, batch_idx):
        pred = self.model(batch["x"], batch["mask"])
        loss = cross_sectional_loss(pred, batch["y"], batch["mask"], self.hparams.loss)
        self.log("train/loss", loss, batch_size=self.batch_size_of(batch))
        return self.with_aux(loss)

    def predict_step(self, batch, batch_idx):
        return {"day": batch["day"], "score": self.predict_scores(batch)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class SklearnRegressor(nn.Module):
    """Wraps a fitted scikit-learn regressor so ``forward(x [B, N, T, F]) -> [B, N]`` scores the
    features of the day itself (``x[:, :, -1]``). Holds no torch parameters."""

    def __init__(self, estimator=None, n_threads: int = 1):
        super().__init__()
        self.estimator = estimator
        self.n_threads = n_threads

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.estimator is None:
            raise ValueError("the gradient-boosting model is not fitted yet (run fit first)")
        b, n = x.shape[:2]
        feats = x[:, :, -1].reshape(b * n, -1).detach().cpu().numpy()
        with threadpool_limits(limits=self.n_threads, user_api="openmp"):
            pred = torch.from_numpy(self.estimator.predict(feats).astype(np.float32)).to(x.device)
        return pred.view(b, n)


class GBDTModule(CrossSectionalEval, ZooModule):
    """scikit-learn ``HistGradientBoostingRegressor`` on the day's features, as practitioners'
    LightGBM-on-Alpha158 baseline.

    It is not trained by gradient steps: at the start of ``fit`` it collects every (day, stock)
    row of the training split (features of day d, label z-scored per day) and fits the trees
    once; the training loop then runs no optimisation (``automatic_optimization=False``) and
    validation/test score the same way as the neural models. The fitted trees are stored in the
    checkpoint as pickled bytes (load checkpoints only from sources you trust). ``n_threads``
    caps its OpenMP threads (1 by default: on a shared CPU more threads only oversubscribe).
    """

    automatic_optimization = False

    def __init__(self, max_iter: int = 200, learning_rate: float = 0.05, max_leaf_nodes: int = 31,
                 min_samples_leaf: int = 200, l2_regularization: float = 1.0, max_bins: int = 255,
                 n_threads: int = 1, topk: int = 5, n_drop: int = 1, open_cost: float = 0.0005,
                 close_cost: float = 0.0015, num_features: int = 15, num_stocks: int = 20, seq_len: int = 20):
        super().__init__()
        self.save_hyperparameters()
        self.build_model()
        self._init_eval()

    def build_model(self) -> None:
        self.model = SklearnRegressor(n_threads=self.hparams.n_threads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.model.estimator is None:  # `zoo flops` before fit: trees cost no torch FLOPs anyway
            warnings.warn("GBDTModule is not fitted yet; forward returns zeros")
            return x.new_zeros(x.shape[:2])
        return self.model(x, mask)

    def predict_scores(self, batch) -> torch.Tensor:
        return self.model(batch["x"])

    def on_fit_start(self):
        if self.model.estimator is not None:
            return
        from sklearn.ensemble import HistGradientBoostingRegressor

        dm = self.trainer.datamodule
        days = dm.splits["train"]
        panel = dm.panel
        mask = panel.valid_mask()[days]  # [Ds, N]
        label = np.where(mask, panel.label[days], np.nan).astype(np.float64)
        mean = np.nanmean(label, axis=1, keepdims=True)
        std = np.nanstd(label, axis=1, keepdims=True)
        z = (label - mean) / np.where(std > 0, std, 1.0)  # per-day z-scored label (CSZScoreNorm)
        X, y = panel.features[days][mask], z[mask]
        hp = self.hparams
        est = HistGradientBoostingRegressor(
            max_iter=hp.max_iter, learning_rate=hp.learning_rate, max_leaf_nodes=hp.max_leaf_nodes,
            min_samples_leaf=hp.min_samples_leaf, l2_regularization=hp.l2_regularization,
            max_bins=hp.max_bins, early_stopping=False,
            random_state=int(torch.initial_seed() % (2 ** 31)))
        with threadpool_limits(limits=hp.n_threads, user_api="openmp"):
            self.model.estimator = est.fit(X, y)

    def training_step(self, batch, batch_idx):
        return None  # the trees are fitted in on_fit_start

    def configure_optimizers(self):
        return None

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        if self.model.estimator is not None:
            checkpoint["sklearn_estimator"] = torch.frombuffer(bytearray(pickle.dumps(self.model.estimator)),
                                                               dtype=torch.uint8)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        blob = checkpoint.get("sklearn_estimator")
        if blob is not None:
            self.model.estimator = pickle.load(io.BytesIO(blob.numpy().tobytes()))
