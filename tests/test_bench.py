"""`offbench bench`: grid files expand into the right cells and arguments, bad grids fail early with
every problem named, and the runner on real `offbench fit` subprocesses isolates failures, resumes a
killed cell from its checkpoint, and skips finished cells."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from rich.console import Console

from offbench import bench
from offbench.bench import GridError, cell_command, cell_state, expand_grid, load_grid, run_grid
from offbench.cli import main as cli_main
from offbench.errors import UserError
from offbench.files import take_lock

REPO = Path(__file__).resolve().parents[1]
BC = str(REPO / "configs/algorithms/bc.yaml")
DIFFCPS = str(REPO / "configs/algorithms/diffcps.yaml")
TASK = str(REPO / "configs/tasks/diffcps/hopper-medium-v2.yaml")
TINY = {"updates": 40, "eval_every": 20, "block_size": 10, "eval_episodes": 1,
        "args": ["--data.batch_size", "32", "--eval.num_envs", "1", "--trainer.enable_model_summary", "false"]}


def write_grid(path: Path, **grid) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), force_terminal=False)


# --------------------------------------------------------------------------- expansion


def test_grid_expands_into_cells_with_their_arguments(tmp_path):
    extra = str(tmp_path / "extra.yaml")  # a config for every cell
    Path(extra).write_text("data:\n  normalize_obs: true\n")
    grid = write_grid(
        tmp_path / "g.yaml", name="demo", seeds=[0, 3], updates=1000, eval_every=500, eval_episodes=2,
        args=["--eval.num_envs", 2],
        datasets=["synthetic/pendulum-random-v0", "hopper-medium-v2"], config=extra,
        overrides={"hopper-medium-v2": {"updates": 2000, "args": ["--data.batch_size", 64]}},
        algorithms=[
            {"name": "bc", "config": BC},
            {"name": "diffcps", "config": DIFFCPS, "args": "--model.init_args.kappa 0.1",
             "overrides": {"hopper-medium-v2": {"config": TASK, "eval_episodes": 10}}},
        ],
    )
    cells = expand_grid(grid)
    assert [c.id for c in cells] == [
        "bc/synthetic-pendulum-random-v0/seed0", "bc/synthetic-pendulum-random-v0/seed3",
        "bc/hopper-medium-v2/seed0", "bc/hopper-medium-v2/seed3",
        "diffcps/synthetic-pendulum-random-v0/seed0", "diffcps/synthetic-pendulum-random-v0/seed3",
        "diffcps/hopper-medium-v2/seed0", "diffcps/hopper-medium-v2/seed3",
    ]
    assert cells[0].run_dir == Path("results/demo/runs/bc/synthetic-pendulum-random-v0/seed0")
    assert cells[0].args == [
        "fit", "--config", BC, "--config", extra, "--data.dataset", "synthetic/pendulum-random-v0", "--seed_everything", "0",
        "--updates", "1000", "--data.eval_every", "500", "--eval.episodes", "2",
        "--trainer.default_root_dir", "results/demo/runs/bc/synthetic-pendulum-random-v0/seed0",
        "--trainer.enable_progress_bar", "false", "--eval.num_envs", "2",
    ]
    hopper = cells[7]
    assert (hopper.algorithm, hopper.dataset, hopper.seed, hopper.updates) == ("diffcps", "hopper-medium-v2", 3, 2000)
    # The task config follows the algorithm config; args: grid, dataset override, algorithm.
    assert hopper.args[:7] == ["fit", "--config", DIFFCPS, "--config", extra, "--config", TASK]
    assert hopper.args[hopper.args.index("--eval.episodes") + 1] == "10"
    assert hopper.args[-6:] == ["--eval.num_envs", "2", "--data.batch_size", "64", "--model.init_args.kappa", "0.1"]


def test_output_dir_and_seed_count(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="x", output=str(tmp_path / "out"), seeds=2, updates=10,
                                eval_every=5, datasets=["synthetic/pendulum-random-v0"],
                                algorithms=[{"name": "bc", "config": BC}]))
    assert grid.seeds == [0, 1]
    assert [c.run_dir for c in grid.cells] == [tmp_path / "out/runs/bc/synthetic-pendulum-random-v0" / f"seed{s}" for s in (0, 1)]
    assert "--eval.episodes" not in grid.cells[0].args  # no eval_episodes: the dataset's own protocol


def test_bad_grid_names_every_problem(tmp_path):
    grid = write_grid(
        tmp_path / "bad.yaml", name="bad", seed=2, updates=1000, eval_every=300,
        datasets=["hopper-medum-v2", "synthetic/pendulum-random-v0"],
        overrides={"walker2d-medium-v2": {"updates": 10}},
        algorithms=[{"name": "bc", "config": "configs/algorithms/nope.yaml", "lr": 1}],
    )
    with pytest.raises(GridError) as error:
        load_grid(grid)
    message = str(error.value)
    for expected in [
        "unknown key 'seed' (did you mean 'seeds'?)",
        "`seeds` must be a positive count",
        "unknown dataset 'hopper-medum-v2'. Did you mean hopper-medium-v2",
        "'walker2d-medium-v2' is not in `datasets`",
        "algorithms[0] (bc): unknown key 'lr'",
        "config file configs/algorithms/nope.yaml does not exist",
        "updates 1000 is not a multiple of eval_every 300",
    ]:
        assert expected in message, (expected, message)


@pytest.mark.parametrize(("grid", "message"), [
    ({}, "`datasets` must be a non-empty list"),
    ({"name": "a b"}, "`name` must be a plain name"),
    ({"algorithms": [{"name": "bc"}]}, "`config` (the algorithm's YAML"),
    ({"algorithms": [{"name": "bc", "config": BC}, {"name": "bc", "config": BC}]}, "appears twice"),
    ({"updates": 0}, "`updates` must be a positive integer"),
    ({"overrides": {"synthetic/pendulum-random-v0": {"update": 5}}}, "unknown key 'update' (did you mean 'updates'?)"),
    ({"references": "nowhere.yaml"}, "`references`: no file at nowhere.yaml"),
])
def test_bad_grid_values(tmp_path, grid, message):
    base = {"name": "g", "seeds": 1, "updates": 10, "eval_every": 5, "datasets": ["synthetic/pendulum-random-v0"],
            "algorithms": [{"name": "bc", "config": BC}]}
    if grid == {}:
        base["datasets"] = []
    with pytest.raises(GridError, match="problem") as error:
        load_grid(write_grid(tmp_path / "g.yaml", **{**base, **grid}))
    assert message in str(error.value)


def test_shipped_grids_expand(monkeypatch):
    monkeypatch.chdir(REPO)  # grid paths are relative to the repository root
    quick = load_grid("configs/grids/quick.yaml")
    assert quick.name == "quick" and len(quick.seeds) == 2
    assert set(quick.datasets) == {"shipped/pendulum-medium-replay-v0"}
    configs = {p.stem for p in (REPO / "configs/algorithms").glob("*.yaml")}
    assert configs <= set(quick.algorithms)  # every algorithm of the suite (and variants, e.g. diffcps-approx)
    assert set(quick.algorithms) - configs == {"diffcps-approx"}
    table1 = load_grid("configs/grids/table1.yaml")
    assert table1.seeds == [0, 1, 2, 3, 4] and len(table1.datasets) == 15
    diffcps = {c.dataset: c for c in table1.cells if c.algorithm == "diffcps" and c.seed == 0}
    assert diffcps["hopper-medium-v2"].updates == 2_000_000
    assert "configs/tasks/diffcps/hopper-medium-v2.yaml" in diffcps["hopper-medium-v2"].args
    assert diffcps["D4RL/antmaze/large-play-v1"].updates == 1_000_000
    assert "configs/tasks/diffcps/antmaze-large-play.yaml" in diffcps["D4RL/antmaze/large-play-v1"].args
    qgpo = {c.dataset: c for c in table1.cells if c.algorithm == "qgpo" and c.seed == 0}
    assert qgpo["D4RL/antmaze/umaze-v1"].updates == qgpo["hopper-medium-v2"].updates == 1_600_000
    assert "configs/tasks/qgpo/antmaze.yaml" in qgpo["D4RL/antmaze/umaze-v1"].args
    assert "configs/tasks/qgpo/hopper-medium-v2.yaml" in qgpo["hopper-medium-v2"].args
    assert table1.references == Path("configs/references/table1.yaml")
    diffuser = {c.dataset for c in table1.cells if c.algorithm == "diffuser"}  # an algorithm's own `datasets`
    assert diffuser == set(table1.datasets[:9])  # locomotion only: Diffuser has no AntMaze setting


def test_unforged_small_family_is_left_to_the_runner_but_a_large_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))  # nothing forged here
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"name: g\nseeds: 1\neval_every: 10\ndatasets: [forge/pendulum-medium-v0]\n"
        f"algorithms: [{{name: bc, config: {REPO / 'configs/algorithms/bc.yaml'}, updates: 20}}]\n"
    )
    assert [c.dataset for c in load_grid(grid).cells] == ["forge/pendulum-medium-v0"]  # forged before the cells
    grid.write_text(grid.read_text().replace("forge/pendulum-medium-v0", "forge/hopper-medium-v0"))
    with pytest.raises(bench.GridError, match="offbench data forge --env Hopper-v4 --preset d4rl"):
        load_grid(grid)


def test_cell_state_and_resume_command(tmp_path):
    cell = bench.Cell("bc", "d", 0, tmp_path / "run", ["fit", "--updates", "10"], 10)
    assert cell_state(cell) == "fresh"
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/checkpoints/last.ckpt").write_bytes(b"")
    assert cell_state(cell) == "resume"
    assert cell_command(cell, "resume", "cpu")[-4:] == ["--trainer.accelerator", "cpu", "--ckpt_path", "last"]
    assert "--ckpt_path" not in cell_command(cell, "fresh", "cuda")
    (tmp_path / "run/result.json").write_text("{}")
    assert cell_state(cell) == "finished"


def test_dry_run_launches_nothing(tmp_path, capsys, monkeypatch):
    grid = write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), seeds=2, updates=10, eval_every=5,
                      datasets=["synthetic/pendulum-random-v0"], algorithms=[{"name": "bc", "config": BC}])
    monkeypatch.setattr(bench.local, "start_cell", lambda *a: pytest.fail("a dry run started a cell"))
    assert bench.main([str(grid), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[fresh   ] bc/synthetic-pendulum-random-v0/seed1" in out and "--seed_everything 1" in out
    assert "2 to start" in out and not (tmp_path / "out").exists()
    # --out: the same grid into another folder (a measurement of one's own beside the committed one)
    assert bench.main([str(grid), "--dry-run", "--out", str(tmp_path / "mine")]) == 0
    out = capsys.readouterr().out
    assert f"--trainer.default_root_dir {tmp_path / 'mine'}/runs/bc/synthetic-pendulum-random-v0/seed0" in out
    assert f"output {tmp_path / 'mine'}" in out


class FakeProcess:
    """A cell that has already finished successfully (for scheduling tests without subprocesses)."""

    def __init__(self, run_dir: Path) -> None:
        (run_dir / "result.json").write_text("{}")

    def poll(self) -> int:
        return 0


def test_a_failed_cell_is_retried_and_unlisted_when_it_succeeds(tmp_path, monkeypatch):
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), seeds=1, updates=10,
                                eval_every=5, datasets=["synthetic/pendulum-random-v0"],
                                algorithms=[{"name": "bc", "config": BC}]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out/failures.json").write_text(json.dumps({grid.cells[0].id: {"reason": "earlier"}}))
    monkeypatch.setattr(bench.runner, "_prepare_datasets", lambda *a: None)
    monkeypatch.setattr(bench.local, "start_cell", lambda cell, command, env: (cell.run_dir.mkdir(parents=True), FakeProcess(cell.run_dir))[1])
    report = run_grid(grid, workers=1, devices="cpu", console=quiet(), tables=False)
    assert report.finished == [grid.cells[0].id]
    assert json.loads((tmp_path / "out/failures.json").read_text()) == {}


def test_one_runner_per_output_directory(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), seeds=1, updates=10,
                                eval_every=5, datasets=["synthetic/pendulum-random-v0"],
                                algorithms=[{"name": "bc", "config": BC}]))
    (tmp_path / "out").mkdir()
    fd = take_lock(tmp_path / "out/bench.lock")  # another runner holds it (flock conflicts between open files)
    try:
        with pytest.raises(UserError, match=f"another `offbench bench` \\(process {os.getpid()}\\)"):
            run_grid(grid, devices="cpu", console=quiet())
    finally:
        os.close(fd)


def test_cells_spread_over_gpus(tmp_path, monkeypatch):
    grid = load_grid(write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), seeds=4, updates=10,
                                eval_every=5, datasets=["synthetic/pendulum-random-v0"],
                                algorithms=[{"name": "bc", "config": BC}]))
    launched = []

    def fake_start(cell, command, env):
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        launched.append((cell.seed, env["CUDA_VISIBLE_DEVICES"], command))
        return FakeProcess(cell.run_dir)

    monkeypatch.setattr(bench.runner, "_gpu_count", lambda devices: 2)
    monkeypatch.setattr(bench.runner, "_prepare_datasets", lambda *a: None)
    monkeypatch.setattr(bench.local, "start_cell", fake_start)
    report = run_grid(grid, workers=3, devices="cuda", console=quiet(), tables=False)
    assert len(report.finished) == 4 and not report.failed
    # The first three start together (round-robin 0, 1, 0); the fourth after they finished.
    assert [(seed, gpu) for seed, gpu, _ in launched] == [(0, "0"), (1, "1"), (2, "0"), (3, "0")]
    assert all("--trainer.accelerator" in c and "gpu" in c for _, _, c in launched)


# --------------------------------------------------------------------------- real runs


class KillInSecondEpoch(pl.Callback):
    """SIGKILLs its own process at the start of the second evaluation interval (after the first
    checkpoint) in the cell whose seed is $OFFBENCH_TEST_KILL_SEED: a hard crash, no cleanup."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.environ.get("OFFBENCH_TEST_KILL_SEED") == os.environ.get("PL_GLOBAL_SEED") and trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNLoss(pl.Callback):
    """In the cell whose seed is $OFFBENCH_TEST_NAN_SEED, fails like a diverged run: the base
    class's FloatingPointError for a NaN loss."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.environ.get("OFFBENCH_TEST_NAN_SEED") == os.environ.get("PL_GLOBAL_SEED"):
            raise FloatingPointError("loss/actor became NaN/inf in the block ending at update 10 (test)")


def record_launches(mp: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """For real grid runs in a test: cells that import this test module's callbacks (PYTHONPATH), one thread each,
    and every process the local launcher starts recorded as (first cell's id, command) in the returned list."""
    mp.setenv("PYTHONPATH", str(REPO))  # the cells import the callbacks above from tests.test_bench
    mp.setenv("OMP_NUM_THREADS", "1")
    real_start = bench.local.start_cell
    launched: list[tuple[str, list[str]]] = []

    def recording_start(cell, command, env):
        launched.append((cell.id, command))
        return real_start(cell, command, env)

    mp.setattr(bench.local, "start_cell", recording_start)
    return launched


@pytest.fixture(scope="module")
def grid_runs(tiny_hopper, tmp_path_factory):
    """Three runs of one real grid, BC on the tiny Hopper dataset (40 updates, evaluations at 20 and
    40). Each cell is a subprocess that spends seconds importing torch and Lightning, so the runs use
    as few cells as show the behaviour:
    1. seed 1 alone: SIGKILLed in its second interval, after its first checkpoint;
    2. seeds 1 and 2 together: seed 1 resumes from its checkpoint and finishes while seed 2 fails with
       a NaN loss;
    3. seed 1 alone again: finished, nothing may start."""
    root = tmp_path_factory.mktemp("bench")
    callbacks = ["--trainer.callbacks+=tests.test_bench.KillInSecondEpoch", "--trainer.callbacks+=tests.test_bench.NaNLoss"]
    grid = load_grid(write_grid(
        root / "grid.yaml", name="t", output=str(root / "out"), datasets=[str(tiny_hopper)], seeds=[1, 2],
        algorithms=[{"name": "bc", "config": BC, "args": callbacks}], **TINY,
    ))
    seed1 = replace(grid, seeds=[1], cells=grid.cells[:1])
    runs: dict[str, dict] = {"grid": grid}
    with pytest.MonkeyPatch.context() as mp:
        launched = record_launches(mp)
        for name, run_grid_, faults in [("first", seed1, {"KILL": "1"}), ("second", grid, {"NAN": "2"}), ("third", seed1, {})]:
            launched.clear()
            for fault in ("KILL", "NAN"):
                mp.setenv(f"OFFBENCH_TEST_{fault}_SEED", faults.get(fault, "none"))
            report = run_grid(run_grid_, workers=2, devices="cpu", console=quiet())
            killed = grid.cells[0].run_dir
            runs[name] = {
                "report": report, "launched": list(launched),
                "failures": json.loads((grid.output / "failures.json").read_text()),
                "table": (grid.output / "table.md").read_text() if (grid.output / "table.md").exists() else None,
                "ckpt_updates": int(torch.load(killed / "checkpoints/last.ckpt", weights_only=False)["state_dict"]["updates"]),
                "result": (killed / "result.json").exists(),
            }
    return runs


def test_a_killed_cell_is_recorded_with_its_checkpoint(grid_runs):
    first = grid_runs["first"]
    assert first["report"].failed.keys() == first["failures"].keys() == {"bc/hopper-random-tiny/seed1"}
    killed = first["failures"]["bc/hopper-random-tiny/seed1"]
    assert killed["exit"] == "killed by SIGKILL" and killed["returncode"] == -signal.SIGKILL
    assert not first["result"] and first["ckpt_updates"] == 20  # killed after the first checkpoint


def test_an_interrupted_cell_resumes_from_its_checkpoint(grid_runs):
    second, grid = grid_runs["second"], grid_runs["grid"]
    launched = dict(second["launched"])
    assert launched["bc/hopper-random-tiny/seed1"][-2:] == ["--ckpt_path", "last"]
    assert "--ckpt_path" not in launched["bc/hopper-random-tiny/seed2"]
    assert second["report"].finished == ["bc/hopper-random-tiny/seed1"]
    run_dir = grid.cells[0].run_dir
    result = json.loads((run_dir / "result.json").read_text())
    assert [h["updates"] for h in result["history"]] == [20, 40] and result["updates"] == 40
    log = (run_dir / "bench.log").read_text()
    assert "Restored all states from the checkpoint" in log and log.count("### offbench bench") == 2


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(grid_runs):
    second = grid_runs["second"]
    assert second["report"].failed.keys() == second["failures"].keys() == {"bc/hopper-random-tiny/seed2"}
    nan = second["failures"]["bc/hopper-random-tiny/seed2"]  # the resumed seed 1 is no longer listed
    assert nan["returncode"] == 1 and "FloatingPointError" in nan["reason"] and "became NaN" in nan["reason"]
    assert Path(nan["log"]).exists()
    # The tables are written all the same: one seed of two, the failure listed under them.
    assert "[1/2]" in second["table"] and "## Failed cells" in second["table"] and "FloatingPointError" in second["table"]


def test_a_finished_grid_launches_nothing(grid_runs):
    third, grid = grid_runs["third"], grid_runs["grid"]
    assert third["launched"] == [] and third["report"].skipped == ["bc/hopper-random-tiny/seed1"]
    table = (grid.output / "table.csv").read_text()
    assert f"best,{grid.datasets[0]},other,bc,measured" in table
    assert (grid.output / "curves/hopper-random-tiny.png").exists()


def test_bench_command_line_reports_bad_grids(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(textwrap.dedent("""
        name: g
        seeds: 1
        updates: 10
        eval_every: 5
        datasets: [nope-v0]
        algorithms: [{name: bc, config: configs/algorithms/bc.yaml}]
    """))
    assert cli_main(["bench", str(grid)]) == 2
    assert "offbench: error: " in (err := capsys.readouterr().err) and "unknown dataset 'nope-v0'" in err
