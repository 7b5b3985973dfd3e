"""DiffCPS: Diffusion Model based Constrained Policy Search for Offline RL (He, Bai, Zhang,
Wang & Li, arXiv:2310.05333; official code github.com/felix-thu/DiffCPS, a fork of Diffusion-QL's).
Written as Diffusion-QL (algorithms/diffusion_ql.py) with a dual variable in place of its fixed
weight eta: the critic update, the targets, the Q term and act() are Diffusion-QL's.

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
With `action_approximation: true` (EDP, Kang et al. 2023, arXiv:2305.20081; off by default) the Q
term is taken at the one-step reconstruction a0_hat of L_c's own noised dataset action, so L_c and
the Q term share one noise-model pass (see algorithms/diffusion_ql.py).

Verified against the official code as Diffusion-QL is (tests/test_golden.py): one whole update,
lambda's dual step included, equals the official one on its weights, batch and random draws.

Other choices: before update 1000 the code keeps the EMA actor at its initial weights (step_ema
returns early; facts.md says "copied"): `ema_warmup="hold"`, "copy" copies the actor every update.
The random head is drawn on the device (torch.randint) instead of with numpy; the evaluation's softmax
draw is a Gumbel-max (same distribution, no host sync); observations are not normalised (as in the
code); the logged `lambda` is the clamped value the actor uses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from algorithms.diffusion_ql import NO_DRAWS, DiffusionQL, UpdateDraws
from offbench import settings as check
from offbench.batch import Batch
from offbench.diffusion import BetaSchedule, DiffusionPolicy
from offbench.module import compilable


class DiffCPS(DiffusionQL):
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
        actor_lr: float = 3e-4,
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
        action_approximation: bool = False,
        n_eval_candidates: int = 50,
        hidden: tuple[int, ...] = (256, 256, 256),
    ) -> None:
        """DiffCPS: Diffusion-QL with a dual variable lambda for eta (equations, settings: algorithms/diffcps.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            kappa: bound kappa on L_c in the dual loss lambda (kappa - L_c) (per task: configs/tasks/diffcps/).
            lambda_init: initial Lagrange multiplier lambda (per task).
            lambda_clip: lower clamp of lambda in the actor loss (per task).
            lambda_max: upper clamp of lambda in the actor loss (paper 100).
            policy_every: the actor and lambda update every `policy_every` updates (per task).
            actor_lr: Adam learning rate of the diffusion actor (paper 3e-4; 1e-3 on antmaze-medium-play).
            critic_lr: Adam learning rate of the twin critics (paper 3e-4).
            lambda_lr: Adam learning rate of lambda (paper 3e-5).
            max_grad_norm: gradient-norm clip of the critic, actor and lambda steps (per task); null: no clipping.
            gamma: discount gamma of the TD target y (paper 0.99).
            tau: Polyak rate tau of the critic target, every update (paper 0.005).
            max_q_backup: max-Q backup, max over `n_backup_actions` a' per head, then min (per task).
            n_backup_actions: next actions a' per state with `max_q_backup`.
            n_timesteps: diffusion steps T (paper 5).
            beta_schedule: noise schedule of the diffusion chain (paper "vp", beta_min 0.1, beta_max 10).
            ema_decay: decay of the EMA actor mu_ema.
            ema_start: update from which the EMA actor moves.
            ema_every: the EMA actor moves every `ema_every` updates.
            ema_warmup: the EMA actor before `ema_start`: "hold" keeps its initial weights (official code),
                "copy" copies the actor every update.
            target_actor: the policy of the TD target's a': "ema" (official code) or "online" (the paper's
                Algorithm 1: mu_theta).
            sampling_variance: reverse-step variance: "posterior", the DDPM posterior variance with a_0 clipped
                (official code), or "beta": beta_i (the paper's reverse-sampling equation).
            q_normalizer: the Q term's denominator |Q_j|: the other "online" head (official code) or the "target"
                net (paper).
            lc_reduction: L_c averaged over batch and action dims, "mean" (official code, the scale kappa is tuned
                on), or "sum" over action dims (inflates L_c by act_dim).
            action_approximation: EDP's action approximation: the Q term at the one-step reconstruction a0_hat of
                L_c's noised action (false: the paper's chain).
            n_eval_candidates: candidate actions of the online actor at evaluation, one drawn with probabilities
                softmax(min_j Q'_j) (official 50).
            hidden: hidden widths of the noise model eps_theta and of the twin critics (Mish MLPs; paper 3 x 256).
        """
        # Its own settings; those it shares with Diffusion-QL are checked there (super().__init__ below).
        check.positive("kappa", kappa, " (the bound on L_c >= 0: 0 could never be met)")
        check.non_negative("lambda_init", lambda_init, " (a Lagrange multiplier of an inequality constraint)")
        check.non_negative("lambda_clip", lambda_clip)
        check.require(check.is_number(lambda_max) and lambda_max > 0 and lambda_max >= lambda_clip, "lambda_max",
                      lambda_max, f"a positive number >= lambda_clip ({lambda_clip})")
        check.integer("policy_every", policy_every)
        check.learning_rate("lambda_lr", lambda_lr)
        super().__init__(
            obs_dim, act_dim, max_action, actor_lr=actor_lr, critic_lr=critic_lr, max_grad_norm=max_grad_norm, gamma=gamma,
            tau=tau, max_q_backup=max_q_backup, n_backup_actions=n_backup_actions, n_timesteps=n_timesteps,
            beta_schedule=beta_schedule, sampling_variance=sampling_variance, ema_decay=ema_decay,
            ema_start=ema_start, ema_every=ema_every, ema_warmup=ema_warmup,
            action_approximation=action_approximation, n_eval_candidates=n_eval_candidates, hidden=hidden,
        )
        self.remove_ignored_hparams(["eta"])  # Diffusion-QL's fixed weight: lambda takes its place
        self.save_hyperparameters()  # now hparams (and hparams_initial) are exactly DiffCPS's arguments
        self.lagrange = nn.Parameter(torch.tensor(float(lambda_init)))  # raw lambda; clamped where used

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.lambda_opt = torch.optim.Adam([self.lagrange], lr=self.hparams.lambda_lr)
        return [*super().configure_optimizers(), self.lambda_opt]

    def update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        metrics = self.critic_update(batch, draws.next_chain)  # 1. critic (Diffusion-QL's)
        if self.step % self.hparams.policy_every == 0:  # every policy_every updates: the actor, then lambda
            metrics |= self.actor_update(batch, draws)
        self.update_targets()  # 4. targets: EMA actor on the official cadence, Polyak critic
        return metrics

    def target_actor(self) -> DiffusionPolicy:
        return self.actor_ema if self.hparams.target_actor == "ema" else self.actor

    @compilable
    def actor_update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """2. actor: normalised Q term + clamped lambda * L_c; 3. dual ascent on lambda."""
        hp = self.hparams
        terms = self.actor.denoise(batch.obs, batch.act, noise=draws.bc_noise, i=draws.bc_i)
        l_c = terms.loss() * (hp.act_dim if hp.lc_reduction == "sum" else 1)
        new_act = self.policy_action(batch.obs, terms, draws.new_chain)  # the chain's sample, or EDP's a0_hat
        normalizer = self.critic_target if hp.q_normalizer == "target" else None
        q_loss = self.q_loss(batch.obs, new_act, draws.head, normalizer)
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
