"""Dataset forge: D4RL's recipe for its locomotion data, on any gymnasium env with flat Box spaces.

D4RL trained SAC online (rlkit) and saved, per env (D4RL paper section 5; scripts/generation/mujoco):
    random         rollouts of the uniform random policy
    medium         rollouts of a policy stopped at about a third of expert performance
    medium-replay  the replay buffer of that run up to the medium policy
    expert         rollouts of the fully trained policy
    medium-expert  medium and expert concatenated (stitch_dataset.py: medium first)
`forge` does the same offline, in four phases, and writes each dataset in D4RL's HDF5 layout and as
a Minari dataset, plus `manifest.json` saying how each was made:

1. SAC (Haarnoja et al. 2018, automatic entropy tuning): TanhGaussianActor and a twin
   CriticEnsemble of 2 x 256 ReLU layers, Adam lr 3e-4 for actor, critics and temperature, batch
   256, gamma 0.99, tau 0.005, target entropy -act_dim, initial temperature 1, one gradient update
   per env step after `start_steps` steps of uniform random actions, replay buffer holding every
   step. Actions are scaled from [-1, 1] to the env's bounds. Every `checkpoint_every` env steps the
   actor is saved with its evaluated return: `offbench.evaluation.evaluate` over `eval_episodes`
   episodes of the *sampled* (stochastic) policy, the policy that makes the data.
2. References: the 3 checkpoints (`expert_candidates`) with the highest evaluated returns are
   evaluated again over 30 other episodes (`select_episodes`) and the best becomes the expert (the best of many
   10-episode evaluations overrates its checkpoint). ref_min / ref_max are the mean returns of the
   uniform random policy and of the expert (sampled actions) over `ref_episodes` other episodes, as
   D4RL's REF_MIN/REF_MAX are random and expert returns. Medium is the checkpoint, other than the
   expert's, whose evaluated return is closest to ref_min + medium_fraction * (ref_max - ref_min),
   medium_fraction = 1/3 (ties: the earlier). D4RL's "a third of expert" is stated in raw returns,
   where its random returns are near 0; measured from the random return it also works for envs with
   negative returns (Pendulum).
3. Rollouts: whole episodes until at least `dataset_steps` steps, with sampled actions, as D4RL's
   collect_data.py (`distr.sample()` on rlkit's TanhGaussian policy) did. Medium-replay is the
   buffer up to the medium checkpoint, without the unfinished episode at its end.
4. Writing: <out>/{random,medium,medium-replay,expert,medium-expert}.hdf5 (each atomic), the Minari
   datasets offbench/<slug>/<kind>-v0 (each staged, then renamed into place), manifest.json last.
   A family is complete only when its manifest exists; the manifest is removed before rewriting.

Deterministic given the seed on CPU (same machine and thread count): torch is seeded with `seed`,
the env's first reset with `seed`, warm-up actions and minibatches come from numpy generators seeded
with `seed`, evaluations and rollouts from seeds derived from it (manifest "seeds"). Resume: the
full SAC state (networks, optimisers, replay buffer, every RNG including the env's) is saved at the
first episode end after each checkpoint, so an interrupted forge continues from there with the same
numbers as an uninterrupted one; the rollouts and writing (minutes) are redone on a re-run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from offbench.batch import Batch
from offbench.data.catalog import DatasetInfo, forge_dir, forge_minari_id, forge_name, forge_slug
from offbench.data.synthetic import Episode, minari_datasets_root, write_d4rl_hdf5, write_minari_dataset
from offbench.errors import UserError
from offbench.evaluation import evaluate, isolated_rng
from offbench.files import read_json, write_json_atomic
from offbench.module import OfflineRLModule, soft_update
from offbench.nets import CriticEnsemble
from offbench.sac import TanhGaussianActor

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
MANIFEST = "manifest.json"
FORMAT = "offbench-forge-v1"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ForgeConfig:
    """Everything that decides a forged family; saved in the manifest and the SAC state."""

    env_id: str
    preset: str
    sac_steps: int  # env steps of the SAC run (= updates + start_steps)
    start_steps: int  # uniform random actions first, no updates (they fill the buffer)
    checkpoint_every: int  # env steps between saved, evaluated actors
    dataset_steps: int  # random / medium / expert: whole episodes until at least this many steps
    eval_episodes: int = 10  # per checkpoint
    ref_episodes: int = 100  # for ref_min / ref_max
    expert_candidates: int = 3  # checkpoints with the highest evaluated returns, re-evaluated to pick the expert
    select_episodes: int = 30  # episodes of that re-evaluation
    seed: int = 0
    medium_fraction: float = 1.0 / 3.0
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    max_episode_steps: int | None = None  # None: the env's registered limit
    num_envs: int = 10  # parallel envs in evaluations and rollouts (part of the seeding protocol)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in (
            "sac_steps", "checkpoint_every", "dataset_steps", "eval_episodes", "ref_episodes", "expert_candidates",
            "select_episodes", "batch_size", "num_envs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.start_steps < self.sac_steps:
            raise ValueError(f"start_steps must be in [0, sac_steps={self.sac_steps}), got {self.start_steps}")
        if self.sac_steps < 2 * self.checkpoint_every:
            raise ValueError(
                f"sac_steps {self.sac_steps} gives fewer than 2 checkpoints every {self.checkpoint_every} steps: "
                "medium and expert need different checkpoints"
            )
        if not 0.0 < self.medium_fraction < 1.0:
            raise ValueError(f"medium_fraction must be in (0, 1), got {self.medium_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


# preset -> env id -> settings; "*" is the row for envs without their own. Measured costs: README.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Minutes on a 2-core CPU. Datasets of >= 20k steps (100 Pendulum episodes; InvertedPendulum's
    # episodes run from a few steps (random) to 1000 (balanced)).
    "small": {
        # seed 0 reaches about -150 (the swing-up solved) after 4.5k env steps, -112 at 8k
        "Pendulum-v1": dict(sac_steps=8_000, start_steps=1_000, checkpoint_every=250, dataset_steps=20_000),
        # seed 0's sampled policy balances for all 1000 steps from 15k env steps on (186 at 10k)
        "InvertedPendulum-v5": dict(sac_steps=16_000, start_steps=1_000, checkpoint_every=500, dataset_steps=20_000),
        "*": dict(sac_steps=20_000, start_steps=1_000, checkpoint_every=1_000, dataset_steps=20_000),
    },
    # D4RL's sizes: 1M SAC env steps (10k random warm-up steps, as SAC's MuJoCo runs), 1M steps per
    # rollout dataset, a checkpoint every 10k steps. Hours: run once (a GPU helps: --device cuda).
    "d4rl": {
        "*": dict(sac_steps=1_000_000, start_steps=10_000, checkpoint_every=10_000, dataset_steps=1_000_000),
    },
}
DEFAULT_PRESET = {"Pendulum-v1": "small", "InvertedPendulum-v5": "small"}


def forge_config(env_id: str, preset: str | None = None, **overrides: Any) -> ForgeConfig:
    """The settings of `preset` for `env_id` (default: `small` for Pendulum-v1 and InvertedPendulum-v5,
    else `d4rl`), with `overrides` (ForgeConfig fields; None values are ignored) on top."""
    preset = preset or DEFAULT_PRESET.get(env_id, "d4rl")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    rows = PRESETS[preset]
    settings = dict(rows.get(env_id, rows["*"]))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if "hidden" in settings:
        settings["hidden"] = tuple(settings["hidden"])
    return ForgeConfig(env_id=env_id, preset=preset, **settings)


# --------------------------------------------------------------------------- SAC


class SAC(nn.Module):
    """Soft actor-critic with automatic entropy tuning, on actions in [-1, 1].

    The update follows the suite's CQL backbone (algorithms/cql.py) without the conservative penalty,
    with SAC's entropy term in the backup, every loss from the parameters at the start:
        next actions a' ~ pi(.|s') sampled first
        temperature:  L_alpha = -log_alpha * E(log pi(a~|s) + target_entropy),  target_entropy = -act_dim
        actor:        L_pi = E(alpha log pi(a~|s) - min_k Q_k(s, a~))
        critics:      L_Q = sum_k E(Q_k(s, a) - y)^2,  y = r + gamma (1 - done) (min_k Q_targ_k(s', a') - alpha log pi(a'|s'))
        targets:      Q_targ <- (1 - tau) Q_targ + tau Q
    """

    def __init__(
        self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256), lr: float = 3e-4,
        gamma: float = 0.99, tau: float = 0.005,
    ) -> None:
        super().__init__()
        self.actor = TanhGaussianActor(obs_dim, act_dim, 1.0, hidden)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -float(act_dim)
        self.gamma, self.tau = gamma, tau
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)

    def update(self, batch: Batch) -> dict[str, Tensor]:
        """One gradient step of temperature, actor and critics, then the target update."""
        obs = batch.obs
        with torch.no_grad():
            next_act, next_logp = self.actor(batch.next_obs)

        # 1. temperature: keep the policy's entropy near -act_dim
        new_act, log_pi = self.actor(obs)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        OfflineRLModule.optimize(self.alpha_opt, alpha_loss)
        alpha = self.log_alpha.exp().detach()

        # 2. actor (the critics are frozen for this backward pass: only input gradients are needed)
        self.critic.requires_grad_(False)
        actor_loss = (alpha * log_pi - self.critic(obs, new_act).min(0).values).mean()
        OfflineRLModule.optimize(self.actor_opt, actor_loss)
        self.critic.requires_grad_(True)

        # 3. critics: soft TD target from the target critics
        with torch.no_grad():
            target_q = self.critic_target(batch.next_obs, next_act).min(0).values - alpha * next_logp
            target = batch.rew + self.gamma * (1.0 - batch.done) * target_q
        q = self.critic(obs, batch.act)
        critic_loss = (q - target).pow(2).mean(-1).sum()
        OfflineRLModule.optimize(self.critic_opt, critic_loss)
        soft_update(self.critic_target, self.critic, self.tau)
        return {"loss/critic": critic_loss, "loss/actor": actor_loss, "loss/alpha": alpha_loss, "alpha": alpha}

    def optimizer_state(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in ("actor_opt", "critic_opt", "alpha_opt")}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


class ReplayBuffer:
    """Every step of the SAC run in time order, in the env's action units (what the env was given)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int) -> None:
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.act = np.zeros((capacity, act_dim), np.float32)
        self.rew = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.term = np.zeros(capacity, bool)
        self.trunc = np.zeros(capacity, bool)
        self.size = 0

    FIELDS = ("obs", "act", "rew", "next_obs", "term", "trunc")

    def add(self, obs, act, rew, next_obs, term, trunc) -> None:
        i = self.size
        self.obs[i], self.act[i], self.rew[i], self.next_obs[i] = obs, act, rew, next_obs
        self.term[i], self.trunc[i] = term, trunc
        self.size += 1

    def sample(self, rng: np.random.Generator, batch_size: int, scale: Callable[[np.ndarray], np.ndarray], device) -> Batch:
        idx = rng.integers(0, self.size, batch_size)
        arrays = (self.obs[idx], scale(self.act[idx]), self.rew[idx], self.next_obs[idx], self.term[idx].astype(np.float32))
        return Batch(*(torch.as_tensor(a, device=device) for a in arrays))

    def state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name)[: self.size].copy() for name in self.FIELDS}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.size = len(state["rew"])
        for name in self.FIELDS:
            getattr(self, name)[: self.size] = state[name]

    def episodes(self, end: int, obs_dtype: np.dtype) -> list[Episode]:
        """The complete episodes among the first `end` steps (a trailing unfinished one is left out)."""
        ends = np.flatnonzero(self.term[:end] | self.trunc[:end]) + 1
        out, start = [], 0
        for stop in ends:
            obs = np.concatenate([self.obs[start:stop], self.next_obs[stop - 1 : stop]]).astype(obs_dtype)
            out.append(Episode(
                list(obs), list(self.act[start:stop]), self.rew[start:stop].astype(float).tolist(),
                self.term[start:stop].tolist(), self.trunc[start:stop].tolist(),
            ))
            start = stop
        return out


