"""Phase 3 of the forge: whole episodes of a policy (`rollout`), and the five datasets' episodes
(`collect_episodes`): random, medium and expert rollouts, medium-replay from the SAC run's buffer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from offbench.data.synthetic import Episode
from offbench.evaluation import isolated_rng
from offbench.forge.config import ForgeConfig, dataset_seeds
from offbench.forge.envs import ActionScale, _actor_policy, _make_env, _random_policy
from offbench.forge.progress import _Progress
from offbench.forge.sac import _replay_episodes
from offbench.forge.selection import Selection


def rollout(
    make_env: Callable[[], gym.Env],
    policy: Callable[[np.ndarray], np.ndarray],
    min_steps: int,
    num_envs: int,
    rng: np.random.Generator,
    on_episode: Callable[[Episode, int], None] | None = None,
) -> list[Episode]:
    """Whole episodes of `policy` until at least `min_steps` steps, in the order they were started.

    `num_envs` envs step together (one policy call per step for all running episodes); a free env
    starts a new episode while the steps of finished and running episodes are below `min_steps`.
    Episode k is reset with the k-th seed drawn from `rng`: deterministic given `rng` and `num_envs`.
    """
    envs = [make_env() for _ in range(num_envs)]
    running: list[Episode | None] = [None] * num_envs
    number = [0] * num_envs
    done: dict[int, Episode] = {}
    steps = started = 0
    try:
        while True:
            for i in range(num_envs):
                if running[i] is None and steps < min_steps:
                    obs, _ = envs[i].reset(seed=int(rng.integers(2**31 - 1)))
                    running[i], number[i] = Episode([obs]), started
                    started += 1
            active = [i for i in range(num_envs) if running[i] is not None]
            if not active:
                break
            actions = policy(np.stack([running[i].observations[-1] for i in active]))
            for action, i in zip(actions, active):
                obs, reward, terminated, truncated, _ = envs[i].step(action)
                running[i].add(obs, action, reward, terminated, truncated)
                steps += 1
                if terminated or truncated:
                    done[number[i]] = running[i]
                    if on_episode is not None:
                        on_episode(running[i], steps)
                    running[i] = None
    finally:
        for env in envs:
            env.close()
    return [done[k] for k in sorted(done)]


def collect_episodes(
    config: ForgeConfig, state: dict[str, Any], chosen: Selection, env: gym.Env, bar: _Progress
) -> dict[str, list[Episode]]:
    """Phase 3: the episodes of the five datasets: rollouts of the random, medium and expert policies
    (sampled actions), the SAC run's buffer up to the medium checkpoint, medium then expert."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    scale = ActionScale(env.action_space)
    seeds = dataset_seeds(config)
    policies = {
        "random": lambda rng: _random_policy(env.action_space, rng),
        "medium": lambda rng: _actor_policy(chosen.medium_actor, scale, config.device),
        "expert": lambda rng: _actor_policy(chosen.expert_actor, scale, config.device),
    }
    episodes: dict[str, list[Episode]] = {}
    for kind in ("random", "medium", "expert"):
        rng = np.random.default_rng(seeds[kind])
        task = bar.task(kind, config.dataset_steps)
        returns: list[float] = []

        def report(ep: Episode, steps: int, task=task, returns=returns) -> None:
            returns.append(ep.ret)
            bar.update(task, min(steps, config.dataset_steps), f"{len(returns)} episodes, mean return {np.mean(returns):.1f}")

        with isolated_rng(int(rng.integers(2**31 - 1))):
            episodes[kind] = rollout(lambda: _make_env(config), policies[kind](rng), config.dataset_steps,
                                     config.num_envs, rng, report)
    episodes["medium-replay"] = _replay_episodes(
        state, chosen.medium["env_steps"], obs_dim, act_dim, env.observation_space.dtype
    )
    episodes["medium-expert"] = episodes["medium"] + episodes["expert"]
    return episodes
