"""`offbench table`: values on hand-made result.json files (mean, std over seeds, averages, the paper
column, the diff report), IQM and its stratified bootstrap against hand computations."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from offbench import tables
from offbench.tables import build, diff_rows, iqm, stratified_bootstrap_ci, write_tables

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
        "scores": {"last": last, "best": best, "best_updates": 200, "final_mean": final_mean, "final_mean_k": 2},
        "protocol": {"episodes_per_evaluation": 10, "eval_interval_updates": 100, "evaluations": 3},
    }


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
    assert "| walker2d-medium-v2 | 76.0 ± 0.8 | 90.9 ± 0.9 [2/3] | 90.9 ± 1.6 |"  # best in md
    assert "| synthetic/pendulum-random-v0 | 20.0 ± 8.2 | failed | — |"  # last in md
    assert "| **locomotion average** | 62.00 | 84.50 | 95.50 |"  # last in md
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


def test_iqm_by_hand():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # drop 1, 2 and 7, 8
    assert iqm([8, 1, 100, 2]) == pytest.approx(5.0)  # n=4: drop one each side -> mean(2, 8)
    assert iqm([3, 1, 2]) == pytest.approx(2.0)  # n=3: floor(0.75) = 0 dropped
    assert iqm(np.array([[1, 2, 3, 4], [0, 0, 0, 40]]), axis=1).tolist() == [2.5, 0.0]


def test_stratified_bootstrap_by_hand():
    groups = [[1.0, 2.0], [3.0, 5.0, 10.0]]
    low, high = stratified_bootstrap_ci(groups, reps=4, rng=123)
    # The same draws by hand: per stratum an index array of shape (reps, stratum size), in order.
    rng = np.random.default_rng(123)
    first, second = rng.integers(0, 2, size=(4, 2)), rng.integers(0, 3, size=(4, 3))
    stats = []
    for r in range(4):
        sample = sorted([groups[0][i] for i in first[r]] + [groups[1][i] for i in second[r]])
        stats.append(sum(sample[1:4]) / 3)  # 5 values: IQM drops floor(5/4) = 1 at each end
    stats.sort()
    # numpy's linear percentile on 4 sorted values: position 0.025 * 3 and 0.975 * 3
    assert low == pytest.approx(stats[0] + 0.075 * (stats[1] - stats[0]))
    assert high == pytest.approx(stats[2] + 0.925 * (stats[3] - stats[2]))
    # Seeds that agree within every stratum leave nothing to resample: the CI is the point.
    assert stratified_bootstrap_ci([[4.0, 4.0], [7.0, 7.0, 7.0]]) == pytest.approx((iqm([4, 4, 7, 7, 7]),) * 2)


def test_iqm_rows_in_the_tables(results):
    write_tables(results)
    table = rows(results / "table.csv")
    bc = table[("last", "IQM all runs", "bc")]
    values = [s[0] for (a, _), seeds in RUNS.items() if a == "bc" for s in seeds]
    assert float(bc["mean"]) == pytest.approx(iqm(values)) and bc["n_seeds"] == "9"
    assert float(bc["ci_low"]) <= float(bc["mean"]) <= float(bc["ci_high"])


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
    assert "| hopper-medium-v2 | 15.0 ± 5.0 |" in md and "| walker2d-medium-v2 | 5.0 ± 0.0 [1/2] |" in md


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
