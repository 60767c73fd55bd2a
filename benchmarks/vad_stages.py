"""Stage-by-stage diagnosis of GS-MoE on the built-in data (tasks/vad).

Trains one task encoder (MIL, then MIL + TGS), then trains several heads on top of copies of
that same encoder (class experts averaged, experts + gate, the dense twin), and prints for each
the test frame AUC, the per-class AUC, every expert's AUC on each class (normal videos + that
class) and the gate's mean attention per class. One encoder for all heads isolates what the
heads add.

    python benchmarks/vad_stages.py --encoder 6 --tgs 10 --experts 8 --gate 4 \
        [--model '{"expert_input": "both"}'] [--data '{"shared_fraction": 0.0}']

The heads follow the module's default wiring (the paper's: ``expert_input: task``); pass
``--model '{"expert_input": "both"}'`` for moe_both.yaml's.

``--probe`` instead trains pointwise read-outs of the raw snippets with top-k MIL (no encoder):
one per class on that class's anomalous videos plus the normal ones, and one shared by all
classes, and prints their per-class frame AUC -- whether the data rewards class experts.
"""
from __future__ import annotations

import argparse
import copy
import json

import lightning as L
import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from tasks.vad.data import VADDataModule
from tasks.vad.module import VADModule


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     check_val_every_n_epoch=10 ** 6)


@torch.no_grad()
def evaluate(module: VADModule, dm: VADDataModule) -> dict:
    """Frame AUC of every branch, per class, and gate attention per class."""
    module.eval()
    m = module.model
    rows = {"final": [], "encoder": [], "experts": []}
    gt, cls, usage = [], [], {}
    for v in dm.test_videos:
        x = torch.from_numpy(v.features)[None]
        parts = m.forward_parts(x)
        rows["final"].append(parts["final"][0])
        rows["encoder"].append(parts["encoder"][0])
        if "experts" in parts:
            rows["experts"].append(parts["experts"][0])               # [T, E]
        g = torch.from_numpy(v.frame_gt).view(-1, 16).max(1).values
        gt.append(g)
        c = dm.classes.index(v.class_name) if v.label else -1
        cls.append(torch.full_like(g, c))
        if m.gate is not None:
            usage.setdefault(c, []).append(m.gate.last_routing.probs.mean(0))
            usage.setdefault(f"task{c}", []).append(
                torch.tensor(m.gate.last_routing.extra["task_share"]))
    y, c = torch.cat(gt).long(), torch.cat(cls)

    def auc(s, sel=None):
        if sel is not None:
            s, yy = s[sel], y[sel]
        else:
            yy = y
        return round(float(binary_auroc(s, yy)), 3)

    out = {}
    for name in ("final", "encoder"):
        s = torch.cat(rows[name])
        out[name] = {"all": auc(s), **{dm.classes[k]: auc(s, (c == -1) | (c == k))
                                       for k in range(len(dm.classes))}}
    if rows["experts"]:
        s = torch.cat(rows["experts"])                               # [N, E]
        K = len(dm.classes)
        out["expert_x_class"] = [[auc(s[:, e], (c == -1) | (c == k)) for k in range(K)]
                                 for e in range(s.shape[1])]
        out["experts_mean"] = auc(s.mean(1))
        out["experts_max"] = auc(s.max(1).values)
    if usage:
        out["gate_usage"] = {("Normal" if k == -1 else dm.classes[k]) if isinstance(k, int) else k:
                             [round(float(u), 2) for u in torch.stack(v).mean(0).flatten()]
                             for k, v in usage.items()}
    return out


def probe(dm: VADDataModule, steps: int = 600) -> None:
    """Per-class vs shared pointwise MLP read-outs of raw snippets, trained with top-k MIL."""
    from tasks.vad.losses import mil_loss

    def fit(videos):
        x = torch.tensor(np.stack([v.features for v in videos]))              # [N, T, C]
        y = torch.tensor([float(v.label) for v in videos])
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[-1], 32), torch.nn.GELU(),
                                  torch.nn.Linear(32, 1))
        opt = torch.optim.AdamW(net.parameters(), 3e-3)
        for _ in range(steps):
            i = torch.randint(0, len(videos), (16,))
            loss = mil_loss(torch.sigmoid(net(x[i]).squeeze(-1)), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net

    def auc(net, name):
        vids = [v for v in dm.test_videos if not v.label or v.class_name == name]
        with torch.no_grad():
            s = torch.cat([net(torch.from_numpy(v.features)).squeeze(-1) for v in vids])
        y = torch.cat([torch.from_numpy(v.frame_gt).view(-1, 16).max(1).values for v in vids])
        return round(float(binary_auroc(s, y.long())), 3)

    shared = fit(dm.train_videos)
    for name in dm.classes:
        own = fit([v for v in dm.train_videos if not v.label or v.class_name == name])
        print(f"probe {name}: own-class read-out AUC {auc(own, name)}, "
              f"shared read-out AUC {auc(shared, name)}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", type=int, default=6)
    p.add_argument("--tgs", type=int, default=10)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--gate", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", default="mean,moe,dense")
    p.add_argument("--model", default="{}", help="JSON of extra VADModule keys")
    p.add_argument("--data", default="{}", help="JSON of VADDataModule keys")
    p.add_argument("--probe", action="store_true", help="pointwise MIL read-outs only")
    a = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(a.seed, verbose=False)
    dm = VADDataModule(**json.loads(a.data))
    if a.probe:
        probe(dm)
        return
    extra = json.loads(a.model)
    base = VADModule(variant="encoder", stages={"encoder": a.encoder, "tgs": a.tgs}, **extra)
    base.on_data(dm)
    trainer(a.encoder + a.tgs).fit(base, datamodule=dm)
    print("encoder", json.dumps(evaluate(base, dm)["encoder"]), flush=True)
    for variant in a.heads.split(","):
        L.seed_everything(a.seed, verbose=False)
        stages = {"experts": a.experts, "gate": a.gate} if variant != "mean" else {
            "experts": a.experts + a.gate}
        mod = VADModule(variant=variant, stages=stages, **extra)
        mod.on_data(dm)
        mod.model.encoder.load_state_dict(copy.deepcopy(base.model.encoder.state_dict()))
        trainer(a.experts + a.gate).fit(mod, datamodule=dm)
        print(variant, json.dumps(evaluate(mod, dm)), flush=True)


if __name__ == "__main__":
    main()
