"""The committed results are reproducible from what is committed: the tables, curves and profiles of the quick grid
and of the PGD grids are rewritten byte for byte from the shipped run records (results/<grid>/runs/*/result.json and
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


# Each committed grid: its results folder and the grid file that wrote it.
GRIDS = [("results/quick", "quick.yaml"), ("results/pgd/learning", "pgd.yaml"), ("results/pgd/sweep", "pgd-sweep.yaml"),
         ("results/pgd/iql-causes", "pgd-iql-causes.yaml")]


@pytest.mark.parametrize(("results", "grid_file"), GRIDS)
def test_the_grid_ships_its_run_records_on_the_shipped_data(results, grid_file):
    from offbench.bench.grid import load_grid

    records = sorted((ROOT / results / "runs").rglob("result.json"))
    grid = json.loads((ROOT / results / "grid.json").read_text())
    expected = len(load_grid(ROOT / "configs" / "grids" / grid_file).cells)  # every cell of today's grid
    assert len(records) == len(grid["cells"]) == expected
    for path in records:
        result = json.loads(path.read_text())
        assert (path.parent / "metrics.csv").is_file(), path
        pinned = resolve(result["dataset"]).fingerprint
        assert pinned is not None and result["data"]["fingerprint"] == pinned, path


@pytest.mark.parametrize(("results", "grid_file"), GRIDS)
def test_the_committed_tables_regenerate_identically_from_the_records(results, grid_file, tmp_path, monkeypatch):
    committed_dir, copy = ROOT / results, tmp_path / results
    shutil.copytree(committed_dir / "runs", copy / "runs",
                    ignore=shutil.ignore_patterns("checkpoints", "*.log", "*.lock", "hparams.yaml"))
    for name in ("grid.json", "failures.json"):
        if (committed_dir / name).exists():
            shutil.copy(committed_dir / name, copy / name)
    monkeypatch.chdir(tmp_path)  # the runner writes `results/...` relative to the repository, as here
    write_tables(Path(results))
    committed, rewritten = outputs(committed_dir), outputs(copy)
    assert sorted(rewritten) == sorted(committed)
    for name, data in committed.items():
        hint = "" if name.endswith((".md", ".csv")) else (
            f" (matplotlib {matplotlib.__version__} here: if another matplotlib renders the figures differently, "
            f"rewrite them with `offbench table {results}` and commit them)")
        assert rewritten[name] == data, f"{results}/{name} differs when rewritten from the shipped records{hint}"


@pytest.mark.parametrize("name", ["table.md", "table.csv"])
def test_the_tables_name_the_data_fingerprint(name):
    fingerprint = resolve("shipped/pendulum-medium-replay-v0").fingerprint
    assert fingerprint[:12] in (QUICK / name).read_text()
