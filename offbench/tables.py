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
"""

from __future__ import annotations

import argparse
import csv
import io
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

from offbench import stats
from offbench.errors import MissingFileError, UserError
from offbench.files import read_json, write_text_atomic

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


@dataclass(frozen=True)
class Run:
    """One finished cell: its labels and its result.json."""

    algorithm: str
    dataset: str
    seed: Any
    result: dict[str, Any]
    path: Path

    def score(self, kind: str) -> float | None:
        value = self.result.get("scores", {}).get(kind)
        return None if value is None else float(value)


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    n: int


# --------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> Summary:
    """Mean and std (ddof=0) over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return Summary(float(array.mean()), float(array.std(ddof=DDOF)), len(array))


# --------------------------------------------------------------------------- reading results


def domain(dataset: str) -> str:
    """Table 1's domains: D4RL/Minari locomotion, AntMaze, and everything else (synthetic data, files)."""
    name = dataset.lower()
    if "antmaze" in name:
        return "antmaze"
    if re.match(r"^(halfcheetah|hopper|walker2d)-[a-z-]+-v\d+$", name) or name.startswith("mujoco/"):
        return "locomotion"
    return "other"


def collect_runs(results_dir: str | os.PathLike) -> list[Run]:
    """Every finished run under `results_dir`. Labels come from the cell.json that `offbench bench`
    writes next to result.json, else from result.json itself (class name, dataset, seed). The copies
    of result.json inside a run's W&B directory (`<run>/wandb/`, see offbench/wandb_logging.py) are
    not runs."""
    runs = []
    for path in sorted(Path(results_dir).rglob("result.json")):
        if "wandb" in path.relative_to(results_dir).parts[:-1]:
            continue
        try:
            result = read_json(path, fix="this run is left out of the tables; delete the file and rerun its cell")
            cell = read_json(path.parent / "cell.json", fix="this run is left out of the tables") or {}
        except UserError as e:
            print(f"offbench table: warning: {e}", file=sys.stderr)
            continue
        if result is None:  # removed since it was listed
            continue
        algorithm = cell.get("algorithm") or str(result.get("algorithm", "?")).rsplit(".", 1)[-1].lower()
        dataset = cell.get("dataset") or result.get("dataset", "?")
        runs.append(Run(algorithm, dataset, cell.get("seed", result.get("seed")), result, path.parent))
    return runs


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
    runs: list[Run]
    datasets: list[str]  # row order, grouped by domain
    algorithms: list[str]
    columns: list[Column]
    expected_seeds: int
    cells: dict[str, dict[tuple[str, str], Summary]]  # kind -> (dataset, algorithm) -> summary
    failed: dict[tuple[str, str], list[dict[str, Any]]]
    references: dict[str, Any]
    seeds_from_grid: bool
    _statistics: Statistics | None = field(default=None, repr=False)  # see statistics()


def build(results_dir: str | os.PathLike, references: str | os.PathLike | None = None) -> Tables:
    results_dir = Path(results_dir)
    grid = read_json(results_dir / "grid.json") or {}
    runs = collect_runs(results_dir)
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
            if run.score(kind) is not None:
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
    for entry in (read_json(results_dir / "failures.json") or {}).values():
        failed[(entry.get("dataset"), entry.get("algorithm"))].append(entry)
    return Tables(runs, datasets, algorithms, columns, expected, cells, dict(failed), refs, bool(seeds))


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
    text = f"{s.mean:.1f}" if math.isnan(s.std) else f"{s.mean:.1f} ± {s.std:.1f}"
    if not paper and s.n < expected:
        text += f" [{s.n}/{expected}]"
    return text


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
        f"episodes or evaluations); target {seeds}; `[n/N]` marks a cell with only n of the N seeds finished.",
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
            runs = sorted((r for r in t.runs if (r.algorithm, r.dataset) == (algorithm, dataset) and r.score(kind) is not None),
                          key=_seed_order)
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
    aggregates: dict[str, dict[str, dict[str, tuple[float, float, float]]]]  # kind -> algorithm -> metric -> (p, lo, hi)
    improvements: dict[str, dict[tuple[str, str], tuple[float, float, float, list[str]]]]  # kind -> (x, y) -> ...


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
                        improvements[kind][(y, x)] = (1 - p, 1 - high, 1 - low, datasets)
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


