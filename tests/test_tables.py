"""`offbench table`: values on hand-made result.json files (mean, std over seeds, averages, the paper
column, the diff report), and the rliable statistics against rliable itself and hand computations."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics

from offbench import stats, tables
from offbench.cli import main as cli_main
from offbench.tables import build, diff_rows, render_markdown, write_tables

REPO = Path(__file__).resolve().parents[1]
REFERENCES = REPO / "configs/references/table1.yaml"

# (algorithm, dataset) -> per-seed (last, best, final_mean)
RUNS = {
    ("diffcps", "hopper-medium-v2"): [(80.0, 90.0, 85.0), (84.0, 92.0, 86.0), (82.0, 88.0, 84.0)],
    ("diffcps", "walker2d-medium-v2"): [(88.0, 90.0, 89.0), (86.0, 91.8, 87.0)],
    ("diffcps", "D4RL/antmaze/umaze-v1"): [(90.0, 95.0, 91.0), (70.0, 99.0, 80.0), (80.0, 97.0, 81.0)],
    ("bc", "hopper-medium-v2"): [(50.0, 55.0, 52.0), (54.0, 57.0, 53.0), (52.0, 56.0, 54.0)],
    ("bc", "walker2d-medium-v2"): [(70.0, 75.0, 72.0), (72.0, 77.0, 74.0), (74.0, 76.0, 73.0)],
    ("bc", "synthetic/pendulum-random-v0"): [(10.0, 20.0, 15.0), (30.0, 40.0, 35.0), (20.0, 30.0, 25.0)],
}


def result(dataset: str, seed: int, last: float, best: float, final_mean: float) -> dict:
    history = [{"updates": 100, "score": best - 1, "return": 0.0, "score_std": 0.0, "seconds": 0.1},
               {"updates": 200, "score": best, "return": 0.0, "score_std": 0.0, "seconds": 0.1},
               {"updates": 300, "score": last, "return": 0.0, "score_std": 0.0, "seconds": 0.1}]
    return {
        "dataset": dataset, "algorithm": "algorithms.x.X", "seed": seed, "updates": 300, "history": history,
        "hyperparameters": {"obs_dim": 3, "act_dim": 1, "actor_lr": 0.001},
        "scores": {"last": last, "best": best, "best_updates": 200, "final_mean": final_mean, "final_mean_k": 2},
        "protocol": {"episodes_per_evaluation": 10, "eval_interval_updates": 100, "evaluations": 3},
    }


@pytest.fixture(autouse=True)
def few_resamples(monkeypatch):
    """200 bootstrap resamples instead of 2000 keep these tests fast; every check holds for any count."""
    monkeypatch.setattr(stats, "REPS", 200)


@pytest.fixture
def results(tmp_path) -> Path:
    """A results directory as `offbench bench` leaves it: grid.json (3 seeds, the table1 references),
    and one run directory per finished cell with cell.json and result.json."""
    datasets = list(dict.fromkeys(d for _, d in RUNS))
    (tmp_path / "grid.json").write_text(json.dumps({
        "name": "t", "seeds": [0, 1, 2], "algorithms": ["bc", "diffcps"], "datasets": datasets,
        "references": str(REFERENCES),
    }))
    for (algorithm, dataset), seeds in RUNS.items():
        for seed, scores in enumerate(seeds):
            run = tmp_path / "runs" / algorithm / tables._slug(dataset) / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "cell.json").write_text(json.dumps({"algorithm": algorithm, "dataset": dataset, "seed": seed}))
            (run / "result.json").write_text(json.dumps(result(dataset, seed, *scores)))
    # a W&B run keeps a copy of result.json (offline-run-*/files/): not a run of its own
    copy = tmp_path / "runs/bc/hopper-medium-v2/seed0/wandb/offline-run-1-abc/files"
    copy.mkdir(parents=True)
    (copy / "result.json").write_text((copy.parents[2] / "result.json").read_text())
    (tmp_path / "failures.json").write_text(json.dumps({"diffcps/synthetic-pendulum-random-v0/seed0": {
        "algorithm": "diffcps", "dataset": "synthetic/pendulum-random-v0", "seed": 0, "exit": "exit code 1",
        "reason": "Traceback...\nFloatingPointError: loss/actor became NaN", "log": "x/bench.log"}}))
    return tmp_path


def rows(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    return {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(path.read_text()))}


def test_cells_are_mean_and_population_std_over_seeds(results):
    write_tables(results)
    table = rows(results / "table.csv")
    cell = table[("last", "hopper-medium-v2", "diffcps")]
    # last = 80, 84, 82: mean 82, std (ddof=0) sqrt((4 + 4 + 0) / 3)
    assert float(cell["mean"]) == pytest.approx(82.0)
    assert float(cell["std"]) == pytest.approx(math.sqrt(8 / 3))
    assert (cell["n_seeds"], cell["expected_seeds"]) == ("3", "3")
    best = table[("best", "D4RL/antmaze/umaze-v1", "diffcps")]
    assert float(best["mean"]) == pytest.approx(97.0) and float(best["std"]) == pytest.approx(math.sqrt(8 / 3))
    final = table[("final_mean", "walker2d-medium-v2", "diffcps")]
    assert float(final["mean"]) == pytest.approx(88.0) and float(final["std"]) == pytest.approx(1.0)
    assert final["n_seeds"] == "2"


def test_domain_averages_and_the_paper_column(results):
    write_tables(results)
    table = rows(results / "table.csv")
    # locomotion average = mean of the per-dataset means: hopper 82, walker2d 87
    assert float(table[("last", "average locomotion", "diffcps")]["mean"]) == pytest.approx((82 + 87) / 2)
    assert float(table[("last", "average locomotion", "bc")]["mean"]) == pytest.approx((52 + 72) / 2)
    # the paper column: hopper-medium-v2 100.1 +- 3.5; AntMaze matched through the references' task map
    paper = table[("best", "hopper-medium-v2", "DiffCPS (paper)")]
    assert (float(paper["mean"]), float(paper["std"]), paper["source"]) == (100.1, 3.5, "paper")
    assert float(table[("best", "D4RL/antmaze/umaze-v1", "DiffCPS (paper)")]["mean"]) == 97.4
    # only 2 of its 9 locomotion tasks are rows here: the paper's stated 92.26 would not be comparable
    assert float(table[("best", "average locomotion", "DiffCPS (paper)")]["mean"]) == pytest.approx((100.1 + 90.9) / 2)
    assert ("best", "average antmaze", "diffcps") not in table  # one AntMaze row: no average

    md = (results / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    # the paper column beside ours; every other column of the paper's Table 1 after them (no runs of theirs here)
    assert header == ("| dataset | bc | diffcps | DiffCPS (paper) | CQL (paper) | IDQL-A (paper) | QGPO (paper) | "
                      "SfBC (paper) | DD (paper) | Diffuser (paper) | Diffuser v2 (code) | Diffusion-QL (paper) | IQL (paper) |")
    assert "| walker2d-medium-v2 | 76.0 ± 0.8 | 90.9 ± 0.9 [2/3] | 90.9 ± 1.6 |" in md  # best in md
    assert "| synthetic/pendulum-random-v0 | 20.0 ± 8.2 | failed | — |" in md  # last in md
    assert "| **locomotion average** | 62.00 | 84.50 | 95.50 |" in md  # last in md
    for text in ["ddof=0", "10 episodes per evaluation", "an evaluation every 100 updates", "3 seeds per cell",
                 "CQL (paper): 15 numbers", "D4RL/antmaze/umaze-v1 ↔ antmaze-umaze-v0",
                 "FloatingPointError: loss/actor became NaN"]:
        assert text in md, text


def test_diff_report_flags_cells_outside_the_paper_std_or_3_points(results):
    t = build(results)
    diff = {r["dataset"]: r for r in diff_rows(t)}
    assert set(diff) == {"hopper-medium-v2", "walker2d-medium-v2", "D4RL/antmaze/umaze-v1"}
    hopper = diff["hopper-medium-v2"]  # best 90 vs 100.1 +- 3.5: off by 10.1 > 3.5
    assert hopper["tolerance"] == 3.5 and hopper["best_delta"] == pytest.approx(-10.1) and hopper["best_outside"]
    walker = diff["walker2d-medium-v2"]  # best 90.9 vs 90.9 +- 1.6: tolerance is 3 points
    assert walker["tolerance"] == 3.0 and not walker["best_outside"]
    assert walker["last_outside"]  # last 87 vs 90.9: 3.9 > 3
    assert not walker["final_mean_outside"]  # final_mean 88: 2.9 off
    umaze = diff["D4RL/antmaze/umaze-v1"]  # best 97 vs 97.4 +- 3.7; last 80: 17.4 off
    assert not umaze["best_outside"] and umaze["last_outside"]
    md = (write_tables(results)[0]).read_text()
    assert "Outside: best 1/3, last 3/3, final_mean 2/3" in md


def write_matrix(root: Path, scores: dict[str, np.ndarray], datasets: list[str]) -> None:
    """A results directory holding `scores[algorithm][seed, dataset]` as the `last` score of each run."""
    for algorithm, matrix in scores.items():
        for seed, row in enumerate(matrix):
            for dataset, value in zip(datasets, row):
                run = root / "runs" / algorithm / tables._slug(dataset) / f"seed{seed}"
                run.mkdir(parents=True)
                (run / "cell.json").write_text(json.dumps({"algorithm": algorithm, "dataset": dataset, "seed": seed}))
                (run / "result.json").write_text(json.dumps(result(dataset, seed, float(value), float(value), float(value))))


def test_aggregates_equal_rliables_on_a_fixed_score_matrix(tmp_path):
    datasets = ["halfcheetah-medium-v2", "hopper-medium-v2", "walker2d-medium-v2"]  # the table's (found) order
    rng = np.random.default_rng(7)
    scores = {"a": rng.uniform(0, 110, size=(5, 3)).round(1), "b": rng.uniform(20, 60, size=(5, 3)).round(1)}
    write_matrix(tmp_path, scores, datasets)
    write_tables(tmp_path)
    table = rows(tmp_path / "table.csv")

    def rliable_metrics(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x),
                         metrics.aggregate_optimality_gap(x, 100)])

    for algorithm, matrix in scores.items():
        np.random.seed(stats.SEED)  # rliable's bootstraps draw from numpy's global RNG
        point, interval = rly.get_interval_estimates({algorithm: matrix}, rliable_metrics, reps=stats.REPS)
        for i, name in enumerate(stats.METRICS):
            row = table[("last", name, algorithm)]
            assert float(row["mean"]) == pytest.approx(point[algorithm][i], abs=1e-12), name
            assert float(row["ci_low"]) == pytest.approx(interval[algorithm][0, i], abs=1e-12), name
            assert float(row["ci_high"]) == pytest.approx(interval[algorithm][1, i], abs=1e-12), name
            assert row["n_seeds"] == "5"
    # IQM by hand: 15 values, scipy's trim_mean cuts int(0.25 * 15) = 3 from each end
    middle = np.sort(scores["a"].ravel())[3:12]
    assert float(table[("last", "IQM", "a")]["mean"]) == pytest.approx(middle.mean())
    gap = 100 - np.minimum(scores["a"], 100).mean()
    assert float(table[("last", "optimality gap", "a")]["mean"]) == pytest.approx(gap)

    # P(a > b) with rliable's own (scipy Mann-Whitney) function on the same resamples
    np.random.seed(stats.SEED)
    point, interval = rly.get_interval_estimates({"ab": [scores["a"], scores["b"]]}, metrics.probability_of_improvement,
                                                 reps=stats.REPS)
    ab, ba = table[("last", "P(a > b)", "a")], table[("last", "P(b > a)", "b")]
    assert float(ab["mean"]) == pytest.approx(point["ab"])
    assert (float(ab["ci_low"]), float(ab["ci_high"])) == pytest.approx(tuple(np.ravel(interval["ab"])))
    assert float(ba["mean"]) == pytest.approx(1 - point["ab"])
    assert (float(ba["ci_low"]), float(ba["ci_high"])) == pytest.approx((1 - float(ab["ci_high"]), 1 - float(ab["ci_low"])))
    md = (tmp_path / "table.md").read_text()
    assert "Aggregates of `final_mean` with rliable" in md and "Probability of improvement on `best`" in md
    assert (tmp_path / "profiles.png").stat().st_size > 10_000


def test_probability_of_improvement_and_profiles_match_rliable():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    y = np.array([[2.0, 5.0], [2.0, 4.0]])
    # dataset 0: 1 < 2, 1 < 2, 3 > 2, 3 > 2 -> 1/2; dataset 1: ties 5 = 5 count 1/2: (0.5 + 1 + 0.5 + 1) / 4
    assert stats.probability_of_improvement(x, y) == pytest.approx((0.5 + 0.75) / 2)
    rng = np.random.default_rng(0)
    for _ in range(50):  # small integers: many ties; unequal run counts
        a = rng.integers(0, 4, size=(rng.integers(1, 5), 3)).astype(float)
        b = rng.integers(0, 4, size=(rng.integers(1, 5), 3)).astype(float)
        assert stats.probability_of_improvement(a, b) == pytest.approx(metrics.probability_of_improvement(a, b))
        taus = np.linspace(-1, 4, 11)
        assert stats.score_distribution(a, taus) == pytest.approx(rly.score_distributions(a, taus))


def test_statistics_under_unequal_seed_counts(results):
    """diffcps has 3, 2 and 3 seeds on its datasets: rliable's matrix takes 2 runs of each, and says so."""
    t = build(results)
    assert len(t.runs) == sum(map(len, RUNS.values()))  # the W&B copy of a result.json is not counted
    assert tables.statistics(t).matrices["last"]["bc"].scores.shape == (3, 3)
    m = tables.statistics(t).matrices["last"]["diffcps"]
    assert m.datasets == ["hopper-medium-v2", "walker2d-medium-v2", "D4RL/antmaze/umaze-v1"]
    assert m.scores.tolist() == [[80.0, 88.0, 90.0], [84.0, 86.0, 70.0]] and m.finished == 8
    bc = tables.statistics(t).aggregates["last"]["bc"]["mean"]
    assert bc[0] == pytest.approx(np.mean([52, 72, 20]))  # mean of the per-dataset means
    # bc vs diffcps over the two datasets both ran: bc's runs are all below diffcps's there
    p, low, high, common = tables.statistics(t).improvements["last"][("bc", "diffcps")]
    assert common == ["hopper-medium-v2", "walker2d-medium-v2"] and (p, low, high) == (0.0, 0.0, 0.0)
    md = render_markdown(t)
    assert "| diffcps | " in md and "2 × 3 (the first 2 seeds of each dataset; 8 runs finished)" in md


