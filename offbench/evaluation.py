"""Policy evaluation: seeded vectorised rollouts, D4RL normalized scores, and the EvalCallback
that evaluates once per Lightning epoch (= one evaluation interval) and writes `result.json`.

Protocol, in short: episode k of an evaluation is reset with seed `seed + k`, so the same policy
gives the same numbers whatever the number of parallel envs; every env slot runs exactly one
episode per round and ended slots are masked (an auto-reset episode is never counted, so short
episodes are not over-represented). Scores: `last` (final evaluation), `best` (max over
evaluations: online model selection, optimistic) and `final_mean` (mean of the last K).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import yaml
from gymnasium.vector import VectorEnv
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

import offbench
from offbench.data.catalog import DatasetInfo
from offbench.envs import flatten_obs, make_vector_env
from offbench.errors import UserError
from offbench.files import write_json_atomic
from offbench.scores import normalized_score

Policy = Callable[[Tensor], Tensor]


def evaluate(
    policy: Policy,
    info: DatasetInfo,
    episodes: int,
    num_envs: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    asynchronous: bool = False,
    envs: VectorEnv | None = None,
    clip_actions: bool = False,
    name: str = "the policy",
) -> dict[str, Any]:
    """Run exactly `episodes` episodes of `policy` in the dataset's eval env and score them.

    `policy` maps a float32 (n, obs_dim) tensor on `device` to (n, act_dim) actions; it is called
    once per env step for all running episodes together, under `torch.no_grad()`. Episodes run in
    rounds of at most `num_envs`; episode k is reset with seed `seed + k`. Pass `envs` (a vector
    env from `make_vector_env(info, ...)`) to reuse envs across calls; it is left open.
    An action outside the env's bounds (beyond a round-off tolerance, ACTION_TOLERANCE) is a
    UserError naming `name`, unless `clip_actions` (a policy defined as clipped): see `_to_actions`.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    own_envs = envs is None
    if own_envs:
        envs = make_vector_env(info, min(num_envs, episodes), asynchronous)
    n = envs.num_envs
    space = envs.single_action_space
    # Ended slots keep stepping until their round ends (NEXT_STEP autoreset starts a throwaway
    # episode there); they get this in-bounds filler action and are masked from all counts.
    filler = np.broadcast_to(np.clip(0.0, space.low, space.high), (n, *space.shape)).astype(space.dtype)
    goal_ends_episode = info.success_scored and info.env_kwargs.get("continuing_task") is False

    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    successes = np.zeros(episodes, dtype=bool)
    vector_steps = 0
    start_time = time.perf_counter()
    try:
        with torch.no_grad():
            for first in range(0, episodes, n):
                k = min(n, episodes - first)  # episodes in this round; slots >= k idle
                seeds: list[int | None] = [seed + first + j for j in range(k)] + [None] * (n - k)
                obs, _ = envs.reset(seed=seeds)
                active = np.arange(n) < k
                ret = np.zeros(n)
                length = np.zeros(n, dtype=np.int64)
                success = np.zeros(n, dtype=bool)
                while active.any():
                    flat = flatten_obs(obs, info.obs_keys)
                    actions = filler.copy()
                    actions[active] = _to_actions(
                        policy(torch.as_tensor(flat[active], device=device)), space, clip_actions, name
                    )
                    obs, reward, terminated, truncated, step_info = envs.step(actions)
                    vector_steps += 1
                    ret += np.where(active, reward, 0.0)
                    length += active
                    if info.success_scored:
                        reached = np.asarray(step_info.get("success", np.zeros(n, dtype=bool)), dtype=bool)
                        if goal_ends_episode:
                            reached = reached | terminated
                        success |= active & reached
                    active &= ~(terminated | truncated)
                returns[first : first + k] = ret[:k]
                lengths[first : first + k] = length[:k]
                successes[first : first + k] = success[:k]
    finally:
        if own_envs:
            envs.close()

    # AntMaze: an episode scores 1 when the goal was reached (D4RL), whatever the reward sum.
    scored = successes.astype(np.float64) if info.success_scored else returns
    scores = np.array([normalized_score(float(x), info.ref_min, info.ref_max) for x in scored])
    return {
        "score": float(scores.mean()),
        "score_std": float(scores.std()),  # over the episodes of this evaluation (ddof=0)
        "scores": scores.tolist(),
        "return": float(returns.mean()),
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "successes": successes.tolist() if info.success_scored else None,
        "episodes": episodes,
        "env_steps": int(lengths.sum()),  # counted steps; idle/ended slots not included
        "vector_steps": vector_steps,  # policy calls
        "seconds": time.perf_counter() - start_time,
    }


