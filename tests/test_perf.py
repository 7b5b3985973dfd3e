"""`offbench perf` writes its report; no timing is asserted (speed is measured, not tested)."""

import json
from pathlib import Path

import pytest

from offbench.cli import main
from offbench.perf import (
    CONFIGS,
    EXTRA_ROWS,
    SLOW_ROWS,
    measure_training,
    noise_models,
    perf_rows,
    row_updates,
    training_table,
    updates_line,
)

REPO = Path(__file__).resolve().parents[1]


def test_perf_writes_a_report_with_both_rates_and_the_machine(tiny_hopper, tmp_path):
    main([
        "perf", "--configs", str(REPO / "configs/algorithms/bc.yaml"), "--dataset", str(tiny_hopper),
        "--updates", "20", "--block-size", "10", "--device", "cpu", "--eval-episodes", "2",
        "--eval-envs", "2", "--out", str(tmp_path),
    ])
    report = json.loads((tmp_path / "perf.json").read_text())
    (row,) = report["training"]
    assert row["algorithm"] == "algorithms.bc.BC" and row["updates_timed"] == 20 and row["batch_size"] == 256
    assert row["block_size"] == 10 and row["seconds"] > 0 and row["compiled_path"] is True
    assert row["lightning_updates_per_s"] > 0 and row["plain_updates_per_s"] > 0
    assert row["noise_model_calls_per_update"] is None  # BC has no diffusion model
    assert report["evaluation"]["env_steps_per_s_2_envs"] > 0 and report["machine"]["torch"]
    assert [(r["envs"], r["asynchronous"]) for r in report["evaluation"]["runs"]] == [(2, False), (1, False)]
    assert row["compiled_updates_per_s"] is None and row["errors"] == {}  # run without --compile
    assert report["updates"] == 20 and report["compile"] is False and report["planning"] == []
    md = (tmp_path / "perf.md").read_text()
    assert "algorithms.bc.BC" in md and "Updates per timing window (`updates`): 20 for every row." in md
    assert "CUDA graphs upd/s" not in md  # a CPU run has no CUDA graphs columns


def test_default_rows_are_every_config_with_its_extra_rows_and_budgets():
    configs = sorted(CONFIGS.glob("*.yaml"))
    rows = perf_rows(configs)
    labels = [r.label for r in rows]
    assert [r.label for r in rows if not r.init_args] == [c.stem for c in configs]  # one row per algorithm config
    assert "edp-iql" in labels and {r.label for r in EXTRA_ROWS} <= set(labels)
    assert set(SLOW_ROWS) <= set(labels), set(SLOW_ROWS) - set(labels)  # no budget for a row that is not there
    divisors = {r.label: r.divisor for r in rows}
    assert divisors["bc"] == 1 and divisors["cql"] == SLOW_ROWS["cql"] > 1
    assert row_updates(300, divisors["bc"]) == 300 and row_updates(300, 10) == 30 and row_updates(20, 100) == 1


def test_equal_updates_times_every_row_alike(tiny_hopper, tmp_path, monkeypatch):
    monkeypatch.setitem(SLOW_ROWS, "bc", 10)  # BC as if it were slow: 1/10 of --updates unless --equal-updates
    args = ["perf", "--configs", str(CONFIGS / "bc.yaml"), "--dataset", str(tiny_hopper), "--updates", "20", "--device", "cpu",
            "--eval-episodes", "1", "--eval-envs", "1", "--no-lightning"]
    main([*args, "--out", str(tmp_path / "reduced")])
    main([*args, "--equal-updates", "--out", str(tmp_path / "equal")])
    reduced = json.loads((tmp_path / "reduced/perf.json").read_text())
    equal = json.loads((tmp_path / "equal/perf.json").read_text())
    assert reduced["training"][0]["updates_timed"] == 2 and equal["training"][0]["updates_timed"] == 20
    assert "except the rows whose update is slow on a CPU" in (tmp_path / "reduced/perf.md").read_text()
    assert "20 for every row." in (tmp_path / "equal/perf.md").read_text()


def _fake_row(label: str, **extra) -> dict:
    return {"label": label, "algorithm": f"algorithms.{label}.X", "batch_size": 64, "parameters": 10, "updates_timed": 3,
            "block_size": 3, "lightning_updates_per_s": 1.0, "plain_updates_per_s": 1.0, "lightning_overhead_pct": 0.0,
            "compiled_updates_per_s": None, "compile_seconds": None, "errors": {}, **extra}


def test_table_columns_follow_the_modes_measured_and_say_why_a_column_is_na():
    cpu = training_table([_fake_row("decision_diffuser", compiled_path=False), _fake_row("bc", compiled_path=True),
                          _fake_row("diffcps-T100", compiled_path=True, not_compiled="minutes of compilation")])
    assert "CUDA graphs" not in cpu[0] and cpu[0].count("|") == cpu[1].count("|") == cpu[2].count("|") == 14
    assert any("decision_diffuser: no compiled path" in line for line in cpu)
    assert "- diffcps-T100: not compiled by offbench perf (minutes of compilation)" in cpu
    assert not any(line.startswith("- bc") for line in cpu)
    cuda = training_table([_fake_row("bc", cudagraphs_updates_per_s=5.0, cudagraphs_compile_seconds=2.0)])
    assert "CUDA graphs upd/s" in cuda[0] and cuda[0].count("|") == cuda[1].count("|") == cuda[2].count("|") == 16
    assert cuda[2].endswith("| 5.0 | 2.0 |")
    line = updates_line({"updates": 300, "training": [_fake_row("bc", updates_timed=300), _fake_row("sfbc", updates_timed=15)]})
    assert line.startswith("Updates per timing window (`updates`): 300, except") and line.endswith("sfbc 15.")


@pytest.mark.parametrize("name,networks", [
    ("algorithms.bc.BC", 0),
    ("algorithms.diffusion_ql.DiffusionQL", 2),  # the actor's NoiseMLP and its EMA copy's
    ("algorithms.idql.IDQL", 2),  # the LN-ResNet noise network and its EMA copy's
    ("algorithms.sfbc.SfBC", 1),  # the behaviour model's ScoreNet
])
def test_noise_models_are_the_networks_of_each_diffusion_model(name, networks):
    import importlib

    module, cls = name.rsplit(".", 1)
    model = getattr(importlib.import_module(module), cls)(obs_dim=3, act_dim=2)
    assert len(noise_models(model)) == networks


def test_planners_time_their_window_batches_and_decision_diffuser_has_no_compiled_path(tiny_hopper, tmp_path):
    """The plain loop draws what the module's batch_source gives (windows for the planners), and a module with
    no @compilable method is reported as having no compiled path, not as a failure."""
    config = tmp_path / "decision_diffuser.yaml"
    config.write_text("model:\n  class_path: algorithms.decision_diffuser.DecisionDiffuser\n  init_args:\n    horizon: 4\n"
                      "    n_timesteps: 3\n    dim: 8\n    dim_mults: [1, 2]\n    inv_hidden: 8\ndata:\n  batch_size: 8\n")
    row = measure_training(config, str(tiny_hopper), 2, 2, "cpu", compile_update=True, lightning=False)
    assert row["plain_updates_per_s"] > 0 and row["noise_model_calls_per_update"] == 1  # one U-Net pass per update
    assert row["compiled_path"] is False and row["compiled_updates_per_s"] is None and row["errors"] == {}
