"""Phase 4 of the forge: where a family goes (`Destination`), the datasets written in D4RL's HDF5
layout and as Minari datasets (whose ownership is checked first), and the manifest saying how each
was made."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from offbench.data.catalog import forge_dir, forge_minari_id, forge_name, forge_slug
from offbench.data.identity import cached_fingerprint
from offbench.data.sources import read_d4rl_hdf5
from offbench.data.synthetic import Episode, minari_datasets_root, write_d4rl_hdf5, write_minari_dataset
from offbench.errors import UserError
from offbench.files import read_json
from offbench.forge.config import (
    FORMAT,
    KINDS,
    MANIFEST,
    ForgeConfig,
    dataset_seeds,
    eval_seed,
    reference_seed,
    selection_seed,
)
from offbench.forge.progress import _Progress
from offbench.forge.selection import Selection


@dataclass(frozen=True)


class Destination:
    """Where a family goes: its folder, and its Minari datasets."""

    out: Path
    in_catalog: bool  # `out` is the catalog's folder for the env: catalog names point here
    minari_root: Path
    minari_ids: dict[str, str]  # kind -> Minari id
    owner: str  # the mark, in the Minari datasets' descriptions, of the forge folder that wrote them

    @property
    def sac_dir(self) -> Path:
        return self.out / "sac"

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST


def destination(config: ForgeConfig, out: str | os.PathLike | None, minari_namespace: str | None) -> Destination:
    """The family's folder (default: where the catalog looks) and Minari datasets: those of the catalog's
    folder go to the user's Minari folder, those of any other folder stay with it, in `<out>/minari`."""
    out = Path(out) if out is not None else forge_dir(config.env_id)
    in_catalog = out.resolve() == forge_dir(config.env_id).resolve()  # catalog names point here
    minari_root = minari_datasets_root() if in_catalog else out.resolve() / "minari"
    namespace = minari_namespace or forge_minari_id(config.env_id, "x").rsplit("/", 1)[0]
    minari_ids = {kind: f"{namespace}/{kind}-v0" for kind in KINDS}
    return Destination(out, in_catalog, minari_root, minari_ids, f"forge folder {out.resolve()}")


def write_datasets(
    config: ForgeConfig, dest: Destination, episodes: dict[str, list[Episode]], env: gym.Env, chosen: Selection,
    bar: _Progress,
) -> dict[str, Any]:
    """Phase 4: each kind as `<out>/<kind>.hdf5` and as a Minari dataset; returns the manifest's `datasets`."""
    limit = int(env.spec.max_episode_steps)
    refs = chosen.refs
    made_by = {
        "random": "uniform random policy",
        "medium": f"SAC checkpoint at {chosen.medium['env_steps']} env steps, sampled actions",
        "medium-replay": f"SAC replay buffer, env steps 0..{chosen.medium['env_steps']} (complete episodes)",
        "expert": f"SAC checkpoint at {chosen.expert['env_steps']} env steps, sampled actions",
        "medium-expert": "medium episodes, then expert episodes",
    }
    datasets: dict[str, Any] = {}
    task = bar.task("writing", len(KINDS))
    for i, kind in enumerate(KINDS):
        file_name = f"{kind}.hdf5"
        minari_id = dest.minari_ids[kind]
        write_d4rl_hdf5(
            dest.out / file_name, episodes[kind], env_id=config.env_id, max_episode_steps=limit,
            ref_min=refs[0], ref_max=refs[1],
            attrs={"generator": f"offbench.forge ({kind}: {made_by[kind]}; seed {config.seed})", "kind": kind},
        )
        write_minari_dataset(
            minari_id, episodes[kind], env, algorithm_name=f"offbench forge: {made_by[kind]}",
            code_permalink="offbench/forge/",
            description=f"{kind} dataset of {config.env_id}: {made_by[kind]}; {dest.owner}",
            ref_min=refs[0], ref_max=refs[1], ref_episodes=config.ref_episodes, overwrite=True, root=dest.minari_root,
        )
        # the identity of these bytes (they depend on the machine: see `machine` in the manifest); cached beside the file
        fingerprint = cached_fingerprint(read_d4rl_hdf5(dest.out / file_name), dest.out / file_name)
        datasets[kind] = {
            "name": forge_name(config.env_id, kind) if dest.in_catalog else None, "hdf5": file_name,
            "fingerprint": fingerprint,
            "minari_id": minari_id, "minari_root": str(dest.minari_root),
            "made_by": made_by[kind], **_stats(episodes[kind], refs),
        }
        bar.update(task, i + 1, kind)
    return datasets


def build_manifest(
    config: ForgeConfig, state: dict[str, Any], chosen: Selection, datasets: dict[str, Any], env: gym.Env,
    wall_seconds: dict[str, float],
) -> dict[str, Any]:
    """The family's manifest.json: the config, every seed, the SAC run, how expert, medium and the
    references were chosen, the datasets, warnings, times and versions."""
    act_dim = env.action_space.shape[0]
    checkpoints = state["checkpoints"]
    expert_ckpt, medium_ckpt, target = chosen.expert, chosen.medium, chosen.target
    refs, random_ref, expert_ref = chosen.refs, chosen.random_ref, chosen.expert_ref
    select_seed, ref_seed = selection_seed(config), reference_seed(config)
    return {
        "format": FORMAT,
        "env_id": config.env_id,
        "slug": forge_slug(config.env_id),
        "max_episode_steps": int(env.spec.max_episode_steps),
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
                         for k, v in dataset_seeds(config).items()},
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
                for c, r in zip(chosen.candidates, chosen.selection)
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
        "warnings": chosen.warnings,
        "wall_seconds": wall_seconds,
        "versions": _versions(),
        "machine": machine(),
    }


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


def _versions() -> dict[str, str]:
    import gymnasium
    import minari

    return {"torch": torch.__version__, "gymnasium": gymnasium.__version__, "minari": minari.__version__}


def machine() -> dict[str, Any]:
    """The facts the forged bytes depend on: SAC is a float32 CPU computation whose rounding depends on the
    CPU's vector units, torch's kernels and the thread count, so another machine forges other data."""
    import platform

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    vector = sorted(flags & {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"})
    return {
        "cpu": cpu, "vector_flags": vector, "architecture": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(), "numpy": np.__version__, "python": platform.python_version(),
        "note": "forged data depends on the machine (float32 SAC on the CPU): compare the datasets' fingerprints",
    }
