"""Diffusion models for actions: the discrete DDPM policy of Diffusion-QL, DiffCPS and EDP and the
continuous score model of SfBC.

Two families, one contract (`loss(s, a0)`, `sample(s)`: states first, as `critic(obs, act)`; the schedule lives in buffers so it follows
the device and the checkpoint):

- `DiffusionPolicy`: the discrete-time DDPM policy of Diffusion-QL and DiffCPS (Wang et al. 2023;
  He et al. 2024) and EDP (Kang et al. 2023). Forward q(a_i | a_0) = N(sqrt(abar_i) a_0, (1 - abar_i) I),
  eps-prediction, loss E ||eps - eps_theta(a_i, i, s)||^2 with i uniform, sampled by the reverse chain
  with the predicted a_0 clipped to the action bounds (`sampler="ddpm"`) or by DPM-Solver on the
  interpolated schedule (`sampler="dpm"`, EDP). `denoise` gives EDP's action approximation and
  `log_prob` its two likelihood surrogates. Settings from the official code
  (github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL, agents/diffusion.py, and its fork
  github.com/felix-thu/DiffCPS): noise model an MLP on [a, time embedding, s] with 3 x 256 Mish (`offbench.nets.mish`), time
  embedding sinusoidal 16 -> 32 -> 16 (Mish).
- `ScoreDiffusion`: the continuous-time VP SDE behaviour model of SfBC (Chen et al. 2023,
  github.com/ChenDRAG/SfBC, diffusion_SDE/): alpha_t = exp(-t^2 (b1 - b0)/4 - t b0/2), b0 = 0.1,
  b1 = 20, t ~ U(1e-5, 1) in training, sampled by the probability-flow ODE with singlestep
  DPM-Solver (Lu et al. 2022) of order <= 3 on a time-uniform grid from t = 1 to 1e-3, in noise-prediction
  form (SfBC's) or data-prediction form (DPM-Solver++, QGPO's official code).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from offbench.diffusion.schedules import BetaSchedule, DiscreteVPSchedule, LinearVPSchedule, make_betas
from offbench.diffusion.solvers import SolverForm, dpm_solver_sample
from offbench.nets import Linear, Mish


# --------------------------------------------------------------------------- the noise model
class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of a (float) time: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(d/2-1))."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1))), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        x = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]  # float64 modules: t not rounded to float32
        return torch.cat([x.sin(), x.cos()], dim=-1)


class NoiseMLP(nn.Module):
    """eps_theta(a_i, i, s): an MLP on [a_i, time embedding, s] with Mish hidden layers of the widths
    `hidden` (Diffusion-QL's agents/model.py: 3 x 256)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256, 256), t_dim: int = 16):
        super().__init__()
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(t_dim), Linear(t_dim, 2 * t_dim), Mish(), Linear(2 * t_dim, t_dim)
        )
        layers: list[nn.Module] = []
        width = act_dim + t_dim + obs_dim
        for size in hidden:
            layers += [Linear(width, size), Mish()]
            width = size
        self.mid = nn.Sequential(*layers)
        self.final = Linear(width, act_dim)

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return self.final(self.mid(torch.cat([x, self.time_mlp(t), s], dim=-1)))


# --------------------------------------------------------------------------- discrete DDPM policy
class DenoisingTerms(NamedTuple):
    """What one noise-model pass on noised dataset actions gives (`DiffusionPolicy.denoise`)."""

    i: Tensor  # (B,) step indices, 0 .. T-1
    noise: Tensor  # (B, act_dim) the eps that noised the actions
    eps_pred: Tensor  # (B, act_dim) eps_theta(a_i, i, s)
    a0_hat: Tensor  # (B, act_dim) the action approximation, clipped to the bounds; differentiable in theta

    def loss(self, per_sample: bool = False) -> Tensor:
        """The eps-MSE: mean over batch and action dims (per_sample: over action dims only, (B,))."""
        err = (self.eps_pred - self.noise).pow(2)
        return err.mean(-1) if per_sample else err.mean()


Surrogate = Literal["gaussian", "elbo"]


