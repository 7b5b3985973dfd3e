"""`offbench table`: values on hand-made result.json files (mean, std over seeds, averages, the paper
column, the diff report), and the rliable statistics against rliable itself and hand computations."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics

from offbench import stats, tables
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
                      "SfBC (paper) | DD (paper) | Diffuser (paper) | Diffusion-QL (paper) | IQL (paper) |")
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
