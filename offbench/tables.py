"""`offbench table RESULTS_DIR`: normalized-score tables, rliable statistics, paper references, curves.

Reads every `result.json` under RESULTS_DIR (the run directories of `offbench bench`, or any
`offbench fit` runs) and writes, in RESULTS_DIR:

- `table.md` and `table.csv` (and `table.tex` with --latex): rows = datasets, columns = algorithms,
  one table for each of the three per-run scores `last`, `best` and `final_mean`; a cell is the mean
  +- std over training seeds of that score (std with ddof=0); domain averages (locomotion, AntMaze,
  other) are means of the per-dataset means, as in DiffCPS Table 1; under each table, rliable's
  aggregates of that score (IQM, mean, median, optimality gap with stratified-bootstrap 95% CIs) and
  the probability of improvement between every pair of algorithms (offbench/stats.py); paper
  numbers from a references file as labelled columns, and a diff report of our cells against the paper's.
- `curves/<dataset>.png`: normalized score against updates, mean over seeds with the min-max band.
- `profiles.png`: rliable's performance profiles, one panel per per-run score.

`grid.json` (written by `offbench bench`) gives the seeds the grid asks for, the row and column
order and the references file; without it the largest seed count found is taken as the target.

What the tables refuse to do (docs/statistics.md, "What a cell holds"): a cell (algorithm, dataset)
holds runs of one protocol only (data fingerprint and reference returns, algorithm class, config hash,
updates, evaluation settings), else nothing is written (a UserError listing every difference with the
runs' paths); a run found twice (same seed and scores) counts once, two different runs of one seed are
refused; unreadable or incomplete records are left out and listed; a single seed shows no std and no
interval; without a complete record nothing is written. The same records give the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from offbench import selection, stats
from offbench.errors import MissingFileError, UserError
from offbench.files import write_text_atomic
from offbench.grammar import Parser

KINDS = ("last", "best", "final_mean")
DIFF_KINDS = ("best", "last", "final_mean")  # the paper's numbers are best-style: that comparison first
KIND_TEXT = {
    "last": "score of the final evaluation of each run",
    "best": "highest evaluation score of each run over training (online model selection: optimistic; "
    "what the official DiffCPS code reports and Table 1 shows)",
    "final_mean": "mean score of the last K evaluations of each run",
}
PROFILE_TITLES = {
    "last": "last: final evaluation of each run",
    "best": "best: highest evaluation of each run (optimistic)",
    "final_mean": "final_mean: mean of each run's last K evaluations",
}
DOMAINS = ("locomotion", "antmaze", "other")
DOMAIN_TEXT = {"locomotion": "locomotion", "antmaze": "AntMaze", "other": "other"}
DDOF = 0  # std over seeds as numpy's default (population std), as most offline-RL tables compute it
DIFF_POINTS = 3.0  # a measured cell is flagged when it is further from the paper than max(paper std, this)


UNKNOWN = "unknown"  # the data fingerprint of a record written before result.json had `data`
FINGERPRINT_DIGITS = 12  # hex digits of a fingerprint or config hash shown in the tables
CONFIG_EXCLUDED = ("seed", "dataset", "algorithm")  # hyperparameter keys that are not part of a cell's config
SCORES = tuple(f"scores.{kind}" for kind in KINDS)
NUMBERS = ("updates", *SCORES, "scores.final_mean_k", "protocol.episodes_per_evaluation",
           "protocol.eval_interval_updates", "protocol.evaluations")
MISSING = object()


@dataclass(frozen=True)
class Run:
    """One run: its labels, its result.json and where it was found."""

    algorithm: str
    dataset: str | None
    seed: Any
    result: dict[str, Any]
    path: Path  # the run directory
    name: str = ""  # its result.json relative to the results directory: what tables and messages show

    def score(self, kind: str) -> float:
        return float(self.result["scores"][kind])

    @property
    def fingerprint(self) -> str:
        """The full data fingerprint from result.json's `data`; "unknown" in records written before it."""
        data = self.result.get("data")
        return str(data["fingerprint"]) if isinstance(data, dict) and data.get("fingerprint") else UNKNOWN


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # nan: no spread to show (one seed, or a paper number without std)
    n: int


# --------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> Summary:
    """Mean and std (ddof=0) over seeds; no std (nan) from a single seed."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=DDOF)) if len(array) > 1 else math.nan
    return Summary(float(array.mean()), std, len(array))


# --------------------------------------------------------------------------- reading results


def domain(dataset: str) -> str:
    """Table 1's domains: D4RL/Minari locomotion, AntMaze, and everything else (synthetic data, files)."""
    name = dataset.lower()
    if "antmaze" in name:
        return "antmaze"
    if re.match(r"^(halfcheetah|hopper|walker2d)-[a-z-]+-v\d+$", name) or name.startswith("mujoco/"):
        return "locomotion"
    return "other"


def collect_runs(results_dir: str | os.PathLike, left_out: list[tuple[str, str]] | None = None) -> list[Run]:
    """Every readable result.json under `results_dir`, in path order. Labels come from the cell.json that
    `offbench bench` writes next to result.json, else from result.json itself (class name, dataset, seed).
    The copies of result.json inside a run's W&B directory (`<run>/wandb/`, see offbench/wandb_logging.py)
    are not runs. A file that cannot be read is named in a warning and added to `left_out` as (path, reason);
    whether a readable record is complete is `record_problem`'s question."""
    root = Path(results_dir)
    runs = []
    for path in sorted(root.rglob("result.json")):
        name = path.relative_to(root).as_posix()
        if "wandb" in path.relative_to(root).parts[:-1]:
            continue
        result, problem = _read(path)
        cell, cell_problem = _read(path.parent / "cell.json")
        if problem is None and result is None:  # removed since it was listed
            continue
        problem = problem or cell_problem
        if problem is None and not (isinstance(result, dict) and isinstance(cell or {}, dict)):
            problem = f"{path} is not a JSON object"
        if problem is not None:
            print(f"offbench table: warning: {problem}; this run is left out of the tables", file=sys.stderr)
            if left_out is not None:
                left_out.append((name, problem.replace(str(path.parent) + os.sep, "")))
            continue
        cell = cell or {}
        algorithm = cell.get("algorithm") or str(result.get("algorithm", "?")).rsplit(".", 1)[-1].lower()
        dataset = cell.get("dataset") or result.get("dataset")
        runs.append(Run(algorithm, dataset, cell.get("seed", result.get("seed")), result, path.parent, name))
    return runs


