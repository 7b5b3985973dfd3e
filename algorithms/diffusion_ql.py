"""Diffusion-QL: Diffusion Policies as an Expressive Policy Class for Offline RL (Wang, Hunt & Zhou,
ICLR 2023, arXiv:2208.06193; official code github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL).

A TD3+BC-style actor-critic whose actor is a conditional diffusion model: the diffusion loss keeps the
policy near the data, a Q term pushes its samples up the critic.

    L_d(theta) = E_{i, eps, (s,a)~D} || eps - eps_theta(sqrt(abar_i) a + sqrt(1 - abar_i) eps, s, i) ||^2
    critic:  y = r + gamma (1 - d) min_j Q'_j(s', a'),  a' ~ mu_ema(.|s')         (max-Q backup: max
             over 10 a' per head, then min);  L_Q = sum_j E (Q_j(s, a) - y)^2
    actor (every update):  L_mu = L_d - eta * E Q_i(s, a~mu) / E|Q_j(s, a~mu)|
             (i one of the twin heads at random, j the other, the normaliser detached)
    targets: Q' <- (1 - tau) Q' + tau Q every update; EMA actor, decay 0.995, every 5 updates from 1000.

Settings (official main.py, whose per-task table gives lr, eta, max-Q backup, reward tuning and the
grad-norm): T = 5, VP schedule, eps-model 3 x 256 Mish, 16-d sinusoidal time embedding, twin critics
3 x 256 Mish, batch 256, gamma 0.99, tau 0.005, Adam 3e-4 (critic always 3e-4), locomotion eta 1.0
with grad-norm halfcheetah/hopper/walker2d medium 9/9/1, medium-replay 2/4/4, medium-expert 7/5/5;
AntMaze: reward (r - 0.5) * 4, eta 0.5 / 2 / 2 / 3 / 4.5 / 3.5 for umaze / umaze-diverse / medium-play
/ medium-diverse / large-play / large-diverse, max-Q backup except on umaze, lr 1e-3 on medium-play.
Evaluation: 50 candidates from the online actor, one drawn with probabilities softmax(min_j Q'_j).
2000 epochs x 1000 updates on locomotion, 1000 x 1000 on AntMaze.

Verified against the official code: tests/test_golden.py loads the official agent's weights into this
module, feeds the official run's recorded random draws through `UpdateDraws` and compares the
schedule, the denoising loss, the reverse chain, one whole update (with and without max-Q backup) and
the evaluation's action choice (float32 tolerance, tests/data/golden/README.md).

EDP's action approximation (Kang et al. 2023, "Efficient Diffusion Policies for Offline RL",
arXiv:2305.20081, Section 4.1) as an option, `action_approximation: true` (default false, the paper's
chain): the Q term is taken at a0_hat = (a_i - sqrt(1 - abar_i) eps_theta(a_i, i, s)) / sqrt(abar_i),
clipped, from the same noised dataset action, step and noise as L_d, so the actor step makes one
noise-model pass instead of T + 1 (the TD target's a' still comes from the EMA actor's full chain).

Deviations and choices (shared with algorithms/diffcps.py, which subclasses this module as its code
forks this one): the EMA actor holds its initial weights until update 1000 (`ema_warmup="hold"`, the
code; "copy" offered);
the README's `--lr_decay` cosine schedule steps once per 50 epochs, i.e. the rate is constant in
effect, so learning rates are constant; the random head is drawn on the device; the evaluation's
softmax draw is a Gumbel-max; observations are not normalised.
"""

from __future__ import annotations

import copy
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Batch
from offbench.diffusion import BetaSchedule, DenoisingTerms, DiffusionPolicy, repeat_rows, resample, update_ema
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, Mish


