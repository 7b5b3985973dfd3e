"""Policy guidance of the PGD sampler (Jackson et al. 2024, "Policy-Guided Diffusion",
arXiv:2404.06356; rule and defaults from the official code, EmptyJackson/policy-guided-diffusion,
diffusion/edm.py sample_trajectory).

Before EDM step i of N, the action channels of the noisy trajectory move by lambda_i g:
    g = grad over the normalised pre-tanh action channels a~ of  sum_t log pi(max_action tanh(unnorm(a~_t)) | s_t),
        with s_t = unnorm(s~_t) read from the same trajectory (no gradient through the states),
    lambda_i = c [(1 - i/N) + c_cos sin(pi (i + 1) / N)]  for delay <= i < N - 1, else 0,
with c = `coeff` (official default 0: unguided), c_cos = 0.3 (the flag is called "cosine"; the code
uses a sine bump). Options as the official flags: `normalize` divides g by its L2 norm over the
trajectory and then adds 1e-8 (the official order, kept; a gradient that is exactly 0, as when every
action of a trajectory saturates the tanh at high noise, stays 0 where the official code gives NaN); `denoised` evaluates g on the EDM
denoised estimate D(x; sigma) instead of the noisy trajectory.

log pi comes from the algorithm (`OfflineRLModule.log_prob`): exact for Gaussian policies,
N(act(s), 1) for deterministic ones, as the official code does for TD3+BC.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from offbench.pgd.edm import EDM
from offbench.trajectory.windows import TrajectoryNormalizer


def guidance_schedule(steps: int, coeff: float, cos_coeff: float = 0.3, delay: int = 0) -> list[float]:
    """lambda_i of each of the `steps` sampler steps."""
    out = []
    for i in range(steps):
        on = delay <= i < steps - 1
        out.append(coeff * ((1.0 - i / steps) + cos_coeff * math.sin(math.pi * (i + 1) / steps)) if on else 0.0)
    return out


class PolicyGuidance:
    """The `guide` of EDM.sample: moves the action channels along the gradient of the policy's
    log-likelihood. `log_prob(obs, act) -> (n,)` takes observations in the policy's own input
    space: `obs_transform` maps the raw states into it (a run's observation normalisation)."""

    def __init__(
        self, log_prob: Callable[[Tensor, Tensor], Tensor], normalizer: TrajectoryNormalizer, steps: int,
        coeff: float, cos_coeff: float = 0.3, normalize: bool = False, denoised: bool = False, delay: int = 0,
        obs_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.log_prob, self.normalizer = log_prob, normalizer
        self.lambdas = guidance_schedule(steps, coeff, cos_coeff, delay)
        self.normalize, self.denoised = normalize, denoised
        self.obs_transform = obs_transform or (lambda obs: obs)

    def gradient(self, traj: Tensor) -> Tensor:
        """g: d/d a~ of sum_t log pi(a_t | s_t) for trajectories (B, L, C) in model space, (B, L, act_dim)."""
        n = self.normalizer
        with torch.enable_grad():
            x_act = traj[..., n.act_slice].detach().requires_grad_(True)
            obs = self.obs_transform(n.unnormalize_obs(traj[..., : n.obs_dim].detach()))
            act = n.unnormalize_actions(x_act)
            logp = self.log_prob(obs.reshape(-1, n.obs_dim), act.reshape(-1, n.act_dim))
            (g,) = torch.autograd.grad(logp.sum(), x_act)
        if self.normalize:  # per trajectory; + 1e-8 after the division, as the official code
            norm = g.flatten(1).norm(dim=1)[:, None, None]
            g = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g)) + 1e-8
        return g

    def __call__(self, x: Tensor, i: int, sigma: float, edm: EDM) -> Tensor:
        lam = self.lambdas[i]
        if lam == 0.0:
            return x
        traj = edm.denoise(x, sigma) if self.denoised else x
        x = x.clone()
        x[..., self.normalizer.act_slice] += lam * self.gradient(traj)
        return x
