"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling
in Around 10 Steps", arXiv:2206.00927): the one probability-flow ODE solver of the suite, serving
SfBC's continuous VP SDE and the discrete DDPM policies (EDP) alike.

Singlestep "DPM-Solver-fast" in noise-prediction form with the 'dpm_solver' corrections, on a
time-uniform grid from t_start to t_end, mixing orders 3, 2, 1 so that the model is called exactly
`steps` times. The schedule is any object with `log_alpha(t)`, `sigma(t)` and `half_log_snr(t)`
(offbench.diffusion.schedules); the noise model is a function eps(x, t) of a batch and a 0-dim time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor], Tensor]


class VPSchedule(Protocol):
    def log_alpha(self, t: Tensor) -> Tensor: ...
    def sigma(self, t: Tensor) -> Tensor: ...
    def half_log_snr(self, t: Tensor) -> Tensor: ...


def singlestep_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver-fast's split of `steps` model evaluations into singlestep solver orders."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def dpm_solver_sample(eps: EpsFn, schedule: VPSchedule, x: Tensor, steps: int = 15, order: int = 3,
                      t_start: float = 1.0, t_end: float = 1e-3) -> Tensor:
    """x at t_end from x at t_start (x ~ N(0, I) at t_start = 1): `steps` model evaluations of
    singlestep DPM-Solver on the time-uniform grid t_start = t_0 > ... > t_steps = t_end; each
    solver step of order k spans k grid intervals and uses the grid points inside as its intermediate
    times (DPM-Solver's `sample(method="singlestep", skip_type="time_uniform")`)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    grid = torch.linspace(t_start, t_end, steps + 1, device=x.device)
    i = 0
    for o in singlestep_orders(steps, order):
        x = dpm_step(eps, schedule, x, grid[i : i + o + 1])
        i += o
    return x


def dpm_step(eps: EpsFn, schedule: VPSchedule, x: Tensor, ts: Tensor) -> Tensor:
    """One DPM-Solver-k step from ts[0] to ts[-1], k = len(ts) - 1, intermediate times ts[1:-1]
    (Lu et al. 2022, Algorithms 1-2, noise-prediction form with the 'dpm_solver' corrections)."""
    lam = schedule.half_log_snr(ts)
    log_a, sig = schedule.log_alpha(ts), schedule.sigma(ts)
    h = lam[-1] - lam[0]
    eps_s = eps(x, ts[0])

    def first_order(j: int) -> Tensor:  # x at ts[j] from ts[0] using eps_s only
        return torch.exp(log_a[j] - log_a[0]) * x - sig[j] * torch.expm1(lam[j] - lam[0]) * eps_s

    k = len(ts) - 1
    if k == 1:
        return first_order(1)
    r1 = (lam[1] - lam[0]) / h
    eps_1 = eps(first_order(1), ts[1])
    if k == 2:
        return first_order(2) - (0.5 / r1) * sig[2] * torch.expm1(h) * (eps_1 - eps_s)
    r2 = (lam[2] - lam[0]) / h
    phi_22 = torch.expm1(r2 * h) / (r2 * h) - 1.0
    x_2 = first_order(2) - (r2 / r1) * sig[2] * phi_22 * (eps_1 - eps_s)
    eps_2 = eps(x_2, ts[2])
    phi_2 = torch.expm1(h) / h - 1.0
    return first_order(3) - (1.0 / r2) * sig[3] * phi_2 * (eps_2 - eps_s)
