"""Diffusion models for actions, shared by Diffusion-QL, DiffCPS and SfBC.

Two families, one contract (`loss(a0, s)`, `sample(s)`; the schedule lives in buffers so it follows
the device and the checkpoint):

- `DiffusionPolicy`: the discrete-time DDPM policy of Diffusion-QL and DiffCPS (Wang et al. 2023;
  He et al. 2024). Forward q(a_i | a_0) = N(sqrt(abar_i) a_0, (1 - abar_i) I), eps-prediction, loss
  E ||eps - eps_theta(a_i, i, s)||^2 with i uniform, reverse chain with the predicted a_0 clipped to
  the action bounds. Settings from the official code (github.com/Zhendong-Wang/Diffusion-Policies-
  for-Offline-RL, agents/diffusion.py, and its fork github.com/felix-thu/DiffCPS): noise model an
  MLP on [a, time embedding, s] with 3 x 256 Mish, time embedding sinusoidal 16 -> 32 -> 16 (Mish).
- `ScoreDiffusion`: the continuous-time VP SDE behaviour model of SfBC (Chen et al. 2023,
  github.com/ChenDRAG/SfBC, diffusion_SDE/): alpha_t = exp(-t^2 (b1 - b0)/4 - t b0/2), b0 = 0.1,
  b1 = 20, t ~ U(1e-5, 1) in training, sampled by the probability-flow ODE with singlestep
  DPM-Solver (Lu et al. 2022) of order <= 3 on a time-uniform grid from t = 1 to 1e-3.

Plus helpers: `update_ema` (foreach lerp, with the official warm-up cadence), `repeat_rows`,
`sample_by_score` and `resample` (draw candidates with probabilities softmax(scores) on the device, Gumbel-top-k, no host
sync).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

BetaSchedule = Literal["linear", "cosine", "vp"]


# --------------------------------------------------------------------------- noise schedules
def linear_beta_schedule(n_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's linear betas (Ho et al. 2020), evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)


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
    if schedule == "linear":
        return linear_beta_schedule(n_timesteps)
    if schedule == "cosine":
        return cosine_beta_schedule(n_timesteps)
    if schedule == "vp":
        return vp_beta_schedule(n_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose linear, cosine or vp")


# --------------------------------------------------------------------------- the noise model
class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of a (float) time: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(d/2-1))."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1))), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        x = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([x.sin(), x.cos()], dim=-1)


class NoiseMLP(nn.Module):
    """eps_theta(a_i, i, s): an MLP on [a_i, time embedding, s] with Mish hidden layers of the widths
    `hidden` (Diffusion-QL's agents/model.py: 3 x 256)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256, 256), t_dim: int = 16):
        super().__init__()
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(t_dim), nn.Linear(t_dim, 2 * t_dim), nn.Mish(), nn.Linear(2 * t_dim, t_dim)
        )
        layers: list[nn.Module] = []
        width = act_dim + t_dim + obs_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Mish()]
            width = size
        self.mid = nn.Sequential(*layers)
        self.final = nn.Linear(width, act_dim)

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


