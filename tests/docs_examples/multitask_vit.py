"""A tiny NYUD-v2 / PASCAL-Context style multi-task folder (tasks/multitask_vit/README.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--data.init_args.num_train", "16", "--data.init_args.num_val", "8",
        "--data.init_args.num_test", "8", "--data.init_args.batch_size", "8"]

TASK_DIRS = {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edge": "edge"}


def write_folder(root: Path, ids=("0003", "0004", "0012", "0015"), size=(24, 32), seed: int = 0) -> list[str]:
    """images/, segmentation/, depth/, normals/, edge/ and train.txt / val.txt."""
    rng = np.random.default_rng(seed)
    h, w = size
    for d in ("images", *TASK_DIRS.values()):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        seg = rng.integers(0, 3, (h, w)).astype(np.uint8)
        seg[0, 0] = 255
        Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        np.save(root / "depth" / f"{i}.npy", rng.uniform(0.5, 3.0, (h, w)).astype(np.float32))
        nrm = rng.normal(size=(h, w, 3))
        np.save(root / "normals" / f"{i}.npy", (nrm / np.linalg.norm(nrm, axis=-1, keepdims=True)).astype(np.float32))
        Image.fromarray((rng.random((h, w)) > 0.8).astype(np.uint8) * 255).save(root / "edge" / f"{i}.png")
    (root / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "val.txt").write_text(ids[3] + "\n")
    return list(ids)


def write(name: str, dest: Path) -> None:
    if name != "NYUDv2":
        raise KeyError(name)
    write_folder(dest)
