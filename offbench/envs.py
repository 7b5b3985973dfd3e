"""Evaluation environments: one env or a vector of them per dataset, and flat observations.

The catalog's `DatasetInfo` names the env (id, kwargs, episode limit); this module builds it the
same way everywhere, so training-time checks (observation size) and evaluation agree.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from offbench.data.catalog import DatasetInfo

# D4RL's locomotion datasets were recorded in gym's v3 MuJoCo envs; gymnasium's v4 are those envs on the new
# mujoco bindings, while v5 changed models and rewards in places (gymnasium's v5 notes). So the catalog's D4RL
# entries evaluate in Hopper/HalfCheetah/Walker2d-v4 on purpose, and gymnasium's note that v4 is "out of date",
# printed at every make, is silenced: by its text, for these three ids only.
V4_DEPRECATION = r".*The environment (Hopper|HalfCheetah|Walker2d)-v4 is out of date"
warnings.filterwarnings("ignore", message=V4_DEPRECATION, category=DeprecationWarning)


def _ensure_registered(env_id: str) -> None:
    """Register gymnasium-robotics envs (AntMaze, ...) when the id is not a core gymnasium id."""
    if env_id in gym.registry:
        return
    try:
        import gymnasium_robotics  # importing it registers its envs
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise gym.error.NameNotFound(
            f"environment {env_id!r} is not registered and gymnasium-robotics is not installed; "
            "install it with `pip install gymnasium-robotics` (AntMaze needs it)"
        ) from e
    gym.register_envs(gymnasium_robotics)
    if env_id not in gym.registry:
        raise gym.error.NameNotFound(
            f"environment {env_id!r} is neither a gymnasium nor a gymnasium-robotics id; "
            "check `env_id` of this dataset in offbench/data/catalog.py"
        )


def make_env(info: DatasetInfo, **overrides: Any) -> gym.Env:
    """One evaluation env for `info`: its id, its kwargs (overridden by `overrides`) and its
    episode limit (`max_episode_steps=` in `overrides` replaces the catalog's)."""
    _ensure_registered(info.env_id)
    kwargs = {**info.env_kwargs, **overrides}
    max_episode_steps = kwargs.pop("max_episode_steps", info.max_episode_steps)
    return gym.make(info.env_id, max_episode_steps=max_episode_steps, **kwargs)


def make_vector_env(info: DatasetInfo, num_envs: int, asynchronous: bool = False, **overrides: Any) -> VectorEnv:
    """`num_envs` copies of `make_env(info)`: in this process (sync, the default: cheap envs step
    faster without inter-process traffic) or one subprocess each (async: for slow envs).

    Autoreset is gymnasium's default NEXT_STEP mode; `evaluate` masks ended slots, so an
    auto-reset episode is never counted."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}")
    env_fn = functools.partial(make_env, info, **overrides)  # picklable for subprocesses
    vector_cls = AsyncVectorEnv if asynchronous else SyncVectorEnv
    return vector_cls([env_fn] * num_envs, autoreset_mode=AutoresetMode.NEXT_STEP)


def flatten_obs(obs: np.ndarray | dict[str, np.ndarray], keys: tuple[str, ...] | None) -> np.ndarray:
    """A flat float32 observation (batched or not) in the dataset's layout.

    Dict observations (AntMaze) are concatenated in `keys` order along the last axis: D4RL's
    29-dim AntMaze vector is concat(achieved_goal, observation). Not `gymnasium.spaces.flatten`:
    it sorts the keys and keeps `desired_goal` (31 dims), which no dataset stores.
    """
    if isinstance(obs, dict):
        if not keys:
            raise ValueError(
                f"the env returns dict observations (keys {sorted(obs)}) but the dataset has no "
                "`obs_keys`; set `obs_keys` in its catalog entry, e.g. ('achieved_goal', 'observation')"
            )
        missing = [k for k in keys if k not in obs]
        if missing:
            raise KeyError(f"observation keys {missing} not in the env's observation {sorted(obs)}")
        return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in keys], axis=-1)
    if keys:
        raise ValueError(f"`obs_keys` {keys} given but the env returns array observations")
    return np.asarray(obs, dtype=np.float32)


def _flat_dim(space: gym.Space, keys: tuple[str, ...] | None) -> int:
    if isinstance(space, gym.spaces.Dict):
        if not keys:
            raise ValueError(
                "the env has dict observations but the dataset has no `obs_keys`; set them in its catalog entry"
            )
        return sum(int(np.prod(space[k].shape)) for k in keys)
    if keys:
        raise ValueError(f"`obs_keys` {keys} given but the env has array observations")
    if space.shape is None or len(space.shape) != 1:
        raise ValueError(f"expected a flat Box observation space, got {space}")
    return int(space.shape[0])


def _spaces_of(info: DatasetInfo) -> tuple[gym.Space, gym.Space]:
    env = make_env(info)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def observation_dim(info: DatasetInfo) -> int:
    """Size of the flat observation the policy sees in the evaluation env (29 on AntMaze)."""
    return _flat_dim(_spaces_of(info)[0], info.obs_keys)


def action_bounds(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 arrays of the evaluation env's Box action space."""
    space = _spaces_of(info)[1]
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"offbench supports continuous (Box) action spaces only, got {space}")
    return space.low.astype(np.float32), space.high.astype(np.float32)
