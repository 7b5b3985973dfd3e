"""`forge`: the four phases in order (SAC, expert and references, rollouts, writing), with the rules
for a finished family, other settings, `force` and an interrupted run."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch

from offbench.errors import UserError
from offbench.files import read_json, write_json_atomic
from offbench.forge.config import ForgeConfig
from offbench.forge.envs import _make_env
from offbench.forge.progress import _Progress
from offbench.forge.rollouts import collect_episodes
from offbench.forge.sac import _train_sac
from offbench.forge.selection import select_policies
from offbench.forge.writing import Destination, _check_minari_ids, build_manifest, destination, write_datasets


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
    dest = destination(config, out, minari_namespace)
    finished = _finished_family(config, dest, force)
    if finished is not None:
        return finished
    _check_minari_ids(list(dest.minari_ids.values()), dest.owner, dest.minari_root, config)
    dest.out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    with _Progress(progress) as bar:
        state = _train_sac(config, dest.sac_dir, bar)
        env = _make_env(config)
        chosen = select_policies(config, dest.sac_dir, state["checkpoints"], env, bar)
        # The manifest goes before the rollouts: the family is incomplete until it is rewritten.
        dest.manifest_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        episodes = collect_episodes(config, state, chosen, env, bar)
        rollout_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        datasets = write_datasets(config, dest, episodes, env, chosen, bar)
        env.close()
        write_seconds = time.perf_counter() - t0

    manifest = build_manifest(config, state, chosen, datasets, env, {
        "sac": state["seconds"], "references": chosen.seconds, "rollouts": rollout_seconds, "writing": write_seconds,
        "this_run": time.perf_counter() - wall,
    })
    write_json_atomic(dest.manifest_path, manifest)
    return manifest


def _finished_family(config: ForgeConfig, dest: Destination, force: bool) -> dict[str, Any] | None:
    """The manifest of a finished family of the same settings (it is kept), or None when there is work to
    do. Another family, or an interrupted SAC run of other settings, is an error unless `force`, which
    deletes the folder's manifest and SAC run first."""
    out, sac_dir, manifest_path = dest.out, dest.sac_dir, dest.manifest_path
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
    return None
