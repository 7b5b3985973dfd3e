"""TD3+BC: TD3 with a behaviour-cloning term in the actor loss (Fujimoto & Gu 2021, "A Minimalist
Approach to Offline Reinforcement Learning").

Critic (TD3, twin Q with clipped double-Q and target policy smoothing):
    a' = clip(pi_targ(s') + clip(eps, -c, c), -max_action, max_action),   eps ~ N(0, sigma^2)
    y  = r + gamma * (1 - done) * min_k Q_targ_k(s', a')
    L_Q = sum_k E (Q_k(s, a) - y)^2
Actor, every `policy_every` updates (then both targets move by Polyak averaging):
    lambda = alpha / mean|Q_1(s, pi(s))|   (detached)
    L_pi = -lambda * mean Q_1(s, pi(s)) + mean (pi(s) - a)^2

Official settings (paper Table and github.com/sfujimoto/TD3_BC): 2x256 ReLU actor and critics,
Adam 3e-4 for both, batch 256, gamma 0.99, tau 0.005, policy noise 0.2 and noise clip 0.5 (both
times max_action), policy frequency 2, alpha 2.5, observations normalised by the dataset's mean
and std (+1e-3) (`--data.normalize_obs true`), 1M updates.

Deviations: none. The actor update counts like the official `total_it` (incremented before the
check), so the first actor update is the second update.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable, soft_update, unit_gaussian_log_prob
from offbench.nets import CriticEnsemble, DeterministicActor


def smoothed_target_action(actor_target: nn.Module, next_obs: Tensor, act: Tensor, policy_noise: float,
                           noise_clip: float, max_action: float) -> Tensor:
    """TD3's target policy smoothing (Fujimoto et al. 2018, arXiv:1802.09477, Section 5.3):
    a' = clip(pi'(s') + clip(eps, +-noise_clip max_action), +-max_action), eps ~ N(0, (policy_noise max_action)^2)
    shaped like the batch's actions `act`. ReBRAC's critic uses it too."""
    noise = (torch.randn_like(act) * policy_noise * max_action).clamp(-noise_clip * max_action, noise_clip * max_action)
    return (actor_target(next_obs) + noise).clamp(-max_action, max_action)


class TD3BC(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        hidden: tuple[int, ...] = (256, 256),
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        policy_every: int = 2,
        alpha: float = 2.5,
    ) -> None:
        """TD3+BC: TD3 with a behaviour-cloning term in the actor loss (equations, settings: algorithms/td3bc.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            hidden: hidden widths of the actor and of both critics (ReLU MLPs; official 2 x 256).
            actor_lr: Adam learning rate of the actor (official 3e-4).
            critic_lr: Adam learning rate of the twin critics (official 3e-4).
            gamma: discount gamma of the TD target y (official 0.99).
            tau: Polyak rate of both targets, moved after each actor update (official 0.005).
            policy_noise: std sigma of the target policy smoothing noise eps, times max_action (official 0.2).
            noise_clip: clip c of that noise, times max_action (official 0.5).
            policy_every: the actor and the targets update every `policy_every` updates (official 2).
            alpha: alpha in lambda = alpha / mean|Q_1(s, pi(s))|, the Q term's weight (official 2.5; 0: pure BC).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.non_negative("policy_noise", policy_noise, " (0: no target policy smoothing)")
        check.non_negative("noise_clip", noise_clip, " (0: no target policy smoothing)")
        check.integer("policy_every", policy_every)
        check.non_negative("alpha", alpha, " (0: pure behaviour cloning)")
        super().__init__()
        self.save_hyperparameters()
        self.actor = DeterministicActor(obs_dim, act_dim, max_action, hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr)
        return [self.actor_opt, self.critic_opt]

    def update(self, batch: Batch) -> dict[str, Tensor]:
        metrics = self.critic_update(batch)
        # every policy_every updates (counted like the official total_it): the actor, then both targets
        if (self.step + 1) % self.hparams.policy_every == 0:
            metrics |= self.actor_update(batch)
        return metrics

    @compilable
    def critic_update(self, batch: Batch) -> dict[str, Tensor]:
        """Clipped double-Q target with target policy smoothing, one critic step."""
        h = self.hparams
        with torch.no_grad():
            next_act = smoothed_target_action(self.actor_target, batch.next_obs, batch.act, h.policy_noise,
                                              h.noise_clip, h.max_action)
            target_q = self.critic_target(batch.next_obs, next_act).min(0).values
            target = batch.rew + h.gamma * (1.0 - batch.done) * target_q
        q = self.critic(batch.obs, batch.act)  # (2, B)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimize(self.critic_opt, critic_loss)
        return {"loss/critic": critic_loss, "q/mean": q.mean()}

    @compilable
    def actor_update(self, batch: Batch) -> dict[str, Tensor]:
        """Actor = -lambda Q_1 + BC, one step; then both targets follow."""
        h = self.hparams
        pi = self.actor(batch.obs)
        q_pi = self.critic(batch.obs, pi)[0]
        lmbda = h.alpha / q_pi.abs().mean().detach()
        actor_loss = -lmbda * q_pi.mean() + F.mse_loss(pi, batch.act)
        self.optimize(self.actor_opt, actor_loss)
        soft_update(self.critic_target, self.critic, h.tau)
        soft_update(self.actor_target, self.actor, h.tau)
        return {"loss/actor": actor_loss, "lambda": lmbda}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.actor(obs)

    def log_prob(self, obs: Tensor, act: Tensor) -> Tensor:
        """log N(a; pi(s), I): the deterministic actor as a unit Gaussian, as the official PGD code does."""
        return unit_gaussian_log_prob(act, self.act(obs))
