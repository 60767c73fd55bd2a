"""LightningModule of the robust CNN task: clean training, PGD-AT, TRADES and AdvMoE.

Training modes (``mode``):

- ``"standard"``: cross-entropy on clean images.
- ``"pgd_at"``: Madry et al. 2018, ``min_theta E max_{||d|| <= eps} CE(f(x + d), y)``; the attack is
  PGD from a uniform random start.
- ``"trades"``: Zhang et al. 2019, eq. 5: ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` with ``x'``
  maximising the KL term; for an MoE this trains experts and router jointly (the "MoE + AT"
  baseline AdvMoE improves on).
- ``"advmoe"``: AdvMoE's alternating bi-level schedule (Zhang et al. ICCV 2023, Alg. 1), per
  mini-batch:

  1. expert step -- attack with the TRADES objective on classifier *and* routing distributions,
     then update experts + backbone with the TRADES loss, router frozen;
  2. router step -- attack again (experts just changed), then update the router only with
     ``router_task_weight * TRADES(theta; psi) + router_alpha * CE(r(x), y mod E)
     + beta * KL(q(x) || q(x'))``. The public code uses only the last two terms
     (``router_task_weight = 0``); the paper's lower-level problem is the TRADES loss of the
     whole model w.r.t. the router (``router_task_weight = 1``, the default here), which reaches
     the router through the straight-through gate.

Training attacks default to the public code: 2 steps of 5/255 inside 8/255 from
``0.001 * N(0, 1)``; evaluation is PGD-10, step 2/255, eps 8/255, random start.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from zoo.module import ZooModule

from . import attacks
from .metrics import AttackConfig, accuracy, robust_metrics
from .model import RobustCNN, flops_matched_ratio

MODES = ("standard", "pgd_at", "trades", "advmoe")


@contextlib.contextmanager
def frozen(params):
    """Temporarily set ``requires_grad=False`` on ``params`` (no grads are computed for them)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class RobustCNNModule(ZooModule):
    """Adversarially robust (MoE) CNN classifier.

    Model keys: ``arch, moe, width, blocks, widen, width_ratio, num_experts, k, router,
    router_widths, balance_weight, gate, expert_norm`` (see :class:`tasks.robust_cnn.model.RobustCNN`);
    ``width_ratio="flops_matched"`` builds a dense model whose FLOPs equal those of the MoE with
    ``match_width_ratio`` (the FLOPs-matched dense twin). ``in_channels``, ``num_classes`` and
    ``input_size`` are overwritten from the data in :meth:`on_data`.

    Training keys: ``mode``, ``epsilon``, ``train_step_size``, ``train_steps``, ``beta``
    (TRADES), ``router_alpha`` (router CE toward ``y mod E``), ``router_task_weight``,
    ``attack_router_weight`` (weight of the routing KL in AdvMoE's training attack), SGD
    ``lr, momentum, weight_decay`` with cosine decay over ``max_epochs``, ``router_lr``.

    Evaluation keys: ``test_epsilon, test_step_size, test_steps, test_norm`` (PGD),
    ``val_steps`` (cheaper PGD for model selection), ``eval_router_weight`` (router term of the
    joint attack, public ``beta``), ``label_router_targets`` (router attack targets ``y mod E``
    instead of the clean choice), ``autoattack`` (needs ``torchattacks``).
    """

    monitor_mode = "max"

    @property
    def monitor(self) -> str:
        """Best checkpoint by clean accuracy for clean training, by robust accuracy otherwise."""
        return "val/sa" if self.hparams.mode == "standard" else "val/ra"

    def __init__(self, arch: str = "resnet", moe: bool = True, width: int | None = None,
                 blocks: list[int] | None = None, widen: int = 10, width_ratio: float | str = 0.5,
                 match_width_ratio: float = 0.5, num_experts: int = 2, k: int = 1, router: str = "shared",
                 router_widths: list[int] | None = None, balance_weight: float = 0.0,
                 gate: str = "softmax", expert_norm: bool = False, mode: str = "advmoe", epsilon: float = 8 / 255, train_step_size: float = 5 / 255,
                 train_steps: int = 2, beta: float = 6.0, router_alpha: float = 6.0,
                 router_task_weight: float = 1.0, attack_router_weight: float = 1.0,
                 test_epsilon: float = 8 / 255, test_step_size: float = 2 / 255, test_steps: int = 10,
                 test_norm: str = "linf", val_steps: int = 5, eval_router_weight: float = 6.0,
                 label_router_targets: bool = False, autoattack: bool = False,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, router_lr: float | None = None,
                 in_channels: int = 3, num_classes: int = 10, input_size: int = 32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.mode must be one of {MODES}, got {mode!r}")
        if mode == "advmoe" and not moe:
            raise ValueError("model.mode='advmoe' needs an MoE model (model.moe=true); "
                             "use 'trades' or 'pgd_at' for dense models")
        if isinstance(width_ratio, str) and (width_ratio != "flops_matched" or moe):
            raise ValueError(f"model.width_ratio must be a number, or 'flops_matched' for a dense model; "
                             f"got {width_ratio!r} with moe={moe}")
        if test_norm not in ("linf", "l2"):
            raise ValueError(f"model.test_norm must be 'linf' or 'l2', got {test_norm!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = self.build_model()

    # ------------------------------------------------------------------ model
    def build_model(self) -> RobustCNN:
        h = self.hparams
        kw = dict(arch=h.arch, width=h.width, blocks=h.blocks, widen=h.widen, num_experts=h.num_experts,
                  k=h.k, router=h.router, router_widths=h.router_widths, balance_weight=h.balance_weight,
                  gate=h.gate, expert_norm=h.expert_norm)
        ratio = h.width_ratio
        if ratio == "flops_matched":
            ratio = flops_matched_ratio((h.in_channels, h.input_size, h.input_size), h.num_classes,
                                        dict(kw, width_ratio=h.match_width_ratio))
            self.matched_width_ratio = ratio
        return RobustCNN(in_channels=h.in_channels, num_classes=h.num_classes, moe=h.moe,
                         width_ratio=float(ratio), **kw)

    def on_data(self, datamodule) -> None:
        """Shape the network from the data: channels, classes and image size."""
        h = self.hparams
        shape = (datamodule.in_channels, datamodule.num_classes, datamodule.image_size)
        if shape != (h.in_channels, h.num_classes, h.input_size):
            h.in_channels, h.num_classes, h.input_size = shape
            self.model = self.build_model()
            self._hparams_initial = copy.deepcopy(self._hparams)  # logged hparams show the real shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # [B, num_classes]

    def flops_inputs(self) -> tuple:
        h = self.hparams
        return (torch.zeros(1, h.in_channels, h.input_size, h.input_size, device=self.device),)

    # ------------------------------------------------------------------ losses
    def _trades_attack(self, x: torch.Tensor, router_weight: float) -> torch.Tensor:
        """TRADES inner max (eval-mode BN, as the public code), optionally on the routing KL too."""
        h = self.hparams
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            nat = self.model(x)
            routes = attacks.route_logits(self.model)
        x_adv = attacks.pgd(self.model, x, attacks.trades_objective(nat, routes, router_weight),
                            h.epsilon, h.train_step_size, h.train_steps, "linf", random_start="trades")
        self.model.train(was)
        return x_adv

    def _trades_loss(self, x, x_adv, y):
        """``CE(f(x), y) + beta * KL(p(x) || p(x'))`` (batch mean), plus routing scores of both."""
        logits = self.model(x)
        routes_nat = attacks.route_logits(self.model)
        logits_adv = self.model(x_adv)
        routes_adv = attacks.route_logits(self.model)
        kl = F.kl_div(logits_adv.log_softmax(-1), logits.softmax(-1), reduction="batchmean")
        ce = F.cross_entropy(logits, y)
        return ce + self.hparams.beta * kl, logits, routes_nat, routes_adv

    def expert_step(self, x: torch.Tensor, y: torch.Tensor, optimizer) -> torch.Tensor:
        """AdvMoE step 1: attack, then update experts/backbone with TRADES; router frozen."""
        x_adv = self._trades_attack(x, self.hparams.attack_router_weight)
        with frozen(self.model.router_parameters()):
            loss, logits, _, _ = self._trades_loss(x, x_adv, y)
            self.manual_step(self.with_aux(loss), optimizer)  # DDP-safe: two backward passes per step
        self.log("train/acc", accuracy(logits, y), prog_bar=True, batch_size=len(y))
        return loss.detach()

    def router_step(self, x: torch.Tensor, y: torch.Tensor, optimizer) -> torch.Tensor:
        """AdvMoE step 2: attack the updated model, then update the router only."""
        h = self.hparams
        x_adv = self._trades_attack(x, h.attack_router_weight)
        with frozen(self.model.expert_parameters()):
            task, _, routes_nat, routes_adv = self._trades_loss(x, x_adv, y)
            ce_r = sum(F.cross_entropy(r, y % r.shape[-1]) for r in routes_nat)  # router CE toward y mod E
            kl_r = sum(F.kl_div(a.log_softmax(-1), r.softmax(-1), reduction="batchmean")
                       for r, a in zip(routes_nat, routes_adv))
            loss = h.router_task_weight * task + h.router_alpha * ce_r + h.beta * kl_r
            self.manual_step(loss, optimizer)
        self.log("train/router_loss", loss.detach(), batch_size=len(y))
        self.log("train/router_ce", ce_r.detach(), batch_size=len(y))
        return loss.detach()

    def predict_step(self, batch, batch_idx):
        """Class, class probabilities and label of each test image (clean inputs)."""
        x, y = batch
        prob = self(x).softmax(-1)
        return {"pred": prob.argmax(-1), "prob": prob, "label": y}

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.hparams
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        if h.mode == "advmoe":
            loss = self.expert_step(x, y, opts[0])
            self.router_step(x, y, opts[1])
        else:
            if h.mode == "standard":
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)
            elif h.mode == "pgd_at":
                was = self.model.training
                self.model.eval()
                x_adv = attacks.pgd(self.model, x, attacks.ce_objective(y), h.epsilon, h.train_step_size,
                                    h.train_steps, "linf", random_start=True)
                self.model.train(was)
                logits = self.model(x_adv)
                loss = F.cross_entropy(logits, y)
            else:  # trades, all parameters jointly
                x_adv = self._trades_attack(x, 0.0)
                loss, logits, _, _ = self._trades_loss(x, x_adv, y)
            self.manual_step(self.with_aux(loss), opts[0])
            self.log("train/acc", accuracy(logits, y), prog_bar=True, batch_size=len(y))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        scheds = self.lr_schedulers()
        for s in scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []:
            s.step()

    def configure_optimizers(self):
        h = self.hparams
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1

        def sgd(params, lr):
            opt = torch.optim.SGD(params, lr=lr, momentum=h.momentum, weight_decay=h.weight_decay)
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

        if h.mode == "advmoe":
            opt_e, sch_e = sgd(self.model.expert_parameters(), h.lr)
            opt_r, sch_r = sgd(self.model.router_parameters(), h.lr if h.router_lr is None else h.router_lr)
            return [opt_e, opt_r], [sch_e, sch_r]
        router = self.model.router_parameters()
        groups = [{"params": self.model.expert_parameters()}]
        if router:  # the router's own learning rate in the joint optimiser too
            groups.append({"params": router, "lr": h.lr if h.router_lr is None else h.router_lr})
        opt, sch = sgd(groups, h.lr)
        return [opt], [sch]

    # ------------------------------------------------------------------ evaluation
    def attack_config(self, steps: int | None = None) -> AttackConfig:
        h = self.hparams
        return AttackConfig(h.test_epsilon, h.test_step_size, h.test_steps if steps is None else steps, h.test_norm)

    def validation_step(self, batch, batch_idx):
        cfg = self.attack_config(self.hparams.val_steps)
        with torch.inference_mode(False), torch.enable_grad():  # attacks need input gradients
            x, y = (t.clone() for t in batch)
            with torch.no_grad():
                sa = accuracy(self.model(x), y)
            x_adv = attacks.pgd(self.model, x, attacks.ce_objective(y), cfg.eps, cfg.step_size, cfg.steps, cfg.norm)
            with torch.no_grad():
                ra = accuracy(self.model(x_adv), y)
        self.log("val/sa", sa, prog_bar=True, batch_size=len(y))
        self.log("val/ra", ra, prog_bar=True, batch_size=len(y))

    def test_step(self, batch, batch_idx):
        h = self.hparams
        with torch.inference_mode(False), torch.enable_grad():  # attacks need input gradients
            x, y = (t.clone() for t in batch)
            out = robust_metrics(self.model, x, y, self.attack_config(), h.eval_router_weight,
                                 h.label_router_targets, h.autoattack)
        for name, v in out.items():
            self.log(f"test/{name}", v, batch_size=len(y))
        with torch.no_grad():
            self.model(x)  # clean forward so the routing record is that of the clean images
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        self.record_routing(y, names)
