"""Dataset name -> where the data is, how to evaluate on it, and how to score it.

The catalog is plain data: one `DatasetInfo` per name. `resolve` also accepts a path to a D4RL-layout
HDF5 file, whose env and reference scores come from the arguments or from the file's attributes.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from offbench.data.synthetic import RECIPES, data_root
from offbench.errors import MissingFileError, UserError
from offbench.scores import REF_SCORES


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the suite needs to know about one dataset besides its arrays."""

    name: str  # catalog name, or the file path for bring-your-own data
    source: Literal["d4rl", "minari", "hdf5", "synthetic"]
    location: str  # D4RL file name, Minari id, file path, or synthetic recipe id
    env_id: str  # gymnasium id of the evaluation env
    ref_min: float  # D4RL normalized score: 100 * (return - ref_min) / (ref_max - ref_min)
    ref_max: float
    max_episode_steps: int
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    obs_keys: tuple[str, ...] | None = None  # dict observations: keys concatenated in this order
    eval_episodes: int = 10  # protocol default: 10 on locomotion, 100 on AntMaze
    success_scored: bool = False  # AntMaze: an episode scores 1 when the goal is reached
    note: str = ""  # caveat to print next to results (e.g. not comparable with D4RL tables)
    fingerprint: str | None = None  # the arrays' expected fingerprint (offbench/data/identity.py), when pinned


# --------------------------------------------------------------------------- the catalog

LOCOMOTION = ("halfcheetah", "hopper", "walker2d")
GYM_NAME = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
ANTMAZE_OBS_KEYS = ("achieved_goal", "observation")  # D4RL's 29-dim AntMaze observation: xy, then the rest

# AntMaze evaluation maps in gymnasium-robotics' (row, col) indexing with one 'r' (start) and one 'g'
# (goal) cell: D4RL evaluates from a fixed start to a fixed goal (gymnasium-robotics adds +-1 of
# position noise to both, D4RL up to 1.5 to the goal). The walls are the maps Minari collected in
# (gymnasium_robotics maps.U_MAZE, MEDIUM_MAZE, LARGE_MAZE = D4RL's U_MAZE, BIG_MAZE, HARDEST_MAZE, same
# row order). Start and goal follow D4RL's eval maps (d4rl/locomotion/maze_env.py): BIG_MAZE_TEST
# (1,1)->(6,6) and HARDEST_MAZE_TEST (1,1)->(7,9), which are also the eval maps Minari stores for medium
# and large. Umaze uses (3,1)->(1,1), not U_MAZE_TEST's (1,1)->(3,1): D4RL puts row i at y = 4i and
# gymnasium-robotics at y = -4i, the U is symmetric under that flip, and (3,1)->(1,1) keeps D4RL's
# geometry (goal 8 up in y from the start); it is also the map Minari's umaze-v1 data was collected in,
# so that data's rewards refer to this goal. Minari's stored umaze eval map has the walls mirrored
# (Minari issue #304) and is not used.
R, G = "r", "g"
ANTMAZE_CELL_SIZE = 4.0  # gymnasium-robotics AntMaze's maze_size_scaling


def maze_goal_xy(maze_map: list[list], cell_size: float = ANTMAZE_CELL_SIZE) -> tuple[float, float]:
    """World (x, y) of the centre of the map's 'g' cell, in gymnasium-robotics' frame (maze centred
    at the origin, row i at y = height/2 - (i + 0.5) * cell_size)."""
    (row, col), = [(i, j) for i, line in enumerate(maze_map) for j, cell in enumerate(line) if cell == G]
    height, width = len(maze_map) * cell_size, len(maze_map[0]) * cell_size
    return (col + 0.5) * cell_size - width / 2, height / 2 - (row + 0.5) * cell_size
