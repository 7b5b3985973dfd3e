"""EDP: Efficient Diffusion Policies for Offline RL (Kang, Ma, Du, Pang & Yan, NeurIPS 2023,
arXiv:2305.20081; official JAX code github.com/sail-sg/edp).

A diffusion policy trained without running its reverse chain: the dataset action is noised to a
uniform step i and one noise-model pass gives both the denoising loss and the *action approximation*

    a_i = sqrt(abar_i) a + sqrt(1 - abar_i) eps,   a0_hat = clip((a_i - sqrt(1 - abar_i) eps_theta(a_i, i, s)) / sqrt(abar_i))

(Section 4.1), on which the policy-improvement rule acts (`rule`):

    td3:  L_pi = L_d - alpha / sg(E|Q_j(s, a0_hat)|) * E Q_j(s, a0_hat)       (j in {1, 2} by a coin flip)
    crr:  L_pi = L_d - E[min(exp(A / beta), 20) log pi(a|s)],  A = min_k Q_k(s, a) - mean_m min_k Q_k(s, a'_m),
          a'_m ~ N(a0_hat, I), m = 1..10  ("binary" weight: 1[A > 0])
    iql:  L_pi = L_d - E[min(exp(3 (min_k Q'_k(s, a) - V(s))), 100) log pi(a|s)]
    L_d = E ||eps - eps_theta(a_i, i, s)||^2 (mean over batch and action dims)

log pi(a|s) is one of the paper's two surrogates (`surrogate`): "gaussian" log N(a; a0_hat, I) (the code's
default), or "elbo" -w_i ||eps - eps_theta||^2 / d with the DDPM ELBO weights of the code
(offbench.diffusion.DiffusionPolicy.log_prob). Critics:

    td3, crr: y = r + gamma (1 - d) min_k Q'_k(s', a'),  a' ~ the EMA policy, sampled (`sampler`);
              L_Q = sum_k E (Q_k(s, a) - y)^2
    iql:      L_V = E L2_tau(min_k Q'_k(s, a) - V(s)), tau = 0.7;  y = r + gamma (1 - d) V(s') with the new V
    targets:  Q' <- Polyak 0.005 every update; EMA policy, rate 0.005 every 5 updates after the 1000th.
    acting:   energy-based action selection (EAS, Section 4.5): `n_eval_candidates` samples of the online
              policy, one drawn with probability proportional to exp(min_k Q_k(s, a)) (online critics).

Settings of the official code (diffusion/dql.py, trainer.py, nets.py): eps-model, twin Qs and V are
3 x 256 Mish MLPs; Adam (AdamW, weight decay 0) at 3e-4 for all; batch 256; gamma 0.99; alpha 2 on
every task; global-norm clipping of every optimiser's gradients at the task's `gn` (hps.py: the only
column of its table the code reads; each Q-network is clipped on its own); 2M updates; locomotion with
TD3 on raw rewards, AntMaze with IQL on r - 1 (the paper's Figure 1).

Where paper and code differ, the default is the paper's and the code's an option:
- diffusion steps and sampler: the paper trains with K = 1000 and samples with DPM-Solver, 15 model
  calls (Section 4.4, Figure 5): `n_timesteps=1000, sampler="dpm"`. The code's defaults are K = 100 with
  DDPM's K-step reverse chain (also for the critic's a'): `n_timesteps=100, sampler="ddpm"`. Both use the
  linear betas scaled by 1000 / K (`beta_schedule="linear_scaled"`).
- EAS candidates: the paper uses 10 (its Figure 4 sweeps 1-200), the code 50: `n_eval_candidates=10`.
Other choices: the code computes the TD3/CRR policy and critic losses from the same (pre-update)
parameters; here the policy step runs first and the critic step second, which is the same update
(the critic's target uses the EMA policy, not the one just stepped). The code's learnable
state-independent log-std ("policy_dist") is bypassed by its default fixed_std=True and is not built.
The noise model is the suite's NoiseMLP (Diffusion-QL's: input [a, t-emb, s], embedding
sinusoid(16) -> 32 -> 16); the code's orders its input [s, a, t-emb] with [cos, sin] sinusoids (a
permutation of the same layers) and its sinusoid frequencies are 10000^(-k/8), k = 0..7, where NoiseMLP's
are 10000^(-k/7) (a fixed embedding feeding a learned layer: a slightly different, equally expressive input).
DPM-Solver's noise clipping uses the schedule at t itself (the code: at step floor(N t - 1)); its final
sample is clipped to the action bounds (the code returns it unclipped, to the TD target and the
environment). The schedule tables are computed in float64 (the code's in float32: JAX runs without x64).
Actions are not clipped to +-0.999 and observations are not normalised (the code's default); the coin
flip is drawn on the device; the EAS draw is a Gumbel-max (same distribution, no host sync).

Verified against the official code: tests/test_golden_jax.py loads flax weights recorded from it into this
module, passes its random draws through `UpdateDraws` and compares the schedule, the noise network, the
action approximation and both likelihood surrogates, one whole TD3 update (gradient clipping active), one
IQL-rule and one CRR-rule update, the EMA policy once it has started, the energy-based choice of `act` (it
reads the online critics, as the code does) and DPM-Solver sampling, in float64 tightly and in float32 at
measured tolerances (tests/data/golden/README.md).
"""