def render_markdown(t: Tables, results_dir: Path) -> str:
    out = [f"# Results: {results_dir}", ""]
    out.append(f"{len(t.runs)} finished runs; {len(t.algorithms)} algorithms; {len(t.datasets)} datasets. "
               "Three tables, one per per-run score; read `last` or `final_mean` as the honest numbers, `best` as the "
               "optimistic one the papers report. Under each table: rliable's aggregates and probabilities of improvement "
               "of that same per-run score; `profiles.png`: performance profiles of each score.")
    if not t.runs:
        out += ["", f"No finished runs (result.json) under {results_dir} yet."]
    notes = _dataset_notes(t)
    if notes:
        out += ["", *notes]
    for kind in KINDS:
        out += ["", f"## {kind}", "", *protocol_lines(t, kind), ""]
        header = ["dataset", *[c.label for c in t.columns]]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for dom, datasets in _row_groups(t):
            for dataset in datasets:
                out.append(f"| {dataset} | " + " | ".join(_cell_text(t, kind, dataset, c) for c in t.columns) + " |")
            if len(datasets) > 1:
                cells = [_average_text(t, kind, datasets, c, dom) for c in t.columns]
                out.append(f"| **{DOMAIN_TEXT[dom]} average** | " + " | ".join(cells) + " |")
        out += _statistics_markdown(t, kind)
    out += _reference_notes(t)
    out += _diff_markdown(t)
    out += _failure_markdown(t)
    return "\n".join(out) + "\n"


def _ci(value: tuple[float, ...], digits: int = 1) -> str:
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
    names = list(matrices)
    if len(names) > 1:
        out += ["", f"Probability of improvement on `{kind}`: P(row > column), the probability that a run of the row algorithm "
                "scores higher than a run of the column algorithm on a dataset (ties count one half), averaged over the "
                f"datasets both ran; {bootstrap.replace('stratified bootstrap', 'stratified independent bootstrap')}. "
                "Above 0.5: the row tends to beat the column.", "",
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
                     "ci_low", "ci_high", "note"])
    for kind in KINDS:
        for dom, datasets in _row_groups(t):
            for dataset in datasets:
                for c in t.columns:
                    s = _value(t, kind, dataset, c)
                    if s is not None:
                        std = "" if math.isnan(s.std) else s.std
                        seeds = [s.n, t.expected_seeds] if c.source == "measured" else ["", ""]
                        writer.writerow([kind, dataset, dom, c.label, c.source, s.mean, std, *seeds, "", "", ""])
            if len(datasets) > 1:
                for c in t.columns:
                    mean, k = _average(t, kind, datasets, c, dom)
                    if mean is not None:
                        writer.writerow([kind, f"average {dom}", dom, c.label, c.source, mean, "", "", "", "", "",
                                         f"mean of per-dataset means over {k}/{len(datasets)} rows"])
        st = statistics(t)
        for algorithm, m in st.matrices[kind].items():
            for name, (point, low, high) in st.aggregates[kind][algorithm].items():
                writer.writerow([kind, name, "aggregate", algorithm, "measured", point, "", m.runs, "", low, high,
                                 f"rliable, {m.runs} runs x {len(m.datasets)} datasets, stratified bootstrap 95% CI"])
        for (x, y), (point, low, high, datasets) in st.improvements[kind].items():
            writer.writerow([kind, f"P({x} > {y})", "probability of improvement", x, "measured", point, "", "", "", low,
                             high, f"rliable, over {len(datasets)} common datasets, stratified independent bootstrap 95% CI"])
    return buffer.getvalue()


def render_latex(t: Tables) -> str:
    def esc(text: str) -> str:
        return re.sub(r"([_&%#$])", r"\\\1", text).replace("±", r"$\pm$").replace("—", "--")

    out = ["% offbench tables: mean $\\pm$ std over seeds (ddof=0); see table.md for the full protocol"]
    for kind in KINDS:
        out += [f"% {kind}: {KIND_TEXT[kind]}", r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\toprule",
                " & ".join(["Dataset", *[esc(c.label) for c in t.columns]]) + r" \\", r"\midrule"]
        for dom, datasets in _row_groups(t):
            for dataset in datasets:
                cells = [_cell_text(t, kind, dataset, c) for c in t.columns]
                out.append(" & ".join(esc(x) for x in [dataset, *cells]) + r" \\")
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
            line, = ax.plot(x, [v.mean() for v in y], marker="o", markersize=3, label=f"{algorithm} ({seeds} seeds)")
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
    """Write table.md, table.csv (table.tex with `latex`), curves/*.png and profiles.png into `results_dir`."""
    results_dir = Path(results_dir)
    t = build(results_dir, references)
    files = {"table.md": render_markdown(t, results_dir), "table.csv": render_csv(t)}
    if latex:
        files["table.tex"] = render_latex(t)
    written = []
    for name, text in files.items():
        path = results_dir / name
        write_text_atomic(path, text)
        written.append(path)
    written += plot_curves(t, results_dir / "curves")
    panels = {kind: m for kind, m in statistics(t).matrices.items() if m}
    if panels:
        written.append(stats.plot_profiles(panels, results_dir / "profiles.png", PROFILE_TITLES))
    return written


def _slug(text: str) -> str:
    if text.endswith((".hdf5", ".h5")):
        text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="offbench table", description="Tables and learning curves of a results directory.")
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
