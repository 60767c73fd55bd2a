"""MoDE: Mixture-of-Denoisers diffusion transformer policy (Reuss et al., ICLR 2025).

Noise-conditioned routing of SwiGLU experts, EDM preconditioning, DDIM sampling of action
chunks, expert caching for inference, FiLM ResNet-18 image and text-goal encoders, readers of
robomimic HDF5 / zarr replay buffers / LeRobot folders, and built-in multitask 2-D envs.
"""
from .data import DiffusionPolicyDataModule, generate_demonstrations, load_demonstrations
from .encoders import FiLMResNet, GoalEncoder
from .env import TASKS, VIA_TASKS, MultiTask2DEnv, ViaPointEnv, scripted_action
from .formats import detect_format
from .model import MoDEDenoiser, NoiseMoE, SwiGLUExperts, SwiGLUFFN
from .module import DiffusionPolicyModule

__all__ = ["DiffusionPolicyDataModule", "DiffusionPolicyModule", "FiLMResNet", "GoalEncoder", "MoDEDenoiser",
           "MultiTask2DEnv", "NoiseMoE", "SwiGLUExperts", "SwiGLUFFN", "TASKS", "VIA_TASKS", "ViaPointEnv",
           "detect_format", "generate_demonstrations", "load_demonstrations", "scripted_action"]