# --------------------------------------------------------------------------- envs and policies


def _make_env(config: ForgeConfig) -> gym.Env:
    env = gym.make(config.env_id, max_episode_steps=config.max_episode_steps)
    if env.spec is None or env.spec.max_episode_steps is None:
        raise ValueError(f"{config.env_id} has no episode limit: pass max_episode_steps")
    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        raise ValueError(
            f"the forge needs Box observation and action spaces; {config.env_id} has {env.observation_space} and "
            f"{env.action_space}"
        )
    if len(env.observation_space.shape) != 1 or not np.all(np.isfinite(env.action_space.low)):
        raise ValueError(f"the forge needs flat observations and bounded actions; {config.env_id} has neither or one")
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


# --------------------------------------------------------------------------- progress


class _Progress:
    """Rich progress bars and log lines on stderr, or nothing (quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description:<14}"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True, log_path=False),
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, description: str, total: int, completed: int = 0) -> Any:
        return self.bar.add_task(description, total=total, completed=completed, info="") if self.bar else None

    def update(self, task: Any, completed: int, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(task, completed=completed, info=info)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.log(message)


# --------------------------------------------------------------------------- phase 1: SAC


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_train_state(path: Path, state: dict[str, Any]) -> None:
    """The full SAC state at an episode boundary (a test interrupts the forge here)."""
    _save_atomic(state, path)


def _eval_info(config: ForgeConfig, limit: int) -> DatasetInfo:
    # Scores are not used during forging (only returns): placeholder references 0 and 1.
    return DatasetInfo(forge_name(config.env_id, "medium"), "hdf5", "", config.env_id, 0.0, 1.0, limit)


def _train_sac(config: ForgeConfig, sac_dir: Path, progress: _Progress) -> dict[str, Any]:
    """Phase 1: the SAC run with checkpoints, resumed from `sac_dir/train_state.pt` when it is there."""
    state_path = sac_dir / "train_state.pt"
    ckpt_dir = sac_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    env = _make_env(config)
    limit = int(env.spec.max_episode_steps)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    scale = ActionScale(env.action_space)

    torch.manual_seed(config.seed)
    sac = SAC(obs_dim, act_dim, config.hidden, config.lr, config.gamma, config.tau).to(device)
    buffer = ReplayBuffer(config.sac_steps, obs_dim, act_dim)
    action_rng = np.random.default_rng([config.seed, 0])  # warm-up actions
    batch_rng = np.random.default_rng([config.seed, 1])  # minibatch indices
    t, checkpoints, online, seconds = 0, [], [], 0.0
    if state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["config"] != config.to_dict():
            raise RuntimeError(f"{state_path} belongs to another configuration")  # checked by forge() first
        if saved["finished"]:
            env.close()
            progress.log(f"the SAC run is finished ({state_path}): references, rollouts and writing follow")
            return saved
        sac.load_state_dict(saved["sac"])
        sac.load_optimizer_state(saved["optimizers"])
        buffer.load(saved["buffer"])
        action_rng.bit_generator.state = saved["rng"]["action"]
        batch_rng.bit_generator.state = saved["rng"]["batch"]
        torch.set_rng_state(saved["rng"]["torch"])
        env.unwrapped.np_random = np.random.Generator(np.random.PCG64())
        env.unwrapped.np_random.bit_generator.state = saved["rng"]["env"]
        t, checkpoints, online, seconds = saved["t"], saved["checkpoints"], saved["online_returns"], saved["seconds"]
        progress.log(f"resuming the SAC run at env step {t} from {state_path}")

    info = _eval_info(config, limit)
    seed_eval = eval_seed(config)
    eval_envs = None
    policy = _actor_policy(sac.actor, scale, device)
    start = time.perf_counter() - seconds
    task = progress.task("SAC", config.sac_steps, t)
    metrics: dict[str, Tensor] = {}
    obs, ep_return, pending = None, 0.0, False

    def snapshot(finished: bool) -> dict[str, Any]:
        return {
            "config": config.to_dict(), "finished": finished, "t": t, "checkpoints": checkpoints,
            "online_returns": online, "seconds": time.perf_counter() - start, "updates": max(0, t - config.start_steps),
            "sac": sac.state_dict(), "optimizers": sac.optimizer_state(), "buffer": buffer.state(),
            "rng": {
                "action": action_rng.bit_generator.state, "batch": batch_rng.bit_generator.state,
                "torch": torch.get_rng_state(), "env": env.unwrapped.np_random.bit_generator.state,
            },
        }

    try:
        while t < config.sac_steps:
            if obs is None:
                obs, _ = env.reset(seed=config.seed if t == 0 else None)
                ep_return = 0.0
            if t < config.start_steps:
                action = action_rng.uniform(env.action_space.low, env.action_space.high).astype(env.action_space.dtype)
            else:
                action = policy(obs[None])[0]
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs, action, reward, next_obs, terminated, truncated)
            obs, ep_return, t = next_obs, ep_return + float(reward), t + 1
            if t > config.start_steps:
                metrics = sac.update(buffer.sample(batch_rng, config.batch_size, scale.to_unit, device))
            if t % config.checkpoint_every == 0 or t == config.sac_steps:
                if eval_envs is None:
                    from offbench.envs import make_vector_env

                    eval_envs = make_vector_env(info, min(config.num_envs, config.eval_episodes))
                sac.eval()
                with isolated_rng(seed_eval):
                    result = evaluate(
                        _torch_policy(policy), info, config.eval_episodes, config.num_envs, seed_eval, device, envs=eval_envs
                    )
                sac.train()
                entry = {
                    "env_steps": t, "updates": max(0, t - config.start_steps), "eval_return": result["return"],
                    "eval_return_std": float(np.std(result["returns"])), "file": f"checkpoints/step_{t:08d}.pt",
                }
                _save_atomic({"actor": sac.actor.state_dict(), **entry}, sac_dir / entry["file"])
                checkpoints = [c for c in checkpoints if c["env_steps"] < t] + [entry]
                progress.log(f"checkpoint at {t} env steps: evaluated return {result['return']:.1f} "
                             f"+- {entry['eval_return_std']:.1f} over {config.eval_episodes} episodes")
                pending = True
            if terminated or truncated:
                online.append(ep_return)
                obs = None
                if pending:
                    _save_train_state(state_path, snapshot(False))
                    pending = False
            if t % 100 == 0 or t == config.sac_steps:
                alpha = f" | alpha {float(metrics['alpha']):.3f}" if metrics else ""
                last = f"episode return {online[-1]:.1f}" if online else ""
                evaluated = f" | eval {checkpoints[-1]['eval_return']:.1f}" if checkpoints else ""
                progress.update(task, t, f"{last}{evaluated}{alpha}")
    finally:
        env.close()
        if eval_envs is not None:
            eval_envs.close()
    final = snapshot(True)
    _save_train_state(state_path, final)
    return final


# --------------------------------------------------------------------------- phases 2-4


def _load_actor(config: ForgeConfig, sac_dir: Path, entry: dict[str, Any], obs_dim: int, act_dim: int) -> TanhGaussianActor:
    actor = TanhGaussianActor(obs_dim, act_dim, 1.0, config.hidden)
    saved = torch.load(sac_dir / entry["file"], map_location="cpu", weights_only=False)
    actor.load_state_dict(saved["actor"])
    return actor.to(config.device).eval()


def choose_medium(checkpoints: list[dict[str, Any]], expert_steps: int, target: float) -> dict[str, Any]:
    """The checkpoint other than the expert's whose evaluated return is closest to `target`
    (ties: the earlier one)."""
    candidates = [c for c in checkpoints if c["env_steps"] != expert_steps]
    return min(candidates, key=lambda c: (abs(c["eval_return"] - target), c["env_steps"]))


def expert_candidates(checkpoints: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The `k` checkpoints with the highest evaluated returns (ties: the later first)."""
    return sorted(checkpoints, key=lambda c: (c["eval_return"], c["env_steps"]), reverse=True)[:k]