def test_command_line_writes_latex_and_curves(results, capsys):
    assert tables.main([str(results), "--latex"]) == 0
    tex = (results / "table.tex").read_text()
    assert r"\begin{tabular}" in tex and r"82.0 $\pm$ 1.6" in tex and "DiffCPS (paper)" in tex
    curves = sorted(p.name for p in (results / "curves").glob("*.png"))
    assert curves == ["D4RL-antmaze-umaze-v1.png", "hopper-medium-v2.png", "synthetic-pendulum-random-v0.png",
                      "walker2d-medium-v2.png"]
    assert not list(results.glob("*.tmp*"))  # atomic writes leave no temporary files


def test_results_without_grid_json(tmp_path):
    """Plain `offbench fit` runs: labels from result.json, the target seed count from the data."""
    for seed, score in enumerate([10.0, 20.0]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "result.json").write_text(json.dumps(result("hopper-medium-v2", seed, score, score, score)))
    run = tmp_path / "other"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(result("walker2d-medium-v2", 0, 5.0, 5.0, 5.0)))
    t = build(tmp_path)
    assert t.algorithms == ["x"] and t.expected_seeds == 2
    md = write_tables(tmp_path)[0].read_text()
    assert "| hopper-medium-v2 | 15.0 ± 5.0 |" in md and "| walker2d-medium-v2 | 5.0 ± n/a [1/2] |" in md


