"""Bad input, everywhere (issue 11, item 5): every task's plug-in reader fed corrupted files, a
checkpoint of another model, and config keys that do not exist.

Reader cases call the datamodule the CLI builds (construction + ``setup``/``prepare``) and assert
a ValueError/FileNotFoundError with a one-line message naming the file (or field) and what is
wrong: exactly what ``zoo`` prints as ``zoo: error: <message>`` with exit code 2. Each task's
valid data set is loaded first, so a reader that rejects everything fails here. Every task also
has a case through the real CLI in a subprocess (exit 2, no traceback, one line naming the
file); the subprocesses run in parallel. Checkpoint and config-key cases run ``zoo.cli.main``.

| what             | reader cases | CLI subprocess | CLI in process |
|------------------|-------------:|---------------:|---------------:|
| stock            |           16 |              1 |                |
| robust_cnn       |           16 |              1 |                |
| multitask_vit    |           18 |              1 |                |
| diffusion_policy |           19 |              1 |                |
| vad              |           19 |              1 |                |
| checkpoints      |              |              1 |              3 |
| config keys      |              |              1 |              5 |

CLI subprocesses: one corrupted file per task, a checkpoint of the MoE config given to the dense
config, and an unknown key in a config file. In-process CLI: an unknown ``--data`` key per task,
and a checkpoint of another task, a truncated checkpoint and a plain ``torch.save`` file.
Total: 88 reader cases + 7 CLI subprocesses + 8 in-process CLI cases = 103 bad inputs
(plus 5 valid data sets that must load).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.usefixtures("restore_torch_globals")  # tests/conftest.py
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def expect_error(load, *needles: str):
    """``load()`` must raise ValueError/FileNotFoundError; its message is one line holding every needle."""
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load()
    msg = str(info.value)
    assert "\n" not in msg.strip(), f"message spans several lines: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message {msg!r}"
    return msg


def cut(path: Path, keep: float = 0.5) -> Path:
    """Truncate a file to ``keep`` of its bytes (an interrupted download or copy)."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# =========================================================================================== stock
def stock_long(d: Path) -> Path:
    """A valid long panel: 40 business days x 4 instruments, two features and a label."""
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2020-01-01", periods=40)
    rows = [(day.date().isoformat(), f"S{i}", *rng.normal(size=2), 0.01 * rng.normal())
            for day in dates for i in range(4)]
    path = d / "panel.csv"
    pd.DataFrame(rows, columns=["date", "instrument", "f1", "f2", "label"]).to_csv(path, index=False)
    return path


def stock_wide(d: Path) -> Path:
    """A valid wide price table: 100 business days x 3 instruments of adjusted closes."""
    rng = np.random.default_rng(0)
    prices = 100 * np.exp(np.cumsum(0.01 * rng.normal(size=(100, 3)), 0))
    df = pd.DataFrame(prices, columns=["AAA", "BBB", "CCC"])
    df.insert(0, "date", pd.bdate_range("2020-01-01", periods=100).date)
    path = d / "prices.csv"
    df.to_csv(path, index=False)
    return path


def load_stock(path: Path):
    from tasks.stock.data import StockDataModule

    dm = StockDataModule(root=str(path), window=2)
    dm.setup("fit")
    return dm


def _edit_csv(path: Path, edit) -> Path:
    df = pd.read_csv(path)
    edit(df)
    df.to_csv(path, index=False)
    return path


def _truncate_last_row(path: Path) -> Path:
    text = path.read_text()
    start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[:start + 15])  # "2020-02-25,S3,0" : 3 of 5 fields
    return path


def _ragged_row(path: Path) -> Path:
    with open(path, "a") as f:
        f.write("2020-03-02,S0,0.1,0.2,0.01,0.5\n")
    return path


def _to_parquet_cut(path: Path) -> Path:
    out = path.with_suffix(".parquet")
    pd.read_csv(path).to_parquet(out)
    return cut(out)


def _set(row: int, col: str, value):
    def edit(df):
        df[col] = df[col].astype(object) if isinstance(value, str) else df[col]
        df.loc[row, col] = value
    return edit


def _nan_date(df):
    df.loc[df["date"] == df["date"].iloc[8], ["f1", "f2"]] = np.nan


