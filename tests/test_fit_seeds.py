"""`offbench fit --seeds`: N seeds in one process, their updates one batched computation (offbench/run/lockstep.py).

Each seed's run directory must be the one its single-seed run writes (result.json, metrics.csv, checkpoint),
an interrupted run must resume exactly (also when the seeds' checkpoints stopped at different updates), and
the settings that do not combine with --seeds fail with one message."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from offbench.cli import main
from offbench.run.lockstep import parse_seeds
from offbench.seeds import SeedBatch
from tests.test_fit import REPO

CONFIGS = REPO / "configs/algorithms"


def args(dataset: Path, out: str, algorithm: str = "bc", *extra: str) -> list[str]:
    """A small run: 3 evaluations of 2 Hopper episodes, 300 updates in blocks of 50."""
    return [
        "fit", "--config", str(CONFIGS / f"{algorithm}.yaml"), "--data.dataset", str(dataset), "--updates", "300",
        "--data.eval_every", "100", "--data.block_size", "50", "--data.batch_size", "64",
        "--eval.episodes", "2", "--eval.num_envs", "2", "--trainer.default_root_dir", out,
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ]


def run_files(run: Path) -> tuple[list[dict], pd.DataFrame, dict[str, torch.Tensor]]:
    """What a run leaves that tables and resumes read: result.json's history (without timings), metrics.csv's
    losses and scores, and the last checkpoint's tensors."""
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "result.json").read_text())["history"]]
    metrics = pd.read_csv(run / "metrics.csv")
    metrics = metrics[[c for c in metrics.columns if c.startswith(("loss/", "eval/score", "updates", "q/"))]]
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    # the tensors of the modules, of the optimisers' states and of the learning-rate schedulers (IQL's cosine)
    state = dict(checkpoint["state_dict"])
    for i, optimizer in enumerate(checkpoint["optimizer_states"]):
        for p, values in optimizer["state"].items():
            state |= {f"optimizer{i}.{p}.{key}": torch.as_tensor(value) for key, value in values.items()}
        state |= {f"optimizer{i}.group{j}.lr": torch.as_tensor(g["lr"]) for j, g in enumerate(optimizer["param_groups"])}
    for i, scheduler in enumerate(checkpoint.get("lr_schedulers", [])):
        state |= {f"scheduler{i}.{key}": torch.as_tensor(value) for key, value in scheduler.items()
                  if isinstance(value, (int, float, list))}
    return history, metrics, state


def assert_same_run(a: Path, b: Path, tolerance: float) -> None:
    """Run directories a and b hold the same run: equal histories and logs (within `tolerance`, relative) and
    checkpoint tensors (within `tolerance` of each tensor's largest entry)."""
    (history_a, metrics_a, state_a), (history_b, metrics_b, state_b) = run_files(a), run_files(b)
    assert [h["updates"] for h in history_a] == [h["updates"] for h in history_b]
    for h, g in zip(history_a, history_b):
        assert h["episode_returns"] == pytest.approx(g["episode_returns"], rel=tolerance, abs=tolerance)
    pd.testing.assert_frame_equal(metrics_a, metrics_b, rtol=max(tolerance, 1e-12), atol=tolerance)
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        scale = value.abs().max().clamp(min=1e-2) if value.is_floating_point() and value.numel() else 1
        assert ((value - state_b[key]).abs().max() <= tolerance * scale) if value.is_floating_point() else torch.equal(value, state_b[key]), key


# Measured (AMD EPYC, AVX-512, float32): every seed of --seeds 0,1 equals its single-seed run bit for bit, for the
# four algorithms below (the CPU layers of offbench/nets.py run each copy with the single-seed kernels). TOLERANCE
# leaves room for another CPU, whose batched kernels (the parts not in offbench/nets.py) may round differently.
TOLERANCE = 1e-5


@pytest.fixture
def batched_updates(monkeypatch):
    """How many SeedBatch updates ran (each one update of every seed at once)."""
    calls = []
    run_update = SeedBatch.run_update
    monkeypatch.setattr(SeedBatch, "run_update", lambda self, batches: calls.append(len(batches)) or run_update(self, batches))
    return calls