class DiffusionPolicy(nn.Module):
    """A state-conditioned DDPM over actions with T steps (T = 5 in Diffusion-QL and DiffCPS).

    Args:
        variance: reverse-step variance. "posterior" (the official code): the DDPM posterior
            variance beta_tilde_i = beta_i (1 - abar_{i-1}) / (1 - abar_i); "beta": beta_i, as the
            DiffCPS paper's reverse-sampling equation writes. No noise is added at the last step in either case.
        clip_denoised: clip the predicted a_0 to [-max_action, max_action] before forming the
            posterior mean (official code). Without clipping the mean equals the paper's
            (a_i - beta_i / sqrt(1 - abar_i) eps) / sqrt(alpha_i).
        model: the noise network eps_theta(a_i, i, s) (called as model(a_i, i, s), i the long step
            index 0..T-1); by default Diffusion-QL's NoiseMLP of width `hidden` (IDQL passes its LN-ResNet).
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
        model: nn.Module | None = None,
    ):
        super().__init__()
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
        for name, value in buffers.items():  # computed in float64, stored in the default dtype (float32)
            self.register_buffer(name, value.to(torch.get_default_dtype()))

    def denoise(self, a0: Tensor, s: Tensor, noise: Tensor | None = None, i: Tensor | None = None) -> DenoisingTerms:
        """One pass of the noise model on noised dataset actions: a_i = sqrt(abar_i) a0 + sqrt(1 - abar_i) eps
        at a uniform step i, the prediction eps_theta(a_i, i, s) and from it EDP's action approximation
        a0_hat = (a_i - sqrt(1 - abar_i) eps_theta) / sqrt(abar_i), clipped to the bounds (Kang et al. 2023,
        "Efficient Diffusion Policies for Offline RL", arXiv:2305.20081, Section 4.1). `noise` (B, act_dim)
        and `i` (B,) are the random draws; by default they are drawn on the device."""
        if i is None:
            i = torch.randint(0, self.n_timesteps, (a0.shape[0],), device=a0.device)
        if noise is None:
            noise = torch.randn_like(a0)
        a_i = self.sqrt_abar[i, None] * a0 + self.sqrt_one_minus_abar[i, None] * noise
        eps_pred = self.model(a_i, i, s)
        a0_hat = self.sqrt_recip_abar[i, None] * a_i - self.sqrt_recipm1_abar[i, None] * eps_pred
        return DenoisingTerms(i, noise, eps_pred, a0_hat.clamp(-self.max_action, self.max_action))

    def loss(self, a0: Tensor, s: Tensor, per_sample: bool = False, noise: Tensor | None = None,
             i: Tensor | None = None) -> Tensor:
        """eps-MSE at a uniform step i: the mean over batch and action dims (per_sample: over action
        dims only, shape (B,)). `noise` and `i` are the random draws (see `denoise`)."""
        return self.denoise(a0, s, noise, i).loss(per_sample)

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
        """Actions (..., act_dim) for states (..., obs_dim) by the reverse chain i = T..1; `grad`
        keeps the graph (for a Q-gradient through sampling). `noise` (T + 1, n, act_dim) holds the
        random draws in the order the chain uses them: a_T, then one normal per step (the last one,
        at i = 0, multiplied by 0, as the official code draws it too); by default they are drawn."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            lead = s.shape[:-1]
            s = s.reshape(-1, s.shape[-1])
            if noise is None:
                x = torch.randn(s.shape[0], self.act_dim, device=s.device)
            else:
                x = noise[0]
            for k, i in enumerate(reversed(range(self.n_timesteps))):
                x = self.reverse_step(x, i, s, torch.randn_like(x) if noise is None else noise[k + 1])
            return x.clamp(-self.max_action, self.max_action).reshape(*lead, self.act_dim)

    def forward(self, s: Tensor) -> Tensor:
        return self.sample(s, grad=True)


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay: float = 0.995, start: int = 1000,
               every: int = 5, warmup: Literal["hold", "copy"] = "hold") -> None:
    """The EMA cadence of the official Diffusion-QL/DiffCPS code, on update number `step` (a Python
    int, so no host sync): from `start` on, every `every` steps, ema <- decay * ema + (1 - decay) *
    model (one fused foreach lerp). Before `start`: "hold" keeps the EMA at its initial weights (what
    the official code does), "copy" copies the model's weights at every step."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if step < start:
        if warmup == "copy":
            torch._foreach_copy_(ema_params, params)
        return
    if step % every == 0:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def sample_by_score(scores: Tensor, k: int = 1, u: Tensor | None = None) -> Tensor:
    """Indices (n, k) drawn without replacement from softmax(scores) along the last dim (Gumbel-top-k,
    Kool et al. 2019): k = 1 is torch.multinomial(softmax(scores), 1) in distribution, without its
    underflow failures for peaked scores and without a host sync. `u` (uniforms shaped like scores)
    are the random draws; by default they are drawn on the device."""
    u = (torch.rand_like(scores) if u is None else u).clamp(1e-12, 1.0 - 1e-7)
    return (scores - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def repeat_rows(x: Tensor, n: int) -> Tensor:
    """Each row of x (B, d) n times in a row, (B * n, d): repeat_interleave as an expand and a copy."""
    return x[:, None].expand(-1, n, -1).reshape(-1, x.shape[-1])


def resample(candidates: Tensor, logits: Tensor, k: int = 1, u: Tensor | None = None) -> Tensor:
    """Pick from `candidates` (n, m, d) by drawing k of the m without replacement with probabilities
    softmax(logits) (n, m), and average the k picks: (n, d). k = 1 is plain softmax sampling; `u` as
    in `sample_by_score`."""
    idx = sample_by_score(logits, k, u)
    picked = candidates.gather(1, idx[..., None].expand(-1, -1, candidates.shape[-1]))
    return picked.mean(1)


# --------------------------------------------------------------------------- continuous VP SDE (SfBC)
class ScoreDiffusion(nn.Module):
    """A continuous-time VP-SDE behaviour model over actions, noise-prediction form, sampled with
    singlestep DPM-Solver ("DPM-Solver-fast") on the probability-flow ODE.

    `model(x, t, s)` predicts the noise eps at time t in (0, 1] (SfBC's network outputs the score
    -eps / sigma_t; the two are the same model up to that fixed factor).
    """

    def __init__(self, model: nn.Module, act_dim: int, max_action: float = 1.0, beta_0: float = 0.1,
                 beta_1: float = 20.0, t_end: float = 1e-3, t_eps: float = 1e-5):
        super().__init__()
        self.model, self.act_dim, self.max_action = model, act_dim, max_action
        self.beta_0, self.beta_1, self.t_end, self.t_eps = beta_0, beta_1, t_end, t_eps

    # marginal q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I); lambda_t = log(alpha_t / sigma_t)
    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def half_log_snr(self, t: Tensor) -> Tensor:
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def time_of(self, lam: Tensor) -> Tensor:
        """Inverse of half_log_snr for the linear VP schedule (a quadratic in t)."""
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.beta_0**2 + tmp) + self.beta_0) / (self.beta_1 - self.beta_0)

    def loss(self, a0: Tensor, s: Tensor) -> Tensor:
        """Denoising score matching in eps form, t ~ U(t_eps, 1): E_batch sum_dims (eps_hat - eps)^2
        (SfBC's diffusion_SDE/loss.py sums over action dims)."""
        t = torch.rand(a0.shape[0], device=a0.device) * (1.0 - self.t_eps) + self.t_eps
        z = torch.randn_like(a0)
        x = self.log_alpha(t).exp()[:, None] * a0 + self.sigma(t)[:, None] * z
        return (self.model(x, t, s) - z).pow(2).sum(-1).mean()

    @torch.no_grad()
    def sample(self, s: Tensor, steps: int = 15, order: int = 3) -> Tensor:
        """Actions (..., act_dim) for states (..., obs_dim): `steps` model evaluations of singlestep
        DPM-Solver on the time-uniform grid t_0 = 1 > ... > t_steps = t_end, mixing orders as
        DPM-Solver-fast does (order 3: [3]*(K-2) + [2, 1] for steps % 3 == 0, etc.); the result is
        clipped to the action bounds."""
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
        lead = s.shape[:-1]
        s = s.reshape(-1, s.shape[-1])
        x = torch.randn(s.shape[0], self.act_dim, device=s.device)
        grid = torch.linspace(1.0, self.t_end, steps + 1, device=s.device)
        i = 0
        for o in _singlestep_orders(steps, order):
            x = self._dpm_step(x, s, grid[i : i + o + 1])
            i += o
        return x.clamp(-self.max_action, self.max_action).reshape(*lead, self.act_dim)

    def _eps(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return self.model(x, t.expand(x.shape[0]), s)

    def _dpm_step(self, x: Tensor, s: Tensor, ts: Tensor) -> Tensor:
        """One DPM-Solver-k step from ts[0] to ts[-1], k = len(ts) - 1, intermediate times ts[1:-1]
        (Lu et al. 2022, Algorithms 1-2, noise-prediction form with the 'dpm_solver' corrections)."""
        lam = self.half_log_snr(ts)
        log_a, sig = self.log_alpha(ts), self.sigma(ts)
        h = lam[-1] - lam[0]
        eps_s = self._eps(x, ts[0], s)

        def first_order(j: int) -> Tensor:  # x at ts[j] from ts[0] using eps_s only
            return torch.exp(log_a[j] - log_a[0]) * x - sig[j] * torch.expm1(lam[j] - lam[0]) * eps_s

        k = len(ts) - 1
        if k == 1:
            return first_order(1)
        r1 = (lam[1] - lam[0]) / h
        eps_1 = self._eps(first_order(1), ts[1], s)
        if k == 2:
            return first_order(2) - (0.5 / r1) * sig[2] * torch.expm1(h) * (eps_1 - eps_s)
        r2 = (lam[2] - lam[0]) / h
        phi_22 = torch.expm1(r2 * h) / (r2 * h) - 1.0
        x_2 = first_order(2) - (r2 / r1) * sig[2] * phi_22 * (eps_1 - eps_s)
        eps_2 = self._eps(x_2, ts[2], s)
        phi_2 = torch.expm1(h) / h - 1.0
        return first_order(3) - (1.0 / r2) * sig[3] * phi_2 * (eps_2 - eps_s)


def _singlestep_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver-fast's split of `steps` model evaluations into singlestep solver orders."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps
