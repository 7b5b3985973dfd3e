"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364) for the PGD trajectory model: preconditioning, training loss and the stochastic
Heun sampler, with the settings of the official PGD code (EmptyJackson/policy-guided-diffusion,
diffusion/edm.py and util/args.py).

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),  c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2),  c_noise = ln(sigma) / 4
    loss = E (sigma^2 + sd^2) / (sigma sd)^2 ||D(x0 + sigma n; sigma) - x0||^2,  ln sigma ~ N(-1.2, 1.2^2)
           (one sigma per window, mean over all elements), sigma_data sd = 1.

Sampler (EDM Algorithm 2 as the official code writes it): sigma_i = (smax^(1/rho) + i / (N - 1)
(smin^(1/rho) - smax^(1/rho)))^rho for i < N and sigma_N = 0; gamma_i = min(S_churn / N, sqrt(2) - 1)
where S_tmin <= sigma_i <= S_tmax, else 0; N = 256, smax 80, smin 0.002, rho 7, S_churn 80,
S_tmin 0.05, S_tmax 50, S_noise 1.003. Two quirks of the official code are kept: the noise eps is
drawn at every step (also where gamma = 0), and the Euler predictor starts from x_i, not from the
churned x_hat (EDM's Algorithm 2 uses x_hat; `edm_predictor=True`); the Heun corrector starts from x_hat.
With data N(0, 1) and its ideal denoiser, the official predictor gives samples of std 2.13 / 1.14 / 1.04
with 16 / 64 / 256 steps, EDM's 1.15 / 1.03 / 1.02 (tests/test_pgd.py checks this). The preconditioning, the
loss (`loss_at`, its draws given), its gradient and the sampler's steps (`step`) equal the official code's in
float64 (tests/test_golden_pgd.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplerSettings:
    """The stochastic Heun sampler's settings (official defaults)."""

    steps: int = 256
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 80.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003
    first_order: bool = False  # Euler only (--edm_first_order)
    # False: the official code's Euler predictor from x_i; True: EDM's Algorithm 2 (from the churned x_hat),
    # which keeps the sample variance right with few steps (measured: docs/pgd.md)
    edm_predictor: bool = False


def sigma_schedule(s: SamplerSettings) -> Tensor:
    """sigma_0 > ... > sigma_{N-1} = sigma_min, sigma_N = 0, float64 (N + 1,)."""
    if s.steps < 2:
        raise ValueError(f"the sampler needs at least 2 steps, got {s.steps}")
    i = torch.arange(s.steps + 1, dtype=torch.float64)
    inv = 1.0 / s.rho
    sigmas = (s.sigma_max**inv + i / (s.steps - 1) * (s.sigma_min**inv - s.sigma_max**inv)) ** s.rho
    sigmas[-1] = 0.0
    return sigmas


def churn_schedule(s: SamplerSettings, sigmas: Tensor) -> Tensor:
    """gamma_i of each step (N,)."""
    gamma = min(s.s_churn / s.steps, math.sqrt(2.0) - 1.0)
    inside = (sigmas[:-1] >= s.s_tmin) & (sigmas[:-1] <= s.s_tmax)
    return torch.where(inside, torch.full_like(sigmas[:-1], gamma), torch.zeros_like(sigmas[:-1]))


# guide(x, i, sigma, edm) -> x with guidance applied (offbench/pgd/guidance.py); called before each step
Guide = Callable[[Tensor, int, float, "EDM"], Tensor]


class EDM(nn.Module):
    """A preconditioned denoiser D(x; sigma) around a network F(x, c_noise) (the temporal U-Net)."""

    def __init__(self, net: nn.Module, sigma_data: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        super().__init__()
        self.net = net
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """D(x; sigma) for x (B, L, C) and sigma a float or (B,)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        sd = self.sigma_data
        s = sigma[:, None, None]
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.net(c_in * x, sigma.log() / 4)

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """EDM's weighted denoising loss on clean windows x0 (B, L, C), one sigma per window."""
        normal = torch.randn(x0.shape[0], device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        return self.loss_at(x0, normal, noise)

    def loss_at(self, x0: Tensor, normal: Tensor, noise: Tensor) -> Tensor:
        """The loss with its draws given: ln sigma = p_mean + p_std normal (B,), the noise (B, L, C)."""
        sigma = (self.p_mean + self.p_std * normal).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        err = (self.denoise(x0 + sigma[:, None, None] * noise, sigma) - x0).pow(2)
        return (weight[:, None, None] * err).mean()

    def step(self, x: Tensor, sigma: float, next_sigma: float, gamma: float, normal: Tensor,
             settings: SamplerSettings) -> Tensor:
        """One step of the sampler from noise level sigma to next_sigma, with its draw `normal` (x's shape;
        the churn noise is S_noise times it)."""
        eps = settings.s_noise * normal
        sigma_hat = sigma + gamma * sigma
        x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * eps if gamma > 0 else x
        d = (x_hat - self.denoise(x_hat, sigma_hat)) / sigma_hat
        # the official predictor starts from x (see the docstring); EDM's from x_hat
        x_next = (x_hat if settings.edm_predictor else x) + (next_sigma - sigma_hat) * d
        if not settings.first_order and next_sigma != 0:
            d_next = (x_next - self.denoise(x_next, next_sigma)) / (next_sigma + 1e-9)
            x_next = x_hat + 0.5 * (next_sigma - sigma_hat) * (d + d_next)
        return x_next

    @torch.no_grad()
    def sample(
        self, shape: tuple[int, int, int], settings: SamplerSettings = SamplerSettings(),
        generator: torch.Generator | None = None, guide: Guide | None = None,
    ) -> Tensor:
        """Trajectories (B, L, C) in the model's normalised space, from noise of `generator`."""
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        sigmas = sigma_schedule(settings)
        gammas = churn_schedule(settings, sigmas)
        x = torch.randn(shape, device=device, generator=generator) * float(sigmas[0])
        for i in range(settings.steps):
            if guide is not None:
                x = guide(x, i, float(sigmas[i]), self)
            normal = torch.randn(shape, device=device, generator=generator)
            x = self.step(x, float(sigmas[i]), float(sigmas[i + 1]), float(gammas[i]), normal, settings)
        return x
