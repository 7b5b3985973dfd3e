"""Policy selection under an evaluation budget (offbench/selection.py): the UCB bandit on hand-made arms,
its budget curves, equality with the official unifloral code on recorded draws (tests/data/golden/selection.npz,
recorded by tests/data/golden/recording/selection_record.py), grid sweeps and the tables' budget curves."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from offbench import selection, stats, tables
from offbench.bench import GridError, load_grid
from offbench.cli import main as cli_main
from offbench.tables import write_tables

REPO = Path(__file__).resolve().parents[1]
GOLDEN = np.load(REPO / "tests/data/golden/selection.npz")
CASES = ("ties", "separated", "negative", "real")


def monte_carlo_bound(values: list[float], repeats: int) -> float:
    """4 standard errors of a mean over `repeats` trials of a selection whose outcomes are `values` at most."""
    return 4 * float(np.std(values)) / math.sqrt(repeats)


# --------------------------------------------------------------------------- hand-made arms


def test_deterministic_arms_every_arm_once_then_the_best():
    """Arms of constant reward 10, 20, 30, 40: UCB pulls each arm once in random order (ln 1 = 0 ties every arm
    at pull 1, then an unpulled arm's bonus is ~1e4), and keeps the best arm seen. After b pulls the selected arm
    is the best of b distinct random arms: E = 25, (20 + 2*30 + 3*40)/6 = 33.33, then 40 (exact: all arms seen)."""
    arms = [[10.0] * 4, [20.0] * 4, [30.0] * 4, [40.0] * 4]
    curve = selection.budget_curve(arms, repeats=4000)
    assert list(curve.budgets) == [1, 2, 4, 8, 16]
    bound = monte_carlo_bound([10, 20, 30, 40], 4000)
    assert abs(curve.expected[0] - 25.0) < bound
    assert abs(curve.expected[1] - 200 / 6) < bound
    assert list(curve.expected[2:]) == [40.0, 40.0, 40.0]
    assert curve.oracle == 40.0
    assert list(curve.ci_low[2:]) == list(curve.ci_high[2:]) == [40.0, 40.0, 40.0]  # no randomness left


def test_unpulled_arms_count_as_zero_as_in_the_official_code():
    """Arms of constant reward -10 and 5: after one pull, the official rule selects the highest mean with 0 for
    the unpulled arm, so pulling -10 first selects the other arm: the +5 arm is selected in every trial."""
    curve = selection.budget_curve([[-10.0] * 3, [5.0] * 3], repeats=200)
    assert list(curve.expected) == [5.0, 5.0, 5.0, 5.0]


def test_one_candidate_is_its_own_oracle():
    curve = selection.budget_curve([[1.0, 2.0, 6.0]], repeats=50)
    assert np.allclose(curve.expected, 3.0) and curve.oracle == 3.0 and list(curve.budgets) == [1, 2, 3]


def test_well_separated_arms_the_expected_score_rises_with_the_budget():
    """Noisy arms (means 0, 20, ..., 100, std 30 over 32 episodes): the expected score of the selected arm is
    non-decreasing in the budget (within 4 Monte Carlo standard errors of each step), far below the oracle with
    one episode and close to it with all of them."""
    rng = np.random.default_rng(0)
    pools = np.linspace(0, 100, 6)[:, None] + rng.normal(0, 30, size=(6, 32))
    curve = selection.budget_curve(pools, 192, repeats=2000)
    bound = monte_carlo_bound(pools.mean(axis=1), 2000)
    assert np.all(np.diff(curve.expected) > -2 * bound)
    assert curve.expected[-1] > curve.expected[0] + 30
    assert curve.oracle - curve.expected[-1] < 5 and curve.expected[-1] <= curve.oracle


def test_the_same_seed_gives_the_same_curve_and_another_seed_another():
    pools = np.random.default_rng(1).normal(50, 20, size=(5, 8))
    a, b, c = (selection.budget_curve(pools, repeats=100, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("expected", "ci_low", "ci_high"))
    assert not np.array_equal(a.expected, c.expected)


def test_bootstrap_interval_of_constant_values_is_the_value_and_covers_the_mean():
    rng = np.random.default_rng(0)
    low, high = selection.bootstrap_interval(rng, np.full((50, 2), 7.0))
    assert list(low) == list(high) == [7.0, 7.0]
    values = rng.normal(10, 2, size=(400, 1))
    low, high = selection.bootstrap_interval(rng, values)
    # the 95% interval of a mean of 400 values of std 2: about +-1.96 * 2 / 20 = 0.196 around it
    assert low[0] < values.mean() < high[0] and abs((high[0] - low[0]) - 0.39) < 0.08


def test_budgets_and_pools():
    assert list(selection.budgets_up_to(12)) == [1, 2, 4, 8, 12]
    assert list(selection.budgets_up_to(8)) == [1, 2, 4, 8]
    assert list(selection.budgets_up_to(1)) == [1]
    with pytest.raises(ValueError, match="same number of episodes"):
        selection.pool_array([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="finite"):
        selection.pool_array([[1.0, float("nan")]])
    assert selection.naive_score({"a": [1.0, 3.0], "b": [2.5, 2.5]}) == 2.5
    assert selection.sweep_parts("rebrac@actor_bc_coef=0.1,critic_bc_coef=0.01") == (
        "rebrac", {"actor_bc_coef": "0.1", "critic_bc_coef": "0.01"})
    assert selection.sweep_parts("td3bc") is None


# --------------------------------------------------------------------------- the official code


@pytest.mark.parametrize("case", CASES)
def test_equal_to_the_official_bandit_on_its_recorded_draws(case):
    """The official run_bandit's tie-broken arms and drawn episodes, replayed: at every pull the arms of maximal UCB
    value are the same set as the official values' (float64 both), and the selected policy's true score after every
    pull is the official one: exact for scores that are multiples of 1/4 (every mean is exact), within 1e-12 for
    real-valued scores (summation order; measured 7e-15)."""
    g = {k.split("/")[-1]: GOLDEN[k] for k in GOLDEN.files if k.startswith(f"replay/{case}/")}
    official_ties = g["ucb_values"] == g["ucb_values"].max(axis=1, keepdims=True)

    def choose(t, ties):
        assert np.array_equal(ties[0], official_ties[t - 1]), f"pull {t}"
        return g["arms"][t - 1 : t]

    selected = selection.ucb_trials(g["scores"], g["policy_idx"][None], 40, choose,
                                    lambda t, arms: g["episodes"][t - 1 : t])
    ours = g["scores"].mean(axis=1)[selected[0]]
    assert list(g["pulls"]) == list(range(1, 41))
    if case == "real":
        np.testing.assert_allclose(ours, g["estimated_bests"], rtol=0, atol=1e-12)
    else:
        assert np.array_equal(ours, g["estimated_bests"])


def test_curve_matches_the_official_trials_within_monte_carlo_error():
    """The official bootstrap_bandit_trials (its defaults: 1000 trials, alpha 2, 20 policies, 1000 bootstraps) on a
    pool of 12 x 16 episodes, against ours with numpy's generator: each budget's mean within 4 standard errors of the
    difference of two means of 1000 trials (sqrt(2/1000) x the official spread; measured over seeds 0-4 and 17:
    at most 1.7), and each interval's width within a factor 0.7-1.4 of the official one (measured: 0.89-1.22)."""
    curve = selection.budget_curve(GOLDEN["trials/scores"], 64)
    at = curve.budgets - 1
    z = (curve.expected - GOLDEN["trials/mean"][at]) / (GOLDEN["trials/std"][at] * math.sqrt(2 / 1000))
    assert np.all(np.abs(z) < 4), z
    ratio = (curve.ci_high - curve.ci_low) / (GOLDEN["trials/ci_high"][at] - GOLDEN["trials/ci_low"][at])
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


# --------------------------------------------------------------------------- grid sweeps


def write_grid(path: Path, sweep, **entry) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "name": "s", "output": str(path.parent / "out"), "seeds": 2, "updates": 10, "eval_every": 5,
        "datasets": ["synthetic/pendulum-random-v0"],
        "algorithms": [{"name": "td3bc", "config": "configs/algorithms/td3bc.yaml", "args": ["--x", "1"],
                        "sweep": sweep, **entry}],
    }))
    return path


