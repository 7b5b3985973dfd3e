"""ReBRAC: TD3+BC revisited (Tarasov, Kurenkov, Nikulin & Kolesnikov, NeurIPS 2023, "Revisiting the
Minimalist Approach to Offline Reinforcement Learning", arXiv:2305.09836; official code
github.com/DT6A/ReBRAC, src/algorithms/rebrac.py and configs/rebrac/).

TD3+BC with a behaviour penalty in both the actor and the critic, deeper networks, LayerNorm
critics, a larger batch and per-task penalty weights (beta_1 actor, beta_2 critic):

Critic (twin Q, clipped double-Q, target policy smoothing, next-action penalty):
    a' = clip(pi_targ(s') + clip(eps, -c, c), -max_action, max_action),   eps ~ N(0, sigma^2)
    y  = reward_scale * r + gamma (1 - done) [min_k Q_targ_k(s', a') - beta_2 ||a' - a'_D||^2]
    L_Q = sum_k E (Q_k(s, a) - y)^2
  where a'_D is the dataset's action at s' (`Batch.next_act`).
Actor, every `policy_every` updates (then both targets move by Polyak averaging):
    lambda = 1 / mean|min_k Q_k(s, pi(s))|   (detached; `normalize_q`, else 1)
    L_pi = E [beta_1 ||pi(s) - a||^2 - lambda min_k Q_k(s, pi(s))]
  (TD3+BC differs: it uses Q_1, alpha / mean|Q|, and the mean over action dims instead of the sum.)

Official settings (configs/rebrac/*.yaml and the Config defaults): actor and critics 3 x 256 ReLU,
LayerNorm after each hidden activation of the critics only, tanh actor; hidden biases initialised to
0.1 and the output layers uniform in +-1e-3 (actor) / +-3e-3 (critics) (the EDAC initialisation;
hidden weights uniform in +-1/sqrt(fan_in), PyTorch's default); Adam; gamma 0.99, tau 0.005, policy
noise 0.2, noise clip 0.5, policy frequency 2, normalize_q on; no observation normalisation.
Locomotion: batch 1024, lr 1e-3 for both, no reward change. AntMaze: batch 256, actor lr 3e-4,
critic lr 5e-5, gamma 0.999, rewards x 100 (`reward_scale`). beta_1 / beta_2 per task
(configs/tasks/rebrac/). 1000 epochs x 1000 updates (1M); evaluation every 5 epochs with 10
episodes on locomotion, every 50 with 100 on AntMaze.

Target updates (the official `update_actor`, src/algorithms/rebrac.py of DT6A/ReBRAC at commit 694385b):
the critic target moves towards the critic after its step (`optax.incremental_update(critic.params, ...)`
where `critic` is the critic already stepped by `update_critic`), and the actor target towards the actor
*before* its step (`optax.incremental_update(actor.params, ...)` where `actor` is the train state passed in,
not `new_actor`). `actor_target_from="pre_step"` (the default) does that; "post_step" moves it towards the
stepped actor (the TD3 / TD3+BC PyTorch order, and this module's order until the golden test against the
official code, tests/test_golden_rebrac.py, found the difference: the target then holds one more actor step,
a small change to an average over about 1 / tau = 200 updates, but not the official computation). Both
orders keep the same state, so checkpoints load either way; a checkpoint saved before the option existed
resumes with the official order unless "post_step" is passed.

Deviations and choices: the actor and the targets update on the updates counted from 0 with
`step % policy_every == 0` (the official `delayed_updates`: the very first update is a full one). The
AntMaze reward scale is an argument of the algorithm (`reward_scale`), since the suite's reward
tunings do not include it. The repository's later calibration commit (the critic target clipped
from below by Monte-Carlo returns, for fine-tuning) is not part of the paper and not used. At the
last row of a truncated episode the dataset holds no next action (D4RL's conversion drops the
timeout row); `Batch.next_act` repeats the row's own action there (one row per truncated episode).
"""

from __future__ import annotations

import copy
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, DeterministicActor, EnsembleLinear


class UpdateDraws(NamedTuple):
    """The random draws of one update. Training leaves them None (drawn on the device); tests pass the
    official run's draws."""

    target_noise: Tensor | None = None  # (B, act_dim) standard normal: the target-policy smoothing noise


NO_DRAWS = UpdateDraws()


