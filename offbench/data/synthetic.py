"""Small datasets made by the suite itself: random-policy rollouts in a real gymnasium env, written
in the D4RL HDF5 layout (and, if asked, as a Minari dataset with the same episodes).

They make tests and offline demos possible where D4RL and Minari cannot be downloaded. The
`synthetic/*` catalog names are generated on first use from the recipes below. The writers at the
end (`Episode`, `write_d4rl_hdf5`, `write_minari_dataset`) are shared with the dataset forge
(offbench/forge.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

from offbench.errors import UserError
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


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Root of the datasets the suite makes: `data_dir`, else $OFFBENCH_DATA_DIR, else ~/.offbench/datasets."""
    return Path(data_dir or os.environ.get("OFFBENCH_DATA_DIR") or Path.home() / ".offbench" / "datasets")


def synthetic_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where generated datasets live: `data_root(data_dir)/synthetic`."""
    return data_root(data_dir) / "synthetic"


def ensure_synthetic(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The HDF5 file of recipe `name`, generated (deterministically) the first time it is asked for."""
    if name not in RECIPES:
        raise UserError(f"no synthetic recipe {name!r}; known: {sorted(RECIPES)}")
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
            raise UserError(
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
        raise UserError(f"episodes must be at least 1, got {episodes}")
    _register_robotics_if_needed(env_id)
    env = gym.make(env_id, max_episode_steps=max_episode_steps, **(env_kwargs or {}))
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if limit is None:
        raise UserError(f"{env_id} has no episode limit: pass max_episode_steps")
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise UserError(f"random datasets need a continuous (Box) action space; {env_id} has {space}")
    rng = np.random.default_rng(seed)

    collected = []
    for ep in range(episodes):
        # Seed the env once; later resets continue its generator, so the whole run follows `seed`.
        obs, info = env.reset(seed=seed if ep == 0 else None)
        episode = Episode([obs], [], [], [], [], [info.get("success")])
        done = False
        while not done:
            action = rng.uniform(space.low, space.high).astype(space.dtype)
            obs, reward, terminated, truncated, info = env.step(action)
            episode.add(obs, action, reward, terminated, truncated, info.get("success"))
            done = terminated or truncated
        collected.append(episode)

    n = write_d4rl_hdf5(
        out_hdf5, collected, env_id=env_id, max_episode_steps=int(limit), ref_min=ref_min, ref_max=ref_max,
        obs_keys=obs_keys,
        attrs={"generator": f"offbench.data.synthetic.write_random_dataset(seed={seed}, episodes={episodes})"},
    )
    if minari_id is not None:
        write_minari_dataset(
            minari_id, collected, env, algorithm_name="uniform random policy",
            code_permalink="offbench/data/synthetic.py", description=f"{episodes} random-policy episodes in {env_id}",
        )
    env.close()
    return n


# --------------------------------------------------------------------------- writing (shared with the forge)


@dataclass
class Episode:
    """One episode as collected: T+1 observations (the final one included; arrays or dicts of arrays),
    T actions, rewards, terminations and truncations, and T+1 `info["success"]` values (None when
    the env reports none)."""

    observations: list
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    terminations: list = field(default_factory=list)
    truncations: list = field(default_factory=list)
    success: list | None = None

    def add(self, obs, action, reward, terminated, truncated, success=None) -> None:
        """Append one step: the action taken, what it gave, and the observation it led to."""
        self.observations.append(obs)
        self.actions.append(action)
        self.rewards.append(float(reward))
        self.terminations.append(bool(terminated))
        self.truncations.append(bool(truncated))
        if self.success is not None:
            self.success.append(success)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ret(self) -> float:
        """Undiscounted return."""
        return float(np.sum(self.rewards))


def write_d4rl_hdf5(
    path: str | os.PathLike,
    episodes: list[Episode],
    *,
    env_id: str,
    max_episode_steps: int,
    ref_min: float | None = None,
    ref_max: float | None = None,
    obs_keys: tuple[str, ...] | None = None,
    attrs: dict | None = None,
) -> int:
    """Write `episodes` in D4RL's HDF5 layout, atomically (to `path.part`, then renamed): a reader
    never sees a half-written file. Attributes: env_id, max_episode_steps, ref_min/ref_max when both
    are given, then `attrs`. Returns the number of rows (steps) written."""
    rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for ep in episodes:
        rows["observations"] += [_flat(o, obs_keys) for o in ep.observations[:-1]]
        rows["actions"] += ep.actions
        rows["rewards"] += ep.rewards
        rows["terminals"] += ep.terminations
        rows["timeouts"] += ep.truncations
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    with h5py.File(part, "w") as f:
        f["observations"] = np.asarray(rows["observations"], dtype=np.float32)
        f["actions"] = np.asarray(rows["actions"], dtype=np.float32)
        f["rewards"] = np.asarray(rows["rewards"], dtype=np.float32)
        f["terminals"] = np.asarray(rows["terminals"], dtype=bool)
        f["timeouts"] = np.asarray(rows["timeouts"], dtype=bool)
        f.attrs["env_id"] = env_id
        f.attrs["max_episode_steps"] = int(max_episode_steps)
        if ref_min is not None and ref_max is not None:
            f.attrs["ref_min"] = float(ref_min)
            f.attrs["ref_max"] = float(ref_max)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    os.replace(part, out)  # atomic: a reader never sees a half-written file
    return len(rows["rewards"])


def write_minari_dataset(
    minari_id: str,
    episodes: list[Episode],
    env: gym.Env,
    *,
    algorithm_name: str,
    description: str,
    code_permalink: str,
    ref_min: float | None = None,
    ref_max: float | None = None,
    ref_episodes: int | None = None,
    overwrite: bool = False,
    root: Path | None = None,
) -> Path:
    """Write `episodes` as Minari dataset `minari_id` under `root` (default $MINARI_DATASETS_PATH, else
    ~/.minari/datasets).

    Minari writes into its final folder step by step, so the dataset is built under a staging root
    next to the datasets root and then renamed into place: an interrupted write never leaves a
    half-written dataset under `minari_id`. An existing dataset is replaced only with `overwrite`
    (Minari itself refuses). `ref_min`/`ref_max` (with the `ref_episodes` they were measured over)
    are stored as Minari's reference scores. Returns the dataset's folder.
    """
    import shutil
    import uuid

    import minari

    root = Path(root) if root is not None else minari_datasets_root()
    final = root / minari_id
    if final.exists() and not overwrite:
        raise UserError(
            f"A Minari dataset with ID {minari_id} already exists and it cannot be overridden. Please use a "
            "different dataset name or version."
        )
    stage_root = Path(f"{root}.staging") / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    refs = {}
    if ref_min is not None and ref_max is not None:
        refs = dict(ref_min_score=float(ref_min), ref_max_score=float(ref_max))
        if ref_episodes is not None:
            refs["num_episodes_average_score"] = int(ref_episodes)
    buffers = [_episode_buffer(i, ep) for i, ep in enumerate(episodes)]
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(stage_root)
    try:
        minari.create_dataset_from_buffers(
            minari_id, buffer=buffers, env=env, eval_env=env.spec, algorithm_name=algorithm_name,
            author="offbench", author_email="offbench@localhost", code_permalink=code_permalink,
            description=description, **refs,
        )
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        old = final.with_name(f"{final.name}.old-{stage_root.name}")
        if final.exists():
            os.replace(final, old)
        os.replace(stage_root / minari_id, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
        with contextlib.suppress(OSError):
            stage_root.parent.rmdir()  # only when no other write is staging there
    return final


def minari_datasets_root() -> Path:
    """Minari's local root, as Minari finds it: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def _episode_buffer(ep_id: int, ep: Episode):
    from minari.data_collector import EpisodeBuffer

    obs = ep.observations
    if isinstance(obs[0], dict):
        observations = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    else:
        observations = np.stack(obs)
    has_success = ep.success is not None and ep.success[0] is not None
    infos = {"success": np.asarray(ep.success, dtype=bool)} if has_success else None
    return EpisodeBuffer(
        id=ep_id, observations=observations, actions=np.stack(ep.actions), rewards=np.asarray(ep.rewards),
        terminations=np.asarray(ep.terminations), truncations=np.asarray(ep.truncations), infos=infos,
    )


def _register_robotics_if_needed(env_id: str) -> None:
    """gymnasium-robotics ids (AntMaze) exist only after its envs are registered."""
    if env_id not in gym.registry:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