def _read(path: Path) -> tuple[Any, str | None]:
    """A JSON file's value (None when absent), or why it cannot be read ("PATH is unreadable (...)")."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({e})"


def _get(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(run: Run) -> str | None:
    """Why a readable result.json cannot stand for a finished run (None when it can): no scores, missing
    keys, a score or a protocol setting that is not a finite number, a malformed history or `data`."""
    r = run.result
    if all(_get(r, key) is MISSING or _get(r, key) is None for key in SCORES):
        return "no scores (scores.last, scores.best and scores.final_mean missing or null: no evaluation recorded)"
    missing = [key for key in ("algorithm", "hyperparameters", "history", *NUMBERS) if _get(r, key) in (MISSING, None)]
    missing = (["dataset"] if not run.dataset else []) + (["seed"] if run.seed is None else []) + missing
    if missing:
        return "missing or null: " + ", ".join(missing)
    for key in NUMBERS:
        if not _is_number(_get(r, key)):
            return f"{key} is {_get(r, key)!r}, not a finite number"
    if not isinstance(r["hyperparameters"], dict):
        return "hyperparameters is not a JSON object"
    if not isinstance(r["history"], list):
        return "history is not a list"
    for i, h in enumerate(r["history"]):
        if not (isinstance(h, dict) and _is_number(h.get("updates")) and _is_number(h.get("score"))):
            return f"history[{i}] lacks a numeric updates or score"
    data = r.get("data")
    if data is not None:
        if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str) or not data["fingerprint"]:
            return f"data.fingerprint is {_get(r, 'data.fingerprint')!r}, not a fingerprint"
        for key in ("ref_min", "ref_max"):
            if data.get(key) is not None and not _is_number(data[key]):
                return f"data.{key} is {data[key]!r}, not a finite number"
    return None


def config_hash(hyperparameters: dict[str, Any], data_settings: dict[str, Any] | None = None) -> str:
    """The first 12 hex digits of the sha256 of the hyperparameters as JSON (sorted keys), without the
    keys named seed, dataset and algorithm, and of the data settings (result.json `data.settings`: the
    DataModule's class and arguments, e.g. batch size and transforms) when the record has them."""
    kept: dict[str, Any] = {k: v for k, v in hyperparameters.items() if k not in CONFIG_EXCLUDED}
    if data_settings is not None:
        kept = {"model": kept, "data": data_settings}
    text = json.dumps(kept, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_DIGITS]


def protocol(run: Run) -> dict[str, Any]:
    """What the runs of one cell must share: the data, the algorithm's class and hyperparameters, the
    training length and the evaluation settings. Only the seed may differ."""
    p, data = run.result["protocol"], run.result.get("data") or {}
    refs = (data.get("ref_min"), data.get("ref_max"))
    return {
        "data fingerprint": run.fingerprint,
        "data ref_min, ref_max": UNKNOWN if None in refs else f"{refs[0]}, {refs[1]}",
        "algorithm class": run.result["algorithm"],
        "config hash": config_hash(run.result["hyperparameters"], data.get("settings")),
        "updates": run.result["updates"],
        "episodes per evaluation": p["episodes_per_evaluation"],
        "evaluation interval (updates)": p["eval_interval_updates"],
        "evaluations": p["evaluations"],
        "final_mean K": run.result["scores"]["final_mean_k"],
    }


def check_cells(runs: list[Run]) -> tuple[list[Run], list[tuple[str, list[str]]], list[str]]:
    """(the runs to count, the duplicates, the problems). A cell (algorithm, dataset) must hold runs of one
    protocol and one run per seed. Records of the same seed with the same scores and history are copies of
    one run: the first (in path order) counts, the others are listed as (kept, [copies]). A cell whose runs
    differ in protocol, or with two different runs of one seed, is a problem: one line per difference."""
    cells: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        cells[(run.algorithm, str(run.dataset))].append(run)
    kept: list[Run] = []
    duplicates: list[tuple[str, list[str]]] = []
    problems: list[str] = []
    for (algorithm, dataset), cell in cells.items():
        protocols = [protocol(run) for run in cell]
        differences = []
        for key in protocols[0]:
            values: dict[Any, list[str]] = defaultdict(list)
            for run, p in zip(cell, protocols):
                values[p[key]].append(run.name)
            if len(values) > 1:
                listed = " vs ".join(f"{value} ({', '.join(names)})" for value, names in values.items())
                differences.append(f"{algorithm} on {dataset}: {key} differs: {listed}")
        if differences:
            problems += differences
            continue
        seeds: dict[Any, list[Run]] = defaultdict(list)
        for run in cell:
            seeds[run.seed].append(run)
        for seed, same in seeds.items():
            first = same[0]
            measured = (first.result["scores"], first.result["history"])
            if any((r.result["scores"], r.result["history"]) != measured for r in same[1:]):
                problems.append(f"{algorithm} on {dataset}: seed {seed} is claimed by {len(same)} different runs "
                                f"(their scores differ): {', '.join(r.name for r in same)}")
                continue
            kept.append(first)
            if len(same) > 1:
                duplicates.append((first.name, [r.name for r in same[1:]]))
    return kept, duplicates, problems


def load_references(path: str | os.PathLike | None) -> dict[str, Any]:
    """A references file: `methods: {NAME: {label, protocol, compare_with, scores: {task: [mean, std]},
    averages: {domain: value}}}` and `tasks: {our dataset: paper task}`."""
    if path is None:
        return {"methods": {}, "tasks": {}}
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"references file {path} not found (named by grid.json or --references; relative paths are relative to "
            f"the working directory, {Path.cwd()})"
        )
    data = yaml.safe_load(Path(path).read_text()) or {}
    methods = data.get("methods") or {}
    for name, method in methods.items():
        for task, value in (method.get("scores") or {}).items():
            if not (isinstance(value, list) and len(value) in (1, 2) and all(isinstance(v, int | float) for v in value)):
                raise ValueError(f"{path}: methods.{name}.scores.{task} must be [mean, std] or [mean], got {value!r}")
    return {"methods": methods, "tasks": data.get("tasks") or {}, "source": data.get("source", ""), "path": str(path)}


def _reference(method: dict[str, Any], tasks: dict[str, str], dataset: str) -> Summary | None:
    scores = method.get("scores") or {}
    value = scores.get(dataset, scores.get(tasks.get(dataset, "")))
    if value is None:
        return None
    return Summary(float(value[0]), float(value[1]) if len(value) > 1 else math.nan, 0)


# --------------------------------------------------------------------------- building the tables


@dataclass
class Column:
    label: str
    source: str  # "measured" or "paper"
    algorithm: str | None = None  # measured column
    method: dict[str, Any] | None = None  # paper column


