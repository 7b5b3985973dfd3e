"""IDQL: Implicit Diffusion Q-Learning (Hansen-Estruch, Kostrikov, Janner, Kuba & Levine 2023, "IDQL:
Implicit Q-Learning as an Actor-Critic Method with Diffusion Policies", arXiv:2304.10573; official
code github.com/philippe-eecs/IDQL, the exported learner jaxrl5/agents/ddpm_iql_simple/).

An IQL critic that never queries actions outside the data, a diffusion model of the behaviour policy
trained by plain behaviour cloning, and a policy made at evaluation by choosing among N behaviour
samples with the critic. The three parts never exchange gradients.

Each update, in the official order (behaviour model, value, critic):
    behaviour: L_mu = E_{i, eps, (s,a)~D} sum_dims (eps - eps_theta(sqrt(abar_i) a + sqrt(1 - abar_i) eps, i, s))^2
               (DDPM, T = 5, VP schedule); EMA copy: theta_ema <- 0.999 theta_ema + 0.001 theta every update
    value:     L_V = E L2_tau(min_k Q_targ_k(s, a) - V(s)),   L2_tau(u) = |tau - 1(u < 0)| u^2
    critic:    L_Q = mean_k E (Q_k(s, a) - r - gamma (1 - done) V(s'))^2  (V after its step), then Polyak
Action selection, N candidates a_1..a_N from the EMA behaviour model at s (`selection`):
    "greedy":   a = argmax_j min_k Q_targ_k(s, a_j)        (the official evaluation, eval_actions)
    "resample": a = a_j, j ~ w_j / sum w,  w_j = |tau - 1(min_k Q_targ_k(s, a_j) < V(s))|
                (the expectile weights of the older learner's sample_implicit_policy, jaxrl5/agents/ddpm_iql/;
                 the code computes Q - V and weights tau where it is > 0, 1 - tau elsewhere)

Official settings (launcher/examples/train_ddpm_iql_offline.py and the learner's defaults): noise
network LN-ResNet: learnable Fourier features of the step index (128, weights N(0, 0.2^2)) -> MLP
256-256 swish, concatenated with (a_i, s) -> Linear 256 -> 3 blocks [dropout 0.1 -> LayerNorm ->
Linear 1024 -> swish -> Linear 256, + residual] -> swish -> Linear act_dim; reverse steps
a_{i-1} = (a_i - beta_i / sqrt(1 - abar_i) eps_theta) / sqrt(alpha_i) + sqrt(beta_i) z (no noise at the
last step), clipped to the action bounds after every step; behaviour model AdamW (weight decay 1e-4,
optax's default) lr 3e-4 with a cosine decay to 0 over 3M steps; twin critics 2 x 256 ReLU and a value
net 2 x 256 ReLU with a LayerNorm on its input, Adam 3e-4; batch 512; gamma 0.99; Polyak 0.005;
expectile 0.7 on locomotion, 0.9 on AntMaze; rewards r * 1000 / (max - min episode return) on
locomotion, r - 1 on AntMaze (`--data.reward_tuning iql_locomotion` / `iql_antmaze`); N = 64
(each evaluation also logs N = 16 and 256); 3M updates, evaluation every 250k with 50 episodes.

Which rule Table 1 used: DiffCPS's Table 1 copies IDQL-A from the IDQL paper, "-A" meaning
hyperparameters tuned per task; the released code evaluates with the greedy rule, and the sources
checked here do not say which rule and which N gave the paper's tables. `selection` defaults to
"greedy", the released code's rule; "resample" is the paper's importance-resampling idea with the
code's expectile weights. (As recalled, not verified here: the paper writes the expectile weight of
its implicit actor as |tau - 1(Q < V)| / |Q - V|; the code's weights leave out the division.)

Deviations: PyTorch's default initialisation instead of flax's (xavier-uniform / lecun-normal); the
behaviour-model loss is the suite's mean over action dims times act_dim (= the official sum); the
official 95/5 train/validation split is not made (all transitions train); the cosine horizon is the
run's total updates unless `lr_decay_steps` is given (official 3M = its run length); actions in the
data are not clipped to +-(1 - 1e-5) (only the official Gaussian actors need that). The EMA model
only samples, so its dropout is off (p = 0), as the official sampler runs with training=False.

Verified against the official code: tests/test_golden_jax.py loads flax weights recorded from it into this
module, passes its random draws through `UpdateDraws`, `sample_behaviour(noise=)` and `act(chain=)`, and
compares the schedules, the networks, the expectile loss, the reverse chain, one whole update (behaviour
model, value, critic, EMA, target; dropout off on both sides) and the greedy choice, in float64 tightly
and in float32 at measured tolerances (tests/data/golden/README.md). The `resample` rule is not compared
(the official code draws with jax.random.choice).
"""

from __future__ import annotations

import copy
import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from algorithms.iql import expectile_loss, total_updates
from offbench import settings as check
from offbench.batch import Batch
from offbench.diffusion import BetaSchedule, DiffusionPolicy, repeat_rows, resample, update_ema
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, LayerNorm, Linear, LNResNet, mlp