def choose_expert(candidates: list[dict[str, Any]], returns: list[float]) -> dict[str, Any]:
    """The candidate with the highest re-evaluated return (ties: the later one)."""
    return max(zip(candidates, returns), key=lambda cr: (cr[1], cr[0]["env_steps"]))[0]


def _stats(episodes: list[Episode], refs: tuple[float, float] | None) -> dict[str, Any]:
    returns = np.array([ep.ret for ep in episodes])
    out = {
        "steps": int(sum(len(ep) for ep in episodes)), "episodes": len(episodes),
        "mean_return": float(returns.mean()), "std_return": float(returns.std()),
        "min_return": float(returns.min()), "max_return": float(returns.max()),
        "mean_length": float(np.mean([len(ep) for ep in episodes])),
    }
    if refs is not None:
        out["normalized_mean"] = 100.0 * (out["mean_return"] - refs[0]) / (refs[1] - refs[0])
    return out


def _check_minari_ids(ids: list[str], owner: str, root: Path, config: ForgeConfig) -> None:
    """Refuse to replace a Minari dataset in `root` that something else wrote, except the copies of a
    complete forge of the same settings elsewhere (identical data; an earlier offbench put the copies
    of `--out` forges in the global Minari folder): those are taken over, so the default forge recovers
    by itself."""
    for minari_id in ids:
        metadata = root / minari_id / "data" / "metadata.json"
        if not (root / minari_id).exists():
            continue
        text = metadata.read_text() if metadata.is_file() else ""
        if owner in text:
            continue
        other = _owner_folder(text)
        manifest = read_json(other / MANIFEST, fix="it is not a forge's manifest") if other is not None else None
        if isinstance(manifest, dict) and manifest.get("config") == config.to_dict():
            print(f"offbench forge: taking over Minari dataset {minari_id} in {root} from the forge folder {other} "
                  "(a complete forge of the same settings)", file=sys.stderr)
            continue
        by = f"the forge folder {other}, made with other settings" if other is not None else "something else"
        raise UserError(
            f"Minari dataset {minari_id} exists in {root} and was written by {by}; pass another --minari-namespace "
            f"(e.g. offbench/<env>-seed1), or delete it (`minari delete {minari_id}`)"
        )