def _swap_first_dates(df):
    df.loc[0, "date"], df.loc[4, "date"] = df.loc[4, "date"], df.loc[0, "date"]


STOCK_CASES = {
    "missing file": (stock_long, lambda p: p.with_name("nope.csv"), ["nope.csv", "not found"]),
    "empty file": (stock_long, lambda p: (p.write_text(""), p)[1], ["panel.csv", "empty"]),
    "truncated csv": (stock_long, _truncate_last_row, ["panel.csv", "3 of the header's 5 columns", "truncated"]),
    "truncated parquet": (stock_long, _to_parquet_cut, ["panel.parquet", "not a readable Parquet file"]),
    "row longer than header": (stock_long, _ragged_row, ["panel.csv", "not a readable CSV", "Expected 5 fields"]),
    "text in a feature": (stock_long, lambda p: _edit_csv(p, _set(3, "f1", "abc")), ["panel.csv", "'f1'", "not numeric"]),
    "inf feature": (stock_long, lambda p: _edit_csv(p, _set(5, "f2", np.inf)), ["panel.csv", "'f2'", "infinite", "row 5"]),
    "inf label": (stock_long, lambda p: _edit_csv(p, _set(7, "label", -np.inf)), ["panel.csv", "'label'", "infinite"]),
    "all features NaN on a date": (stock_long, lambda p: _edit_csv(p, _nan_date), ["panel.csv", "every feature column is NaN"]),
    "no label column": (stock_long, lambda p: _edit_csv(p, lambda df: df.pop("label")), ["panel.csv", "missing column 'label'"]),
    "text in date": (stock_long, lambda p: _edit_csv(p, _set(2, "date", "yesterday")), ["panel.csv", "'date'", "not dates", "row 2: 'yesterday'"]),
    "unsorted dates": (stock_long, lambda p: _edit_csv(p, _swap_first_dates), ["panel.csv", "'date' is not sorted"]),
    "duplicate rows": (stock_long, lambda p: _edit_csv(p, lambda df: df.__setitem__("instrument", "S0")),
                       ["panel.csv", "duplicate (date, instrument)"]),
    "wide: price <= 0": (stock_wide, lambda p: _edit_csv(p, _set(10, "BBB", -3.0)), ["prices.csv", "'BBB'", "prices <= 0"]),
    "wide: inf price": (stock_wide, lambda p: _edit_csv(p, _set(10, "CCC", np.inf)), ["prices.csv", "'CCC'", "infinite"]),
    "unsupported format": (stock_long, lambda p: p.rename(p.with_suffix(".xlsx")) or p.with_suffix(".xlsx"),
                           ["panel.xlsx", "unsupported stock data format"]),
}


def test_stock_valid_files_load(tmp_path):
    long = load_stock(stock_long(tmp_path))
    assert (long.num_stocks, long.num_features) == (4, 2)
    assert load_stock(stock_wide(tmp_path)).num_stocks == 3


@pytest.mark.parametrize("case", list(STOCK_CASES))
def test_stock_reader_rejects(tmp_path, case):
    build, corrupt, needles = STOCK_CASES[case]
    path = corrupt(build(tmp_path))
    expect_error(lambda: load_stock(path), *needles)


