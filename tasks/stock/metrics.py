"""Metrics of cross-sectional stock prediction: daily IC / RankIC and their IRs, the training
losses built on them, and Qlib's TopkDropout long-only backtest.

Conventions (as in Qlib's ``calc_ic`` and ``risk_analysis``):

- IC of day d = Pearson correlation across the stocks of that day between score and label;
  RankIC = Spearman (Pearson of average ranks). ``IC`` is the mean over days,
  ``ICIR = mean / std`` (ddof=1) of the daily series (not annualised).
- Backtest figures are arithmetic and annualised with 252 trading days:
  ``annual_return = 252 * mean(r)``, ``excess_return = 252 * mean(r - b)``,
  ``information_ratio = sqrt(252) * mean(r - b) / std(r - b)``, ``sharpe = sqrt(252) * mean(r) /
  std(r)`` (zero risk-free rate), ``max_drawdown = min_t (W_t / max_{s<=t} W_s - 1)`` on the
  compounded wealth ``W`` (a negative number).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

TRADING_DAYS = 252


# ----------------------------------------------------------------------------- IC
def masked_average_rank(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ranks (1..n, ties share their mean rank, as scipy's ``rankdata``) per row.

    v, mask: [B, N] -> [B, N] ranks of the masked-in entries (0 where masked out).
    Pairwise O(N^2) per day, exact with ties.
    """
    valid = mask[:, None, :] & mask[:, :, None]  # [B, N(i), N(j)]
    less = ((v[:, None, :] < v[:, :, None]) & valid).sum(-1)  # j with v_j < v_i
    equal = ((v[:, None, :] == v[:, :, None]) & valid).sum(-1)  # includes i itself
    rank = less.to(v.dtype) + (equal.to(v.dtype) + 1.0) / 2.0
    return torch.where(mask, rank, torch.zeros_like(rank))


