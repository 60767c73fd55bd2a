"""AdvMoE: adversarially robust CNN mixture of experts with router/expert alternating adversarial training (Zhang et al., ICCV 2023)."""
