"""`offbench bench GRID.yaml`: run a grid of (algorithm x dataset x seed) cells and tabulate them.

Every cell is one `offbench fit` in its own subprocess and its own run directory
`<output>/runs/<algorithm>/<dataset>/seed<k>`, so a crash, a NaN loss or a kill stays inside its
cell. The run directory is the state: a cell with `result.json` (written atomically at the end of
a fit) is finished and skipped, a cell with `checkpoints/last.ckpt` but no result is continued with
`--ckpt_path last`, anything else starts fresh. Re-running the same command therefore resumes an
interrupted grid. Failed cells are listed with their reason in `<output>/failures.json` (their
full output is in `<run dir>/bench.log`) and are tried again on the next run.

A grid file (YAML; relative paths are relative to the working directory):

    name: quick                        # output goes to results/<name>/ unless `output:` is given
    seeds: 2                           # a count (0..n-1) or a list of seeds
    updates: 10000                     # the settings below may appear at the top level, in an
    eval_every: 2000                   #   algorithm entry, and in `overrides` blocks (per dataset,
    eval_episodes: 5                   #   at the top level or inside an algorithm); the most
    block_size: 500                    #   specific one wins; `args` and `config` accumulate
    args: [--eval.num_envs, 5]         # extra `offbench fit` arguments
    algorithms:
      - name: bc
        config: configs/algorithms/bc.yaml
      - name: diffcps
        config: configs/algorithms/diffcps.yaml
        overrides:
          hopper-medium-v2: {config: configs/tasks/diffcps/hopper-medium-v2.yaml}
    datasets: [synthetic/hopper-random-v0, hopper-medium-v2]
    overrides:
      hopper-medium-v2: {updates: 2000000}
    references: configs/references/table1.yaml   # optional paper numbers for the tables
    wandb: {project: offbench, mode: offline}    # optional: every cell also logs to W&B (`true` for the
                                                 #   defaults; pip install 'offbench[wandb]'), see below

The fit arguments of a cell are, in order: the algorithm config, the extra configs (top level,
top-level dataset override, the algorithm's dataset override), dataset, seed, budget, evaluation
protocol, run directory, the W&B arguments when the grid has `wandb:` (`--logger wandb`, the grid's
name as the W&B group, the run name algorithm/dataset/seed<k>, its options), then `args` (top level,
dataset override, algorithm, algorithm's dataset override): later arguments win, as in `offbench fit`.

Launchers. `local` (the default) runs the cells as subprocesses of this machine, `--workers N` at a
time, GPUs round-robin. `ray` (`--launcher ray`; `pip install 'offbench[ray]'`) hands each cell to a
Ray cluster as one task, which runs the same `offbench fit` subprocess on whichever node has room:
`--address` names the cluster (default: $RAY_ADDRESS, else the cluster that `ray start` made on this
machine, else a new local Ray instance), `--cpus-per-cell` and `--gpus-per-cell` are each task's
resources (a GPU share such as 0.5 lets several cells use one GPU at once), and `--workers` caps the
cells in flight (default: whatever the cluster fits). The nodes must share the filesystem with this
machine (repository, datasets, output directory) and its Python environment: a cell runs in this
working directory and writes the same run directory and files as a local one, so skipping, resuming
and the failure records are the same. The runner itself (its lock, progress display, failures.json
and tables) stays on this machine; a cell is never retried by Ray (a failure is recorded, and the
next run tries it again), and Ctrl+C stops the running cells before the lock goes.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from offbench.errors import UserError
from offbench.files import read_json, run_dir_holder, write_json_atomic

SETTING_KEYS = ("config", "args", "updates", "eval_every", "eval_episodes", "block_size")
GRID_KEYS = ("name", "description", "output", "seeds", "algorithms", "datasets", "overrides", "references", "wandb",
             *SETTING_KEYS)
WANDB_KEYS = ("project", "entity", "tags", "mode")  # a grid's `wandb:` options; group and run names come from the grid
ALGORITHM_KEYS = ("name", "overrides", *SETTING_KEYS)
LOG_TAIL_LINES = 25  # lines of a failed cell's output kept as its reason in failures.json
# The driver's variables that a Ray cell gets too: where the datasets are (the nodes share the disk).
RAY_FORWARD_ENV = ("OFFBENCH_", "MINARI_", "OMP_NUM_THREADS")

CellState = Literal["finished", "resume", "fresh", "running", "stale"]


class GridError(ValueError):
    """A grid file that cannot be expanded; the message lists every problem found."""


@dataclass(frozen=True)
class Cell:
    """One (algorithm, dataset, seed) run: its run directory and its `offbench` argument list."""

    algorithm: str
    dataset: str
    seed: int
    run_dir: Path
    args: list[str]  # `offbench` argv, starting with "fit"; `--ckpt_path last` is added when resuming
    updates: int

    @property
    def id(self) -> str:
        return f"{self.algorithm}/{dataset_slug(self.dataset)}/seed{self.seed}"


@dataclass
class Grid:
    """An expanded grid file."""

    name: str
    path: Path
    output: Path
    seeds: list[int]
    algorithms: list[str]
    datasets: list[str]
    cells: list[Cell]
    references: Path | None = None
    description: str = ""


# --------------------------------------------------------------------------- grid files


def dataset_slug(dataset: str) -> str:
    """A directory name for a dataset: `D4RL/antmaze/umaze-v1` -> `D4RL-antmaze-umaze-v1`; a file path
    -> its stem."""
    if dataset.endswith((".hdf5", ".h5")):
        dataset = Path(dataset).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-")


def expand_grid(path: str | os.PathLike) -> list[Cell]:
    """The cells of a grid file (algorithms x datasets x seeds, in that nesting order)."""
    return load_grid(path).cells


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file; raises GridError naming every problem (unknown keys, missing
    config files, unknown datasets, budgets that do not fit) before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"no grid file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file is a YAML mapping (name, algorithms, datasets, seeds, ...)")
    problems: list[str] = []
    _check_keys(raw, GRID_KEYS, "the grid", problems)

    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        problems.append(f"`name` must be a plain name (letters, digits, _ . -), got {name!r}")
        name = path.stem
    output = Path(raw.get("output") or Path("results") / name)
    seeds = _seeds(raw.get("seeds"), problems)

    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
        problems.append("`datasets` must be a non-empty list of dataset names (catalog names or .hdf5 paths)")
        datasets = []
    _check_datasets(datasets, problems)

    overrides = _overrides(raw.get("overrides"), datasets, "the grid's `overrides`", problems)
    wandb = _wandb_args(raw.get("wandb"), name, problems)
    references = raw.get("references")
    if references is not None and not Path(references).is_file():
        problems.append(f"`references`: no file at {references}")

    algorithms = raw.get("algorithms")
    if not isinstance(algorithms, list) or not algorithms:
        problems.append("`algorithms` must be a non-empty list of {name, config, ...} entries")
        algorithms = []
    names: list[str] = []
    cells: list[Cell] = []
    for i, entry in enumerate(algorithms):
        where = f"algorithms[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with `name` and `config`, got {entry!r}")
            continue
        algo = entry.get("name")
        where = f"algorithms[{i}] ({algo})"
        _check_keys(entry, ALGORITHM_KEYS, where, problems)
        if not isinstance(algo, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", algo):
            problems.append(f"{where}: `name` must be a plain name (letters, digits, _ . -)")
            continue
        if algo in names:
            problems.append(f"{where}: the name {algo!r} appears twice (it names the results column and directory)")
        names.append(algo)
        if not entry.get("config"):
            problems.append(f"{where}: `config` (the algorithm's YAML, e.g. configs/algorithms/bc.yaml) is required")
            continue
        algo_overrides = _overrides(entry.get("overrides"), datasets, f"{where} `overrides`", problems)
        for dataset in datasets:
            # The most specific level wins for scalars; configs and args accumulate in this order.
            levels = [raw, overrides.get(dataset, {}), entry, algo_overrides.get(dataset, {})]
            settings = _merge(levels, where, problems)
            # The algorithm's config first, then the extra configs from general to specific.
            extra_levels = (raw, overrides.get(dataset, {}), algo_overrides.get(dataset, {}))
            configs = [*_list(entry.get("config"))] + [c for level in extra_levels for c in _list(level.get("config"))]
            for config in configs:
                _check_config(config, where, problems)
            for seed in seeds:
                run_dir = output / "runs" / algo / dataset_slug(dataset) / f"seed{seed}"
                run_name = [] if wandb is None else [*wandb, "--wandb.name", f"{algo}/{dataset}/seed{seed}"]
                cells.append(_cell(algo, dataset, seed, run_dir, configs, settings, run_name))
    if problems:
        # Many identical messages come from one bad setting repeated over datasets: report each once.
        unique = list(dict.fromkeys(problems))
        raise GridError(f"{path}: {len(unique)} problem(s):\n  - " + "\n  - ".join(unique))
    return Grid(
        name, path, output, seeds, names, list(datasets), cells,
        Path(references) if references else None, str(raw.get("description") or ""),
    )


def _cell(
    algo: str, dataset: str, seed: int, run_dir: Path, configs: list[str], s: dict[str, Any], logger: list[str]
) -> Cell:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    args += ["--data.dataset", dataset, "--seed_everything", str(seed)]
    args += ["--updates", str(s["updates"]), "--data.eval_every", str(s["eval_every"])]
    if s.get("block_size") is not None:
        args += ["--data.block_size", str(s["block_size"])]
    if s.get("eval_episodes") is not None:  # None: the dataset's protocol (10 locomotion, 100 AntMaze)
        args += ["--eval.episodes", str(s["eval_episodes"])]
    # The grid's own progress display replaces the per-cell bar (it would fill the cell's log).
    args += ["--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false"]
    args += logger  # W&B: before the grid's `args`, which may override it
    args += s["args"]
    return Cell(algo, dataset, seed, run_dir, args, int(s["updates"]))


def _wandb_args(value: Any, grid_name: str, problems: list[str]) -> list[str] | None:
    """`offbench fit` arguments for a grid's `wandb:` (true, false or a mapping of WANDB_KEYS): one W&B
    group per grid, named after it; None when the grid does not log to W&B."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"`wandb` must be true, false or a mapping of {', '.join(WANDB_KEYS)}, got {value!r}")
        return None
    _check_keys(value, WANDB_KEYS, "`wandb`", problems)
    if value.get("mode") not in (None, "offline", "online"):
        problems.append(f"`wandb.mode` must be offline or online, got {value['mode']!r}")
    if importlib.util.find_spec("wandb") is None:
        problems.append("`wandb` logging needs the wandb package, which is not installed. Install it with: "
                        "pip install 'offbench[wandb]'")
    args = ["--logger", "wandb", "--wandb.group", grid_name]
    for key in ("project", "entity", "mode"):
        if value.get(key) is not None:
            args += [f"--wandb.{key}", str(value[key])]
    if value.get("tags"):
        args += ["--wandb.tags", json.dumps([str(t) for t in value["tags"]])]
    return args


