"""Behaviour cloning: the policy imitates the dataset's actions, rewards unused.

    deterministic:  min_pi  E_(s,a)~D || pi(s) - a ||^2
    gaussian:       max_pi  E_(s,a)~D  log N(a; mu(s), sigma^2)

The baseline every offline RL table starts from (the "BC" row of D4RL tables). Settings: a
2 x 256 ReLU MLP, Adam lr 1e-3, batch 256 (the TD3+BC paper's BC baseline uses the same
network and learning rate; observations normalised there too: --data.normalize_obs true).
Deviations: none; the Gaussian variant evaluates with its mean action.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from offbench import settings as check
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable, unit_gaussian_log_prob
from offbench.nets import DeterministicActor, GaussianActor


class BC(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        policy: Literal["deterministic", "gaussian"] = "deterministic",
        hidden: tuple[int, ...] = (256, 256),
        actor_lr: float = 1e-3,
    ) -> None:
        """BC: behaviour cloning of the dataset's actions (equations, settings: algorithms/bc.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            policy: "deterministic", loss ||pi(s) - a||^2, or "gaussian", maximum likelihood (evaluated with its mean).
            hidden: hidden widths of the actor (ReLU MLP; 2 x 256 as the TD3+BC paper's BC baseline).
            actor_lr: Adam learning rate of the actor (1e-3, as the TD3+BC paper's BC baseline).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.learning_rate("actor_lr", actor_lr)
        super().__init__()
        self.save_hyperparameters()
        actor = DeterministicActor if policy == "deterministic" else GaussianActor
        self.actor = actor(obs_dim, act_dim, max_action, hidden)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr)
        return self.actor_opt

    @compilable  # no cadence: the whole update is one compiled step
    def update(self, batch: Batch) -> dict[str, Tensor]:
        if self.hparams.policy == "deterministic":
            loss = (self.actor(batch.obs) - batch.act).pow(2).mean()
        else:
            loss = -self.actor(batch.obs).log_prob(batch.act).sum(-1).mean()
        self.optimize(self.actor_opt, loss)
        return {"loss/actor": loss}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        if self.hparams.policy == "deterministic":
            return self.actor(obs)
        return self.actor(obs).mean

    def log_prob(self, obs: Tensor, act: Tensor) -> Tensor:
        """Gaussian: exact log pi(a|s); deterministic: log N(a; pi(s), I), as the official PGD code's TD3+BC."""
        if self.hparams.policy == "deterministic":
            return unit_gaussian_log_prob(act, self.act(obs))
        return self.actor(obs).log_prob(act).sum(-1)