def _owner_folder(metadata: str) -> Path | None:
    """The forge folder named in a forged Minari dataset's description (`...; forge folder <path>`)."""
    try:
        description = json.loads(metadata).get("description", "")
    except (json.JSONDecodeError, AttributeError):
        return None
    _, found, folder = description.rpartition("; forge folder ")
    return Path(folder) if found and folder else None


def forge(
    config: ForgeConfig, out: str | os.PathLike | None = None, *, minari_namespace: str | None = None,
    force: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Make D4RL's five datasets for `config.env_id` in `out` (default: where the catalog looks,
    `forge_dir(env_id)`) and as Minari datasets `<minari_namespace>/<kind>-v0` (default namespace
    offbench/<slug>); returns the manifest. The Minari copies of the catalog's folder go to the user's
    Minari folder ($MINARI_DATASETS_PATH or ~/.minari/datasets); those of any other `out` stay with
    their family, in `<out>/minari` (read them with MINARI_DATASETS_PATH=<out>/minari), so a forge into
    a folder never blocks the default one.

    A finished family with the same configuration is left as it is; another configuration (in the
    manifest or the saved SAC state) is an error unless `force`, which deletes the folder's forge
    files and starts again. An interrupted run resumes its SAC run from the last saved state. Minari
    datasets are replaced only when this forge folder wrote them.
    """
    out = Path(out) if out is not None else forge_dir(config.env_id)
    in_catalog = out.resolve() == forge_dir(config.env_id).resolve()  # catalog names point here
    minari_root = minari_datasets_root() if in_catalog else out.resolve() / "minari"
    namespace = minari_namespace or forge_minari_id(config.env_id, "x").rsplit("/", 1)[0]
    minari_ids = {kind: f"{namespace}/{kind}-v0" for kind in KINDS}
    owner = f"forge folder {out.resolve()}"
    sac_dir = out / "sac"
    manifest_path = out / MANIFEST
    state_path = sac_dir / "train_state.pt"
    if force:
        manifest_path.unlink(missing_ok=True)
        shutil.rmtree(sac_dir, ignore_errors=True)
    if manifest_path.exists():
        manifest = read_json(manifest_path, fix="delete it, and the forge writes the family again (its SAC run is kept)")
        if manifest["config"] == config.to_dict():
            return manifest
        raise UserError(
            f"{out} holds a forged family made with other settings (see {manifest_path}); pass --force to replace "
            "it, or choose another --out"
        )
    if state_path.exists():
        saved_config = torch.load(state_path, map_location="cpu", weights_only=False)["config"]
        if saved_config != config.to_dict():
            changed = sorted(k for k in saved_config if saved_config[k] != config.to_dict().get(k))
            raise UserError(
                f"{state_path} is an interrupted SAC run with other settings ({', '.join(changed)} differ); rerun with "
                "the same settings to resume it, or pass --force to start again"
            )
    _check_minari_ids(list(minari_ids.values()), owner, minari_root, config)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    with _Progress(progress) as bar:
        # Phase 1: SAC.
        state = _train_sac(config, sac_dir, bar)
        checkpoints = state["checkpoints"]
        env = _make_env(config)
        limit = int(env.spec.max_episode_steps)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        scale = ActionScale(env.action_space)
        info = _eval_info(config, limit)

        # Phase 2: expert, references, medium. The best of 10-episode evaluations over many checkpoints
        # overrates its checkpoint (the maximum of noisy estimates), so the top candidates are evaluated
        # again over `select_episodes` episodes, and the references use yet other episodes.
        t0 = time.perf_counter()
        candidates = expert_candidates(checkpoints, config.expert_candidates)
        bar.log(
            f"choosing the expert among checkpoints {[c['env_steps'] for c in candidates]} ({config.select_episodes} "
            f"episodes each), then reference scores over {config.ref_episodes} episodes"
        )
        select_seed, ref_seed = 30_000 + config.seed, 20_000 + config.seed
        selection = []
        for c in candidates:
            actor = _load_actor(config, sac_dir, c, obs_dim, act_dim)
            with isolated_rng(select_seed):
                selection.append(evaluate(
                    _torch_policy(_actor_policy(actor, scale, config.device)), info, config.select_episodes,
                    config.num_envs, select_seed, config.device,
                )["return"])
        expert_ckpt = choose_expert(candidates, selection)
        expert_actor = _load_actor(config, sac_dir, expert_ckpt, obs_dim, act_dim)
        with isolated_rng(ref_seed):
            random_ref = evaluate(
                _torch_policy(_random_policy(env.action_space, np.random.default_rng([config.seed, 2]))),
                info, config.ref_episodes, config.num_envs, ref_seed,
            )
        with isolated_rng(ref_seed):
            expert_ref = evaluate(
                _torch_policy(_actor_policy(expert_actor, scale, config.device)), info, config.ref_episodes,
                config.num_envs, ref_seed, config.device,
            )
        refs = (random_ref["return"], expert_ref["return"])
        warnings = []
        if refs[1] == refs[0]:
            raise RuntimeError(f"random and expert mean returns are equal ({refs[0]}): normalized scores are undefined")
        if refs[1] < refs[0]:
            warnings.append(
                f"the expert policy ({refs[1]:.2f}) did not beat the random policy ({refs[0]:.2f}) over "
                f"{config.ref_episodes} episodes: the SAC run was too short (sac_steps {config.sac_steps}); the datasets "
                "do not separate good from poor policies and normalized scores are meaningless"
            )
            bar.log(f"[bold red]warning:[/] {warnings[-1]}")
        target = refs[0] + config.medium_fraction * (refs[1] - refs[0])
        medium_ckpt = choose_medium(checkpoints, expert_ckpt["env_steps"], target)
        medium_actor = _load_actor(config, sac_dir, medium_ckpt, obs_dim, act_dim)
        ref_seconds = time.perf_counter() - t0
        bar.log(
            f"references over {config.ref_episodes} episodes: random {refs[0]:.1f}, expert {refs[1]:.1f} (checkpoint "
            f"{expert_ckpt['env_steps']}); medium target {target:.1f} -> checkpoint {medium_ckpt['env_steps']} "
            f"(evaluated {medium_ckpt['eval_return']:.1f})"
        )

        # Phase 3: rollouts (the manifest goes first: the family is incomplete until it is rewritten).
        manifest_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        dataset_seeds = {"random": [config.seed, 3], "medium": [config.seed, 4], "expert": [config.seed, 5]}
        policies = {
            "random": lambda rng: _random_policy(env.action_space, rng),
            "medium": lambda rng: _actor_policy(medium_actor, scale, config.device),
            "expert": lambda rng: _actor_policy(expert_actor, scale, config.device),
        }
        episodes: dict[str, list[Episode]] = {}
        for kind in ("random", "medium", "expert"):
            rng = np.random.default_rng(dataset_seeds[kind])
            task = bar.task(kind, config.dataset_steps)
            returns: list[float] = []

            def report(ep: Episode, steps: int, task=task, returns=returns) -> None:
                returns.append(ep.ret)
                bar.update(task, min(steps, config.dataset_steps), f"{len(returns)} episodes, mean return {np.mean(returns):.1f}")

            with isolated_rng(int(rng.integers(2**31 - 1))):
                episodes[kind] = rollout(lambda: _make_env(config), policies[kind](rng), config.dataset_steps,
                                         config.num_envs, rng, report)
        episodes["medium-replay"] = _replay_episodes(
            state, medium_ckpt["env_steps"], obs_dim, act_dim, env.observation_space.dtype
        )
        episodes["medium-expert"] = episodes["medium"] + episodes["expert"]
        rollout_seconds = time.perf_counter() - t0

        # Phase 4: writing, manifest last.
        t0 = time.perf_counter()
        made_by = {
            "random": "uniform random policy",
            "medium": f"SAC checkpoint at {medium_ckpt['env_steps']} env steps, sampled actions",
            "medium-replay": f"SAC replay buffer, env steps 0..{medium_ckpt['env_steps']} (complete episodes)",
            "expert": f"SAC checkpoint at {expert_ckpt['env_steps']} env steps, sampled actions",
            "medium-expert": "medium episodes, then expert episodes",
        }
        datasets: dict[str, Any] = {}
        task = bar.task("writing", len(KINDS))
        for i, kind in enumerate(KINDS):
            file_name = f"{kind}.hdf5"
            minari_id = minari_ids[kind]
            write_d4rl_hdf5(
                out / file_name, episodes[kind], env_id=config.env_id, max_episode_steps=limit,
                ref_min=refs[0], ref_max=refs[1],
                attrs={"generator": f"offbench.forge ({kind}: {made_by[kind]}; seed {config.seed})", "kind": kind},
            )
            write_minari_dataset(
                minari_id, episodes[kind], env, algorithm_name=f"offbench forge: {made_by[kind]}",
                code_permalink="offbench/forge.py",
                description=f"{kind} dataset of {config.env_id}: {made_by[kind]}; {owner}",
                ref_min=refs[0], ref_max=refs[1], ref_episodes=config.ref_episodes, overwrite=True, root=minari_root,
            )
            datasets[kind] = {
                "name": forge_name(config.env_id, kind) if in_catalog else None, "hdf5": file_name, "minari_id": minari_id,
                "minari_root": str(minari_root),
                "made_by": made_by[kind], **_stats(episodes[kind], refs),
            }
            bar.update(task, i + 1, kind)
        env.close()
        write_seconds = time.perf_counter() - t0

    manifest = {
        "format": FORMAT,
        "env_id": config.env_id,
        "slug": forge_slug(config.env_id),
        "max_episode_steps": limit,
        "config": config.to_dict(),
        "seeds": {
            "torch": f"torch.manual_seed({config.seed}) before the networks are built; the actor's sampling noise",
            "env": f"the SAC env's first reset uses seed {config.seed}; later resets continue its generator",
            "numpy": f"warm-up actions default_rng([{config.seed}, 0]), minibatches default_rng([{config.seed}, 1])",
            "checkpoint_evaluation": f"evaluate(seed={eval_seed(config)}): episode k reset with {eval_seed(config)} + k, "
            "torch/numpy seeded with it",
            "expert_selection": f"evaluate(seed={select_seed}) for each candidate",
            "references": f"evaluate(seed={ref_seed}) for both policies; random actions default_rng([{config.seed}, 2])",
            "datasets": {k: f"default_rng({v}): episode reset seeds, then the torch seed of the rollout"
                         for k, v in dataset_seeds.items()},
        },
        "sac": {
            "algorithm": "SAC with automatic entropy tuning (offbench.forge.SAC): TanhGaussianActor, twin CriticEnsemble",
            "hyperparameters": {
                "hidden": list(config.hidden), "activation": "ReLU", "lr": config.lr, "batch_size": config.batch_size,
                "gamma": config.gamma, "tau": config.tau, "target_entropy": -act_dim, "initial_alpha": 1.0,
                "updates_per_env_step": 1, "start_steps": config.start_steps,
            },
            "env_steps": state["t"],
            "updates": state["updates"],
            "online_episodes": len(state["online_returns"]),
            "online_return_last10": float(np.mean(state["online_returns"][-10:])) if state["online_returns"] else None,
            "checkpoint_evaluation": f"mean return of the sampled policy over {config.eval_episodes} episodes",
            "checkpoints": [{k: v for k, v in c.items()} for c in checkpoints],
        },
        "expert": {
            "env_steps": expert_ckpt["env_steps"], "eval_return": expert_ckpt["eval_return"],
            "candidates": [
                {"env_steps": c["env_steps"], "eval_return": c["eval_return"], "selection_return": r}
                for c, r in zip(candidates, selection)
            ],
            "rule": f"of the {config.expert_candidates} checkpoints with the highest evaluated returns, the one with "
            f"the highest mean return over {config.select_episodes} more episodes (seeds {select_seed} + k; ties: the later)",
        },
        "medium": {
            "env_steps": medium_ckpt["env_steps"], "eval_return": medium_ckpt["eval_return"], "target_return": target,
            "distance": abs(medium_ckpt["eval_return"] - target),
            "rule": f"the checkpoint other than the expert's whose evaluated return is closest to ref_min + "
            f"{config.medium_fraction:.4g} * (ref_max - ref_min) = {target:.2f} (ties: the earlier)",
        },
        "references": {
            "ref_min": refs[0], "ref_max": refs[1], "episodes": config.ref_episodes,
            "ref_min_std": float(np.std(random_ref["returns"])), "ref_max_std": float(np.std(expert_ref["returns"])),
            "rule": f"mean returns of the uniform random policy and of the expert checkpoint (sampled actions) over "
            f"{config.ref_episodes} episodes reset with seeds {ref_seed} + k",
        },
        "rollouts": "whole episodes until at least dataset_steps steps; actions sampled from the policy (stochastic), "
        "as D4RL's scripts/generation/mujoco/collect_data.py did (distr.sample())",
        "datasets": datasets,
        "warnings": warnings,
        "wall_seconds": {
            "sac": state["seconds"], "references": ref_seconds, "rollouts": rollout_seconds, "writing": write_seconds,
            "this_run": time.perf_counter() - wall,
        },
        "versions": _versions(),
    }
    write_json_atomic(manifest_path, manifest)
    return manifest


def eval_seed(config: ForgeConfig) -> int:
    """Seed of the checkpoint evaluations (episode k is reset with it + k)."""
    return 10_000 + config.seed


def _replay_episodes(state: dict[str, Any], end: int, obs_dim: int, act_dim: int, obs_dtype: np.dtype) -> list[Episode]:
    """Medium-replay: the complete episodes of the SAC run's first `end` env steps."""
    buffer = ReplayBuffer(len(state["buffer"]["rew"]), obs_dim, act_dim)
    buffer.load(state["buffer"])
    return buffer.episodes(end, obs_dtype)


def _versions() -> dict[str, str]:
    import gymnasium
    import minari

    return {"torch": torch.__version__, "gymnasium": gymnasium.__version__, "minari": minari.__version__}

