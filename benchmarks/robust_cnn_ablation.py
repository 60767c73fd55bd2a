"""Ablation of the AdvMoE CNN (tasks/robust_cnn): each variant against the dense twin at equal
active FLOPs, same data, same epochs, several seeds (mean ± std).

Rows, each a change of the task's default configs (``configs/robust_cnn/*.yaml``):

- natural training: MoE vs dense twin, and the MoE's gate (softmax, straight-through through
  the softmax, the public code's straight-through on the raw scores), router (shared or one per
  layer), soft top-2, per-expert BatchNorm, router learning rate;
- adversarial training (TRADES): dense twin, MoE + plain AT (experts and router jointly),
  AdvMoE with the defaults and with one change each: the public gate, the ``y mod E`` router
  cross-entropy (``router_alpha``), the router learning rate, per-layer routers, per-expert
  BatchNorm;
- schedule: the two adversarial headline rows again at ``--long-epochs``.

Columns: clean accuracy (SA), PGD-10 robust accuracy (RA), the share of test images each
expert receives and each expert's clean accuracy on its own images (first MoE layer), and
active FLOPs per image relative to the full-width dense model (``torch.utils.flop_counter``).

    .venv/bin/python benchmarks/robust_cnn_ablation.py                 # built-in MNIST, ~15 min on 1 core
    .venv/bin/python benchmarks/robust_cnn_ablation.py --quick         # 1 seed, fewer rows, ~2 min
    .venv/bin/python benchmarks/robust_cnn_ablation.py --data-root DIR --rows advmoe dense_at_flops
    .venv/bin/python benchmarks/robust_cnn_ablation.py --out runs/ablation   # also writes ablation.md / .csv

``--data-root`` takes the folders ``zoo fit --data.root`` takes (CIFAR python batches or an
ImageFolder tree).
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L  # noqa: E402

from tasks.robust_cnn import attacks  # noqa: E402
from tasks.robust_cnn.data import RobustCNNDataModule  # noqa: E402
from tasks.robust_cnn.model import RobustCNN, count_flops  # noqa: E402
from tasks.robust_cnn.module import RobustCNNModule  # noqa: E402

# the model keys shared by every config in configs/robust_cnn (CPU-sized ResNet, MNIST threat model)
BASE = dict(arch="resnet", width=16, blocks=[1, 1, 1], num_experts=2, k=1, router="shared",
            router_widths=[8, 16], epsilon=0.1, train_step_size=0.0625, train_steps=2, beta=6.0,
            test_epsilon=0.1, test_step_size=0.025, test_steps=10, val_steps=1, lr=0.1)
MOE = dict(moe=True, width_ratio=0.5)
DENSE_AT_FLOPS = dict(moe=False, width_ratio="flops_matched", match_width_ratio=0.5)

# name -> (group, model overrides, long schedule?)
ROWS: dict[str, tuple[str, dict, bool]] = {
    "nat_dense_full": ("natural", dict(moe=False, width_ratio=1.0, mode="standard"), False),
    "nat_dense_at_flops": ("natural", dict(DENSE_AT_FLOPS, mode="standard"), False),
    "nat_moe": ("natural", dict(MOE, mode="standard"), False),
    "nat_moe_gate_st_scores": ("natural", dict(MOE, mode="standard", gate="straight_through_scores"), False),
    "nat_moe_gate_st_softmax": ("natural", dict(MOE, mode="standard", gate="straight_through"), False),
    "nat_moe_router_lr_0.01": ("natural", dict(MOE, mode="standard", router_lr=0.01), False),
    "nat_moe_router_lr_0": ("natural", dict(MOE, mode="standard", router_lr=0.0), False),
    "nat_moe_per_layer": ("natural", dict(MOE, mode="standard", router="per_layer"), False),
    "nat_moe_top2_soft": ("natural", dict(MOE, mode="standard", k=2), False),
    "nat_moe_expert_bn": ("natural", dict(MOE, mode="standard", expert_norm=True), False),
    "dense_at_flops": ("adversarial", dict(DENSE_AT_FLOPS, mode="trades"), False),
    "moe_at": ("adversarial", dict(MOE, mode="trades"), False),
    "advmoe": ("adversarial", dict(MOE, mode="advmoe"), False),
    "advmoe_gate_st_scores": ("adversarial", dict(MOE, mode="advmoe", gate="straight_through_scores"), False),
    "advmoe_public_router_loss": ("adversarial", dict(MOE, mode="advmoe", router_alpha=6.0, router_task_weight=0.0), False),
    "advmoe_router_ce_6": ("adversarial", dict(MOE, mode="advmoe", router_alpha=6.0), False),
    "advmoe_st_scores_router_ce_6": ("adversarial", dict(MOE, mode="advmoe", gate="straight_through_scores",
                                                         router_alpha=6.0, router_task_weight=1.0), False),
    "advmoe_router_lr_0.01": ("adversarial", dict(MOE, mode="advmoe", router_lr=0.01), False),
    "advmoe_per_layer": ("adversarial", dict(MOE, mode="advmoe", router="per_layer"), False),
    "advmoe_expert_bn": ("adversarial", dict(MOE, mode="advmoe", expert_norm=True), False),
    "dense_at_flops_long": ("schedule", dict(DENSE_AT_FLOPS, mode="trades"), True),
    "advmoe_long": ("schedule", dict(MOE, mode="advmoe"), True),
}
QUICK_ROWS = ["nat_dense_at_flops", "nat_moe", "nat_moe_gate_st_scores", "dense_at_flops", "moe_at", "advmoe"]


def load_model_defaults() -> dict:
    """AdvMoE keys as configs/robust_cnn/moe_advmoe.yaml sets them (router loss, gate)."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/robust_cnn/moe_advmoe.yaml").read_text())
    args = cfg["model"]["init_args"]
    keys = ("router_alpha", "router_task_weight", "attack_router_weight", "gate", "router_lr")
    return {k: args[k] for k in keys if k in args}


