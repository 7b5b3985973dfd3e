"""CQL: conservative Q-learning (Kumar, Zhou, Tucker & Levine 2020, "Conservative Q-Learning for
Offline Reinforcement Learning"), the CQL(H) variant on a SAC backbone, as in the official D4RL code
(github.com/aviralkumar2907/CQL, d4rl/rlkit/torch/sac/cql.py).

Policy samples and losses use the parameters from the start of the update (the actor loss uses the
just-updated temperature, as the official code does); the steps, in this order:
    entropy:  L_alpha = -log_alpha * E(log pi(a~|s) + target_entropy),  target_entropy = -act_dim
    actor:    L_pi = E(alpha log pi(a~|s) - min_k Q_k(s, a~))   (SAC); during the first `bc_steps`
              updates the Q term is replaced by log pi(a|s) of the dataset action (BC warm-up)
    critic:   L_k = E(Q_k(s, a) - y)^2 + alpha_cql * gap_k,  y = r + gamma (1 - done) min_j Q_targ_j(s', a'~pi)
              gap_k = E_s[ logsumexp_{a in A(s)} (Q_k(s, a) - log rho(a)) ] - E_(s,a)~D Q_k(s, a)
              A(s): `num_random` actions each from Uniform(-max_action, max_action)^d (log rho =
              -d log(2 max_action), i.e. density 0.5^d for unit bounds), from pi(.|s) and from pi(.|s')
              (log rho = their log-probs: importance sampling of the logsumexp).
    Lagrange: with `with_lagrange`, alpha_cql = alpha' >= 0 is learned by dual ascent so that
              gap_k stays near `target_action_gap`: the critic adds alpha' (alpha_cql gap_k - tau_gap)
              and alpha' minimises -alpha' (alpha_cql gap_k - tau_gap) (mean over k).
    target:   Q_targ <- (1 - tau) Q_targ + tau Q

Official settings (README and examples/cql_*_new.py of the official code): 3x256 ReLU critics and
policy, tanh-Gaussian policy with state-dependent std (offbench.sac.TanhGaussianActor), evaluated
with its mode; Adam, critic lr 3e-4, policy lr 1e-4 (the README's D4RL setting; the paper's appendix
quotes 3e-5 for Gym, which the README replaces with 1e-4 on the D4RL data), entropy temperature lr =
policy lr, alpha' lr = critic lr; gamma 0.99, tau 0.005, batch 256; 10 actions per source, logsumexp
temperature 1; deterministic backup (no entropy term in y); BC warm-up for 40k updates;
locomotion: alpha_cql 5, no Lagrange; AntMaze: Lagrange with target gap 5 (alpha_cql 5 inside),
rewards (r - 0.5) * 4 (`--data.reward_tuning cql_antmaze`); observations not normalised.

Deviations: the official code scores Q(s, a'') for actions a'' ~ pi(.|s') at the *current* state s
(labelled "next actions"); this file does the same, to match. The penalty's logsumexp has no
-log(3 num_random) normalisation, as in the code (it shifts the gap that the Lagrange target refers
to). PyTorch default initialisation for the hidden layers (rlkit uses a fan-in uniform one).
The official options not offered: max-Q backup and CQL(rho) (neither is in the official D4RL commands).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable, graph_break, soft_update
from offbench.nets import CriticEnsemble
from offbench.sac import TanhGaussianActor


def cql_gap(q_ood: Tensor, log_density: Tensor, q_data: Tensor, temperature: float = 1.0) -> Tensor:
    """E_s[T logsumexp((Q(s, a_i) - log rho(a_i)) / T)] - E Q(s, a_data), one value per critic.

    q_ood (n, B, m): each critic's values of m sampled actions per state; log_density (B, m): their
    log sampling densities; q_data (n, B): the values of the dataset actions."""
    lse = temperature * torch.logsumexp((q_ood - log_density) / temperature, dim=-1)
    return lse.mean(-1) - q_data.mean(-1)


class CQL(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        hidden: tuple[int, ...] = (256, 256, 256),
        actor_lr: float = 1e-4,
        critic_lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        cql_alpha: float = 5.0,
        num_random: int = 10,
        cql_temperature: float = 1.0,
        with_lagrange: bool = False,
        target_action_gap: float = 5.0,
        bc_steps: int = 40_000,
        backup_entropy: bool = False,
    ) -> None:
        """CQL: conservative Q-learning, CQL(H) on a SAC backbone (equations, settings: algorithms/cql.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            hidden: hidden widths of the tanh-Gaussian policy and of the twin critics (ReLU MLPs; official 3 x 256).
            actor_lr: Adam learning rate of the policy and of the entropy temperature alpha (official 1e-4, the
                README's D4RL setting; the paper's appendix quotes 3e-5 for Gym).
            critic_lr: Adam learning rate of the twin critics, and of alpha' with `with_lagrange` (official 3e-4).
            gamma: discount gamma of the TD target y (official 0.99).
            tau: Polyak rate tau of the critic targets (official 0.005).
            cql_alpha: weight alpha_cql of the conservative gap gap_k (official 5; 0: no penalty, plain SAC).
            num_random: actions per source of A(s) (uniform, pi(.|s), pi(.|s')), 3 x num_random in the
                logsumexp (official 10).
            cql_temperature: temperature of the gap's logsumexp (official 1).
            with_lagrange: learn alpha' by dual ascent so that gap_k stays near `target_action_gap` (official:
                AntMaze only).
            target_action_gap: target tau_gap of the gap, with `with_lagrange` (official 5 on AntMaze).
            bc_steps: updates of the behaviour-cloning warm-up, the actor's Q term replaced by log pi(a|s)
                (official 40k; 0: no warm-up).
            backup_entropy: subtract alpha log pi(a'|s') in the TD target (SAC's soft backup; official false,
                a deterministic backup).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.non_negative("cql_alpha", cql_alpha, " (0: no conservative penalty, plain SAC)")
        check.integer("num_random", num_random)
        check.positive("cql_temperature", cql_temperature)
        check.finite("target_action_gap", target_action_gap)  # a threshold on the gap: any sign is well defined
        check.integer("bc_steps", bc_steps, low=0, note=" (0: no behaviour-cloning warm-up)")
        super().__init__()
        self.save_hyperparameters()
        self.actor = TanhGaussianActor(obs_dim, act_dim, max_action, hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.log_alpha_prime = nn.Parameter(torch.zeros(()), requires_grad=with_lagrange)
        self.target_entropy = -float(act_dim)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        h = self.hparams
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=h.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=h.critic_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=h.actor_lr)
        opts = [self.actor_opt, self.critic_opt, self.alpha_opt]
        if h.with_lagrange:
            self.alpha_prime_opt = torch.optim.Adam([self.log_alpha_prime], lr=h.critic_lr)
            opts.append(self.alpha_prime_opt)
        return opts

    def update(self, batch: Batch) -> dict[str, Tensor]:
        # the first bc_steps updates clone the behaviour (a flag: the compiled steps never read the counter)
        return self.gradient_steps(batch, bc_warmup=self.step < self.hparams.bc_steps)

    @compilable
    def gradient_steps(self, batch: Batch, bc_warmup: bool) -> dict[str, Tensor]:
        """Temperature, actor, (Lagrange) and critic steps of one update."""
        h = self.hparams
        obs, act = batch.obs, batch.act
        B, m, d = obs.shape[0], h.num_random, act.shape[-1]

        # Actions from the current policy (before any step, as the official code): for the TD
        # target at s', and the penalty's samples from pi(.|s) and pi(.|s'), m per state.
        with torch.no_grad():
            next_act, next_logp = self.actor(batch.next_obs)
            curr_a, curr_logp = self.actor(obs.repeat_interleave(m, 0))
            succ_a, succ_logp = self.actor(batch.next_obs.repeat_interleave(m, 0))
            rand_a = torch.empty(B * m, d, device=obs.device).uniform_(-h.max_action, h.max_action)
            rand_logp = torch.full((B, m), -d * math.log(2.0 * h.max_action), device=obs.device)

        # 1. entropy temperature: keep the policy's entropy near -act_dim
        new_act, log_pi = self.actor(obs)
        graph_break()  # the actor loss backpropagates through this forward pass after the temperature's step
        alpha_loss = -(self.log_alpha * (log_pi + self.target_entropy).detach()).mean()
        self.optimize(self.alpha_opt, alpha_loss)
        alpha = self.log_alpha.exp().detach()

        # 2. actor: SAC's loss, or behaviour cloning during the warm-up
        if bc_warmup:
            actor_loss = (alpha * log_pi - self.actor.log_prob(obs, act)).mean()
        else:
            actor_loss = (alpha * log_pi - self.critic(obs, new_act).min(0).values).mean()
        self.optimize(self.actor_opt, actor_loss)

        # 3. critic: TD error plus the conservative gap, importance-sampled logsumexp over 3m actions
        with torch.no_grad():
            target_q = self.critic_target(batch.next_obs, next_act).min(0).values
            if h.backup_entropy:
                target_q = target_q - alpha * next_logp
            target = batch.rew + h.gamma * (1.0 - batch.done) * target_q
        q_data = self.critic(obs, act)  # (2, B)
        bellman = (q_data - target).pow(2).mean(-1)  # (2,)
        ood_a = torch.cat([rand_a.view(B, m, d), curr_a.view(B, m, d), succ_a.view(B, m, d)], dim=1)
        ood_obs = obs.unsqueeze(1).expand(B, 3 * m, obs.shape[-1])
        q_ood = self.critic(ood_obs.reshape(B * 3 * m, -1), ood_a.reshape(B * 3 * m, d)).view(-1, B, 3 * m)
        log_density = torch.cat([rand_logp, curr_logp.view(B, m), succ_logp.view(B, m)], dim=1)
        raw_gap = cql_gap(q_ood, log_density, q_data, h.cql_temperature)  # (2,)
        gap = h.cql_alpha * raw_gap

        # 4. Lagrange (AntMaze): alpha' rises while the gap exceeds its target, and scales the penalty
        metrics = {}
        if h.with_lagrange:
            graph_break()  # the critic loss backpropagates through the critic's forward passes after this step
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            alpha_prime_loss = -(alpha_prime * (gap.detach() - h.target_action_gap)).mean()
            self.optimize(self.alpha_prime_opt, alpha_prime_loss)
            penalty = alpha_prime.detach() * (gap - h.target_action_gap)  # alpha' as it was before its step
            metrics = {"alpha_prime": alpha_prime.detach(), "loss/alpha_prime": alpha_prime_loss}
        else:
            penalty = gap
        critic_loss = (bellman + penalty).sum()
        self.optimize(self.critic_opt, critic_loss)
        soft_update(self.critic_target, self.critic, h.tau)

        return metrics | {
            "loss/critic": critic_loss, "loss/actor": actor_loss, "loss/alpha": alpha_loss, "alpha": alpha,
            "cql/gap": raw_gap.mean().detach(), "q/mean": q_data.mean(), "entropy": -log_pi.mean().detach(),
        }

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.actor.mode(obs)

    def log_prob(self, obs: Tensor, act: Tensor) -> Tensor:
        """log pi(a|s) of the tanh-Gaussian actor, exact (guided PGD data: docs/pgd.md)."""
        return self.actor.log_prob(obs, act)