def _merge(levels: list[dict[str, Any]], where: str, problems: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {"args": []}
    for level in levels:
        for key in ("updates", "eval_every", "eval_episodes", "block_size"):
            if key in level:
                settings[key] = level[key]
        settings["args"] += _args(level.get("args"), where, problems)
    for key in ("updates", "eval_every"):
        value = settings.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{where}: `{key}` must be a positive integer (set it at the top level), got {value!r}")
            settings[key] = 1
    for key in ("eval_episodes", "block_size"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            problems.append(f"{where}: `{key}` must be a positive integer or null, got {value!r}")
    if settings["updates"] % settings["eval_every"]:
        problems.append(
            f"{where}: updates {settings['updates']} is not a multiple of eval_every {settings['eval_every']} "
            "(every run ends on an evaluation)"
        )
    return settings


def _check_keys(mapping: dict[str, Any], allowed: tuple[str, ...], where: str, problems: list[str]) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _seeds(value: Any, problems: list[str]) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            problems.append(f"`seeds` lists a seed twice: {value}")
        return list(value)
    problems.append(f"`seeds` must be a positive count or a non-empty list of integers, got {value!r}")
    return []


def _check_datasets(datasets: list[str], problems: list[str]) -> None:
    from offbench.data.catalog import resolve, unforged_family

    if len(set(datasets)) != len(datasets):
        problems.append(f"`datasets` lists a name twice: {datasets}")
    for name in datasets:
        family = unforged_family(name)
        if family is not None and family.preset == "small":
            continue  # forged (minutes) before the cells start, see _prepare_datasets
        try:
            resolve(name)
        except (ValueError, FileNotFoundError, OSError) as e:
            problems.append(f"dataset {name!r}: {e}")


def _overrides(value: Any, datasets: list[str], where: str, problems: list[str]) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where} must map dataset names to settings ({', '.join(SETTING_KEYS)})")
        return {}
    for dataset, settings in value.items():
        if dataset not in datasets:
            problems.append(f"{where}: {dataset!r} is not in `datasets` (overrides apply to listed datasets only)")
        if not isinstance(settings, dict):
            problems.append(f"{where}[{dataset!r}] must be a mapping of settings ({', '.join(SETTING_KEYS)})")
            continue
        _check_keys(settings, SETTING_KEYS, f"{where}[{dataset!r}]", problems)
    return {d: s for d, s in value.items() if isinstance(s, dict)}


def _args(value: Any, where: str, problems: list[str]) -> list[str]:
    """`args` as a list (numbers allowed) or one shell-quoted string."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(a, str | int | float | bool) for a in value):
        return [str(a).lower() if isinstance(a, bool) else str(a) for a in value]
    problems.append(f"{where}: `args` must be a list of command-line arguments or one string, got {value!r}")
    return []


def _list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _check_config(config: Any, where: str, problems: list[str]) -> None:
    if not isinstance(config, str):
        problems.append(f"{where}: a config must be a path, got {config!r}")
    elif not Path(config).is_file():
        problems.append(f"{where}: config file {config} does not exist (paths are relative to {Path.cwd()})")
    else:
        try:
            loaded = yaml.safe_load(Path(config).read_text())
        except yaml.YAMLError as e:
            problems.append(f"{where}: config {config} is not valid YAML: {e}")
            return
        if not isinstance(loaded, dict):
            problems.append(f"{where}: config {config} is not a YAML mapping of `offbench fit` settings")


# --------------------------------------------------------------------------- state of a cell


def cell_state(cell: Cell) -> CellState:
    """running: a process (a cell of an earlier runner, a fit by hand) holds the run directory's lock;
    stale: the run has a result or a checkpoint made with other arguments than the grid file's now;
    finished: result.json exists; resume: a checkpoint but no result; fresh: nothing to continue."""
    if run_dir_holder(cell.run_dir) is not None:
        return "running"
    finished = (cell.run_dir / "result.json").exists()
    resume = (cell.run_dir / "checkpoints" / "last.ckpt").exists()
    if (finished or resume) and stale_arguments(cell):
        return "stale"
    return "finished" if finished else "resume" if resume else "fresh"


def _unreadable_result(cell: Cell) -> str:
    """Why a finished cell's result.json cannot be read (a damaged file: it is written atomically), with
    the way out; empty when it reads."""
    from offbench.errors import UserError

    try:
        read_json(
            cell.run_dir / "result.json",
            fix=f"delete it and run the grid again: the cell then resumes from {cell.run_dir / 'checkpoints/last.ckpt'} "
            "and writes it again (or delete the run directory to run the cell from the start)",
        )
    except UserError as e:
        return str(e)
    return ""


def stale_arguments(cell: Cell) -> str:
    """How the arguments recorded in the cell's `cell.json` (those its run was made with) differ from
    the grid file's now, as `old -> new` pieces; empty when they agree or nothing is recorded."""
    recorded = read_json(cell.run_dir / "cell.json", fix="delete it (the runner writes it again when the cell starts)")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), list):
        return ""
    old, new = [str(a) for a in recorded["args"]], cell.args
    pieces = [
        f"{shlex.join(old[i1:i2]) or '(none)'} -> {shlex.join(new[j1:j2]) or '(none)'}"
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes()
        if tag != "equal"
    ]
    return "; ".join(pieces)


