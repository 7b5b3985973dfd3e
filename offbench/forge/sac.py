"""Phase 1 of the forge: SAC (automatic entropy tuning), its replay buffer, and the run itself
(`train_sac`): checkpointed, evaluated actors, resumable bit-identically from its saved state."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from offbench.batch import Batch
from offbench.data.synthetic import Episode
from offbench.evaluation import evaluate, isolated_rng
from offbench.forge.config import ForgeConfig, eval_seed
from offbench.forge.envs import ActionScale, _actor_policy, _eval_info, _make_env, _torch_policy
from offbench.forge.progress import _Progress
from offbench.module import OfflineRLModule, soft_update
from offbench.nets import CriticEnsemble
from offbench.sac import TanhGaussianActor


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


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file renamed over `path`; on any failure (a full disk) the temporary is removed."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_train_state(path: Path, state: dict[str, Any]) -> None:
    """The full SAC state at an episode boundary (a test interrupts the forge here)."""
    _save_atomic(state, path)


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


def _load_actor(config: ForgeConfig, sac_dir: Path, entry: dict[str, Any], obs_dim: int, act_dim: int) -> TanhGaussianActor:
    actor = TanhGaussianActor(obs_dim, act_dim, 1.0, config.hidden)
    saved = torch.load(sac_dir / entry["file"], map_location="cpu", weights_only=False)
    actor.load_state_dict(saved["actor"])
    return actor.to(config.device).eval()


def _replay_episodes(state: dict[str, Any], end: int, obs_dim: int, act_dim: int, obs_dtype: np.dtype) -> list[Episode]:
    """Medium-replay: the complete episodes of the SAC run's first `end` env steps."""
    buffer = ReplayBuffer(len(state["buffer"]["rew"]), obs_dim, act_dim)
    buffer.load(state["buffer"])
    return buffer.episodes(end, obs_dtype)
