"""`offbench bench --launcher ray` on real local Ray instances: the cells are the local launcher's
`offbench fit` runs with the same result files, finished cells are skipped, a failing cell is recorded
with its reason while the others finish, GPU fractions let cells share a GPU, Ctrl+C stops the running
cells before the run ends, and a missing Ray is a clear error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from offbench import bench
from offbench.bench import RayOptions, load_grid, run_grid
from offbench.errors import UserError
from offbench.files import lock_holder
from tests.test_bench import BC, TINY, quiet, write_grid

DIVERGING = ["--model.init_args.actor_lr", "1e30"]  # BC's loss becomes NaN in its first block of updates


@pytest.fixture(scope="module")
def local_ray():
    """A new Ray instance of this test process (whatever $RAY_ADDRESS says), with one pretend GPU: Ray
    hands out the GPU ids it is told of."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def grid_runs(local_ray, tiny_hopper, tmp_path_factory):
    """Two runs of one grid (BC and a diverging BC on the tiny Hopper data, one seed) through
    `offbench bench --launcher ray --device cpu` on the test's Ray instance:
    1. BC finishes, the diverging BC fails with a NaN loss;
    2. the learning rate fixed: BC is skipped, the failed cell is tried again and finishes."""
    root = tmp_path_factory.mktemp("bench_ray")
    path = root / "grid.yaml"
    spec = dict(name="t", output=str(root / "out"), datasets=[str(tiny_hopper)], seeds=[0], **TINY)
    argv = [str(path), "--launcher", "ray", "--device", "cpu"]
    runs = {}
    for name, lr in [("first", DIVERGING), ("second", [])]:
        write_grid(path, **spec, algorithms=[{"name": "bc", "config": BC}, {"name": "bc-diverging", "config": BC, "args": lr}])
        runs[name] = {"exit": bench.main(argv), "connected": ray.is_initialized(),
                      "failures": json.loads((root / "out/failures.json").read_text())}
    return {"grid": load_grid(path), **runs}


def test_cells_finish_with_the_local_launchers_files(grid_runs):
    first, grid = grid_runs["first"], grid_runs["grid"]
    assert first["exit"] == 1 and first["connected"]  # a failed cell; the caller's Ray connection is left open
    bc = grid.cells[0].run_dir
    for name in ("result.json", "metrics.csv", "checkpoints/last.ckpt", "config.yaml", "cell.json", "bench.log"):
        assert (bc / name).is_file(), name
    result = json.loads((bc / "result.json").read_text())
    assert [h["updates"] for h in result["history"]] == [20, 40] and result["updates"] == 40
    assert json.loads((bc / "cell.json").read_text())["args"] == grid.cells[0].args
    assert "--trainer.accelerator cpu" in (bc / "bench.log").read_text()
    assert (grid.output / "table.md").is_file() and (grid.output / "grid.json").is_file()


def test_a_failed_cell_is_recorded_with_its_reason(grid_runs):
    failures = grid_runs["first"]["failures"]
    assert list(failures) == ["bc-diverging/hopper-random-tiny/seed0"]
    nan = failures["bc-diverging/hopper-random-tiny/seed0"]
    assert nan["returncode"] == 1 and nan["exit"] == "exit code 1" and nan["node"] == socket.gethostname()
    assert "FloatingPointError" in nan["reason"] and "became NaN" in nan["reason"]


def test_a_second_run_skips_finished_cells_and_retries_the_failed_one(grid_runs):
    second, grid = grid_runs["second"], grid_runs["grid"]
    assert second["exit"] == 0 and second["failures"] == {}
    bc, diverging = (cell.run_dir / "bench.log" for cell in grid.cells)
    assert bc.read_text().count("### offbench bench") == 1  # skipped
    assert diverging.read_text().count("### offbench bench") == 2  # tried again
    assert (grid.cells[1].run_dir / "result.json").is_file()