class UpdateDraws(NamedTuple):
    """The random draws of one update, in the order the official code consumes them. Training leaves
    them None (drawn on the device); tests pass the official run's recorded draws."""

    next_chain: Tensor | None = None  # (T + 1, B * n, act_dim): the target actor's chain for a' (n = 10 with max-Q backup)
    bc_i: Tensor | None = None  # (B,) steps of the denoising loss (L_d, DiffCPS's L_c)
    bc_noise: Tensor | None = None  # (B, act_dim) its noise
    new_chain: Tensor | None = None  # (T + 1, B, act_dim): the online actor's chain for the Q term
    head: Tensor | None = None  # (1,) the twin head in the Q term's numerator (0: Q1)


NO_DRAWS = UpdateDraws()  # training: every draw made on the device


class DiffusionQL(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        eta: float = 1.0,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        max_grad_norm: float | None = 1.0,
        gamma: float = 0.99,
        tau: float = 0.005,
        max_q_backup: bool = False,
        n_backup_actions: int = 10,
        n_timesteps: int = 5,
        beta_schedule: BetaSchedule = "vp",
        sampling_variance: Literal["posterior", "beta"] = "posterior",
        ema_decay: float = 0.995,
        ema_start: int = 1000,
        ema_every: int = 5,
        ema_warmup: Literal["hold", "copy"] = "hold",
        action_approximation: bool = False,
        n_eval_candidates: int = 50,
        hidden: tuple[int, ...] = (256, 256, 256),
    ) -> None:
        """Diffusion-QL: a diffusion actor with a Q term (equations, settings: algorithms/diffusion_ql.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            eta: weight eta of the Q term in L_mu (official 1.0 on locomotion, 0.5 to 4.5 per AntMaze task;
                0: the diffusion loss alone, behaviour cloning).
            actor_lr: Adam learning rate of the diffusion actor (official 3e-4; 1e-3 on antmaze-medium-play).
            critic_lr: Adam learning rate of the twin critics (official 3e-4 on every task).
            max_grad_norm: gradient-norm clip of the critic and actor steps (official: per task, e.g. 9/9/1 on
                halfcheetah/hopper/walker2d medium); null: no clipping.
            gamma: discount gamma of the TD target y (official 0.99).
            tau: Polyak rate tau of the critic target, every update (official 0.005).
            max_q_backup: max-Q backup, max over `n_backup_actions` a' per head, then min (official: AntMaze
                except umaze).
            n_backup_actions: next actions a' per state with `max_q_backup` (official 10).
            n_timesteps: diffusion steps T (official 5).
            beta_schedule: noise schedule of the diffusion chain (official "vp").
            sampling_variance: reverse-step variance: "posterior", the DDPM posterior variance (official code),
                or "beta": beta_i.
            ema_decay: decay of the EMA actor mu_ema (official 0.995).
            ema_start: update from which the EMA actor moves (official 1000).
            ema_every: the EMA actor moves every `ema_every` updates (official 5).
            ema_warmup: the EMA actor before `ema_start`: "hold" keeps its initial weights (official code),
                "copy" copies the actor every update.
            action_approximation: EDP's action approximation: the Q term at the one-step reconstruction a0_hat
                instead of the reverse chain's sample (false: the paper's chain).
            n_eval_candidates: candidate actions of the online actor at evaluation, one drawn with probabilities
                softmax(min_j Q'_j) (official 50).
            hidden: hidden widths of the noise model eps_theta and of the twin critics (Mish MLPs; official 3 x 256).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.non_negative("eta", eta, " (0: the diffusion loss alone, behaviour cloning)")
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.positive("max_grad_norm", max_grad_norm, or_null="no clipping")
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.integer("n_backup_actions", n_backup_actions)
        check.diffusion_steps("n_timesteps", n_timesteps, beta_schedule)
        check.interval("ema_decay", ema_decay, "[0, 1)", " (0: the EMA copies the actor)")
        check.integer("ema_start", ema_start, low=0, note=" (0: the EMA moves from the first update)")
        check.integer("ema_every", ema_every)
        check.integer("n_eval_candidates", n_eval_candidates)
        check.widths("hidden", hidden)
        super().__init__()
        self.save_hyperparameters()
        self.actor = DiffusionPolicy(obs_dim, act_dim, max_action, n_timesteps, beta_schedule, sampling_variance, hidden=hidden)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden, activation=Mish)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr)
        return [self.critic_opt, self.actor_opt]

    def update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        metrics = self.critic_update(batch, draws.next_chain)
        metrics |= self.actor_update(batch, draws)
        self.update_targets()
        return metrics

    @compilable
    def critic_update(self, batch: Batch, next_chain: Tensor | None = None) -> dict[str, Tensor]:
        """1. critic: TD target from the target actor's next actions, max over n per head, min over heads."""
        hp = self.hparams
        with torch.no_grad():
            n = hp.n_backup_actions if hp.max_q_backup else 1
            next_obs = repeat_rows(batch.next_obs, n)
            q_next = self.critic_target(next_obs, self.target_actor().sample(next_obs, noise=next_chain))
            q_next = q_next.view(2, -1, n).amax(-1).amin(0)
            y = batch.rew + hp.gamma * (1.0 - batch.done) * q_next
        q = self.critic(batch.obs, batch.act)
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.optimize(self.critic_opt, critic_loss, hp.max_grad_norm)
        return {"loss/critic": critic_loss, "q/mean": q.mean()}

    def target_actor(self) -> DiffusionPolicy:
        """The policy whose samples a' enter the TD target: the EMA actor."""
        return self.actor_ema

    @compilable
    def actor_update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """2. actor: diffusion loss + eta * normalised Q term."""
        hp = self.hparams
        terms = self.actor.denoise(batch.obs, batch.act, noise=draws.bc_noise, i=draws.bc_i)
        bc_loss = terms.loss()
        q_loss = self.q_loss(batch.obs, self.policy_action(batch.obs, terms, draws.new_chain), draws.head)
        actor_loss = bc_loss + hp.eta * q_loss
        self.optimize(self.actor_opt, actor_loss, hp.max_grad_norm)
        return {"loss/actor": actor_loss, "loss/bc": bc_loss, "loss/q": q_loss}

    def policy_action(self, obs: Tensor, terms: DenoisingTerms, chain: Tensor | None) -> Tensor:
        """The action a~mu(s) whose Q is maximised: the reverse chain's sample (the paper), or with
        `action_approximation` EDP's one-step reconstruction a0_hat from the denoising loss's own pass."""
        return terms.a0_hat if self.hparams.action_approximation else self.actor.sample(obs, grad=True, noise=chain)

    def q_loss(self, obs: Tensor, new_act: Tensor, head: Tensor | None = None, normalizer: nn.Module | None = None) -> Tensor:
        """-E Q_i(s, a~mu) / E|Q_j(s, a~mu)|: i = `head` (drawn at random by default), j the other head,
        of the online critic or of `normalizer`; the denominator is detached."""
        q_new = self.critic(obs, new_act)
        q_den = q_new if normalizer is None else normalizer(obs, new_act.detach())
        i = torch.randint(2, (1,), device=q_new.device) if head is None else head
        return -q_new.index_select(0, i).mean() / q_den.index_select(0, 1 - i).abs().mean().detach()

    def update_targets(self) -> None:
        """3. targets: EMA actor on the official cadence, Polyak critic."""
        hp = self.hparams
        update_ema(self.actor_ema, self.actor, self.step, hp.ema_decay, hp.ema_start, hp.ema_every, hp.ema_warmup)
        soft_update(self.critic_target, self.critic, hp.tau)

    @torch.no_grad()
    def act(self, obs: Tensor, chain: Tensor | None = None, u: Tensor | None = None) -> Tensor:
        """One of `n_eval_candidates` actions of the online actor, drawn with softmax(min_j Q'_j).
        `chain` (T + 1, n * m, act_dim) and `u` (n, m) are the random draws (tests; see `resample`)."""
        n = self.hparams.n_eval_candidates
        obs_rep = repeat_rows(obs, n)
        actions = self.actor.sample(obs_rep, noise=chain)
        q = self.critic_target(obs_rep, actions).amin(0)
        return resample(actions.view(obs.shape[0], n, -1), q.view(obs.shape[0], n), u=u)