@dataclass
class Tables:
    runs: list[Run]  # the runs counted: complete records, one per (algorithm, dataset, seed)
    datasets: list[str]  # row order, grouped by domain
    algorithms: list[str]
    columns: list[Column]
    expected_seeds: int
    cells: dict[str, dict[tuple[str, str], Summary]]  # kind -> (dataset, algorithm) -> summary
    failed: dict[tuple[str, str], list[dict[str, Any]]]
    references: dict[str, Any]
    seeds_from_grid: bool
    title: str = ""
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (result.json, reason), path order
    duplicates: list[tuple[str, list[str]]] = field(default_factory=list)  # (the record counted, its copies)
    warnings: list[str] = field(default_factory=list)  # other files that could not be read
    _statistics: Statistics | None = field(default=None, repr=False)  # see statistics()


def build(results_dir: str | os.PathLike, references: str | os.PathLike | None = None) -> Tables:
    """The tables of the runs under `results_dir`. A UserError (nothing is written) when no run is
    complete, or when a cell's runs differ in protocol or two different runs claim one seed."""
    results_dir = Path(results_dir)
    warnings: list[str] = []
    grid = _read_aside(results_dir / "grid.json", warnings)
    left_out: list[tuple[str, str]] = []
    complete = []
    for run in collect_runs(results_dir, left_out):
        problem = record_problem(run)
        if problem is None:
            complete.append(run)
        else:
            print(f"offbench table: warning: {run.path / 'result.json'}: {problem}; this run is left out of the tables",
                  file=sys.stderr)
            left_out.append((run.name, problem))
    left_out.sort()
    runs, duplicates, problems = check_cells(complete)
    if problems:
        raise UserError(
            f"{results_dir}: tables not written ({len(problems)} problem(s)): the runs of a cell (algorithm, dataset) "
            "must share one protocol and one run per seed; move the other runs to a results folder of their own "
            "or delete them, then run `offbench table` again\n" + "\n".join(f"  {p}" for p in problems)
        )
    if not runs:
        raise UserError(_no_runs(results_dir, grid, left_out))
    for kept, copies in duplicates:
        print(f"offbench table: warning: {', '.join(copies)} under {results_dir}: a copy of {kept} (the same run), "
              "counted once", file=sys.stderr)
    if references is None and grid.get("references"):
        references = grid["references"]
    refs = load_references(references)

    algorithms = _ordered(grid.get("algorithms", []), [r.algorithm for r in runs])
    datasets = _ordered(grid.get("datasets", []), [r.dataset for r in runs])
    datasets = sorted(datasets, key=lambda d: DOMAINS.index(domain(d)))  # stable: grid order within a domain
    cells: dict[str, dict[tuple[str, str], Summary]] = {}
    for kind in KINDS:
        values: dict[tuple[str, str], list[float]] = defaultdict(list)
        for run in runs:
            values[(run.dataset, run.algorithm)].append(run.score(kind))
        cells[kind] = {key: summarize(v) for key, v in values.items()}
    seeds = grid.get("seeds")
    expected = len(seeds) if seeds else max((s.n for s in cells["last"].values()), default=0)

    columns: list[Column] = [Column(a, "measured", algorithm=a) for a in algorithms]
    for name, method in refs["methods"].items():
        if not method.get("scores"):
            continue  # a placeholder without numbers: listed under the table, not shown as an empty column
        column = Column(method.get("label") or f"{name} (paper)", "paper", method=method)
        ours = method.get("compare_with")  # beside our column of the same method; the others at the end
        after = [i for i, c in enumerate(columns) if ours and c.source == "measured" and c.algorithm == ours]
        columns.insert(after[0] + 1 if after else len(columns), column)

    failed: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for entry in _read_aside(results_dir / "failures.json", warnings).values():
        if isinstance(entry, dict):
            failed[(entry.get("dataset"), entry.get("algorithm"))].append(entry)
    return Tables(runs, datasets, algorithms, columns, expected, cells, dict(failed), refs, bool(seeds),
                  title=_title(results_dir), left_out=left_out, duplicates=duplicates, warnings=warnings)


def _title(results_dir: Path) -> str:
    """The results directory as given when relative (results/quick), else its name: never a path that
    changes with where the directory lies, so that a copy of it gives the same table.md."""
    return results_dir.as_posix() if not results_dir.is_absolute() else results_dir.name


def _read_aside(path: Path, warnings: list[str]) -> dict[str, Any]:
    """grid.json or failures.json ({} when absent); one that cannot be read is a warning, not an error."""
    value, problem = _read(path)
    if problem is None and value is not None and not isinstance(value, dict):
        problem = f"{path} is not a JSON object"
    if problem is not None:
        print(f"offbench table: warning: {problem}; read as absent", file=sys.stderr)
        warnings.append(f"{problem.replace(str(path), path.name)}; read as absent")
        return {}
    return value or {}


def _no_runs(results_dir: Path, grid: dict[str, Any], left_out: list[tuple[str, str]]) -> str:
    """The one-line reason why there is no table to write."""
    keep = "the tables there are left as they are"
    if left_out:
        listed = "; ".join(f"{name}: {reason}" for name, reason in left_out[:3])
        more = f"; and {len(left_out) - 3} more" if len(left_out) > 3 else ""
        return f"no complete result.json under {results_dir} ({len(left_out)} left out: {listed}{more}); {keep}"
    where = results_dir / "runs" if (results_dir / "runs").is_dir() or grid else results_dir
    grid_file = grid.get("grid_file")
    if grid_file and Path(grid_file).as_posix() == f"configs/grids/{Path(grid_file).stem}.yaml":
        how = f"`make benchmark GRID={Path(grid_file).stem}` (`offbench bench {grid_file}`)"
    elif grid_file:
        how = f"`offbench bench {grid_file}`"
    else:
        how = "`make benchmark` (or `offbench bench GRID.yaml`)"
    return f"no result.json under {where}: run {how} first; {keep}"


def _ordered(first: list[str], found: list[str]) -> list[str]:
    return list(dict.fromkeys([*first, *sorted(set(found), key=found.index)]))


def _value(t: Tables, kind: str, dataset: str, column: Column) -> Summary | None:
    if column.source == "paper":
        return _reference(column.method or {}, t.references["tasks"], dataset)
    return t.cells[kind].get((dataset, column.algorithm))


def _average(t: Tables, kind: str, datasets: list[str], column: Column, dom: str) -> tuple[float | None, int]:
    """Mean of the per-dataset means of a domain, and how many of its datasets had a value."""
    values = [s.mean for d in datasets if (s := _value(t, kind, d, column)) is not None]
    if column.source == "paper":
        stated = (column.method or {}).get("averages", {}).get(dom)
        # The paper's stated average is over its whole domain: use it when all its tasks are rows here.
        domain_tasks = [k for k in (column.method or {}).get("scores", {}) if domain(k) == dom]
        if stated is not None and len(values) == len(domain_tasks) == len(datasets):
            return float(stated), len(values)
    return (float(np.mean(values)) if values else None), len(values)


