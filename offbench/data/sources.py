"""Read D4RL HDF5 files and Minari datasets into `Transitions`.

Both sources end in the same contract (offbench/batch.py): D4RL's q-learning conversion, episode
ids, time steps and episode returns. Files that are not on disk are downloaded when the host
answers within a few seconds; otherwise the error says which file to put where.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from offbench.batch import Transitions
from offbench.data.catalog import DatasetInfo, maze_goal_xy, open_hdf5
from offbench.errors import MissingFileError, UserError

D4RL_LOCOMOTION_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
D4RL_ANTMAZE_V0_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/ant_maze_new/"
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
ANTMAZE_GOAL_RADIUS = 0.5  # D4RL's goal test for AntMaze rewards and terminals (gymnasium-robotics uses 0.45)
REACH_TIMEOUT_S = 3.0  # the reachability check never waits longer than this


# --------------------------------------------------------------------------- D4RL conversion


def _episode_layout(boundary: np.ndarray, rew: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Episode ids, steps and episode returns for rows in time order, where `boundary[i]` marks the
    last row of an episode."""
    episode = np.r_[0, np.cumsum(boundary[:-1])].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    step = np.arange(len(episode), dtype=np.int64) - starts[episode]
    episode_return = np.bincount(episode, weights=rew)[episode].astype(np.float32)
    return episode, step, episode_return


def transitions_from_d4rl(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminals: np.ndarray,
    timeouts: np.ndarray,
) -> Transitions:
    """D4RL's `qlearning_dataset` rule, vectorised.

    Row i gives the transition (obs[i], act[i], rew[i], obs[i+1], terminals[i]) for i < N-1:
    - a row with `timeouts[i]` is dropped (its next row starts another episode), also when it is
      terminal too, as D4RL does;
    - the last row of the file is dropped (it has no next row), also when it is terminal;
    - `done` is `terminals` (termination only; a timeout is never a `done`).
    A new episode starts after every terminal or timeout row. `step` counts the kept transitions
    within their episode, and `episode_return` sums the rewards of the episode's *kept* transitions
    (a dropped timeout row's reward is not in it): the return of the data the algorithm sees.
    """
    obs = np.asarray(observations, dtype=np.float32)
    terminals = np.asarray(terminals).astype(bool)
    timeouts = np.asarray(timeouts).astype(bool)
    n = len(obs)
    lengths = {
        "observations": n, "actions": len(actions), "rewards": len(rewards),
        "terminals": len(terminals), "timeouts": len(timeouts),
    }
    if len(set(lengths.values())) > 1:
        raise UserError(f"arrays have different numbers of rows {lengths}; every array needs one row per step")
    keep = ~timeouts
    keep[-1:] = False  # the last row has no next observation
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        raise UserError(f"no transitions left from {n} rows: every row is a timeout or the last row")
    rew = np.asarray(rewards, dtype=np.float32)[idx]
    # Episode boundaries of the kept rows: a kept row ends its episode when it is terminal or when
    # the raw row after it is a dropped timeout or the end of the file.
    raw_episode = np.r_[0, np.cumsum((terminals | timeouts)[:-1])]
    kept_episode = raw_episode[idx]
    boundary = np.r_[kept_episode[1:] != kept_episode[:-1], True]
    episode, step, episode_return = _episode_layout(boundary, rew)
    return Transitions(
        obs=obs[idx],
        act=np.asarray(actions, dtype=np.float32)[idx],
        rew=rew,
        next_obs=obs[idx + 1],
        done=terminals[idx].astype(np.float32),
        episode=episode,
        step=step,
        episode_return=episode_return,
    )


