"""LightningModules of the RL task: PMOE-SAC / SAC and PMOE-PPO / PPO (one algorithm per file).

Config class paths: ``tasks.rl.module.SACModule`` and ``tasks.rl.module.PPOModule``; the
``model.head`` key switches between the PMOE mixture (``mixture``) and the dense single
Gaussian baseline (``gaussian``).
"""
from .base import RLModule
from .ppo import PPOModule
from .sac import SACModule

__all__ = ["RLModule", "SACModule", "PPOModule"]
