"""Cross-sectional stock panels: built-in S&P 500 prices, a synthetic regime/style panel, and
the user's own CSV/Parquet files, served one trading day (one cross-section) per sample.

A panel is a dense cube over (date, instrument):

- ``features`` [D, N, F]: features known at the close of each date (NaN = missing),
- ``label`` [D, N]: the target, a forward return over ``horizon`` days (NaN = unknown),
- ``returns`` [D, N]: the one-day return earned by holding from the close of date d to the
  close of date d+1 (used by the backtest, never by the model),
- ``benchmark`` [D]: the benchmark's one-day return over the same interval.

Features are built in the spirit of Qlib's Alpha158 from the adjusted close only (skfolio ships
no volume/OHLC): returns over 1/5/10/20/60 days, volatility of daily log returns over 5/20/60
days, gaps to 5/10/20/60-day moving averages, and the position of the close inside its 20-day
range, each rank-normalised across stocks per day (Qlib's ``CSRankNorm``). Every feature at date
d uses prices up to and including d only; the label uses ``close[d + horizon] / close[d] - 1``.

Splits are chronological, with an embargo: a training (validation) day whose label reaches
into the next split (``d + horizon >= first day of that split``) is dropped, so no label of an
earlier split sees a price of a later one.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

RETURN_HORIZONS = (1, 5, 10, 20, 60)
VOL_WINDOWS = (5, 20, 60)
MA_WINDOWS = (5, 10, 20, 60)
RANGE_WINDOW = 20


@dataclass
class Panel:
    """A (date x instrument) panel; see the module docstring for the meaning of each array."""

    dates: np.ndarray  # [D] datetime64[ns]
    instruments: list[str]  # [N]
    feature_names: list[str]  # [F]
    features: np.ndarray  # [D, N, F] float32
    label: np.ndarray  # [D, N] float32
    returns: np.ndarray  # [D, N] float32
    benchmark: np.ndarray  # [D] float32
    horizon: int  # days the label looks ahead (for the split embargo)
    benchmark_name: str = "equal_weight"
    extra: dict = field(default_factory=dict)

    @property
    def num_days(self) -> int:
        return self.features.shape[0]

    @property
    def num_stocks(self) -> int:
        return self.features.shape[1]

    @property
    def num_features(self) -> int:
        return self.features.shape[2]

    def valid_mask(self) -> np.ndarray:
        """[D, N] bool: the stock has all features and a label on that date."""
        return np.isfinite(self.features).all(-1) & np.isfinite(self.label)


# ----------------------------------------------------------------------------- features
def price_features(prices: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Alpha158-style features from a wide table of adjusted closes [D, N] -> ([D, N, F], names).

    All windows look backwards (``shift(h)`` with h > 0, ``rolling``), so the value at date d is
    a function of ``prices[: d + 1]`` only.
    """
    c = prices.astype(float)
    logret = np.log(c).diff()
    feats: dict[str, pd.DataFrame] = {}
    for h in RETURN_HORIZONS:
        feats[f"ret{h}"] = c / c.shift(h) - 1.0
    for h in VOL_WINDOWS:
        feats[f"vol{h}"] = logret.rolling(h, min_periods=h).std()
    for h in MA_WINDOWS:
        feats[f"ma{h}"] = c / c.rolling(h, min_periods=h).mean() - 1.0
    hi = c.rolling(RANGE_WINDOW, min_periods=RANGE_WINDOW).max()
    lo = c.rolling(RANGE_WINDOW, min_periods=RANGE_WINDOW).min()
    feats[f"max{RANGE_WINDOW}"] = c / hi - 1.0
    feats[f"min{RANGE_WINDOW}"] = c / lo - 1.0
    feats[f"rsv{RANGE_WINDOW}"] = (c - lo) / (hi - lo).where(hi > lo)
    names = list(feats)
    cube = np.stack([feats[n].to_numpy(dtype=np.float64) for n in names], axis=-1)  # [D, N, F]
    return cube.astype(np.float32), names


