"""The committed results are reproducible from what is committed: the quick grid's tables, curves and
profiles are rewritten byte for byte from the shipped run records (results/quick/runs/*/result.json and
metrics.csv), and those runs trained on the shipped dataset they name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import pytest

from offbench.data.catalog import resolve
from offbench.tables import write_tables

ROOT = Path(__file__).parent.parent
QUICK = ROOT / "results" / "quick"


def outputs(results_dir: Path) -> dict[str, bytes]:
    files = [results_dir / "table.md", results_dir / "table.csv", results_dir / "profiles.png",
             *sorted((results_dir / "curves").glob("*.png"))]
    return {str(p.relative_to(results_dir)): p.read_bytes() for p in files}


def test_the_quick_grid_ships_its_run_records_on_the_shipped_data():
    records = sorted((QUICK / "runs").rglob("result.json"))
    grid = json.loads((QUICK / "grid.json").read_text())
    from offbench.bench.grid import load_grid

    expected = len(load_grid(ROOT / "configs" / "grids" / "quick.yaml").cells)  # every cell of today's grid
    assert len(records) == len(grid["cells"]) == expected
    for path in records:
        result = json.loads(path.read_text())
        assert (path.parent / "metrics.csv").is_file(), path
        pinned = resolve(result["dataset"]).fingerprint
        assert pinned is not None and result["data"]["fingerprint"] == pinned, path


def test_the_committed_quick_tables_regenerate_identically_from_the_records(tmp_path, monkeypatch):
    copy = tmp_path / "results" / "quick"
    shutil.copytree(QUICK / "runs", copy / "runs")
    for name in ("grid.json", "failures.json"):
        if (QUICK / name).exists():
            shutil.copy(QUICK / name, copy / name)
    monkeypatch.chdir(tmp_path)  # the runner writes `results/quick` relative to the repository, as here
    write_tables(Path("results/quick"))
    committed, rewritten = outputs(QUICK), outputs(copy)
    assert sorted(rewritten) == sorted(committed)
    for name, data in committed.items():
        hint = "" if name.endswith((".md", ".csv")) else (
            f" (matplotlib {matplotlib.__version__} here: if another matplotlib renders the figures differently, "
            "rewrite them with `offbench table results/quick` and commit them)")
        assert rewritten[name] == data, f"results/quick/{name} differs when rewritten from the shipped records{hint}"


@pytest.mark.parametrize("name", ["table.md", "table.csv"])
def test_the_tables_name_the_data_fingerprint(name):
    fingerprint = resolve("shipped/pendulum-medium-replay-v0").fingerprint
    assert fingerprint[:12] in (QUICK / name).read_text()