Selection = Literal["greedy", "resample"]


class UpdateDraws(NamedTuple):
    """The random draws of one update (the behaviour loss's step and noise, the official order). Training
    leaves them None (drawn on the device); tests pass the official run's draws."""

    bc_i: Tensor | None = None  # (B,) steps 0..T-1
    bc_noise: Tensor | None = None  # (B, act_dim)


NO_DRAWS = UpdateDraws()


class FourierFeatures(nn.Module):
    """Learnable Fourier features of a scalar t: [cos(2 pi t w), sin(2 pi t w)], w (dim/2,) ~ N(0, 0.2^2)."""

    def __init__(self, dim: int = 128, std: float = 0.2):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim // 2) * std)

    def forward(self, t: Tensor) -> Tensor:
        f = 2 * math.pi * t.to(self.w.dtype)[:, None] * self.w[None, :]  # t in the weights' dtype (float64 runs)
        return torch.cat([f.cos(), f.sin()], dim=-1)


class LNResNetNoise(nn.Module):
    """IDQL's noise network eps_theta(a_i, i, s): the step's Fourier features through an MLP 256-256
    (swish), concatenated with (a_i, s), into the LN-ResNet (official jaxrl5/networks/diffusion.py DDPM)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256, 256), dropout: float = 0.1,
                 t_dim: int = 128):
        super().__init__()
        self.time = nn.Sequential(FourierFeatures(t_dim), Linear(t_dim, 2 * t_dim), nn.SiLU(),
                                  Linear(2 * t_dim, 2 * t_dim))
        self.net = LNResNet(act_dim + obs_dim + 2 * t_dim, act_dim, hidden, dropout)

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return self.net(torch.cat([x, s, self.time(t)], dim=-1))


def select_greedy(candidates: Tensor, q: Tensor) -> Tensor:
    """The candidate (n, N, act_dim) -> (n, act_dim) of highest Q (n, N) in each row."""
    idx = q.argmax(1)
    return candidates[torch.arange(len(idx), device=idx.device), idx]


def expectile_weights(q: Tensor, v: Tensor, expectile: float) -> Tensor:
    """The resampling weights of the official code's expectile critic: tau where Q - V > 0, else 1 - tau."""
    return torch.where(q - v > 0, expectile, 1.0 - expectile)