def test_each_paper_column_stands_beside_our_column_of_the_same_method(results):
    """Runs of iql and diffusion_ql: their paper columns follow them, the diff report covers them, and
    a paper method without runs here (CQL) has no diff rows."""
    for algorithm, score in (("iql", 70.0), ("diffusion_ql", 95.0)):
        run = results / "runs" / algorithm / "hopper-medium-v2" / "seed0"
        run.mkdir(parents=True)
        (run / "cell.json").write_text(json.dumps({"algorithm": algorithm, "dataset": "hopper-medium-v2", "seed": 0}))
        (run / "result.json").write_text(json.dumps(result("hopper-medium-v2", 0, score, score, score)))
    t = build(results)
    labels = [c.label for c in t.columns]
    assert labels.index("IQL (paper)") == labels.index("iql") + 1
    assert labels.index("Diffusion-QL (paper)") == labels.index("diffusion_ql") + 1
    diff = {(r["method"], r["dataset"]): r for r in diff_rows(t)}
    assert diff[("IQL", "hopper-medium-v2")]["best_delta"] == pytest.approx(70.0 - 66.3)
    assert diff[("Diffusion-QL", "hopper-medium-v2")]["best_delta"] == pytest.approx(95.0 - 90.5)
    assert not any(method == "CQL" for method, _ in diff)


