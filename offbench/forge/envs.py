"""The forge's envs and policies: the env a config names (checked: flat Box spaces, an episode limit),
actions scaled between [-1, 1] and the env's bounds, sampled-actor and uniform random policies."""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from offbench.data.catalog import DatasetInfo, forge_name
from offbench.errors import UserError
from offbench.forge.config import ForgeConfig
from offbench.sac import TanhGaussianActor


def _make_env(config: ForgeConfig) -> gym.Env:
    env = gym.make(config.env_id, max_episode_steps=config.max_episode_steps)
    if env.spec is None or env.spec.max_episode_steps is None:
        raise UserError(f"{config.env_id} has no episode limit: pass max_episode_steps")
    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        raise UserError(
            f"the forge needs Box observation and action spaces; {config.env_id} has {env.observation_space} and "
            f"{env.action_space}"
        )
    if len(env.observation_space.shape) != 1 or not np.all(np.isfinite(env.action_space.low)):
        raise UserError(f"the forge needs flat observations and bounded actions; {config.env_id} has neither or one")
    return env


class ActionScale:
    """[-1, 1] <-> the env's action bounds, affinely (the actor works in [-1, 1])."""

    def __init__(self, space: gym.spaces.Box) -> None:
        self.low, self.high, self.dtype = space.low.astype(np.float32), space.high.astype(np.float32), space.dtype
        self.center, self.half = (self.high + self.low) / 2, (self.high - self.low) / 2

    def to_env(self, u: np.ndarray) -> np.ndarray:
        return np.clip(self.center + self.half * u, self.low, self.high).astype(self.dtype)

    def to_unit(self, a: np.ndarray) -> np.ndarray:
        return ((a - self.center) / self.half).astype(np.float32)


def _actor_policy(actor: TanhGaussianActor, scale: ActionScale, device) -> Callable[[np.ndarray], np.ndarray]:
    """Sampled actions in env units for a batch of observations (the global torch RNG draws the noise)."""

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        u, _ = actor(torch.as_tensor(np.asarray(obs, np.float32), device=device))
        return scale.to_env(u.cpu().numpy())

    return policy


def _random_policy(space: gym.spaces.Box, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    def policy(obs: np.ndarray) -> np.ndarray:
        return rng.uniform(space.low, space.high, size=(len(obs), *space.shape)).astype(space.dtype)

    return policy


def _torch_policy(policy: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensor], Tensor]:
    """An env-units numpy policy as `evaluate` wants it: tensor in, tensor out."""
    return lambda obs: torch.as_tensor(policy(obs.cpu().numpy()))


def _eval_info(config: ForgeConfig, limit: int) -> DatasetInfo:
    # Scores are not used during forging (only returns): placeholder references 0 and 1.
    return DatasetInfo(forge_name(config.env_id, "medium"), "hdf5", "", config.env_id, 0.0, 1.0, limit)
