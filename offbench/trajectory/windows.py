"""Trajectory windows of a dataset (for PGD's trajectory model and the trajectory planners), and their normalisation.

A window is `length` consecutive rows [s_t, a_t, r_t, done_t] of one episode (obs_dim + act_dim + 2
channels); L rows give L - 1 transitions, the next state of row t being the state of row t + 1.
As the official code (EmptyJackson/policy-guided-diffusion, environments/dataset.py): windows start
every `stride` rows, plus the window that ends on a terminal row; no window crosses an episode end,
and no timeout row is ever part of a window (the suite's Transitions already drop them).
Deviation: the stride counts from each episode's first row (the official code strides over the
concatenated list of valid starts), so every episode's first window is kept, as the official code
also does explicitly.

Normalisation (official util/data.py): actions go through arctanh(clip(a / max_action, +-0.999)),
then every channel is z-scored with the mean and std over all window rows (a std of 0 becomes 1).
The inverse maps actions back through max_action * tanh and done through 1[done > 0.5].
Deviation: the division by max_action (the official code has none: D4RL's actions lie in [-1, 1]; for them the
two agree, as tests/test_golden_pgd.py checks with max_action 1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from offbench.batch import Transitions
from offbench.errors import UserError

ACTION_CLIP = 0.999  # arctanh(clip(a, -0.999, 0.999)), as the official code


def trajectory_runs(t: Transitions, name: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the episodes of `t`, checked to be whole trajectories in time order.

    Raises UserError (a ValueError) when rows of one episode do not chain (a row's next_obs is not the next
    row's obs, or the steps are not consecutive): such a dataset has no episode structure."""
    if len(t) == 0:
        raise UserError(f"{name} has no transitions")
    same = t.episode[1:] == t.episode[:-1]
    consecutive = t.step[1:] == t.step[:-1] + 1
    chained = np.all(t.next_obs[:-1] == t.obs[1:], axis=1)
    broken = same & ~(consecutive & chained)
    if broken.any():
        raise UserError(
            f"{name} has no usable episode structure: in {int(broken.sum())} of {int(same.sum())} places, two rows of one "
            "episode do not follow each other (next_obs differs from the next row's obs, or the steps are not "
            "consecutive). PGD trains on trajectory windows, so it needs episodes stored whole and in time order "
            "(a D4RL-layout HDF5 file with terminals and timeouts, or a Minari dataset); shuffled transitions cannot be used."
        )
    starts = np.flatnonzero(np.r_[True, ~same])
    lengths = np.diff(np.r_[starts, len(t)])
    return starts, lengths


def window_starts(t: Transitions, length: int, stride: int, name: str = "the dataset") -> np.ndarray:
    """First rows of the training windows: every `stride` rows of each episode, plus the window
    ending on an episode's terminal row; only windows that lie inside one episode."""
    if length < 2 or stride < 1:
        raise UserError(f"window length must be >= 2 and stride >= 1, got {length} and {stride}")
    starts, lengths = trajectory_runs(t, name)
    out: list[np.ndarray] = []
    for start, n in zip(starts, lengths):
        if n < length:
            continue
        first = start + np.arange(0, n - length + 1, stride)
        if t.done[start + n - 1] > 0.5:  # the window that ends on the terminal row
            first = np.r_[first, start + n - length]
        out.append(first)
    if not out:
        raise UserError(
            f"{name}: no episode has {length} transitions (the longest has {int(lengths.max())}), so no window of "
            f"{length} rows fits; train with a shorter --window"
        )
    return np.unique(np.concatenate(out))


def rows(t: Transitions) -> np.ndarray:
    """The per-step rows [obs, act, rew, done] of the dataset, (N, obs_dim + act_dim + 2) float32."""
    return np.concatenate([t.obs, t.act, t.rew[:, None], t.done[:, None]], axis=1).astype(np.float32)


def windows(t: Transitions, starts: np.ndarray, length: int) -> np.ndarray:
    """Raw windows (W, length, channels) starting at `starts`."""
    return rows(t)[starts[:, None] + np.arange(length)]


class TrajectoryNormalizer(nn.Module):
    """Maps raw rows [s, a, r, done] to the model's space and back; statistics are buffers, so they
    follow the device and are saved with the model."""

    def __init__(self, obs_dim: int, act_dim: int, max_action: float = 1.0) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.max_action = obs_dim, act_dim, float(max_action)
        channels = obs_dim + act_dim + 2
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @property
    def act_slice(self) -> slice:
        return slice(self.obs_dim, self.obs_dim + self.act_dim)

    def _pre(self, x: Tensor) -> Tensor:
        """Raw rows with the actions through arctanh(clip(a / max_action))."""
        a = (x[..., self.act_slice] / self.max_action).clamp(-ACTION_CLIP, ACTION_CLIP)
        return torch.cat([x[..., : self.obs_dim], torch.atanh(a), x[..., self.obs_dim + self.act_dim :]], dim=-1)

    @torch.no_grad()
    def fit(self, raw: Tensor) -> TrajectoryNormalizer:
        """Statistics over all rows of `raw` (..., channels); a channel with std 0 gets std 1."""
        x = self._pre(raw.to(self.mean)).reshape(-1, self.mean.numel()).double()
        std = x.std(0, correction=0)
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std == 0, torch.ones_like(std), std))
        return self

    def normalize(self, raw: Tensor) -> Tensor:
        return (self._pre(raw) - self.mean) / self.std

    def unnormalize_actions(self, x_act: Tensor) -> Tensor:
        """Actions max_action * tanh(.) of the model-space action channels (differentiable)."""
        s = self.act_slice
        return self.max_action * torch.tanh(x_act * self.std[s] + self.mean[s])

    def unnormalize_obs(self, x_obs: Tensor) -> Tensor:
        return x_obs * self.std[: self.obs_dim] + self.mean[: self.obs_dim]

    def unnormalize(self, x: Tensor) -> Tensor:
        """Raw rows [s, a, r, done] from model-space rows: the exact inverse of `normalize` for
        actions inside +-0.999 max_action and done in {0, 1}."""
        d = self.obs_dim + self.act_dim
        y = x * self.std + self.mean
        act = self.max_action * torch.tanh(y[..., self.act_slice])
        done = (y[..., d + 1 :] > 0.5).to(y.dtype)
        return torch.cat([y[..., : self.obs_dim], act, y[..., d : d + 1], done], dim=-1)

    def to_transitions(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(obs, act, rew, next_obs, done) of model-space trajectories (B, L, C): L - 1 transitions
        each, flattened to (B * (L - 1), ...), as the official construct_rollout."""
        raw = self.unnormalize(x)
        o, d = self.obs_dim, self.obs_dim + self.act_dim
        head = raw[:, :-1].reshape(-1, raw.shape[-1])
        next_obs = raw[:, 1:, :o].reshape(-1, o)
        return head[:, :o], head[:, o:d], head[:, d], next_obs, head[:, d + 1]
