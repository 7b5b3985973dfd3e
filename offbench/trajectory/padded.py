"""Episodes padded to a fixed length and the windows the trajectory planners train on.

As the official Diffuser code builds them (Janner et al. 2022, arXiv:2205.09991; jannerm/diffuser
@7ea4228, diffuser/datasets/buffer.py, sequence.py, normalization.py), which Decision Diffuser's code
reuses (anuragajay/decision-diffuser @01ce528, code/diffuser/datasets/):
- every episode goes into an array of `max_path_length` steps, zero-filled after its end; a terminated
  episode's last reward gets `termination_penalty` added (the value dataset: -100; the diffusion
  dataset: 0);
- windows of `horizon` steps start at 0 .. min(length - 1, max_path_length - horizon) - 1 of each
  episode (`use_padding=True`): windows of a terminated episode run into the padding, and an episode's
  last step starts no window;
- the Gaussian normaliser: per dimension, mean and standard deviation (ddof 0, no epsilon) over the
  valid steps only, applied to the whole padded array, so padded rows become -mean / std (not 0);
- the value target of a window is the discounted reward to the end of the padded episode,
  sum_k gamma^k r[start + k] (not truncated at the horizon), raw (not normalised).
Deviation: the suite's datasets (offbench.batch.Transitions, D4RL's q-learning conversion) drop the row of
a timeout, so a D4RL episode cut at 1000 steps has 999 rows here and 1000 in the official buffer. The
windows are the same (the official code never puts step 999 into a window); the normaliser statistics and
the value targets miss that one row's observation, action and reward.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from offbench.batch import Transitions
from offbench.errors import UserError
from offbench.trajectory.windows import trajectory_runs


class PaddedEpisodes(NamedTuple):
    obs: np.ndarray  # (E, T, obs_dim) float32, zeros after each episode's end
    act: np.ndarray  # (E, T, act_dim) float32
    rew: np.ndarray  # (E, T) float32, with the termination penalty on a terminated episode's last step
    lengths: np.ndarray  # (E,) int64, steps of each episode
    terminated: np.ndarray  # (E,) bool, the episode ended by termination (not a timeout or the data's end)


def padded_episodes(t: Transitions, max_path_length: int, termination_penalty: float = 0.0,
                    name: str = "the dataset") -> PaddedEpisodes:
    """The episodes of `t` in arrays of `max_path_length` steps (the official ReplayBuffer)."""
    starts, lengths = trajectory_runs(t, name)
    if lengths.max() > max_path_length:
        raise UserError(f"{name} has an episode of {int(lengths.max())} steps, longer than max_path_length "
                        f"{max_path_length}: raise --model.init_args.max_path_length")
    n, size = len(starts), max_path_length
    rows = (np.arange(size)[None] < lengths[:, None])  # (E, T) valid steps
    flat = np.flatnonzero(rows.ravel())  # episode-major order, as the rows of t

    def pad(x: np.ndarray) -> np.ndarray:
        out = np.zeros((n * size, *x.shape[1:]), np.float32)
        out[flat] = x
        return out.reshape(n, size, *x.shape[1:])

    terminated = t.done[starts + lengths - 1] > 0.5
    rew = pad(t.rew)
    rew[np.flatnonzero(terminated), lengths[terminated] - 1] += np.float32(termination_penalty)
    return PaddedEpisodes(pad(t.obs), pad(t.act), rew, lengths.astype(np.int64), terminated)


def sequence_starts(lengths: np.ndarray, horizon: int, max_path_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(episode, start) of every training window: start in range(min(length - 1, max_path_length - horizon))."""
    if horizon > max_path_length:
        raise UserError(f"horizon {horizon} is longer than max_path_length {max_path_length}")
    counts = np.minimum(lengths - 1, max_path_length - horizon).clip(min=0)
    episode = np.repeat(np.arange(len(lengths)), counts)
    start = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    if len(episode) == 0:
        raise UserError("no episode has two steps, so no training window exists")
    return episode.astype(np.int64), start.astype(np.int64)


def discounted_values(rew: np.ndarray, discount: float) -> np.ndarray:
    """(E, T) float64: sum_k discount^k rew[e, s + k] to the end of the padded episode, for every s."""
    values = np.zeros(rew.shape, np.float64)
    acc = np.zeros(rew.shape[0], np.float64)
    for s in range(rew.shape[1] - 1, -1, -1):
        acc = rew[:, s] + discount * acc
        values[:, s] = acc
    return values


def gaussian_statistics(x: np.ndarray, lengths: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (ddof 0) of the valid steps of padded `x` (E, T, d), float64."""
    valid = x[np.arange(x.shape[1])[None] < lengths[:, None]].astype(np.float64)
    mean, std = valid.mean(0), valid.std(0)
    if (std == 0).any():
        raise UserError(f"{name} dimension(s) {np.flatnonzero(std == 0).tolist()} are constant in the data: the official "
                        "Gaussian normaliser divides by their standard deviation, 0")
    return mean, std


class WindowBatch(NamedTuple):
    """A batch of training windows on the device: the trajectory planners' `update` input."""

    traj: Tensor  # (B, H, D) normalised windows, channels [actions, observations] (Diffuser's layout)
    value: Tensor  # (B,) the windows' value targets (raw discounted rewards to the episode end)
    idx: Tensor  # (B,) the windows' numbers in the table


class WindowTable(nn.Module):
    """The normalised padded episodes and the windows' (episode, start, value), as non-persistent buffers:
    they follow the module to its device and stay out of checkpoints (they are rebuilt from the data)."""

    def __init__(self, episodes: Tensor, episode: np.ndarray, start: np.ndarray, value: np.ndarray, horizon: int) -> None:
        super().__init__()
        self.horizon, self.length = horizon, episodes.shape[1]
        self.register_buffer("episodes", episodes.reshape(-1, episodes.shape[-1]), persistent=False)  # (E * T, D)
        self.register_buffer("first", torch.as_tensor(episode * self.length + start), persistent=False)  # (W,) flat row
        self.register_buffer("value", torch.as_tensor(value, dtype=episodes.dtype), persistent=False)  # (W,)
        self.register_buffer("offsets", torch.arange(horizon), persistent=False)

    def __len__(self) -> int:
        return len(self.first)

    def batch(self, idx: Tensor) -> WindowBatch:
        rows = self.first[idx, None] + self.offsets  # (B, H)
        return WindowBatch(self.episodes[rows], self.value[idx], idx)