def set_aside(cell: Cell, output: Path) -> Path:
    """Move a stale cell's run directory out of the grid's output (to `<output>.stale/<time>/...`), so
    that the tables never mix its results with those of the grid's current settings."""
    target = output.with_name(f"{output.name}.stale") / time.strftime("%Y%m%d-%H%M%S") / cell.run_dir.relative_to(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(cell.run_dir, target)
    return target


def cell_command(cell: Cell, state: CellState, devices: str = "cpu") -> list[str]:
    """The subprocess command of a cell: `python -m offbench.cli fit ...` (the interpreter running
    the grid, so the cell sees the same environment), resumed from its last checkpoint if it has one."""
    command = [sys.executable, "-m", "offbench.cli", *cell.args]
    if devices == "cpu":
        command += ["--trainer.accelerator", "cpu"]
    elif devices == "cuda":
        command += ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    if state == "resume":
        command += ["--ckpt_path", "last"]
    return command


def start_cell(cell: Cell, command: list[str], env: dict[str, str], die_with_parent: bool = True) -> subprocess.Popen:
    """Start one cell, its stdout and stderr appended to `<run dir>/bench.log`. With `die_with_parent`
    (Linux), the cell is killed when this process dies, however it dies: no cell outlives its runner.
    (Leftover partial files of a crash are removed by the cell's `fit` itself, under its run lock.)"""
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cell.run_dir / "cell.json", {**asdict(cell), "run_dir": str(cell.run_dir)}, default=str)
    preexec = _die_with_parent(os.getpid()) if die_with_parent and _LIBC is not None else None
    with open(cell.run_dir / "bench.log", "a") as log:
        log.write(f"\n### offbench bench {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
        log.flush()
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec
        )


