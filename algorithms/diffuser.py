"""Diffuser: Planning with Diffusion for Flexible Behavior Synthesis (Janner, Du, Tenenbaum & Levine,
ICML 2022, arXiv:2205.09991; official code jannerm/diffuser @7ea422860cc0106e5ca5949d980f04b799d5462c,
whose defaults are the arXiv v2 settings).

A diffusion model over whole windows tau = [a_t, s_t]_{t=0..H-1} (channels: actions, then states,
normalised per dimension), a value function of noised windows, and planning by value-guided sampling
with the current state imposed (inpainted) at every step; the agent executes the first action of the
best plan and replans at every environment step.

    schedule: cosine (s = 0.008), beta_i clipped to 0.999, N steps (index i = 0..N-1, i = N-1 noisiest)
    diffusion loss (x0 prediction): x_i = sqrt(abar_i) tau + sqrt(1 - abar_i) eps, x_i[0, states] = s_0,
        L = mean_{b,h,d} w[h,d] (x0_theta(x_i, i)[h,d] - tau[h,d])^2,
        w[h,d] = gamma_l^h / mean_h(gamma_l^h) (loss_discount gamma_l, 1 by default), w[0, actions] =
        action_weight (10), w[0, states] = 0 (the prediction's imposed s_0 has no error; the official code
        overwrites it and keeps it in the mean's denominator, as this weight does)
    value loss: x_i as above (own i, eps), L_V = mean (V(x_i, i) - R)^2, R = sum_k gamma^k r_{start+k} to
        the episode's end (-100 added to a terminal reward; offbench/trajectory/padded.py)
    guided reverse step i (official sampling/functions.py n_step_guided_p_sample): n_guide_steps times
        g = grad_x sum V(x, i); g <- Var_i g (`scale_grad_by_std`: the posterior *variance*, despite the
        name); g = 0 when i < t_stopgrad; x <- x + scale g; x[0, states] = s_0;
        then (the gradient moves x_i *before* the denoiser; the paper's Algorithm 1 adds it to the mean)
        x_{i-1} = c1_i x0_theta(x, i) + c2_i x + sigma_i z (z = 0 at i = 0), x_{i-1}[0, states] = s_0,
        sigma_i^2 = posterior variance, clipped below at 1e-20 in the log
    acting: `n_plans` (64) plans per state, ranked by the value V computed in the last guide iteration of
        the last step (i = 0, on that step's input, not on the final plan); first action of the best,
        unnormalised; replanning at every step, no warm start.

Training (official config/locomotion.py): Adam 2e-4 for both networks, batch 32 with 2 accumulated
batches (here one batch of 64: the loss is a mean over equal halves and GroupNorm is per sample, so the
gradient is the same function of the same 64 windows), EMA 0.995 of each network every 10 updates from
update 2000 (before that the EMA is copied from the network every 10 updates, as the official Trainer),
1e6 diffusion updates and 2e5 value updates (`value_updates`: the value network stops training there;
the official code trains the two in separate runs on independent batches, here both step on the same
batch). Planning uses the EMA copies of both.

Per-task settings (official config/locomotion.py; configs/tasks/diffuser/): H = 32, dim_mults (1, 2, 4,
8), guide scale 0.1, t_stopgrad 2 on hopper and walker2d; hopper-medium-expert scale 1e-4, t_stopgrad 4;
halfcheetah H = 4, dim_mults (1, 4, 8) with attention in the diffusion model (not in the value network),
scale 0.001, t_stopgrad 4. N = 20 everywhere (the code, arXiv v2); the paper's first version used N = 100
(`n_timesteps: 100`, jannerm/diffuser issues #20 and #29; its other v1 settings, 500k updates and Adam
4e-5, are not the code's).

Value discount: the official config says `values.discount = 0.99`, but the planner loads the value
networks trained with 0.997 (`plan.discount`, the `_d0.997` checkpoint names), so 0.997 is the default
here (`value_discount`).

Deviations: the suite's datasets drop the timeout row of each truncated episode (padded.py); the
executed action is clipped to the env's bounds (the contract of `act`; the official code passes the
unclipped action to MuJoCo, whose actuators clamp it, while the control cost of the reward is computed
on the unclipped action); `max_path_length` defaults to the dataset's episode limit (1000 on D4RL, the
official value); the logged `loss/a0` is the first action's unweighted squared error (the official `a0_loss`
info divides it by action_weight). AntMaze is refused: the official code cannot load it (its d4rl.py calls functions that
are not defined) and neither the paper nor DiffCPS reports it.

Verified against the official code: tests/test_golden_diffuser.py (float64, official weights and
recorded draws): U-Net and value forward, the diffusion and value losses, guided sampling and the action
choice (tests/data/golden/README.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from offbench import settings as check
from offbench.diffusion import cosine_beta_schedule, update_ema
from offbench.errors import UserError
from offbench.module import OfflineRLModule, compilable
from offbench.trajectory.padded import (
    WindowBatch,
    WindowTable,
    discounted_values,
    gaussian_statistics,
    padded_episodes,
    sequence_starts,
)
from offbench.trajectory.planner_nets import PlannerUNet, PlannerValue


class PlanDraws(NamedTuple):
    """The random draws of planning (tests pass the official run's; acting draws them on the device)."""

    x_last: Tensor  # (n * n_plans, H, D): x_{N-1} ~ N(0, I)
    noise: Tensor  # (N, n * n_plans, H, D): z of the reverse steps i = N-1 .. 0 (the last one unused)


class Diffuser(OfflineRLModule):
    needs_dataset_rows = True  # trains on windows of the dataset's episodes (batch_source)

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        horizon: int = 32,
        n_timesteps: int = 20,
        dim: int = 32,
        dim_mults: tuple[int, ...] = (1, 2, 4, 8),
        attention: bool = False,
        action_weight: float = 10.0,
        loss_discount: float = 1.0,
        diffusion_lr: float = 2e-4,
        value_lr: float = 2e-4,
        value_discount: float = 0.997,
        termination_penalty: float = -100.0,
        value_updates: int = 200_000,
        ema_decay: float = 0.995,
        ema_start: int = 2000,
        ema_every: int = 10,
        guide_scale: float = 0.1,
        n_guide_steps: int = 2,
        t_stopgrad: int = 2,
        scale_grad_by_std: bool = True,
        n_plans: int = 64,
        max_path_length: int | None = None,
    ) -> None:
        """Diffuser: a diffusion model over windows [a_t, s_t], a value of noised windows, value-guided planning
        (equations, settings: algorithms/diffuser.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, the executed action is clipped to [-max_action, max_action]; `offbench fit`
                takes it from the data.
            horizon: planning horizon H, the length of the diffused windows (official 32; halfcheetah 4); a multiple
                of 2^(len(dim_mults) - 1).
            n_timesteps: diffusion steps N of the cosine schedule (official code and arXiv v2 20; the paper's first
                version 100).
            dim: base channel width of the U-Net and the value network (official 32).
            dim_mults: channel multipliers of dim per U-Net level (official [1, 2, 4, 8]; halfcheetah [1, 4, 8]).
            attention: attention blocks in the diffusion U-Net, not in the value network (official on halfcheetah
                only).
            action_weight: loss weight w[0, actions] of the first action in the diffusion loss (official 10).
            loss_discount: gamma_l of the diffusion loss's per-step weights gamma_l^h (official 1: equal weights).
            diffusion_lr: Adam learning rate of the diffusion model (official 2e-4).
            value_lr: Adam learning rate of the value network V (official 2e-4).
            value_discount: discount gamma of the value targets R (0.997, what the released planner loaded; the
                official config says 0.99).
            termination_penalty: added to the reward of an episode's terminal step (official -100).
            value_updates: updates after which the value network stops training (official 2e5; 0: never trained).
            ema_decay: decay of the EMA copies that plan (official 0.995).
            ema_start: update from which the EMA moves; before it the EMA is copied from the network (official 2000).
            ema_every: the EMA copies move every `ema_every` updates (official 10).
            guide_scale: step size of the value-gradient guide, x <- x + scale g (official 0.1; hopper-medium-expert
                1e-4, halfcheetah 0.001; 0: unguided sampling).
            n_guide_steps: value-gradient guide iterations per reverse step (official 2; 0: unguided, the first plan
                is taken).
            t_stopgrad: no guide gradient at reverse steps i < t_stopgrad (official 2; hopper-medium-expert and
                halfcheetah 4).
            scale_grad_by_std: scale the guide gradient g by the posterior variance Var_i (official true; a variance
                despite the name).
            n_plans: plans sampled per state, the best by V is executed (official 64).
            max_path_length: episode length of the padded windows and the value targets; null: the dataset's episode
                limit (1000 on D4RL, the official value).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.integer("horizon", horizon)
        check.integer("n_timesteps", n_timesteps)
        check.integer("dim", dim, low=8)
        check.widths("dim_mults", dim_mults)
        check.require(len(dim_mults) > 0, "dim_mults", dim_mults, "a non-empty list of width multipliers, e.g. [1, 2, 4, 8]")
        check.non_negative("action_weight", action_weight)
        check.positive("loss_discount", loss_discount)
        check.learning_rate("diffusion_lr", diffusion_lr)
        check.learning_rate("value_lr", value_lr)
        check.interval("value_discount", value_discount, "[0, 1]")
        check.finite("termination_penalty", termination_penalty)
        check.integer("value_updates", value_updates, low=0, note=" (0: no value network training)")
        check.interval("ema_decay", ema_decay, "[0, 1)")
        check.integer("ema_start", ema_start, low=0)
        check.integer("ema_every", ema_every)
        check.non_negative("guide_scale", guide_scale, " (0: unguided sampling)")
        check.integer("n_guide_steps", n_guide_steps, low=0, note=" (0: unguided, the first plan is taken)")
        check.integer("t_stopgrad", t_stopgrad, low=0)
        check.integer("n_plans", n_plans)
        check.integer("max_path_length", max_path_length, or_null="the dataset's episode limit")
        levels = len(dim_mults)
        check.require(horizon % 2 ** (levels - 1) == 0, "horizon", horizon,
                      f"a multiple of 2^(len(dim_mults) - 1) = {2 ** (levels - 1)} (the U-Net halves it {levels - 1} times)")
        super().__init__()
        self.save_hyperparameters()
        self.transition_dim = act_dim + obs_dim
        self.model = PlannerUNet(self.transition_dim, dim, tuple(dim_mults), attention)
        self.value = PlannerValue(horizon, self.transition_dim, dim, tuple(dim_mults))
        self.model_ema = copy.deepcopy(self.model).requires_grad_(False)
        self.value_ema = copy.deepcopy(self.value).requires_grad_(False)
        self.register_schedule(n_timesteps)
        dtype = torch.get_default_dtype()
        # the Gaussian normaliser of the [actions, observations] channels, fitted on the data in setup()
        self.register_buffer("norm_mean", torch.zeros(self.transition_dim, dtype=dtype))
        self.register_buffer("norm_std", torch.ones(self.transition_dim, dtype=dtype))
        weights = torch.as_tensor(loss_discount, dtype=torch.float64) ** torch.arange(horizon, dtype=torch.float64)
        weights = (weights / weights.mean())[:, None].repeat(1, self.transition_dim)
        weights[0, :act_dim] = action_weight
        weights[0, act_dim:] = 0.0  # the imposed s_0 (see the docstring)
        self.register_buffer("loss_weights", weights.to(dtype), persistent=False)
        self.windows: WindowTable | None = None

    def register_schedule(self, n: int) -> None:
        """The official GaussianDiffusion buffers, computed in float64 and stored in the default dtype."""
        betas = cosine_beta_schedule(n)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        log_var = torch.log(post_var.clamp(min=1e-20))
        buffers = {
            "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "post_coef_x0": betas * abar_prev.sqrt() / (1 - abar), "post_coef_xt": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
            "post_std": torch.exp(0.5 * log_var), "post_var": torch.exp(log_var),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.get_default_dtype()), persistent=False)

    # --- data --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.prepare(self.trainer.datamodule)

    def prepare(self, dm: Any) -> None:
        """The window table and the normaliser from a DataModule's dataset (`dm.transitions`, `dm.info`;
        offbench/trajectory/padded.py)."""
        info = dm.info
        if "antmaze" in f"{info.name} {info.env_id}".lower():
            raise UserError("Diffuser has no AntMaze setting: the official code cannot load AntMaze and the paper reports "
                            "none; train it on the locomotion tasks")
        hp = self.hparams
        length = hp.max_path_length or info.max_episode_steps
        ep = padded_episodes(dm.transitions, length, hp.termination_penalty, info.name)
        raw = np.concatenate([ep.act, ep.obs], axis=-1)  # (E, T, act + obs), the official channel order
        mean, std = gaussian_statistics(raw, ep.lengths, info.name)
        self.norm_mean.copy_(torch.as_tensor(mean))
        self.norm_std.copy_(torch.as_tensor(std))
        episode, start = sequence_starts(ep.lengths, hp.horizon, length)
        values = discounted_values(ep.rew, hp.value_discount)[episode, start]
        normed = (torch.as_tensor(raw) - self.norm_mean.cpu().float()) / self.norm_std.cpu().float()
        self.windows = WindowTable(normed.to(self.norm_mean), episode, start, values, hp.horizon).to(self.norm_mean.device)

    def batch_source(self, datamodule: Any) -> Callable[[], WindowBatch]:
        if self.windows is None:
            raise RuntimeError("Diffuser.batch_source before setup(): the window table is built from the DataModule there")
        windows = self.windows
        return lambda: windows.batch(datamodule.sample_indices(len(windows)))

    # --- training ----------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.diffusion_opt = torch.optim.Adam(self.model.parameters(), lr=self.hparams.diffusion_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=self.hparams.value_lr)
        return [self.diffusion_opt, self.value_opt]

    def noised(self, x0: Tensor, i: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """(x_i with x_i[:, 0, states] = s_0, i): q(x_i | x_0) at uniform steps i (or the given ones)."""
        if i is None:
            i = torch.randint(self.hparams.n_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        x = self.sqrt_abar[i, None, None] * x0 + self.sqrt_one_minus_abar[i, None, None] * noise
        return self.impose(x, x0[:, 0, self.hparams.act_dim:]), i

    def impose(self, x: Tensor, s0: Tensor) -> Tensor:
        """x with its first state replaced by s0 (inpainting; a new tensor)."""
        a = self.hparams.act_dim
        return torch.cat([torch.cat([x[:, :1, :a], s0[:, None]], dim=-1), x[:, 1:]], dim=1)

    def diffusion_loss(self, x0: Tensor, i: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(weighted x0-prediction loss, the official `a0_loss` info: the first action's unweighted error)."""
        x, i = self.noised(x0, i, noise)
        err = (self.model(x, i) - x0).pow(2)
        a = self.hparams.act_dim
        return (err * self.loss_weights).mean(), err[:, 0, :a].mean()

    def value_loss(self, x0: Tensor, target: Tensor, i: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        x, i = self.noised(x0, i, noise)
        return (self.value(x, i).squeeze(-1) - target).pow(2).mean()

    @compilable
    def diffusion_step(self, batch: WindowBatch) -> dict[str, Tensor]:
        loss, a0_loss = self.diffusion_loss(batch.traj)
        self.optimize(self.diffusion_opt, loss)
        return {"loss/diffusion": loss, "loss/a0": a0_loss}

    @compilable
    def value_step(self, batch: WindowBatch) -> dict[str, Tensor]:
        loss = self.value_loss(batch.traj, batch.value)
        self.optimize(self.value_opt, loss)
        return {"loss/value": loss}

    def update(self, batch: WindowBatch) -> dict[str, Tensor]:
        hp = self.hparams
        metrics = self.diffusion_step(batch)
        self.step_ema(self.model_ema, self.model)
        if self.step < hp.value_updates:
            metrics |= self.value_step(batch)
            self.step_ema(self.value_ema, self.value)
        return metrics

    def step_ema(self, ema: torch.nn.Module, model: torch.nn.Module) -> None:
        """The official Trainer's cadence: every `ema_every` updates, a copy before `ema_start`, else
        ema <- decay ema + (1 - decay) model."""
        hp = self.hparams
        update_ema(ema, model, self.step, hp.ema_decay, hp.ema_start, hp.ema_every, warmup="copy_on_cadence")

    # --- planning ----------------------------------------------------------------------------
    def guide(self, x: Tensor, s0: Tensor, t: Tensor, i: int) -> tuple[Tensor, Tensor | None]:
        """The guide iterations of reverse step i: (x after them, V of the last iteration's input, or None
        when no value is needed: i > 0 with the gradient stopped)."""
        hp = self.hparams
        y = None
        for _ in range(hp.n_guide_steps):
            if i < hp.t_stopgrad:  # zero gradient: x stays, only the ranking (i = 0) needs V
                return x, self.value_ema(x, t).squeeze(-1) if i == 0 else None
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                y = self.value_ema(xg, t).squeeze(-1)
                grad = torch.autograd.grad(y.sum(), xg)[0]
            if hp.scale_grad_by_std:
                grad = self.post_var[i] * grad
            x = self.impose(x + hp.guide_scale * grad, s0)
        return x, None if y is None else y.detach()

    @torch.no_grad()
    def plan(self, s0: Tensor, draws: PlanDraws | None = None) -> tuple[Tensor, Tensor]:
        """(plans (n, P, H, D), values (n, P)) of normalised states s0 (n, obs_dim), P = n_plans; values are
        zeros without guidance."""
        hp = self.hparams
        n, p = s0.shape[0], hp.n_plans
        s0 = s0.repeat_interleave(p, dim=0)
        shape = (n * p, hp.horizon, self.transition_dim)
        x = torch.randn(shape, device=s0.device, dtype=s0.dtype) if draws is None else draws.x_last
        x = self.impose(x, s0)
        values = torch.zeros(n * p, device=s0.device, dtype=s0.dtype)
        for i in reversed(range(hp.n_timesteps)):
            t = torch.full((n * p,), i, device=s0.device, dtype=torch.long)
            x, y = self.guide(x, s0, t, i)
            if y is not None and i == 0:
                values = y
            mean = self.post_coef_x0[i] * self.model_ema(x, t) + self.post_coef_xt[i] * x
            if i > 0:
                z = torch.randn_like(x) if draws is None else draws.noise[hp.n_timesteps - 1 - i]
                mean = mean + self.post_std[i] * z
            x = self.impose(mean, s0)
        return x.view(n, p, hp.horizon, -1), values.view(n, p)

    @torch.no_grad()
    def act(self, obs: Tensor, draws: PlanDraws | None = None) -> Tensor:
        """The first action of the highest-valued plan from each state, unnormalised and clipped to the bounds."""
        a = self.hparams.act_dim
        s0 = (obs.to(self.norm_mean) - self.norm_mean[a:]) / self.norm_std[a:]
        plans, values = self.plan(s0, draws)
        best = values.argmax(dim=1)
        first = plans[torch.arange(len(best), device=best.device), best, 0, :a]
        action = first * self.norm_std[:a] + self.norm_mean[:a]
        m = self.hparams.max_action
        return action.clamp(-m, m).to(obs.dtype)