class DiffusionPolicy(nn.Module):
    """A state-conditioned DDPM over actions with T steps (T = 5 in Diffusion-QL and DiffCPS, 1000 in EDP).

    Args:
        beta_schedule: "vp" (Diffusion-QL, DiffCPS), "linear_scaled" (EDP: DDPM's linear betas scaled
            by 1000 / T), "linear" (DDPM's 1e-4 .. 0.02 at any T) or "cosine".
        variance: reverse-step variance. "posterior" (the official code): the DDPM posterior
            variance beta_tilde_i = beta_i (1 - abar_{i-1}) / (1 - abar_i); "beta": beta_i, as the
            DiffCPS paper's reverse-sampling equation writes. No noise is added at the last step in either case.
        clip_denoised: clip the predicted a_0 to [-max_action, max_action] before forming the
            posterior mean (official code). Without clipping the mean equals the paper's
            (a_i - beta_i / sqrt(1 - abar_i) eps) / sqrt(alpha_i). With the "dpm" sampler it clips
            each noise prediction so that the a_0 it implies lies in the bounds (EDP's noise clipping).
        sampler: "ddpm", the T-step reverse chain; "dpm", DPM-Solver (`dpm_steps` model calls of order
            `dpm_order`, time-uniform from t = 1 to `dpm_t_end`, by default 1/T: step 0) on the probability-flow ODE of the
            schedule read in continuous time as DPM-Solver's NoiseScheduleVP("discrete") does (EDP's
            `--sample_method dpm`: 15 steps, order 3, t_end 1e-3 with K = 1000; its README asks for K = 1000 with
            DPM-Solver because t_end = 1e-3 lies before step 0 of a shorter schedule, which the default
            1/T avoids). DPM-Solver is deterministic given a_T.
        model: the noise network eps_theta(a_i, i, s) (called as model(a_i, i, s), i the long step
            index 0..T-1); by default Diffusion-QL's NoiseMLP of widths `hidden` (IDQL passes its LN-ResNet).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        n_timesteps: int = 5,
        beta_schedule: BetaSchedule = "vp",
        variance: Literal["posterior", "beta"] = "posterior",
        clip_denoised: bool = True,
        hidden: tuple[int, ...] = (256, 256, 256),
        sampler: Literal["ddpm", "dpm"] = "ddpm",
        dpm_steps: int = 15,
        dpm_order: int = 3,
        dpm_t_end: float | None = None,
        model: nn.Module | None = None,
    ):
        super().__init__()
        if sampler not in ("ddpm", "dpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddpm (the reverse chain) or dpm (DPM-Solver)")
        if dpm_order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {dpm_order}")
        if dpm_t_end is not None and dpm_t_end < 1.0 / n_timesteps:
            raise ValueError(
                f"dpm_t_end {dpm_t_end} lies before step 0 of a {n_timesteps}-step schedule (t = 1/{n_timesteps}), where "
                "the interpolated schedule has alpha_t > 1; leave it unset (1/K, DPM-Solver's choice for discrete "
                "models: 1e-3 at K = 1000, as EDP) or give a value >= 1/K"
            )
        self.sampler, self.dpm_steps, self.dpm_order = sampler, dpm_steps, dpm_order
        self.dpm_t_end = 1.0 / n_timesteps if dpm_t_end is None else dpm_t_end
        self.act_dim, self.max_action, self.n_timesteps = act_dim, max_action, n_timesteps
        self.clip_denoised = clip_denoised
        self.model = NoiseMLP(obs_dim, act_dim, hidden) if model is None else model
        betas = make_betas(beta_schedule, n_timesteps)  # float64 here
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        if variance == "posterior":
            std = torch.exp(0.5 * torch.log(post_var.clamp(min=1e-20)))
        elif variance == "beta":
            std = betas.sqrt()
        else:
            raise ValueError(f"unknown variance {variance!r}; choose posterior or beta")
        std[0] = 0.0  # the last reverse step (i = 1, index 0) is deterministic
        buffers = {
            "betas": betas,
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "sqrt_recip_abar": (1 / abar).sqrt(),
            "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
            "post_coef_x0": betas * abar_prev.sqrt() / (1 - abar),
            "post_coef_xt": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
            "sample_std": std,
        }
        dtype = torch.get_default_dtype()
        for name, value in buffers.items():  # computed in float64, stored in the default dtype (float32)
            self.register_buffer(name, value.to(dtype))
        # Derived tables kept out of the checkpoint (checkpoints of earlier versions load unchanged).
        # The ELBO weights of the official EDP code: w_i = beta_i / (2 (1 - abar_i) alpha_i), rescaled to sum to T.
        weights = betas / (2 * (1 - abar) * alphas)
        self.register_buffer("elbo_weights", (weights * n_timesteps / weights.sum()).to(dtype), persistent=False)
        self.schedule = DiscreteVPSchedule(abar)  # continuous-time reading for DPM-Solver

    def denoise(self, s: Tensor, a0: Tensor, noise: Tensor | None = None, i: Tensor | None = None) -> DenoisingTerms:
        """One pass of the noise model on noised dataset actions: a_i = sqrt(abar_i) a0 + sqrt(1 - abar_i) eps
        at a uniform step i, the prediction eps_theta(a_i, i, s) and from it EDP's action approximation
        a0_hat = (a_i - sqrt(1 - abar_i) eps_theta) / sqrt(abar_i), clipped to the bounds (Kang et al. 2023,
        "Efficient Diffusion Policies for Offline RL", arXiv:2305.20081, Section 4.1). States `s` (B, obs_dim)
        first, dataset actions `a0` (B, act_dim) second, as everywhere in the suite (`critic(obs, act)`).
        `noise` (B, act_dim) and `i` (B,) are the random draws; by default they are drawn on the device."""
        if i is None:
            i = torch.randint(0, self.n_timesteps, (a0.shape[0],), device=a0.device)
        if noise is None:
            noise = torch.randn_like(a0)
        a_i = self.sqrt_abar[i, None] * a0 + self.sqrt_one_minus_abar[i, None] * noise
        eps_pred = self.model(a_i, i, s)
        a0_hat = self.sqrt_recip_abar[i, None] * a_i - self.sqrt_recipm1_abar[i, None] * eps_pred
        return DenoisingTerms(i, noise, eps_pred, a0_hat.clamp(-self.max_action, self.max_action))

    def loss(self, s: Tensor, a0: Tensor, per_sample: bool = False, noise: Tensor | None = None,
             i: Tensor | None = None) -> Tensor:
        """eps-MSE at a uniform step i: the mean over batch and action dims (per_sample: over action
        dims only, shape (B,)). `noise` and `i` are the random draws (see `denoise`)."""
        return self.denoise(s, a0, noise, i).loss(per_sample)

    def log_prob(self, terms: DenoisingTerms, a0: Tensor, surrogate: Surrogate = "gaussian") -> Tensor:
        """A surrogate of log pi(a0 | s), (B,), from the pass `terms` = denoise(s, a0) (Kang et al. 2023,
        arXiv:2305.20081; official EDP code, diffusion/dql.py):
        "gaussian": log N(a0; a0_hat, I) = -||a0 - a0_hat||^2 / 2 - (d / 2) log(2 pi), a unit Gaussian
            around the action approximation (the code's default, "mle" with fixed_std);
        "elbo": -w_i ||eps - eps_theta||^2 / d, the DDPM ELBO's term at step i with the weights
            w_i = beta_i / (2 (1 - abar_i) alpha_i) rescaled to sum to T (the code's "elbo")."""
        if surrogate == "gaussian":
            d = a0.shape[-1]
            return -0.5 * (a0 - terms.a0_hat).pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
        if surrogate == "elbo":
            return -self.elbo_weights[terms.i] * terms.loss(per_sample=True)
        raise ValueError(f"unknown likelihood surrogate {surrogate!r}; choose gaussian or elbo")

    def reverse_step(self, x: Tensor, i: int, s: Tensor, z: Tensor) -> Tensor:
        """a_{i-1} from a_i (index i = T-1 .. 0): the predicted a_0 (clipped to the bounds with
        clip_denoised), the posterior mean, plus sample_std[i] * z (0 at i = 0)."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps = self.model(x, t, s)
        x0 = self.sqrt_recip_abar[i] * x - self.sqrt_recipm1_abar[i] * eps
        if self.clip_denoised:
            x0 = x0.clamp(-self.max_action, self.max_action)
        return self.post_coef_x0[i] * x0 + self.post_coef_xt[i] * x + self.sample_std[i] * z

    def sample(self, s: Tensor, grad: bool = False, noise: Tensor | None = None) -> Tensor:
        """Actions (..., act_dim) for states (..., obs_dim) by the reverse chain i = T..1 (or DPM-Solver,
        `sampler="dpm"`); `grad` keeps the graph (for a Q-gradient through sampling). `noise`
        (T + 1, n, act_dim) holds the random draws in the order the chain uses them: a_T, then one normal
        per step (the last one, at i = 0, multiplied by 0, as the official code draws it too); DPM-Solver
        uses only a_T = noise[0]. By default they are drawn."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            lead = s.shape[:-1]
            s = s.reshape(-1, s.shape[-1])
            if noise is None:
                x = torch.randn(s.shape[0], self.act_dim, device=s.device)
            else:
                x = noise[0]
            if self.sampler == "dpm":
                x = dpm_solver_sample(self._dpm_eps(s), self.schedule, x, self.dpm_steps, self.dpm_order,
                                      t_end=self.dpm_t_end)
                return x.clamp(-self.max_action, self.max_action).reshape(*lead, self.act_dim)
            for k, i in enumerate(reversed(range(self.n_timesteps))):
                x = self.reverse_step(x, i, s, torch.randn_like(x) if noise is None else noise[k + 1])
            return x.clamp(-self.max_action, self.max_action).reshape(*lead, self.act_dim)

    def _dpm_eps(self, s: Tensor):
        """eps(x, t) for DPM-Solver: the model at the fractional step N t - 1; with clip_denoised the
        prediction is clipped to [(x - alpha_t m) / sigma_t, (x + alpha_t m) / sigma_t], i.e. so that the
        implied a_0 = (x - sigma_t eps) / alpha_t lies in [-m, m] (the official EDP code clips the same
        way with the coefficients of the step floor(N t - 1); here those of t itself, on the same curve)."""
        schedule, m = self.schedule, self.max_action

        def eps(x: Tensor, t: Tensor) -> Tensor:
            out = self.model(x, schedule.model_time(t).expand(x.shape[0]), s)
            if not self.clip_denoised:
                return out
            alpha, sigma = schedule.log_alpha(t).exp(), schedule.sigma(t)
            return torch.clamp(out, (x - alpha * m) / sigma, (x + alpha * m) / sigma)

        return eps

    def forward(self, s: Tensor) -> Tensor:
        return self.sample(s, grad=True)


# --------------------------------------------------------------------------- continuous VP SDE (SfBC)
class ScoreDiffusion(nn.Module):
    """A continuous-time VP-SDE behaviour model over actions (the network predicts the noise), sampled
    with singlestep "DPM-Solver-fast" on the probability-flow ODE in noise-prediction form (DPM-Solver,
    SfBC's code) or data-prediction form (DPM-Solver++, QGPO's code).

    `model(x, t, s)` predicts the noise eps at time t in (0, 1] (SfBC's network outputs the score
    -eps / sigma_t; the two are the same model up to that fixed factor).
    """

    def __init__(self, model: nn.Module, act_dim: int, max_action: float = 1.0, beta_0: float = 0.1,
                 beta_1: float = 20.0, t_end: float = 1e-3, t_eps: float = 1e-5):
        super().__init__()
        self.model, self.act_dim, self.max_action = model, act_dim, max_action
        self.beta_0, self.beta_1, self.t_end, self.t_eps = beta_0, beta_1, t_end, t_eps
        self.schedule = LinearVPSchedule(beta_0, beta_1)

    # marginal q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I); lambda_t = log(alpha_t / sigma_t)
    def log_alpha(self, t: Tensor) -> Tensor:
        return self.schedule.log_alpha(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.schedule.sigma(t)

    def half_log_snr(self, t: Tensor) -> Tensor:
        return self.schedule.half_log_snr(t)

    def time_of(self, lam: Tensor) -> Tensor:
        return self.schedule.time_of(lam)

    def loss(self, s: Tensor, a0: Tensor, u: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Denoising score matching in eps form, t ~ U(t_eps, 1): E_batch sum_dims (eps_hat - eps)^2
        (SfBC's diffusion_SDE/loss.py sums over action dims). The random draws, in the order the official
        code makes them: `u` (B,) uniform in [0, 1), t = u (1 - t_eps) + t_eps, then `noise` (B, act_dim);
        by default they are drawn on the device."""
        if u is None:
            u = torch.rand(a0.shape[0], device=a0.device)
        t = u * (1.0 - self.t_eps) + self.t_eps
        z = torch.randn_like(a0) if noise is None else noise
        x = self.log_alpha(t).exp()[:, None] * a0 + self.sigma(t)[:, None] * z
        return (self.model(x, t, s) - z).pow(2).sum(-1).mean()

    @torch.no_grad()
    def sample(self, s: Tensor, steps: int = 15, order: int = 3, noise: Tensor | None = None,
               form: SolverForm = "noise") -> Tensor:
        """Actions (..., act_dim) for states (..., obs_dim): `steps` model evaluations of singlestep
        DPM-Solver on the time-uniform grid t_0 = 1 > ... > t_steps = t_end, mixing orders as
        DPM-Solver-fast does (order 3: [3]*(K-2) + [2, 1] for steps % 3 == 0, etc.); the result is
        clipped to the action bounds. `form`: "noise", DPM-Solver in noise-prediction form (SfBC's code),
        or "data", DPM-Solver++ in data-prediction form (QGPO's code, with its order-2 split of an even
        number of steps; offbench.diffusion.solvers). `noise` (n, act_dim), n = the number of states, is
        the random draw x at t = 1; by default it is drawn on the device."""
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
        lead = s.shape[:-1]
        s = s.reshape(-1, s.shape[-1])
        x = torch.randn(s.shape[0], self.act_dim, device=s.device) if noise is None else noise
        x = dpm_solver_sample(self.eps_fn(s), self.schedule, x, steps, order, t_end=self.t_end, form=form)
        return x.clamp(-self.max_action, self.max_action).reshape(*lead, self.act_dim)

    def eps_fn(self, s: Tensor):
        """eps(x, t) of the model for states s, t a 0-dim time (the solver's form)."""
        return lambda x, t: self.model(x, t.expand(x.shape[0]), s)
