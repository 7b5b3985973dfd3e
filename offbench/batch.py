"""The data contract: `Transitions` (numpy, what every source returns) and `Batch` (tensors, what
every algorithm's `update` receives)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from torch import Tensor


@dataclass
class Transitions:
    """A dataset of single-step transitions, in episode order.

    Built the way D4RL's q-learning conversion does: `next_obs` is the observation that followed,
    no transition crosses a timeout, and `done` means termination only (never truncation).
    Rows of one episode are contiguous and in time order, so methods that need trajectories
    (AWR's TD(lambda) returns, SfBC's in-sample planning) can walk them.
    """

    obs: np.ndarray  # (N, obs_dim) float32
    act: np.ndarray  # (N, act_dim) float32
    rew: np.ndarray  # (N,) float32
    next_obs: np.ndarray  # (N, obs_dim) float32
    done: np.ndarray  # (N,) float32, 1.0 where the episode terminated (not truncated) after this step
    episode: np.ndarray  # (N,) int64, episode id, 0..n_episodes-1, non-decreasing
    step: np.ndarray  # (N,) int64, time index of the transition within its episode
    episode_return: np.ndarray  # (N,) float32, undiscounted return of the episode this row is in

    def __post_init__(self) -> None:
        n = len(self.obs)
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, np.ndarray):
                raise TypeError(f"Transitions.{f.name} must be a numpy array, got {type(value).__name__}")
            if len(value) != n:
                raise ValueError(
                    f"Transitions.{f.name} has {len(value)} rows but obs has {n}: every field needs one row per transition"
                )
        if self.obs.ndim != 2 or self.next_obs.shape != self.obs.shape:
            raise ValueError(f"obs and next_obs must both be (N, obs_dim); got {self.obs.shape} and {self.next_obs.shape}")
        if self.act.ndim != 2:
            raise ValueError(f"act must be (N, act_dim); got {self.act.shape}")
        for name in ("rew", "done", "episode", "step", "episode_return"):
            if getattr(self, name).ndim != 1:
                raise ValueError(f"Transitions.{name} must be 1-D (N,); got {getattr(self, name).shape}")

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def obs_dim(self) -> int:
        return self.obs.shape[1]

    @property
    def act_dim(self) -> int:
        return self.act.shape[1]

    @property
    def n_episodes(self) -> int:
        return int(self.episode[-1]) + 1 if len(self) else 0

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode, shape (n_episodes,)."""
        starts = np.flatnonzero(np.r_[True, np.diff(self.episode) != 0])
        return self.episode_return[starts]

    def next_actions(self) -> np.ndarray:
        """The dataset's action at `next_obs`, (N, act_dim): the next row's action within the episode
        (ReBRAC's critic penalty needs it). An episode's last row has no next row here: after a
        termination its value is never used (done = 1); after a timeout D4RL's conversion dropped the
        row that held it, so the row's own action stands in (one row per truncated episode)."""
        same_episode = np.r_[self.episode[1:] == self.episode[:-1], False]
        rows = np.arange(len(self)) + same_episode
        return self.act[rows]


class Batch(NamedTuple):
    """One sampled minibatch on the training device; shapes (B, obs_dim), (B, act_dim), (B,)...

    `idx` holds the dataset rows the batch was drawn from, so that methods keeping per-row
    quantities (AWR's TD(lambda) returns, SfBC's planned returns) look them up for the same rows.
    `next_act` is the dataset's action at `next_obs` (`Transitions.next_actions`), filled by the
    sampler (ReBRAC's critic penalty)."""

    obs: Tensor
    act: Tensor
    rew: Tensor
    next_obs: Tensor
    done: Tensor
    idx: Tensor | None = None
    next_act: Tensor | None = None
