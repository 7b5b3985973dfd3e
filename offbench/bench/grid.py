"""Grid files: read and check a grid YAML (`load_grid`), expand it into its cells (`Cell`, `Grid`).

Every problem of a grid file is collected and raised at once as a GridError, before anything runs.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offbench.errors import UserError
from offbench.selection import SWEEP_MARK  # a sweep column's name: `<algorithm>@<key>=<value>,...`

SETTING_KEYS = ("config", "args", "updates", "eval_every", "eval_episodes", "block_size", "seeds_per_process")
GRID_KEYS = ("name", "description", "output", "seeds", "algorithms", "datasets", "overrides", "references", "wandb",
             *SETTING_KEYS)
WANDB_KEYS = ("project", "entity", "tags", "mode")  # a grid's `wandb:` options; group and run names come from the grid
ALGORITHM_KEYS = ("name", "overrides", "sweep", "datasets", *SETTING_KEYS)  # datasets: a subset of the grid's, for that algorithm


class GridError(UserError):
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
    seeds_per_process: int = 1  # the runner's packing of a column's seeds (cells.make_packs), not a fit argument

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


def dataset_slug(dataset: str) -> str:
    """A directory name for a dataset: `D4RL/antmaze/umaze-v1` -> `D4RL-antmaze-umaze-v1`; a file path
    -> its stem."""
    if dataset.endswith((".hdf5", ".h5")):
        dataset = Path(dataset).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-")


def expand_grid(path: str | os.PathLike) -> list[Cell]:
    """The cells of a grid file (algorithms x datasets x seeds, in that nesting order)."""
    return load_grid(path).cells


def load_grid(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Grid:
    """Read and check a grid file; raises GridError naming every problem (unknown keys, missing
    config files, unknown datasets, budgets that do not fit) before anything runs. `output` replaces the
    grid's output folder (`offbench bench --out`)."""
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
    output = Path(output or raw.get("output") or Path("results") / name)
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
        if not entry.get("config"):
            problems.append(f"{where}: `config` (the algorithm's YAML, e.g. configs/algorithms/bc.yaml) is required")
            continue
        algo_overrides = _overrides(entry.get("overrides"), datasets, f"{where} `overrides`", problems)
        algo_datasets = entry.get("datasets", datasets)  # e.g. a method without AntMaze settings: locomotion only
        if not isinstance(algo_datasets, list) or not set(algo_datasets) <= set(datasets):
            problems.append(f"{where}: `datasets` must be a list of the grid's datasets, got {algo_datasets!r}")
            algo_datasets = []
        algo_datasets = [d for d in datasets if d in algo_datasets]
        for column, sweep_args in _sweep(entry.get("sweep"), algo, where, problems):
            if column in names:
                problems.append(
                    f"{where}: the name {column!r} appears twice (it names the results column and directory)"
                )
            names.append(column)
            cells += _algorithm_cells(
                raw, entry, column, sweep_args, algo_datasets, seeds, overrides, algo_overrides, output, wandb, where,
                problems,
            )
    if problems:
        # Many identical messages come from one bad setting repeated over datasets: report each once.
        unique = list(dict.fromkeys(problems))
        raise GridError(f"{path}: {len(unique)} problem(s):\n  - " + "\n  - ".join(unique))
    return Grid(
        name, path, output, seeds, names, list(datasets), cells,
        Path(references) if references else None, str(raw.get("description") or ""),
    )


def _algorithm_cells(
    raw: dict[str, Any], entry: dict[str, Any], algo: str, sweep_args: list[str], datasets: list[str],
    seeds: list[int], overrides: dict[str, dict[str, Any]], algo_overrides: dict[str, dict[str, Any]],
    output: Path, wandb: list[str] | None, where: str, problems: list[str],
) -> list[Cell]:
    """The cells of one column (an algorithm entry, or one setting of its sweep): datasets x seeds."""
    cells = []
    for dataset in datasets:
        # The most specific level wins for scalars; configs and args accumulate in this order.
        levels = [raw, overrides.get(dataset, {}), entry, algo_overrides.get(dataset, {})]
        settings = _merge(levels, where, problems)
        settings["args"] += sweep_args  # after every level's `args`: a sweep value wins
        if wandb is not None and settings["seeds_per_process"] > 1:
            problems.append(f"{where}: `seeds_per_process` {settings['seeds_per_process']} does not combine with `wandb` "
                            "(one W&B run per process): set it to 1, or drop `wandb`")
        # The algorithm's config first, then the extra configs from general to specific.
        extra_levels = (raw, overrides.get(dataset, {}), algo_overrides.get(dataset, {}))
        configs = [*_list(entry.get("config"))] + [c for level in extra_levels for c in _list(level.get("config"))]
        for config in configs:
            _check_config(config, where, problems)
        for seed in seeds:
            run_dir = output / "runs" / algo / dataset_slug(dataset) / f"seed{seed}"
            run_name = [] if wandb is None else [*wandb, "--wandb.name", f"{algo}/{dataset}/seed{seed}"]
            cells.append(_cell(algo, dataset, seed, run_dir, configs, settings, run_name))
    return cells


