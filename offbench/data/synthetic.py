"""Small datasets made by the suite itself: random-policy rollouts in a real gymnasium env, written
in the D4RL HDF5 layout (and, if asked, as a Minari dataset with the same episodes).

They make tests and offline demos possible where D4RL and Minari cannot be downloaded. The
`synthetic/*` catalog names are generated on first use from the recipes below.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

from offbench.scores import REF_SCORES


@dataclass(frozen=True)
class Recipe:
    """How one `synthetic/<name>` dataset is made and scored."""

    env_id: str
    episodes: int
    max_episode_steps: int
    ref_min: float
    ref_max: float
    seed: int = 0
    note: str = ""


# Locomotion recipes are scored with D4RL's family references. The Pendulum and InvertedPendulum
# ref_min values were measured with `write_random_dataset` (seed 0, 100 episodes: -1233.66 +- 298.4
# and 5.35 +- 4.0): the mean return of the uniform random policy, as D4RL defines ref_min.
RECIPES: dict[str, Recipe] = {
    "hopper-random-v0": Recipe("Hopper-v4", 500, 1000, *REF_SCORES["hopper"]),
    "halfcheetah-random-v0": Recipe("HalfCheetah-v4", 10, 1000, *REF_SCORES["halfcheetah"]),
    "walker2d-random-v0": Recipe("Walker2d-v4", 500, 1000, *REF_SCORES["walker2d"]),
    # Pendulum's reward -(theta^2 + 0.1 theta_dot^2 + 0.001 u^2) is at most 0, so ref_max = 0 is the
    # unreachable ideal (upright and still from the first step); good swing-up policies get about
    # -150, i.e. a normalized score near 88.
    "pendulum-random-v0": Recipe(
        "Pendulum-v1", 50, 200, ref_min=-1233.66, ref_max=0.0,
        note="ref_max is the reward's upper bound (0), not an expert's return",
    ),
    # +1 per step while the pole is up, 1000 steps at most: ref_max = 1000 is the best possible return.
    "invertedpendulum-random-v0": Recipe(
        "InvertedPendulum-v5", 1000, 1000, ref_min=5.35, ref_max=1000.0,
        note="ref_max is the best possible return (1000 steps balanced)",
    ),
}


def synthetic_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where generated datasets live: `data_dir`, else $OFFBENCH_DATA_DIR, else ~/.offbench/datasets."""
    root = data_dir or os.environ.get("OFFBENCH_DATA_DIR") or Path.home() / ".offbench" / "datasets"
    return Path(root) / "synthetic"