# The evaluation's columns of metrics.csv (`eval/<key>`, besides `updates`): the scalars of a history entry.
EVAL_COLUMNS = ("score", "return", "score_std", "seconds")

# Actions may exceed the env's bounds by this much relative to the bound (float round-off, e.g. a
# float32 `max_action * tanh(x)`) and are then clipped; anything further out is a bug of the policy.
ACTION_TOLERANCE = 1e-5


def _to_actions(actions: Tensor, space: Any, clip: bool = False, name: str = "the policy") -> np.ndarray:
    """Policy output -> numpy actions, checked, clipped to the bounds (MuJoCo envs do not clip).
    An action further out than ACTION_TOLERANCE (relative to the bound) is a UserError naming `name`
    and the action of largest magnitude, unless `clip`: a silent clip would hide an author's bug."""
    array = torch.as_tensor(actions).detach().to("cpu", torch.float64).numpy()
    if array.ndim != 2 or array.shape[1:] != space.shape:
        raise ValueError(
            f"policy returned actions of shape {tuple(array.shape)}, expected (n, {space.shape[0]}); "
            "act(obs) must map (n, obs_dim) observations to (n, act_dim) actions"
        )
    if not np.isfinite(array).all():
        raise ValueError("policy returned non-finite actions (NaN/inf): training has likely diverged")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    slack = ACTION_TOLERANCE * np.maximum(np.abs(low), np.abs(high))
    outside = (array < low - slack) | (array > high + slack)
    if outside.any() and not clip:
        row, dim = np.unravel_index(np.argmax(np.where(outside, np.abs(array), -np.inf)), array.shape)
        raise UserError(
            f"{name} returned actions outside the env's action bounds: {array[row, dim]:.6g} in action dimension "
            f"{dim}, bounds [{low[dim]:.6g}, {high[dim]:.6g}]; bound them in act() (e.g. max_action * tanh(.), or a "
            "clamp), or pass --eval.clip_actions true if the policy is defined as clipped"
        )
    return np.clip(array, space.low, space.high).astype(space.dtype)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU and all CUDA devices), numpy and `random` from `seed` inside the block and
    restore their previous states after it: evaluation is deterministic, and training draws the
    same random numbers whether or not (or how often) it evaluates."""
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class EvalCallback(Callback):
    """The evaluation (--eval.*): the policy's act() rolled out after every evaluation interval.

    Evaluates `pl_module.act` at the end of every training epoch (one evaluation interval), logs
    `eval/*`, keeps the history (saved in checkpoints) and writes `result.json` at fit end.

    Args:
        episodes: episodes per evaluation; None takes the dataset's protocol (`info.eval_episodes`).
        num_envs: parallel envs (episodes run in rounds of at most this many).
        asynchronous: one subprocess per env (for slow envs) instead of stepping in-process.
        final_mean_k: the "final_mean" score averages the last K evaluations.
        seed: episode k of every evaluation is reset with `seed + k`; kept apart from training seeds.
        clip_actions: clip `act`'s actions to the env's bounds, for a policy defined as clipped
            (`--eval.clip_actions true`). By default an action beyond the bounds (more than a 1e-5
            relative round-off, ACTION_TOLERANCE) stops the run at its first evaluation with a
            message naming the algorithm and the action.
    """

    def __init__(
        self,
        episodes: int | None = None,
        num_envs: int = 10,
        asynchronous: bool = False,
        final_mean_k: int = 5,
        seed: int = 10_000,
        clip_actions: bool = False,
    ) -> None:
        if episodes is not None and episodes < 1:
            raise ValueError(f"episodes must be at least 1 (or None for the dataset default), got {episodes}")
        if num_envs < 1 or final_mean_k < 1:
            raise ValueError(f"num_envs and final_mean_k must be at least 1, got {num_envs}, {final_mean_k}")
        self.episodes = episodes
        self.num_envs = num_envs
        self.asynchronous = asynchronous
        self.final_mean_k = final_mean_k
        self.seed = seed
        self.clip_actions = clip_actions
        self.history: list[dict[str, Any]] = []  # {updates, score, return, score_std, seconds, episode_scores, ...}
        self.train_seconds = 0.0  # training time over all epochs (resumes included), eval excluded
        self._envs: VectorEnv | None = None
        self._epoch_start: float | None = None

    # -- scores ---------------------------------------------------------------------------
    @property
    def last(self) -> float | None:
        """Score of the final evaluation."""
        return self.history[-1]["score"] if self.history else None

    @property
    def best(self) -> float | None:
        """Best score over all evaluations (online model selection: an optimistic number)."""
        return max(h["score"] for h in self.history) if self.history else None

    @property
    def final_mean(self) -> float | None:
        """Mean score of the last `final_mean_k` evaluations (fewer if fewer were run)."""
        if not self.history:
            return None
        tail = self.history[-self.final_mean_k :]
        return sum(h["score"] for h in tail) / len(tail)

    # -- Lightning hooks --------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None
        result = self.run_evaluation(trainer, pl_module)
        entry = {
            "updates": _updates(pl_module, trainer),
            "score": result["score"],
            "return": result["return"],
            "score_std": result["score_std"],
            "seconds": result["seconds"],
            # per episode k (reset with seed + k): what a selection under an evaluation budget resamples afterwards
            "episode_scores": result["scores"],
            "episode_returns": result["returns"],
        }
        self.history.append(entry)
        pl_module.log("eval/score", entry["score"], on_step=False, on_epoch=True, prog_bar=True)
        for key in (*EVAL_COLUMNS[1:], "updates"):
            pl_module.log(f"eval/{key}", float(entry[key]), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_envs()
        if trainer.is_global_zero:
            self.write_result(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close_envs()  # also after an exception, where on_fit_end does not run

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict["history"]]
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))

    # -- work -----------------------------------------------------------------------------
    def run_evaluation(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """One evaluation of `pl_module.act` on normalised observations, in eval mode, with the
        global RNGs seeded from `seed` and restored afterwards. Returns `evaluate`'s dict."""
        datamodule = trainer.datamodule
        info = _dataset_info(trainer)
        episodes = self.episodes or info.eval_episodes
        if self._envs is None:  # built once per fit: env creation (and async processes) is slow
            self._envs = make_vector_env(info, min(self.num_envs, episodes), self.asynchronous)

        def policy(obs: Tensor) -> Tensor:
            return pl_module.act(datamodule.normalize_obs(obs))

        was_training = pl_module.training
        pl_module.eval()
        try:
            with isolated_rng(self.seed):
                return evaluate(policy, info, episodes, self.num_envs, self.seed, pl_module.device, envs=self._envs,
                                clip_actions=self.clip_actions, name=f"{type(pl_module).__module__}.{type(pl_module).__qualname__}.act")
        finally:
            pl_module.train(was_training)

    def write_result(self, trainer: Trainer, pl_module: LightningModule) -> str:
        """Write `result.json` into the run directory atomically (a reader never sees half a file)."""
        info = _dataset_info(trainer)
        episodes = self.episodes or info.eval_episodes
        updates = [h["updates"] for h in self.history]
        interval = updates[-1] - updates[-2] if len(updates) > 1 else (updates[0] if updates else None)
        eval_seconds = sum(h["seconds"] for h in self.history)
        best_entry = max(self.history, key=lambda h: h["score"]) if self.history else None
        k = min(self.final_mean_k, len(self.history))  # fewer evaluations than K: all of them
        seed = os.environ.get("PL_GLOBAL_SEED")
        result = {
            "dataset": info.name,
            "env_id": info.env_id,
            "data": {  # which bytes were trained on and how they were scored (offbench/data/identity.py)
                "name": info.name,
                "fingerprint": getattr(trainer.datamodule, "fingerprint", None),
                "source": info.source,
                "ref_min": info.ref_min,
                "ref_max": info.ref_max,
                "settings": _data_settings(trainer),  # batch size, transforms, PGD's pool...: part of a cell's protocol
            },
            "algorithm": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "hyperparameters": _json_safe(dict(getattr(pl_module, "hparams", {}) or {})),
            "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed,
            "updates": _updates(pl_module, trainer),
            "scores": {
                "last": self.last,
                "best": self.best,
                "best_updates": best_entry["updates"] if best_entry else None,
                "final_mean": self.final_mean,
                "final_mean_k": k,
            },
            "history": self.history,
            "protocol": {
                "episodes_per_evaluation": episodes,
                "eval_interval_updates": interval,
                "evaluations": len(self.history),
                "eval_seeds": f"episode k of every evaluation is reset with seed {self.seed} + k "
                "(the same start states at every evaluation)",
                "score": (
                    "100 * share of episodes that reached the goal (D4RL AntMaze)"
                    if info.success_scored
                    else "D4RL normalized score 100 * (return - ref_min) / (ref_max - ref_min), "
                    f"ref_min={info.ref_min}, ref_max={info.ref_max}, averaged over the episodes"
                ),
                "last": "score of the final evaluation",
                "best": "highest score over all evaluations (online model selection: optimistic)",
                "final_mean": f"mean score of the last {k} evaluations",
                "score_std": "standard deviation (ddof=0) over the episodes of one evaluation, not over training seeds",
                "history": "each evaluation's updates, mean score and return, score_std, seconds, and its per-episode "
                "episode_scores and episode_returns (episode k reset with the eval seed + k)",
                "policy": "pl_module.act on normalised observations, eval mode, torch.no_grad; "
                "torch/numpy/random seeded from the eval seed, training RNG states restored",
                "max_episode_steps": info.max_episode_steps,
            },
            "wall_seconds": {
                "train": self.train_seconds,
                "eval": eval_seconds,
                "total": self.train_seconds + eval_seconds,
            },
            "versions": _versions(),
        }
        return str(write_json_atomic(os.path.join(str(trainer.default_root_dir), "result.json"), result))

    def _close_envs(self) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None