@torch.no_grad()
def edac_init(net: nn.Module, out_bound: float) -> None:
    """ReBRAC's (EDAC's) initialisation: hidden biases 0.1, the output layer uniform in +-out_bound
    (hidden weights keep PyTorch's default, uniform in +-1/sqrt(fan_in), the official pytorch_init)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear | EnsembleLinear)]
    for layer in linears[:-1]:
        layer.bias.fill_(0.1)
    nn.init.uniform_(linears[-1].weight, -out_bound, out_bound)
    nn.init.uniform_(linears[-1].bias, -out_bound, out_bound)


class ReBRAC(OfflineRLModule):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        hidden: tuple[int, ...] = (256, 256, 256),
        actor_lr: float = 1e-3,
        critic_lr: float = 1e-3,
        gamma: float = 0.99,
        tau: float = 0.005,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        policy_every: int = 2,
        actor_bc_coef: float = 1.0,
        critic_bc_coef: float = 1.0,
        normalize_q: bool = True,
        critic_layer_norm: bool = True,
        reward_scale: float = 1.0,
        actor_target_from: Literal["pre_step", "post_step"] = "pre_step",
    ) -> None:
        """ReBRAC: TD3+BC with behaviour penalties in actor and critic (equations, settings: algorithms/rebrac.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            hidden: hidden widths of the actor and of the twin critics (ReLU MLPs; official 3 x 256).
            actor_lr: Adam learning rate of the actor (official 1e-3 on locomotion, 3e-4 on AntMaze).
            critic_lr: Adam learning rate of the twin critics (official 1e-3 on locomotion, 5e-5 on AntMaze).
            gamma: discount gamma of the TD target y (official 0.99; 0.999 on AntMaze).
            tau: Polyak rate of both targets, moved on actor updates (official 0.005).
            policy_noise: std sigma of the target policy smoothing noise eps, times max_action (official 0.2).
            noise_clip: clip c of that noise, times max_action (official 0.5).
            policy_every: the actor and the targets update when step % policy_every == 0 (official 2).
            actor_bc_coef: beta_1, weight of the actor's penalty ||pi(s) - a||^2 (official: per task,
                configs/tasks/rebrac/; 0: no actor penalty).
            critic_bc_coef: beta_2, weight of the critic's next-action penalty ||a' - a'_D||^2 (official: per task;
                0: no critic penalty).
            normalize_q: lambda = 1 / mean|min_k Q_k(s, pi(s))| in the actor loss; false: lambda = 1 (official true).
            critic_layer_norm: LayerNorm after each hidden activation of the critics (official true).
            reward_scale: factor on r in the TD target y (official 1 on locomotion, 100 on AntMaze).
            actor_target_from: "pre_step": the actor target moves towards the actor before its step (the official
                code); "post_step": after it (the TD3 / TD3+BC order).
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
        check.non_negative("actor_bc_coef", actor_bc_coef, " (0: no actor penalty)")
        check.non_negative("critic_bc_coef", critic_bc_coef, " (0: no critic penalty, as on antmaze-medium-diverse)")
        check.positive("reward_scale", reward_scale)
        super().__init__()
        if actor_target_from not in ("pre_step", "post_step"):
            raise ValueError(f"actor_target_from must be 'pre_step' or 'post_step', not {actor_target_from!r}")
        self.save_hyperparameters()
        self.actor = DeterministicActor(obs_dim, act_dim, max_action, hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden, layer_norm=critic_layer_norm)
        edac_init(self.actor, 1e-3)
        edac_init(self.critic, 3e-3)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr)
        return [self.actor_opt, self.critic_opt]

    def update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        if batch.next_act is None:
            raise ValueError("ReBRAC's critic penalty needs the dataset's next actions: pass batches with Batch.next_act "
                             "(OfflineDataModule.sample fills it; Transitions.next_actions() computes it)")
        metrics = self.critic_update(batch, draws)
        # every policy_every updates, counted from 0 as the official delayed_updates: the actor, then both targets
        if self.step % self.hparams.policy_every == 0:
            metrics |= self.actor_update(batch)
        return metrics

    @compilable
    def critic_update(self, batch: Batch, draws: UpdateDraws = NO_DRAWS) -> dict[str, Tensor]:
        """Clipped double-Q target with smoothing, minus beta_2 times the next-action penalty; one step."""
        h = self.hparams
        with torch.no_grad():
            # TD3's target policy smoothing (as algorithms.td3bc.smoothed_target_action, with the draw explicit)
            eps = torch.randn_like(batch.act) if draws.target_noise is None else draws.target_noise
            clip = h.noise_clip * h.max_action
            noise = (eps * h.policy_noise * h.max_action).clamp(-clip, clip)
            next_act = (self.actor_target(batch.next_obs) + noise).clamp(-h.max_action, h.max_action)
            penalty = (next_act - batch.next_act).pow(2).sum(-1)
            next_q = self.critic_target(batch.next_obs, next_act).min(0).values - h.critic_bc_coef * penalty
            target = h.reward_scale * batch.rew + h.gamma * (1.0 - batch.done) * next_q
        q = self.critic(batch.obs, batch.act)  # (2, B)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimize(self.critic_opt, critic_loss)
        return {"loss/critic": critic_loss, "q/mean": q.mean(), "bc/critic": penalty.mean()}

    @compilable
    def actor_update(self, batch: Batch) -> dict[str, Tensor]:
        """Actor = beta_1 * BC - lambda * min Q, one step; both targets follow (the actor target from the
        actor before its step by default, as the official code: see the module docstring)."""
        h = self.hparams
        pi = self.actor(batch.obs)
        q_pi = self.critic(batch.obs, pi).min(0).values
        lmbda = 1.0 / q_pi.abs().mean().detach() if h.normalize_q else torch.ones_like(q_pi[0])
        bc = (pi - batch.act).pow(2).sum(-1)
        actor_loss = (h.actor_bc_coef * bc - lmbda * q_pi).mean()
        if h.actor_target_from == "pre_step":  # the actor target reads nothing of this step: Polyak now
            soft_update(self.actor_target, self.actor, h.tau)
        self.optimize(self.actor_opt, actor_loss)
        if h.actor_target_from == "post_step":
            soft_update(self.actor_target, self.actor, h.tau)
        soft_update(self.critic_target, self.critic, h.tau)
        return {"loss/actor": actor_loss, "lambda": lmbda, "bc/actor": bc.mean()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.actor(obs)
