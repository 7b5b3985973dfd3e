"""Dynamics and reward error of synthetic transitions, measured in the real simulator: set the
simulator's state from a transition's state, apply its action, and compare the simulator's next state
and reward with the transition's.

Envs whose observation determines the simulator state:
- Pendulum-v1: obs (cos th, sin th, thdot) -> state (th, thdot);
- InvertedPendulum: obs = (qpos, qvel);
- Hopper, HalfCheetah, Walker2d (v4/v5 defaults): obs = (qpos[1:], clip(qvel, -10, 10)); the x
  position is not observed and does not enter the dynamics (set to 0); a velocity beyond the clip is
  not recoverable, so such rows carry that error too.
Other envs (Ant: contact forces are not in the state; AntMaze: goals) are not supported.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

MUJOCO_X_EXCLUDED = ("Hopper", "HalfCheetah", "Walker2d")


def supports(env_id: str) -> bool:
    return env_id.startswith(("Pendulum", "InvertedPendulum", *MUJOCO_X_EXCLUDED))


def simulate(env_id: str, obs: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The simulator's next observation (n, obs_dim) and reward (n,) from each (obs, act) row."""
    if not supports(env_id):
        raise ValueError(f"the dynamics error needs the simulator state from an observation, which {env_id} does "
                         "not give; supported: Pendulum, InvertedPendulum, Hopper, HalfCheetah, Walker2d")
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    out = np.empty_like(obs, dtype=np.float64)
    rew = np.empty(len(obs), np.float64)
    try:
        for i, (o, a) in enumerate(zip(np.asarray(obs, np.float64), np.asarray(act, np.float64))):
            if env_id.startswith("Pendulum"):
                env.state = np.array([np.arctan2(o[1], o[0]), o[2]])
            else:
                nq = env.model.nq
                qpos = o[:nq] if env_id.startswith("InvertedPendulum") else np.r_[0.0, o[: nq - 1]]
                env.set_state(qpos, o[len(qpos) - (0 if env_id.startswith("InvertedPendulum") else 1):])
            out[i], rew[i] = env.step(a.astype(np.float32))[:2]
    finally:
        env.close()
    return out, rew


def simulator_errors(env_id: str, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, rew: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the dynamics error (the mean squared difference between a transition's next state and the
    simulator's, over the observation's dimensions) and the reward error (transition's reward minus the
    simulator's)."""
    sim_next, sim_rew = simulate(env_id, obs, act)
    return np.mean((sim_next - next_obs) ** 2, axis=1), np.asarray(rew, np.float64) - sim_rew