def _format(s: Summary | None, expected: int, failed: bool, paper: bool) -> str:
    if s is None:
        return "failed" if failed else "—"
    if paper:
        return f"{s.mean:.1f}" if math.isnan(s.std) else f"{s.mean:.1f} ± {s.std:.1f}"
    text = f"{s.mean:.1f} ± {s.std:.1f}" if s.n > 1 else f"{s.mean:.1f} ± n/a"  # one seed: no spread to show
    if s.n < expected:
        return text + f" [{s.n}/{expected}]"
    return text + (" (1 seed)" if s.n == 1 else "")


def protocol_lines(t: Tables, kind: str) -> list[str]:
    """How each number was measured, from the runs' own result.json protocols."""
    # protocol -> algorithm -> datasets, in table order
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for algorithm in t.algorithms:
        for dataset in t.datasets:
            for description in sorted({_run_protocol(r) for r in t.runs if (r.algorithm, r.dataset) == (algorithm, dataset)}):
                groups[description][algorithm].append(dataset)
    seeds = f"{t.expected_seeds} seed{'s' if t.expected_seeds != 1 else ''} per cell " + (
        "(the grid's)" if t.seeds_from_grid else "(the most found; no grid.json)"
    )
    lines = [
        f"**{kind}**: {KIND_TEXT[kind]}.",
        f"Cell: mean ± std over training seeds of the per-run score (std with ddof={DDOF}, over seeds; not over "
        f"episodes or evaluations); target {seeds}; `[n/N]` marks a cell with only n of the N seeds finished; `± n/a`: one seed, no spread.",
        "Score: D4RL normalized score 100 × (return − ref_min) / (ref_max − ref_min), averaged over the episodes of "
        "an evaluation; AntMaze: 100 × the share of episodes that reached the goal.",
        "Averages: mean of the per-dataset means of a domain (no std); `(k/n)` marks an average over k of its n rows.",
    ]
    for description, by_algorithm in groups.items():
        where = [
            f"{algorithm} on " + ("all datasets" if datasets == t.datasets else ", ".join(datasets))
            for algorithm, datasets in by_algorithm.items()
        ]
        lines.append(f"Runs: {description} — {'; '.join(where)}.")
    return lines


def _run_protocol(run: Run) -> str:
    p = run.result.get("protocol", {})
    k = run.result.get("scores", {}).get("final_mean_k")
    return (
        f"{run.result.get('updates')} updates, an evaluation every {p.get('eval_interval_updates')} updates "
        f"({p.get('evaluations')} in all), {p.get('episodes_per_evaluation')} episodes per evaluation, "
        f"final_mean over the last {k}"
    )


def score_matrices(t: Tables, kind: str) -> dict[str, stats.Matrix]:
    """Each algorithm's (runs, datasets) matrix of the per-run score `kind`, runs in seed order."""
    out = {}
    for algorithm in t.algorithms:
        by_dataset: dict[str, list[float]] = {}
        for dataset in t.datasets:
            runs = sorted(_cell_runs(t, dataset, algorithm), key=_seed_order)
            if runs:
                by_dataset[dataset] = [r.score(kind) for r in runs]
        if by_dataset:
            out[algorithm] = stats.score_matrix(algorithm, by_dataset)
    return out


def _seed_order(run: Run) -> tuple[int, Any]:
    return (0, run.seed) if isinstance(run.seed, int) else (1, str(run.seed))


@dataclass
class Statistics:
    """rliable's estimates for every per-run score: the matrices, the aggregates and P(X > Y)."""

    matrices: dict[str, dict[str, stats.Matrix]]  # kind -> algorithm -> matrix
    aggregates: dict[str, dict[str, dict[str, stats.Estimate]]]  # kind -> algorithm -> metric -> (p, lo, hi)
    improvements: dict[str, dict[tuple[str, str], tuple[Any, ...]]]  # kind -> (x, y) -> (p, lo, hi, datasets)


def statistics(t: Tables) -> Statistics:
    """Computed once per Tables (a few seconds: one bootstrap per algorithm and per pair and kind).
    P(Y > X) is 1 - P(X > Y) on the same resamples, so each pair is bootstrapped once."""
    if t._statistics is None:
        matrices, aggregates, improvements = {}, {}, {}
        for kind in KINDS:
            matrices[kind] = m = score_matrices(t, kind)
            aggregates[kind] = {a: stats.aggregates(matrix) for a, matrix in m.items()}
            improvements[kind] = {}
            names = list(m)
            for i, x in enumerate(names):
                for y in names[i + 1:]:
                    result = stats.improvement(m[x], m[y])
                    if result is not None:
                        p, low, high, datasets = result
                        improvements[kind][(x, y)] = result
                        flipped = (None, None) if low is None else (1 - high, 1 - low)
                        improvements[kind][(y, x)] = (1 - p, *flipped, datasets)
        t._statistics = Statistics(matrices, aggregates, improvements)
    return t._statistics


def diff_rows(t: Tables) -> list[dict[str, Any]]:
    """Our cells of each paper method with `compare_with` against the paper's numbers, for every kind and
    every method whose algorithm has runs here; `outside` when |ours - paper| > max(paper std, DIFF_POINTS)."""
    rows = []
    for name, method in t.references["methods"].items():
        ours = method.get("compare_with")
        if not ours or not method.get("scores") or ours not in t.algorithms:
            continue
        for dataset in t.datasets:
            paper = _reference(method, t.references["tasks"], dataset)
            if paper is None:
                continue
            tolerance = max(0.0 if math.isnan(paper.std) else paper.std, DIFF_POINTS)
            row = {"method": name, "algorithm": ours, "dataset": dataset, "paper": paper, "tolerance": tolerance}
            for kind in KINDS:
                s = t.cells[kind].get((dataset, ours))
                row[kind] = s
                row[f"{kind}_delta"] = None if s is None else s.mean - paper.mean
                row[f"{kind}_outside"] = None if s is None else abs(s.mean - paper.mean) > tolerance
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- rendering


def _row_groups(t: Tables) -> list[tuple[str, list[str]]]:
    groups = [(dom, [d for d in t.datasets if domain(d) == dom]) for dom in DOMAINS]
    return [(dom, datasets) for dom, datasets in groups if datasets]


def _cell_text(t: Tables, kind: str, dataset: str, column: Column) -> str:
    failed = (dataset, column.algorithm) in t.failed
    return _format(_value(t, kind, dataset, column), t.expected_seeds, failed, column.source == "paper")


def _average_text(t: Tables, kind: str, datasets: list[str], column: Column, dom: str) -> str:
    mean, k = _average(t, kind, datasets, column, dom)
    if mean is None:
        return "—"
    return f"{mean:.2f}" + ("" if k == len(datasets) else f" ({k}/{len(datasets)})")


