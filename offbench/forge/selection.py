"""Phase 2 of the forge: the expert (the best of the top checkpoints, evaluated again), the reference
returns (random and expert policies), and the medium checkpoint (closest to a third of the way)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from offbench.evaluation import evaluate, isolated_rng
from offbench.forge.config import ForgeConfig, reference_seed, selection_seed
from offbench.forge.envs import ActionScale, _actor_policy, _eval_info, _random_policy, _torch_policy
from offbench.forge.progress import _Progress
from offbench.forge.sac import _load_actor
from offbench.sac import TanhGaussianActor


@dataclass


class Selection:
    """What phase 2 chose: the expert and medium checkpoints with their actors, and the references."""

    candidates: list[dict[str, Any]]  # the expert candidates
    selection: list[float]  # their re-evaluated mean returns
    expert: dict[str, Any]  # the expert's checkpoint entry
    expert_actor: TanhGaussianActor
    random_ref: dict[str, Any]  # evaluate() of the uniform random policy
    expert_ref: dict[str, Any]  # evaluate() of the expert
    target: float  # the return the medium checkpoint is chosen for
    medium: dict[str, Any]
    medium_actor: TanhGaussianActor
    warnings: list[str]
    seconds: float

    @property
    def refs(self) -> tuple[float, float]:
        """(ref_min, ref_max): the mean returns of the random policy and of the expert."""
        return self.random_ref["return"], self.expert_ref["return"]


def select_policies(
    config: ForgeConfig, sac_dir: Path, checkpoints: list[dict[str, Any]], env: gym.Env, bar: _Progress
) -> Selection:
    """Phase 2: expert, references, medium. The best of 10-episode evaluations over many checkpoints
    overrates its checkpoint (the maximum of noisy estimates), so the top candidates are evaluated
    again over `select_episodes` episodes, and the references use yet other episodes."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    scale = ActionScale(env.action_space)
    info = _eval_info(config, int(env.spec.max_episode_steps))
    t0 = time.perf_counter()
    candidates = expert_candidates(checkpoints, config.expert_candidates)
    bar.log(
        f"choosing the expert among checkpoints {[c['env_steps'] for c in candidates]} ({config.select_episodes} "
        f"episodes each), then reference scores over {config.ref_episodes} episodes"
    )
    select_seed, ref_seed = selection_seed(config), reference_seed(config)
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
    seconds = time.perf_counter() - t0
    bar.log(
        f"references over {config.ref_episodes} episodes: random {refs[0]:.1f}, expert {refs[1]:.1f} (checkpoint "
        f"{expert_ckpt['env_steps']}); medium target {target:.1f} -> checkpoint {medium_ckpt['env_steps']} "
        f"(evaluated {medium_ckpt['eval_return']:.1f})"
    )
    return Selection(candidates, selection, expert_ckpt, expert_actor, random_ref, expert_ref, target, medium_ckpt,
                     medium_actor, warnings, seconds)


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