UMAZE_EVAL = [
    [1, 1, 1, 1, 1],
    [1, G, 0, 0, 1],
    [1, 1, 1, 0, 1],
    [1, R, 0, 0, 1],
    [1, 1, 1, 1, 1],
]
MEDIUM_EVAL = [
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, R, 0, 1, 1, 0, 0, 1],
    [1, 0, 0, 1, 0, 0, 0, 1],
    [1, 1, 0, 0, 0, 1, 1, 1],
    [1, 0, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 0, 0, 1, 0, 1],
    [1, 0, 0, 0, 1, 0, G, 1],
    [1, 1, 1, 1, 1, 1, 1, 1],
]
LARGE_EVAL = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, R, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
    [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
    [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
    [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
    [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
    [1, 0, 0, 1, 0, 0, 0, 1, 0, G, 0, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
]

# task -> (D4RL v0 file, gymnasium-robotics env Minari collected in, eval map, episode limit)
V0 = "Ant_maze_{}_noisy_multistart_{}_multigoal_{}_sparse.hdf5"  # D4RL infos.py DATASET_URLS, ant_maze_new/
ANTMAZE = {
    "umaze": (V0.format("u-maze", False, False), "AntMaze_UMaze-v4", UMAZE_EVAL, 700),
    "umaze-diverse": (V0.format("u-maze", True, True), "AntMaze_UMaze-v4", UMAZE_EVAL, 700),
    "medium-play": (V0.format("big-maze", True, False), "AntMaze_Medium-v4", MEDIUM_EVAL, 1000),
    "medium-diverse": (V0.format("big-maze", True, True), "AntMaze_Medium_Diverse_GR-v4", MEDIUM_EVAL, 1000),
    "large-play": (V0.format("hardest-maze", True, False), "AntMaze_Large-v4", LARGE_EVAL, 1000),
    "large-diverse": (V0.format("hardest-maze", True, True), "AntMaze_Large_Diverse_GR-v4", LARGE_EVAL, 1000),
}

MINARI_ANTMAZE_NOTE = (
    "Minari regeneration of D4RL AntMaze in gymnasium-robotics, not byte-identical to D4RL. Minari's own rewards "
    "refer to each episode's goal (random per episode except in umaze-v1); offbench relabels rewards and done to "
    "reaching the evaluation goal (within 0.5), as D4RL did: compare with D4RL tables with that caveat"
)

D4RL_ANTMAZE_NOTE = (
    "original D4RL file: loading it is not supported until a D4RL->gymnasium-robotics frame transform is "
    "verified; use the D4RL/antmaze/*-v1 Minari ids"
)


def _antmaze_info(
    name: str, source: str, location: str, env_id: str, eval_map: list, steps: int, note: str
) -> DatasetInfo:
    return DatasetInfo(
        name, source, location, env_id, *REF_SCORES["antmaze"], steps,
        env_kwargs={"maze_map": copy.deepcopy(eval_map), "continuing_task": False, "reset_target": False},
        obs_keys=ANTMAZE_OBS_KEYS, eval_episodes=100, success_scored=True, note=note,
    )


def _build_catalog() -> dict[str, DatasetInfo]:
    catalog: dict[str, DatasetInfo] = {}
    for env in LOCOMOTION:
        refs = REF_SCORES[env]
        for kind in ("medium", "medium-replay", "medium-expert", "expert", "random"):
            name = f"{env}-{kind}-v2"
            file_name = f"{env}_{kind.replace('-', '_')}-v2.hdf5"
            catalog[name] = DatasetInfo(name, "d4rl", file_name, f"{GYM_NAME[env]}-v4", *refs, 1000)
        for kind in ("simple", "medium", "expert"):
            name = f"mujoco/{env}/{kind}-v0"
            catalog[name] = DatasetInfo(
                name, "minari", name, f"{GYM_NAME[env]}-v5", *refs, 1000,
                note="Minari data from the v5 env, scored with D4RL's references: not comparable with D4RL tables",
            )
    for task, (file_name, env_id, eval_map, steps) in ANTMAZE.items():
        d4rl_name, minari_id = f"antmaze-{task}-v0", f"D4RL/antmaze/{task}-v1"
        catalog[d4rl_name] = _antmaze_info(d4rl_name, "d4rl", file_name, env_id, eval_map, steps, D4RL_ANTMAZE_NOTE)
        catalog[minari_id] = _antmaze_info(minari_id, "minari", minari_id, env_id, eval_map, steps, MINARI_ANTMAZE_NOTE)
    for recipe_name, r in RECIPES.items():
        name = f"synthetic/{recipe_name}"
        catalog[name] = DatasetInfo(
            name, "synthetic", recipe_name, r.env_id, r.ref_min, r.ref_max, r.max_episode_steps, note=r.note
        )
    return catalog


CATALOG: dict[str, DatasetInfo] = _build_catalog()


# --------------------------------------------------------------------------- forged datasets
#
# `offbench data forge` (offbench/forge/) writes D4RL's five datasets for an env into
# <data root>/forge/<slug>/ with a manifest.json written last; the names below resolve there, with
# the reference scores the forge measured. A missing family is not forged on demand (it takes
# minutes to hours): the error gives the exact command.

FORGE_KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
FORGE_VERSION = 0  # the `-v0` of forged dataset names and Minari ids


@dataclass(frozen=True)
class ForgeEnv:
    """An env the forge has a preset for: its short catalog name, default preset and measured cost."""

    env_id: str
    preset: str
    cost: str  # wall time of the preset, as measured (README, "Dataset forge")


FORGE_ENVS: dict[str, ForgeEnv] = {
    "pendulum": ForgeEnv("Pendulum-v1", "small", "about 2 minutes on a free CPU core (5 on a busy 2-core machine)"),
    "invertedpendulum": ForgeEnv(
        "InvertedPendulum-v5", "small", "about 5 minutes on a free CPU core (10 on a busy 2-core machine)"
    ),
    "hopper": ForgeEnv("Hopper-v4", "d4rl", "about 5 hours on a CPU core (1M SAC updates; estimated in docs/data.md)"),
    "halfcheetah": ForgeEnv("HalfCheetah-v4", "d4rl", "about 5 hours on a CPU core (1M SAC updates; estimated in docs/data.md)"),
    "walker2d": ForgeEnv("Walker2d-v4", "d4rl", "about 5 hours on a CPU core (1M SAC updates; estimated in docs/data.md)"),
}
_FORGE_NAME = re.compile(
    r"forge/(?P<slug>[\w.-]+?)-(?P<kind>random|medium-replay|medium-expert|medium|expert)-v(?P<version>\d+)"
)


def forge_slug(env_id: str) -> str:
    """Short name of an env in forge names and folders: `pendulum` for Pendulum-v1 (the preset envs),
    else the lower-cased id (`ant-v4`)."""
    for slug, entry in FORGE_ENVS.items():
        if entry.env_id == env_id:
            return slug
    return env_id.lower()


def forge_dir(env_id: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where `offbench data forge --env ENV_ID` writes by default and where forge names are looked up:
    <data root>/forge/<slug> (data root: $OFFBENCH_DATA_DIR, else ~/.offbench/datasets)."""
    return data_root(data_dir) / "forge" / forge_slug(env_id)


def forge_name(env_id: str, kind: str) -> str:
    """Catalog name of a forged dataset: forge/<slug>-<kind>-v0."""
    return f"forge/{forge_slug(env_id)}-{kind}-v{FORGE_VERSION}"


def forge_minari_id(env_id: str, kind: str) -> str:
    """Minari id of a forged dataset: offbench/<slug>/<kind>-v0."""
    return f"offbench/{forge_slug(env_id)}/{kind}-v{FORGE_VERSION}"


def unforged_family(name: str) -> ForgeEnv | None:
    """The preset env behind forge name `name` when its family has not been forged here yet, else None."""
    match = _FORGE_NAME.fullmatch(name)
    if match is None or (data_root() / "forge" / match["slug"] / "manifest.json").is_file():
        return None
    return FORGE_ENVS.get(match["slug"])


def forge_command(env_id: str, directory: str | os.PathLike | None = None) -> str:
    """The command that forges `env_id`'s family where the catalog looks for it."""
    entry = next((e for e in FORGE_ENVS.values() if e.env_id == env_id), None)
    preset = f" --preset {entry.preset}" if entry else " --preset d4rl"
    return f"offbench data forge --env {env_id}{preset} --out {directory or forge_dir(env_id)}"


def _env_of_slug(slug: str) -> str | None:
    if slug in FORGE_ENVS:
        return FORGE_ENVS[slug].env_id
    import gymnasium as gym

    return next((env_id for env_id in gym.registry if env_id.lower() == slug), None)


def _forge_info(name: str) -> DatasetInfo:
    match = _FORGE_NAME.fullmatch(name)
    if match is None or int(match["version"]) != FORGE_VERSION:
        examples = ", ".join(forge_name(e.env_id, "medium") for e in list(FORGE_ENVS.values())[:2])
        raise UserError(
            f"{name!r} is not a forge name: forge/<env>-<kind>-v{FORGE_VERSION} with kind one of "
            f"{', '.join(FORGE_KINDS)} (e.g. {examples})"
        )
    slug, kind = match["slug"], match["kind"]
    directory = data_root() / "forge" / slug
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        env_id = _env_of_slug(slug)
        if env_id is None:
            raise UserError(f"{name!r}: no forged data at {directory} and {slug!r} names no known env")
        entry = FORGE_ENVS.get(slug)
        cost = f"\nIt takes {entry.cost}." if entry else ""
        raise MissingFileError(
            f"{name} has not been forged on this machine (no {manifest_path}). Make the family (random, medium, "
            f"medium-replay, expert, medium-expert) with:\n  {forge_command(env_id, directory)}{cost}"
        )
    return _manifest_info(name, directory, json.loads(manifest_path.read_text()), kind)


def _manifest_info(name: str, directory: Path, manifest: dict[str, Any], kind: str, shipped: bool = False
                   ) -> DatasetInfo:
    """Dataset `kind` of a forge's manifest in `directory` (forged on this machine, or shipped with the suite
    and then pinned to the manifest's fingerprint): its file, env, episode limit and the forge's references."""
    refs = manifest["references"]
    made = f"forged by offbench data forge (SAC, seed {manifest['config']['seed']})"
    if shipped:
        made = f"shipped with offbench: {made} on {manifest['machine']['cpu']}"
    return DatasetInfo(
        name, "hdf5", str(directory / manifest["datasets"][kind]["hdf5"]), manifest["env_id"],
        float(refs["ref_min"]), float(refs["ref_max"]), int(manifest["max_episode_steps"]),
        note=f"{made}; scored with the forge's own references (mean returns of the random and the expert policy), "
        "not D4RL's",
        fingerprint=manifest["fingerprints"][kind] if shipped else None,
    )


# --------------------------------------------------------------------------- shipped datasets
#
# Forged data depends on the machine that forged it (its SAC run is a float32 CPU computation), so the
# datasets behind the committed results are shipped with the suite, with their fingerprints:
# offbench/data/shipped/<slug>/ holds the forge's HDF5 files and its manifest.json (settings, machine,
# references, and `fingerprints`). Their names are `shipped/<slug>-<kind>-v0`; loading one checks the
# data against the pinned fingerprint.

SHIPPED_DIR = Path(__file__).parent / "shipped"
_SHIPPED_NAME = re.compile(r"shipped/(?P<slug>[\w.-]+?)-(?P<kind>random|medium-replay|medium-expert|medium|expert)-v0")


def shipped_names() -> list[str]:
    """Every shipped dataset's catalog name."""
    names = []
    for manifest_path in sorted(SHIPPED_DIR.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        names += [f"shipped/{manifest_path.parent.name}-{kind}-v0" for kind in manifest["datasets"]]
    return names


def _shipped_info(name: str) -> DatasetInfo:
    match = _SHIPPED_NAME.fullmatch(name)
    manifest_path = SHIPPED_DIR / match["slug"] / "manifest.json" if match else None
    manifest = json.loads(manifest_path.read_text()) if manifest_path and manifest_path.is_file() else None
    if manifest is None or match["kind"] not in manifest["datasets"]:
        raise UserError(f"unknown shipped dataset {name!r}; the shipped datasets are {', '.join(shipped_names())}")
    return _manifest_info(name, manifest_path.parent, manifest, match["kind"], shipped=True)


# --------------------------------------------------------------------------- resolve


def resolve(
    name: str,
    *,
    env_id: str | None = None,
    ref_family: str | None = None,
    ref_min: float | None = None,
    ref_max: float | None = None,
    max_episode_steps: int | None = None,
    env_id_flag: str = "--data.env_id",
) -> DatasetInfo:
    """The `DatasetInfo` of a catalog name, a forged dataset (`forge/<env>-<kind>-v0`, read from the
    forge's manifest; FileNotFoundError with the command that makes it when it is missing), a shipped one
    (`shipped/<env>-<kind>-v0`, with its pinned fingerprint) or a path
    to a D4RL-layout HDF5 file.

    Arguments that are given replace the catalog's (or the file's) values: `env_id`, the reference
    scores (`ref_family` from offbench.scores.REF_SCORES, or `ref_min` and `ref_max`) and
    `max_episode_steps`. `env_id_flag` names the option `env_id` came from in error messages.
    """
    refs = _refs_from_args(ref_family, ref_min, ref_max)
    if name in CATALOG:
        info = CATALOG[name]
    elif name.startswith("forge/"):
        info = _forge_info(name)
    elif name.startswith("shipped/"):
        info = _shipped_info(name)
    elif name.endswith((".hdf5", ".h5")) or Path(name).is_file():
        info = _hdf5_info(name, env_id, refs, max_episode_steps)
    else:
        close = difflib.get_close_matches(name, list(CATALOG), n=5, cutoff=0.5)
        suggestion = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown dataset {name!r}.{suggestion} Run `offbench data info NAME` to check a name; for your own "
            "data pass a path to a D4RL-layout .hdf5 file with --data.env_id and --data.ref_family "
            "(or --data.ref_min/--data.ref_max)."
        )
    changes: dict[str, Any] = {}
    if env_id is not None:
        check_env_id(env_id, f"{env_id_flag}, given on the command line")
        changes["env_id"] = env_id
    if refs is not None:
        changes["ref_min"], changes["ref_max"] = refs
    if max_episode_steps is not None:
        changes["max_episode_steps"] = int(max_episode_steps)
    info = replace(info, **changes)
    if info.ref_min == info.ref_max and not info.success_scored:
        source = "given on the command line" if refs is not None else f"the reference scores of {name}"
        raise UserError(
            f"ref_min equals ref_max ({info.ref_min}, {source}): the normalized score 100 * (return - ref_min) / "
            "(ref_max - ref_min) is undefined; pass references that differ (--data.ref_min R_RANDOM --data.ref_max "
            "R_EXPERT, or --data.ref_family)"
        )
    return info


def _refs_from_args(ref_family: str | None, ref_min: float | None, ref_max: float | None) -> tuple[float, float] | None:
    if ref_family is not None:
        if ref_min is not None or ref_max is not None:
            raise UserError("pass either --data.ref_family or --data.ref_min/--data.ref_max, not both")
        if ref_family not in REF_SCORES:
            raise UserError(f"unknown ref_family {ref_family!r}; known families: {sorted(REF_SCORES)}")
        return REF_SCORES[ref_family]
    if (ref_min is None) != (ref_max is None):
        raise UserError("pass both --data.ref_min and --data.ref_max (or --data.ref_family)")
    if ref_min is None:
        return None
    return float(ref_min), float(ref_max)


@contextlib.contextmanager
def open_hdf5(path: str | os.PathLike) -> Iterator[Any]:
    """`h5py.File(path, "r")`, with a file that h5py cannot read (truncated by an interrupted copy or
    download, or not HDF5 at all) reported as a UserError naming the path."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            yield f
    except UserError:
        raise
    except OSError as e:
        raise UserError(
            f"{path} is not a readable HDF5 file ({e}); it is probably truncated (an interrupted copy or "
            "download) or not HDF5: copy, download or write it again"
        ) from e


def _hdf5_info(
    path: str, env_id: str | None, refs: tuple[float, float] | None, max_episode_steps: int | None
) -> DatasetInfo:
    """A bring-your-own file: env and references from the arguments, else from the file's attributes
    (`env_id`, `ref_min`, `ref_max`, `max_episode_steps`, as offbench's synthetic writer stores them)."""
    if not Path(path).is_file():
        raise MissingFileError(f"no HDF5 file at {path}")
    with open_hdf5(path) as f:
        attrs = {k: f.attrs[k] for k in ("env_id", "ref_min", "ref_max", "max_episode_steps") if k in f.attrs}
    if env_id is None and "env_id" in attrs:
        env_id = str(attrs["env_id"])
        check_env_id(env_id, f"the `env_id` attribute of {path} (pass --data.env_id to override it)")
    if refs is None and "ref_min" in attrs and "ref_max" in attrs:
        refs = float(attrs["ref_min"]), float(attrs["ref_max"])
    if env_id is None or refs is None:
        absent = [what for what, value in (("the evaluation env", env_id), ("reference scores", refs)) if value is None]
        missing = " and ".join(absent)
        raise UserError(
            f"{path} does not say {missing}: pass them, e.g. --data.env_id Hopper-v4 --data.ref_family hopper "
            "(or --data.ref_min R_RANDOM --data.ref_max R_EXPERT)"
        )
    if max_episode_steps is None:
        max_episode_steps = int(attrs["max_episode_steps"]) if "max_episode_steps" in attrs else _spec_limit(env_id)
    return DatasetInfo(path, "hdf5", path, env_id, refs[0], refs[1], max_episode_steps)


def check_env_id(env_id: str, where: str) -> None:
    """A UserError saying where `env_id` came from when it is not a registered gymnasium (or
    gymnasium-robotics) env id, with the closest registered ids."""
    import gymnasium as gym

    if env_id in gym.registry:
        return
    with contextlib.suppress(ImportError):
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown env id {env_id!r} (from {where}): not a registered gymnasium or gymnasium-robotics env.{hint}")


def _spec_limit(env_id: str) -> int:
    """The registered episode limit of `env_id` (gymnasium-robotics ids are registered on demand)."""
    import gymnasium as gym

    if env_id not in gym.registry:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    if env_id not in gym.registry:
        raise UserError(f"{env_id!r} is not a registered gymnasium or gymnasium-robotics env id")
    steps = gym.spec(env_id).max_episode_steps
    if steps is None:
        raise UserError(f"{env_id} has no registered episode limit: pass --data.max_episode_steps")
    return int(steps)