def render_markdown(t: Tables) -> str:
    out = [f"# Results: {t.title}", ""]
    counts = f"{len(t.runs)} finished runs; {len(t.algorithms)} algorithms; {len(t.datasets)} datasets."
    if t.left_out:
        counts += f" **{len(t.left_out)} runs left out: see below** (Runs left out)."
    if t.duplicates:
        n = len(t.duplicates)
        counts += f" {n} run{'s' if n != 1 else ''} found more than once, counted once: see below (Duplicate records)."
    out.append(counts + " Three tables, one per per-run score; read `last` or `final_mean` as the honest numbers, `best` "
               "as the optimistic one the papers report. Under each table: rliable's aggregates and probabilities of "
               "improvement of that same per-run score; `profiles.png`: performance profiles of each score.")
    out += ["", *data_lines(t), *config_lines(t)]
    notes = _dataset_notes(t)
    if notes:
        out += ["", *notes]
    for kind in KINDS:
        out += ["", f"## {kind}", "", *protocol_lines(t, kind), ""]
        header = ["dataset", *[c.label for c in t.columns]]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for dom, datasets in _row_groups(t):
            for dataset in datasets:
                cells = [_cell_text(t, kind, dataset, c) for c in t.columns]
                out.append(f"| {_row_label(t, dataset)} | " + " | ".join(cells) + " |")
            if len(datasets) > 1:
                cells = [_average_text(t, kind, datasets, c, dom) for c in t.columns]
                out.append(f"| **{DOMAIN_TEXT[dom]} average** | " + " | ".join(cells) + " |")
        out += _statistics_markdown(t, kind)
    out += _reference_notes(t)
    out += _diff_markdown(t)
    out += _failure_markdown(t)
    out += _records_markdown(t)
    return "\n".join(out) + "\n"


def _cell_runs(t: Tables, dataset: str, algorithm: str | None) -> list[Run]:
    return [r for r in t.runs if (r.dataset, r.algorithm) == (dataset, algorithm)]


def _data_groups(t: Tables, dataset: str) -> dict[tuple[str, str], list[Run]]:
    """The runs of a row grouped by their data (fingerprint, ref_min and ref_max), one run per column."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for algorithm in t.algorithms:
        runs = _cell_runs(t, dataset, algorithm)
        if runs:  # every run of a cell has the same data (check_cells)
            groups[(runs[0].fingerprint, protocol(runs[0])["data ref_min, ref_max"])].append(runs[0])
    return groups


def _row_label(t: Tables, dataset: str) -> str:
    return dataset + (" [data differs: see Data]" if len(_data_groups(t, dataset)) > 1 else "")


def data_lines(t: Tables) -> list[str]:
    """Each row's data as the runs recorded it: fingerprint, reference returns, source."""
    out = [f"Data: the first {FINGERPRINT_DIGITS} hex digits of the fingerprint (sha256 of the dataset arrays) that "
           "each run recorded in its result.json, with the reference returns of its normalized score; `unknown`: a "
           "record written before result.json held it. The runs of one cell always share it."]
    for dataset in t.datasets:
        groups = _data_groups(t, dataset)
        texts = []
        for (fingerprint, refs), runs in groups.items():
            data = runs[0].result.get("data") or {}
            text = "unknown" if fingerprint == UNKNOWN else f"`{fingerprint[:FINGERPRINT_DIGITS]}`"
            text += "" if refs == UNKNOWN else f" (ref_min, ref_max = {refs}"
            text += (f"; source: {data['source']})" if data.get("source") else ")") if refs != UNKNOWN else ""
            if len(groups) > 1:
                text += " for " + ", ".join(r.algorithm for r in runs)
            texts.append(text)
        if len(groups) > 1:
            texts.append("**the columns of this row were not trained on data known to be the same**")
        out.append(f"- {dataset}: " + ("; ".join(texts) if texts else "no runs"))
    return out


def config_lines(t: Tables) -> list[str]:
    """Each algorithm's config hash (per dataset when they differ)."""
    out = []
    for algorithm in t.algorithms:
        hashes: dict[str, list[str]] = defaultdict(list)
        for dataset in t.datasets:
            runs = _cell_runs(t, dataset, algorithm)
            if runs:
                hashes[protocol(runs[0])["config hash"]].append(dataset)
        if len(hashes) == 1:
            out.append(f"{algorithm} `{next(iter(hashes))}`")
        elif hashes:
            out.append(f"{algorithm} " + ", ".join(f"`{h}` ({', '.join(d)})" for h, d in hashes.items()))
    return ["", "Configs (the first 12 hex digits of the sha256 of each run's hyperparameters and data settings, seed excluded; the runs "
            "of one cell always share it): " + "; ".join(out) + "."] if out else []


def _records_markdown(t: Tables) -> list[str]:
    out = []
    if t.left_out:
        out += ["", "## Runs left out", "",
                f"{len(t.left_out)} result.json under this directory are not counted in any number above (fix or delete "
                "them, then run `offbench table` again):", ""]
        out += [f"- `{name}`: {reason}" for name, reason in t.left_out]
    if t.duplicates:
        out += ["", "## Duplicate records", "",
                "The same run (algorithm, dataset, seed, protocol and scores) found more than once, counted once:", ""]
        out += [f"- `{kept}` counted; not again: " + ", ".join(f"`{c}`" for c in copies) for kept, copies in t.duplicates]
    if t.warnings:
        out += ["", "## Warnings", "", *[f"- {w}" for w in t.warnings]]
    return out


def _ci(value: tuple[Any, ...], digits: int = 1) -> str:
    if value[1] is None:  # one run per dataset: no interval (stats.MIN_RUNS)
        return f"{value[0]:.{digits}f} (no CI: 1 run)"
    return f"{value[0]:.{digits}f} [{value[1]:.{digits}f}, {value[2]:.{digits}f}]"