def cross_sectional_normalize(features: np.ndarray, mode: str | None) -> np.ndarray:
    """Normalise each feature across stocks per day: [D, N, F] -> [D, N, F]; NaNs stay NaN.

    ``rank``: average ranks mapped to [-1, 1] (Qlib ``CSRankNorm``); ``zscore``: (x - mean)/std
    (Qlib ``CSZScoreNorm``); ``None``/``"none"``: unchanged.
    """
    if mode in (None, "none"):
        return features
    x = features.astype(np.float64)
    finite = np.isfinite(x)
    n = finite.sum(1, keepdims=True)  # [D, 1, F]
    if mode == "rank":
        d, s, f = x.shape
        flat = pd.DataFrame(x.transpose(0, 2, 1).reshape(d * f, s))  # rows = (day, feature)
        r = flat.rank(axis=1, method="average").to_numpy().reshape(d, f, s).transpose(0, 2, 1)
        out = np.where(n > 1, 2.0 * (r - 1.0) / np.maximum(n - 1, 1) - 1.0, 0.0)
    elif mode == "zscore":
        xm = np.where(finite, x, 0.0)
        mean = xm.sum(1, keepdims=True) / np.maximum(n, 1)
        var = (np.where(finite, x - mean, 0.0) ** 2).sum(1, keepdims=True) / np.maximum(n, 1)
        out = (x - mean) / np.sqrt(var + 1e-12)
    else:
        raise ValueError(f"normalize must be 'rank', 'zscore' or 'none', got {mode!r}")
    return np.where(finite, out, np.nan).astype(np.float32)


