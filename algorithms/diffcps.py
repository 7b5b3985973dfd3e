"""DiffCPS: Diffusion Model based Constrained Policy Search for Offline RL (He et al. 2023;
paper in shared/papers/diffcps-paper.md, official code github.com/felix-thu/DiffCPS, a fork of
Diffusion-QL).

The constrained policy search  max_mu E[Q(s, a)]  s.t.  H(pi_b, mu) <= kappa_0  is solved through its
Lagrange dual, with the cross entropy replaced by the diffusion ELBO surrogate L_c (Proposition 1):

    L_c(theta) = E_{i, eps, (s,a)~D} || eps - eps_theta(sqrt(abar_i) a + sqrt(1 - abar_i) eps, s, i) ||^2
    critic:  y = r + gamma (1 - d) min_j Q'_j(s', a'),  a' ~ mu_ema(.|s')         (max-Q backup: max
             over 10 a' per head, then min);  L_Q = sum_j E (Q_j(s, a) - y)^2
    actor (every `policy_every` updates; the paper's policy objective with Q / Q_target):
             L_mu = -E Q_i(s, a~mu) / E|Q_j(s, a~mu)| + clamp(lambda, lambda_clip, 100) * L_c
             (i one of the twin heads at random, j the other; normaliser and lambda detached)
    dual:    L_lambda = lambda * (kappa - L_c)   (Adam descent: lambda rises while L_c > kappa)
    targets: Q' <- (1 - tau) Q' + tau Q every update; EMA actor, decay 0.995, every 5 updates from 1000.

Settings (Table 3 of the paper and the official code): T = 5, VP schedule (beta_min 0.1, beta_max 10),
eps-model 3 x 256 Mish with a 16-d sinusoidal time embedding, twin critics 3 x 256 Mish, batch 256,
gamma 0.99, tau 0.005, Adam: actor lr 3e-4 (1e-3 on antmaze-medium-play), critic 3e-4, lambda 3e-5;
lambda_max 100; per-task kappa, lambda_clip, lambda init, policy interval, max-Q backup, reward tuning
and grad-norm clipping (the same norm for critic, actor and lambda) in configs/tasks/diffcps/.
Evaluation: 50 candidates from the online actor, one drawn with probabilities softmax(min_j Q'_j).

Where the official code departs from the paper, the default is the code's, the paper's an option:
- next actions of the TD target from the EMA actor (`target_actor="ema"`; Algorithm 1: mu_theta);
- reverse-step variance: DDPM posterior variance with a_0 clipped to the bounds
  (`sampling_variance="posterior"`; the paper's reverse-sampling equation: beta_i);
- Q term divided by |Q| of the other *online* head (`q_normalizer="online"`; the paper: the target net);
- L_c averaged over batch and action dims, the scale kappa is tuned on (`lc_reduction="mean"`;
  "sum" sums over action dims as ||.||^2 reads, inflating L_c by act_dim);
- constant learning rates (the code's cosine option, off by default, steps once per 50 epochs).
Other choices: before update 1000 the code keeps the EMA actor at its initial weights (step_ema
returns early; facts.md says "copied"): `ema_warmup="hold"`, "copy" copies the actor every update.
The random head is drawn on the device (torch.randint) instead of with numpy; the evaluation's softmax
draw is a Gumbel-max (same distribution, no host sync); observations are not normalised (as in the
code); the logged `lambda` is the clamped value the actor uses.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from offbench.batch import Batch
from offbench.diffusion import BetaSchedule, DiffusionPolicy, repeat_rows, resample, update_ema
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble


class DiffCPS(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        kappa: float = 0.05,
        lambda_init: float = 1.0,
        lambda_clip: float = 0.0,
        lambda_max: float = 100.0,
        policy_every: int = 2,
        lr: float = 3e-4,
        critic_lr: float = 3e-4,
        lambda_lr: float = 3e-5,
        max_grad_norm: float | None = 1.0,
        gamma: float = 0.99,
        tau: float = 0.005,
        max_q_backup: bool = False,
        n_backup_actions: int = 10,
        n_timesteps: int = 5,
        beta_schedule: BetaSchedule = "vp",
        ema_decay: float = 0.995,
        ema_start: int = 1000,
        ema_every: int = 5,
        ema_warmup: Literal["hold", "copy"] = "hold",
        target_actor: Literal["ema", "online"] = "ema",
        sampling_variance: Literal["posterior", "beta"] = "posterior",
        q_normalizer: Literal["online", "target"] = "online",
        lc_reduction: Literal["mean", "sum"] = "mean",
        n_eval_candidates: int = 50,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.actor = DiffusionPolicy(obs_dim, act_dim, max_action, n_timesteps, beta_schedule, sampling_variance, hidden=hidden)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=(hidden,) * 3, activation=nn.Mish)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.lagrange = nn.Parameter(torch.tensor(float(lambda_init)))  # raw lambda; clamped where used

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=hp.critic_lr)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=hp.lr)
        self.lambda_opt = torch.optim.Adam([self.lagrange], lr=hp.lambda_lr)
        return [self.critic_opt, self.actor_opt, self.lambda_opt]

    def update(self, batch: Batch) -> dict[str, Tensor]:
        hp = self.hparams
        metrics = self.critic_update(batch)
        if self.step % hp.policy_every == 0:  # every policy_every updates: the actor, then lambda
            metrics |= self.actor_update(batch)
        # 4. targets: EMA actor on the official cadence, Polyak critic
        update_ema(self.actor_ema, self.actor, self.step, hp.ema_decay, hp.ema_start, hp.ema_every, hp.ema_warmup)
        soft_update(self.critic_target, self.critic, hp.tau)
        return metrics

    @compilable
    def critic_update(self, batch: Batch) -> dict[str, Tensor]:
        """1. critic: TD target from the (EMA) actor's next actions, max over n per head, min over heads."""
        hp = self.hparams
        with torch.no_grad():
            n = hp.n_backup_actions if hp.max_q_backup else 1
            next_obs = repeat_rows(batch.next_obs, n)
            next_actor = self.actor_ema if hp.target_actor == "ema" else self.actor
            q_next = self.critic_target(next_obs, next_actor.sample(next_obs))
            q_next = q_next.view(2, -1, n).amax(-1).amin(0)
            y = batch.rew + hp.gamma * (1.0 - batch.done) * q_next
        q = self.critic(batch.obs, batch.act)
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.optimize(self.critic_opt, critic_loss, hp.max_grad_norm)
        return {"loss/critic": critic_loss, "q/mean": q.mean()}

    @compilable
    def actor_update(self, batch: Batch) -> dict[str, Tensor]:
        """2. actor: normalised Q term + clamped lambda * L_c; 3. dual ascent on lambda."""
        hp = self.hparams
        l_c = self.actor.loss(batch.act, batch.obs)
        if hp.lc_reduction == "sum":
            l_c = l_c * hp.act_dim
        new_act = self.actor(batch.obs)
        q_new = self.critic(batch.obs, new_act)
        q_den = q_new if hp.q_normalizer == "online" else self.critic_target(batch.obs, new_act.detach())
        i = torch.randint(2, (1,), device=q_new.device)
        q_loss = -q_new.index_select(0, i).mean() / q_den.index_select(0, 1 - i).abs().mean().detach()
        lam = self.lagrange.clamp(hp.lambda_clip, hp.lambda_max).detach()
        actor_loss = q_loss + lam * l_c
        self.optimize(self.actor_opt, actor_loss, hp.max_grad_norm)
        # minimise lambda * (kappa - L_c)
        lambda_loss = self.lagrange * (hp.kappa - l_c.detach())
        self.optimize(self.lambda_opt, lambda_loss, hp.max_grad_norm)
        return {
            "loss/actor": actor_loss, "loss/q": q_loss, "loss/lambda": lambda_loss, "lambda": lam,
            "L_c": l_c, "slack": hp.kappa - l_c,
        }

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """One of `n_eval_candidates` actions of the online actor, drawn with softmax(min_j Q'_j)."""
        n = self.hparams.n_eval_candidates
        obs_rep = repeat_rows(obs, n)
        actions = self.actor.sample(obs_rep)
        q = self.critic_target(obs_rep, actions).amin(0)
        return resample(actions.view(obs.shape[0], n, -1), q.view(obs.shape[0], n))
