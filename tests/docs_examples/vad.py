"""Tiny feature folders in the release layouts tasks/vad/README.md documents (data/<name>)."""
from __future__ import annotations

from pathlib import Path

from tasks.vad.data import make_synthetic_split, make_world
from tasks.vad.formats import write_release

# a 4-epoch pass through every stage, a few batches, small widths and built-in data
TINY = ["--trainer.max_epochs", "4", "--model.stages", "{encoder: 1, tgs: 1, experts: 1, gate: 1}",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "4",
        "--trainer.limit_test_batches", "8", "--trainer.limit_predict_batches", "4",
        "--model.dim", "16", "--model.expert_hidden", "16", "--data.num_segments", "16",
        "--data.batch_size", "8", "--data.num_train_normal", "8", "--data.num_train_anomalous", "8",
        "--data.num_test_normal", "4", "--data.num_test_anomalous", "4", "--data.min_len", "16",
        "--data.max_len", "16", "--data.feature_dim", "16", "--data.num_workers", "0"]

LAYOUT_OF = {"ucf_rtfm": "rtfm", "ucf_rtfm_txt": "rtfm_txt", "ucf_urdmu": "urdmu",
             "xd_violence": "xd", "shanghaitech": "shanghai"}


def write(name: str, dest: Path) -> None:
    """data/<name>: built-in videos of two classes (four for XD-Violence) written as a release;
    ShanghaiTech gets 63 anomalous training videos first, as RTFM's list."""
    if name not in LAYOUT_OF:
        raise KeyError(name)
    layout = LAYOUT_OF[name]
    world = make_world(4 if layout == "xd" else 2, 16, seed=0, shared_fraction=0.5)
    anomalous = 63 if layout == "shanghai" else 8
    train = make_synthetic_split(world, 8, anomalous, 16, 24, 1.0, seed=1)
    test = make_synthetic_split(world, 3, 4, 16, 24, 1.0, seed=2)
    write_release(dest, layout, train, test, crops=5 if layout == "xd" else 10)
