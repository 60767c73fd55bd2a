"""PMOE: probabilistic mixture-of-experts policies for SAC and PPO (Ren et al. 2021)."""
