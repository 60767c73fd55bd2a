"""LightningModule of the MoDE diffusion policy (training, sampling, evaluation, caching)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from zoo.moe.parallel import gather_expert_state, slice_expert_state
from zoo.module import ZooModule

from .edm import edm_loss, exponential_sigmas, precondition, sample_ddim, sample_log_logistic
from .metrics import ActionMSE, evaluate_policy
from .model import MoDEDenoiser


class DiffusionPolicyModule(ZooModule):
    """MoDE policy: EDM-preconditioned noise-routed MoE diffusion transformer over action chunks.

    Model args (``ffn`` ... ``image_weights``) go to ``MoDEDenoiser``. Diffusion: ``sigma_data``,
    training sigmas from the truncated log-logistic density on [sigma_min, sigma_max], DDIM
    on an exponential schedule with ``num_sampling_steps``. ``expert_cache`` fuses each step's
    experts before sampling (MoE only). ``execute_steps`` actions of each chunk run in the env
    before re-planning (default: the whole chunk). Optimiser: AdamW(lr, betas, weight_decay)
    with linear warm-up then cosine decay; EMA of the weights with ``ema_decay`` (0 = off)
    is what validation, test and the final model use. Shapes (``obs_dim``, ``act_dim``,
    ``num_tasks``, ``chunk``, ``n_obs_steps``, ``image_shapes``, ``goal_texts``) are set from
    the datamodule in ``on_data``. With an evaluation environment and ``data.val_episodes`` > 0
    the best checkpoint is chosen by closed-loop ``val/success_rate``, else by ``val/action_mse``.
    """

    monitor = "val/action_mse"
    monitor_mode = "min"

    def __init__(self, ffn: str = "moe", dim: int = 64, depth: int = 4, heads: int = 4,
                 num_experts: int = 4, k: int = 2, expert_hidden: int | None = None,
                 sample_train: bool = True, balance_weight: float = 0.01, causal: bool = True,
                 attn_dropout: float = 0.3, goal_dropout: float = 0.1, balance: str = "mode",
                 router_init: str = "normal", route_on: str = "noise", goal_encoder: str = "words",
                 image_width: int = 64, image_weights: str | None = None,
                 obs_dim: int = 12, act_dim: int = 2, num_tasks: int = 3, chunk: int = 10,
                 n_obs_steps: int = 1, image_shapes: dict | None = None, goal_texts: list | None = None,
                 sigma_data: float = 0.5,
                 sigma_min: float = 1e-3, sigma_max: float = 80.0, num_sampling_steps: int = 10,
                 expert_cache: bool = True, execute_steps: int | None = None,
                 lr: float = 1e-4, betas: tuple = (0.9, 0.95), weight_decay: float = 0.05,
                 warmup_steps: int = 100, ema_decay: float = 0.999, task_names: list | None = None,
                 eval_seed: int = 10_000, record_episodes: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.val_mse, self.test_mse, self.test_mean_mse = ActionMSE(), ActionMSE(), ActionMSE()
        self._build()

    # ------------------------------------------------------------------ construction
    def _build(self):
        hp = self.hparams
        self.model = MoDEDenoiser(hp.obs_dim, hp.act_dim, hp.num_tasks, hp.chunk, hp.n_obs_steps,
                                  hp.dim, hp.depth, hp.heads, hp.ffn, hp.num_experts, hp.k,
                                  hp.expert_hidden, hp.sample_train, hp.balance_weight, hp.causal,
                                  hp.attn_dropout, hp.goal_dropout, hp.balance, hp.router_init, hp.route_on,
                                  hp.goal_texts, hp.goal_encoder, hp.image_shapes, hp.image_width,
                                  hp.image_weights)
        # normalisation statistics (map to [-1, 1]); saved in the checkpoint with the weights
        self.register_buffer("obs_lo", -torch.ones(hp.obs_dim))
        self.register_buffer("obs_hi", torch.ones(hp.obs_dim))
        self.register_buffer("act_lo", -torch.ones(hp.act_dim))
        self.register_buffer("act_hi", torch.ones(hp.act_dim))
        self.register_buffer("act_mean", torch.zeros(hp.act_dim))  # training mean action (baseline)
        self.ema_state: dict[str, torch.Tensor] | None = None
        self._cache = None

    def on_data(self, datamodule) -> None:
        """Take shapes, task names and normalisation statistics from the demonstrations."""
        datamodule.prepare()
        shapes = {"obs_dim": datamodule.obs_dim, "act_dim": datamodule.act_dim,
                  "num_tasks": datamodule.num_tasks, "chunk": datamodule.chunk,
                  "n_obs_steps": datamodule.n_obs_steps, "image_shapes": datamodule.image_shapes or None}
        if getattr(datamodule, "env_name", None) and getattr(datamodule, "val_episodes", 0) > 0:
            self.monitor, self.monitor_mode = "val/success_rate", "max"
        if getattr(self, "_from_checkpoint", False):  # keep the trained shapes and statistics
            bad = {k: (self.hparams[k], v) for k, v in shapes.items()
                   if (self.hparams[k] < v if k == "num_tasks" else self.hparams[k] != v)}
            if bad:
                raise ValueError("the data does not fit this checkpoint (checkpoint, data): " +
                                 ", ".join(f"{k}={a} vs {b}" for k, (a, b) in bad.items()))
            self._data_ready = True
            return
        shapes["goal_texts"] = datamodule.task_texts()
        if any(self.hparams[k] != v for k, v in shapes.items()):
            self.hparams.update(shapes)
            self._build()
        self.hparams["task_names"] = datamodule.task_names()
        for name, (lo, hi) in (("obs", datamodule.obs_stats), ("act", datamodule.act_stats)):
            getattr(self, f"{name}_lo").copy_(torch.as_tensor(lo))
            getattr(self, f"{name}_hi").copy_(torch.as_tensor(hi))
        if getattr(datamodule, "act_mean", None) is not None:
            self.act_mean.copy_(torch.as_tensor(datamodule.act_mean))
        self._data_ready = True

    def setup(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and not getattr(self, "_data_ready", False) and hasattr(dm, "prepare"):
            self.on_data(dm)

    # ------------------------------------------------------------------ normalisation
    def norm_obs(self, obs):
        return 2 * (obs - self.obs_lo) / (self.obs_hi - self.obs_lo) - 1

    def norm_act(self, act):
        return 2 * (act - self.act_lo) / (self.act_hi - self.act_lo) - 1

    def unnorm_act(self, act):
        return (act + 1) / 2 * (self.act_hi - self.act_lo) + self.act_lo

    # ------------------------------------------------------------------ sampling
    def sigmas(self) -> torch.Tensor:
        hp = self.hparams
        return exponential_sigmas(hp.num_sampling_steps, hp.sigma_min, hp.sigma_max).to(self.device)

    def expert_cache_for(self, sigmas: torch.Tensor):
        """Fused experts per sampling step (built once per set of weights, MoE only)."""
        if not self.model.moe_layers() or self.hparams.route_on != "noise":
            return None
        key = tuple(sigmas.tolist())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.model.build_expert_cache(sigmas[:-1]))
        return self._cache[1]

    def reset_expert_cache(self):
        self._cache = None

    @torch.no_grad()
    def sample(self, obs_n: torch.Tensor, task: torch.Tensor, use_cache: bool | None = None,
               noise: torch.Tensor | None = None, callback=None, images: dict | None = None) -> torch.Tensor:
        """Normalised obs [B, To, O], task [B], images {key: [B, To, C, H, W]} -> normalised
        action chunk [B, H, A] (DDIM; the expert cache needs noise-only routing)."""
        hp = self.hparams
        use_cache = hp.expert_cache if use_cache is None else use_cache
        sigmas = self.sigmas()
        cache = self.expert_cache_for(sigmas) if use_cache else None
        if noise is None:
            noise = torch.randn(obs_n.shape[0], hp.chunk, hp.act_dim, device=self.device)
        was = self.model.training
        self.model.eval()

        def denoise(x, sigma, i):
            fused = None if cache is None else cache[i]
            return precondition(self.model, x, sigma, hp.sigma_data, obs=obs_n, task=task, images=images,
                                fused=fused)

        out = sample_ddim(denoise, noise * hp.sigma_max, sigmas, callback)
        self.model.train(was)
        return out

    def forward(self, obs: torch.Tensor, task: torch.Tensor, images: dict | None = None) -> torch.Tensor:
        """Inference path: raw obs history [B, To, O], task ids [B], images {key: [B, To, C, H, W]
        uint8} -> raw action chunk [B, H, A]."""
        return self.unnorm_act(self.sample(self.norm_obs(obs), task, images=images))

    def flops_inputs(self) -> tuple:
        hp = self.hparams
        images = {k: torch.zeros(1, hp.n_obs_steps, *s, dtype=torch.uint8, device=self.device)
                  for k, s in (hp.image_shapes or {}).items()}
        return (torch.zeros(1, hp.n_obs_steps, hp.obs_dim, device=self.device),
                torch.zeros(1, dtype=torch.long, device=self.device), images or None)

    def policy(self, obs, task: np.ndarray) -> np.ndarray:
        """numpy policy for ``evaluate_policy``: obs [B, To, O] (or ``{"state": [B, To, O],
        <image key>: [B, To, H, W, C]}``), task [B] -> actions [B, H, A]."""
        images = None
        if isinstance(obs, dict):
            images = {k: torch.as_tensor(obs[k], device=self.device).permute(0, 1, 4, 2, 3).contiguous()
                      for k in (self.hparams.image_shapes or {})}
            obs = obs["state"]
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        t = torch.as_tensor(task, dtype=torch.long, device=self.device)
        return self(o, t, images).cpu().numpy()

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        y = self.norm_act(batch["action"])  # [B, H, A]
        obs = self.norm_obs(batch["obs"])  # [B, To, O]
        sigma = sample_log_logistic((y.shape[0],), math.log(hp.sigma_data), 0.5, hp.sigma_min,
                                    hp.sigma_max, device=self.device)
        loss = edm_loss(self.model, y, sigma, torch.randn_like(y), hp.sigma_data, obs=obs, task=batch["task"],
                        images=batch.get("images"))
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return self.with_aux(loss)

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "emb" not in n]
        other = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(hp.warmup_steps, total // 4)

        def schedule(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min((step - warm) / max(total - warm, 1), 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ EMA
    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        self._cache = None  # weights changed
        if self.hparams.ema_decay <= 0:
            return
        state = self.model.state_dict()
        if self.ema_state is None:
            self.ema_state = {k: v.detach().clone() for k, v in state.items()}
            return
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))  # warm-up of the EMA
        with torch.no_grad():
            for k, v in state.items():
                e = self.ema_state[k]
                if v.dtype.is_floating_point:
                    e.mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    e.copy_(v)

    @contextlib.contextmanager
    def ema_weights(self):
        """Run the block with the EMA weights in ``self.model`` (restored afterwards)."""
        if self.ema_state is None:
            yield
            return
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema_state)
        self._cache = None
        try:
            yield
        finally:
            self.model.load_state_dict(backup)
            self._cache = None

    def on_fit_end(self):
        # The final model is the EMA model (as MoDE evaluates it).
        if self.ema_state is not None:
            self.model.load_state_dict(self.ema_state)
            self.ema_state = None
            self._cache = None

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        if self.ema_state is not None:
            ema = {k: v.detach().cpu() for k, v in self.ema_state.items()}
            gather_expert_state(self.model, ema)  # whole experts when they are split over ranks
            checkpoint["ema_state"] = ema

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self._from_checkpoint = True
        ema = checkpoint.get("ema_state")
        if ema:
            slice_expert_state(self.model, ema)  # this rank's experts under expert parallelism
        self.ema_state = {k: v.to(self.device) for k, v in ema.items()} if ema else None
        self._cache = None

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        self._ema_ctx = self.ema_weights()
        self._ema_ctx.__enter__()

    def validation_step(self, batch, batch_idx):
        pred = self(batch["obs"], batch["task"], batch.get("images"))
        self.val_mse.update(pred, batch["action"])

    def on_validation_epoch_end(self):
        self.log("val/action_mse", self.val_mse.compute(), prog_bar=True)
        self.val_mse.reset()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "env_name", None) and getattr(dm, "val_episodes", 0) > 0:
            hp = self.hparams  # reset seeds apart from the test episodes'
            res = evaluate_policy(self.policy, dm.make_env, dm.eval_tasks(), dm.val_episodes, hp.n_obs_steps,
                                  hp.execute_steps or hp.chunk, hp.eval_seed + 500_000)
            self.log("val/success_rate", float(np.mean(list(res["success"].values()))), prog_bar=True)
        self._ema_ctx.__exit__(None, None, None)

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self):
        super().on_test_epoch_start()
        self._ema_ctx = self.ema_weights()
        self._ema_ctx.__enter__()

    def test_step(self, batch, batch_idx):
        """Held-out action MSE with the deployed sampler (expert cache on for MoE). The routing
        of every denoising step is recorded per noise level: with the cache it is read from the
        fused experts (it is what the router would choose; ``test_expert_cache_*`` checks this)."""
        obs, task = self.norm_obs(batch["obs"]), batch["task"]
        layers = self.model.moe_layers()
        names = [f"sigma={s:.3g}" for s in self.sigmas()[:-1].tolist()]
        cached = self.hparams.expert_cache and self.hparams.route_on == "noise"
        tokens = (obs.shape[0], self.model.prefix + self.hparams.chunk)

        def record(i, x, denoised):
            if cached:
                for layer, fused in zip(layers, self._cache[1][i]):
                    layer.set_cached_routing(fused, tokens)
            self.record_routing(torch.full((x.shape[0],), i), names)
            if i < len(names) - 1:
                self._accumulate("test")  # the base adds the last step at batch end

        pred = self.sample(obs, task, callback=record if layers else None, images=batch.get("images"))
        self.test_mse.update(self.unnorm_act(pred), batch["action"])
        self.test_mean_mse.update(self.act_mean.expand_as(batch["action"]), batch["action"])

    def on_test_epoch_end(self):
        self.log("test/action_mse", self.test_mse.compute())
        self.log("test/mean_action_mse", self.test_mean_mse.compute())  # predicting the mean action
        self.test_mse.reset()
        self.test_mean_mse.reset()
        self._log_inference_cost()
        self._closed_loop()
        if self.model.moe_layers() and self.trainer.is_global_zero:
            from .plots import expert_usage_by_noise
            usage, sig = self.noise_routing_table()
            expert_usage_by_noise(usage, sig, self.run_dir / "expert_usage_by_noise.png")
        super().on_test_epoch_end()
        self._ema_ctx.__exit__(None, None, None)

    def _log_inference_cost(self):
        """ms per action chunk (one observation, the configured path) for the compare table."""
        from .metrics import time_ms

        self.log("test/ms_per_chunk", time_ms(self, *self.flops_inputs(), repeats=10, warmup=2))

    def _closed_loop(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "env_name", None) is None or dm.eval_episodes <= 0:
            return
        hp = self.hparams
        res = evaluate_policy(self.policy, dm.make_env, dm.eval_tasks(), dm.eval_episodes,
                              hp.n_obs_steps, hp.execute_steps or hp.chunk, hp.eval_seed,
                              record=hp.record_episodes)
        names = hp.task_names or [str(t) for t in range(hp.num_tasks)]
        for t, rate in res["success"].items():
            self.log(f"test/success_{names[t]}", rate)
        self.log("test/success_rate", float(np.mean(list(res["success"].values()))))
        self.log("test/return", float(np.mean(list(res["return"].values()))))
        self.log("test/episode_length", float(np.mean(list(res["length"].values()))))
        self.last_eval = res
        frames = {names[t]: f[0] for t, f in res["frames"].items() if f}
        if frames and self.trainer.is_global_zero:
            from .plots import rollout_strip
            rollout_strip(frames, self.run_dir / "rollouts.png")

    @torch.no_grad()
    def noise_routing_table(self, num: int = 40):
        """[L, S, E] eval gate weight of each expert at ``num`` log-spaced sigmas, and the sigmas."""
        hp = self.hparams
        sig = torch.logspace(math.log10(hp.sigma_min), math.log10(hp.sigma_max), num, device=self.device)
        embs = self.model.noise_embedding(sig)  # [S, D]
        table = []
        for moe in self.model.moe_layers():
            rows = []
            for e in embs:
                idx, w = moe.route_of(e)
                rows.append(torch.zeros(moe.num_experts, device=self.device).index_put_((idx,), w.float()))
            table.append(torch.stack(rows))
        return torch.stack(table).cpu().numpy(), sig.cpu().numpy()

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self):
        self._ema_ctx = self.ema_weights()
        self._ema_ctx.__enter__()

    def predict_step(self, batch, batch_idx):
        """The sampled action chunk [B, chunk, act_dim] for each test window (EMA weights),
        beside the demonstrated one."""
        return {"action": self(batch["obs"], batch["task"], batch.get("images")), "demo_action": batch["action"]}

    def on_predict_epoch_end(self):
        self._ema_ctx.__exit__(None, None, None)