def expert_table(model: RobustCNN, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Share of images per expert and each expert's clean accuracy on them (first MoE layer)."""
    if not model.moe:
        return [], []
    with torch.no_grad():
        pred = model(x).argmax(-1)
    choice = model.moe_layers[0].last_routing.indices[:, 0]
    share, acc = [], []
    for e in range(model.moe_layers[0].num_experts):
        sel = choice == e
        share.append(float(sel.float().mean()))
        acc.append(float((pred[sel] == y[sel]).float().mean()) if sel.any() else float("nan"))
    return share, acc


def run_one(overrides: dict, seed: int, args, dm: RobustCNNDataModule, workdir: Path) -> dict:
    epochs = args.long_epochs if overrides.pop("_long", False) else args.epochs
    L.seed_everything(seed, workers=True, verbose=False)
    module = RobustCNNModule(**{**BASE, **overrides})
    module.on_data(dm)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(workdir))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    model = module.model.eval()
    x, y = dm.tensors["test"]
    h = module.hparams
    with torch.no_grad():
        sa = float((model(x).argmax(-1) == y).float().mean())
    x_adv = attacks.pgd(model, x, attacks.ce_objective(y), h.test_epsilon, h.test_step_size, h.test_steps, "linf")
    with torch.no_grad():
        ra = float((model(x_adv).argmax(-1) == y).float().mean())
    share, acc = expert_table(model, x, y)
    sample = x[:1]
    full = RobustCNN(in_channels=dm.in_channels, num_classes=dm.num_classes, moe=False, width_ratio=1.0,
                     **{k: BASE[k] for k in ("arch", "width", "blocks")})
    return dict(sa=sa, ra=ra, share=share, expert_acc=acc, train_s=train_s,
                flops=count_flops(model, sample) / count_flops(full, sample))


def fmt(values: list[float]) -> str:
    """mean ± std over the seeds that have a value (an expert no image chose has no accuracy)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return "—"
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all; --quick: a subset)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--long-epochs", type=int, default=16)
    p.add_argument("--max-train", type=int, default=1000, help="training images")
    p.add_argument("--max-eval", type=int, default=200, help="test images (PGD-10 on each)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-root", help="CIFAR python batches or ImageFolder (default: built-in MNIST at 14x14)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 seed, 600 images, the main rows only")
    p.add_argument("--out", help="folder for ablation.md and ablation.csv")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.max_train, args.max_eval = 1, 600, 100
        args.rows = args.rows or QUICK_ROWS
    rows = args.rows or list(ROWS)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = RobustCNNDataModule(root=args.data_root, dataset="mnist", builtin_size=None if args.data_root else 14,
                             batch_size=args.batch_size, max_train=args.max_train, max_eval=args.max_eval,
                             val_fraction=0.06, test_fraction=0.06)
    defaults = load_model_defaults()
    print(f"data: {args.data_root or 'built-in MNIST 14x14'}, {len(dm.tensors['train'][0])} train / "
          f"{len(dm.tensors['test'][0])} test images, {args.epochs} epochs (long: {args.long_epochs}), "
          f"batch {args.batch_size}, seeds 0-{args.seeds - 1}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            group, overrides, long = ROWS[name]
            runs = []
            for seed in range(args.seeds):
                kw = {**(defaults if overrides.get("mode") == "advmoe" else {}), **overrides}
                if overrides.get("moe") and "gate" not in overrides and "gate" in defaults:
                    kw["gate"] = defaults["gate"]
                kw["_long"] = long
                runs.append(run_one(kw, seed, args, dm, Path(tmp)))
            res = dict(row=name, group=group, epochs=args.long_epochs if long else args.epochs,
                       sa=fmt([r["sa"] for r in runs]), ra=fmt([r["ra"] for r in runs]),
                       expert_share=" / ".join(fmt([r["share"][e] for r in runs]) for e in range(len(runs[0]["share"]))),
                       expert_acc=" / ".join(fmt([r["expert_acc"][e] for r in runs]) for e in range(len(runs[0]["expert_acc"]))),
                       flops=f"{np.mean([r['flops'] for r in runs]):.2f}",
                       train_s=f"{np.mean([r['train_s'] for r in runs]):.0f}")
            results.append(res)
            print(" | ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    cols = ["row", "group", "epochs", "sa", "ra", "expert_share", "expert_acc", "flops", "train_s"]
    head = ("| row | group | epochs | SA | RA PGD-10 | images per expert | expert accuracy | "
            "active FLOPs / full dense | train s |")
    lines = [head, "|" + "---|" * len(cols)] + ["| " + " | ".join(str(r[c]) or "—" for c in cols) + " |" for r in results]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.md").write_text(table + "\n")
        with open(out / "ablation.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(results)


if __name__ == "__main__":
    main()