def test_profiles_draw_any_number_of_algorithms(tmp_path):
    """The quick grid has 14 algorithms: more than one colour map's colours (a KeyError once)."""
    rng = np.random.default_rng(0)
    matrices = {f"algo{i}": stats.score_matrix(f"algo{i}", {"d": list(rng.uniform(0, 100, 2))}) for i in range(25)}
    path = stats.plot_profiles({"last": matrices}, tmp_path / "profiles.png", {"last": "last"})
    assert path.stat().st_size > 10_000


# --------------------------------------------------------------------------- records that must not mislead
# Each test below is one of the fault trials of the project's issue 30: on the tables of before it, each
# gave a wrong headline number or crashed without naming the file.

FINGERPRINT = "0123456789abcdef"


def write_run(root: Path, algorithm: str, dataset: str, seed: int, score: float = 50.0, folder: str | None = None,
              edit=None) -> Path:
    """One run directory as `offbench bench` writes it (cell.json, result.json with `data`); `edit(record)`
    changes the record before it is written. Returns the result.json."""
    run = root / (folder or f"runs/{algorithm}/{tables._slug(dataset)}/seed{seed}")
    run.mkdir(parents=True)
    record = result(dataset, seed, score, score + 5, score + 2)
    record["data"] = {"name": dataset, "fingerprint": FINGERPRINT, "ref_min": -10.0, "ref_max": 90.0, "source": "test",
                      "settings": {"class_path": "offbench.data.datamodule.OfflineDataModule",
                                   "init_args": {"dataset": dataset, "batch_size": 256}}}
    if edit is not None:
        edit(record)
    (run / "cell.json").write_text(json.dumps({"algorithm": algorithm, "dataset": dataset, "seed": seed}))
    (run / "result.json").write_text(json.dumps(record))
    return run / "result.json"