def panel_from_prices(prices: pd.DataFrame, benchmark: pd.Series | None = None, horizon: int = 5,
                      normalize: str | None = "rank", benchmark_name: str | None = None) -> Panel:
    """Build features, the ``horizon``-day forward-return label and one-day returns from closes.

    prices: wide [D, N] table indexed by date, one column per instrument (sorted dates).
    benchmark: optional [D] index level on the same dates; None = equal-weight universe.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 day, got {horizon}")
    feats, names = price_features(prices)
    feats = cross_sectional_normalize(feats, normalize)
    c = prices.to_numpy(dtype=np.float64)
    label = np.full_like(c, np.nan)
    label[:-horizon] = c[horizon:] / c[:-horizon] - 1.0  # close[d+h] / close[d] - 1
    returns = np.full_like(c, np.nan)
    returns[:-1] = c[1:] / c[:-1] - 1.0  # close[d+1] / close[d] - 1
    if benchmark is not None:
        b = benchmark.reindex(prices.index).to_numpy(dtype=np.float64)
        bench = np.full_like(b, np.nan)
        bench[:-1] = b[1:] / b[:-1] - 1.0
        bname = benchmark_name or str(getattr(benchmark, "name", "index"))
    else:
        bench = _equal_weight(returns)
        bname = "equal_weight"
    return Panel(dates=prices.index.to_numpy(dtype="datetime64[ns]"),
                 instruments=[str(c) for c in prices.columns], feature_names=names,
                 features=feats, label=label.astype(np.float32), returns=returns.astype(np.float32),
                 benchmark=bench.astype(np.float32), horizon=horizon, benchmark_name=bname)


def _equal_weight(returns: np.ndarray) -> np.ndarray:
    """[D, N] -> [D] mean one-day return of the stocks that have one (NaN if none)."""
    finite = np.isfinite(returns)
    n = finite.sum(1)
    s = np.where(finite, returns, 0.0).sum(1)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def sp500_panel(horizon: int = 5, normalize: str | None = "rank") -> Panel:
    """The 20 S&P 500 stocks (adjusted closes 1990-01-02 .. 2022-12-28) skfolio ships in its
    wheel, with the S&P 500 index as the benchmark; no network access."""
    try:
        from skfolio.datasets import load_sp500_dataset, load_sp500_index
    except ImportError as e:
        raise ImportError("the built-in S&P 500 data needs skfolio (pip install skfolio); or set "
                          "--data.root FILE or --data.source synthetic") from e
    prices = load_sp500_dataset()
    index = load_sp500_index()["SP500"]
    return panel_from_prices(prices, index, horizon=horizon, normalize=normalize, benchmark_name="SP500")


def synthetic_panel(num_days: int = 600, num_stocks: int = 30, num_features: int = 8,
                    num_styles: int = 4, num_regimes: int = 2, regime_length: int = 40,
                    signal: float = 0.3, return_scale: float = 0.01, seed: int = 0) -> Panel:
    """A panel with a known signal that depends on the stock's style and the market regime.

    Stock n has style ``s_n = n mod S``; the market is in regime ``r_t`` (blocks of
    ``regime_length`` days, drawn at random). Feature 0 is a noisy regime indicator shared by all
    stocks, feature 1 a noisy style code, features 2.. are N(0, 1). The next-period return is
    ``label = signal * sign * x[2 + (s_n + r_t) mod (F - 2)] + sqrt(1 - signal^2) * noise``: each
    (style, regime) cell rewards a different feature, which a single linear score cannot fit
    and style experts can. ``extra["oracle"]`` [D, N] holds the noiseless signal (its daily IC
    with the label is about ``signal``). The label is a one-period return (``horizon`` = 1);
    ``returns = return_scale * label``.
    """
    if num_features < 3:
        raise ValueError(f"synthetic panel needs num_features >= 3, got {num_features}")
    if not 0.0 <= signal <= 1.0:
        raise ValueError(f"synthetic signal must be in [0, 1], got {signal}")
    rng = np.random.default_rng(seed)
    num_blocks = -(-num_days // regime_length)
    regime = np.repeat(rng.integers(0, num_regimes, num_blocks), regime_length)[:num_days]  # [D]
    style = np.arange(num_stocks) % num_styles  # [N]
    x = rng.standard_normal((num_days, num_stocks, num_features))  # [D, N, F]
    x[:, :, 0] = (2.0 * regime / max(num_regimes - 1, 1) - 1.0)[:, None] + 0.3 * rng.standard_normal((num_days, 1))
    style_code = 2.0 * style / max(num_styles - 1, 1) - 1.0  # [N] in [-1, 1]
    x[:, :, 1] = style_code[None, :] + 0.1 * rng.standard_normal((num_days, num_stocks))
    which = 2 + (style[None, :] + regime[:, None]) % (num_features - 2)  # [D, N]
    sign = np.where((style[None, :] + regime[:, None]) % 2 == 0, 1.0, -1.0)  # [D, N]
    oracle = sign * np.take_along_axis(x, which[..., None], axis=-1)[..., 0]  # [D, N]
    label = signal * oracle + np.sqrt(1.0 - signal ** 2) * rng.standard_normal((num_days, num_stocks))
    returns = return_scale * label
    dates = np.datetime64("2000-01-03", "D") + np.arange(num_days)
    return Panel(dates=dates.astype("datetime64[ns]"), instruments=[f"S{n:03d}" for n in range(num_stocks)],
                 feature_names=["regime", "style"] + [f"x{i}" for i in range(2, num_features)],
                 features=x.astype(np.float32), label=label.astype(np.float32),
                 returns=returns.astype(np.float32), benchmark=_equal_weight(returns).astype(np.float32),
                 horizon=1, extra={"oracle": oracle.astype(np.float32), "regime": regime, "style": style})


# ----------------------------------------------------------------------------- user files
def _one_line(err: Exception) -> str:
    """An exception's message on one line (pandas/pyarrow messages may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def _check_csv_complete(path: Path, num_columns: int) -> None:
    """A file cut off mid-row leaves a last row with fewer fields than the header; pandas would
    silently fill them with NaN (= missing), so a truncated download would train on."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 65536))
        tail = f.read().decode("utf-8", errors="replace")
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return
    fields = next(csv.reader([lines[-1]]))
    if len(fields) < num_columns:
        raise ValueError(f"{path}: the last row has {len(fields)} of the header's {num_columns} columns "
                         f"({lines[-1][:60]!r}); the file looks truncated")


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"stock data file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; stock data is one .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: unsupported stock data format {suffix!r}; use .csv or .parquet")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    if suffix == ".csv":
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable CSV table ({_one_line(e)})") from None
        _check_csv_complete(path, len(df.columns))
    else:
        try:
            df = pd.read_parquet(path)
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        except Exception as e:  # pyarrow raises several types for a corrupt or truncated file
            raise ValueError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    if df.empty:
        raise ValueError(f"{path}: the table has no rows (columns: {list(df.columns)[:10]})")
    return df


def _parse_dates(df: pd.DataFrame, path: Path) -> pd.Series:
    if "date" not in df.columns:
        raise ValueError(f"{path}: missing column 'date' (columns: {list(df.columns)[:10]})")
    try:
        dates = pd.to_datetime(df["date"])
    except (ValueError, TypeError):
        bad = pd.to_datetime(df["date"], errors="coerce", format="mixed").isna() & df["date"].notna()
        i = int(bad.to_numpy().argmax())
        raise ValueError(f"{path}: column 'date' has values that are not dates, e.g. row {i}: "
                         f"{df['date'].iloc[i]!r}") from None
    if dates.isna().any():
        raise ValueError(f"{path}: column 'date' is empty in row {int(dates.isna().to_numpy().argmax())}")
    values = dates.to_numpy()
    bad = np.flatnonzero(values[1:] < values[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(f"{path}: column 'date' is not sorted: row {i} ({dates.iloc[i].date()}) comes "
                         f"after {dates.iloc[i - 1].date()}; sort the file by date")
    return dates


def _check_numeric(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    """Each column must be numeric and free of inf (NaN is allowed: it marks a missing value)."""
    for col in cols:
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            raise ValueError(f"{path}: column {col!r} is not numeric (dtype {df[col].dtype}, "
                             f"e.g. {df[col].dropna().iloc[0]!r})")
        inf = np.isinf(df[col].to_numpy(dtype=np.float64))
        if inf.any():
            i = int(inf.argmax())
            raise ValueError(f"{path}: column {col!r} has an infinite value in row {i} "
                             f"(use an empty cell or NaN for a missing value)")


def read_panel_file(path: str | Path, horizon: int = 5, normalize: str | None = "auto",
                    fmt: str = "auto") -> Panel:
    """Read the user's panel.

    - long (``fmt="long"``, detected by an ``instrument`` column): ``date, instrument, <numeric
      features...>, label`` with an optional ``close`` column (adjusted close; gives the
      backtest's one-day returns). Without ``close`` the backtest treats ``label`` as the return
      of the next holding period. Features are used as given unless ``normalize`` says otherwise.
    - wide (``fmt="wide"``): ``date`` plus one column of adjusted closes per instrument; the
      built-in features and the ``horizon``-day label are computed from it.
    """
    path = Path(path)
    df = _read_table(path)
    if fmt == "auto":
        fmt = "long" if "instrument" in df.columns else "wide"
    if fmt not in ("long", "wide"):
        raise ValueError(f"format must be 'auto', 'long' or 'wide', got {fmt!r}")
    dates = _parse_dates(df, path)
    if fmt == "wide":
        cols = [c for c in df.columns if c != "date"]
        if not cols:
            raise ValueError(f"{path}: a wide price table needs one column per instrument besides 'date'")
        _check_numeric(df, cols, path)
        if dates.duplicated().any():
            d = dates[dates.duplicated()].iloc[0]
            raise ValueError(f"{path}: duplicate row for date {d.date()} in column 'date'")
        prices = pd.DataFrame(df[cols].to_numpy(dtype=float), index=pd.DatetimeIndex(dates), columns=cols)
        empty = prices.isna().all(axis=1)
        if empty.any():
            raise ValueError(f"{path}: every price is NaN on date {prices.index[empty.argmax()].date()}")
        nonpos = (prices <= 0).any()
        if nonpos.any():
            raise ValueError(f"{path}: column {nonpos.idxmax()!r} has prices <= 0 (adjusted closes must be > 0)")
        norm = "rank" if normalize == "auto" else normalize
        return panel_from_prices(prices, None, horizon=horizon, normalize=norm)

    if "label" not in df.columns:
        raise ValueError(f"{path}: missing column 'label' (a long panel needs date, instrument, "
                         f"features and label)")
    feat_cols = [c for c in df.columns if c not in ("date", "instrument", "label", "close")]
    if not feat_cols:
        raise ValueError(f"{path}: no feature columns besides date, instrument, label")
    _check_numeric(df, feat_cols + ["label"] + (["close"] if "close" in df.columns else []), path)
    if df["instrument"].isna().any():
        raise ValueError(f"{path}: column 'instrument' is empty in row {int(df['instrument'].isna().to_numpy().argmax())}")
    key = pd.DataFrame({"date": dates, "instrument": df["instrument"].astype(str)})
    dup = key.duplicated()
    if dup.any():
        i = int(dup.to_numpy().argmax())
        raise ValueError(f"{path}: duplicate (date, instrument) row {i}: "
                         f"({dates.iloc[i].date()}, {key['instrument'].iloc[i]}) in columns 'date', 'instrument'")
    all_nan = df[feat_cols].isna().all(axis=1).groupby(dates).all()
    if all_nan.any():
        raise ValueError(f"{path}: every feature column is NaN on date {all_nan.idxmax().date()}")
    udates = pd.DatetimeIndex(dates.unique())
    insts = sorted(key["instrument"].unique())
    di = udates.get_indexer(dates)
    ni = pd.Index(insts).get_indexer(key["instrument"])
    cube = np.full((len(udates), len(insts), len(feat_cols)), np.nan, dtype=np.float32)
    cube[di, ni] = df[feat_cols].to_numpy(dtype=np.float32)
    label = np.full((len(udates), len(insts)), np.nan, dtype=np.float32)
    label[di, ni] = df["label"].to_numpy(dtype=np.float32)
    if "close" in df.columns:
        close = np.full((len(udates), len(insts)), np.nan)
        close[di, ni] = df["close"].to_numpy(dtype=float)
        returns = np.full_like(close, np.nan)
        returns[:-1] = close[1:] / close[:-1] - 1.0
    else:
        returns = label.astype(np.float64)
    norm = None if normalize == "auto" else normalize
    return Panel(dates=udates.to_numpy(dtype="datetime64[ns]"), instruments=insts, feature_names=feat_cols,
                 features=cross_sectional_normalize(cube, norm), label=label,
                 returns=returns.astype(np.float32), benchmark=_equal_weight(returns).astype(np.float32),
                 horizon=horizon)


# ----------------------------------------------------------------------------- splits
def chronological_splits(panel: Panel, window: int, fractions=(0.6, 0.2, 0.2),
                         valid_start: str | None = None, test_start: str | None = None,
                         min_stocks: int = 2) -> dict[str, np.ndarray]:
    """Day indices of train/valid/test, chronological, embargoed by ``panel.horizon``.

    A day is usable when its window of ``window`` days fits and at least ``min_stocks`` stocks
    have features and a label. Boundaries come from ``valid_start``/``test_start`` (date strings)
    when given, else from ``fractions`` of the usable days.
    """
    usable = np.flatnonzero((panel.valid_mask().sum(1) >= min_stocks) & (np.arange(panel.num_days) >= window - 1))
    if usable.size < 3:
        raise ValueError(f"only {usable.size} usable days (window={window}, min_stocks={min_stocks}); "
                         "need at least 3 for train/valid/test")
    if (valid_start is None) != (test_start is None):
        raise ValueError("set both valid_start and test_start, or neither")
    if valid_start is not None:
        v0 = int(np.searchsorted(panel.dates, np.datetime64(pd.Timestamp(valid_start))))
        t0 = int(np.searchsorted(panel.dates, np.datetime64(pd.Timestamp(test_start))))
        if not v0 < t0:
            raise ValueError(f"valid_start {valid_start} must come before test_start {test_start}")
    else:
        if len(fractions) != 3 or any(f <= 0 for f in fractions):
            raise ValueError(f"split_fractions must be three positive numbers, got {fractions}")
        c = np.cumsum(fractions) / np.sum(fractions)
        v0 = int(usable[min(int(c[0] * usable.size), usable.size - 1)])
        t0 = int(usable[min(int(c[1] * usable.size), usable.size - 1)])
    h = panel.horizon
    splits = {"train": usable[(usable < v0) & (usable + h < v0)],  # embargo: label ends before valid
              "valid": usable[(usable >= v0) & (usable < t0) & (usable + h < t0)],
              "test": usable[usable >= t0]}
    for name, days in splits.items():
        if days.size == 0:
            first = [str(panel.dates[min(i, panel.num_days - 1)])[:10] for i in (v0, t0)]
            raise ValueError(f"the {name} split is empty (valid starts {first[0]}, test starts {first[1]})")
    return splits


class CrossSectionDataset(Dataset):
    """One item per trading day: the whole cross-section.

    Returns ``x`` [N, T, F] (features of days d-T+1..d, NaN -> 0), ``y`` [N] (label, NaN -> 0),
    ``mask`` [N] bool (stock has features and label on day d) and ``day`` (index into the panel).
    """

    def __init__(self, panel: Panel, days: np.ndarray, window: int):
        self.days = np.asarray(days)
        self.window = window
        self.features = torch.from_numpy(np.nan_to_num(panel.features, nan=0.0))  # [D, N, F]
        self.label = torch.from_numpy(np.nan_to_num(panel.label, nan=0.0))  # [D, N]
        self.mask = torch.from_numpy(panel.valid_mask())  # [D, N]

    def __len__(self) -> int:
        return len(self.days)

    def __getitem__(self, i: int):
        d = int(self.days[i])
        x = self.features[d - self.window + 1:d + 1].permute(1, 0, 2)  # [N, T, F]
        return {"x": x, "y": self.label[d], "mask": self.mask[d], "day": d}


class StockDataModule(L.LightningDataModule):
    """Cross-sectional stock panels, one trading day (all N stocks, T-day windows) per sample:
    root=null: skfolio's 20 S&P 500 stocks 1990-2022 (or source=synthetic); root=FILE.csv|.parquet:
    a long panel (date, instrument, numeric features..., label[, close]) or a wide price table
    (date + one adjusted-close column per instrument, features and label built from it).

    Args:
        root: None = built-in data (``source``); a ``.csv``/``.parquet`` long panel or wide price table.
        source: built-in data when ``root`` is None: ``"sp500"`` (skfolio's 20 stocks) or ``"synthetic"``.
        format: ``"auto"`` | ``"long"`` | ``"wide"`` for ``root`` files.
        window: T, days of features per sample.
        horizon: label horizon in days (price-derived labels; also the split embargo).
        normalize: ``"auto"`` (rank for price-derived features, none otherwise), ``"rank"``, ``"zscore"``, ``"none"``.
        split_fractions / valid_start, test_start: chronological splits by fraction or date.
        days_per_batch: trading days per batch; each day stays its own cross-section (the loss
            averages per-day terms), so B days = gradient accumulation over B one-day batches.
        synthetic: keyword arguments of :func:`synthetic_panel`.
    """

    def __init__(self, root: str | None = None, source: str = "sp500", format: str = "auto",
                 window: int = 20, horizon: int = 5, normalize: str = "auto",
                 split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                 valid_start: str | None = None, test_start: str | None = None,
                 days_per_batch: int = 1, min_stocks: int = 2, num_workers: int = 0,
                 synthetic: dict | None = None):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if days_per_batch < 1:
            raise ValueError(f"days_per_batch must be >= 1, got {days_per_batch}")
        if root is None and source not in ("sp500", "synthetic"):
            raise ValueError(f"source must be 'sp500' or 'synthetic', got {source!r}")
        self.save_hyperparameters()
        self.panel: Panel | None = None
        self.splits: dict[str, np.ndarray] = {}

    def build_panel(self) -> Panel:
        hp = self.hparams
        if hp.root is not None:
            return read_panel_file(hp.root, horizon=hp.horizon, normalize=hp.normalize, fmt=hp.format)
        if hp.source == "synthetic":
            panel = synthetic_panel(**(hp.synthetic or {}))
            if hp.normalize not in ("auto", "none", None):
                panel.features = cross_sectional_normalize(panel.features, hp.normalize)
            return panel
        return sp500_panel(horizon=hp.horizon, normalize="rank" if hp.normalize == "auto" else hp.normalize)

    def prepare(self) -> None:
        """Build the panel and splits once (idempotent); called by setup and by modules needing shapes."""
        if self.panel is not None:
            return
        self.panel = self.build_panel()
        hp = self.hparams
        self.splits = chronological_splits(self.panel, hp.window, tuple(hp.split_fractions),
                                           hp.valid_start, hp.test_start, hp.min_stocks)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def num_features(self) -> int:
        self.prepare()
        return self.panel.num_features

    @property
    def num_stocks(self) -> int:
        self.prepare()
        return self.panel.num_stocks

    def split_period(self, name: str) -> tuple[str, str]:
        """First and last date of a split, as ISO strings."""
        self.prepare()
        days = self.splits[name]
        return str(self.panel.dates[days[0]])[:10], str(self.panel.dates[days[-1]])[:10]

    def flat(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Tabular view for sklearn baselines: features of day d (the window's last day) of
        every valid (day, stock) of a split -> X [rows, F], y [rows]."""
        self.prepare()
        days = self.splits[name]
        mask = self.panel.valid_mask()[days]  # [Ds, N]
        return self.panel.features[days][mask], self.panel.label[days][mask]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.prepare()
        ds = CrossSectionDataset(self.panel, self.splits[name], self.hparams.window)
        return DataLoader(ds, batch_size=self.hparams.days_per_batch, shuffle=shuffle,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("valid", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("test", shuffle=False)
