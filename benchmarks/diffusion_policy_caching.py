"""Inference cost of MoDE's expert caching: cached vs uncached MoE vs the dense twin.

Prints, per batch size, FLOPs and median wall time per action chunk (a full DDIM sampling
run of ``num_sampling_steps`` denoiser calls), the active parameters, the time to build
the cache, and the max |cached - uncached| on the same noise.

    .venv/bin/python benchmarks/diffusion_policy_caching.py                 # configs/diffusion_policy sizes
    .venv/bin/python benchmarks/diffusion_policy_caching.py --ckpt runs/diffusion_policy/moe/checkpoints/last.ckpt
    .venv/bin/python benchmarks/diffusion_policy_caching.py --dim 256 --depth 8   # a bigger model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.diffusion_policy.metrics import count_flops, time_ms  # noqa: E402
from tasks.diffusion_policy.module import DiffusionPolicyModule  # noqa: E402
from zoo.flops import param_counts  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a trained MoE checkpoint (default: fresh weights, routers randomised)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per chunk")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.ckpt:
        moe = DiffusionPolicyModule.load_from_checkpoint(args.ckpt, weights_only=True, map_location="cpu")
        hp = dict(moe.hparams)
        hp.update(ffn="dense")
        dense = DiffusionPolicyModule(**hp)
    else:
        kw = dict(dim=args.dim, depth=args.depth, heads=args.heads, num_sampling_steps=args.steps, ema_decay=0)
        moe = DiffusionPolicyModule(ffn="moe", **kw)
        dense = DiffusionPolicyModule(ffn="dense", **kw)
        g = torch.Generator().manual_seed(1)
        for layer in moe.model.moe_layers():  # fresh routers (normal(0, 0.02)) are near-uniform: sharpen them
            w = layer.router.gate[2].weight
            w.data = torch.randn(w.shape, generator=g) * 2
    moe.eval(), dense.eval()
    hp = moe.hparams

    t0 = time.perf_counter()
    cache = moe.expert_cache_for(moe.sigmas())
    build_ms = (time.perf_counter() - t0) * 1e3
    distinct = len({f.experts for step in cache for f in step})

    _, active_moe = param_counts(moe.model)
    total_moe = sum(q.numel() for q in moe.model.parameters())
    _, active_dense = param_counts(dense.model)
    print(f"# MoDE expert caching: dim={hp.dim} depth={hp.depth} experts={hp.num_experts} k={hp.k} "
          f"steps={hp.num_sampling_steps} threads={args.threads}")
    print(f"params: MoE total {total_moe:,} / active {active_moe:,}; dense twin {active_dense:,}")
    print(f"cache build: {build_ms:.1f} ms ({len(cache)} steps x {len(cache[0])} layers, "
          f"{distinct} distinct expert sets)\n")
    print("| batch | path | GFLOPs / chunk | ms / chunk | speed-up vs uncached |")
    print("|---|---|---|---|---|")
    for b in args.batch:
        obs = torch.randn(b, hp.n_obs_steps, hp.obs_dim)
        task = torch.randint(0, hp.num_tasks, (b,))
        noise = torch.randn(b, hp.chunk, hp.act_dim)
        paths = {"MoE uncached": lambda: moe.sample(obs, task, use_cache=False, noise=noise),
                 "MoE cached": lambda: moe.sample(obs, task, use_cache=True, noise=noise),
                 "dense twin": lambda: dense.sample(obs, task, noise=noise)}
        gap = float((paths["MoE cached"]() - paths["MoE uncached"]()).abs().max())
        base = None
        for name, fn in paths.items():
            flops = count_flops(fn)
            ms = time_ms(fn, repeats=args.repeats)
            base = base or ms
            print(f"| {b} | {name} | {flops / 1e9:.4f} | {ms:.2f} | {base / ms:.2f}x |")
        print(f"| {b} | max abs(cached - uncached) | {gap:.2e} | | |")


if __name__ == "__main__":
    main()