def refused(root: Path, capsys) -> str:
    """`offbench table root` refuses: exit 2, no file written, the message (stderr, after any warnings)."""
    before = sorted(p for p in root.rglob("*"))
    assert cli_main(["table", str(root)]) == 2
    assert sorted(p for p in root.rglob("*")) == before
    err = capsys.readouterr().err
    assert "offbench: error: " in err
    return err[err.index("offbench: error: "):]


def test_the_same_run_found_three_times_counts_once(tmp_path, capsys):
    """seed 0 copied into two more folders: one seed, not three, and the copies named."""
    first = write_run(tmp_path, "bc", "hopper-medium-v2", 0, score=40.0)
    for copy in ("backup/seed0", "runs/old/seed0"):
        (tmp_path / copy).mkdir(parents=True)
        for name in ("cell.json", "result.json"):
            (tmp_path / copy / name).write_text((first.parent / name).read_text())
    write_run(tmp_path, "bc", "hopper-medium-v2", 1, score=60.0)
    write_tables(tmp_path)
    cell = rows(tmp_path / "table.csv")[("last", "hopper-medium-v2", "bc")]
    assert (cell["n_seeds"], float(cell["mean"]), float(cell["std"])) == ("2", 50.0, 10.0)
    md = (tmp_path / "table.md").read_text()
    assert "2 finished runs" in md and "1 run found more than once, counted once" in md
    assert ("`backup/seed0/result.json` counted; not again: `runs/bc/hopper-medium-v2/seed0/result.json`, "
            "`runs/old/seed0/result.json`") in md
    assert "a copy of backup/seed0/result.json" in capsys.readouterr().err


def test_two_different_runs_claiming_one_seed_are_refused(tmp_path, capsys):
    write_run(tmp_path, "bc", "hopper-medium-v2", 0, score=40.0)
    write_run(tmp_path, "bc", "hopper-medium-v2", 0, score=70.0, folder="rerun/seed0")
    err = refused(tmp_path, capsys)
    assert ("bc on hopper-medium-v2: seed 0 is claimed by 2 different runs (their scores differ): "
            "rerun/seed0/result.json, runs/bc/hopper-medium-v2/seed0/result.json") in err