def ensure_synthetic(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The HDF5 file of recipe `name`, generated (deterministically) the first time it is asked for."""
    if name not in RECIPES:
        raise ValueError(f"no synthetic recipe {name!r}; known: {sorted(RECIPES)}")
    path = synthetic_dir(data_dir) / f"{name}.hdf5"
    if not path.exists():
        r = RECIPES[name]
        n = write_random_dataset(
            r.env_id, path, r.episodes, r.seed,
            max_episode_steps=r.max_episode_steps, ref_min=r.ref_min, ref_max=r.ref_max,
        )
        print(f"offbench: generated synthetic/{name} ({n} random-policy steps in {r.env_id}): {path}", file=sys.stderr)
    return path


def _flat(obs: np.ndarray | dict[str, np.ndarray], obs_keys: tuple[str, ...] | None) -> np.ndarray:
    if isinstance(obs, dict):
        if not obs_keys:
            raise ValueError(
                f"the env returns dict observations (keys {sorted(obs)}): pass obs_keys, "
                "e.g. ('achieved_goal', 'observation')"
            )
        return np.concatenate([np.asarray(obs[k], dtype=np.float32).ravel() for k in obs_keys])
    return np.asarray(obs, dtype=np.float32)


def write_random_dataset(
    env_id: str,
    out_hdf5: str | os.PathLike,
    episodes: int,
    seed: int,
    minari_id: str | None = None,
    *,
    max_episode_steps: int | None = None,
    ref_min: float | None = None,
    ref_max: float | None = None,
    obs_keys: tuple[str, ...] | None = None,
    env_kwargs: dict | None = None,
) -> int:
    """Roll out a uniform random policy for `episodes` episodes and write them in the D4RL layout.

    HDF5 keys: observations, actions, rewards, terminals (termination), timeouts (truncation by the
    time limit); attributes env_id, max_episode_steps and, when given, ref_min/ref_max, so the file
    can be loaded by path alone. D4RL's layout has no final observation, so the last transition of
    a truncated episode is lost on loading (D4RL's rule); the Minari copy (`minari_id`, written
    under $MINARI_DATASETS_PATH) keeps it. Dict observations are flattened by `obs_keys` in the
    HDF5 file and kept as dicts in Minari; an env's `info["success"]` is kept in Minari's infos.
    Deterministic given `seed`. Returns the number of steps written.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    _register_robotics_if_needed(env_id)
    env = gym.make(env_id, max_episode_steps=max_episode_steps, **(env_kwargs or {}))
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if limit is None:
        raise ValueError(f"{env_id} has no episode limit: pass max_episode_steps")
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"random datasets need a continuous (Box) action space; {env_id} has {space}")
    rng = np.random.default_rng(seed)

    rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    buffers = []
    for ep in range(episodes):
        # Seed the env once; later resets continue its generator, so the whole run follows `seed`.
        obs, info = env.reset(seed=seed if ep == 0 else None)
        ep_obs, ep_act, ep_rew, ep_term, ep_trunc, ep_success = [obs], [], [], [], [], [info.get("success")]
        done = False
        while not done:
            action = rng.uniform(space.low, space.high).astype(space.dtype)
            obs, reward, terminated, truncated, info = env.step(action)
            ep_act.append(action)
            ep_rew.append(float(reward))
            ep_term.append(bool(terminated))
            ep_trunc.append(bool(truncated))
            ep_obs.append(obs)
            ep_success.append(info.get("success"))
            done = terminated or truncated
        rows["observations"] += [_flat(o, obs_keys) for o in ep_obs[:-1]]
        rows["actions"] += ep_act
        rows["rewards"] += ep_rew
        rows["terminals"] += ep_term
        rows["timeouts"] += ep_trunc
        if minari_id is not None:
            buffers.append(_episode_buffer(ep, ep_obs, ep_act, ep_rew, ep_term, ep_trunc, ep_success))

    out = Path(out_hdf5)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    with h5py.File(part, "w") as f:
        f["observations"] = np.asarray(rows["observations"], dtype=np.float32)
        f["actions"] = np.asarray(rows["actions"], dtype=np.float32)
        f["rewards"] = np.asarray(rows["rewards"], dtype=np.float32)
        f["terminals"] = np.asarray(rows["terminals"], dtype=bool)
        f["timeouts"] = np.asarray(rows["timeouts"], dtype=bool)
        f.attrs["env_id"] = env_id
        f.attrs["max_episode_steps"] = int(limit)
        if ref_min is not None and ref_max is not None:
            f.attrs["ref_min"] = float(ref_min)
            f.attrs["ref_max"] = float(ref_max)
        f.attrs["generator"] = f"offbench.data.synthetic.write_random_dataset(seed={seed}, episodes={episodes})"
    os.replace(part, out)  # atomic: a reader never sees a half-written file

    if minari_id is not None:
        import minari

        minari.create_dataset_from_buffers(
            minari_id, buffer=buffers, env=env, eval_env=env.spec,
            algorithm_name="uniform random policy", author="offbench", author_email="offbench@localhost",
            code_permalink="offbench/data/synthetic.py", description=f"{episodes} random-policy episodes in {env_id}",
        )
    env.close()
    return len(rows["rewards"])


def _episode_buffer(ep, obs, act, rew, term, trunc, success):
    from minari.data_collector import EpisodeBuffer

    if isinstance(obs[0], dict):
        observations = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    else:
        observations = np.stack(obs)
    infos = {"success": np.asarray(success, dtype=bool)} if success[0] is not None else None
    return EpisodeBuffer(
        id=ep, observations=observations, actions=np.stack(act), rewards=np.asarray(rew),
        terminations=np.asarray(term), truncations=np.asarray(trunc), infos=infos,
    )


def _register_robotics_if_needed(env_id: str) -> None:
    """gymnasium-robotics ids (AntMaze) exist only after its envs are registered."""
    if env_id not in gym.registry:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
