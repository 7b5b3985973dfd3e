"""`offbench perf` writes its report; no timing is asserted (speed is measured, not tested)."""

import json
from pathlib import Path

from offbench.cli import main

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
    assert row["lightning_updates_per_s"] > 0 and row["plain_updates_per_s"] > 0
    assert report["evaluation"]["env_steps_per_s_2_envs"] > 0 and report["machine"]["torch"]
    assert [(r["envs"], r["asynchronous"]) for r in report["evaluation"]["runs"]] == [(2, False), (1, False)]
    assert row["compiled_updates_per_s"] is None and row["errors"] == {}  # run without --compile
    assert "algorithms.bc.BC" in (tmp_path / "perf.md").read_text()