def _load_libc() -> Any:
    """libc, loaded once here: the child side of a fork must not load libraries (see _die_with_parent)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load
        return None


_LIBC = _load_libc()
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> Any:
    """A Popen preexec_fn: the child gets SIGKILL when `parent` dies (prctl PR_SET_PDEATHSIG), and exits
    at once if it already has. Its last checkpoint stays (checkpoints are written atomically)."""

    def preexec() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the runner died between fork and prctl
            os._exit(1)

    return preexec


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the cell's latest attempt (the reason a failed cell failed)."""
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    attempt = text.rsplit("\n### offbench bench ", 1)[-1]
    return "\n".join(attempt.splitlines()[1:][-lines:])


def _updates_done(run_dir: Path) -> int | None:
    """The latest `updates` value in the cell's metrics.csv (read from its header and tail only)."""
    path = run_dir / "metrics.csv"
    try:
        with open(path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode(errors="replace").splitlines()[1:]
    except OSError:
        return None
    if "updates" not in header:
        return None
    column = header.index("updates")
    for line in reversed(tail):
        values = line.split(",")
        if len(values) == len(header) and values[column]:
            try:
                return int(float(values[column]))
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------- running a grid


@dataclass
class Running:
    """A launched cell: a local subprocess or a Ray task."""

    cell: Cell
    state: CellState
    process: subprocess.Popen | None = None  # local launcher
    task: Any = None  # Ray launcher: the task's ObjectRefGenerator (see _ray_cell)
    gpu: int | str | None = None
    node: str | None = None  # Ray: the host the cell runs on
    started: float | None = field(default_factory=time.monotonic)  # None: a Ray task waiting for resources
    first_updates: tuple[float, int] | None = None  # (time, updates) when progress was first seen
    updates: int | None = None


@dataclass
class GridReport:
    finished: list[str] = field(default_factory=list)  # cells that finished in this run
    skipped: list[str] = field(default_factory=list)  # cells already finished before this run
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    launched: list[str] = field(default_factory=list)
    interrupted: bool = False
    busy: dict[str, int] = field(default_factory=dict)  # cells another process runs (its PID; 0: unknown)
    stale: dict[str, str] = field(default_factory=dict)  # cells run with other arguments: how they differ


@dataclass(frozen=True)
class RayOptions:
    """`--launcher ray`: the cluster and each cell's task resources (gpus_per_cell None: one GPU when
    the cluster has GPUs and --devices allows them, else none)."""

    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float | None = None


def _gpu_count(devices: str) -> int:
    if devices == "cpu":
        return 0
    import torch  # only here: the dry run and the grid checks need no torch

    count = torch.cuda.device_count()
    if devices == "cuda" and count == 0:
        raise UserError("--devices cuda, but no CUDA device is visible")
    return count


def _prepare_datasets(datasets: list[str]) -> None:
    """Generate the suite's synthetic datasets once, here: cells running in parallel would otherwise
    all try to write the same file on first use. Forge the families of `small` forge presets that are
    not forged yet (a few minutes each; larger presets must be forged by hand, see the README)."""
    import torch

    from offbench.data.catalog import unforged_family
    from offbench.data.synthetic import ensure_synthetic
    from offbench.forge import forge, forge_config

    for name in datasets:
        if name.startswith("synthetic/"):
            ensure_synthetic(name.removeprefix("synthetic/"))
        family = unforged_family(name)
        if family is not None:
            print(f"forging {family.env_id} for {name} ({family.cost}) ...", flush=True)
            # One torch thread: the small SAC nets gain little from more, and OpenMP threads fighting
            # another busy process for the cores made updates 26x slower here (1.1 s instead of 43 ms).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                forge(forge_config(family.env_id, family.preset))
            finally:
                torch.set_num_threads(threads)


def run_grid(
    grid: Grid,
    workers: int | None = None,
    devices: Literal["auto", "cpu", "cuda"] = "auto",
    console: Any = None,
    tables: bool = True,
    ray_options: RayOptions | None = None,
    rerun_stale: bool = False,
) -> GridReport:
    """Run every unfinished cell of `grid`, then write the tables. A cell whose run another process holds
    is skipped; a stale cell (run with other arguments than the grid file's now) is reported and left
    alone, unless `rerun_stale`: then its run directory is set aside and it runs again. SIGTERM and SIGHUP
    stop the grid as Ctrl+C does (the running cells are stopped; a rerun resumes them). Locally (no `ray_options`): subprocesses,
    at most `workers` (None: 1) at a time; GPUs (when used) go to the least-loaded device, so cells
    spread round-robin and several cells may share one GPU. On Ray: one Ray task per cell, at most
    `workers` at a time (None: as many as the cluster's resources allow)."""
    from rich.console import Console

    console = console or Console()
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if ray_options is not None:
        _check_ray_options(ray_options, devices)  # and that Ray is installed, before anything is written
    gpus = _gpu_count(devices) if ray_options is None else 0
    workers = workers or (1 if ray_options is None else len(grid.cells))
    grid.output.mkdir(parents=True, exist_ok=True)
    lock = _lock(grid.output)
    previous = _interrupt_on_termination()
    try:
        return _run(grid, workers, devices, gpus, ray_options, console, tables, rerun_stale)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.unlink(missing_ok=True)


def _interrupt_on_termination() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so that a runner stopped by `kill`
    or a closed terminal stops its cells and releases its lock as on Ctrl+C. Returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _lock(output: Path) -> Path:
    """One runner per output directory: two would start the same cells in the same run directories."""
    lock = output / "bench.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        text = lock.read_text().strip()
        pid = int(text) if text.isdigit() else 0
        if pid and _alive(pid):
            raise UserError(
                f"another `offbench bench` (pid {pid}) is running into {output}; wait for it or stop it "
                f"(if that pid is not a bench run, delete {lock})"
            ) from None
        lock.unlink(missing_ok=True)  # left by a runner that was killed
        return _lock(output)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(
    grid: Grid, workers: int, devices: str, gpus: int, ray_options: RayOptions | None, console: Any, tables: bool,
    rerun_stale: bool = False,
) -> GridReport:
    from rich.live import Live

    _write_grid_json(grid)
    failures_path = grid.output / "failures.json"
    failures: dict[str, Any] = read_json(
        failures_path, fix="delete it: it only lists earlier failures, and failed cells are tried again anyway"
    ) or {}

    report = GridReport()
    pending: deque[tuple[Cell, CellState]] = deque()
    for cell in grid.cells:
        state = cell_state(cell)
        if state == "stale" and rerun_stale:
            console.print(f"stale  {cell.id}: its run moved to {set_aside(cell, grid.output)}; running it again")
            state = "fresh"
        if state == "finished" and (damage := _unreadable_result(cell)):
            failures[cell.id] = report.failed[cell.id] = {
                "algorithm": cell.algorithm, "dataset": cell.dataset, "seed": cell.seed, "run_dir": str(cell.run_dir),
                "exit": "unreadable result.json", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": damage,
            }
            console.print(f"[red]damaged[/red] {cell.id}: {damage}")
        elif state == "finished":
            report.skipped.append(cell.id)
            failures.pop(cell.id, None)  # finished since (e.g. by hand): no longer a failure
        elif state == "running":
            pid = report.busy[cell.id] = run_dir_holder(cell.run_dir) or 0
            console.print(
                f"[yellow]busy[/yellow]   {cell.id}: its run is still alive in process {pid or '(unknown)'} "
                "(an earlier runner's cell, or a fit by hand); skipped: run the grid again when it has ended"
            )
        elif state == "stale":
            report.stale[cell.id] = stale_arguments(cell)
            console.print(
                f"[yellow]stale[/yellow]  {cell.id}: run with other arguments than the grid file's now "
                f"({report.stale[cell.id]}); left alone: pass --rerun-stale to run it again"
            )
        else:
            pending.append((cell, state))
    write_json_atomic(failures_path, failures, default=str)
    if pending:
        _prepare_datasets(sorted({c.dataset for c, _ in pending}))

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Unset, every torch process would use all cores: N workers would oversubscribe the CPU N times.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    mode = "cuda" if gpus else "cpu"
    where = f"{workers} worker(s) ({mode}{f', {gpus} GPU(s)' if gpus else ''})"
    cluster = _ray_connect(ray_options, devices) if ray_options is not None and pending else None
    if cluster is not None:
        mode, where = cluster.mode, cluster.description
    elif ray_options is not None:
        where = "Ray"  # nothing to run: not connected
    running: list[Running] = []
    start = time.monotonic()
    console.print(
        f"grid {grid.name}: {len(grid.cells)} cells, {len(report.skipped)} already finished, "
        f"{len(pending)} to run on {where}; results in {grid.output}"
    )

    def render() -> Any:
        started = [r for r in running if r.started is not None]
        return _render(grid, report, started, len(pending) + len(running) - len(started), time.monotonic() - start)

    try:
        with Live(render(), console=console, refresh_per_second=1, transient=False) as live:
            while pending or running:
                while pending and len(running) < workers:
                    cell, state = pending.popleft()
                    if cluster is not None:
                        running.append(_ray_start(cluster, cell, state))
                    else:
                        running.append(_start_local(cell, state, mode, env, gpus, running))
                    report.launched.append(cell.id)
                for r in list(running):
                    _poll_progress(r)
                    outcome = _poll_local(r) if cluster is None else _ray_poll(r)
                    if outcome is None:
                        continue
                    running.remove(r)
                    code, elapsed, log_tail = outcome
                    on = f" on {r.node}" if r.node else ""
                    if code == 0 and (r.cell.run_dir / "result.json").exists():
                        report.finished.append(r.cell.id)
                        failures.pop(r.cell.id, None)
                        console.print(f"[green]done[/green]   {r.cell.id} ({_hms(elapsed)}{on})")
                    else:
                        failures[r.cell.id] = report.failed[r.cell.id] = _failure(r, code, elapsed, log_tail)
                        console.print(
                            f"[red]failed[/red] {r.cell.id} ({_exit_text(code)}{on}); log: {r.cell.run_dir / 'bench.log'}"
                        )
                    write_json_atomic(failures_path, failures, default=str)
                live.update(render())
                if running:
                    time.sleep(0.5)
    except KeyboardInterrupt:
        report.interrupted = True
        stopped = sum(r.started is not None for r in running)
        if cluster is not None:
            _ray_stop(running)
        else:
            _stop([r.process for r in running])
    finally:
        if cluster is not None and cluster.disconnect:
            _import_ray().shutdown()
    if not console.is_terminal:
        console.print()  # a non-terminal Live leaves its last line unterminated
    if report.interrupted:
        console.print(
            f"[yellow]interrupted[/yellow]: stopped {stopped} running cell(s); run the same command again "
            "to resume them from their last checkpoints"
        )
    else:
        console.print(
            f"grid {grid.name}: {len(report.finished)} finished, {len(report.skipped)} skipped (finished before), "
            f"{len(report.failed)} failed in {_hms(time.monotonic() - start)}"
            + (f", {len(report.busy)} busy elsewhere" if report.busy else "")
            + (f", {len(report.stale)} stale" if report.stale else "")
            + (f"; failures listed in {failures_path}" if failures else "")
        )
    if tables and report.stale:
        console.print(
            f"[yellow]tables not written[/yellow]: {len(report.stale)} stale cell(s) hold results of other settings, "
            "which a table would mix with the grid's; rerun them with --rerun-stale (or restore the grid file)"
        )
    elif tables:
        from offbench.tables import write_tables

        written = write_tables(grid.output)
        console.print("tables: " + ", ".join(str(p) for p in written))
    return report


def _start_local(cell: Cell, state: CellState, mode: str, env: dict[str, str], gpus: int, running: list[Running]) -> Running:
    """Start a cell as a subprocess here, on the least-loaded GPU when there are GPUs."""
    cell_env = dict(env)
    gpu = None
    if gpus:
        load = [sum(r.gpu == g for r in running) for g in range(gpus)]
        gpu = load.index(min(load))
        cell_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    else:
        cell_env["CUDA_VISIBLE_DEVICES"] = ""
    return Running(cell, state, process=start_cell(cell, cell_command(cell, state, mode), cell_env), gpu=gpu)


def _poll_local(r: Running) -> tuple[int, float, str] | None:
    """(exit code, seconds, log tail) once the cell's subprocess has ended, else None."""
    code = r.process.poll()
    if code is None:
        return None
    return code, time.monotonic() - r.started, _log_tail(r.cell.run_dir / "bench.log")


def _failure(r: Running, code: int | None, elapsed: float, log_tail: str) -> dict[str, Any]:
    return {
        "algorithm": r.cell.algorithm,
        "dataset": r.cell.dataset,
        "seed": r.cell.seed,
        "run_dir": str(r.cell.run_dir),
        **({"node": r.node} if r.node else {}),
        "exit": _exit_text(code),
        "returncode": code,
        "resumed": r.state == "resume",
        "seconds": round(elapsed, 1),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "log": str(r.cell.run_dir / "bench.log"),
        "reason": log_tail or "the cell exited without output" + ("" if code else " and without a result.json"),
    }


def _exit_text(code: int | None) -> str:
    if code is None:
        return "its Ray task failed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}" + (" (but no result.json)" if code == 0 else "")


def _stop(processes: list[subprocess.Popen], grace: float = 30.0) -> None:
    """Stop running cells (SIGINT first, so Lightning shuts down cleanly), then kill stragglers.
    Their last checkpoints stay, so the next run resumes them."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _poll_progress(r: Running) -> None:
    if r.started is None:
        return
    updates = _updates_done(r.cell.run_dir)
    if updates is None:
        return
    if r.first_updates is None or updates < r.first_updates[1]:
        r.first_updates = (time.monotonic(), updates)
    r.updates = updates


def _render(grid: Grid, report: GridReport, running: list[Running], waiting: int, elapsed: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    total = len(grid.cells)
    summary = Text.assemble(
        (f"{grid.name} ", "bold"),
        f"{len(report.finished) + len(report.skipped)}/{total} done ",
        (f"({len(report.skipped)} skipped) ", "dim"),
        (f"{len(running)} running ", "cyan"),
        (f"{len(report.failed)} failed ", "red" if report.failed else "dim"),
        f"{waiting} waiting, elapsed {_hms(elapsed)}",
    )
    if not running:
        return summary
    nodes = any(r.node for r in running)
    table = Table(box=None, pad_edge=False)
    for column in ("cell", "updates", "updates/s", "elapsed", "ETA", "gpu", *(("node",) if nodes else ())):
        table.add_column(column, justify="left" if column in ("cell", "node") else "right")
    for r in running:
        now = time.monotonic()
        rate = eta = None
        if r.first_updates is not None and r.updates is not None and now > r.first_updates[0] + 1:
            rate = (r.updates - r.first_updates[1]) / (now - r.first_updates[0])
            eta = (r.cell.updates - r.updates) / rate if rate > 0 else None
        table.add_row(
            r.cell.id + (" (resumed)" if r.state == "resume" else ""),
            f"{r.updates or 0}/{r.cell.updates}",
            f"{rate:.0f}" if rate else "-",
            _hms(now - r.started),
            _hms(eta) if eta is not None else "-",
            "-" if r.gpu is None else str(r.gpu),
            *((r.node or "-",) if nodes else ()),
        )
    return Group(summary, table)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------- the Ray launcher


@dataclass
class RayCluster:
    """The connection one grid run made to Ray, and what its cells are given."""

    task: Any  # ray.remote(_ray_cell) with the cells' resources
    mode: str  # the cells' accelerator: "cuda" when they have a GPU (fraction), else "cpu"
    env: dict[str, str]  # set in each cell's environment, over the node's own
    description: str
    disconnect: bool  # this run connected (or started the local instance), so it disconnects at the end


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "--launcher ray needs Ray, which is not installed here: pip install 'offbench[ray]'"
        ) from None
    return ray


def _check_ray_options(options: RayOptions, devices: str) -> None:
    """Everything that can be checked before connecting (Ray installed, sensible resources)."""
    _import_ray()
    if options.cpus_per_cell <= 0:
        raise UserError(f"--cpus-per-cell must be positive, got {options.cpus_per_cell:g}")
    if options.gpus_per_cell is not None and not 0 <= options.gpus_per_cell <= 1:
        raise UserError(
            f"--gpus-per-cell is a share of one GPU, from 0 to 1 (a cell runs on one device), "
            f"got {options.gpus_per_cell:g}"
        )
    if devices == "cpu" and options.gpus_per_cell:
        raise UserError("--gpus-per-cell asks for GPUs, but --devices cpu runs the cells on CPUs")


def _ray_connect(options: RayOptions, devices: str) -> RayCluster:
    """Connect to the Ray cluster (or start a local instance) and size the cells' tasks."""
    ray = _import_ray()
    disconnect = not ray.is_initialized()  # a connection the caller made (a notebook, a test) stays theirs
    if disconnect:
        # The cells' output goes to their bench.log files; the driver shows only the grid's progress.
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0)
    if devices == "cuda" and not cluster_gpus:
        if disconnect:
            ray.shutdown()
        raise UserError("--devices cuda, but the Ray cluster has no GPU")
    gpus = options.gpus_per_cell
    if gpus is None:
        gpus = 1.0 if devices != "cpu" and cluster_gpus else 0.0
    # max_retries=0: Ray would rerun a task whose worker or node died, while that cell's first
    # `offbench fit` might still write its run directory (a node cut off from the cluster, say). A failed
    # cell is recorded and tried again by the next run, as locally: never two runs of one cell at once.
    task = ray.remote(_ray_cell).options(num_cpus=options.cpus_per_cell, num_gpus=gpus, max_retries=0)
    env = {name: value for name, value in os.environ.items() if name.startswith(RAY_FORWARD_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(options.cpus_per_cell))))
    per_cell = f"{options.cpus_per_cell:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    description = (
        f"Ray at {ray.get_runtime_context().gcs_address} ({resources.get('CPU', 0):g} CPUs, "
        f"{cluster_gpus:g} GPUs; {per_cell} per cell)"
    )
    return RayCluster(task, "cuda" if gpus else "cpu", env, description, disconnect)