def test_400_and_1000_updates_in_one_cell_are_refused(tmp_path, capsys):
    """Two seeds of different training lengths are not two seeds of one measurement."""
    (tmp_path / "table.md").write_text("the table of before\n")

    def short(record):
        record["updates"] = 400

    def long(record):
        record["updates"] = 1000

    write_run(tmp_path, "td3bc", "hopper-medium-v2", 0, edit=short)
    write_run(tmp_path, "td3bc", "hopper-medium-v2", 1, edit=long)
    write_run(tmp_path, "bc", "hopper-medium-v2", 0)
    err = refused(tmp_path, capsys)
    assert ("td3bc on hopper-medium-v2: updates differs: 400 (runs/td3bc/hopper-medium-v2/seed0/result.json) vs "
            "1000 (runs/td3bc/hopper-medium-v2/seed1/result.json)") in err
    assert "tables not written (1 problem(s))" in err and "bc on" not in err.replace("td3bc on", "")
    assert (tmp_path / "table.md").read_text() == "the table of before\n"


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("protocol.episodes_per_evaluation", 5, "episodes per evaluation differs: 10 ("),
    ("protocol.eval_interval_updates", 50, "evaluation interval (updates) differs: 100 ("),
    ("protocol.evaluations", 6, "evaluations differs: 3 ("),
    ("hyperparameters.actor_lr", 0.0003, "config hash differs: "),
    ("data.settings.init_args.batch_size", 512, "config hash differs: "),
    ("algorithm", "algorithms.y.Y", "algorithm class differs: algorithms.x.X ("),
    ("data.ref_max", 95.0, "data ref_min, ref_max differs: -10.0, 90.0 ("),
])
def test_every_protocol_difference_in_a_cell_is_refused(tmp_path, capsys, key, value, shown):
    def edit(record):
        *parents, last = key.split(".")
        target = record
        for name in parents:
            target = target[name]
        target[last] = value

    write_run(tmp_path, "bc", "hopper-medium-v2", 0)
    write_run(tmp_path, "bc", "hopper-medium-v2", 1, edit=edit)
    err = refused(tmp_path, capsys)
    assert f"bc on hopper-medium-v2: {shown}" in err and "runs/bc/hopper-medium-v2/seed1/result.json" in err


def test_mixed_data_fingerprints_in_one_cell_are_refused(tmp_path, capsys):
    def other_data(record):
        record["data"]["fingerprint"] = "fedcba9876543210"

    def old_record(record):
        del record["data"]

    write_run(tmp_path, "bc", "hopper-medium-v2", 0)
    write_run(tmp_path, "bc", "hopper-medium-v2", 1, edit=other_data)
    write_run(tmp_path, "bc", "hopper-medium-v2", 2, edit=old_record)
    err = refused(tmp_path, capsys)
    assert (f"bc on hopper-medium-v2: data fingerprint differs: {FINGERPRINT} "
            "(runs/bc/hopper-medium-v2/seed0/result.json) vs fedcba9876543210 "
            "(runs/bc/hopper-medium-v2/seed1/result.json) vs unknown (runs/bc/hopper-medium-v2/seed2/result.json)") in err


def test_each_row_shows_its_data_fingerprint(tmp_path):
    """Rows show the first 12 hex digits; a row whose columns hold different (or unknown) data is marked."""
    write_run(tmp_path, "bc", "hopper-medium-v2", 0)
    write_run(tmp_path, "bc", "walker2d-medium-v2", 0)
    write_run(tmp_path, "iql", "walker2d-medium-v2", 0, edit=lambda record: record.pop("data"))
    write_tables(tmp_path)
    md = (tmp_path / "table.md").read_text()
    assert "- hopper-medium-v2: `0123456789ab` (ref_min, ref_max = -10.0, 90.0; source: test)" in md
    assert "- walker2d-medium-v2: `0123456789ab` (ref_min, ref_max = -10.0, 90.0; source: test) for bc; unknown for iql" in md
    assert "| walker2d-medium-v2 [data differs: see Data] |" in md and "| hopper-medium-v2 | 50.0 ± n/a (1 seed) |" in md
    table = rows(tmp_path / "table.csv")
    assert table[("last", "walker2d-medium-v2", "bc")]["data_fingerprint"] == FINGERPRINT
    assert table[("last", "walker2d-medium-v2", "iql")]["data_fingerprint"] == "unknown"