class IDQL(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        hidden: tuple[int, ...] = (256, 256, 256),
        critic_hidden: tuple[int, ...] = (256, 256),
        actor_lr: float = 3e-4,
        actor_weight_decay: float = 1e-4,
        critic_lr: float = 3e-4,
        value_lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        expectile: float = 0.7,
        n_timesteps: int = 5,
        beta_schedule: BetaSchedule = "vp",
        actor_dropout: float = 0.1,
        ema_decay: float = 0.999,
        n_candidates: int = 64,
        selection: Selection = "greedy",
        lr_decay_steps: int | None = None,
        time_dim: int = 128,
    ) -> None:
        """IDQL: IQL critic, diffusion behaviour model, N candidates (equations, settings: algorithms/idql.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            hidden: widths of the noise network's LN-ResNet, one residual block per entry (official 3 x 256).
            critic_hidden: hidden widths of the twin critics and of the value net (ReLU MLPs; official 2 x 256).
            actor_lr: AdamW learning rate of the behaviour model, cosine-decayed to 0 (official 3e-4).
            actor_weight_decay: AdamW weight decay of the behaviour model (official 1e-4, optax's default; 0: none).
            critic_lr: Adam learning rate of the twin critics Q_k (official 3e-4).
            value_lr: Adam learning rate of the value net V (official 3e-4).
            gamma: discount gamma of the critic's target (official 0.99).
            tau: Polyak rate of the critic target (official 0.005).
            expectile: expectile tau of the value loss L2_tau and of the "resample" weights (official 0.7 on
                locomotion, 0.9 on AntMaze).
            n_timesteps: diffusion steps T (official 5).
            beta_schedule: noise schedule of the diffusion chain (official "vp").
            actor_dropout: dropout of the noise network's residual blocks, in training only (official 0.1).
            ema_decay: decay of the EMA behaviour model, stepped every update (official 0.999).
            n_candidates: N behaviour candidates per state at evaluation (official 64).
            selection: "greedy", the candidate of highest min_k Q_targ_k (the official evaluation), or
                "resample", drawn with the expectile weights w_j.
            lr_decay_steps: horizon of the behaviour model's cosine decay; null: the run's total updates
                (official 3M, its run length).
            time_dim: size of the learnable Fourier features of the step index, even (official 128).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.widths("critic_hidden", critic_hidden)
        check.learning_rate("actor_lr", actor_lr)
        check.non_negative("actor_weight_decay", actor_weight_decay, " (0: no weight decay)")
        check.learning_rate("critic_lr", critic_lr)
        check.learning_rate("value_lr", value_lr)
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.interval("expectile", expectile, "(0, 1)")
        check.diffusion_steps("n_timesteps", n_timesteps, beta_schedule)
        check.interval("actor_dropout", actor_dropout, "[0, 1)", " (0: no dropout)")
        check.interval("ema_decay", ema_decay, "[0, 1)", " (0: the EMA copies the model)")
        check.integer("n_candidates", n_candidates)
        check.integer("lr_decay_steps", lr_decay_steps, or_null="the run's total updates")
        check.require(check.is_integer(time_dim) and time_dim >= 2 and time_dim % 2 == 0, "time_dim", time_dim,
                      "a positive even integer (cos and sin features, time_dim / 2 each)")
        super().__init__()
        if selection not in Selection.__args__:
            raise ValueError(f"selection must be one of {Selection.__args__}, got {selection!r}")
        self.save_hyperparameters()
        noise = LNResNetNoise(obs_dim, act_dim, hidden, actor_dropout, time_dim)  # one block per entry of `hidden`
        self.actor = DiffusionPolicy(obs_dim, act_dim, max_action, n_timesteps, beta_schedule, variance="beta",
                                     clip_denoised=False, model=noise)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        for module in self.actor_ema.modules():  # it only samples: never dropout (official sampler: training=False)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=critic_hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = nn.Sequential(LayerNorm(obs_dim, eps=1e-6), mlp(obs_dim, 1, critic_hidden))

    def configure_optimizers(self):
        h = self.hparams
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=h.actor_lr, weight_decay=h.actor_weight_decay)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=h.critic_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=h.value_lr)
        steps = h.lr_decay_steps or total_updates(self, default=3_000_000)
        self.actor_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, T_max=steps)
        return [self.actor_opt, self.critic_opt, self.value_opt], [self.actor_sched]

    def v(self, obs: Tensor) -> Tensor:
        return self.value(obs).squeeze(-1)

    def update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        metrics = self.gradient_steps(batch, draws)
        # Python-int cadences outside the compiled steps: the EMA every update, the actor's cosine lr.
        update_ema(self.actor_ema, self.actor, self.step, self.hparams.ema_decay, start=0, every=1)
        self.actor_sched.step()
        return metrics

    @compilable
    def gradient_steps(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """Behaviour-model, value and critic steps of one update, in the official order."""
        h = self.hparams
        # 1. behaviour model: DDPM eps-MSE, summed over action dims as the official loss
        actor_loss = self.actor.loss(batch.obs, batch.act, noise=draws.bc_noise, i=draws.bc_i) * h.act_dim
        self.optimize(self.actor_opt, actor_loss)

        # 2. value: upper expectile of the target Q over the dataset's actions
        with torch.no_grad():
            q_target = self.critic_target(batch.obs, batch.act).min(0).values
        value_loss = expectile_loss(q_target - self.v(batch.obs), h.expectile).mean()
        self.optimize(self.value_opt, value_loss)

        # 3. critic: one-step TD onto the updated V(s'), mean over both heads; then the target follows
        with torch.no_grad():
            target = batch.rew + h.gamma * (1.0 - batch.done) * self.v(batch.next_obs)
        q = self.critic(batch.obs, batch.act)  # (2, B)
        critic_loss = (q - target).pow(2).mean()
        self.optimize(self.critic_opt, critic_loss)
        soft_update(self.critic_target, self.critic, h.tau)
        return {"loss/actor": actor_loss, "loss/value": value_loss, "loss/critic": critic_loss, "q/mean": q.mean()}

    @torch.no_grad()
    def sample_behaviour(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """One action per row from the EMA behaviour model: IDQL's reverse chain, clipped after every step.
        `noise` (T + 1, n, act_dim): the draws, a_T then one normal per step (the last one unused), as
        `DiffusionPolicy.sample(noise=)`; by default drawn on the device."""
        model, bound = self.actor_ema, self.hparams.max_action
        x = torch.randn(obs.shape[0], self.hparams.act_dim, device=obs.device) if noise is None else noise[0]
        for k, i in enumerate(reversed(range(model.n_timesteps))):
            z = torch.randn_like(x) if noise is None else noise[k + 1]
            x = model.reverse_step(x, i, obs, z).clamp(-bound, bound)
        return x

    @torch.no_grad()
    def act(self, obs: Tensor, chain: Tensor | None = None, u: Tensor | None = None) -> Tensor:
        """N behaviour candidates per state, scored by min_k Q_targ_k, one chosen by the `selection` rule.
        `chain` (T + 1, n * N, act_dim) and `u` (n, N, "resample" only) are the random draws (tests; see
        `sample_behaviour` and `resample`)."""
        n = self.hparams.n_candidates
        obs_rep = repeat_rows(obs, n)
        actions = self.sample_behaviour(obs_rep, chain).view(obs.shape[0], n, -1)
        q = self.critic_target(obs_rep, actions.flatten(0, 1)).min(0).values.view(obs.shape[0], n)
        if self.hparams.selection == "greedy":
            return select_greedy(actions, q)
        return resample(actions, expectile_weights(q, self.v(obs)[:, None], self.hparams.expectile).log(), u=u)
