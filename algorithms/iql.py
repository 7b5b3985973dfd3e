"""IQL: implicit Q-learning (Kostrikov, Nair & Levine 2021, "Offline Reinforcement Learning with
Implicit Q-Learning"). No action outside the dataset is ever queried: V is an upper expectile of
Q over the dataset's actions, Q backs up V, and the policy is extracted by advantage weighting.

Each update, in the official order (value, actor with the new V, critic with the new V):
    value:  L_V = E L2_tau(min_k Q_targ_k(s, a) - V(s)),  L2_tau(u) = |tau - 1(u < 0)| u^2
    actor:  L_pi = -E[min(exp(beta (min_k Q_targ_k(s, a) - V(s))), 100) log pi(a|s)]
    critic: L_Q = sum_k E (Q_k(s, a) - r - gamma (1 - done) V(s'))^2
    target: Q_targ <- (1 - tau_polyak) Q_targ + tau_polyak Q

Official settings (paper Appendix B and github.com/ikostrikov/implicit_q_learning): 2x256 ReLU
networks for actor, twin critics and value; Adam with lr 3e-4 for all three, the actor's lr
following a cosine decay to 0 over the run; batch 256; gamma 0.99; Polyak 0.005; expectile 0.7
and temperature beta 3 on locomotion, 0.9 and 10 on AntMaze; advantage weights clipped at 100;
Gaussian actor with tanh-squashed mean and a state-independent log-std (clamped to [-5, 2]),
evaluated with its mean; no dropout on locomotion and AntMaze; observations not normalised;
rewards scaled by 1000 / (max - min episode return) on locomotion and shifted by -1 on AntMaze
(`--data.reward_tuning iql_locomotion` / `iql_antmaze`); 1M updates.

Deviations: PyTorch's default layer initialisation instead of the official orthogonal one; the
dropout option (used only on Franka Kitchen) is not offered. The cosine horizon is the run's total
number of updates unless `lr_decay_steps` is given (the official code decays over its max_steps).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from offbench import settings as check
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, GaussianActor, mlp


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """Asymmetric squared loss |expectile - 1(diff < 0)| * diff^2, elementwise."""
    # in diff's dtype (float64 runs), filled on its device (no host-to-device copy inside an update)
    weight = torch.where(diff < 0, torch.full_like(diff, 1.0 - expectile), torch.full_like(diff, expectile))
    return weight * diff.pow(2)


def total_updates(module: OfflineRLModule, default: int) -> int:
    """The run's total number of updates (epochs x updates per epoch) when fitting, else `default`."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer (a test, or a module used on its own)
        return default
    if trainer.datamodule is None or trainer.max_epochs is None or trainer.max_epochs < 1:
        return default
    return trainer.max_epochs * trainer.datamodule.eval_every


class IQL(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        hidden: tuple[int, ...] = (256, 256),
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        value_lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        expectile: float = 0.7,
        temperature: float = 3.0,
        weight_clip: float = 100.0,
        lr_decay_steps: int | None = None,
    ) -> None:
        """IQL: expectile V, Q onto V, an advantage-weighted actor (equations, settings: algorithms/iql.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            hidden: hidden widths of the actor, the twin critics and the value net (ReLU MLPs; official 2 x 256).
            actor_lr: Adam learning rate of the Gaussian actor, cosine-decayed to 0 over the run (official 3e-4).
            critic_lr: Adam learning rate of the twin critics Q_k (official 3e-4).
            value_lr: Adam learning rate of the value net V (official 3e-4).
            gamma: discount gamma of the critic's target (official 0.99).
            tau: Polyak rate tau_polyak of the critic target (official 0.005).
            expectile: expectile tau of the value loss L2_tau (official 0.7 on locomotion, 0.9 on AntMaze).
            temperature: inverse temperature beta of the actor's weights exp(beta (Q_targ - V)) (official 3 on
                locomotion, 10 on AntMaze; 0: behaviour cloning).
            weight_clip: upper clip of the actor's advantage weights (official 100).
            lr_decay_steps: horizon of the actor's cosine decay; null: the run's total updates (the official code
                decays over its max_steps).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.learning_rate("value_lr", value_lr)
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.interval("expectile", expectile, "(0, 1)")
        # temperature multiplies the advantage (an inverse temperature): 0 gives weights 1, behaviour cloning
        check.non_negative("temperature", temperature, " (0: behaviour cloning)")
        check.positive("weight_clip", weight_clip)
        check.integer("lr_decay_steps", lr_decay_steps, or_null="the run's total updates")
        super().__init__()
        self.save_hyperparameters()
        self.actor = GaussianActor(obs_dim, act_dim, max_action, hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = mlp(obs_dim, 1, hidden)

    def configure_optimizers(self):
        h = self.hparams
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=h.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=h.critic_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=h.value_lr)
        # Cosine decay of the actor's lr to 0 over the run (optax.cosine_decay_schedule in the official code).
        steps = h.lr_decay_steps or total_updates(self, default=1_000_000)
        self.actor_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, T_max=steps)
        return [self.actor_opt, self.critic_opt, self.value_opt], [self.actor_sched]

    def v(self, obs: Tensor) -> Tensor:
        return self.value(obs).squeeze(-1)

    def update(self, batch: Batch) -> dict[str, Tensor]:
        metrics = self.gradient_steps(batch)
        # The schedule counts updates in a Python int: outside the compiled steps. It changes only the
        # actor's lr, which the critic step after the actor's does not use.
        self.actor_sched.step()
        return metrics

    @compilable
    def gradient_steps(self, batch: Batch) -> dict[str, Tensor]:
        """Value, actor and critic steps of one update, in the official order."""
        h = self.hparams
        with torch.no_grad():
            q_target = self.critic_target(batch.obs, batch.act).min(0).values

        # 1. value: upper expectile of the target Q over the dataset's actions
        value_loss = expectile_loss(q_target - self.v(batch.obs), h.expectile).mean()
        self.optimize(self.value_opt, value_loss)

        # 2. actor: advantage-weighted regression with the updated V, weights clipped
        with torch.no_grad():
            v = self.v(batch.obs)
            weights = torch.exp(h.temperature * (q_target - v)).clamp(max=h.weight_clip)
        log_prob = self.actor(batch.obs).log_prob(batch.act).sum(-1)
        actor_loss = -(weights * log_prob).mean()
        self.optimize(self.actor_opt, actor_loss)

        # 3. critic: one-step TD onto the updated V(s'), then the target follows
        with torch.no_grad():
            target = batch.rew + h.gamma * (1.0 - batch.done) * self.v(batch.next_obs)
        q = self.critic(batch.obs, batch.act)  # (2, B)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimize(self.critic_opt, critic_loss)
        soft_update(self.critic_target, self.critic, h.tau)

        return {
            "loss/value": value_loss, "loss/actor": actor_loss, "loss/critic": critic_loss,
            "q/mean": q.mean(), "v/mean": v.mean(), "adv/weight_mean": weights.mean(),
        }

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.actor(obs).mean

    def log_prob(self, obs: Tensor, act: Tensor) -> Tensor:
        """log pi(a|s) of the Gaussian actor (the plain Gaussian, as its loss and the official PGD code)."""
        return self.actor(obs).log_prob(act).sum(-1)
