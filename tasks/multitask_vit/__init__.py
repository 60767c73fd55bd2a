"""multitask_vit: M3ViT, a task-conditioned MoE vision transformer for multi-task dense prediction."""
from .data import MultiTaskDataModule, MultiTaskFolder, SyntheticScenes
from .metrics import DepthRMSE, EdgeODSF, NormalsAngleError, SemsegMIoU, delta_m
from .model import M3ViT, PUPHead, TaskRouter
from .module import MultiTaskViTModule

__all__ = ["M3ViT", "TaskRouter", "PUPHead", "MultiTaskViTModule", "MultiTaskDataModule",
           "MultiTaskFolder", "SyntheticScenes", "SemsegMIoU", "DepthRMSE", "NormalsAngleError",
           "EdgeODSF", "delta_m"]