# BC; TD3+BC (target noise, policy delay, Polyak targets); IQL (a learning-rate schedule, in the checkpoints);
# Diffusion-QL (noise drawn in every update and in act, EMA), shorter: its update is slow on a CPU.
RUNS = {"bc": [], "td3bc": [], "iql": [], "diffusion_ql": ["--updates", "60", "--data.eval_every", "30"]}


@pytest.mark.parametrize("algorithm", RUNS)
def test_each_seed_writes_its_single_seed_run(algorithm, tiny_hopper, tmp_path, batched_updates):
    extra = RUNS[algorithm]
    main(args(tiny_hopper, str(tmp_path / "together/seed{seed}"), algorithm, "--seeds", "0,1", *extra))
    assert batched_updates == [2] * (int(extra[1]) if extra else 300)
    for seed in (0, 1):
        main(args(tiny_hopper, str(tmp_path / f"alone/seed{seed}"), algorithm, "--seed", str(seed), *extra))
        together = tmp_path / f"together/seed{seed}"
        assert json.loads((together / "result.json").read_text())["seed"] == seed
        assert_same_run(together, tmp_path / f"alone/seed{seed}", TOLERANCE)
        assert "seed_everything: " + str(seed) in (together / "config.yaml").read_text()


PLANNER = ["--model.init_args.horizon", "8", "--model.init_args.n_timesteps", "3", "--model.init_args.dim", "8",
           "--model.init_args.dim_mults", "[1,4]", "--data.batch_size", "16"]
SHORT = {"cql": [], "rebrac": [], "diffcps": [], "edp": [], "idql": [],
         "diffuser": [*PLANNER, "--model.init_args.n_plans", "4"], "decision_diffuser": [*PLANNER, "--model.init_args.inv_hidden", "16"]}


@pytest.mark.parametrize("algorithm", SHORT)
def test_every_other_batchable_algorithm_trains_its_seeds_together(algorithm, tiny_hopper, tmp_path, batched_updates):
    """The batchable algorithms not above, briefly (20 updates, one evaluation episode), the planners with small
    U-Nets: each seed writes a complete run; seed 1 equals its single-seed run within TOLERANCE, except where the
    training amplifies float32 round-off faster than 20 updates allow (tests/test_seeds.py checks those in float64):
    the planners (vmap's batched kernels for their U-Nets) and CQL (measured here, runs of 12, 14, 16, 18 and 20
    updates: seed 1 within 4e-9, 1e-7, 4e-5, 9e-5 and 1e-3 of its single-seed run)."""
    extra = [*SHORT[algorithm], "--updates", "20", "--data.eval_every", "10", "--eval.episodes", "1", "--eval.num_envs", "1"]
    main(args(tiny_hopper, str(tmp_path / "together/seed{seed}"), algorithm, "--seeds", "0,1", *extra))
    assert batched_updates == [2] * 20
    assert all(len(json.loads((tmp_path / f"together/seed{s}/result.json").read_text())["history"]) == 2 for s in (0, 1))
    if algorithm not in ("diffuser", "decision_diffuser", "cql"):
        main(args(tiny_hopper, str(tmp_path / "alone"), algorithm, "--seed", "1", *extra))
        assert_same_run(tmp_path / "together/seed1", tmp_path / "alone", TOLERANCE)


def test_an_unbatchable_algorithm_runs_its_seeds_one_after_another(tiny_hopper, tmp_path, capfd, batched_updates):
    main(args(tiny_hopper, str(tmp_path / "together/seed{seed}"), "awr", "--seeds", "0,1", "--updates", "100"))
    assert batched_updates == []
    assert "cannot train its seeds as one batched computation" in capfd.readouterr().err
    main(args(tiny_hopper, str(tmp_path / "alone"), "awr", "--seed", "1", "--updates", "100"))
    assert_same_run(tmp_path / "together/seed1", tmp_path / "alone", 0.0)


