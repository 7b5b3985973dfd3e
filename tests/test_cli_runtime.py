"""Issue 23's silent cases and raw errors, each one line now: an algorithm author's mistakes, a GPU asked
for where there is none, configs found from anywhere, an unwritable checkpoints/ folder, a damaged
checkpoint inside a grid, a full disk under the figures, and cells that ignore the runner's stop."""

from __future__ import annotations

import errno
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported before any test captures the output: its loggers keep the stream
import pytest
import torch

from offbench.cli import main
from offbench.errors import UserError
from tests.test_fit import fit_args

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- an algorithm author's mistakes
def test_reading_hparams_without_save_hyperparameters_names_the_rule():
    from offbench.module import OfflineRLModule

    class Forgetful(OfflineRLModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.rate = self.hparams.lr

    with pytest.raises(UserError) as error:
        Forgetful()
    assert str(error.value) == ("Forgetful reads self.hparams.lr, but its __init__ did not call "
                                "self.save_hyperparameters() (the contract in offbench/module.py)")
    assert isinstance(error.value, AttributeError)  # hasattr() keeps its meaning
    assert not hasattr(OfflineRLModule().hparams, "lr")


def test_a_subclass_reading_a_renamed_hyperparameter_gets_the_rename():
    from algorithms.bc import BC

    bc = BC(obs_dim=3, act_dim=1)
    with pytest.raises(UserError, match=r"^BC: `lr` \(in self.hparams\) is now called `actor_lr`: use self.hparams.actor_lr$"):
        _ = bc.hparams.lr
    assert bc.hparams.actor_lr == bc.hparams["actor_lr"]


def test_a_subclass_passing_a_renamed_argument_gets_the_config_keys_message(tiny_hopper, tmp_path, monkeypatch, capsys):
    (tmp_path / "old_bc.py").write_text(textwrap.dedent("""
        from algorithms.bc import BC

        class OldBC(BC):
            def __init__(self, obs_dim: int, act_dim: int, max_action: float = 1.0, lr: float = 1e-3):
                super().__init__(obs_dim, act_dim, max_action, lr=lr)
    """))
    monkeypatch.chdir(tmp_path)
    args = fit_args(tiny_hopper, tmp_path / "run", "--model", "old_bc.OldBC")
    args[1:3] = []  # no BC config: its settings are not OldBC's
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("offbench: error: old_bc.OldBC: `lr` (in its call of a built-in algorithm's __init__) is now called "
                   "`actor_lr`: pass `actor_lr`")


# ---------------------------------------------------------------- machines and folders
@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    report = REPO / "results/perf/perf-cuda.md"
    before = report.stat().st_mtime_ns if report.exists() else None
    monkeypatch.chdir(tmp_path)
    assert main(["gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offbench: error: gpu-check: no GPU here") and "--device cpu" in err and "\n" not in err
    assert (report.stat().st_mtime_ns if report.exists() else None) == before
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_python_m_offbench_gpu_check_without_cuda_is_one_line_too(tmp_path):
    """`make gpu-check` runs `python -m offbench.gpu_check`, not `offbench gpu-check`."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "offbench.gpu_check", "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("offbench: error: gpu-check: no GPU here"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "report").exists()


def test_toy_finds_its_configs_from_any_working_directory(tmp_path, monkeypatch):
    from offbench import toy

    monkeypatch.chdir(tmp_path)
    args = toy._parser().parse_args([])
    methods = toy.find_methods(["bc", "diffcps"], args.configs)
    assert [m.name for m in methods] == ["bc", "diffcps"] and args.configs == REPO / "configs/toy"


def test_an_unwritable_checkpoints_folder_is_one_line_before_training(tiny_hopper, tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    (root / "checkpoints").write_text("not a folder")  # as root, a chmod'ed folder stays writable: this is not
    assert main(fit_args(tiny_hopper, root)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"offbench: error: cannot write in {root / 'checkpoints'} (") and "\n" not in err
    assert "make it a writable folder" in err and not (root / "metrics.csv").exists()


def test_a_checkpoint_write_refused_names_the_folder_to_make_writable(tiny_hopper, tmp_path, capsys, monkeypatch):
    import lightning.pytorch as pl

    def refuse(self, path, weights_only=False):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", refuse)
    assert main(fit_args(tiny_hopper, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"offbench: error: writing the checkpoint {tmp_path / 'run/checkpoints/last.ckpt.part'} failed "
                   f"(Permission denied); no checkpoint was written yet: free space or make "
                   f"{tmp_path / 'run/checkpoints'} writable, then run again")


# ---------------------------------------------------------------- a damaged checkpoint inside a grid
def _cell(tmp_path: Path):
    from offbench.bench import Cell

    run_dir = tmp_path / "out/runs/bc/d/seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    return Cell("bc", "d", 0, run_dir, ["fit"], 10)


class _Quiet:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


def test_the_runners_hint_matches_fits_message_of_a_damaged_checkpoint(tmp_path):
    from offbench.bench.runner import DAMAGED
    from offbench.run.checkpoints import read_checkpoint

    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=DAMAGED):
        read_checkpoint(tmp_path / "last.ckpt")


def test_restart_damaged_continues_from_the_checkpoint_before(tmp_path):
    from offbench.bench.runner import restart_damaged_cell

    cell = _cell(tmp_path)
    checkpoints = cell.run_dir / "checkpoints"
    (checkpoints / "last.ckpt").write_bytes(b"truncated")
    torch.save({"state_dict": {"updates": torch.tensor(5)}}, checkpoints / "previous.ckpt")
    assert restart_damaged_cell(cell, tmp_path / "out", _Quiet()) == "resume"
    assert int(torch.load(checkpoints / "last.ckpt")["state_dict"]["updates"]) == 5
    assert (checkpoints / "last.ckpt.damaged").read_bytes() == b"truncated" and not (checkpoints / "previous.ckpt").exists()
    assert restart_damaged_cell(cell, tmp_path / "out", _Quiet()) == "resume"  # readable now: left as it is


def test_restart_damaged_starts_again_without_a_readable_checkpoint(tmp_path):
    from offbench.bench.runner import restart_damaged_cell

    cell = _cell(tmp_path)
    (cell.run_dir / "checkpoints/last.ckpt").write_bytes(b"truncated")
    console = _Quiet()
    assert restart_damaged_cell(cell, tmp_path / "out", console) == "fresh"
    assert not cell.run_dir.exists() and list((tmp_path / "out.stale").rglob("last.ckpt"))
    assert "starting it again" in console.lines[0]


def test_bench_takes_restart_damaged(tmp_path, monkeypatch):
    from offbench.bench import cli

    seen = {}
    monkeypatch.setattr(cli, "load_grid", lambda grid, out: "grid")
    monkeypatch.setattr(cli, "run_grid", lambda grid, *a, **k: seen.update(k) or type("R", (), {
        "interrupted": False, "failed": {}, "busy": {}, "stale": {}})())
    assert cli.main(["g.yaml", "--restart-damaged"]) == 0 and seen["restart_damaged"] is True


# ---------------------------------------------------------------- a full disk under the figures
def test_a_full_disk_while_writing_figures_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    from tests.test_tables import write_run

    for seed in (0, 1):
        write_run(tmp_path, "bc", "synthetic/pendulum-random-v0", seed)

    def full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    assert main(["table", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "free space" in err[0], err
    assert not list(tmp_path.rglob("*.tmp*"))


# ---------------------------------------------------------------- cells stop whatever the runner inherited
def test_a_cell_of_a_runner_that_ignores_sigint_still_stops_on_the_runners_stop(tmp_path):
    """A runner started in the background by a script inherits SIGINT as ignored; its cells must not:
    the runner's stop (SIGINT, then SIGKILL after the grace) must end them by SIGINT, not by the kill."""
    from offbench.bench.cells import start_cell
    from offbench.bench.local import _stop

    cell = _cell(tmp_path)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        command = [sys.executable, "-c", "import time; print('rea' + 'dy', flush=True); time.sleep(60)"]
        child = start_cell(cell, command, dict(os.environ))
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 30
    while "ready" not in (cell.run_dir / "bench.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    _stop([child], grace=20.0)
    assert child.returncode != -signal.SIGKILL, "the cell ignored SIGINT and had to be killed"
    assert "KeyboardInterrupt" in (cell.run_dir / "bench.log").read_text()


# ---------------------------------------------------------------- one name for an algorithm
def test_a_loose_fit_names_its_run_directory_as_the_grids_do(tmp_path, monkeypatch, capsys):
    from offbench.run.run_dir import algorithm_name, default_run_dir

    assert algorithm_name("algorithms.diffusion_ql.DiffusionQL") == "diffusion_ql"  # was diffusionql
    assert [algorithm_name(c) for c in ("algorithms.td3bc.TD3BC", "algorithms.bc.BC", "my_algo.MeanAction")] == [
        "td3bc", "bc", "meanaction"]
    monkeypatch.chdir(tmp_path)
    new = Path("runs/diffusion_ql/synthetic-hopper-random-v0/seed0")
    assert default_run_dir("algorithms.diffusion_ql.DiffusionQL", "synthetic/hopper-random-v0", 0) == new
    old = Path("runs/diffusionql/synthetic-hopper-random-v0/seed0")
    old.mkdir(parents=True)  # a run begun under the old name is still found, with one line
    assert default_run_dir("algorithms.diffusion_ql.DiffusionQL", "synthetic/hopper-random-v0", 0) == old
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: {old} has the old name of {new}") and "\n" not in err
