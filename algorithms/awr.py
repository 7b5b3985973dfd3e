"""AWR: advantage-weighted regression (Peng, Kumar, Zhang & Levine 2019, "Advantage-Weighted
Regression: Simple and Scalable Off-Policy Reinforcement Learning"), on a static dataset: the
unimodal-Gaussian baseline that the DiffCPS paper contrasts with diffusion policies.

One iteration = `critic_steps` value updates, then `actor_steps` policy updates (as the official code):
    returns: TD(lambda) along each trajectory, with V frozen at the start of the phase,
             G_t = r_t + gamma (1 - done_t) [(1 - lambda) V(s_t+1) + lambda G_t+1],
             and G = r + gamma (1 - done) V(s') on a trajectory's last row (bootstrapped where the
             episode was truncated, 0 after a termination)
    value:   L_V = 0.5 E ((1 - gamma) G_t - (1 - gamma) V(s_t))^2   (V learned in units of 1/(1-gamma))
    weights: A_t = G_t - V(s_t) over the whole dataset, standardised (A - mean) / (std + 1e-5),
             w_t = min(exp(A_t / beta), weight_clip)
    policy:  L_pi = -E w_t log N(a_t / max_action; mu(s_t), action_std^2) + c_b * bound loss (c_b = 10),
             bound loss = 0.5 E sum_i max(|mu_i(s)| - 1, 0)^2 (keeps the mean inside the bounds)
Returns and weights of every row are recomputed at the start of each phase, on the device.

Official settings (the authors' code, github.com/xbpeng/awr, awr_configs.py): 128-64 ReLU networks;
SGD with momentum 0.9, value lr 1e-2, policy lr 5e-5 (HalfCheetah; 1e-4 Hopper, 2.5e-5 Walker2d:
configs/tasks/awr/); fixed action std 0.4 in units of the action bound (0.2 on Ant/Humanoid);
batch 256; gamma 0.99; lambda 0.95; temperature beta 1.0 on advantages standardised over the data
(the code's choice); weight clip 20; 200 value and 1000 policy steps per iteration; observations
normalised (`normalize_obs`).

Deviations: the dataset is fixed, so an iteration adds no samples (the paper's static-dataset
setting); the observation normaliser is the dataset's mean/std rather than a running one; PyTorch's
default initialisation instead of Xavier for the hidden layers. The row indices that the per-row
returns need are not yet part of `Batch`, so `update` draws its own uniform rows from a device copy
of the dataset (`attach_dataset`, called in on_fit_start) unless the batch carries `idx`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Batch, Transitions
from offbench.module import OfflineRLModule, compilable
from offbench.nets import mlp


def trajectories(episode: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of rows of one episode with consecutive steps, as a padded (E, L) row index, its mask,
    and each row's position in the flattened (E * L) layout."""
    breaks = np.r_[True, (np.diff(episode) != 0) | (np.diff(step) != 1)]
    starts = np.flatnonzero(breaks)
    lengths = np.diff(np.r_[starts, len(episode)])
    offsets = np.arange(lengths.max())
    mask = offsets < lengths[:, None]
    return np.where(mask, starts[:, None] + offsets, 0), mask, np.flatnonzero(mask.reshape(-1))


def td_lambda_returns(
    rew: Tensor, next_value: Tensor, done: Tensor, index: Tensor, mask: Tensor, position: Tensor,
    gamma: float, lam: float,
) -> Tensor:
    """TD(lambda) return of every row (N,), computed backwards along the trajectories of
    `trajectories` (all its outputs as tensors); `next_value` is V(s') of each row. No host sync."""
    r, v_next = rew[index], ((1.0 - done) * next_value)[index]
    cont = torch.zeros_like(r)
    cont[:, :-1] = mask[:, 1:].to(r.dtype)  # 1 where the trajectory goes on after this row
    out, g = torch.empty_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        g = r[:, t] + gamma * (v_next[:, t] + lam * cont[:, t] * (g - v_next[:, t]))
        out[:, t] = g
    return out.reshape(-1)[position]


def advantage_weights(adv: Tensor, temperature: float, weight_clip: float) -> Tensor:
    """min(exp(A_std / temperature), weight_clip), A standardised over all rows (ddof 0, +1e-5)."""
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(adv / temperature).clamp(max=weight_clip)


