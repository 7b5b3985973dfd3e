"""Decision Diffuser: "Is Conditional Generative Modeling all you need for Decision-Making?" (Ajay et al.,
ICLR 2023, arXiv:2211.15657; official code anuragajay/decision-diffuser @01ce528c, folder code/).

A planner, not a policy: a diffusion model over windows of H future *states*, conditioned on the
normalised return-to-go, and an inverse-dynamics model that reads the action off two planned states.

    data: windows x0 = s_{k..k+H-1} of an episode (CDF-normalised per dimension to [-1, 1]; the
          window may run past the episode end into zero padding), the return y = sum_{j>=0} 0.99^j
          r_{k+j} / returns_scale to the episode end (-100 added to a terminal reward)
    diffusion (eps-prediction, cosine schedule, N steps), the first state imposed by inpainting:
          x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  x_t[0] = x0[0]
          L_diff = mean over (B, H, obs) of w_h (eps_theta(x_t, t, m * e(y)) - eps)^2,  w_0 = 0, w_h = 1
          with m ~ Bernoulli(1 - p) per sample (condition dropout p = 0.25; m = 0 is the null
          condition, a zero returns embedding e(y))
    inverse dynamics: L_inv = mean (f(s_h, s_{h+1}) - a_h)^2 over the H - 1 pairs of each window
    loss = (L_diff + L_inv) / 2, one Adam step (f and the denoiser trained jointly)
    acting (every env step, from the EMA weights): x_N = 0.5 z; per reverse step t = N-1..0
          eps = eps(x, t, 0) + w (eps(x, t, e(R)) - eps(x, t, 0)),  R = target_return, w = 1.2
          x0_hat = clip(sqrt(1/abar_t) x - sqrt(1/abar_t - 1) eps, -1, 1)
          x <- mu_tilde_t(x0_hat, x) + 1[t > 0] sigma_t (0.5 z),  x[0] = s (inpainting)
          action = CDF^-1(f(x[0], x[1]))

Official settings (code/config/locomotion_config.py; the only configured task is
hopper-medium-expert-v2): H = 100, N = 200, U-Net dim 128, dim_mults (1, 4, 8) without attention
(offbench/trajectory/planner_nets.py; returns MLP 1 -> dim -> 4 dim -> dim with Mish beside the time
embedding), inverse dynamics 2 x 256 ReLU, w = 1.2, target return 0.9, returns_scale 400, Adam 2e-4,
batch 32 x 2 gradient accumulation, EMA 0.995 every 10 updates from update 2000 (copied before), 1e6
updates, windows of every episode start with the official padding (max_path_length = the env's episode
limit, 1000 on D4RL). The paper (App. B) differs: N = 100, 2e6 updates, 512 inverse-dynamics units,
w in {1.2, 1.4, 1.6, 1.8} per task (values not published), history K = 20, R = 1, alpha = 0.5 on the
variance (the code scales the std). Our configs use the code's values; configs/algorithms/
decision_diffuser.yaml says which ones apply to the other 8 locomotion tasks (not released).

Verified against the official code: tests/test_golden_dd.py (float64, the official initial weights,
recorded random draws): the dataset's windows with padding and returns, the CDF normaliser, the U-Net with
returns conditioning, the training loss and its gradients, each classifier-free guided step and whole
plans, the inverse-dynamics model and the acting rule (tests/data/golden/README.md, with a mutation check).

Deviations and choices:
- batch 64 without gradient accumulation: the official 2 x 32 with loss / 2 averages two per-element
  means of equal size, which is the mean over the 64 (the same gradient);
- the conditional and unconditional passes run as one batch of 2n (the same numbers; the official code
  also draws a Bernoulli mask in the unconditional pass and multiplies it by zero: not drawn here);
- the suite's D4RL transitions drop the timeout row of a truncated episode (offbench/data/sources.py), so
  that row's reward is missing from the returns and its state and action from the normaliser's data; the
  official windows never contain it (they end one row before the episode limit);
- history conditioning (the paper's K = 20 past states) is not offered: the official code has none
  (anuragajay/decision-diffuser issue 3), and it needs per-episode state in act();
- the CDF knots are rebuilt from the dataset when training starts, not saved (offbench/trajectory/cdf.py);
- acting plans in the module's dtype (the official evaluation casts the normalised state to float32) and
  does not clip the action: the CDF inverse keeps it inside the data's range, which the data checks keep
  inside the env's bounds; the suite's protocol scores it (normalised score; the official script reports
  raw returns of 10 episodes);
- AntMaze is refused: the official code cannot load it (its d4rl.py calls undefined functions) and
  neither the paper nor DiffCPS Table 1 report it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Transitions
from offbench.diffusion import cosine_beta_schedule, update_ema
from offbench.errors import UserError
from offbench.module import OfflineRLModule
from offbench.trajectory.cdf import CDFNormalizer
from offbench.trajectory.padded import WindowBatch, WindowTable, discounted_values, padded_episodes, sequence_starts
from offbench.trajectory.planner_nets import PlannerUNet


class DDNet(nn.Module):
    """The trained networks of the official GaussianInvDynDiffusion: the returns-conditioned U-Net over
    states and the inverse-dynamics MLP."""

    def __init__(self, obs_dim: int, act_dim: int, dim: int, dim_mults: tuple[int, ...], inv_hidden: int) -> None:
        super().__init__()
        self.returns_mlp = nn.Sequential(nn.Linear(1, dim), nn.Mish(), nn.Linear(dim, 4 * dim), nn.Mish(),
                                         nn.Linear(4 * dim, dim))
        self.unet = PlannerUNet(obs_dim, dim=dim, dim_mults=dim_mults, cond_dim=dim)
        self.inv_model = nn.Sequential(nn.Linear(2 * obs_dim, inv_hidden), nn.ReLU(), nn.Linear(inv_hidden, inv_hidden),
                                       nn.ReLU(), nn.Linear(inv_hidden, act_dim))

    def eps(self, x: Tensor, t: Tensor, returns: Tensor, keep: Tensor) -> Tensor:
        """eps_theta(x (B, H, obs), t (B,), keep (B, 1) * e(returns (B, 1))); keep = 0: the null condition."""
        return self.unet(x, t, self.returns_mlp(returns) * keep)

    def inverse(self, s: Tensor, s_next: Tensor) -> Tensor:
        return self.inv_model(torch.cat([s, s_next], dim=-1))


class UpdateDraws(NamedTuple):
    """The random draws of one update in the official order; None: drawn on the device (tests inject them)."""

    t: Tensor | None = None  # (B,) diffusion steps
    noise: Tensor | None = None  # (B, H, obs)
    keep: Tensor | None = None  # (B, 1) condition-dropout mask, 1 = keep


NO_DRAWS = UpdateDraws()


class DecisionDiffuser(OfflineRLModule):
    needs_dataset_rows = True  # trains on windows of the dataset's episodes (batch_source)

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        horizon: int = 100,
        n_timesteps: int = 200,
        dim: int = 128,
        dim_mults: tuple[int, ...] = (1, 4, 8),
        inv_hidden: int = 256,
        guidance_w: float = 1.2,
        target_return: float = 0.9,
        returns_scale: float = 400.0,
        condition_dropout: float = 0.25,
        discount: float = 0.99,
        termination_penalty: float = -100.0,
        diffusion_lr: float = 2e-4,
        ema_decay: float = 0.995,
        ema_start: int = 2000,
        ema_every: int = 10,
        max_path_length: int | None = None,
    ) -> None:
        """Decision Diffuser: a return-conditioned diffusion model over future states and an inverse-dynamics
        model (equations, settings: algorithms/decision_diffuser.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound of the env; `offbench fit` takes it from the data (the action is not clipped:
                the CDF inverse keeps it inside the data's range).
            horizon: planning horizon H, the number of diffused future states (official and paper 100); a multiple
                of 2^(len(dim_mults) - 1).
            n_timesteps: diffusion steps N of the cosine schedule (official code 200; paper 100).
            dim: base channel width of the U-Net and width of the returns embedding e(y) (official 128).
            dim_mults: channel multipliers of dim per U-Net level (official [1, 4, 8]).
            inv_hidden: hidden width of the inverse-dynamics MLP f, 2 ReLU layers (official code 256; paper 512).
            guidance_w: classifier-free guidance weight w (official 1.2; paper w in {1.2, 1.4, 1.6, 1.8} per task).
            target_return: return R that planning conditions on, in units of returns_scale (official 0.9; paper 1).
            returns_scale: divisor of the training returns y (official 400).
            condition_dropout: probability p of the null condition per training sample (official 0.25).
            discount: discount of the training returns y, sum 0.99^j r_{k+j} (official 0.99).
            termination_penalty: added to the reward of an episode's terminal step (official -100).
            diffusion_lr: Adam learning rate of the U-Net and the inverse-dynamics model, trained jointly
                (official 2e-4).
            ema_decay: decay of the EMA networks that plan (official 0.995).
            ema_start: update from which the EMA moves; before it the EMA is copied from the network (official 2000).
            ema_every: the EMA networks move every `ema_every` updates (official 10).
            max_path_length: episode length of the padded windows and the returns; null: the dataset's episode
                limit (1000 on D4RL, the official value).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.integer("horizon", horizon, low=2)
        check.integer("n_timesteps", n_timesteps)
        check.integer("dim", dim, low=8)
        check.widths("dim_mults", dim_mults)
        check.integer("inv_hidden", inv_hidden)
        check.finite("guidance_w", guidance_w)
        check.finite("target_return", target_return)
        check.positive("returns_scale", returns_scale)
        check.interval("condition_dropout", condition_dropout, "[0, 1)")
        check.interval("discount", discount, "[0, 1]")
        check.finite("termination_penalty", termination_penalty)
        check.learning_rate("diffusion_lr", diffusion_lr)
        check.interval("ema_decay", ema_decay, "[0, 1)")
        check.integer("ema_start", ema_start, low=0)
        check.integer("ema_every", ema_every)
        check.integer("max_path_length", max_path_length, or_null="the dataset's episode limit")
        if horizon % 2 ** (len(dim_mults) - 1):
            raise UserError(f"model.init_args.horizon must be a multiple of {2 ** (len(dim_mults) - 1)} with "
                            f"{len(dim_mults)} dim_mults (the U-Net halves it {len(dim_mults) - 1} times), got {horizon}")
        super().__init__()
        self.save_hyperparameters()
        self.net = DDNet(obs_dim, act_dim, dim, tuple(dim_mults), inv_hidden)
        self.net_ema = copy.deepcopy(self.net).requires_grad_(False)
        self.obs_normalizer = CDFNormalizer(obs_dim)
        self.act_normalizer = CDFNormalizer(act_dim)
        self.windows: WindowTable | None = None
        betas = cosine_beta_schedule(n_timesteps)
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        for name, value in {
            "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "sqrt_recip_abar": (1 / abar).sqrt(), "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
            "post_coef1": betas * abar_prev.sqrt() / (1 - abar), "post_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "post_std": (0.5 * post_var.clamp(min=1e-20).log()).exp(),
        }.items():
            self.register_buffer(name, value.to(torch.get_default_dtype()), persistent=False)

    # --- the dataset -------------------------------------------------------------------------
    def attach_dataset(self, t: Transitions, max_path_length: int, name: str = "the dataset") -> None:
        """Fit the CDF normalisers on the dataset's steps and build the table of normalised windows
        [actions, states] with their returns targets (offbench/trajectory/padded.py; the official
        SequenceDataset with include_returns)."""
        hp = self.hparams
        self.obs_normalizer.fit(t.obs)
        self.act_normalizer.fit(t.act)
        ep = padded_episodes(t, max_path_length, hp.termination_penalty, name)
        episode, start = sequence_starts(ep.lengths, hp.horizon, max_path_length)
        returns = (discounted_values(ep.rew, hp.discount)[episode, start] / hp.returns_scale).astype(np.float32)
        normed = torch.cat([self.act_normalizer.normalize(torch.as_tensor(ep.act)),  # float32, as the official arrays
                            self.obs_normalizer.normalize(torch.as_tensor(ep.obs))], dim=-1)
        self.windows = WindowTable(normed.to(self.sqrt_abar), episode, start, returns, hp.horizon).to(self.sqrt_abar.device)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        info = dm.info
        if "antmaze" in f"{info.name} {info.env_id}".lower() or info.success_scored:
            raise UserError(f"Decision Diffuser does not run on AntMaze ({info.name}): the official code cannot load it "
                            "and no paper reports it (DiffCPS Table 1 shows no number); train it on the locomotion tasks")
        if dm.normalize:
            raise UserError("Decision Diffuser normalises states with its own per-dimension CDF: run it with "
                            "--data.normalize_obs false")
        self.attach_dataset(dm.transitions, self.hparams.max_path_length or info.max_episode_steps, info.name)

    def batch_source(self, datamodule: Any) -> Callable[[], WindowBatch]:
        if self.windows is None:
            raise RuntimeError("DecisionDiffuser.batch_source before setup(): the window table is built from the DataModule there")
        windows = self.windows
        return lambda: windows.batch(datamodule.sample_indices(len(windows)))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.hparams.diffusion_lr)
        return [self.opt]

    # --- one update ----------------------------------------------------------------------------
    def loss(self, obs: Tensor, act: Tensor, returns: Tensor, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """The official GaussianInvDynDiffusion.loss on normalised windows."""
        hp = self.hparams
        B = obs.shape[0]
        t = torch.randint(hp.n_timesteps, (B,), device=obs.device) if draws.t is None else draws.t
        noise = torch.randn_like(obs) if draws.noise is None else draws.noise
        keep = torch.bernoulli(torch.full((B, 1), 1 - hp.condition_dropout, device=obs.device, dtype=obs.dtype)) \
            if draws.keep is None else draws.keep
        x_t = self.sqrt_abar[t, None, None] * obs + self.sqrt_1m_abar[t, None, None] * noise
        x_t = torch.cat([obs[:, :1], x_t[:, 1:]], dim=1)  # inpaint s_0
        err = (self.net.eps(x_t, t, returns, keep) - noise).pow(2)
        diffusion_loss = err[:, 1:].sum() / err.numel()  # row 0 has weight 0 and stays in the mean
        inv_loss = F.mse_loss(self.net.inverse(obs[:, :-1], obs[:, 1:]), act[:, :-1])
        return {"loss/total": 0.5 * (diffusion_loss + inv_loss), "loss/diffusion": diffusion_loss, "loss/inverse": inv_loss}

    def update(self, batch: WindowBatch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        a = self.hparams.act_dim
        metrics = self.loss(batch.traj[..., a:], batch.traj[..., :a], batch.value[:, None], draws)
        self.optimize(self.opt, metrics["loss/total"])
        self.update_ema()
        return metrics

    def update_ema(self) -> None:
        """The official Trainer.step_ema, every `ema_every` updates: a copy before `ema_start`, then the EMA."""
        hp = self.hparams
        update_ema(self.net_ema, self.net, self.step, hp.ema_decay, hp.ema_start, hp.ema_every, warmup="copy_on_cadence")

    # --- acting --------------------------------------------------------------------------------
    def guided_step(self, net: DDNet, x: Tensor, i: int, s: Tensor, z: Tensor | None) -> Tensor:
        """One reverse step t = i of the classifier-free guided chain from x (n, H, obs), then s inpainted;
        z: the step's standard normal draw (None: drawn here; unused at i = 0)."""
        hp = self.hparams
        n = x.shape[0]
        returns = torch.full((2 * n, 1), hp.target_return, device=x.device, dtype=x.dtype)
        keep = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)]).to(x)  # the conditional, then the unconditional pass
        t = torch.full((2 * n,), i, device=x.device, dtype=torch.long)
        eps_cond, eps_uncond = net.eps(torch.cat([x, x]), t, returns, keep).chunk(2)
        eps = eps_uncond + hp.guidance_w * (eps_cond - eps_uncond)
        x0 = (self.sqrt_recip_abar[i] * x - self.sqrt_recipm1_abar[i] * eps).clamp(-1.0, 1.0)
        x = self.post_coef1[i] * x0 + self.post_coef2[i] * x
        if i > 0:
            x = x + self.post_std[i] * (0.5 * (torch.randn_like(x) if z is None else z))
        x[:, 0] = s
        return x

    @torch.no_grad()
    def plan(self, s: Tensor, net: DDNet | None = None, noise: Tensor | None = None) -> Tensor:
        """Plans (n, H, obs) from normalised states s (n, obs) by the guided reverse chain of the EMA
        networks (or `net`). `noise` (N + 1, n, H, obs): the standard normal draws in the official order,
        x_N then one per step t = N-1..0 (the last unused); None: drawn here."""
        hp = self.hparams
        N = hp.n_timesteps
        x0 = torch.randn((s.shape[0], hp.horizon, s.shape[1]), device=s.device, dtype=s.dtype) if noise is None else noise[0]
        x = 0.5 * x0
        x[:, 0] = s
        for i in reversed(range(N)):
            x = self.guided_step(net or self.net_ema, x, i, s, None if noise is None else noise[N - i])
        return x

    @torch.no_grad()
    def act(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """Replan from the current state and read the action off the plan's first two states."""
        s = self.obs_normalizer.normalize(obs.to(self.sqrt_abar.dtype))
        x = self.plan(s, noise=noise)
        a = self.net_ema.inverse(x[:, 0], x[:, 1])
        return self.act_normalizer.unnormalize(a).to(obs.dtype)