from __future__ import annotations

import copy
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from algorithms.iql import expectile_loss
from offbench import settings as check
from offbench.batch import Batch
from offbench.diffusion import BetaSchedule, DiffusionPolicy, Surrogate, repeat_rows, resample, update_ema
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, Mish, mlp

Rule = Literal["td3", "crr", "iql"]


class UpdateDraws(NamedTuple):
    """The random draws of one update. Training leaves them None (drawn on the device); tests pass the
    official run's recorded draws."""

    bc_i: Tensor | None = None  # (B,) steps of the denoising pass (L_d and a0_hat)
    bc_noise: Tensor | None = None  # (B, act_dim) its noise
    head: Tensor | None = None  # (1,) td3: the Q-network of the guide term (0: Q1; the code's uniform > 0.5)
    next_chain: Tensor | None = None  # (T + 1, B * n, act_dim) td3/crr: the EMA policy's draws for a' (DDPM
    #                                   chain: a_T then one normal per step; DPM-Solver: a_T only)


NO_DRAWS = UpdateDraws()


def crr_weights(adv: Tensor, beta: float = 1.0, clip: float = 20.0, kind: Literal["exp", "binary"] = "exp") -> Tensor:
    """CRR's weights of the official code: min(exp(A / beta), clip), or the indicator 1[A > 0]."""
    if kind == "binary":
        return (adv > 0).to(adv.dtype)
    return torch.exp(adv / beta).clamp(max=clip)


def awr_weights(adv: Tensor, temperature: float = 3.0, clip: float = 100.0) -> Tensor:
    """IQL's advantage weights of the official code: min(exp(temperature A), clip)."""
    return torch.exp(temperature * adv).clamp(max=clip)


