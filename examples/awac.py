"""AWAC, written outside the package as an example of adding an algorithm to offbench.

Advantage-Weighted Actor-Critic (Nair, Gupta, Dalal & Levine 2020, "AWAC: Accelerating Online
Reinforcement Learning with Offline Datasets", arXiv:2006.09359, Section 3, Algorithm 1):

    critic:  y = r + gamma (1 - d) min_k Q'_k(s', a'),  a' ~ pi(.|s');  L_Q = sum_k E (Q_k(s, a) - y)^2
    actor:   max_pi  E_(s,a)~D [ log pi(a|s) exp(A(s, a) / lambda) ],   A(s, a) = Q(s, a) - Q(s, a~pi(.|s))
    targets: Q' <- (1 - tau) Q' + tau Q after every update

Settings here are an example, not tuned: twin 2 x 256 ReLU critics, a Gaussian actor (tanh-squashed
mean, state-independent std), Adam 3e-4, gamma 0.99, tau 0.005, lambda 1, the weights clipped at 100
(a common guard against exp overflow, not in the paper).

Run it (from this folder, so that `awac` is importable):
    offbench fit --config awac.yaml --data.dataset synthetic/hopper-random-v0
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from offbench import settings as check  # range checks of the settings, one line each
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, GaussianActor


class AWAC(OfflineRLModule):
    def __init__(self, obs_dim: int, act_dim: int, max_action: float = 1.0, hidden: tuple[int, ...] = (256, 256),
                 actor_lr: float = 3e-4, critic_lr: float = 3e-4, gamma: float = 0.99, tau: float = 0.005,
                 awac_lambda: float = 1.0, weight_clip: float = 100.0) -> None:
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        check.positive("awac_lambda", awac_lambda)  # divides the advantage
        check.positive("weight_clip", weight_clip)
        super().__init__()
        self.save_hyperparameters()  # every argument above is a config key: --model.init_args.awac_lambda 0.3
        self.actor = GaussianActor(obs_dim, act_dim, max_action, hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr)
        return [self.critic_opt, self.actor_opt]  # kept as attributes and returned: the contract

    @compilable  # no cadence: the whole update is one compiled step
    def update(self, batch: Batch) -> dict[str, Tensor]:
        hp = self.hparams
        with torch.no_grad():  # 1. critic
            next_act = self.actor(batch.next_obs).sample().clamp(-hp.max_action, hp.max_action)
            y = batch.rew + hp.gamma * (1.0 - batch.done) * self.critic_target(batch.next_obs, next_act).amin(0)
        q = self.critic(batch.obs, batch.act)
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.optimize(self.critic_opt, critic_loss)

        with torch.no_grad():  # 2. actor: advantage-weighted log-likelihood of the dataset's actions
            adv = q.detach().amin(0) - self.critic(batch.obs, self.actor(batch.obs).mean).amin(0)
            weights = torch.exp(adv / hp.awac_lambda).clamp(max=hp.weight_clip)
        actor_loss = -(weights * self.actor(batch.obs).log_prob(batch.act).sum(-1)).mean()
        self.optimize(self.actor_opt, actor_loss)

        soft_update(self.critic_target, self.critic, hp.tau)  # 3. target critic
        return {"loss/critic": critic_loss, "loss/actor": actor_loss, "q/mean": q.mean(), "weights/mean": weights.mean()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.actor(obs).mean  # the Gaussian's mean, within the bounds (tanh-squashed)