def test_a_pack_of_seeds_is_one_task(local_ray, tiny_hopper, tmp_path, monkeypatch):
    """`seeds_per_process: 2`: seeds 0 and 1 run as one Ray task, one `offbench fit --seeds 0,1`, each seed in its
    own run directory with its own records."""
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), datasets=[str(tiny_hopper)],
                                seeds=[0, 1], seeds_per_process=2, algorithms=[{"name": "bc", "config": BC}], **TINY))
    tasks = []
    ray_start = bench.runner._ray_start
    monkeypatch.setattr(bench.runner, "_ray_start", lambda cluster, cells, state: tasks.append(
        [c.seed for c in cells]) or ray_start(cluster, cells, state))
    report = run_grid(grid, devices="cpu", console=quiet(), tables=False, ray_options=RayOptions())
    assert tasks == [[0, 1]] and sorted(report.finished) == [c.id for c in grid.cells]
    log = grid.cells[0].run_dir / "bench.log"
    assert "--seeds 0,1 --trainer.accelerator cpu" in log.read_text()
    assert f"its output is in {log}" in (grid.cells[1].run_dir / "bench.log").read_text()
    for cell in grid.cells:
        assert json.loads((cell.run_dir / "result.json").read_text())["seed"] == cell.seed
        assert json.loads((cell.run_dir / "cell.json").read_text())["args"] == cell.args


def test_cells_share_a_gpu_by_fractions(local_ray, tiny_hopper, tmp_path, monkeypatch):
    """Two cells of half a GPU each run at once on the one (pretend) GPU; they are given it as
    `offbench fit` on a GPU (and fail, this torch has no CUDA)."""
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), datasets=[str(tiny_hopper)],
                                seeds=[0, 1], algorithms=[{"name": "bc", "config": BC}], **TINY))
    seen: list[list[tuple[str, str | None]]] = []  # the running cells and their GPUs, at each refresh
    render = bench.runner._render

    def recording_render(g, report, running, *args):
        seen.append([(cell.id, r.gpu) for r in running for cell in r.cells])
        return render(g, report, running, *args)

    monkeypatch.setattr(bench.runner, "_render", recording_render)
    report = run_grid(grid, devices="auto", console=quiet(), tables=False, ray_options=RayOptions(gpus_per_cell=0.5))
    assert [(c.id, "0") for c in grid.cells] in seen
    assert report.failed.keys() == {c.id for c in grid.cells}
    assert all("--trainer.accelerator gpu --trainer.devices 1" in (c.run_dir / "bench.log").read_text() for c in grid.cells)


def test_an_interrupted_run_stops_its_cells_before_it_ends(tiny_hopper, tmp_path):
    """Ctrl+C on `offbench bench --launcher ray` (which starts a local Ray instance of its own): the
    running cell stops (no `offbench fit` of it outlives the run, so the next run cannot overlap it),
    keeps its checkpoint, and the lock goes."""
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), datasets=[str(tiny_hopper)],
                                seeds=[0], algorithms=[{"name": "bc", "config": BC}], **{**TINY, "updates": 20_000}))
    run_dir = grid.cells[0].run_dir
    # A user's Ctrl+C reaches a driver whose SIGINT is at its default. Run as a background job (`make
    # test &`, some CI runners) pytest ignores SIGINT and a child would inherit that; a handler is not
    # inherited, so install one while the driver starts.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "offbench.cli", "bench", str(grid.path), "--launcher", "ray", "--address", "local",
             "--device", "cpu"],
            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints/last.ckpt").exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=120)[0].decode()
    assert driver.returncode == 130, output
    assert "interrupted: stopped 1 running cell(s)" in output
    assert "Detected KeyboardInterrupt, attempting graceful shutdown" in (run_dir / "bench.log").read_text()
    assert not [cmdline for cmdline in Path("/proc").glob("[0-9]*/cmdline") if str(run_dir) in _read(cmdline)]
    assert (run_dir / "checkpoints/last.ckpt").exists() and lock_holder(grid.output / "bench.lock") is None


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch):
    grid = write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), seeds=1, updates=10, eval_every=5,
                      datasets=["synthetic/pendulum-random-v0"], algorithms=[{"name": "bc", "config": BC}])
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'offbench\[ray\]'"):
        bench.main([str(grid), "--launcher", "ray"])
    assert not (tmp_path / "out").exists()  # nothing written, nothing locked


def test_ray_options_need_the_ray_launcher(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g"}))
    with pytest.raises(UserError, match="--gpus-per-cell: only with --launcher ray"):
        bench.main([str(grid), "--gpus-per-cell", "0.5"])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # a process that has just ended
        return ""