class EDP(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        rule: Rule = "td3",
        alpha: float = 2.0,
        surrogate: Surrogate = "gaussian",
        crr_beta: float = 1.0,
        crr_weight: Literal["exp", "binary"] = "exp",
        crr_weight_clip: float = 20.0,
        crr_samples: int = 10,
        expectile: float = 0.7,
        awr_temperature: float = 3.0,
        awr_weight_clip: float = 100.0,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        value_lr: float = 3e-4,
        max_grad_norm: float | None = None,
        gamma: float = 0.99,
        tau: float = 0.005,
        max_q_backup: bool = False,
        n_backup_actions: int = 10,
        n_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear_scaled",
        sampler: Literal["ddpm", "dpm"] = "dpm",
        dpm_steps: int = 15,
        ema_decay: float = 0.995,
        ema_start: int = 1000,
        ema_every: int = 5,
        n_eval_candidates: int = 10,
        hidden: tuple[int, ...] = (256, 256, 256),
    ) -> None:
        """EDP: a diffusion policy trained through its a0_hat (equations, settings: algorithms/edp.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            rule: policy-improvement rule: "td3" (the code's on locomotion), "crr" or "iql" (the code's on AntMaze).
            alpha: td3: alpha in the guide term alpha / sg(E|Q_j|) E Q_j(s, a0_hat) (official 2 on every task;
                0: the diffusion loss alone, behaviour cloning).
            surrogate: crr and iql: log pi(a|s) as "gaussian", log N(a; a0_hat, I) (the code's default), or
                "elbo", the DDPM ELBO surrogate.
            crr_beta: crr: temperature beta of the weights exp(A / beta).
            crr_weight: crr: "exp" weights min(exp(A / beta), crr_weight_clip) or "binary" weights 1[A > 0].
            crr_weight_clip: crr: upper clip of the "exp" weights.
            crr_samples: crr: actions a'_m ~ N(a0_hat, I), m = 1..crr_samples, whose mean Q is the baseline of A.
            expectile: iql: expectile tau of the value loss L2_tau.
            awr_temperature: iql: inverse temperature of the weights exp(awr_temperature (min_k Q'_k - V))
                (0: behaviour cloning).
            awr_weight_clip: iql: upper clip of those weights.
            actor_lr: Adam learning rate of the noise model (official 3e-4).
            critic_lr: Adam learning rate of the twin critics (official 3e-4).
            value_lr: iql: Adam learning rate of V (official 3e-4).
            max_grad_norm: global-norm gradient clip of every optimiser, each Q-network on its own (official: the
                task's `gn`, hps.py); null: no clipping.
            gamma: discount gamma of the TD target y (official 0.99).
            tau: Polyak rate of the critic targets, every update (official 0.005).
            max_q_backup: td3 and crr: max-Q backup, max over `n_backup_actions` a' per head, then min.
            n_backup_actions: next actions a' per state with `max_q_backup`.
            n_timesteps: diffusion steps K (paper 1000; the code's default 100).
            beta_schedule: noise schedule (paper and code: "linear_scaled", DDPM's linear betas times 1000 / K).
            sampler: sampler of acting and of the TD target's a': "dpm", DPM-Solver (paper), or "ddpm", the
                K-step reverse chain (the code's default).
            dpm_steps: DPM-Solver model calls per sample, with sampler "dpm" (paper 15).
            ema_decay: decay of the EMA policy (official rate 0.005, i.e. decay 0.995).
            ema_start: the EMA policy moves after this many updates (official 1000).
            ema_every: the EMA policy moves every `ema_every` updates (official 5).
            n_eval_candidates: EAS candidates at evaluation, one drawn with probabilities softmax(min_k Q_k)
                (paper 10, code 50).
            hidden: hidden widths of the noise model, the twin Qs and V (Mish MLPs; official 3 x 256).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.non_negative("alpha", alpha, " (0: the diffusion loss alone, behaviour cloning)")
        check.positive("crr_beta", crr_beta)
        check.positive("crr_weight_clip", crr_weight_clip)
        check.integer("crr_samples", crr_samples)
        check.interval("expectile", expectile, "(0, 1)")
        # awr_temperature multiplies the advantage (an inverse temperature): 0 gives weights 1
        check.non_negative("awr_temperature", awr_temperature, " (0: behaviour cloning)")
        check.positive("awr_weight_clip", awr_weight_clip)
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.learning_rate("value_lr", value_lr)
        check.positive("max_grad_norm", max_grad_norm, or_null="no clipping")
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.integer("n_backup_actions", n_backup_actions)
        check.diffusion_steps("n_timesteps", n_timesteps, beta_schedule)
        check.integer("dpm_steps", dpm_steps)
        check.interval("ema_decay", ema_decay, "[0, 1)", " (0: the EMA copies the policy)")
        check.integer("ema_start", ema_start, low=0, note=" (0: the EMA moves from the first updates)")
        check.integer("ema_every", ema_every)
        check.integer("n_eval_candidates", n_eval_candidates)
        check.widths("hidden", hidden)
        super().__init__()
        if rule not in ("td3", "crr", "iql"):
            raise ValueError(f"unknown rule {rule!r}; choose td3, crr or iql")
        self.save_hyperparameters()
        self.actor = DiffusionPolicy(obs_dim, act_dim, max_action, n_timesteps, beta_schedule, hidden=hidden,
                                     sampler=sampler, dpm_steps=dpm_steps)
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden, activation=Mish)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = mlp(obs_dim, 1, hidden, Mish) if rule == "iql" else None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=hp.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=hp.critic_lr)
        optimizers = [self.actor_opt, self.critic_opt]
        if self.value is not None:
            self.value_opt = torch.optim.Adam(self.value.parameters(), lr=hp.value_lr)
            optimizers.append(self.value_opt)
        return optimizers

    def update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        hp = self.hparams
        if hp.rule == "iql":
            metrics = self.iql_steps(batch, draws)
        else:  # the policy step first: it reads the critic before the critic step, as the code does
            metrics = self.policy_step(batch, draws) | self.critic_step(batch, draws.next_chain)
        # targets: the code counts updates from 1 and moves the EMA policy on updates 1005, 1010, ...
        update_ema(self.actor_ema, self.actor, self.step + 1, hp.ema_decay, hp.ema_start + 1, hp.ema_every)
        soft_update(self.critic_target, self.critic, hp.tau)
        return metrics

    # --------------------------------------------------------------------------- td3 and crr
    @compilable
    def policy_step(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """The diffusion loss and the rule's guide term, both from one noise-model pass."""
        hp = self.hparams
        terms = self.actor.denoise(batch.obs, batch.act, noise=draws.bc_noise, i=draws.bc_i)
        diffusion_loss = terms.loss()
        if hp.rule == "td3":
            q = self.critic(batch.obs, terms.a0_hat)
            j = torch.randint(2, (1,), device=q.device) if draws.head is None else draws.head
            q_j = q.index_select(0, j)
            lam = hp.alpha / q_j.abs().mean().detach()
            guide_loss = -lam * q_j.mean()
            extra = {"lambda": lam}
        else:  # crr
            with torch.no_grad():
                q_data = self.critic(batch.obs, batch.act).amin(0)
                n, (b, d) = hp.crr_samples, batch.act.shape
                a_v = terms.a0_hat.detach() + torch.randn(n, b, d, device=batch.act.device)  # N(a0_hat, I)
                v = self.critic(batch.obs.repeat(n, 1), a_v.reshape(n * b, d)).amin(0).view(n, b).mean(0)
                weights = crr_weights(q_data - v, hp.crr_beta, hp.crr_weight_clip, hp.crr_weight)
            log_prob = self.actor.log_prob(terms, batch.act, hp.surrogate)
            guide_loss = -(weights * log_prob).mean()
            extra = {"adv/weight_mean": weights.mean(), "log_prob": log_prob.mean()}
        actor_loss = diffusion_loss + guide_loss
        self.optimize(self.actor_opt, actor_loss, hp.max_grad_norm)
        return {"loss/actor": actor_loss, "loss/diffusion": diffusion_loss, "loss/guide": guide_loss, **extra}

    @compilable
    def critic_step(self, batch: Batch, next_chain: Tensor | None = None) -> dict[str, Tensor]:
        """TD target from the EMA policy's sampled next actions (max over n per head with max-Q backup),
        min over the heads."""
        hp = self.hparams
        with torch.no_grad():
            n = hp.n_backup_actions if hp.max_q_backup else 1
            next_obs = repeat_rows(batch.next_obs, n)
            q_next = self.critic_target(next_obs, self.actor_ema.sample(next_obs, noise=next_chain))
            q_next = q_next.view(2, -1, n).amax(-1).amin(0)
            y = batch.rew + hp.gamma * (1.0 - batch.done) * q_next
        q = self.critic(batch.obs, batch.act)
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.optimize_critic(critic_loss)
        return {"loss/critic": critic_loss, "q/mean": q.mean()}

    # --------------------------------------------------------------------------- iql
    @compilable
    def iql_steps(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """The code's order: V by expectile regression, the policy with the new V, Q onto the new V(s')."""
        hp = self.hparams
        with torch.no_grad():
            q_target = self.critic_target(batch.obs, batch.act).amin(0)
        value_loss = expectile_loss(q_target - self.value(batch.obs).squeeze(-1), hp.expectile).mean()
        self.optimize(self.value_opt, value_loss, hp.max_grad_norm)

        with torch.no_grad():
            v = self.value(batch.obs).squeeze(-1)
            weights = awr_weights(q_target - v, hp.awr_temperature, hp.awr_weight_clip)
        terms = self.actor.denoise(batch.obs, batch.act, noise=draws.bc_noise, i=draws.bc_i)
        diffusion_loss = terms.loss()
        guide_loss = -(weights * self.actor.log_prob(terms, batch.act, hp.surrogate)).mean()
        actor_loss = diffusion_loss + guide_loss
        self.optimize(self.actor_opt, actor_loss, hp.max_grad_norm)

        with torch.no_grad():
            y = batch.rew + hp.gamma * (1.0 - batch.done) * self.value(batch.next_obs).squeeze(-1)
        q = self.critic(batch.obs, batch.act)
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.optimize_critic(critic_loss)
        return {
            "loss/value": value_loss, "loss/actor": actor_loss, "loss/diffusion": diffusion_loss,
            "loss/guide": guide_loss, "loss/critic": critic_loss, "q/mean": q.mean(), "v/mean": v.mean(),
            "adv/weight_mean": weights.mean(),
        }

    def optimize_critic(self, loss: Tensor) -> None:
        """A critic step with each Q-network's gradient clipped to max_grad_norm on its own (the code gives
        each its own optax.clip_by_global_norm)."""
        clip = None if self.hparams.max_grad_norm is None else self.clip_members
        self.optimize(self.critic_opt, loss, clip=clip)

    def clip_members(self, grads: list[Tensor]) -> None:
        """Clip member k of the critic ensemble to max_grad_norm by its own norm, over the k-th slice of every
        ensemble parameter's gradient (in place)."""
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (n_members,)
        scale = (self.hparams.max_grad_norm / norms).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *(1,) * (g.dim() - 1)))

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """EAS: one of `n_eval_candidates` samples of the online policy, drawn with softmax(min_k Q_k)."""
        n = self.hparams.n_eval_candidates
        obs_rep = repeat_rows(obs, n)
        actions = self.actor.sample(obs_rep)
        q = self.critic(obs_rep, actions).amin(0)
        return resample(actions.view(obs.shape[0], n, -1), q.view(obs.shape[0], n))
