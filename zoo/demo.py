"""``make demo``: a few minutes, offline, showing the zoo's point: MoE vs its dense twin.

1. The MoE layer alone: a regressor with an MoE FFN (4 experts, top-1) and one with the dense
   FFN of equal active parameters fit a function that is different in each of 4 regions.
2. A real task end to end: ``zoo compare`` of the stock task's MIGA (MoE) and dense configs on
   the 20 S&P 500 stocks skfolio ships, 2 seeds, shortened by overrides; prints the table and
   where the PNGs are.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from zoo.moe import DenseFFN, MoE, aux_loss, dense_twin_hidden, routing_stats

ROOT = Path(__file__).resolve().parent.parent


def piecewise(n: int, seed: int):
    """Four regions of the plane, each with its own target function of the local offset."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, -3.0]])
    region = torch.randint(0, 4, (n,), generator=g)
    local = torch.rand(n, 2, generator=g) * 2 - 1
    freq = torch.tensor([[3.0, 0.5], [-2.0, 2.5], [0.5, -3.5], [-3.0, -1.5]])
    y = torch.sin((local * freq[region]).sum(-1) * 1.5) + 0.5 * torch.cos(3 * local[:, 0] * (region.float() - 1.5))
    return centers[region] + local, y[:, None], region


def layer_demo(steps: int = 800) -> None:
    x, y, _ = piecewise(2048, 0)
    xt, yt, rt = piecewise(2048, 1)
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, k=1)
    nets = {"moe (4 experts, top-1)": moe, "dense twin": DenseFFN(16, dense_twin_hidden(moe))}
    print("1) MoE layer vs dense twin on a 4-region piecewise function")
    print(f"   {'model':<24} {'total params':>12} {'active params':>13} {'test MSE':>9}")
    for name, ffn in nets.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), ffn, nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) + aux_loss(model)).backward()
            opt.step()
        with torch.no_grad():
            mse = nn.functional.mse_loss(model(xt), yt).item()
        total = sum(p.numel() for p in ffn.parameters())
        active = total - (ffn.inactive_param_count() if isinstance(ffn, MoE) else 0)
        print(f"   {name:<24} {total:>12,} {active:>13,} {mse:>9.4f}")
    top = moe.last_routing.top1_per_token()
    agree = [torch.bincount(top[rt == r], minlength=4).float() for r in range(4)]
    print("   expert chosen per region (share of test points):")
    for r, counts in enumerate(agree):
        share = counts / counts.sum()
        print(f"     region {r}: " + "  ".join(f"e{i} {s:.2f}" for i, s in enumerate(share)))
    print(f"   layer stats: {routing_stats(moe)['moe']['load']}")


def task_demo() -> None:
    from zoo.compare import compare

    out = Path("runs/demo/stock")
    print("\n2) zoo compare on a real task: stock (MIGA vs dense twin, 20 S&P 500 stocks), 2 seeds")
    compare([ROOT / "configs/stock/moe.yaml", ROOT / "configs/stock/dense.yaml"], seeds=2, out=out,
            overrides=["--trainer.max_epochs=2", "--trainer.limit_train_batches=20"])
    print(f"PNGs: {out / 'compare.png'}, routing heatmaps under {out / 'runs'}/*/seed*/routing_*.png")


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    layer_demo()
    task_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
