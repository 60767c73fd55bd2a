"""Score-based diffusion pieces used by MoDE: EDM preconditioning, noise density, sampler.

References
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
  (EDM): preconditioning, Table 1 / eq. 7; training loss eq. 8 written in F-space.
- Lu et al. 2022, "DPM-Solver": the first-order solver (= DDIM, Song et al. 2021) in the
  log-sigma time ``t = -log(sigma)``.
- MoDE (Reuss et al., ICLR 2025) sec. 3 / the authors' config: sigma_data 0.5, training
  sigmas from a log-logistic density (loc log(sigma_data), scale 0.5) truncated to
  [1e-3, 80], an exponential sigma schedule and DDIM with 10 steps at inference.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1):

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s * sd / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``. With data of std ``sd`` the network input ``c_in x``
    and the training target ``(y - c_skip x) / c_out`` both have unit variance at every sigma.
    """
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    return c_skip, c_out, c_in


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against ``like``."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def precondition(inner: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5,
                 **cond) -> torch.Tensor:
    """The denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x; sigma)`` (EDM eq. 7).

    ``inner(x_scaled, sigma, **cond)`` is the raw network F; x: [B, ...], sigma: [B].
    """
    c_skip, c_out, c_in = (_bcast(c, x) for c in edm_scalings(sigma, sigma_data))
    return c_skip * x + c_out * inner(c_in * x, sigma, **cond)


def edm_loss(inner: Callable, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             sigma_data: float = 0.5, **cond) -> torch.Tensor:
    """EDM training loss in F-space (eq. 8 with lambda = 1 / c_out^2), as MoDE trains:

    ``|| F(c_in (y + sigma n); sigma) - (y - c_skip (y + sigma n)) / c_out ||^2``, mean over
    all elements. y: clean actions [B, H, A]; sigma [B]; noise ~ N(0, I) like y.
    """
    c_skip, c_out, c_in = (_bcast(c, y) for c in edm_scalings(sigma, sigma_data))
    x = y + noise * _bcast(sigma, y)
    target = (y - c_skip * x) / c_out
    return (inner(c_in * x, sigma, **cond) - target).pow(2).mean()


def sample_log_logistic(shape, loc: float = math.log(0.5), scale: float = 0.5,
                        min_value: float = 1e-3, max_value: float = 80.0,
                        generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training sigmas: ``log sigma ~ Logistic(loc, scale)`` truncated to [min, max].

    Inverse-CDF sampling: u ~ U(F(min), F(max)), sigma = exp(loc + scale * logit(u)), with
    ``F(s) = sigmoid((log s - loc) / scale)``.
    """
    lo = torch.sigmoid(torch.tensor((math.log(min_value) - loc) / scale, dtype=torch.float64))
    hi = torch.sigmoid(torch.tensor((math.log(max_value) - loc) / scale, dtype=torch.float64))
    u = torch.rand(shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo
    sigma = (torch.logit(u) * scale + loc).exp().clamp(min_value, max_value)
    return sigma.float().to(device) if device is not None else sigma.float()


def exponential_sigmas(steps: int, sigma_min: float = 1e-3, sigma_max: float = 80.0) -> torch.Tensor:
    """Exponential schedule: ``steps`` sigmas log-linearly from sigma_max to sigma_min, then 0.

    Returns [steps + 1]; the final 0 makes the last solver step return the denoised estimate.
    """
    if steps < 1:
        raise ValueError(f"num_sampling_steps must be >= 1, got {steps}")
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    return torch.cat([s, s.new_zeros(1)])


@torch.no_grad()
def sample_ddim(denoise: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                callback: Callable | None = None) -> torch.Tensor:
    """DDIM / DPM-Solver-1 on the probability-flow ODE (Lu et al. 2022, eq. 3.7 with order 1).

    With ``t = -log sigma`` and ``h = t_{i+1} - t_i``:
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D(x_i; sigma_i)``, which for
    sigma_{i+1} = 0 returns ``D(x_i; sigma_i)``. ``denoise(x, sigma [B], step)`` is the
    preconditioned denoiser; x starts as ``sigma_max * N(0, I)``.
    """
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, s * ones, i)
        if callback is not None:
            callback(i, x, denoised)
        if s_next == 0:
            x = denoised
        else:
            h = torch.log(s) - torch.log(s_next)  # t_next - t with t = -log sigma
            x = (s_next / s) * x - torch.expm1(-h) * denoised
    return x
