"""Tiny CSV/Parquet panels in the layouts tasks/stock/README.md documents."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"]


def _prices(num_days: int = 160, names=("AAA", "BBB", "CCC", "DDD", "EEE")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    logp = np.cumsum(0.02 * rng.standard_normal((num_days, len(names))), axis=0)
    dates = pd.bdate_range("2021-01-04", periods=num_days)
    return pd.DataFrame(50 * np.exp(logp), index=pd.Index(dates, name="date"), columns=list(names))


def _long(prices: pd.DataFrame) -> pd.DataFrame:
    """date, instrument, two features and the next 5-day return as label."""
    rng = np.random.default_rng(1)
    fwd = prices.shift(-5) / prices - 1
    mom = prices / prices.shift(20) - 1
    rows = []
    for d in prices.index:
        for inst in prices.columns:
            rows.append({"date": d.strftime("%Y-%m-%d"), "instrument": inst,
                         "f_mom20": mom.at[d, inst], "f_noise": rng.standard_normal(),
                         "close": prices.at[d, inst], "label": fwd.at[d, inst]})
    return pd.DataFrame(rows)


def write(name: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if name == "panel.csv":
        _long(_prices()).to_csv(dest, index=False)
    elif name == "panel.parquet":
        _long(_prices()).to_parquet(dest, index=False)
    elif name == "prices.csv":
        _prices().reset_index().assign(date=lambda t: t["date"].dt.strftime("%Y-%m-%d")).to_csv(dest, index=False)
    else:
        raise KeyError(name)