def test_a_result_without_scores_is_left_out_and_listed(tmp_path, capsys):
    """A run that recorded no evaluation is not a finished run."""
    write_run(tmp_path, "bc", "hopper-medium-v2", 0, score=40.0)
    write_run(tmp_path, "bc", "hopper-medium-v2", 1, edit=lambda record: record.pop("scores"))
    write_run(tmp_path, "bc", "hopper-medium-v2", 2, edit=lambda record: record["scores"].update(
        last=None, best=None, final_mean=None))
    write_tables(tmp_path)
    assert rows(tmp_path / "table.csv")[("last", "hopper-medium-v2", "bc")]["n_seeds"] == "1"
    md = (tmp_path / "table.md").read_text()
    assert "1 finished runs" in md and "**2 runs left out: see below**" in md
    for seed in (1, 2):
        assert f"- `runs/bc/hopper-medium-v2/seed{seed}/result.json`: no scores" in md
    assert "seed1/result.json: no scores" in capsys.readouterr().err


def test_a_result_missing_keys_is_left_out_never_shown_as_none(tmp_path):
    def strip(record):
        del record["updates"], record["protocol"]

    write_run(tmp_path, "bc", "hopper-medium-v2", 0)
    write_run(tmp_path, "iql", "hopper-medium-v2", 0, edit=strip)
    write_tables(tmp_path)
    md = (tmp_path / "table.md").read_text()
    assert "None" not in md and "None" not in (tmp_path / "table.csv").read_text()
    assert ("- `runs/iql/hopper-medium-v2/seed0/result.json`: missing or null: updates, "
            "protocol.episodes_per_evaluation, protocol.eval_interval_updates, protocol.evaluations") in md
    assert "Runs: 300 updates, an evaluation every 100 updates (3 in all), 10 episodes per evaluation" in md