def daily_ic(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
             rank: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Cross-sectional correlation per day.

    pred, target: [B, N] (B days, N stocks); mask: [B, N] bool (None = all valid).
    Returns [B]: Pearson (``rank=False``) or Spearman (``rank=True``) correlation across the valid
    stocks of each day; NaN for a day with fewer than 2 valid stocks or a constant side.
    Differentiable in ``pred`` for ``rank=False`` (the IC loss).
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"daily_ic expects pred and target of equal shape [B, N], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    mask = mask & torch.isfinite(pred) & torch.isfinite(target)
    if rank:
        pred, target = masked_average_rank(pred, mask), masked_average_rank(target, mask)
    m = mask.to(pred.dtype)
    n = m.sum(-1)  # [B]
    p = torch.where(mask, pred, torch.zeros_like(pred))
    t = torch.where(mask, target, torch.zeros_like(target))
    pc = (p - (p * m).sum(-1, keepdim=True) / n.clamp_min(1)[:, None]) * m
    tc = (t - (t * m).sum(-1, keepdim=True) / n.clamp_min(1)[:, None]) * m
    cov = (pc * tc).sum(-1)
    denom = torch.sqrt((pc ** 2).sum(-1) * (tc ** 2).sum(-1))
    ic = cov / denom.clamp_min(eps)
    bad = (n < 2) | (denom <= eps)
    return torch.where(bad, torch.full_like(ic, float("nan")), ic)


def ic_summary(ics: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(mean, mean / std with ddof=1) of a daily IC series, ignoring NaN days."""
    x = np.asarray(ics.detach().cpu() if torch.is_tensor(ics) else ics, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    return mean, (mean / std if std and np.isfinite(std) and std > 0 else float("nan"))


class InformationCoefficient(Metric):
    """Daily IC (or RankIC with ``rank=True``) accumulated over days; ``compute`` returns
    ``(IC, ICIR)``: the mean daily correlation and its mean/std ratio."""

    full_state_update = False

    def __init__(self, rank: bool = False, **kw):
        super().__init__(**kw)
        self.rank = rank
        self.add_state("ics", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.ics.append(daily_ic(pred.detach().float(), target.float(), mask, rank=self.rank))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        ics = torch.cat(self.ics) if isinstance(self.ics, list) and self.ics else self.ics
        if isinstance(ics, list):
            ics = torch.zeros(0)
        mean, ir = ic_summary(ics)
        return torch.tensor(mean), torch.tensor(ir)


# ----------------------------------------------------------------------------- losses
def cross_sectional_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         kind: str = "ic") -> torch.Tensor:
    """Training loss over B days of N stocks; every term stays inside one day's cross-section.

    - ``ic``: ``-mean_d IC_d`` (negative daily Pearson IC, as in the MIGA/Qlib port);
    - ``mse``: MSE to the label z-scored per day (Qlib ``CSZScoreNorm``);
    - ``pairwise``: RankNet logistic loss ``softplus(-(p_i - p_j))`` over the pairs of a day
      with ``y_i > y_j``.
    pred, target: [B, N]; mask: [B, N] bool.
    """
    if kind == "ic":
        ic = daily_ic(pred, target, mask)
        ok = torch.isfinite(ic)
        return -(ic[ok].mean() if ok.any() else pred.sum() * 0.0)
    m = mask.to(pred.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1)
    if kind == "mse":
        mean = (target * m).sum(-1, keepdim=True) / n
        std = torch.sqrt((((target - mean) * m) ** 2).sum(-1, keepdim=True) / n + 1e-12)
        z = (target - mean) / std
        return (((pred - z) ** 2) * m).sum() / m.sum().clamp_min(1)
    if kind == "pairwise":
        pairs = (target[:, :, None] > target[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # [B, N, N]
        diff = pred[:, :, None] - pred[:, None, :]
        return (F.softplus(-diff) * pairs).sum() / pairs.sum().clamp_min(1)
    raise ValueError(f"loss must be 'ic', 'mse' or 'pairwise', got {kind!r}")


# ----------------------------------------------------------------------------- backtest
def topk_dropout_backtest(scores: np.ndarray, returns: np.ndarray, benchmark: np.ndarray,
                          topk: int = 5, n_drop: int = 1, open_cost: float = 0.0005,
                          close_cost: float = 0.0015) -> dict[str, np.ndarray]:
    """Qlib's TopkDropout rule, long-only, rebalanced at every close.

    scores, returns: [D, N]; ``returns[d]`` is each stock's return from the close of day d to
    the close of day d+1; benchmark: [D] the benchmark's return over the same interval.
    A stock is tradable on day d when its score and return are finite.

    At each close d (``TopkDropoutStrategy`` with ``method_sell="bottom"``, ``method_buy="top"``):
    ``last`` = held stocks; ``today`` = the best ``n_drop + topk - |last|`` tradable stocks not
    held; ``comb`` = last + today ranked by score; sell the held stocks among the ``n_drop``
    worst of ``comb`` (and any held stock that is no longer tradable); buy the first
    ``|sell| + topk - |last|`` of ``today``. The cash from sales (and at start all the cash) is
    split equally across the buys; held positions are not rebalanced.
    Costs: selling value v returns ``v * (1 - close_cost)`` cash; spending c cash buys
    ``c * (1 - open_cost)`` of stock. Positions then earn ``returns[d]``.

    Returns daily arrays: ``return`` (net of costs), ``cost`` and ``turnover`` (fraction of
    wealth traded, buys + sells), ``benchmark``, ``wealth`` (after day d), ``holdings`` [D, N] bool.
    """
    scores = np.asarray(scores, dtype=np.float64)
    returns = np.asarray(returns, dtype=np.float64)
    benchmark = np.asarray(benchmark, dtype=np.float64)
    if scores.shape != returns.shape or scores.ndim != 2 or benchmark.shape != scores.shape[:1]:
        raise ValueError(f"backtest expects scores/returns [D, N] and benchmark [D], got "
                         f"{scores.shape}, {returns.shape}, {benchmark.shape}")
    if not 1 <= topk <= scores.shape[1] or not 0 <= n_drop <= topk:
        raise ValueError(f"need 1 <= topk <= N={scores.shape[1]} and 0 <= n_drop <= topk, "
                         f"got topk={topk}, n_drop={n_drop}")
    num_days, num_stocks = scores.shape
    tradable = np.isfinite(scores) & np.isfinite(returns)
    pos = np.zeros(num_stocks)  # value held in each stock
    cash = 1.0
    out = {k: np.zeros(num_days) for k in ("return", "cost", "turnover", "wealth")}
    holdings = np.zeros((num_days, num_stocks), dtype=bool)
    for d in range(num_days):
        wealth0 = pos.sum() + cash
        s = np.where(tradable[d], scores[d], -np.inf)
        held = np.flatnonzero(pos > 0)
        forced = [i for i in held if not tradable[d, i]]
        last = [i for i in held if tradable[d, i]]
        last = sorted(last, key=lambda i: -s[i])
        candidates = [i for i in np.argsort(-s, kind="stable") if tradable[d, i] and pos[i] == 0]
        today = candidates[:max(n_drop + topk - len(last), 0)]
        comb = sorted(last + today, key=lambda i: -s[i])
        worst = set(comb[-n_drop:]) if n_drop > 0 else set()
        sell = [i for i in last if i in worst] + forced
        buy = today[:len(sell) - len(forced) + topk - len(last)]
        fee = 0.0
        traded = 0.0
        for i in sell:
            fee += pos[i] * close_cost
            traded += pos[i]
            cash += pos[i] * (1.0 - close_cost)
            pos[i] = 0.0
        if buy:
            per = cash / len(buy)
            for i in buy:
                pos[i] = per * (1.0 - open_cost)
                fee += per * open_cost
                traded += per
            cash = 0.0
        holdings[d] = pos > 0
        pos = pos * (1.0 + np.where(holdings[d], np.nan_to_num(returns[d]), 0.0))
        wealth1 = pos.sum() + cash
        out["return"][d] = wealth1 / wealth0 - 1.0
        out["cost"][d] = fee / wealth0
        out["turnover"][d] = traded / wealth0
        out["wealth"][d] = wealth1
    out["benchmark"] = benchmark
    out["holdings"] = holdings
    return out


def risk_metrics(ret: np.ndarray, bench: np.ndarray) -> dict[str, float]:
    """Annualised return, excess return, information ratio, Sharpe and max drawdown (see the
    module docstring) of daily returns ``ret`` against ``bench`` (both [D])."""
    ret = np.asarray(ret, dtype=np.float64)
    bench = np.asarray(bench, dtype=np.float64)
    ex = ret - bench
    wealth = np.cumprod(1.0 + ret)
    peak = np.maximum.accumulate(np.concatenate([[1.0], wealth]))[1:]

    def ratio(x):
        sd = x.std(ddof=1) if x.size > 1 else float("nan")
        return float(x.mean() / sd * math.sqrt(TRADING_DAYS)) if sd and np.isfinite(sd) and sd > 0 else float("nan")

    return {"annual_return": float(ret.mean() * TRADING_DAYS),
            "excess_return": float(ex.mean() * TRADING_DAYS),
            "information_ratio": ratio(ex),
            "sharpe": ratio(ret),
            "max_drawdown": float((wealth / peak - 1.0).min()) if ret.size else float("nan")}


def plot_backtest(dates: np.ndarray, result: dict, path, title: str = "TopkDropout backtest",
                  benchmark_name: str = "benchmark") -> None:
    """Cumulative return of the strategy (net of costs) against the benchmark, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(dates, np.cumprod(1.0 + result["return"]) - 1.0, label="strategy (net of costs)")
    ax.plot(dates, np.cumprod(1.0 + result["benchmark"]) - 1.0, label=benchmark_name)
    ax.plot(dates, np.cumprod(1.0 + result["return"] + result["cost"]) - 1.0, lw=0.8, ls="--",
            label="strategy (before costs)")
    ax.set_ylabel("cumulative return")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
