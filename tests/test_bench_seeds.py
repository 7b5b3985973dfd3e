"""`seeds_per_process` in a grid file: the runner packs the seeds of one column and dataset (in the same state)
into one `offbench fit --seeds` process, and keeps everything per cell (state, cell.json, failures). The packs
and their commands, without subprocesses; then a real grid of packs, interrupted and resumed, whose run
directories equal those of the same grid run one seed per process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from offbench import bench
from offbench.bench import GridError, cell_command, load_grid, make_packs, pack_command, run_grid
from offbench.cli import main as cli_main
from tests.test_bench import BC, TINY, quiet, record_launches, write_grid
from tests.test_fit_seeds import TOLERANCE, assert_same_run

REPO = Path(__file__).resolve().parents[1]
DATA = "synthetic/pendulum-random-v0"


def small_grid(tmp_path: Path, **grid) -> bench.Grid:
    spec = {"name": "g", "output": str(tmp_path / "out"), "seeds": [0, 1, 2], "updates": 10, "eval_every": 5,
            "datasets": [DATA], "algorithms": [{"name": "bc", "config": BC}], **grid}
    return load_grid(write_grid(tmp_path / "g.yaml", **spec))


def test_packs_and_their_commands(tmp_path):
    grid = small_grid(tmp_path, seeds_per_process=2, algorithms=[
        {"name": "bc", "config": BC},
        {"name": "alone", "config": BC, "seeds_per_process": 1},
        {"name": "three", "config": BC, "overrides": {DATA: {"seeds_per_process": 3}}},
    ])
    assert [c.seeds_per_process for c in grid.cells] == [2] * 3 + [1] * 3 + [3] * 3
    assert "seeds_per_process" not in " ".join(grid.cells[0].args)  # a runner setting, not a fit argument
    packs = make_packs((c, "fresh") for c in grid.cells)
    assert [([c.id for c in cells], state) for cells, state in packs] == [
        ([f"bc/{DATA.replace('/', '-')}/seed0", f"bc/{DATA.replace('/', '-')}/seed1"], "fresh"),
        ([f"bc/{DATA.replace('/', '-')}/seed2"], "fresh"),
        *[([f"alone/{DATA.replace('/', '-')}/seed{s}"], "fresh") for s in (0, 1, 2)],
        ([f"three/{DATA.replace('/', '-')}/seed{s}" for s in (0, 1, 2)], "fresh"),
    ]
    runs = tmp_path / "out/runs/bc/synthetic-pendulum-random-v0"
    assert pack_command(packs[0][0], "resume", "cpu") == [
        sys.executable, "-m", "offbench.cli", "fit", "--config", BC, "--data.dataset", DATA,
        "--updates", "10", "--data.eval_every", "5", "--trainer.default_root_dir", str(runs / "seed{seed}"),
        "--trainer.enable_progress_bar", "false", "--seeds", "0,1", "--trainer.accelerator", "cpu", "--ckpt_path", "last",
    ]
    assert pack_command(packs[1][0], "fresh", "cuda") == cell_command(grid.cells[2], "fresh", "cuda")  # one: as before
    # Never fresh and resumed cells in one process: seed 1 resumes alone, seeds 0 and 2 start together.
    mixed = make_packs([(grid.cells[0], "fresh"), (grid.cells[1], "resume"), (grid.cells[2], "fresh")])
    assert [([c.seed for c in cells], state) for cells, state in mixed] == [([0, 2], "fresh"), ([1], "resume")]


class FakePack:
    """A process of a pack that has already ended: with `code` 0 every seed of its command wrote its result.json."""

    def __init__(self, command: list[str], code: int) -> None:
        self.code = code
        if code == 0:
            root = command[command.index("--trainer.default_root_dir") + 1]
            seeds = command[command.index("--seeds") + 1].split(",") if "--seeds" in command else [None]
            for seed in seeds:
                run = Path(root.replace("{seed}", seed) if seed else root)
                run.mkdir(parents=True, exist_ok=True)
                (run / "result.json").write_text("{}")

    def poll(self) -> int:
        return self.code


@pytest.mark.parametrize("code", [0, 1])
def test_one_process_per_pack_and_every_cell_recorded(tmp_path, monkeypatch, code):
    grid = small_grid(tmp_path, seeds_per_process=2)
    launched = []

    def fake_start(cell, command, env):
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / "bench.log").write_text("\n### offbench bench (time): (command)\nthe pack's output\n")
        launched.append((cell.seed, command))
        return FakePack(command, code)

    monkeypatch.setattr(bench.runner, "_prepare_datasets", lambda *a: None)
    monkeypatch.setattr(bench.local, "start_cell", fake_start)
    report = run_grid(grid, workers=1, devices="cpu", console=quiet(), tables=False)
    assert [(seed, "--seeds" in command) for seed, command in launched] == [(0, True), (2, False)]
    assert launched[0][1][launched[0][1].index("--seeds") + 1] == "0,1"
    assert report.launched == [c.id for c in grid.cells]
    seed1 = grid.cells[1].run_dir
    assert json.loads((seed1 / "cell.json").read_text())["args"] == grid.cells[1].args  # its single-seed arguments
    assert f"its output is in {grid.cells[0].run_dir / 'bench.log'}" in (seed1 / "bench.log").read_text()
    failures = json.loads((grid.output / "failures.json").read_text())
    if code == 0:
        assert report.finished == [c.id for c in grid.cells] and failures == {}
    else:  # each cell of a failed pack is a failure of its own, with the pack's log
        assert list(failures) == list(report.failed) == [c.id for c in grid.cells]
        assert [failures[c.id].get("seeds") for c in grid.cells] == [[0, 1], [0, 1], None]
        assert failures[grid.cells[1].id]["log"] == str(grid.cells[0].run_dir / "bench.log")
        assert failures[grid.cells[1].id]["reason"] == "the pack's output"


@pytest.mark.parametrize(("where", "value"), [("top", 0), ("algorithm", "2"), ("override", True), ("top", 1.5)])
def test_a_bad_seeds_per_process_is_one_line(tmp_path, capsys, where, value):
    settings = {"seeds_per_process": value}
    algorithm = {"name": "bc", "config": BC, **(settings if where == "algorithm" else {})}
    if where == "override":
        algorithm["overrides"] = {DATA: settings}
    grid = write_grid(tmp_path / "g.yaml", name="g", seeds=2, updates=10, eval_every=5, datasets=[DATA],
                      algorithms=[algorithm], **(settings if where == "top" else {}))
    with pytest.raises(GridError) as error:
        load_grid(grid)
    line = f"algorithms[0] (bc): `seeds_per_process` must be a positive integer (1: one process per seed), got {value!r}"
    assert str(error.value) == f"{grid}: 1 problem(s):\n  - {line}"
    assert cli_main(["bench", str(grid), "--dry-run"]) == 2
    assert line in capsys.readouterr().err


def test_seeds_per_process_does_not_combine_with_wandb(tmp_path):
    with pytest.raises(GridError, match="`seeds_per_process` 2 does not combine with `wandb`"):
        small_grid(tmp_path, seeds_per_process=2, wandb=True)


def test_the_dry_run_shows_one_command_per_pack(tmp_path, capsys):
    grid = small_grid(tmp_path, seeds_per_process=2)
    assert bench.main([str(grid.path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("offbench fit") == 2 and "--seeds 0,1" in out and "--seed_everything 2" in out
    assert f"(in the process of {grid.cells[0].id})" in out


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def grid_runs(tiny_hopper, tmp_path_factory):
    """BC on the tiny Hopper data (40 updates, evaluations at 20 and 40), seeds 0, 1, 2, `seeds_per_process: 2`:
    1. the pack of seeds 0 and 1 is SIGKILLed in its second interval (by seed 1's callback), the pack of seed 2
       finishes;
    2. the same command again: the pack of seeds 0 and 1 resumes, seed 2 is skipped;
    3. the same grid with the default (one process per seed) into another folder, for comparison."""
    root = tmp_path_factory.mktemp("bench_seeds")
    spec = dict(name="t", datasets=[str(tiny_hopper)], seeds=[0, 1, 2], **TINY)
    spec["args"] = [*spec["args"], "--trainer.callbacks+=tests.test_bench.KillInSecondEpoch"]
    algorithms = [{"name": "bc", "config": BC}]
    packed = load_grid(write_grid(root / "packed.yaml", **spec, output=str(root / "packed"), seeds_per_process=2,
                                  algorithms=algorithms))
    single = load_grid(write_grid(root / "single.yaml", **spec, output=str(root / "single"), algorithms=algorithms))
    runs: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        launched = record_launches(mp)
        for name, grid, kill in [("first", packed, "1"), ("second", packed, "none"), ("single", single, "none")]:
            launched.clear()
            mp.setenv("OFFBENCH_TEST_KILL_SEED", kill)
            report = run_grid(grid, workers=2, devices="cpu", console=quiet(), tables=False)
            runs[name] = {"grid": grid, "report": report, "launched": list(launched),
                          "failures": json.loads((grid.output / "failures.json").read_text())}
            if name == "first":
                runs[name]["ckpt_updates"] = [
                    int(torch.load(c.run_dir / "checkpoints/last.ckpt", weights_only=False)["state_dict"]["updates"])
                    for c in packed.cells[:2]
                ]
    return runs


def test_a_pack_runs_its_seeds_in_one_process(grid_runs):
    first = grid_runs["first"]
    packed = first["grid"]
    (pack_id, pack), (alone_id, alone) = first["launched"]
    assert (pack_id, alone_id) == (packed.cells[0].id, packed.cells[2].id)
    assert "--seed_everything" not in pack and pack[-4:] == ["--seeds", "0,1", "--trainer.accelerator", "cpu"]
    assert pack[pack.index("--trainer.default_root_dir") + 1] == str(packed.cells[0].run_dir.parent / "seed{seed}")
    assert alone == cell_command(packed.cells[2], "fresh", "cpu")  # a pack of one: the cell's own command
    # The killed pack: each of its cells a failure, each with its checkpoint of the first interval.
    assert first["report"].finished == [packed.cells[2].id]
    assert list(first["failures"]) == [c.id for c in packed.cells[:2]]
    assert all(f["exit"] == "killed by SIGKILL" and f["seeds"] == [0, 1] for f in first["failures"].values())
    assert first["ckpt_updates"] == [20, 20]


def test_an_interrupted_pack_resumes(grid_runs):
    second = grid_runs["second"]
    packed = second["grid"]
    [(pack_id, pack)] = second["launched"]  # seed 2 finished: skipped
    assert pack_id == packed.cells[0].id and pack[-6:] == ["--seeds", "0,1", "--trainer.accelerator", "cpu",
                                                           "--ckpt_path", "last"]
    assert second["report"].finished == [c.id for c in packed.cells[:2]] and second["report"].skipped == [packed.cells[2].id]
    assert second["failures"] == {}
    log = (packed.cells[0].run_dir / "bench.log").read_text()
    assert log.count("### offbench bench") == 2 and "Restored all states from the checkpoint" in log


def test_packed_runs_equal_one_process_per_seed(grid_runs):
    single, packed = grid_runs["single"], grid_runs["first"]["grid"]
    assert len(single["launched"]) == 3 and sorted(single["report"].finished) == [c.id for c in single["grid"].cells]
    for a, b in zip(packed.cells, single["grid"].cells, strict=True):
        result = json.loads((a.run_dir / "result.json").read_text())
        assert [h["updates"] for h in result["history"]] == [20, 40] and result["seed"] == a.seed
        assert_same_run(a.run_dir, b.run_dir, TOLERANCE)  # histories, metrics.csv, last checkpoint's tensors
