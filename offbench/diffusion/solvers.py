"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling
in Around 10 Steps", arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095): the one probability-flow ODE solver
of the suite, serving the continuous VP SDE of SfBC and QGPO and the discrete DDPM policies (EDP) alike.

Singlestep "DPM-Solver-fast" with the 'dpm_solver' corrections, on a time-uniform grid from t_start to
t_end, mixing orders 3, 2, 1 so that the model is called exactly `steps` times, in one of two forms:
- "noise": noise prediction, DPM-Solver (arXiv:2206.00927, Algorithms 1-2), the intermediate times the
  grid points; with upstream DPM-Solver's split of the model calls into orders (SfBC's and EDP's code).
- "data": data prediction x0 = (x - sigma_t eps) / alpha_t, singlestep DPM-Solver++ (arXiv:2211.01095,
  Algorithm 1, DPM-Solver++(2S); orders 1 and 3 as in DPM-Solver's reference code), as the official QGPO code
  (ChenDRAG/CEP-energy-guided-diffusion, `DPM_Solver(predict_x0=True)`) runs it: intermediate times
  t(lambda_s + r_j h), and that code's order-2 split for an even number of calls (`singlestep_orders`).
First-order steps (DDIM) are the same update in both forms; higher-order ones differ.

The schedule is any object with `log_alpha(t)`, `sigma(t)` and `half_log_snr(t)`
(offbench.diffusion.schedules), plus its inverse `time_of(lambda)` for the data form; the noise model is
a function eps(x, t) of a batch and a 0-dim time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor], Tensor]
SolverForm = Literal["noise", "data"]
FORMS = ("noise", "data")


class VPSchedule(Protocol):
    def log_alpha(self, t: Tensor) -> Tensor: ...
    def sigma(self, t: Tensor) -> Tensor: ...
    def half_log_snr(self, t: Tensor) -> Tensor: ...


class InvertibleVPSchedule(VPSchedule, Protocol):
    def time_of(self, lam: Tensor) -> Tensor: ...  # the inverse of half_log_snr (the data form needs it)


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown DPM-Solver form {form!r}; choose noise (DPM-Solver, noise prediction) or "
                         "data (DPM-Solver++, data prediction)")


def singlestep_orders(steps: int, order: int, form: SolverForm = "noise") -> list[int]:
    """DPM-Solver-fast's split of `steps` model evaluations into singlestep solver orders. Order 2 with an
    even number of steps: [2] * (steps / 2) in upstream DPM-Solver (form "noise"), [2] * (K - 2) + [1, 1]
    with K = steps / 2 + 1 in the official QGPO code's copy, the one code that runs the data form here
    (form "data"). Every other case is the same in both."""
    check_form(form)
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        if form == "data" and steps % 2 == 0:
            return [2] * (steps // 2 - 1) + [1, 1]
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def dpm_solver_sample(eps: EpsFn, schedule: VPSchedule, x: Tensor, steps: int = 15, order: int = 3,
                      t_start: float = 1.0, t_end: float = 1e-3, form: SolverForm = "noise") -> Tensor:
    """x at t_end from x at t_start (x ~ N(0, I) at t_start = 1): `steps` model evaluations of
    singlestep DPM-Solver (form "noise") or DPM-Solver++ (form "data") on the time-uniform grid
    t_start = t_0 > ... > t_steps = t_end; each solver step of order k spans k grid intervals, whose inner
    points give its intermediate times (DPM-Solver's `sample(method="singlestep", skip_type="time_uniform")`)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    check_form(form)
    grid = torch.linspace(t_start, t_end, steps + 1, device=x.device, dtype=x.dtype)  # float64 runs: a float64 grid
    i = 0
    for o in singlestep_orders(steps, order, form):
        x = dpm_step(eps, schedule, x, grid[i : i + o + 1], form)
        i += o
    return x


def dpm_step(eps: EpsFn, schedule: VPSchedule, x: Tensor, ts: Tensor, form: SolverForm = "noise") -> Tensor:
    """One singlestep solver step of order k = len(ts) - 1 from ts[0] to ts[-1], its intermediate times
    given by ts[1:-1]: DPM-Solver-k (form "noise") or DPM-Solver++-k (form "data")."""
    check_form(form)
    if form == "noise":
        return _noise_step(eps, schedule, x, ts)
    if not hasattr(schedule, "time_of"):
        raise ValueError(f"the data form (DPM-Solver++) needs the schedule's inverse time_of(lambda); "
                         f"{type(schedule).__name__} has none: use form='noise'")
    return _data_step(eps, schedule, x, ts)  # type: ignore[arg-type]  (time_of checked above)


def _noise_step(eps: EpsFn, schedule: VPSchedule, x: Tensor, ts: Tensor) -> Tensor:
    """DPM-Solver-k, noise prediction (Lu et al. 2022, Algorithms 1-2, 'dpm_solver' corrections), the
    intermediate times the grid points ts[1:-1]."""
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


def _data_step(eps: EpsFn, schedule: InvertibleVPSchedule, x: Tensor, ts: Tensor) -> Tensor:
    """DPM-Solver++-k, data prediction m(x, t) = (x - sigma_t eps(x, t)) / alpha_t (Lu et al. 2022b,
    'dpm_solver' corrections), as the official code's `singlestep_dpm_solver_{first,second,third}_update`
    with `predict_x0=True`: fractions r_j = (lambda(ts[j]) - lambda(ts[0])) / h of the step
    h = lambda(ts[-1]) - lambda(ts[0]) and intermediate times s_j = t(lambda(ts[0]) + r_j h) (the grid
    points up to round-off)."""
    lam = schedule.half_log_snr(ts)
    h = lam[-1] - lam[0]
    k = len(ts) - 1
    r = torch.cat([(lam[1:-1] - lam[0]) / h, torch.ones_like(h)[None]])  # r_1 .. r_{k-1}, r_k = 1
    times = torch.cat([ts[:1], schedule.time_of(lam[0] + r[:-1] * h), ts[-1:]])  # s, s_1 .., t
    alpha, sig = schedule.log_alpha(times).exp(), schedule.sigma(times)

    def data(x_j: Tensor, j: int) -> Tensor:  # the data prediction at times[j]
        return (x_j - sig[j] * eps(x_j, times[j])) / alpha[j]

    m_s = data(x, 0)

    def first_order(j: int) -> Tensor:  # x at times[j] from ts[0] using m_s only
        return sig[j] / sig[0] * x - alpha[j] * torch.expm1(-r[j - 1] * h) * m_s

    if k == 1:
        return first_order(1)
    r1 = r[0]
    m_1 = data(first_order(1), 1)
    if k == 2:
        return first_order(2) - (0.5 / r1) * alpha[2] * torch.expm1(-h) * (m_1 - m_s)
    r2 = r[1]
    phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
    m_2 = data(first_order(2) + (r2 / r1) * alpha[2] * phi_22 * (m_1 - m_s), 2)
    phi_2 = torch.expm1(-h) / h + 1.0
    return first_order(3) + (1.0 / r2) * alpha[3] * phi_2 * (m_2 - m_s)