class AWR(OfflineRLModule):
    needs_dataset_rows = True  # reads TD(lambda) returns and weights per dataset row by Batch.idx
    # many seeds as one computation (offbench/seeds.py): refresh() replaces the per-row tables in plain tensor attributes, one for all copies
    unbatchable = ("its refresh() replaces every row's TD(lambda) returns and weights, kept in plain tensor attributes "
                   "(one tensor for all copies)")

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        hidden: tuple[int, ...] = (128, 64),
        actor_lr: float = 5e-5,
        critic_lr: float = 1e-2,
        momentum: float = 0.9,
        action_std: float = 0.4,
        gamma: float = 0.99,
        td_lambda: float = 0.95,
        temperature: float = 1.0,
        weight_clip: float = 20.0,
        critic_steps: int = 200,
        actor_steps: int = 1000,
        bound_loss_weight: float = 10.0,
    ) -> None:
        """AWR: advantage-weighted regression on a static dataset (equations, settings: algorithms/awr.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            hidden: hidden widths of the policy mean and of the value net (ReLU MLPs; official 128-64).
            actor_lr: SGD learning rate of the policy (official 5e-5 on HalfCheetah, 1e-4 Hopper, 2.5e-5 Walker2d).
            critic_lr: SGD learning rate of the value net (official 1e-2).
            momentum: SGD momentum of both optimisers (official 0.9; 0: plain SGD).
            action_std: fixed std of the Gaussian policy, in units of max_action (official 0.4; 0.2 on Ant/Humanoid).
            gamma: discount gamma of the TD(lambda) returns G_t; V is learned in units of 1 / (1 - gamma)
                (official 0.99).
            td_lambda: lambda of the TD(lambda) returns G_t (official 0.95; 0: one-step TD, 1: Monte-Carlo).
            temperature: temperature beta of the weights w_t = min(exp(A_t / beta), weight_clip), A standardised
                (official 1.0).
            weight_clip: upper clip of the weights w_t (official 20).
            critic_steps: value updates per iteration; every row's returns are recomputed at their start
                (official 200).
            actor_steps: policy updates per iteration; every row's weights are recomputed at their start
                (official 1000).
            bound_loss_weight: weight c_b of the bound loss that keeps the policy mean inside the action bounds
                (official 10; 0: no bound loss).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.widths("hidden", hidden)
        check.learning_rate("actor_lr", actor_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.interval("momentum", momentum, "[0, 1)", " (SGD momentum; 0: plain SGD)")
        check.positive("action_std", action_std)
        check.interval("gamma", gamma, "[0, 1)", " (V is learned in units of 1 / (1 - gamma))")
        check.interval("td_lambda", td_lambda, "[0, 1]", " (0: one-step TD, 1: Monte-Carlo returns)")
        check.positive("temperature", temperature)
        check.positive("weight_clip", weight_clip)
        check.integer("critic_steps", critic_steps)
        check.integer("actor_steps", actor_steps)
        check.non_negative("bound_loss_weight", bound_loss_weight, " (0: no bound loss)")
        super().__init__()
        self.save_hyperparameters()
        self.actor = mlp(obs_dim, act_dim, hidden)  # the Gaussian's mean, in units of max_action
        nn.init.uniform_(self.actor[-1].weight, -0.01, 0.01)
        nn.init.zeros_(self.actor[-1].bias)
        self.value = mlp(obs_dim, 1, hidden)  # (1 - gamma) V(s)
        self.value_at_refresh = copy.deepcopy(self.value).requires_grad_(False)  # V behind the current targets
        self.data: dict[str, Tensor] | None = None  # the dataset on the device (attach_dataset)
        self.returns: Tensor | None = None  # every row's TD(lambda) return, from value_at_refresh
        self.weights: Tensor | None = None  # every row's clipped advantage weight

    # --- the dataset, kept on the device with its trajectories ---------------------------------
    def attach_dataset(self, t: Transitions, normalize_obs=None) -> None:
        """Device copies of what AWR needs per row, and the trajectory layout for TD(lambda)."""
        put = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)
        norm = normalize_obs or (lambda x: x)
        index, mask, position = (torch.as_tensor(x, device=self.device) for x in trajectories(t.episode, t.step))
        self.data = {
            "obs": norm(put(t.obs)), "act": put(t.act), "rew": put(t.rew), "next_obs": norm(put(t.next_obs)),
            "done": put(t.done), "index": index, "mask": mask, "position": position,
        }
        self._recompute()  # from value_at_refresh: after a resume, the targets the run was using

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.attach_dataset(datamodule.transitions, datamodule.normalize_obs)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        h = self.hparams
        self.actor_opt = torch.optim.SGD(self.actor.parameters(), lr=h.actor_lr, momentum=h.momentum)
        self.critic_opt = torch.optim.SGD(self.value.parameters(), lr=h.critic_lr, momentum=h.momentum)
        return [self.actor_opt, self.critic_opt]

    # --- targets: TD(lambda) returns and clipped advantage weights of every row -----------------
    @torch.no_grad()
    def _values(self, net: nn.Module, obs: Tensor) -> Tensor:
        chunks = [net(x).squeeze(-1) for x in obs.split(65536)]
        return torch.cat(chunks) / (1.0 - self.hparams.gamma)

    @torch.no_grad()
    def _recompute(self) -> None:
        h, d = self.hparams, self.data
        v = self._values(self.value_at_refresh, d["obs"])
        v_next = self._values(self.value_at_refresh, d["next_obs"])
        self.returns = td_lambda_returns(
            d["rew"], v_next, d["done"], d["index"], d["mask"], d["position"], h.gamma, h.td_lambda
        )
        self.weights = advantage_weights(self.returns - v, h.temperature, h.weight_clip)

    @torch.no_grad()
    def refresh(self) -> None:
        """Freeze the current V and recompute every row's returns and weights with it."""
        self.value_at_refresh.load_state_dict(self.value.state_dict())
        self._recompute()

    # --- one update ----------------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, Tensor]:
        h, d = self.hparams, self.data
        if d is None:
            raise RuntimeError("AWR needs the whole dataset for its TD(lambda) returns: call attach_dataset(transitions) first")
        phase = self.step % (h.critic_steps + h.actor_steps)
        if phase == 0 or phase == h.critic_steps:
            self.refresh()
        idx = getattr(batch, "idx", None)
        if idx is None:  # Batch has no row indices yet: draw uniform rows, as the DataModule's sampler
            idx = torch.randint(len(d["obs"]), (batch.obs.shape[0],), device=d["obs"].device)
        # The rows are gathered here, so that a compiled step (and a CUDA graph) gets the batch, not the dataset.
        if phase < h.critic_steps:
            return self.value_update(d["obs"][idx], self.returns[idx])
        return self.actor_update(d["obs"][idx], d["act"][idx], self.weights[idx])

    @compilable
    def value_update(self, obs: Tensor, returns: Tensor) -> dict[str, Tensor]:
        """Value regression onto the rows' TD(lambda) returns."""
        h = self.hparams
        prediction = self.value(obs).squeeze(-1)
        value_loss = 0.5 * (prediction - (1.0 - h.gamma) * returns).pow(2).mean()
        self.optimize(self.critic_opt, value_loss)
        return {"loss/value": value_loss, "v/mean": prediction.detach().mean() / (1.0 - h.gamma)}

    @compilable
    def actor_update(self, obs: Tensor, act: Tensor, weights: Tensor) -> dict[str, Tensor]:
        """Advantage-weighted maximum likelihood of the rows' actions, fixed std."""
        h = self.hparams
        mean = self.actor(obs)
        policy = torch.distributions.Normal(mean, h.action_std, validate_args=False)  # validation would sync
        log_prob = policy.log_prob(act / h.max_action).sum(-1)
        bound_loss = 0.5 * ((mean - 1.0).clamp(min=0).pow(2) + (-1.0 - mean).clamp(min=0).pow(2)).sum(-1).mean()
        actor_loss = -(weights * log_prob).mean() + h.bound_loss_weight * bound_loss
        self.optimize(self.actor_opt, actor_loss)
        return {"loss/actor": actor_loss, "adv/weight_mean": weights.mean()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return self.actor(obs).clamp(-1.0, 1.0) * self.hparams.max_action