def _statistics_markdown(t: Tables, kind: str) -> list[str]:
    s = statistics(t)
    matrices, aggregates, improvements = s.matrices[kind], s.aggregates[kind], s.improvements[kind]
    if not matrices:
        return []
    bootstrap = (f"95% percentile CIs from rliable's stratified bootstrap ({stats.REPS} resamples of the runs within each "
                 f"dataset, numpy seed {stats.SEED} for each estimate)")
    out = ["", f"Aggregates of `{kind}` with rliable over each algorithm's runs × datasets score matrix: IQM (mean of the "
           "middle 50% of all its runs), mean and median of the per-dataset means, optimality gap (100 − the mean of "
           f"min(score, 100): how far below expert level); {bootstrap}. Comparable between algorithms only over the same "
           "datasets.", "",
           "| algorithm | " + " | ".join(stats.METRICS) + " | runs × datasets |", "|---" * (len(stats.METRICS) + 2) + "|"]
    for algorithm, m in matrices.items():
        shape = f"{m.runs} × {len(m.datasets)}" + (f" (the first {m.runs} seeds of each dataset; {m.finished} runs finished)" if m.finished > m.scores.size else "")
        out.append(f"| {algorithm} | " + " | ".join(_ci(aggregates[algorithm][name]) for name in stats.METRICS) + f" | {shape} |")
    single = [a for a, m in matrices.items() if m.runs < stats.MIN_RUNS]
    if single:
        out += ["", f"**One run per dataset** for {', '.join(single)}: each of its numbers is a single draw, without an "
                "interval (`no CI: 1 run`; a bootstrap of one run gives a zero-width interval that would look certain)."]
    names = list(matrices)
    if len(names) > 1:
        out += ["", f"Probability of improvement on `{kind}`: P(row > column), the probability that a run of the row algorithm "
                "scores higher than a run of the column algorithm on a dataset (ties count one half), averaged over the "
                f"datasets both ran; {bootstrap.replace('stratified bootstrap', 'stratified independent bootstrap')}. "
                "Above 0.5: the row tends to beat the column. The runs behind each algorithm: `runs × datasets` "
                "above; `no CI: 1 run` where either algorithm has one run per dataset.", "",
                "| P(row > column) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for x in names:
            cells = ["—" if x == y else (_ci(improvements[(x, y)][:3], 2) if (x, y) in improvements else "no common dataset")
                     for y in names]
            out.append(f"| {x} | " + " | ".join(cells) + " |")
    return out


def _dataset_notes(t: Tables) -> list[str]:
    from offbench.data.catalog import CATALOG

    notes = [f"- {d}: {CATALOG[d].note}" for d in t.datasets if d in CATALOG and CATALOG[d].note]
    return ["Dataset notes:", *notes] if notes else []


def _reference_notes(t: Tables) -> list[str]:
    methods = t.references["methods"]
    if not methods:
        return []
    out = ["", "## Paper references", "", f"From {t.references.get('path')}: {t.references.get('source', '')}".rstrip(), ""]
    for name, method in methods.items():
        scores = method.get("scores") or {}
        status = f"{len(scores)} numbers" if scores else "no numbers entered yet (not shown)"
        out.append(f"- {method.get('label') or name}: {status}. Protocol: {method.get('protocol', 'not stated')}")
    mapped = t.references["tasks"]
    if mapped:
        pairs = [f"{ours} ↔ {paper}" for ours, paper in mapped.items() if ours in t.datasets]
        out.append("- rows matched to the paper's tasks: " + ", ".join(pairs))
    return out


def _diff_markdown(t: Tables) -> list[str]:
    rows = diff_rows(t)
    if not rows:
        return []
    out = ["", "## Diff against the paper", "",
           f"Our measured cells against the paper's mean; flagged (**outside**) when |ours − paper| > max(paper std, "
           f"{DIFF_POINTS:g} points). Each method's paper numbers follow its own protocol (see Paper references); "
           "DiffCPS Table 1's are `best`-style (the best results each paper reports; online model selection for "
           "DiffCPS), so `best` is the like-for-like comparison; `last` and `final_mean` show how much of it is "
           "selection.", "",
           "| dataset | paper | tolerance | " + " | ".join(f"{kind} (Δ)" for kind in DIFF_KINDS) + " |",
           "|---|---|---|---|---|---|"]
    flagged = {kind: 0 for kind in DIFF_KINDS}
    for row in rows:
        cells = []
        for kind in DIFF_KINDS:
            s = row[kind]
            if s is None:
                cells.append("—")
                continue
            flagged[kind] += bool(row[f"{kind}_outside"])
            text = f"{_format(s, t.expected_seeds, False, False)} ({row[f'{kind}_delta']:+.1f})"
            cells.append(f"**outside** {text}" if row[f"{kind}_outside"] else text)
        paper = row["paper"]
        head = f"| {row['dataset']} ({row['algorithm']}) | {_format(paper, 0, False, True)} | {row['tolerance']:.1f} | "
        out.append(head + " | ".join(cells) + " |")
    compared = {kind: sum(r[kind] is not None for r in rows) for kind in DIFF_KINDS}
    counts = ", ".join(f"{kind} {flagged[kind]}/{compared[kind]}" for kind in DIFF_KINDS)
    out += ["", f"Outside: {counts} of the compared cells."]
    return out


def _failure_markdown(t: Tables) -> list[str]:
    if not t.failed:
        return []
    out = ["", "## Failed cells (from failures.json; re-run the grid to retry them)", ""]
    for entries in t.failed.values():
        for e in entries:
            last = (e.get("reason") or "").strip().splitlines()[-1:] or [""]
            cell = f"{e.get('algorithm')} / {e.get('dataset')} / seed {e.get('seed')}"
            out.append(f"- {cell}: {e.get('exit')}: `{last[0][:200]}` (log: {e.get('log')})")
    return out


def render_csv(t: Tables) -> str:
    """Long format: one row per (table, dataset or summary row, column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "row", "domain", "column", "source", "mean", "std", "n_seeds", "expected_seeds",
                     "ci_low", "ci_high", "note", "data_fingerprint", "config_hash"])
    for kind in KINDS:
        for dom, datasets in _row_groups(t):
            for dataset in datasets:
                for c in t.columns:
                    s = _value(t, kind, dataset, c)
                    if s is None:
                        continue
                    std = "" if math.isnan(s.std) else s.std
                    if c.source == "paper":
                        writer.writerow([kind, dataset, dom, c.label, c.source, s.mean, std, "", "", "", "", "", "", ""])
                        continue
                    run = _cell_runs(t, dataset, c.algorithm)[0]
                    note = "1 seed: no std" if s.n == 1 else ""
                    writer.writerow([kind, dataset, dom, c.label, c.source, s.mean, std, s.n, t.expected_seeds, "", "",
                                     note, run.fingerprint, protocol(run)["config hash"]])
            if len(datasets) > 1:
                for c in t.columns:
                    mean, k = _average(t, kind, datasets, c, dom)
                    if mean is not None:
                        writer.writerow([kind, f"average {dom}", dom, c.label, c.source, mean, "", "", "", "", "",
                                         f"mean of per-dataset means over {k}/{len(datasets)} rows", "", ""])
        st = statistics(t)
        matrices = st.matrices[kind]
        for algorithm, m in matrices.items():
            for name, (point, low, high) in st.aggregates[kind][algorithm].items():
                ci = "stratified bootstrap 95% CI" if low is not None else "a single draw, no CI"
                writer.writerow([kind, name, "aggregate", algorithm, "measured", point, "", m.runs, "", _blank(low),
                                 _blank(high), f"rliable, {m.runs} runs x {len(m.datasets)} datasets, {ci}", "", ""])
        for (x, y), (point, low, high, datasets) in st.improvements[kind].items():
            ci = "stratified independent bootstrap 95% CI" if low is not None else "no CI (1 run)"
            runs = f"{matrices[x].runs} vs {matrices[y].runs} runs per dataset"
            writer.writerow([kind, f"P({x} > {y})", "probability of improvement", x, "measured", point, "", "", "",
                             _blank(low), _blank(high), f"rliable, over {len(datasets)} common datasets, {runs}, {ci}",
                             "", ""])
    return buffer.getvalue()


def _blank(value: float | None) -> Any:
    return "" if value is None else value


def render_latex(t: Tables) -> str:
    def esc(text: str) -> str:
        return re.sub(r"([_&%#$])", r"\\\1", text).replace("±", r"$\pm$").replace("—", "--")

    out = ["% offbench tables: mean $\\pm$ std over seeds (ddof=0); see table.md for the full protocol"]
    out += [f"% {line}" for line in data_lines(t)]
    for kind in KINDS:
        out += [f"% {kind}: {KIND_TEXT[kind]}", r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\toprule",
                " & ".join(["Dataset", *[esc(c.label) for c in t.columns]]) + r" \\", r"\midrule"]
        for dom, datasets in _row_groups(t):
            for dataset in datasets:
                cells = [_cell_text(t, kind, dataset, c) for c in t.columns]
                out.append(" & ".join(esc(x) for x in [_row_label(t, dataset), *cells]) + r" \\")
            if len(datasets) > 1:
                averages = [_average(t, kind, datasets, c, dom) for c in t.columns]
                cells = ["--" if m is None else f"{m:.2f}" for m, _ in averages]
                out += [r"\midrule", " & ".join([f"{DOMAIN_TEXT[dom]} average", *cells]) + r" \\", r"\midrule"]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out) + "\n"


def plot_curves(t: Tables, out_dir: Path) -> list[Path]:
    """One figure per dataset: normalized score against updates for each algorithm, the mean over
    seeds as a line and the min-max over seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in t.datasets:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for algorithm in t.algorithms:
            by_updates: dict[int, list[float]] = defaultdict(list)
            seeds = 0
            for run in t.runs:
                if run.dataset == dataset and run.algorithm == algorithm:
                    seeds += 1
                    for h in run.result.get("history", []):
                        by_updates[int(h["updates"])].append(float(h["score"]))
            if not by_updates:
                continue
            x = np.array(sorted(by_updates))
            y = [np.asarray(by_updates[u]) for u in x]
            label = f"{algorithm} ({seeds} seed{'s' if seeds != 1 else ''})"
            line, = ax.plot(x, [v.mean() for v in y], marker="o", markersize=3, label=label)
            ax.fill_between(x, [v.min() for v in y], [v.max() for v in y], alpha=0.2, color=line.get_color())
            drawn = True
        if drawn:
            ax.set(title=f"{dataset}\nmean over seeds, band: min–max over seeds", xlabel="updates",
                   ylabel="normalized score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(stats.save_figure(fig, out_dir / f"{_slug(dataset)}.png"))
        plt.close(fig)
    return written


# --------------------------------------------------------------------------- files and command line


def write_tables(
    results_dir: str | os.PathLike, latex: bool = False, references: str | os.PathLike | None = None
) -> list[Path]:
    """Write table.md, table.csv (table.tex with `latex`), curves/*.png and profiles.png into `results_dir`;
    for results holding grid sweeps, also the budget curves selection.md, selection.csv and selection.png."""
    results_dir = Path(results_dir)
    t = build(results_dir, references)
    rows = selection_rows(t)  # budget curves of grid sweeps
    files = {"table.md": render_markdown(t), "table.csv": render_csv(t)}  # all checked before anything is written
    if latex:
        files["table.tex"] = render_latex(t)
    if rows:
        files |= {"selection.md": render_selection_markdown(t, rows), "selection.csv": render_selection_csv(rows)}
    written = []
    for name, text in files.items():
        path = results_dir / name
        write_text_atomic(path, text)
        written.append(path)
    written += plot_curves(t, results_dir / "curves")
    panels = {kind: m for kind, m in statistics(t).matrices.items() if m}
    if panels:
        written.append(stats.plot_profiles(panels, results_dir / "profiles.png", PROFILE_TITLES))
    if rows:
        written.append(plot_selection(t, rows, results_dir / "selection.png"))
    return written


def _slug(text: str) -> str:
    if text.endswith((".hdf5", ".h5")):
        text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def main(argv: list[str]) -> int:
    parser = Parser(prog="offbench table", description="Tables and learning curves of a results directory.")
    parser.add_argument("results_dir", help="e.g. results/quick (every result.json below it is read)")
    parser.add_argument("--latex", action="store_true", help="also write table.tex")
    parser.add_argument("--references", default=None, help="paper references YAML (default: the grid's, from grid.json)")
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        raise MissingFileError(f"no directory {args.results_dir}: name a results directory, e.g. results/quick")
    try:
        written = write_tables(args.results_dir, args.latex, args.references)
    except (FileNotFoundError, ValueError) as e:  # a missing or malformed references file
        raise UserError(str(e)) from e
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# --------------------------------------------------------------------------- selection under a budget (grid sweeps)


@dataclass(frozen=True)
class SelectionRow:
    """One algorithm's sweep on one dataset: its candidates (settings x seeds) and its budget curve."""

    algorithm: str
    dataset: str
    settings: list[str]  # the sweep columns
    runs: list[Run]  # the candidates, in column then seed order
    curve: selection.BudgetCurve
    naive: float
    protocol: str  # the candidates' training and evaluation protocol (one for all of them)


def selection_rows(t: Tables) -> list[SelectionRow]:
    """The budget curves of every algorithm with sweep columns (`name@key=value,...`, see
    offbench/bench/grid.py) on every dataset; [] when the results hold no sweep. The candidates are the
    runs of the algorithm's sweep columns on the dataset, each one's pool the per-episode scores of its
    final evaluation (result.json history[-1].episode_scores, at the run's last update); all rows are
    simulated up to one budget, the largest number of episodes of a row's pools (candidates x episodes).
    A UserError when a candidate's record lacks episode scores or the candidates differ in protocol."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)  # every sweep column (the grid's), with runs or not
    for column in t.algorithms:
        parts = selection.sweep_parts(column)
        if parts is not None:
            for dataset in t.datasets:
                groups[(parts[0], dataset)].append(column)
    candidates = {key: [r for c in columns for r in sorted(_cell_runs(t, key[1], c), key=_seed_order)]
                  for key, columns in groups.items()}
    candidates = {key: runs for key, runs in candidates.items() if runs}
    lacking = [r.name for runs in candidates.values() for r in runs if not _final_pool(r)]
    if lacking:
        raise UserError(
            f"budget curves not written: {len(lacking)} run(s) of a sweep lack the per-episode scores of their final "
            f"evaluation (result.json history[-1].episode_scores, recorded since issue 28): {', '.join(lacking[:3])}"
            f"{' ...' if len(lacking) > 3 else ''}; rerun them (delete their run directories, then `offbench bench`)"
        )
    max_budget = max((len(runs) * len(_final_pool(runs[0])) for runs in candidates.values()), default=0)
    rows = []
    for (algorithm, dataset), runs in candidates.items():
        protocols = sorted({_run_protocol(r) for r in runs})
        if len(protocols) > 1:
            raise UserError(f"budget curves not written: the sweep of {algorithm} on {dataset} mixes protocols "
                            f"({' | '.join(protocols)}); candidates must share their training and evaluation")
        try:
            curve = selection.budget_curve([_final_pool(r) for r in runs], max_budget)
        except ValueError as e:
            raise UserError(f"budget curves not written: {algorithm} on {dataset}: {e}") from e
        best = {c: v for c in groups[(algorithm, dataset)] if (v := [r.score("best") for r in runs if r.algorithm == c])}
        rows.append(SelectionRow(algorithm, dataset, groups[(algorithm, dataset)], runs, curve,
                                 selection.naive_score(best), protocols[0]))
    return rows


def _final_pool(run: Run) -> list[float]:
    """The run's final evaluation's per-episode normalized scores ([] when not recorded)."""
    history = run.result.get("history") or [{}]
    last = history[-1]
    scores = last.get("episode_scores")
    if last.get("updates") != run.result.get("updates") or not isinstance(scores, list):
        return []
    return [float(s) for s in scores]


def render_selection_markdown(t: Tables, rows: list[SelectionRow]) -> str:
    c = rows[0].curve
    out = [
        f"# Policy selection under an evaluation budget: {t.title}", "",
        "Protocol (Jackson et al., arXiv:2504.11453, official code EmptyJackson/unifloral `evaluation.py`; "
        "offbench/selection.py, docs/statistics.md \"Budget curves\"): the candidates of a row are the runs of the "
        "algorithm's sweep (hyperparameter settings x training seeds) on the dataset; a candidate's pool is the "
        "normalized scores of the episodes of its final evaluation. A UCB bandit (alpha "
        f"{c.alpha:g}, ties broken at random, up to {selection.SUBSAMPLE} candidates per trial) pulls one episode per "
        "evaluation, drawn with replacement from the pulled candidate's pool, and after b pulls selects the candidate "
        "of highest mean observed score. **UCB(b)**: the mean over "
        f"{c.repeats} trials of the selected candidate's true score (its pool's mean), with the {c.confidence:.0%} "
        f"percentile-bootstrap interval of that mean over trials ({selection.BOOTSTRAPS} resamples; seed {c.seed}): "
        "the randomness of the selection, not of training. **oracle**: the best candidate's true score (UCB's "
        "limit). **naive**: the best setting's mean over seeds of each run's best evaluation during training "
        "(checkpoint and setting picked on the evaluations reported; no budget counted: optimistic).", "",
    ]
    for dataset in t.datasets:
        here = [r for r in rows if r.dataset == dataset]
        if not here:
            continue
        out += [f"## {dataset}", ""]
        for r in here:
            expected = len(r.settings) * t.expected_seeds
            missing = f" **incomplete: {len(r.runs)} of the {expected} runs**" if len(r.runs) < expected else ""
            pools = np.array([_final_pool(run) for run in r.runs])
            means = pools.mean(axis=1)
            out.append(
                f"- **{r.algorithm}**: {len(r.settings)} setting{'s' if len(r.settings) != 1 else ''} "
                f"({', '.join(r.settings)}) x seeds = {r.curve.candidates} candidates{missing} of {r.curve.episodes} "
                f"episodes each; their true scores from {means.min():.1f} to {means.max():.1f}, per-episode std "
                f"{pools.std(axis=1).mean():.1f} (mean over candidates); runs: {r.protocol}."
            )
        out += ["", "| budget (episodes) | " + " | ".join(r.algorithm for r in here) + " |",
                "|---|" + "---|" * len(here)]
        for i, b in enumerate(here[0].curve.budgets):
            cells = [f"{r.curve.expected[i]:.1f} [{r.curve.ci_low[i]:.1f}, {r.curve.ci_high[i]:.1f}]" for r in here]
            out.append(f"| UCB({b}) | " + " | ".join(cells) + " |")
        out.append("| **oracle** | " + " | ".join(f"{r.curve.oracle:.1f}" for r in here) + " |")
        out.append("| **naive** | " + " | ".join(f"{r.naive:.1f}" for r in here) + " |")
        out.append("")
    return "\n".join(out)


def render_selection_csv(rows: list[SelectionRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "algorithm", "budget", "ucb_expected", "ci_low", "ci_high", "oracle", "naive",
                     "candidates", "episodes", "settings"])
    for r in rows:
        c = r.curve
        for i, b in enumerate(c.budgets):
            writer.writerow([r.dataset, r.algorithm, int(b), *(f"{v:.4f}" for v in (c.expected[i], c.ci_low[i],
                             c.ci_high[i], c.oracle, r.naive)), c.candidates, c.episodes, " ".join(r.settings)])
    return buffer.getvalue()


def plot_selection(t: Tables, rows: list[SelectionRow], path: Path) -> Path:
    """Budget curves: one panel per dataset; UCB's expected score with its interval as a band, the oracle
    dashed and the naive score dotted, in the algorithm's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in t.datasets if any(r.dataset == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(8.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in (r for r in rows if r.dataset == dataset):
            c = r.curve
            line, = ax.plot(c.budgets, c.expected, marker="o", markersize=3, label=f"{r.algorithm}: UCB")
            ax.fill_between(c.budgets, c.ci_low, c.ci_high, alpha=0.2, color=line.get_color())
            ax.axhline(c.oracle, color=line.get_color(), linestyle="--", linewidth=1, label=f"{r.algorithm}: oracle")
            ax.axhline(r.naive, color=line.get_color(), linestyle=":", linewidth=1.5, label=f"{r.algorithm}: naive")
        ax.set_xscale("log", base=2)
        budgets = rows[0].curve.budgets  # one list for every row (selection_rows)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set(title=f"{dataset}\nscore of the UCB-selected policy (band: {rows[0].curve.confidence:.0%} interval)",
               xlabel="evaluation episodes (budget)", ylabel="normalized score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    written = stats.save_figure(fig, path)
    plt.close(fig)
    return written
