"""Expert parallelism: 2 gloo processes on the CPU match the single-process layer exactly."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from zoo.moe import MoE
from zoo.moe.parallel import ddp_ignore_expert_params, expert_param_names

DIM, HIDDEN, E, K = 12, 20, 4, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_layer():
    torch.manual_seed(0)
    return MoE(DIM, HIDDEN, num_experts=E, k=K)


def rank_inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 7 + rank, DIM, generator=g)  # ranks hold different token counts


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = reference_layer()
        ep = MoE(DIM, HIDDEN, num_experts=E, k=K, expert_parallel=True)
        assert ep.expert_parallel and ep.experts.num_experts == E // world
        lo, hi = rank * (E // world), (rank + 1) * (E // world)
        with torch.no_grad():
            ep.router.load_state_dict(full.router.state_dict())
            for name, p in ep.experts.named_parameters():
                p.copy_(getattr(full.experts, name)[lo:hi])
        x = rank_inputs(rank).requires_grad_(True)
        y = ep(x)
        (y.pow(2).sum() + ep.aux_loss).backward()
        torch.save({"y": y.detach(), "x_grad": x.grad, "router_grad": ep.router.gate.weight.grad,
                    "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
                    "ignored": ddp_ignore_expert_params(nn.Sequential(ep))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_expert_parallel_forward_and_backward_equal_single_process(tmp_path):
    world = 2
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    full = reference_layer()
    full_grads = {n: torch.zeros_like(p) for n, p in full.experts.named_parameters()}
    router_grad = torch.zeros_like(full.router.gate.weight)
    for rank, res in enumerate(results):
        full.zero_grad()
        x = rank_inputs(rank).requires_grad_(True)
        y = full(x)
        (y.pow(2).sum() + full.aux_loss).backward()
        torch.testing.assert_close(res["y"], y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["x_grad"], x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["router_grad"], full.router.gate.weight.grad, atol=1e-5, rtol=1e-5)
        for n, p in full.experts.named_parameters():
            full_grads[n] += p.grad
    # each rank's expert grads are the sum over every rank's tokens routed to its experts
    for rank, res in enumerate(results):
        lo, hi = rank * (E // world), (rank + 1) * (E // world)
        for n, g in res["expert_grads"].items():
            torch.testing.assert_close(g, full_grads[n][lo:hi], atol=1e-5, rtol=1e-5)
        assert sorted(res["ignored"]) == ["0.experts.b1", "0.experts.b2", "0.experts.w1", "0.experts.w2"]


def test_expert_parallel_falls_back_to_local_experts_in_one_process():
    moe = MoE(DIM, HIDDEN, num_experts=E, k=K, expert_parallel=True)
    assert not moe.expert_parallel and moe.experts.num_experts == E
    assert expert_param_names(moe) == []
    assert moe(torch.randn(5, DIM)).shape == (5, DIM)