def test_a_non_numeric_score_is_named_and_the_table_still_written(tmp_path, capsys):
    write_run(tmp_path, "bc", "hopper-medium-v2", 0)
    write_run(tmp_path, "bc", "hopper-medium-v2", 1, edit=lambda record: record["scores"].update(best="n/a"))
    write_run(tmp_path, "bc", "hopper-medium-v2", 2, edit=lambda record: record["history"][0].update(score=[1]))
    (tmp_path / "runs/bc/broken").mkdir()
    (tmp_path / "runs/bc/broken/result.json").write_text('{"scores": ')
    (tmp_path / "failures.json").write_text("[1, ")  # a damaged side file is a warning too
    assert cli_main(["table", str(tmp_path)]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "- `runs/bc/hopper-medium-v2/seed1/result.json`: scores.best is 'n/a', not a finite number" in md
    assert "- `runs/bc/hopper-medium-v2/seed2/result.json`: history[0] lacks a numeric updates or score" in md
    assert "- `runs/bc/broken/result.json`: result.json is unreadable (Expecting value" in md
    assert "- failures.json is unreadable (Expecting value: line 1 column 5 (char 4)); read as absent" in md
    err = capsys.readouterr().err
    assert f"{tmp_path}/runs/bc/hopper-medium-v2/seed1/result.json: scores.best is 'n/a'" in err


def test_one_seed_shows_no_interval(tmp_path):
    """One seed per algorithm: no std, no zero-width CI, and P(X > Y) a single draw that says so."""
    write_run(tmp_path, "bc", "hopper-medium-v2", 0, score=30.0)
    write_run(tmp_path, "td3bc", "hopper-medium-v2", 0, score=60.0)
    write_tables(tmp_path)
    md = (tmp_path / "table.md").read_text()
    assert "| hopper-medium-v2 | 30.0 ± n/a (1 seed) | 60.0 ± n/a (1 seed) |" in md
    assert "| td3bc | 60.0 (no CI: 1 run) | 60.0 (no CI: 1 run) |" in md
    assert "| td3bc | 1.00 (no CI: 1 run) | — |" in md and "[1.00, 1.00]" not in md
    assert "**One run per dataset** for bc, td3bc" in md
    table = rows(tmp_path / "table.csv")
    assert table[("last", "hopper-medium-v2", "bc")]["std"] == "" and table[("last", "IQM", "bc")]["ci_low"] == ""
    p = table[("last", "P(td3bc > bc)", "td3bc")]
    assert (float(p["mean"]), p["ci_low"], p["ci_high"]) == (1.0, "", "")
    assert "1 vs 1 runs per dataset, no CI (1 run)" in p["note"]


def test_one_seed_against_several_has_no_interval_either(tmp_path):
    """The bootstrap of P(X > Y) resamples both sides: one run on either side is no interval."""
    write_run(tmp_path, "bc", "hopper-medium-v2", 0, score=30.0)
    for seed, score in enumerate([55.0, 60.0, 65.0]):
        write_run(tmp_path, "td3bc", "hopper-medium-v2", seed, score=score)
    t = build(tmp_path)
    st = tables.statistics(t)
    assert st.aggregates["last"]["bc"]["IQM"] == (30.0, None, None)
    assert st.aggregates["last"]["td3bc"]["IQM"][1] is not None
    assert st.improvements["last"][("bc", "td3bc")][:3] == (0.0, None, None)


def test_no_finished_run_never_replaces_a_table(tmp_path, capsys):
    """A fresh clone: results/<grid>/ holds the committed tables and grid.json, no runs/."""
    results = tmp_path / "results/quick"
    results.mkdir(parents=True)
    (results / "grid.json").write_text(json.dumps({"name": "quick", "grid_file": "configs/grids/quick.yaml",
                                                   "seeds": [0, 1]}))
    for name in ("table.md", "table.csv", "profiles.png"):
        (results / name).write_text(f"committed {name}")
    err = refused(results, capsys)
    assert err.count("\n") == 1 and (f"no result.json under {results}/runs: run `make benchmark GRID=quick` "
                                     "(`offbench bench configs/grids/quick.yaml`) first") in err
    (results / "runs/bc/x/seed0").mkdir(parents=True)  # a cell that never finished
    (results / "runs/bc/x/seed0/result.json").write_text(json.dumps({"dataset": "x", "scores": {"last": None}}))
    err = refused(results, capsys)
    assert err.count("\n") == 1 and "no complete result.json under" in err and "runs/bc/x/seed0/result.json: no scores" in err
    for name in ("table.md", "table.csv", "profiles.png"):
        assert (results / name).read_text() == f"committed {name}"


def test_the_same_records_give_the_same_bytes(tmp_path):
    """Two copies of one results directory (2 algorithms × 3 seeds × 2 datasets, a paper reference, a
    one-seed cell, a duplicate and a damaged record), each tabled by its own Python process under another
    hash seed: every output file has the same bytes."""
    source = tmp_path / "a/results"
    for algorithm, base in (("bc", 40.0), ("diffcps", 70.0)):
        for dataset in ("hopper-medium-v2", "walker2d-medium-v2"):
            for seed in range(3):
                write_run(source, algorithm, dataset, seed, score=base + 3 * seed + len(dataset))
    write_run(source, "iql", "hopper-medium-v2", 0, score=55.0)
    copy = source / "backup/seed0"
    copy.mkdir(parents=True)
    for name in ("cell.json", "result.json"):
        (copy / name).write_text((source / "runs/bc/hopper-medium-v2/seed0" / name).read_text())
    (source / "runs/broken").mkdir()
    (source / "runs/broken/result.json").write_text("{")
    shutil.copytree(source, tmp_path / "b/results")
    written = []
    for hash_seed, root in (("1", source), ("2", tmp_path / "b/results")):
        code = ("import sys; from offbench import stats, tables; stats.REPS = 200; "
                f"sys.exit(tables.main([{str(root)!r}, '--latex', '--references', {str(REFERENCES)!r}]))")
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, capture_output=True)
        written.append({p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
                        if p.is_file() and "runs" not in p.parts and "backup" not in p.parts})
    names = sorted(str(p) for p in written[0])
    assert names == ["curves/hopper-medium-v2.png", "curves/walker2d-medium-v2.png", "profiles.png", "table.csv",
                     "table.md", "table.tex"]
    assert written[0].keys() == written[1].keys()
    for name in written[0]:
        assert written[0][name] == written[1][name], name
    assert b"Software" not in written[0][Path("profiles.png")]
