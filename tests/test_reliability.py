"""Faults and mistakes a user meets: one clear message and exit status 2 for user errors (in every
command), a run directory and a grid output owned by one process, resumes that refuse (or knowingly
apply) changed settings, damaged files named with the way out, partial files left by crashes, a full
disk under metrics.csv, progress lines in logs, and Lightning's unactionable notes gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from offbench.cli import main
from offbench.errors import UserError
from offbench.files import lock_run_dir, read_json, run_dir_holder
from offbench.run.resume import settings_changes
from tests.test_fit import fit_args

REPO = Path(__file__).resolve().parents[1]


def run_main(argv: list[str]) -> int:
    """`offbench ARGV` in this process: its exit status, from main's return or the parser's exit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


class Boom(pl.Callback):
    """An internal error (a bug), not a user's mistake."""

    def on_fit_start(self, trainer, pl_module):
        raise RuntimeError("internal failure (test)")


class StopAfterFirstCheckpoint(pl.Callback):
    """A crash part-way through the second evaluation interval, after the first checkpoint."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            raise KeyboardInterrupt


@pytest.fixture()
def interrupted(tiny_hopper, tmp_path) -> Path:
    """A run directory whose fit stopped after its first checkpoint (100 of 300 updates)."""
    root = tmp_path / "run"
    assert run_main(fit_args(tiny_hopper, root, "--trainer.callbacks+=tests.test_reliability.StopAfterFirstCheckpoint")) != 0
    assert (root / "checkpoints/last.ckpt").exists() and not (root / "result.json").exists()
    return root


# --------------------------------------------------------------------------- user errors


def test_user_error_is_one_message_with_status_2_and_debug_shows_the_traceback(tiny_hopper, tmp_path, capsys, monkeypatch):
    args = fit_args(tiny_hopper, tmp_path / "run", "--data.env_id", "Hoper-v4")
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "offbench: error: unknown env id 'Hoper-v4' (from --data.env_id, given on the command line)" in err
    assert "Did you mean Hopper-v4" in err and "Traceback" not in err
    assert run_main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "offbench: error: unknown env id" in err
    monkeypatch.setenv("OFFBENCH_DEBUG", "1")
    assert run_main(args) == 2
    assert "Traceback" in capsys.readouterr().err


def test_internal_error_keeps_its_traceback(tiny_hopper, tmp_path):
    with pytest.raises(RuntimeError, match="internal failure"):
        main(fit_args(tiny_hopper, tmp_path / "run", "--trainer.callbacks+=tests.test_reliability.Boom"))


def test_truncated_hdf5_names_its_path(tiny_hopper, tmp_path, capsys):
    truncated = tmp_path / "cut.hdf5"
    truncated.write_bytes(tiny_hopper.read_bytes()[:5000])
    assert run_main(fit_args(truncated, tmp_path / "run", "--data.env_id", "Hopper-v4", "--data.ref_family", "hopper")) == 2
    err = capsys.readouterr().err
    assert f"offbench: error: {truncated} is not a readable HDF5 file" in err and "truncated" in err
    assert "Traceback" not in err


def test_a_read_only_run_directory_is_a_user_error(tiny_hopper, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert run_main(fit_args(tiny_hopper, parent / "run")) == 2
    finally:
        parent.chmod(0o700)
    assert "cannot write the run directory" in capsys.readouterr().err


def test_fit_prints_no_unactionable_notes_and_ignores_partial_files(tiny_hopper, tmp_path):
    """The real command as a user runs it: none of Lightning's notes that nobody can act on, and the
    partial files of an earlier crash (a checkpoint's .part, an atomic write's .tmp) do not block a fresh run."""
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints/last.ckpt.part").write_bytes(b"half a checkpoint")
    (root / "result.json.tmp4242").write_text("{")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = fit_args(tiny_hopper, root, "--updates", "100")
    done = subprocess.run([sys.executable, "-m", "offbench.cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for note in ("LightningCLI's args parameter", "weights_only", "LeafSpec", "litlogger", "Previous log files"):
        assert note not in output, note
    assert (root / "result.json").exists() and not (root / "checkpoints/last.ckpt.part").exists()
    assert not (root / "result.json.tmp4242").exists()


# --------------------------------------------------------------------------- one process per run directory


def test_a_second_fit_into_a_busy_run_directory_is_refused_with_the_holders_pid(tiny_hopper, tmp_path, capsys):
    root = tmp_path / "run"
    fd = lock_run_dir(root)  # another fit holds it (flock conflicts between open files, also in one process)
    try:
        assert run_main(fit_args(tiny_hopper, root)) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert f"{root} is in use by process {os.getpid()}" in err and f"kill {os.getpid()}" in err
    assert not (root / "metrics.csv").exists() and not (root / "checkpoints").exists()


def test_the_lock_goes_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from offbench.files import lock_run_dir; lock_run_dir(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_dir_holder(tmp_path / "run") == holder.pid
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            lock_run_dir(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert run_dir_holder(tmp_path / "run") is None  # SIGKILL: the OS released it
    os.close(lock_run_dir(tmp_path / "run"))


# --------------------------------------------------------------------------- resuming with other settings


def test_settings_changes_lists_differences_and_lets_updates_grow():
    old = {"model": {"class_path": "algorithms.bc.BC", "init_args": {"lr": 0.001, "hidden": [256, 256]}},
           "data": {"dataset": "a"}, "updates": 300, "trainer": {"accelerator": "cpu"}, "ckpt_path": None}
    new = {"model": {"class_path": "algorithms.bc.BC", "init_args": {"lr": 0.5, "hidden": [256, 256]}},
           "data": {"dataset": "b"}, "updates": 600, "trainer": {"accelerator": "gpu"}, "ckpt_path": "x"}
    assert settings_changes(old, new) == ["data.dataset: a -> b", "model.init_args.lr: 0.001 -> 0.5"]
    assert settings_changes(old, {**old, "updates": 200}) == ["updates: 300 -> 200"]
    other = {**old, "model": {"class_path": "algorithms.iql.IQL", "init_args": {"expectile": 0.7}}}
    assert settings_changes(old, other) == ["model.class_path: algorithms.bc.BC -> algorithms.iql.IQL"]


def test_resume_with_changed_settings_is_refused_then_applied_when_accepted(interrupted, tiny_hopper, capsys):
    root = interrupted
    resume = fit_args(tiny_hopper, root, "--ckpt_path", "last", "--model.init_args.actor_lr", "0.5")
    assert run_main(resume) == 2
    err = capsys.readouterr().err
    assert "the settings differ from those of the run being resumed" in err
    assert "model.init_args.actor_lr: 0.001 -> 0.5" in err and "--accept_changes true" in err
    # Other networks cannot continue the run, even when accepted.
    assert run_main([*resume, "--model.init_args.hidden", "[64, 64]", "--accept_changes", "true"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "actor.net.0.weight: (256, 11) in the checkpoint, (64, 11) now" in err
    # Accepted: the restored optimiser continues with the new rate; extending --updates needs no flag.
    assert run_main([*resume, "--updates", "400", "--accept_changes", "true"]) == 0
    checkpoint = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
    assert int(checkpoint["state_dict"]["updates"]) == 400
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5
    assert json.loads((root / "result.json").read_text())["hyperparameters"]["actor_lr"] == 0.5


# --------------------------------------------------------------------------- damaged files


def test_a_damaged_checkpoint_names_the_file_and_the_previous_one(tiny_hopper, tmp_path, capsys):
    root = tmp_path / "run"
    assert run_main(fit_args(tiny_hopper, root)) == 0
    last, previous = root / "checkpoints/last.ckpt", root / "checkpoints/previous.ckpt"
    assert int(torch.load(previous, weights_only=False)["state_dict"]["updates"]) == 200
    last.write_bytes(last.read_bytes()[:1000])
    assert run_main(fit_args(tiny_hopper, root, "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {last} is unreadable" in err and f"resume from it with --ckpt_path {previous}" in err


def test_a_full_disk_keeps_the_last_good_checkpoint(tiny_hopper, tmp_path, capsys, monkeypatch):
    saves = []
    real_save = pl.Trainer.save_checkpoint

    def save(self, filepath, *args, **kwargs):
        saves.append(filepath)
        if len(saves) == 2:
            Path(filepath).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", save)
    root = tmp_path / "run"
    assert run_main(fit_args(tiny_hopper, root)) == 2
    err = capsys.readouterr().err
    assert "writing the checkpoint" in err and "No space left on device" in err
    assert "still holds the last good checkpoint: free space or make " in err and "writable, then resume with --ckpt_path last" in err
    assert int(torch.load(root / "checkpoints/last.ckpt", weights_only=False)["state_dict"]["updates"]) == 100
    assert not (root / "checkpoints/last.ckpt.part").exists()


def test_an_unreadable_metrics_csv_is_named(interrupted, tiny_hopper, capsys):
    with open(interrupted / "metrics.csv", "a") as f:
        f.write("1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16\n")
    assert run_main(fit_args(tiny_hopper, interrupted, "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err
    assert f"{interrupted / 'metrics.csv'} is unreadable" in err and "move it away" in err


def test_a_truncated_json_file_is_named(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"scores": {"last": 1')
    with pytest.raises(UserError, match=f"{path} is unreadable .*: delete it"):
        read_json(path, fix="delete it")
    assert read_json(tmp_path / "absent.json") is None


def test_lock_probe_never_blocks_a_starting_fit(tmp_path):
    """run_dir_holder takes a shared lock for a moment; a fit starting then waits briefly instead of failing."""
    os.close(lock_run_dir(tmp_path / "run"))
    start = time.monotonic()
    assert run_dir_holder(tmp_path / "run") is None
    assert time.monotonic() - start < 1


# --------------------------------------------------------------------------- the grid runner


def small_grid(tmp_path: Path, seeds: int = 1, **settings) -> Path:
    from tests.test_bench import BC, write_grid

    return write_grid(tmp_path / "g.yaml", name="g", output=str(tmp_path / "out"), seeds=seeds, updates=10,
                      eval_every=5, datasets=["synthetic/pendulum-random-v0"],
                      algorithms=[{"name": "bc", "config": BC}], **settings)


def fake_runner(monkeypatch) -> list[str]:
    """Cells that finish at once (no subprocess); returns the list of the cells started."""
    from offbench.bench import local, runner
    from tests.test_bench import FakeProcess

    started: list[str] = []

    def start(cell, command, env, die_with_parent=True):
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / "cell.json").write_text(json.dumps({"args": cell.args}))
        started.append(cell.id)
        return FakeProcess(cell.run_dir)

    monkeypatch.setattr(runner, "_prepare_datasets", lambda *a: None)
    monkeypatch.setattr(local, "start_cell", start)
    return started


def test_the_runner_skips_a_cell_whose_run_is_still_alive(tmp_path, monkeypatch):
    from offbench.bench import cell_state, load_grid, run_grid
    from tests.test_bench import quiet

    started = fake_runner(monkeypatch)
    grid = load_grid(small_grid(tmp_path, seeds=2))
    fd = lock_run_dir(grid.cells[0].run_dir)  # a fit of an earlier runner, still running
    try:
        assert cell_state(grid.cells[0]) == "running"
        report = run_grid(grid, devices="cpu", console=quiet(), tables=False)
    finally:
        os.close(fd)
    assert started == [grid.cells[1].id] and report.busy == {grid.cells[0].id: os.getpid()}


def test_one_runner_per_output_folder_and_the_lock_goes_with_its_process(tmp_path, monkeypatch, capsys):
    """bench.lock is an flock: a second runner stops with the holder's PID; a runner killed with SIGKILL
    leaves no stale lock (a PID file would block until deleted by hand, or trust a reused PID)."""
    from offbench.bench import load_grid, run_grid
    from tests.test_bench import quiet

    started = fake_runner(monkeypatch)
    grid_file = small_grid(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from offbench.bench.runner import _lock; "
         "_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)", str(tmp_path / "out")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(["bench", str(grid_file)]) == 2
        err = capsys.readouterr().err
        assert f"offbench: error: another `offbench bench` (process {holder.pid}) is running a grid into " in err
        assert f"kill {holder.pid}" in err and started == []
    finally:
        holder.kill()
        holder.wait()
    report = run_grid(load_grid(grid_file), devices="cpu", console=quiet(), tables=False)
    assert started == report.finished == [load_grid(grid_file).cells[0].id]
    # The file of a killed runner whose PID now belongs to another live process (here: this one) blocks nothing.
    (tmp_path / "out/bench.lock").write_text(f"{os.getpid()}\n")
    assert run_main(["bench", str(grid_file), "--no-tables"]) == 0


def test_stale_cells_are_reported_and_rerun_only_when_asked(tmp_path, monkeypatch, capsys):
    from offbench import bench
    from offbench.bench import cell_state, load_grid, run_grid
    from tests.test_bench import quiet

    started = fake_runner(monkeypatch)
    assert bench.main([str(small_grid(tmp_path)), "--no-tables"]) == 0
    old_run = load_grid(small_grid(tmp_path)).cells[0].run_dir
    grid = load_grid(small_grid(tmp_path, args=["--data.batch_size", "64"]))  # the grid file changed since
    cell = grid.cells[0]
    assert cell_state(cell) == "stale" and bench.stale_arguments(cell) == "(none) -> --data.batch_size 64"
    monkeypatch.setattr("offbench.tables.write_tables", lambda *a: pytest.fail("tables mixing two settings"))
    started.clear()
    report = run_grid(grid, devices="cpu", console=quiet())
    assert started == [] and report.stale == {cell.id: "(none) -> --data.batch_size 64"} and not report.skipped
    monkeypatch.undo()
    started = fake_runner(monkeypatch)
    report = run_grid(grid, devices="cpu", console=quiet(), tables=False, rerun_stale=True)
    assert started == [cell.id] and report.finished == [cell.id]
    aside = list((tmp_path / "out.stale").rglob("result.json"))
    assert len(aside) == 1 and aside[0].parent.name == old_run.name  # the old run kept, outside the tables' reach
    assert cell_state(cell) == "finished"


def test_cells_die_with_their_runner(tmp_path):
    """A runner killed with SIGKILL (no chance to stop anything) takes its cells with it."""
    runner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from pathlib import Path
            from offbench.bench import Cell, start_cell
            cell = Cell("a", "d", 0, Path(sys.argv[1]), ["fit"], 1)
            child = start_cell(cell, [sys.executable, "-c", "import time; time.sleep(60)"], {})
            print(child.pid, flush=True)
            time.sleep(60)
        """), str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    cell_pid = int(runner.stdout.readline())
    assert _alive(cell_pid)
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 5
    while _alive(cell_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(cell_pid)


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SlowBlocks(pl.Callback):
    """Each block of updates takes 0.3 s more while $OFFBENCH_TEST_SLOW is set: cells still run when killed."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.environ.get("OFFBENCH_TEST_SLOW"):
            time.sleep(0.3)


@pytest.mark.slow
def test_a_runner_killed_with_sigterm_or_sigkill_leaves_no_cell_running_and_a_rerun_finishes_each_once(tiny_hopper, tmp_path):
    from tests.test_bench import BC, TINY, write_grid

    grid_file = write_grid(
        tmp_path / "grid.yaml", name="t", output=str(tmp_path / "out"), datasets=[str(tiny_hopper)], seeds=[0, 1],
        algorithms=[{"name": "bc", "config": BC, "args": ["--trainer.callbacks+=tests.test_reliability.SlowBlocks"]}],
        **{**TINY, "updates": 60},
    )
    runs = [tmp_path / "out/runs/bc/hopper-random-tiny" / f"seed{s}" for s in (0, 1)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OFFBENCH_TEST_SLOW="1")
    command = [sys.executable, "-m", "offbench.cli", "bench", str(grid_file), "--workers", "2", "--device", "cpu"]
    cells: list[int | None] = []
    for signum in (signal.SIGTERM, signal.SIGKILL):
        runner = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        previous = cells
        # Both cells of this runner hold their run directories (new processes) and have trained a block.
        while not (all(cells := [run_dir_holder(run) for run in runs]) and not set(cells) & set(previous)
                   and all(_updates(run) for run in runs)):
            assert runner.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        runner.send_signal(signum)
        code = runner.wait(60)
        assert code == (130 if signum == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in cells) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in cells), signum
        assert all(run_dir_holder(run) is None for run in runs)
    env.pop("OFFBENCH_TEST_SLOW")
    assert subprocess.run(command, env=env, cwd=REPO, capture_output=True).returncode == 0
    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert [h["updates"] for h in result["history"]] == [20, 40, 60]
        log = (run / "bench.log").read_text()
        assert log.count("### offbench bench") == 3 and log.count("`Trainer.fit` stopped: `max_epochs=3` reached") == 1


def _updates(run: Path) -> bool:
    from offbench.bench.cells import _updates_done

    return bool(_updates_done(run))


# --------------------------------------------------------------------------- data checks, up front


def pendulum_file(path: Path, **changes) -> Path:
    """20 rows of Pendulum-v1-shaped data (3-dim observations, 1-dim actions within [-2, 2]), one
    episode ending in a timeout; `changes` replace arrays."""
    import h5py

    n = 20
    arrays = dict(
        observations=np.linspace(-1, 1, n * 3, dtype=np.float32).reshape(n, 3),
        actions=np.linspace(-2, 2, n, dtype=np.float32)[:, None],
        rewards=-np.arange(n, dtype=np.float32),
        terminals=np.zeros(n, dtype=np.float32),
        timeouts=np.r_[np.zeros(n - 1), 1].astype(np.float32),
    ) | changes
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return path


def datamodule(path: Path, **kwargs):
    from offbench.data.datamodule import OfflineDataModule

    return OfflineDataModule(str(path), **({"env_id": "Pendulum-v1", "ref_min": -1500.0, "ref_max": 0.0} | kwargs))


def test_good_data_passes_the_checks(tmp_path, capsys):
    assert datamodule(pendulum_file(tmp_path / "ok.hdf5")).act_dim == 1
    assert "offbench: warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "kwargs", "message"), [
    ({"actions": np.zeros((20, 2), np.float32)}, {},
     "'actions' are 2-dim but the evaluation env Pendulum-v1 takes 1-dim actions"),
    ({"observations": np.zeros((20, 4), np.float32)}, {},
     "'observations' are 4-dim but the evaluation env Pendulum-v1 gives 3-dim observations"),
    ({"actions": np.linspace(-3, 3, 20, dtype=np.float32)[:, None]}, {},
     "'actions' of 7 of 19 transitions are outside the action bounds of Pendulum-v1 (feature 0: data -3..2.684, "
     "env -2..2)"),
    ({"terminals": np.r_[np.zeros(19), np.nan]}, {}, "'terminals' must hold 0 or 1, but 1 row(s) hold other values (first at row 19: nan)"),
    ({"timeouts": np.r_[np.zeros(19), 2.0]}, {}, "'timeouts' must hold 0 or 1, but 1 row(s) hold other values (first at row 19: 2.0)"),
    ({k: np.zeros((0, 3) if k == "observations" else (0, 1) if k == "actions" else 0, np.float32)
      for k in ("observations", "actions", "rewards", "terminals", "timeouts")}, {}, "the file has no rows (an empty dataset)"),
    ({}, {"ref_min": 5.0, "ref_max": 5.0}, "ref_min equals ref_max (5.0, given on the command line)"),
    ({}, {"eval_every": 0}, "data.eval_every must be a positive"),
])
def test_bad_data_is_refused_before_training_naming_file_and_field(tmp_path, changes, kwargs, message):
    path = pendulum_file(tmp_path / "bad.hdf5", **changes)
    with pytest.raises(UserError) as error:
        datamodule(path, **kwargs)
    assert message in str(error.value)
    if not kwargs:  # a problem of the file: its path is named
        assert str(error.value).startswith(f"{path}: ")


def test_actions_outside_the_bounds_are_clipped_only_when_asked(tmp_path, capsys):
    path = pendulum_file(tmp_path / "wide.hdf5", actions=np.linspace(-3, 3, 20, dtype=np.float32)[:, None])
    dm = datamodule(path, clip_actions=True)
    assert dm.transitions.act.min() == -2 and dm.transitions.act.max() == 2
    assert f"clipped the actions of 7 transitions of {path} to the bounds of Pendulum-v1" in capsys.readouterr().err


def test_extreme_values_are_a_warning_with_the_feature_index(tmp_path, capsys):
    obs = np.linspace(-1, 1, 60, dtype=np.float32).reshape(20, 3)
    obs[4, 2] = 3e7
    datamodule(pendulum_file(tmp_path / "big.hdf5", observations=obs))
    err = capsys.readouterr().err
    assert "offbench: warning:" in err and "'observations' feature 2 reaches 3e+07" in err


def test_data_info_shows_the_action_range_and_the_checks(tmp_path, capsys):
    from offbench.data.commands import main as data_main

    path = pendulum_file(tmp_path / "wide.hdf5", actions=np.linspace(-3, 3, 20, dtype=np.float32)[:, None])
    assert data_main(["info", str(path), "--env", "Pendulum-v1", "--ref-min", "-1500", "--ref-max", "0"]) == 0
    out = capsys.readouterr().out
    assert "env action range   [-2, 2]" in out and "data action range  [-3, 2.684]" in out
    assert "check              error:" in out and "outside the action bounds" in out


# --------------------------------------------------------------------------- damaged results in tables and grids


def test_table_skips_an_unreadable_result_with_a_warning_naming_it(tmp_path, capsys):
    from offbench.tables import collect_runs

    good, bad = tmp_path / "runs/a/seed0", tmp_path / "runs/a/seed1"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    (good / "result.json").write_text(json.dumps({"algorithm": "x.A", "dataset": "d", "seed": 0, "scores": {"last": 1.0}}))
    (bad / "result.json").write_text('{"algorithm": "x.A", "sco')
    runs = collect_runs(tmp_path)
    assert [r.seed for r in runs] == [0]
    err = capsys.readouterr().err
    assert f"offbench table: warning: {bad / 'result.json'} is unreadable" in err and "left out of the tables" in err


def test_the_runner_reports_a_damaged_result_instead_of_skipping_the_cell(tmp_path, monkeypatch):
    from offbench.bench import load_grid, run_grid
    from tests.test_bench import quiet

    started = fake_runner(monkeypatch)
    grid = load_grid(small_grid(tmp_path))
    cell = grid.cells[0]
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "result.json").write_text('{"trunc')
    report = run_grid(grid, devices="cpu", console=quiet(), tables=False)
    assert started == [] and not report.skipped
    reason = report.failed[cell.id]["reason"]
    assert f"{cell.run_dir / 'result.json'} is unreadable" in reason and "delete it and run the grid again" in reason


def test_a_failed_atomic_write_leaves_the_old_file_and_says_what_to_do(tmp_path, monkeypatch):
    from offbench.files import write_json_atomic

    path = write_json_atomic(tmp_path / "result.json", {"v": 1})

    def full_disk(self, text):  # writes part of the file, as a full disk does
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(UserError, match=r"writing .*result.json failed \(No space left on device\): free space"):
        write_json_atomic(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


# --------------------------------------------------------------------------- progress off a terminal


def test_progress_off_a_terminal_prints_plain_lines_every_tenth_or_30_seconds(monkeypatch):
    """`offbench data forge/pgd ... 2> log`: rich would show nothing until the end; plain lines instead."""
    import io

    from offbench.forge import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()  # not a terminal
    with progress._Progress(True, stream) as bar:
        bar.log("[bold red]warning:[/] a log line")
        task = bar.task("PGD model", 20000)
        for step in range(1000, 7001, 1000):  # 1000 steps every 5 s: 10% after 10 s
            clock[0] += 5
            bar.update(task, step, "loss 0.28")
        clock[0] += 31  # a slow stretch: a line after 30 s, though only 5% more is done
        bar.update(task, 8000, "loss 0.27")
        clock[0] += 1
        bar.update(task, 20000, "loss 0.2")
    assert stream.getvalue().splitlines() == [
        "warning: a log line",
        "PGD model 0/20000 (0%) 0:00:00 elapsed",
        "PGD model 2000/20000 (10%) 0:00:10 elapsed, ~0:01:30 left, loss 0.28",
        "PGD model 4000/20000 (20%) 0:00:20 elapsed, ~0:01:20 left, loss 0.28",
        "PGD model 6000/20000 (30%) 0:00:30 elapsed, ~0:01:10 left, loss 0.28",
        "PGD model 8000/20000 (40%) 0:01:06 elapsed, ~0:01:39 left, loss 0.27",
        "PGD model 20000/20000 (100%) 0:01:07 elapsed, loss 0.2",
    ]
    quiet = io.StringIO()
    with progress._Progress(False, quiet) as bar:
        bar.update(bar.task("SAC", 10), 10, "x")
        bar.log("nothing")
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- user errors of the other commands


@pytest.mark.parametrize(("argv", "message"), [
    (["toy", "--methods", "no-such-method"], "offbench: error: no toy config "),
    (["toy", "--updates", "0"], "offbench: error: --updates and --samples must be positive, got 0"),
    (["perf", "--device", "tpu"], "offbench: error: offbench perf: argument --device: invalid choice: 'tpu'"),
    (["perf", "--configs"], "offbench: error: --configs names no file: name configs/algorithms/*.yaml files"),
    (["perf", "--configs", "no-such.yaml"], "offbench: error: --configs: no config file no-such.yaml"),
    (["data", "synth", "--env", "Pendulum-v1", "--out", "x.hdf5", "--ref-family", "hopper", "--ref-min", "0"],
     "offbench: error: pass either --ref-family or --ref-min/--ref-max, not both"),
    (["data", "synth", "--env", "Pendulum-v1", "--out", "x.hdf5", "--ref-min", "0"],
     "offbench: error: pass both --ref-min and --ref-max (the random and the expert return), or neither"),
    (["data", "forge", "--env", "Pendulum-v1", "--sac-steps", "100", "--start-steps", "10", "--checkpoint-every", "60"],
     "offbench: error: --sac-steps 100 gives fewer than 2 checkpoints every 60 steps (--checkpoint-every)"),
    (["table", "no-such-dir"], "offbench: error: no directory no-such-dir: name a results directory"),
])
def test_user_mistakes_of_every_command_are_one_line_with_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # stopped before writing anything


def test_a_user_mistake_of_python_m_offbench_toy_is_one_line_with_status_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "offbench.toy", "--samples", "-1"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "offbench: error: --updates and --samples must be positive, got 20000 and -1"


# --------------------------------------------------------------------------- the metric log on a full disk


def test_a_full_disk_while_logging_metrics_is_one_message_and_the_log_stays_whole(tiny_hopper, tmp_path, capsys, monkeypatch):
    """metrics.csv cannot be written (a full disk) after the first checkpoint, when the first evaluation's
    row is due: one message with the way out, no half row left in the file, and the resumed run has
    every row (the lost evaluation row comes from the checkpoint)."""
    import pandas as pd
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    root = tmp_path / "run"
    real_save = _ExperimentWriter.save

    def full_disk(self):
        if (root / "checkpoints/last.ckpt").exists() and self.metrics:
            with open(self.metrics_file_path, "a") as f:
                f.write("0.1,0.2")  # half a row, as a write cut short by a full disk leaves
            raise OSError(28, "No space left on device")
        real_save(self)

    monkeypatch.setattr(_ExperimentWriter, "save", full_disk)
    assert run_main(fit_args(tiny_hopper, root)) == 2
    err = capsys.readouterr().err
    assert f"offbench: error: writing {root / 'metrics.csv'} failed (No space left on device)" in err, err
    assert "free space" in err and "--ckpt_path last" in err and "Traceback" not in err
    logged = pd.read_csv(root / "metrics.csv")
    assert logged["updates"].max() == 100 and (root / "metrics.csv").read_text().endswith("\n")
    monkeypatch.undo()
    assert run_main(fit_args(tiny_hopper, root, "--ckpt_path", "last")) == 0
    logged = pd.read_csv(root / "metrics.csv")
    evaluations = logged[logged["eval/score"].notna()]
    assert list(evaluations["updates"]) == [100, 200, 300] and logged["updates"].is_monotonic_increasing
    assert evaluations["eval/score"].tolist() == pytest.approx(  # the first comes from the checkpoint
        [h["score"] for h in json.loads((root / "result.json").read_text())["history"]])


def test_a_new_metric_column_rewrites_metrics_csv_atomically(tmp_path, monkeypatch):
    """A new column rewrites the file with a new header; Lightning truncates it first, so a full disk
    mid-rewrite lost every row. Now the old file stays whole, and no partial file is left."""
    import csv

    from offbench.run.metrics import MetricsWriter as _MetricsWriter

    writer = _MetricsWriter(str(tmp_path))
    writer.log_metrics({"loss": 1.0, "updates": 50})
    writer.save()
    before = (tmp_path / "metrics.csv").read_text()
    assert before == "loss,updates\n1.0,50\n"  # the writer drops Lightning's step column
    writer.log_metrics({"eval/score": 0.5, "updates": 100})

    def full_disk(self, rows):
        self.writer.writerow(["1"])  # part of the rows reach the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError):
        writer.save()
    assert (tmp_path / "metrics.csv").read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


# --------------------------------------------------------------------------- what every run prints


def test_gymnasiums_v4_deprecation_note_is_silenced_where_envs_are_made():
    """Even under `-W always`: gymnasium warns for Hopper-v4 made directly, not once offbench.envs (which
    evaluates D4RL's datasets in the v4 envs on purpose) is imported; another env's warnings stay."""
    code = textwrap.dedent("""
        import gymnasium as gym
        gym.make("Hopper-v4")
        from offbench.data.catalog import resolve
        from offbench.envs import make_env
        make_env(resolve("hopper-medium-v2")), make_env(resolve("walker2d-medium-v2"))
        gym.make("Ant-v4")
    """)
    done = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Hopper-v4 is out of date") == 1  # the direct make only
    assert "Walker2d-v4 is out of date" not in done.stderr and "Ant-v4 is out of date" in done.stderr


def test_perf_out_naming_a_file_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("report.md").write_text("kept\n")
    monkeypatch.setattr("offbench.perf.measure_training", lambda *a, **k: pytest.fail("measured before the check"))
    assert main(["perf", "--configs", str(REPO / "configs/algorithms/bc.yaml"), "--out", "report.md"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "offbench: error: --out report.md is a file: --out names the folder that gets perf.md and perf.json"
    assert Path("report.md").read_text() == "kept\n"