def test_a_sweep_expands_into_one_column_per_combination(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"model.init_args.alpha": [1, 2.5], "data.batch_size": [64]}))
    assert grid.algorithms == ["td3bc@alpha=1,batch_size=64", "td3bc@alpha=2.5,batch_size=64"]
    assert len(grid.cells) == 4  # 2 settings x 1 dataset x 2 seeds
    cell = grid.cells[2]
    assert cell.algorithm == "td3bc@alpha=2.5,batch_size=64" and cell.seed == 0
    assert cell.args[-6:] == ["--x", "1", "--model.init_args.alpha", "2.5", "--data.batch_size", "64"]
    assert cell.run_dir == tmp_path / "out/runs/td3bc@alpha=2.5,batch_size=64/synthetic-pendulum-random-v0/seed0"


@pytest.mark.parametrize("sweep, message", [
    ([1, 2], "`sweep` must map setting keys to lists of values"),
    ({"model.init_args.alpha": 2.5}, "must list numbers, booleans or plain words"),
    ({"model.init_args.alpha": ["a b"]}, "must list numbers, booleans or plain words"),
    ({"model.init_args.alpha": [1, 1]}, "lists a value twice"),
    ({"model alpha": [1]}, "must be a dotted setting name"),
    ({"model.init_args.alpha": [1], "other.alpha": [2]}, "end in the same name 'alpha'"),
])
def test_a_bad_sweep_is_one_clear_problem(tmp_path, monkeypatch, sweep, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(GridError, match=message):
        load_grid(write_grid(tmp_path / "g.yaml", sweep))


def test_the_sweep_grid_expands():
    grid = load_grid(REPO / "configs/grids/sweep.yaml")
    assert len(grid.algorithms) == 10 and len(grid.cells) == 30
    assert "rebrac@actor_bc_coef=0.1,critic_bc_coef=0.01" in grid.algorithms


# --------------------------------------------------------------------------- the tables' budget curves


@pytest.fixture
def few_resamples(monkeypatch):
    """Fewer resamples keep these tests fast (as in tests/test_tables.py); every check holds for any count."""
    monkeypatch.setattr(stats, "REPS", 100)
    monkeypatch.setattr(selection, "budget_curve", functools.partial(selection.budget_curve, repeats=200, resamples=200))


def write_sweep_runs(root: Path, episode_scores: bool = True) -> None:
    """A sweep of two settings x 2 seeds with pools of 4 episodes, and a plain algorithm beside it."""
    (root / "grid.json").write_text(json.dumps({"name": "t", "seeds": [0, 1], "datasets": ["hopper-medium-v2"],
                                                "algorithms": ["bc", "td3bc@alpha=1", "td3bc@alpha=5"]}))
    pools = {("td3bc@alpha=1", 0): [10.0, 20.0, 30.0, 40.0], ("td3bc@alpha=1", 1): [30.0, 30.0, 30.0, 30.0],
             ("td3bc@alpha=5", 0): [60.0, 80.0, 70.0, 70.0], ("td3bc@alpha=5", 1): [0.0, 10.0, 0.0, 10.0],
             ("bc", 0): [5.0] * 4, ("bc", 1): [6.0] * 4}
    for (algorithm, seed), pool in pools.items():
        run = root / "runs" / algorithm / "hopper-medium-v2" / f"seed{seed}"
        run.mkdir(parents=True)
        last = float(np.mean(pool))
        history = [{"updates": 100, "score": last + 7, "episode_scores": [last + 7] * 4},
                   {"updates": 200, "score": last, **({"episode_scores": pool} if episode_scores else {})}]
        record = {
            "dataset": "hopper-medium-v2", "algorithm": "algorithms.x.X", "seed": seed, "updates": 200,
            "history": history, "hyperparameters": {"alpha": algorithm},
            "scores": {"last": last, "best": last + 7, "best_updates": 100, "final_mean": last, "final_mean_k": 2},
            "protocol": {"episodes_per_evaluation": 4, "eval_interval_updates": 100, "evaluations": 2},
        }
        (run / "cell.json").write_text(json.dumps({"algorithm": algorithm, "dataset": "hopper-medium-v2", "seed": seed}))
        (run / "result.json").write_text(json.dumps(record))


def test_table_writes_the_budget_curves_of_a_sweep(tmp_path, few_resamples):
    write_sweep_runs(tmp_path)
    written = write_tables(tmp_path)
    assert {tmp_path / n for n in ("selection.md", "selection.csv", "selection.png")} <= set(written)
    rows = (tmp_path / "selection.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,algorithm,budget,ucb_expected,ci_low,ci_high,oracle,naive")
    # 4 candidates x 4 episodes: budgets 1..16; oracle 70 (alpha=5 seed 0); naive: alpha=5, (77 + 12) / 2 = 44.5
    assert [r.split(",")[2] for r in rows[1:]] == ["1", "2", "4", "8", "16"]
    assert all(r.split(",")[:2] == ["hopper-medium-v2", "td3bc"] and r.split(",")[6:8] == ["70.0000", "44.5000"]
               for r in rows[1:])
    md = (tmp_path / "selection.md").read_text()
    assert ("2 settings (td3bc@alpha=1, td3bc@alpha=5) x seeds = 4 candidates of 4 episodes each; their true scores "
            "from 5.0 to 70.0, per-episode std 5.8 (mean over candidates)") in md
    assert "| **oracle** | 70.0 |" in md and "| **naive** | 44.5 |" in md
    t = tables.build(tmp_path)  # the same records, the same text
    again = tables.selection_rows(t)
    assert tables.render_selection_csv(again) == (tmp_path / "selection.csv").read_text()
    assert tables.render_selection_markdown(t, again) == md


def test_table_refuses_a_sweep_without_episode_scores(tmp_path, capsys):
    write_sweep_runs(tmp_path, episode_scores=False)
    assert cli_main(["table", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "budget curves not written: 4 run(s) of a sweep lack the per-episode scores" in err
    assert not (tmp_path / "table.md").exists() and not (tmp_path / "selection.md").exists()


def test_no_sweep_no_budget_curves(tmp_path):
    write_sweep_runs(tmp_path)
    for path in tmp_path.glob("runs/td3bc@*"):
        for f in sorted(path.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        path.rmdir()
    assert tables.selection_rows(tables.build(tmp_path)) == []  # write_tables writes no selection files then


def test_an_unfinished_sweep_is_marked(tmp_path):
    write_sweep_runs(tmp_path)
    for f in (tmp_path / "runs/td3bc@alpha=5/hopper-medium-v2/seed1").iterdir():
        f.unlink()
    t = tables.build(tmp_path)
    md = tables.render_selection_markdown(t, tables.selection_rows(t))
    assert "x seeds = 3 candidates **incomplete: 3 of the 4 runs** of 4 episodes each" in md


def test_the_committed_sweep_curves_regenerate_from_the_records():
    """results/sweep (configs/grids/sweep.yaml): selection.md and selection.csv rewritten from the shipped run records,
    byte for byte (the figure is rewritten by `offbench table results/sweep` with them)."""
    committed = REPO / "results/sweep"
    records = sorted((committed / "runs").rglob("result.json"))
    assert len(records) == len(json.loads((committed / "grid.json").read_text())["cells"]) == 30
    t = tables.build(committed)
    t.title = "results/sweep"  # as `offbench table results/sweep` names it from the repository root
    rows = tables.selection_rows(t)
    assert [r.algorithm for r in rows] == ["td3bc", "iql", "rebrac"]
    assert tables.render_selection_csv(rows) == (committed / "selection.csv").read_text()
    assert tables.render_selection_markdown(t, rows) == (committed / "selection.md").read_text()