# ====================================================================================== robust_cnn
def cifar(d: Path) -> Path:
    """Valid CIFAR-style python batches: 8x8 RGB images, 3 classes named in batches.meta."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("data_batch_1", 12), ("data_batch_2", 12), ("test_batch", 6)):
        batch = {b"data": rng.integers(0, 256, (n, 3 * 8 * 8), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 3, n)]}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog", b"ship"]}))
    return d


def image_folder(d: Path) -> Path:
    """A valid ImageFolder tree: train/<class>/*.png, 2 classes x 3 grey 6x6 images."""
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee"):
        for i in range(3):
            png(d / "train" / cls / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    return d


def load_robust(root: Path):
    from tasks.robust_cnn.data import RobustCNNDataModule

    return RobustCNNDataModule(root=str(root), val_fraction=0.2, test_fraction=0.0)


def _batch(root: Path, name: str = "data_batch_1", **fields) -> Path:
    """Rewrite one CIFAR batch with some fields replaced (``None`` drops the field)."""
    path = root / name
    batch = pickle.loads(path.read_bytes())
    for key, value in fields.items():
        if value is None:
            batch.pop(key.encode())
        else:
            batch[key.encode()] = value(batch[key.encode()]) if callable(value) else value
    path.write_bytes(pickle.dumps(batch))
    return root


def _labels_at(i: int, value):
    def edit(labels):
        labels = list(labels)
        labels[i] = value
        return labels
    return edit


def _float_nan(data):
    data = data.astype(np.float64)
    data[2, 5] = np.nan
    return data


def _other_size(root: Path) -> Path:
    rng = np.random.default_rng(1)
    return _batch(root, "test_batch", data=rng.integers(0, 256, (6, 3 * 4 * 4), dtype=np.uint8))


ROBUST_CASES = {
    "missing folder": (cifar, lambda r: r / "nope", ["nope", "does not exist"]),
    "empty batch file": (cifar, lambda r: ((r / "data_batch_1").write_bytes(b""), r)[1],
                         ["data_batch_1", "not a readable CIFAR python batch"]),
    "truncated batch file": (cifar, lambda r: (cut(r / "data_batch_2"), r)[1],
                             ["data_batch_2", "not a readable CIFAR python batch"]),
    "NaN pixels": (cifar, lambda r: _batch(r, data=_float_nan), ["data_batch_1", "'data'", "NaN"]),
    "text pixels": (cifar, lambda r: _batch(r, data=lambda x: x.astype(str)), ["data_batch_1", "'data'", "numeric"]),
    "float pixels in [0, 1]": (cifar, lambda r: _batch(r, data=lambda x: x / 255.0),
                               ["data_batch_1", "'data'", "integer 0..255"]),
    "wrong image shape": (cifar, lambda r: _batch(r, data=lambda x: x[:, :100]), ["data_batch_1", "'data'", "3*S*S"]),
    "label out of range": (cifar, lambda r: _batch(r, labels=_labels_at(4, 7)),
                           ["data_batch_1", "label 7 out of range [0, 3)"]),
    "negative label": (cifar, lambda r: _batch(r, "test_batch", labels=_labels_at(0, -1)),
                       ["test_batch", "label -1 out of range"]),
    "fractional label": (cifar, lambda r: _batch(r, labels=_labels_at(1, 1.5)), ["data_batch_1", "'labels'", "integer"]),
    "labels shorter than data": (cifar, lambda r: _batch(r, labels=lambda y: y[:-2]),
                                 ["data_batch_1", "'labels' has 10 entries", "12 rows"]),
    "no labels field": (cifar, lambda r: _batch(r, labels=None), ["data_batch_1", "missing field 'labels'"]),
    "missing test batch": (cifar, lambda r: ((r / "test_batch").unlink(), r)[1], ["test_batch", "missing"]),
    "batches of different image sizes": (cifar, _other_size, ["different sizes"]),
    "imagefolder: truncated png": (image_folder, lambda r: (cut(r / "train/bee/1.png"), r)[1],
                                   ["bee/1.png", "unreadable image"]),
    "imagefolder: image of another size": (image_folder, lambda r: (png(r / "train/ant/2.png", np.zeros((5, 6), np.uint8)), r)[1],
                                           ["ant/2.png", "image is 5x6"]),
}


def test_robust_cnn_valid_files_load(tmp_path):
    dm = load_robust(cifar(tmp_path / "c"))
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (3, 8, 3)
    assert load_robust(image_folder(tmp_path / "f")).class_names == ["ant", "bee"]


@pytest.mark.parametrize("case", list(ROBUST_CASES))
def test_robust_cnn_reader_rejects(tmp_path, case):
    build, corrupt, needles = ROBUST_CASES[case]
    root = corrupt(build(tmp_path / "data"))
    expect_error(lambda: load_robust(root), *needles)


# =================================================================================== multitask_vit
def mt_folder(d: Path) -> Path:
    """A valid NYUD/PASCAL-style folder: 3 images of 8x8 with all four task labels."""
    rng = np.random.default_rng(0)
    for i in ("a", "b", "c"):
        png(d / "images" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        png(d / "segmentation" / f"{i}.png", rng.integers(0, 3, (8, 8), dtype=np.uint8))
        png(d / "edge" / f"{i}.png", (255 * (rng.random((8, 8)) > 0.8)).astype(np.uint8))
        (d / "depth").mkdir(exist_ok=True)
        np.save(d / "depth" / f"{i}.npy", rng.uniform(1, 5, (8, 8)).astype(np.float32))
        n = rng.normal(size=(8, 8, 3))
        (d / "normals").mkdir(exist_ok=True)
        np.save(d / "normals" / f"{i}.npy", (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32))
    (d / "train.txt").write_text("a\nb\n")
    (d / "val.txt").write_text("c\n")
    return d


def load_mt(root: Path):
    from tasks.multitask_vit.data import MultiTaskDataModule

    dm = MultiTaskDataModule(root=str(root), img_size=8, num_classes=3)
    dm.setup("fit")
    return dm


def _npy(rel: str, value):
    def corrupt(root: Path) -> Path:
        path = root / rel
        np.save(path, value(np.load(path)) if callable(value) else value)
        return root
    return corrupt


def _write(rel: str, data: bytes | str):
    def corrupt(root: Path) -> Path:
        path = root / rel
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return root
    return corrupt


def _nan_at(a):
    a = a.copy()
    a[3, 4] = np.nan
    return a


def _inf_at(a):
    a = a.copy()
    a[1, 1, 0] = np.inf
    return a


MT_CASES = {
    "no images folder": (mt_folder, lambda r: (os.rename(r / "images", r / "imgs"), r)[1], ["images", "missing images/ folder"]),
    "no split list": (mt_folder, lambda r: ((r / "train.txt").unlink(), r)[1], ["train.txt", "split list file missing"]),
    "empty split list": (mt_folder, _write("train.txt", ""), ["train.txt", "split list is empty"]),
    "id without image": (mt_folder, _write("val.txt", "zz\n"), ["images/zz", "image for id 'zz' is missing"]),
    "id without label": (mt_folder, lambda r: ((r / "normals/b.npy").unlink(), r)[1], ["normals/b.npy", "missing"]),
    "empty image file": (mt_folder, _write("images/a.png", b""), ["images/a.png", "unreadable image"]),
    "truncated image": (mt_folder, lambda r: (cut(r / "images/b.png", 0.6), r)[1], ["images/b.png", "unreadable image"]),
    "empty depth file": (mt_folder, _write("depth/a.npy", b""), ["depth/a.npy", "cannot read depth as .npy"]),
    "truncated depth file": (mt_folder, lambda r: (cut(r / "depth/c.npy"), r)[1], ["depth/c.npy", "cannot read depth as .npy"]),
    "text depth": (mt_folder, _npy("depth/a.npy", np.full((8, 8), "far")), ["depth/a.npy", "numeric array"]),
    "depth of the wrong shape": (mt_folder, _npy("depth/b.npy", np.ones((8, 7), np.float32)),
                                 ["depth/b.npy", "shape (8, 7)", "(8, 8)"]),
    "NaN depth": (mt_folder, _npy("depth/a.npy", _nan_at), ["depth/a.npy", "NaN or inf"]),
    "negative depth": (mt_folder, _npy("depth/a.npy", lambda a: a - 10), ["depth/a.npy", "negative"]),
    "inf normals": (mt_folder, _npy("normals/a.npy", _inf_at), ["normals/a.npy", "NaN or inf"]),
    "non-unit normals": (mt_folder, _npy("normals/c.npy", lambda a: 3 * a), ["normals/c.npy", "unit vectors"]),
    "class out of range": (mt_folder, lambda r: (png(r / "segmentation/b.png", np.full((8, 8), 7, np.uint8)), r)[1],
                           ["segmentation/b.png", "class index 7 out of range", "num_classes=3"]),
    "RGB class map": (mt_folder, lambda r: (png(r / "segmentation/a.png", np.zeros((8, 8, 3), np.uint8)), r)[1],
                      ["segmentation/a.png", "single-channel"]),
    "edge map of another size": (mt_folder, lambda r: (png(r / "edge/a.png", np.zeros((4, 8), np.uint8)), r)[1],
                                 ["edge/a.png", "shape (4, 8)"]),
}


def test_multitask_vit_valid_folder_loads(tmp_path):
    dm = load_mt(mt_folder(tmp_path))
    assert dm.tasks == ("semseg", "depth", "normals", "edge")
    assert len(dm.splits["train"]) == 2 and dm.splits["train"][0]["depth"].shape == (1, 8, 8)


@pytest.mark.parametrize("case", list(MT_CASES))
def test_multitask_vit_reader_rejects(tmp_path, case):
    build, corrupt, needles = MT_CASES[case]
    root = corrupt(build(tmp_path / "data"))
    expect_error(lambda: load_mt(root), *needles)


# ================================================================================ diffusion_policy
def demo_arrays(obs_dim: int = 4, act_dim: int = 2) -> dict:
    """3 episodes of 6 steps; tasks 0, 1, 0."""
    rng = np.random.default_rng(0)
    return {"observations": rng.normal(size=(18, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (18, act_dim)).astype(np.float32),
            "episode_ends": np.array([6, 12, 18]), "task_ids": np.array([0, 1, 0])}


def demos_npz(d: Path, **changes) -> Path:
    arrays = {**demo_arrays(), **changes}
    path = d / "demos.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def load_demos(path: Path, env=None):
    from tasks.diffusion_policy.data import DiffusionPolicyDataModule

    dm = DiffusionPolicyDataModule(root=str(path), env=env, chunk=4, n_obs_steps=2)
    dm.prepare()
    return dm


def _h5_cut(d: Path) -> Path:
    from tasks.diffusion_policy.data import save_demonstrations

    return cut(save_demonstrations(d / "demos.h5", demo_arrays()))


def _with(**changes):
    return lambda d: demos_npz(d, **changes)


def _nan_actions():
    a = demo_arrays()["actions"]
    a[7, 1] = np.nan
    return a


def _inf_obs():
    o = demo_arrays()["observations"]
    o[11, 0] = np.inf
    return o


DP_CASES = {
    "missing file": (lambda d: d / "nope.npz", ["nope.npz", "not found"]),
    "empty file": (lambda d: ((d / "demos.npz").write_bytes(b""), d / "demos.npz")[1], ["demos.npz", "empty"]),
    "truncated npz": (lambda d: cut(demos_npz(d)), ["demos.npz", "not a readable .npz archive"]),
    "truncated hdf5": (_h5_cut, ["demos.h5", "not a readable HDF5 file"]),
    "an .npy saved as .npz": (lambda d: (np.save(d / "x.npy", np.zeros(3)), os.rename(d / "x.npy", d / "demos.npz"),
                                         d / "demos.npz")[2], ["demos.npz", "single array"]),
    "pickled object array": (_with(actions=np.array([None, 1], dtype=object)), ["demos.npz", "cannot read the archive's arrays"]),
    "text observations": (_with(observations=np.full((18, 4), "x")), ["demos.npz", "'observations'", "numeric"]),
    "1-D actions": (_with(actions=np.zeros(18, np.float32)), ["demos.npz", "'actions'", "2-D"]),
    "NaN action": (_with(actions=_nan_actions()), ["demos.npz", "'actions'", "NaN/inf", "row 7"]),
    "inf observation": (_with(observations=_inf_obs()), ["demos.npz", "'observations'", "NaN/inf", "row 11"]),
    "observations and actions of different lengths": (_with(observations=np.zeros((17, 4), np.float32)),
                                                      ["demos.npz", "'observations' has 17 rows", "'actions' has 18"]),
    "episode_ends past the data": (_with(episode_ends=np.array([6, 12, 20])), ["demos.npz", "'episode_ends'", "N=18"]),
    "float episode_ends": (_with(episode_ends=np.array([6.0, 12.0, 18.0])), ["demos.npz", "'episode_ends'", "integer"]),
    "negative task id": (_with(task_ids=np.array([0, -1, 0])), ["demos.npz", "'task_ids'", "non-negative"]),
    "task_ids of the wrong length": (_with(task_ids=np.array([0, 1])), ["demos.npz", "'task_ids'", "one per episode"]),
    "no episode_ends": (_with(episode_ends=None), ["demos.npz", "missing field(s) ['episode_ends']"]),
    "empty episode": (_with(episode_ends=np.array([6, 6, 18])), ["demos.npz", "'episode_ends'", "strictly increasing"]),
    "unknown format": (lambda d: ((d / "demos.pkl").write_bytes(b"x"), d / "demos.pkl")[1],
                       ["demos.pkl", "unknown demonstration format"]),
}


def test_diffusion_policy_valid_files_load(tmp_path):
    dm = load_demos(demos_npz(tmp_path))
    assert (dm.obs_dim, dm.act_dim, dm.num_tasks) == (4, 2, 2)


@pytest.mark.parametrize("case", list(DP_CASES))
def test_diffusion_policy_reader_rejects(tmp_path, case):
    make, needles = DP_CASES[case]
    path = make(tmp_path)
    expect_error(lambda: load_demos(path), *needles)


def test_diffusion_policy_task_id_outside_the_builtin_env(tmp_path):
    """With the built-in evaluation env the task ids must be among its tasks (labels out of range)."""
    from tasks.diffusion_policy.env import TASKS

    ok = demos_npz(tmp_path, **demo_arrays(obs_dim=12, act_dim=2))
    assert load_demos(ok, env="builtin").num_tasks == len(TASKS)
    bad = demos_npz(tmp_path, **{**demo_arrays(obs_dim=12, act_dim=2), "task_ids": np.array([0, 5, 1])})
    expect_error(lambda: load_demos(bad, env="builtin"), "demos.npz", "'task_ids' has task 5", "3 tasks")


# ============================================================================================= vad
VAD_T, VAD_C = 4, 8  # snippets per video, feature width


def vad_folder(d: Path) -> Path:
    """A valid UCF-Crime-style feature folder: train/test lists, [T, C] features, gt.npy."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    train = ["Normal_Videos_001_x264.npy", "Normal_Videos_002_x264.npy", "Abuse001_x264.npy", "Fighting001_x264.npy"]
    test = ["Normal_Videos_003_x264.npy", "Abuse002_x264.npy"]
    for name in train + test:
        np.save(d / name, rng.normal(size=(VAD_T, VAD_C)).astype(np.float32))
    (d / "train.list").write_text("\n".join(train) + "\n")
    (d / "test.list").write_text("\n".join(test) + "\n")
    gt = np.zeros(2 * VAD_T * 16, np.int64)
    gt[VAD_T * 16 + 10:VAD_T * 16 + 30] = 1  # the abuse video's event
    np.save(d / "gt.npy", gt)
    return d


def load_vad(root: Path):
    from tasks.vad.data import VADDataModule

    return VADDataModule(root=str(root))


def _vad_npy(name: str, value):
    def corrupt(root: Path) -> Path:
        np.save(root / name, value)
        return root
    return corrupt


def _vad_write(name: str, text: str | bytes):
    def corrupt(root: Path) -> Path:
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return root
    return corrupt


def _annotations_instead_of_gt(line: str):
    def corrupt(root: Path) -> Path:
        (root / "gt.npy").unlink()
        (root / "annotations.txt").write_text(line + "\n")
        return root
    return corrupt


_NAN_FEATURES = np.full((VAD_T, VAD_C), np.nan, np.float32)
VAD_CASES = {
    "missing folder": (lambda r: r / "nope", ["nope", "not a folder"]),
    "no train list": (lambda r: ((r / "train.list").unlink(), r)[1], ["train.list", "list file not found"]),
    "list names a missing file": (_vad_write("test.list", "Ghost001_x264.npy\n"), ["test.list:1", "Ghost001_x264.npy", "not found"]),
    "empty list": (_vad_write("train.list", "\n"), ["train.list", "names no feature files"]),
    "empty feature file": (_vad_write("Abuse001_x264.npy", b""), ["Abuse001_x264.npy", "not a readable .npy"]),
    "truncated feature file": (lambda r: (cut(r / "Fighting001_x264.npy"), r)[1], ["Fighting001_x264.npy", "not a readable .npy"]),
    "text features": (_vad_npy("Abuse001_x264.npy", np.full((VAD_T, VAD_C), "x")), ["Abuse001_x264.npy", "numeric"]),
    "1-D features": (_vad_npy("Abuse001_x264.npy", np.zeros(VAD_C, np.float32)), ["Abuse001_x264.npy", "[T, C]"]),
    "NaN features": (_vad_npy("Normal_Videos_003_x264.npy", _NAN_FEATURES), ["Normal_Videos_003_x264.npy", "NaN or inf"]),
    "feature width differs": (_vad_npy("Abuse002_x264.npy", np.zeros((VAD_T, 5), np.float32)),
                              ["Abuse002_x264.npy", "feature width 5 differs from 8"]),
    "gt of the wrong length": (_vad_npy("gt.npy", np.zeros(100, np.int64)), ["gt.npy", "100 frame labels", "need 128"]),
    "gt label out of range": (_vad_npy("gt.npy", np.full(128, 2)), ["gt.npy", "0 or 1"]),
    "empty gt": (_vad_write("gt.npy", b""), ["gt.npy", "not a readable .npy array of frame labels"]),
    "truncated gt": (lambda r: (cut(r / "gt.npy"), r)[1], ["gt.npy", "not a readable .npy array of frame labels"]),
    "unknown test class": (lambda r: (os.rename(r / "Abuse002_x264.npy", r / "Arson002_x264.npy"),
                                      (r / "test.list").write_text("Normal_Videos_003_x264.npy\nArson002_x264.npy\n"), r)[2],
                           ["Arson002_x264.npy", "unknown class 'Arson'"]),
    "no anomalous training video": (_vad_write("train.list", "Normal_Videos_001_x264.npy\nNormal_Videos_002_x264.npy\n"),
                                    ["train.list", "both normal videos"]),
    "annotation past the video": (_annotations_instead_of_gt("Abuse002_x264 Abuse 500 520"),
                                  ["annotations.txt", "event 500-520", "64 frames"]),
    "annotation with text frames": (_annotations_instead_of_gt("Abuse002_x264 Abuse ten 20"),
                                    ["annotations.txt:1", "integer frames"]),
    "no frame ground truth": (lambda r: ((r / "gt.npy").unlink(), r)[1], ["gt.npy", "annotations.txt", "need frame ground truth"]),
}


def test_vad_valid_folder_loads(tmp_path):
    dm = load_vad(vad_folder(tmp_path))
    assert dm.classes == ["Abuse", "Fighting"] and dm.feature_dim == VAD_C
    assert int(dm.test_videos[1].frame_gt.sum()) == 20


@pytest.mark.parametrize("case", list(VAD_CASES))
def test_vad_reader_rejects(tmp_path, case):
    corrupt, needles = VAD_CASES[case]
    root = corrupt(vad_folder(tmp_path / "data"))
    expect_error(lambda: load_vad(root), *needles)


# ============================================================ through the CLI: subprocesses in parallel
TINY_DP = ["--data.init_args.episodes_per_task=2", "--data.init_args.eval_episodes=0", "--data.init_args.batch_size=32",
           "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1",
           "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--model.init_args.dim=16", "--model.init_args.expert_hidden=32", "--model.init_args.depth=1",
           "--model.init_args.num_sampling_steps=2"]


def _cli_cases(base: Path, moe_ckpt: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (zoo arguments, what the one error line must contain)."""
    stock = _edit_csv(stock_long(_mk(base / "stock")), _set(7, "label", np.inf))
    cifar_root = cifar(base / "robust_cnn")
    cut(cifar_root / "data_batch_1")
    mt = _npy("depth/b.npy", _nan_at)(mt_folder(base / "multitask_vit"))
    demos = cut(demos_npz(_mk(base / "diffusion_policy")))
    vad = _vad_npy("Abuse001_x264.npy", np.zeros((VAD_T, 5), np.float32))(vad_folder(base / "vad"))
    bad_yaml = base / "typo.yaml"
    bad_yaml.write_text((CONFIGS / "robust_cnn/moe.yaml").read_text().replace("    k: 1\n", "    k: 1\n    num_expertz: 4\n"))

    def fit(task, cfg, root):
        return ["fit", "--config", str(CONFIGS / task / cfg), "--data.init_args.root", str(root), "--run_dir", str(base / "runs" / task)]

    return {
        "stock: inf label": (fit("stock", "moe.yaml", stock), ["panel.csv", "'label'", "infinite"]),
        "robust_cnn: truncated batch": (fit("robust_cnn", "moe.yaml", cifar_root), ["data_batch_1", "not a readable CIFAR"]),
        "multitask_vit: NaN depth": (fit("multitask_vit", "moe.yaml", mt), ["depth/b.npy", "NaN or inf"]),
        "diffusion_policy: truncated npz": (fit("diffusion_policy", "moe.yaml", demos), ["demos.npz", "not a readable .npz"]),
        "vad: feature width": (fit("vad", "moe.yaml", vad), ["Abuse001_x264.npy", "feature width 5 differs"]),
        "checkpoint of the MoE given to the dense config": (
            ["test", "--config", str(CONFIGS / "diffusion_policy/dense.yaml"), *TINY_DP, "--run_dir", str(base / "runs/dense"),
             "--ckpt_path", str(moe_ckpt)], [str(moe_ckpt), "different model", "diffusion_policy/dense.yaml"]),
        "unknown key in a config file": (["fit", "--config", str(bad_yaml), "--run_dir", str(base / "runs/typo")],
                                         ["typo.yaml", "num_expertz"]),
    }


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run_main(args: list[str], capsys) -> tuple[int, str]:
    from zoo.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])  # an uncaught exception here is the traceback a user would see
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A real checkpoint of a tiny diffusion_policy MoE, written by `zoo fit`."""
    from zoo.cli import main

    run = tmp_path_factory.mktemp("ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["fit", "--config", str(CONFIGS / "diffusion_policy/moe.yaml"), *TINY_DP, "--run_dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, moe_checkpoint):
    base = tmp_path_factory.mktemp("cli")
    cases = _cli_cases(base, moe_checkpoint)
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "zoo.cli", *args], cwd=base, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, (args, _) in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out, cases[name][1])
    return results


CLI_CASE_NAMES = ["stock: inf label", "robust_cnn: truncated batch", "multitask_vit: NaN depth",
                  "diffusion_policy: truncated npz", "vad: feature width",
                  "checkpoint of the MoE given to the dense config", "unknown key in a config file"]


@pytest.mark.parametrize("case", CLI_CASE_NAMES)
def test_cli_exits_2_with_one_line_naming_the_file(cli_results, case):
    rc, out, needles = cli_results[case]
    assert rc == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("zoo: error:")]
    assert len(errors) == 1, out[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


# ============================================================ checkpoints and config keys, in process
def test_checkpoint_of_another_task_truncated_or_not_lightning(tmp_path, moe_checkpoint, capsys):
    robust = ["validate", "--config", str(CONFIGS / "robust_cnn/moe.yaml"), "--data.init_args.dataset=digits",
              "--data.init_args.builtin_size=null", "--run_dir", str(tmp_path / "run")]
    rc, out = _run_main([*robust, "--ckpt_path", moe_checkpoint], capsys)
    # named by the class that saved it (ZooModule records it in every checkpoint)
    assert rc == 2 and f"checkpoint {moe_checkpoint} holds a tasks.diffusion_policy.module." in out, out
    assert "robust_cnn/moe.yaml" in out and "builds a tasks.robust_cnn.module." in out, out

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(moe_checkpoint.read_bytes()[:5000])
    rc, out = _run_main([*robust, "--ckpt_path", truncated], capsys)
    assert rc == 2 and f"cannot read checkpoint {truncated}" in out, out

    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, plain)
    rc, out = _run_main([*robust, "--ckpt_path", plain], capsys)
    assert rc == 2 and f"{plain} is not a Lightning checkpoint" in out, out


@pytest.mark.parametrize("config", ["stock/moe.yaml", "robust_cnn/moe.yaml", "multitask_vit/moe.yaml",
                                    "diffusion_policy/moe.yaml", "vad/moe.yaml"])
def test_unknown_config_key_names_the_key(tmp_path, capsys, config):
    rc, out = _run_main(["fit", "--config", CONFIGS / config, "--data.init_args.rooot", tmp_path,
                         "--run_dir", tmp_path / "run"], capsys)
    errors = [ln for ln in out.splitlines() if ln.startswith("zoo: error:")]
    assert rc == 2 and len(errors) == 1 and "rooot" in errors[0], out
