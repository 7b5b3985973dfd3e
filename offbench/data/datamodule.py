"""OfflineDataModule: one dataset, its transforms, and a seeded sampler that lives on the device.

The whole dataset is moved to the training device once; a batch is `randint` indices drawn from a
device generator and a gather, so there is no DataLoader, no collation and no host sync. Lightning
still wants a train dataloader: it yields the number of updates of each block (see
offbench/module.py), and its length makes one epoch exactly one evaluation interval.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from offbench.batch import Batch, Transitions
from offbench.data.catalog import DatasetInfo, resolve
from offbench.data.checks import check_transitions
from offbench.data.identity import checked_fingerprint
from offbench.data.sources import load_transitions, local_path
from offbench.envs import action_bounds, observation_dim
from offbench.errors import UserError

RewardTuning = Literal["none", "cql_antmaze", "iql_antmaze", "iql_locomotion"]


def tune_rewards(t: Transitions, tuning: RewardTuning) -> Transitions:
    """Reward transforms of the papers: CQL's AntMaze (r - 0.5) * 4, IQL's AntMaze r - 1, and IQL's
    locomotion r * 1000 / (max episode return - min episode return). Episode returns follow."""
    if tuning == "none":
        return t
    if tuning == "cql_antmaze":
        rew = (t.rew - 0.5) * 4.0
    elif tuning == "iql_antmaze":
        rew = t.rew - 1.0
    elif tuning == "iql_locomotion":
        returns = t.episode_returns()
        spread = float(returns.max() - returns.min())
        if spread <= 0:
            raise UserError("iql_locomotion reward tuning divides by the spread of episode returns, which is 0 here")
        rew = t.rew * (1000.0 / spread)
    else:
        raise UserError(f"unknown reward_tuning {tuning!r}; choose one of {RewardTuning.__args__}")
    rew = rew.astype(np.float32)
    episode_return = np.bincount(t.episode, weights=rew)[t.episode].astype(np.float32)
    return replace(t, rew=rew, episode_return=episode_return)


def checked(
    t: Transitions, info: DatasetInfo, env_obs_dim: int, low: np.ndarray, high: np.ndarray, clip_actions: bool,
    clip_flag: str = "--data.clip_actions true",
) -> Transitions:
    """`t` after the checks of offbench/data/checks.py: a UserError listing the problems, warnings on
    stderr, and with `clip_actions` the actions outside the bounds clipped (said on stderr). `clip_flag`:
    how the calling command asks for that clipping (named in the messages)."""
    where = str(local_path(info) or info.name)
    check = check_transitions(t, where, info.env_id, env_obs_dim, low, high, clip_flag)
    problems = check.problems
    if clip_actions and check.outside_rows:
        problems = [p for p in problems if "outside the action bounds" not in p]
        print(f"offbench: clipped the actions of {check.outside_rows} transitions of {where} to the bounds of "
              f"{info.env_id} ({clip_flag})", file=sys.stderr)
        t = replace(t, act=np.clip(t.act, low, high).astype(np.float32))
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else "the data cannot be trained on:\n  - " + "\n  - ".join(problems))
    for warning in check.warnings:
        print(f"offbench: warning: {warning}", file=sys.stderr)
    return t


def _positive(name: str, value: int) -> int:
    if value <= 0:
        raise UserError(f"{name} must be a positive number of updates/samples, got {value}")
    return value


class OfflineDataModule(pl.LightningDataModule):
    """The dataset named by `dataset` (a catalog name, a Minari id, or an HDF5 path), transformed
    and sampled on the device.

    Args:
        dataset: catalog name (`hopper-medium-v2`, `D4RL/antmaze/umaze-v1`, `synthetic/hopper-random-v0`)
            or a path to a D4RL-layout HDF5 file.
        batch_size: transitions per update.
        eval_every: updates per epoch, i.e. between two evaluations.
        block_size: updates run per Lightning `training_step` call.
        normalize_obs: standardise observations with the dataset's mean and std (+1e-3); the
            statistics are saved with the checkpoint and applied to observations at evaluation.
        reward_tuning: "none", "cql_antmaze" ((r-0.5)*4), "iql_antmaze" (r-1),
            "iql_locomotion" (r*1000/return range).
        env_id, ref_family, ref_min, ref_max, max_episode_steps: for bring-your-own HDF5 files:
            the evaluation env and the reference scores of the normalized score.
        clip_actions: clip actions outside the evaluation env's bounds to them (without it, such
            actions are an error: see offbench/data/checks.py for every check made before training).
    """

    def __init__(
        self,
        dataset: str,
        batch_size: int = 256,
        eval_every: int = 5000,
        block_size: int = 1000,
        normalize_obs: bool = False,
        reward_tuning: RewardTuning = "none",
        env_id: str | None = None,
        ref_family: str | None = None,
        ref_min: float | None = None,
        ref_max: float | None = None,
        max_episode_steps: int | None = None,
        clip_actions: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = _positive("data.batch_size", batch_size)
        self.eval_every = _positive("data.eval_every", eval_every)
        self.block_size = _positive("data.block_size", block_size)
        self.normalize = normalize_obs
        self.info: DatasetInfo = resolve(
            dataset, env_id=env_id, ref_family=ref_family, ref_min=ref_min, ref_max=ref_max,
            max_episode_steps=max_episode_steps,
        )
        transitions = load_transitions(self.info)
        self.fingerprint = checked_fingerprint(transitions, self.info)  # of the data as read (result.json `data`)
        low, high = action_bounds(self.info)
        transitions = checked(transitions, self.info, observation_dim(self.info), low, high, clip_actions)
        self.transitions = tune_rewards(transitions, reward_tuning)
        self.max_action = float(np.max(np.abs(np.concatenate([low, high]))))
        obs = self.transitions.obs
        self.obs_mean = torch.as_tensor(obs.mean(0) if normalize_obs else np.zeros(obs.shape[1]), dtype=torch.float32)
        self.obs_std = torch.as_tensor(obs.std(0) + 1e-3 if normalize_obs else np.ones(obs.shape[1]), dtype=torch.float32)
        self._tensors: tuple[Tensor, ...] | None = None
        self._generator: torch.Generator | None = None
        self.accept_changed_statistics = False  # a resume with accepted changes (offbench fit --accept_changes)

    @property
    def obs_dim(self) -> int:
        return self.transitions.obs_dim

    @property
    def act_dim(self) -> int:
        return self.transitions.act_dim

    def normalize_obs(self, obs: Tensor) -> Tensor:
        """Apply the training data's observation normalisation (identity when it is off)."""
        if not self.normalize:
            return obs
        return (obs - self.obs_mean.to(obs.device)) / self.obs_std.to(obs.device)

    def setup(self, stage: str | None = None) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self._tensors is not None and self._tensors[0].device == device:
            return
        t = self.transitions

        def put(array: np.ndarray) -> Tensor:
            return torch.as_tensor(array, dtype=torch.float32, device=device)

        self._tensors = (
            self.normalize_obs(put(t.obs)), put(t.act), put(t.rew), self.normalize_obs(put(t.next_obs)), put(t.done)
        )
        self._next_act = put(t.next_actions())
        # Seeded from torch's seed (set by seed_everything), so the sampler follows the run's seed.
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(torch.initial_seed())

    def sample_indices(self, n: int) -> Tensor:
        """`batch_size` indices drawn uniformly with replacement from 0..n-1, on the device, with the run's
        seeded sampler (saved in checkpoints). `sample` draws transitions with it; a module that trains on
        other items (the trajectory planners' windows, `OfflineRLModule.batch_source`) draws their indices."""
        return torch.randint(n, (self.batch_size,), device=self._tensors[0].device, generator=self._generator)

    def sample(self) -> Batch:
        """A batch of `batch_size` transitions drawn uniformly with replacement, on the device, with the
        dataset's next actions (`Batch.next_act`)."""
        idx = self.sample_indices(len(self._tensors[0]))
        return Batch(*(x[idx] for x in self._tensors), idx=idx, next_act=self._next_act[idx])

    def train_dataloader(self) -> list[int]:
        full, rest = divmod(self.eval_every, self.block_size)
        return [self.block_size] * full + ([rest] if rest else [])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "obs_mean": self.obs_mean, "obs_std": self.obs_std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same = torch.equal(state["obs_mean"], self.obs_mean) and torch.equal(state["obs_std"], self.obs_std)
        if not same and not self.accept_changed_statistics:
            raise UserError(
                f"the checkpoint's observation statistics differ from dataset {self.info.name!r}'s: "
                "the data or --data.normalize_obs changed since the checkpoint was written; resume with the same data "
                "(or pass --accept_changes true to continue with this data's statistics)"
            )
        self._generator.set_state(state["generator"])
