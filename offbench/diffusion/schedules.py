"""Noise schedules: the discrete beta schedules of the DDPM policies (plain functions, float64) and the
two VP schedules the DPM-Solver reads (`log_alpha`, `sigma`, `half_log_snr` of a continuous time t):
the continuous linear VP SDE of SfBC and the discrete DDPM schedule interpolated in time."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

BetaSchedule = Literal["linear", "linear_scaled", "cosine", "vp"]


def linear_beta_schedule(n_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's linear betas (Ho et al. 2020), evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)


def scaled_linear_beta_schedule(n_timesteps: int) -> Tensor:
    """DDPM's linear betas with both ends scaled by 1000 / K, so that a schedule of K steps adds about as
    much noise in all as DDPM's 1000 (official EDP code, github.com/sail-sg/edp, diffusion/diffusion.py,
    get_named_beta_schedule("linear")): K = 1000 is DDPM's 1e-4 .. 0.02, K = 100 is 1e-3 .. 0.2."""
    if n_timesteps <= 20:
        raise ValueError(f"linear_scaled betas need n_timesteps > 20 (the last beta is 20 / K), got {n_timesteps}; "
                         "use the vp schedule for short chains")
    scale = 1000.0 / n_timesteps
    return linear_beta_schedule(n_timesteps, scale * 1e-4, scale * 2e-2)


def cosine_beta_schedule(n_timesteps: int, s: float = 0.008) -> Tensor:
    """Improved-DDPM's cosine schedule (Nichol & Dhariwal 2021): abar(t) = cos^2((t/T + s)/(1 + s) pi/2) /
    abar(0), t = 0..T, beta_i = 1 - abar_i / abar_{i-1}, clipped to [0, 0.999]."""
    t = torch.arange(n_timesteps + 1, dtype=torch.float64) / n_timesteps
    abar = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    abar = abar / abar[0]
    return (1 - abar[1:] / abar[:-1]).clamp(0.0, 0.999)


def vp_beta_schedule(n_timesteps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> Tensor:
    """The discretised VP SDE of the DiffCPS paper (Section 3.2) and of Diffusion-QL:
    beta_i = 1 - exp(-beta_min / T - 0.5 (beta_max - beta_min) (2i - 1) / T^2), i = 1..T."""
    i = torch.arange(1, n_timesteps + 1, dtype=torch.float64)
    T = n_timesteps
    return 1 - torch.exp(-beta_min / T - 0.5 * (beta_max - beta_min) * (2 * i - 1) / T**2)


def make_betas(schedule: BetaSchedule, n_timesteps: int) -> Tensor:
    """The betas of a named schedule. "linear" is DDPM's 1e-4 .. 0.02 whatever the length (Diffusion-QL's
    "linear"); "linear_scaled" is EDP's, scaled by 1000 / K (the two agree at K = 1000)."""
    if schedule == "linear":
        return linear_beta_schedule(n_timesteps)
    if schedule == "linear_scaled":
        return scaled_linear_beta_schedule(n_timesteps)
    if schedule == "cosine":
        return cosine_beta_schedule(n_timesteps)
    if schedule == "vp":
        return vp_beta_schedule(n_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose linear, linear_scaled, cosine or vp")


# --------------------------------------------------------------------------- VP schedules in continuous time
# Both give the marginal q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) and lambda_t = log(alpha_t / sigma_t)
# for t in (0, 1], which is all DPM-Solver needs (offbench.diffusion.solvers).
class LinearVPSchedule:
    """The continuous VP SDE with linear beta(t) = b0 + t (b1 - b0) (Song et al. 2021; SfBC's):
    log alpha_t = -t^2 (b1 - b0) / 4 - t b0 / 2."""

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0) -> None:
        self.beta_0, self.beta_1 = beta_0, beta_1

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def half_log_snr(self, t: Tensor) -> Tensor:
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def time_of(self, lam: Tensor) -> Tensor:
        """Inverse of half_log_snr (a quadratic in t)."""
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.beta_0**2 + tmp) + self.beta_0) / (self.beta_1 - self.beta_0)


class DiscreteVPSchedule(nn.Module):
    """A discrete DDPM schedule abar_0 .. abar_{N-1} read in continuous time as DPM-Solver's
    NoiseScheduleVP("discrete") does (Lu et al. 2022, github.com/LuChengTHU/dpm-solver; the copy in
    the official EDP code): step n sits at t_n = (n + 1) / N, log alpha_t is piecewise linear in t
    through the points (t_n, log sqrt(abar_n)) and extended linearly beyond them. A model trained on
    integer steps n is asked at the (fractional) step `model_time(t)` = N t - 1.

    A module so that its table follows the device; the table is not saved (it is the schedule's)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        super().__init__()
        n = alphas_cumprod.numel()
        self.n = n
        t = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)[1:]
        dtype = torch.get_default_dtype()
        self.register_buffer("t_array", t.to(dtype), persistent=False)
        self.register_buffer("log_alpha_array", (0.5 * torch.log(alphas_cumprod.double())).to(dtype), persistent=False)

    def log_alpha(self, t: Tensor) -> Tensor:
        return _interpolate(t, self.t_array, self.log_alpha_array)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def half_log_snr(self, t: Tensor) -> Tensor:
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def model_time(self, t: Tensor) -> Tensor:
        """The step index (float) a model trained on n = 0 .. N-1 is given at time t: (t - 1/N) N."""
        return (t - 1.0 / self.n) * self.n


def _interpolate(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear f with f(xp) = yp (xp increasing), extended linearly beyond both ends with the
    outermost segments (DPM-Solver's interpolate_fn)."""
    k = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[k - 1], xp[k], yp[k - 1], yp[k]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)