def _check_finite(name: str, array: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UserError(
            f"{where}: '{name}' has NaN or inf in {len(rows)} row(s) (first at row {rows[0]}); "
            "clean or drop those rows before training on this data"
        )


def read_d4rl_hdf5(path: str | os.PathLike) -> Transitions:
    """Read a D4RL-layout HDF5 file (observations, actions, rewards, terminals, timeouts) after
    checking keys, shapes and finiteness; raise ValueError saying what is wrong and where."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no HDF5 file at {path}")
    with open_hdf5(path) as f:
        missing = [k for k in D4RL_KEYS if k not in f]
        if missing:
            hint = (
                " (D4RL -v0 locomotion files have no 'timeouts': use the -v2 files)" if missing == ["timeouts"] else ""
            )
            raise UserError(
                f"{path}: missing key(s) {missing}; the file has {sorted(f.keys())}. A D4RL-layout file needs "
                f"{list(D4RL_KEYS)}{hint}"
            )
        data = {k: f[k][()] for k in D4RL_KEYS}
    want_ndim = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1}
    for key, ndim in want_ndim.items():
        if data[key].ndim != ndim:
            shape = "(N, dim)" if ndim == 2 else "(N,)"
            raise UserError(f"{path}: '{key}' has shape {data[key].shape}, expected {shape}")
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{path}: keys have different numbers of rows {lengths}; every key needs one row per step")
    if lengths["observations"] == 0:
        raise UserError(f"{path}: the file has no rows (an empty dataset)")
    for key in ("observations", "actions", "rewards"):
        _check_finite(key, data[key], str(path))
    for key in ("terminals", "timeouts"):
        _check_flags(key, data[key], str(path))
    try:
        return transitions_from_d4rl(**data)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e


def _check_flags(name: str, array: np.ndarray, where: str) -> None:
    """terminals and timeouts are flags: 0/1 (or bool), nothing else (a NaN would read as True)."""
    if array.dtype == bool:
        return
    bad = ~np.isin(array, (0, 1))  # NaN is not in it either
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UserError(
            f"{where}: '{name}' must hold 0 or 1, but {len(rows)} row(s) hold other values (first at row {rows[0]}: "
            f"{array[rows[0]].item()!r}); fix those flags before training on this data"
        )


# --------------------------------------------------------------------------- downloads


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether `url`'s host accepts a TCP connection within `timeout` seconds (one try, no retry).

    Runs in a daemon thread so that a slow DNS lookup cannot hold the caller longer than `timeout`.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def download(url: str, dest: Path) -> None:
    """Download `url` to `dest` with a progress bar; atomic (written to `dest.part`, then renamed)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()) as progress:
                task = progress.add_task(f"downloading {dest.name}", total=total)
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        os.replace(part, dest)
    except BaseException as e:
        part.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"downloading {url} to {dest} failed: {e}; download it by hand to that path") from e
        raise