def _sweep(value: Any, algo: str, where: str, problems: list[str]) -> list[tuple[str, list[str]]]:
    """The columns of an algorithm entry: [(name, extra `offbench fit` arguments)]. Without `sweep`, the
    entry itself; with `sweep: {dotted.key: [values], ...}`, one column per combination of values (the
    product over keys, in the file's order), named `<name>@<key>=<value>,...` with each key's last part
    (`td3bc@alpha=2.5`: letters, digits and `_ . - @ = ,` only, safe as a directory name), its arguments
    `--<dotted.key> <value>` after the entry's `args` (so they win)."""
    if value is None:
        return [(algo, [])]
    if not isinstance(value, dict) or not value:
        problems.append(f"{where}: `sweep` must map setting keys to lists of values, e.g. "
                        "{model.init_args.alpha: [1, 2.5, 5]}, got " + repr(value))
        return []
    short: dict[str, str] = {}
    lists: list[list[str]] = []
    for key, values in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append(f"{where}: `sweep` key {key!r} must be a dotted setting name, e.g. model.init_args.alpha")
            return []
        last = key.rsplit(".", 1)[-1]
        if last in short.values():
            problems.append(f"{where}: `sweep` keys {key!r} and {next(k for k, v in short.items() if v == last)!r} "
                            f"end in the same name {last!r}, which names the columns: sweep one of them")
            return []
        short[key] = last
        texts = [_sweep_value(v) for v in values] if isinstance(values, list) and values else [None]
        if None in texts:
            problems.append(f"{where}: `sweep` {key!r} must list numbers, booleans or plain words "
                            f"(letters, digits, _ . -), got {values!r}")
            return []
        if len(set(texts)) != len(texts):
            problems.append(f"{where}: `sweep` {key!r} lists a value twice: {values!r}")
            return []
        lists.append(texts)
    columns = []
    for combination in itertools.product(*lists):
        name = algo + SWEEP_MARK + ",".join(f"{short[k]}={v}" for k, v in zip(value, combination, strict=True))
        args = [a for k, v in zip(value, combination, strict=True) for a in (f"--{k}", v)]
        columns.append((name, args))
    return columns


def _sweep_value(value: Any) -> str | None:
    """A sweep value as its command-line text (and column-name part); None for one a name cannot hold."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        return value
    return None


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
    return Cell(algo, dataset, seed, run_dir, args, int(s["updates"]), s["seeds_per_process"])


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
    settings: dict[str, Any] = {"args": [], "seeds_per_process": 1}
    for level in levels:
        for key in ("updates", "eval_every", "eval_episodes", "block_size", "seeds_per_process"):
            if key in level:
                settings[key] = level[key]
        settings["args"] += _args(level.get("args"), where, problems)
    for key in ("updates", "eval_every"):
        value = settings.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{where}: `{key}` must be a positive integer (set it at the top level), got {value!r}")
            settings[key] = 1
    value = settings["seeds_per_process"]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append(f"{where}: `seeds_per_process` must be a positive integer (1: one process per seed), got {value!r}")
        settings["seeds_per_process"] = 1
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
            return
        from offbench.run.arguments import class_path_problem  # reads the modules' source, imports none of them

        for section in ("model", "data"):
            body = loaded.get(section)
            class_path = body.get("class_path") if isinstance(body, dict) else body if isinstance(body, str) else None
            problem = class_path_problem(class_path) if class_path is not None else None
            if problem:
                problems.append(f"{where}: config {config}: {section}.class_path: {problem}")