def _ray_start(cluster: RayCluster, cell: Cell, state: CellState) -> Running:
    """Submit a cell; it waits in Ray's queue until a node has its resources."""
    task = cluster.task.remote(cell, state, cluster.mode, os.getcwd(), cluster.env)
    return Running(cell, state, task=task, started=None)


def _ray_cell(cell: Cell, state: CellState, mode: str, cwd: str, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A cell as a Ray task, on the node Ray chose: the local launcher's `offbench fit` subprocess, run
    in the driver's working directory (the filesystem is shared, so the grid's relative paths hold).
    A generator, so that the driver learns where and when the cell started before how it ended."""
    import ray

    os.chdir(cwd)
    yield {"node": socket.gethostname(), "gpu": ",".join(map(str, ray.get_gpu_ids())) or None}
    # Ray has set CUDA_VISIBLE_DEVICES to the GPU it gave this task (others may share it). Its worker
    # processes block SIGINT and a child inherits that: unblock it for the cell, so that the stop below
    # is the local launcher's (SIGINT, Lightning shuts down cleanly) instead of a kill after the grace.
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        process = start_cell(cell, cell_command(cell, state, mode), {**os.environ, **env}, die_with_parent=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    started = time.monotonic()
    try:
        while process.poll() is None:
            time.sleep(0.5)  # not process.wait(): ray.cancel's KeyboardInterrupt arrives between Python calls
    except KeyboardInterrupt:  # the grid run was interrupted (_ray_stop)
        _stop([process])
        raise
    yield {"returncode": process.returncode, "seconds": time.monotonic() - started,
           "log_tail": _log_tail(cell.run_dir / "bench.log")}


def _ray_poll(r: Running) -> tuple[int | None, float, str] | None:
    """Take what the cell's task has yielded: where it started (kept in `r`), then how it ended, as
    (exit code, seconds, log tail); the exit code is None when the task itself failed (its node died)."""
    import ray

    while ray.wait([r.task], timeout=0)[0]:
        try:
            item = ray.get(next(r.task))
        except ray.exceptions.RayError as e:
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # without the terminal colours
            elapsed = time.monotonic() - r.started if r.started is not None else 0.0
            return None, elapsed, "\n".join(reason.splitlines()[-LOG_TAIL_LINES:])
        if "returncode" in item:
            return item["returncode"], item["seconds"], item["log_tail"]
        r.node, r.gpu, r.started = item["node"], item["gpu"], time.monotonic()
    return None


def _ray_stop(running: list[Running]) -> None:
    """Cancel the cells' tasks: a waiting one never starts, a running one stops its `offbench fit` as the
    local launcher does. Wait for them to end, so that no cell outlives this run and its lock."""
    import ray

    for r in running:
        ray.cancel(r.task)
    for r in running:
        with contextlib.suppress(ray.exceptions.RayError):  # the cancelled tasks end with TaskCancelledError
            for item in r.task:
                ray.get(item)


# --------------------------------------------------------------------------- files


def _write_grid_json(grid: Grid) -> None:
    """What the tables need to know about the grid: the expected seeds, the row and column order,
    the paper references."""
    write_json_atomic(grid.output / "grid.json", {
        "name": grid.name,
        "grid_file": str(grid.path),
        "description": grid.description,
        "seeds": grid.seeds,
        "algorithms": grid.algorithms,
        "datasets": grid.datasets,
        "references": str(grid.references) if grid.references else None,
        "cells": [{"id": c.id, "algorithm": c.algorithm, "dataset": c.dataset, "seed": c.seed,
                   "run_dir": str(c.run_dir), "updates": c.updates, "args": c.args} for c in grid.cells],
    })


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offbench bench",
        description="Run a grid of (algorithm x dataset x seed) cells, one `offbench fit` subprocess each; "
        "finished cells are skipped, interrupted ones resumed from their last checkpoint; tables at the end.",
    )
    parser.add_argument("grid", help="grid file, e.g. configs/grids/quick.yaml")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="cells run at the same time (default: 1 locally; with Ray, as many as the cluster's resources allow)",
    )
    parser.add_argument(
        "--devices", choices=("auto", "cpu", "cuda"), default="auto",
        help="auto: CUDA when available (cells spread over the visible GPUs, several per GPU allowed), else CPU",
    )
    parser.add_argument(
        "--launcher", choices=("local", "ray"), default="local",
        help="local: subprocesses of this machine; ray: one Ray task per cell on a Ray cluster whose nodes share "
        "this machine's filesystem (repository, datasets, results) and Python environment "
        "(needs pip install 'offbench[ray]')",
    )
    ray = parser.add_argument_group("Ray (--launcher ray)")
    ray.add_argument(
        "--address", default=None,
        help="the Ray cluster, as ray.init(address=...) takes it: 'auto' or HOST:PORT run on a node of the cluster, 'local' for a new local instance "
        "(default: $RAY_ADDRESS, else the cluster that `ray start` made on this machine, else a new local Ray instance)",
    )
    ray.add_argument("--cpus-per-cell", type=float, default=None, help="CPUs reserved for each cell (default 1)")
    ray.add_argument(
        "--gpus-per-cell", type=float, default=None,
        help="share of a GPU reserved for each cell, e.g. 0.5: two cells per GPU (default: 1 when the cluster "
        "has GPUs, else 0)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cells, their state and commands; run nothing")
    parser.add_argument("--no-tables", action="store_true", help="do not write the tables at the end")
    parser.add_argument(
        "--rerun-stale", action="store_true",
        help="run again the cells whose runs were made with other arguments than the grid file's now (their run "
        "directories are moved to <output>.stale/); without it they are reported and left alone",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ray_args = {"--address": args.address, "--cpus-per-cell": args.cpus_per_cell, "--gpus-per-cell": args.gpus_per_cell}
    if args.launcher != "ray" and any(value is not None for value in ray_args.values()):
        given = [name for name, value in ray_args.items() if value is not None]
        parser.error(f"{', '.join(given)}: only with --launcher ray")
    try:
        grid = load_grid(args.grid)
    except GridError as e:
        print(f"offbench bench: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        states = {c.id: cell_state(c) for c in grid.cells}
        for cell in grid.cells:
            print(f"[{states[cell.id]:8}] {cell.id}\n    offbench {shlex.join(cell_command(cell, states[cell.id], 'auto')[3:])}")
        counts = {s: list(states.values()).count(s) for s in ("finished", "resume", "fresh", "running", "stale")}
        print(f"grid {grid.name}: {len(grid.cells)} cells: {counts['finished']} finished (skipped), "
              f"{counts['resume']} to resume, {counts['fresh']} to start, {counts['running']} running elsewhere, "
              f"{counts['stale']} stale (run with other arguments; --rerun-stale runs them again); output {grid.output}")
        return 0
    ray_options = None
    if args.launcher == "ray":
        cpus = 1.0 if args.cpus_per_cell is None else args.cpus_per_cell
        ray_options = RayOptions(args.address, cpus, args.gpus_per_cell)
    report = run_grid(
        grid, args.workers, args.devices, tables=not args.no_tables, ray_options=ray_options, rerun_stale=args.rerun_stale
    )
    if report.interrupted:
        return 130
    return 1 if report.failed or report.busy or report.stale else 0