def test_an_interrupted_run_of_seeds_resumes_exactly(tiny_hopper, tmp_path, batched_updates):
    """Interrupted in the third evaluation interval, then one seed's last checkpoint taken back to the one before
    (as an interruption between two seeds' checkpoint writes leaves them): the resumed seeds equal an
    uninterrupted run, the seed behind catching up alone first."""
    main(args(tiny_hopper, str(tmp_path / "full/seed{seed}"), "td3bc", "--seeds", "0,1"))
    stopped = args(tiny_hopper, str(tmp_path / "resumed/seed{seed}"), "td3bc", "--seeds", "0,1",
                   "--trainer.callbacks+=tests.test_fit_seeds.StopInThirdInterval")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(stopped)
    for seed in (0, 1):
        checkpoint = torch.load(tmp_path / f"resumed/seed{seed}/checkpoints/last.ckpt", weights_only=False)
        assert int(checkpoint["state_dict"]["updates"]) == 200
    seed1 = tmp_path / "resumed/seed1/checkpoints"
    shutil.copyfile(seed1 / "previous.ckpt", seed1 / "last.ckpt")  # seed 1 at 100 updates, seed 0 at 200
    batched_updates.clear()
    main(args(tiny_hopper, str(tmp_path / "resumed/seed{seed}"), "td3bc", "--seeds", "0,1", "--ckpt_path", "last"))
    assert batched_updates == [2] * 100  # seed 1 caught up alone from 100 to 200, then both together
    for seed in (0, 1):
        assert_same_run(tmp_path / f"resumed/seed{seed}", tmp_path / f"full/seed{seed}", 0.0)


@pytest.mark.parametrize(("algorithm", "updates"), [("td3bc", 600), ("awr", 3000)])
def test_ctrl_c_stops_every_seed_and_the_same_command_resumes(algorithm, updates, tiny_hopper, tmp_path):
    """Ctrl-C (SIGINT) after the first checkpoint: one message, exit status 1, no result yet; the same command with
    --ckpt_path last then finishes every seed, and run again trains nothing. TD3+BC's seeds train together, AWR's one
    after another (the seed running alone must stop too, within a block; the other one had not started)."""
    argv = args(tiny_hopper, str(tmp_path / "seed{seed}"), algorithm, "--seeds", "0,1", "--updates", str(updates))[1:]
    process = subprocess.Popen([sys.executable, "-m", "offbench.cli", "fit", *argv], cwd=REPO, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "seed0/checkpoints/last.ckpt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 1, err[-2000:]
    assert "interrupted: each seed's run keeps its last checkpoint" in err and "Traceback" not in err
    assert not any((tmp_path / f"seed{seed}/result.json").exists() for seed in (0, 1))
    assert main(["fit", *argv, "--ckpt_path", "last"]) == 0  # a seed without a checkpoint yet starts from the beginning
    for seed in (0, 1):
        assert json.loads((tmp_path / f"seed{seed}/result.json").read_text())["updates"] == updates
    results = [(tmp_path / f"seed{seed}/result.json").read_text() for seed in (0, 1)]
    assert main(["fit", *argv, "--ckpt_path", "last"]) == 0  # finished seeds are not trained again
    assert results == [(tmp_path / f"seed{seed}/result.json").read_text() for seed in (0, 1)]


class StopInThirdInterval(pl.Callback):
    """A crash in the third evaluation interval (after two checkpoints)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 0:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(("extra", "message"), [
    (["--seeds", "0,0"], "names seed 0 twice"),
    (["--seeds", "3-1"], "is empty"),
    (["--seeds", "a"], "expected integers and ranges"),
    (["--seeds", "0,1", "--seed", "2"], "leave out --seed_everything"),
    (["--seeds", "0,1", "--compile"], "--compile true does not combine with --seeds"),
    (["--seeds", "0,1", "--out", "RUN"], "put {seed} in it"),
    (["--seed", "0,1"], "one run per seed in this process is --seeds 0,1"),
])
def test_settings_that_do_not_combine_with_seeds_fail_with_one_message(extra, message, tiny_hopper, tmp_path, capsys):
    argv = [w.replace("RUN", str(tmp_path / "one")) for w in args(tiny_hopper, str(tmp_path / "r{seed}"), "bc", *extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "one").exists() and not (tmp_path / "r0").exists()


def test_seed_lists_and_ranges():
    assert parse_seeds("0,1,2,3") == [0, 1, 2, 3]
    assert parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_seeds("5") == [5]