def d4rl_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where D4RL files are looked for: `data_dir`, else $OFFBENCH_D4RL_DIR, else ~/.d4rl/datasets
    (the d4rl package's own cache, so files it downloaded are found)."""
    return Path(data_dir or os.environ.get("OFFBENCH_D4RL_DIR") or Path.home() / ".d4rl" / "datasets")


def d4rl_url(file_name: str) -> str:
    """The published URL of a D4RL file (DATASET_URLS in D4RL's infos.py)."""
    if file_name.startswith("Ant_maze_"):
        return D4RL_ANTMAZE_V0_URL + file_name
    if file_name.endswith("-v2.hdf5"):
        return D4RL_LOCOMOTION_URL + file_name
    raise ValueError(f"no known D4RL URL for file {file_name!r}")


def d4rl_file(file_name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of D4RL file `file_name`, downloaded first if it is missing and D4RL's host answers."""
    path = d4rl_dir(data_dir) / file_name
    if path.is_file():
        return path
    url = d4rl_url(file_name)
    if not reachable(url):
        raise MissingFileError(
            f"D4RL file {file_name} is not in {path.parent} and {urllib.parse.urlsplit(url).hostname} cannot be "
            f"reached. Download {url} on a machine with internet and copy it to {path} "
            "(or set OFFBENCH_D4RL_DIR to the folder that holds it)."
        )
    download(url, path)
    return path


# --------------------------------------------------------------------------- Minari


def minari_root() -> Path:
    """Minari's local dataset root: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def _minari_remote_url() -> str:
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    return "https://storage.googleapis.com" if remote.startswith("gcp://") else "https://huggingface.co"


def _ensure_minari_local(dataset_id: str) -> None:
    if (minari_root() / dataset_id / "data").is_dir():
        return
    where = minari_root() / dataset_id
    url = _minari_remote_url()
    if not reachable(url):
        raise MissingFileError(
            f"Minari dataset {dataset_id} is not at {where} and {url} cannot be reached. On a machine with "
            f'internet run `pip install "minari[hf]"` and `minari download {dataset_id}`, then copy the folder '
            f"to {where} (or set MINARI_DATASETS_PATH to the root that holds it)."
        )
    try:
        import huggingface_hub  # noqa: F401  (minari's hf remote needs it)
    except ImportError as e:
        raise MissingFileError(
            f'Minari dataset {dataset_id} is not at {where}; downloading it needs `pip install "minari[hf]"`'
        ) from e
    import minari

    minari.download_dataset(dataset_id)


def _flatten_minari_obs(obs, obs_keys: tuple[str, ...] | None, dataset_id: str) -> np.ndarray:
    if isinstance(obs, dict):
        if not obs_keys:
            raise UserError(
                f"{dataset_id} has dict observations with keys {sorted(obs)}: pass obs_keys, the keys to "
                "concatenate in order (AntMaze: ('achieved_goal', 'observation'))"
            )
        missing = [k for k in obs_keys if k not in obs]
        if missing:
            raise UserError(f"{dataset_id}: obs_keys {missing} not in its observation keys {sorted(obs)}")
        return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(len(obs[k]), -1) for k in obs_keys], axis=1)
    if obs_keys:
        raise UserError(f"{dataset_id} has array observations; obs_keys {obs_keys} only apply to dict observations")
    obs = np.asarray(obs, dtype=np.float32)
    return obs.reshape(len(obs), -1)


def read_minari(
    dataset_id: str, obs_keys: tuple[str, ...] | None = None, goal_xy: tuple[float, float] | None = None
) -> Transitions:
    """Read Minari dataset `dataset_id` (downloaded first if missing and the remote answers).

    Each Minari episode stores T+1 observations (the final one included) and T actions/rewards, so
    every step becomes a transition with next_obs = obs[t+1]: unlike D4RL's layout, truncated
    episodes keep all T transitions. `done` = terminations. Dict observations are concatenated in
    `obs_keys` order (not gymnasium's `spaces.flatten`, which sorts keys and keeps desired_goal).

    `goal_xy` (AntMaze): rewards and `done` are relabelled to reaching the evaluation goal, as D4RL's
    data has them: D4RL's AntMaze files set the sparse reward and `terminals` both to
    ||next_xy - goal|| <= 0.5 for the single evaluation goal (D4RL
    scripts/generation/relabel_antmaze_rewards.py; D4RL issue #199), and qlearning_dataset turns
    those terminals into `done`. Minari collected AntMaze with continuing_task=True, so its
    `terminations` are all False, and its rewards and info["success"] refer to each episode's own
    goal, which is random per episode except in umaze (minari-dataset-generation-scripts
    scripts/antmaze; Minari issue #296): without relabelling, a policy would be trained towards other
    goals than the one it is scored on. next_xy is the next observation's achieved_goal, so `obs_keys`
    must start with "achieved_goal". As with the D4RL files, a new episode starts after every `done`.
    """
    _ensure_minari_local(dataset_id)
    import minari

    dataset = minari.load_dataset(dataset_id)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "next_obs", "act", "rew", "done", "boundary")}
    for ep in dataset.iterate_episodes():
        t = len(ep.rewards)
        obs = _flatten_minari_obs(ep.observations, obs_keys, dataset_id)
        if len(obs) != t + 1:
            raise UserError(
                f"{dataset_id} episode {ep.id}: {len(obs)} observations for {t} steps; Minari episodes need "
                "T+1 observations (a known defect of some old datasets: use a newer version)"
            )
        done = np.asarray(ep.terminations, dtype=bool).copy()
        rew = np.asarray(ep.rewards, dtype=np.float32)
        if goal_xy is not None:
            if not obs_keys or obs_keys[0] != "achieved_goal":
                raise UserError(f"{dataset_id}: relabelling to goal_xy needs obs_keys starting with 'achieved_goal'")
            done = np.linalg.norm(obs[1:, :2] - np.asarray(goal_xy, dtype=np.float32), axis=1) <= ANTMAZE_GOAL_RADIUS
            rew = done.astype(np.float32)
        boundary = done.copy()
        boundary[-1] = True  # a Minari episode always ends its last transition's episode
        parts["obs"].append(obs[:-1])
        parts["next_obs"].append(obs[1:])
        parts["act"].append(np.asarray(ep.actions, dtype=np.float32).reshape(t, -1))
        parts["rew"].append(rew)
        parts["done"].append(done)
        parts["boundary"].append(boundary)
    if not parts["rew"]:
        raise UserError(f"Minari dataset {dataset_id} has no episodes")
    data = {k: np.concatenate(v) for k, v in parts.items()}
    for key in ("obs", "act", "rew"):
        _check_finite(key, data[key], f"Minari dataset {dataset_id}")
    episode, step, episode_return = _episode_layout(data["boundary"], data["rew"])
    return Transitions(
        obs=data["obs"], act=data["act"], rew=data["rew"], next_obs=data["next_obs"],
        done=data["done"].astype(np.float32), episode=episode, step=step, episode_return=episode_return,
    )


# --------------------------------------------------------------------------- dispatch


def local_path(info: DatasetInfo) -> Path | None:
    """Where `info`'s data is on this machine, or None when it is not there (nothing is fetched)."""
    if info.source == "d4rl":
        path = d4rl_dir() / info.location
    elif info.source == "minari":
        path = minari_root() / info.location
    elif info.source == "synthetic":
        from offbench.data.synthetic import synthetic_dir

        path = synthetic_dir() / f"{info.location}.hdf5"
    else:
        path = Path(info.location)
    return path if path.exists() else None


def load_transitions(info: DatasetInfo) -> Transitions:
    """The transitions of dataset `info`, fetched or generated first when needed."""
    if info.source == "d4rl":
        if info.location.startswith("Ant_maze_"):
            raise NotImplementedError(
                f"{info.name}: the original D4RL AntMaze files use D4RL's own world frame (origin at the start "
                "cell) while the gymnasium-robotics evaluation env centres the maze, and no coordinate transform "
                "has been verified. Use the Minari regeneration instead: "
                f"D4RL/antmaze/{_minari_antmaze_name(info.name)}-v1"
            )
        return read_d4rl_hdf5(d4rl_file(info.location))
    if info.source == "minari":
        goal = maze_goal_xy(info.env_kwargs["maze_map"]) if info.success_scored else None
        return read_minari(info.location, info.obs_keys, goal_xy=goal)
    if info.source == "hdf5":
        return read_d4rl_hdf5(info.location)
    if info.source == "synthetic":
        from offbench.data.synthetic import ensure_synthetic

        return read_d4rl_hdf5(ensure_synthetic(info.location))
    raise ValueError(f"unknown source {info.source!r} for dataset {info.name!r}")


def _minari_antmaze_name(d4rl_name: str) -> str:
    """antmaze-medium-play-v0 -> medium-play."""
    return d4rl_name.removeprefix("antmaze-").rsplit("-v", 1)[0]