def _data_settings(trainer: Trainer) -> dict[str, Any] | None:
    """The data section (class_path, init_args) of the run's config.yaml, which `offbench fit` writes into the
    run directory before training; None for a run not started by the CLI."""
    path = Path(str(trainer.default_root_dir)) / "config.yaml"
    if not path.is_file():
        return None
    section = (yaml.safe_load(path.read_text()) or {}).get("data")
    return section if isinstance(section, dict) else None


def _dataset_info(trainer: Trainer) -> DatasetInfo:
    info = getattr(trainer.datamodule, "info", None)
    if not isinstance(info, DatasetInfo):
        raise RuntimeError(
            "EvalCallback needs the trainer's datamodule to have `.info: DatasetInfo` and "
            "`.normalize_obs(obs)`; pass the OfflineDataModule to `trainer.fit(module, datamodule=...)`"
        )
    return info


def _updates(pl_module: LightningModule, trainer: Trainer) -> int:
    """Gradient updates done: the module's `updates` buffer (Lightning's global_step does not
    count updates when algorithms step their own optimisers)."""
    updates = getattr(pl_module, "updates", None)
    if updates is not None:
        return int(updates)
    return int(getattr(pl_module, "step", trainer.global_step))


def _json_safe(value: Any) -> Any:
    """Hyperparameters -> JSON: containers recursively, tensors/arrays as lists, others as str."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor | np.ndarray | np.generic):
        return _json_safe(value.tolist())
    return str(value)


def _versions() -> dict[str, str | None]:
    import gymnasium

    try:
        import mujoco

        mujoco_version: str | None = mujoco.__version__
    except ImportError:  # pragma: no cover - depends on the installation
        mujoco_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "gymnasium": gymnasium.__version__,
        "mujoco": mujoco_version,
        "offbench": offbench.__version__,
    }
