"""W&B logging through the real `offbench fit` CLI, offline (no network): a complete, syncable
offline run in the run directory, named algorithm/dataset/seed, with the resolved config, config.yaml,
result.json and the scores; a grid's `wandb:` as cell arguments; one clear message when wandb is missing."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offbench import wandb_logging
from offbench.bench import GridError, load_grid
from offbench.cli import main
from tests.test_bench import BC, write_grid
from tests.test_fit import fit_args

wandb = pytest.importorskip("wandb", reason="the wandb extra: pip install 'offbench[wandb]'")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, nothing written outside tmp_path, no login."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_fit_with_wandb_leaves_a_syncable_offline_run(tiny_hopper, tmp_path, offline):
    root = tmp_path / "run"
    main(fit_args(tiny_hopper, root, "--logger", "wandb", "--wandb.group", "g", "--wandb.tags", "[t1]"))
    assert (root / "result.json").exists() and (root / "metrics.csv").exists()  # the CSV log is still there
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    run_id = json.loads((root / wandb_logging.ID_FILE).read_text())["id"]
    assert (run_dir / f"run-{run_id}.wandb").stat().st_size > 0  # the record log `wandb sync` uploads
    files = run_dir / "files"
    assert (files / "result.json").read_text() == (root / "result.json").read_text()
    assert (files / "config.yaml").read_text() == (root / "config.yaml").read_text()
    assert not (files / "result.json").is_symlink()  # copies: the offline run stays whole when moved

    # `wandb sync` finds it (no upload: --dry-run), and its record log holds what the run promised.
    sync = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert "Would sync 1 run(s)" in sync.stdout + sync.stderr, sync.stdout + sync.stderr
    records = (run_dir / f"run-{run_id}.wandb").read_bytes()  # protobuf records: their strings appear as is
    for text in [f"bc/{tiny_hopper}/seed0", "g", "t1", "loss/actor", "eval/score", "score/last", "result.json",
                 "config.yaml", str(tiny_hopper)]:
        assert text.encode() in records, text
    assert b"trainer/global_step" not in records  # metrics are logged against `updates`


def test_missing_wandb_gives_the_install_command(monkeypatch, tiny_hopper, tmp_path, capsys):
    real = wandb_logging.importlib.util.find_spec
    monkeypatch.setattr(wandb_logging.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    assert main(fit_args(tiny_hopper, tmp_path / "run", "--logger", "wandb")) == 2
    err = capsys.readouterr().err
    assert "offbench: error: --logger wandb needs the wandb package" in err and "pip install 'offbench[wandb]'" in err
    assert not (tmp_path / "run").exists()  # stopped before anything ran


def test_a_resumed_fit_continues_the_same_wandb_run(tmp_path):
    first = wandb_logging.RunWandbLogger(tmp_path, wandb_logging.WandbOptions(), "n", {}, resumed=False)
    again = wandb_logging.RunWandbLogger(tmp_path, wandb_logging.WandbOptions(), "n", {}, resumed=True)
    assert again.version == first.version and len(first.version) == 8
    other = wandb_logging.RunWandbLogger(tmp_path / "other", wandb_logging.WandbOptions(), "n", {}, resumed=False)
    assert other.version != first.version


def grid_with(tmp_path, **extra) -> Path:
    return write_grid(tmp_path / "g.yaml", name="demo", seeds=2, updates=10, eval_every=10,
                      datasets=["synthetic/pendulum-random-v0"], algorithms=[{"name": "bc", "config": BC}], **extra)


def test_grid_logs_every_cell_into_one_wandb_group(tmp_path):
    grid = load_grid(grid_with(tmp_path, wandb={"project": "p", "tags": ["quick", 1]}, args=["--wandb.mode", "online"]))
    args = grid.cells[1].args
    assert args[args.index("--logger"):] == [
        "--logger", "wandb", "--wandb.group", "demo", "--wandb.project", "p", "--wandb.tags", '["quick", "1"]',
        "--wandb.name", "bc/synthetic/pendulum-random-v0/seed1",
        "--wandb.mode", "online",  # the grid's `args` come after, so they can override
    ]
    assert "--logger" not in load_grid(grid_with(tmp_path, wandb=False)).cells[0].args
    assert load_grid(grid_with(tmp_path, wandb=True)).cells[0].args[-6:] == [
        "--logger", "wandb", "--wandb.group", "demo", "--wandb.name", "bc/synthetic/pendulum-random-v0/seed0"]


@pytest.mark.parametrize("value, message", [
    ({"projekt": "p"}, "unknown key 'projekt' (did you mean 'project'?)"),
    ({"mode": "cloud"}, "`wandb.mode` must be offline or online, got 'cloud'"),
    ("yes", "`wandb` must be true, false or a mapping of project, entity, tags, mode"),
])
def test_bad_wandb_settings_in_a_grid(tmp_path, value, message):
    with pytest.raises(GridError) as e:
        load_grid(grid_with(tmp_path, wandb=value))
    assert message in str(e.value)


def test_a_grid_with_wandb_but_no_wandb_package_stops_before_running(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(GridError) as e:
        load_grid(grid_with(tmp_path, wandb=True))
    assert "pip install 'offbench[wandb]'" in str(e.value)


@pytest.mark.slow
def test_online_mode_without_a_server_falls_back_to_offline(tiny_hopper, tmp_path, offline, monkeypatch):
    """An unreachable W&B server costs ONLINE_INIT_TIMEOUT seconds, with a warning; the run is logged offline."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    root = tmp_path / "run"
    with pytest.warns(UserWarning, match="W&B online mode failed"):
        main(fit_args(tiny_hopper, root, "--logger", "wandb", "--wandb.mode", "online"))
    assert (root / "result.json").exists()
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    assert (run_dir / "files" / "result.json").exists()
