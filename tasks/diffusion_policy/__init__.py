"""MoDE: Mixture-of-Denoisers diffusion transformer policy (Reuss et al., ICLR 2025).

Noise-conditioned routing of SwiGLU experts, EDM preconditioning, DDIM sampling of action
chunks, expert caching for inference, and a built-in multitask 2-D manipulation env.
"""
from .data import DiffusionPolicyDataModule, generate_demonstrations, load_demonstrations
from .env import TASKS, MultiTask2DEnv, scripted_action
from .model import MoDEDenoiser, NoiseMoE, SwiGLUExperts, SwiGLUFFN
from .module import DiffusionPolicyModule

__all__ = ["DiffusionPolicyDataModule", "DiffusionPolicyModule", "MoDEDenoiser", "MultiTask2DEnv",
           "NoiseMoE", "SwiGLUExperts", "SwiGLUFFN", "TASKS", "generate_demonstrations",
           "load_demonstrations", "scripted_action"]
