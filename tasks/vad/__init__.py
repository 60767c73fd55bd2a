"""Weakly supervised video anomaly detection with class experts and temporal Gaussian
splatting (GS-MoE, D'Amicantonio, Majhi et al., ICCV 2025)."""
from .data import VADDataModule
from .model import GSMoE
from .module import VADModule

__all__ = ["GSMoE", "VADDataModule", "VADModule"]
