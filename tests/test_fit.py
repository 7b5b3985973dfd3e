"""`offbench fit` end to end through the real CLI: run directory, result.json, exact resume,
algorithms from outside the repo, and bad input failing before training with a useful message."""

import json
import re
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from offbench.cli import main
from offbench.data.identity import fingerprint
from offbench.data.sources import read_d4rl_hdf5
from offbench.scores import REF_SCORES

REPO = Path(__file__).resolve().parents[1]
BC_CONFIG = str(REPO / "configs/algorithms/bc.yaml")


def fit_args(dataset: Path, root: Path, *extra: str) -> list[str]:
    """A small BC run: 3 evaluations of 2 Hopper episodes, 300 updates in blocks of 50."""
    return [
        "fit", "--config", BC_CONFIG, "--data.dataset", str(dataset), "--updates", "300",
        "--data.eval_every", "100", "--data.block_size", "50", "--data.batch_size", "64",
        "--eval.episodes", "2", "--eval.num_envs", "2", "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ]


class StopMidEpoch(pl.Callback):
    """Simulates a crash part-way through the second epoch, after the first epoch's checkpoint."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            raise KeyboardInterrupt


def interrupted_and_resumed(args, tmp_path: Path, *full_extra: str) -> tuple[dict, dict]:
    """`offbench fit` of `args(root, *extra)` uninterrupted into tmp_path/full (plus `full_extra`), and
    interrupted in its second epoch (StopMidEpoch) then resumed into tmp_path/resumed; checks that the
    resumed run's weights equal the uninterrupted run's, bit for bit, and returns both last checkpoints."""
    main(args(tmp_path / "full", *full_extra))
    with pytest.raises(SystemExit):
        main(args(tmp_path / "resumed", "--trainer.callbacks+=tests.test_fit.StopMidEpoch"))
    main(args(tmp_path / "resumed", "--ckpt_path", "last"))
    full, resumed = (torch.load(tmp_path / d / "checkpoints/last.ckpt", weights_only=False) for d in ("full", "resumed"))
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    return full, resumed


def test_fit_writes_a_complete_run_directory(tiny_hopper, tmp_path):
    main(fit_args(tiny_hopper, tmp_path / "run"))
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    assert result["updates"] == 300
    # which bytes it trained on and how they were scored
    data = result["data"]
    assert data["fingerprint"] == fingerprint(read_d4rl_hdf5(tiny_hopper)) and data["name"] == str(tiny_hopper)
    assert (data["ref_min"], data["ref_max"]) == REF_SCORES["hopper"]
    assert data["settings"]["init_args"]["dataset"] == str(tiny_hopper) and "batch_size" in data["settings"]["init_args"]
    assert [h["updates"] for h in result["history"]] == [100, 200, 300]
    for h in result["history"]:  # the per-episode numbers behind each evaluation's mean
        assert len(h["episode_scores"]) == len(h["episode_returns"]) == result["protocol"]["episodes_per_evaluation"]
        assert h["score"] == pytest.approx(np.mean(h["episode_scores"]))
        assert h["return"] == pytest.approx(np.mean(h["episode_returns"]))
    scores = result["scores"]
    assert scores["last"] == result["history"][-1]["score"]
    assert scores["best"] == max(h["score"] for h in result["history"])
    assert (run / "config.yaml").exists() and (run / "checkpoints/last.ckpt").exists()
    metrics = pd.read_csv(run / "metrics.csv")
    assert "loss/actor" in metrics and "eval/score" in metrics
    # One counter, in every row: training rows every 50 updates (a block), evaluation rows every 100.
    assert not {"step", "epoch", "eval/updates"} & set(metrics.columns) and metrics["updates"].notna().all()
    assert metrics.loc[metrics["eval/score"].notna(), "updates"].tolist() == [100, 200, 300]
    assert metrics.loc[metrics["loss/actor"].notna(), "updates"].tolist() == list(range(50, 301, 50))
    # the counter is written as an integer (Lightning logs it as a float: 50.0)
    assert metrics["updates"].dtype.kind == "i"
    assert [line.rsplit(",", 1)[1] for line in (run / "metrics.csv").read_text().splitlines()[1:3]] == ["50", "100"]


class BarAtFitEnd(pl.Callback):
    """Records what the progress bar shows when the fit has ended."""

    shown: dict = {}

    def on_fit_end(self, trainer, pl_module):
        BarAtFitEnd.shown = dict(trainer.progress_bar_callback._metric_component._metrics)


def test_the_screen_shows_the_last_score_and_the_parameters_without_flops(tiny_hopper, tmp_path, capfd, caplog):
    args = fit_args(tiny_hopper, tmp_path / "run", "--trainer.callbacks+=tests.test_fit.BarAtFitEnd")
    for flag in ("--trainer.enable_progress_bar", "--trainer.enable_model_summary"):
        args[args.index(flag) + 1] = "true"
    main(args)
    history = json.loads((tmp_path / "run/result.json").read_text())["history"]
    assert len({h["score"] for h in history}) == 3  # the last score differs from the one before
    assert BarAtFitEnd.shown["eval/score"] == pytest.approx(history[-1]["score"], rel=1e-6)  # float32 in the logger
    shown = "".join(capfd.readouterr()) + caplog.text  # the summary goes through logging
    assert f"eval/score: {history[-1]['score']:.3f}" in shown
    assert "Trainable params" in shown and "Total params" in shown  # the parameter summary stays
    assert "FLOP" not in shown.upper() and "already configured with model summary" not in shown


def test_metrics_csv_keeps_every_row_past_lightnings_flush(tiny_hopper, tmp_path):
    """Lightning's CSVLogger writes its rows out every 100 logged steps and empties its list; a long
    run (here 101 blocks of 2 updates) crossed that point and failed there (IndexError) until the
    `step` column was dropped inside the writer."""
    args = fit_args(tiny_hopper, tmp_path / "run")
    args[args.index("--updates") + 1] = "202"
    args[args.index("--data.block_size") + 1] = "2"
    args[args.index("--data.eval_every") + 1] = "202"
    main(args)
    metrics = pd.read_csv(tmp_path / "run/metrics.csv")
    assert "step" not in metrics
    assert metrics.loc[metrics["loss/actor"].notna(), "updates"].tolist() == list(range(2, 203, 2))
    assert metrics.loc[metrics["eval/score"].notna(), "updates"].tolist() == [202]


def test_resumed_run_matches_uninterrupted_run(tiny_hopper, tmp_path):
    main(fit_args(tiny_hopper, tmp_path / "full"))
    stopped = fit_args(tiny_hopper, tmp_path / "resumed", "--trainer.callbacks+=tests.test_fit.StopMidEpoch")
    with pytest.raises(SystemExit):
        main(stopped)
    assert not (tmp_path / "resumed/result.json").exists()
    interrupted = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    assert int(interrupted["state_dict"]["updates"]) == 100  # the first epoch's checkpoint, not a fresh start
    main(fit_args(tiny_hopper, tmp_path / "resumed", "--ckpt_path", "last"))

    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name
    assert int(resumed["state_dict"]["updates"]) == 300
    history = [json.loads((tmp_path / d / "result.json").read_text())["history"] for d in ("full", "resumed")]
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]
    assert strip(history[0]) == strip(history[1])
    # The metric log of the resumed run holds each block once, with the same values.
    columns = ["updates", "loss/actor", "eval/score"]
    logs = [pd.read_csv(tmp_path / d / "metrics.csv")[columns] for d in ("full", "resumed")]
    pd.testing.assert_frame_equal(logs[0], logs[1])


def test_algorithm_from_a_file_outside_the_repo(tiny_hopper, tmp_path, monkeypatch):
    (tmp_path / "my_algo.py").write_text(textwrap.dedent("""
        import torch
        from offbench.module import OfflineRLModule

        class MeanAction(OfflineRLModule):
            def __init__(self, obs_dim: int, act_dim: int, max_action: float = 1.0, lr: float = 0.1):
                super().__init__()
                self.save_hyperparameters()
                self.mean = torch.nn.Parameter(torch.zeros(act_dim))

            def configure_optimizers(self):
                self.opt = torch.optim.SGD([self.mean], lr=self.hparams.lr)
                return self.opt

            def update(self, batch):
                loss = (self.mean - batch.act).pow(2).mean()
                self.optimize(self.opt, loss)
                return {"loss/actor": loss}

            @torch.no_grad()
            def act(self, obs):
                return self.mean.expand(len(obs), -1)
    """))
    monkeypatch.chdir(tmp_path)
    main(fit_args(tiny_hopper, tmp_path / "run", "--model", "my_algo.MeanAction"))
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert result["algorithm"] == "my_algo.MeanAction"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--updates", "0"], "--updates must be a positive number"),
        (["--updates", "-5"], "--updates must be a positive number"),
        (["--updates", "250"], "not a multiple of --data.eval_every 100"),
        (["--data.batch_size", "0"], "data.batch_size must be a positive"),
        (["--data.eval_every", "-1"], "data.eval_every must be a positive"),
        (["--model.init_args.learning_rate", "0.1"], "learning_rate"),
        (["--data.shuffle", "true"], "shuffle"),
        (["--data.env_id", "HalfCheetah-v4"], "'observations' are 11-dim but the evaluation env HalfCheetah-v4 gives 17-dim"),
        (["--data.dataset", "hopper-medum-v2"], "hopper-medium-v2"),
    ],
)
def test_bad_input_fails_before_training(tiny_hopper, tmp_path, capsys, extra, message):
    try:  # a user error: status 2, from main (offbench's own checks) or from the argument parser
        code = main(fit_args(tiny_hopper, tmp_path / "run", *extra))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run/checkpoints").exists()


def test_refuses_to_overwrite_a_finished_or_interrupted_run(tiny_hopper, tmp_path, capsys):
    root = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(fit_args(tiny_hopper, root, "--trainer.callbacks+=tests.test_fit.StopMidEpoch"))
    assert main(fit_args(tiny_hopper, root)) == 2
    assert re.search("interrupted run.*--ckpt_path last", capsys.readouterr().err)
    main(fit_args(tiny_hopper, root, "--ckpt_path", "last"))
    assert main(fit_args(tiny_hopper, root)) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_fit_on_a_d4rl_name_and_a_minari_id_with_the_data_where_the_real_data_goes(tiny_hopper, tmp_path, monkeypatch):
    """No download here: a D4RL file and a Minari dataset made by the suite are put where the real
    ones would be, and `offbench fit` finds them by name."""
    from offbench.data.synthetic import write_random_dataset

    d4rl_dir = tmp_path / "d4rl"
    d4rl_dir.mkdir()
    (d4rl_dir / "hopper_medium-v2.hdf5").write_bytes(tiny_hopper.read_bytes())
    monkeypatch.setenv("OFFBENCH_D4RL_DIR", str(d4rl_dir))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    write_random_dataset("Hopper-v5", tmp_path / "unused.hdf5", episodes=5, seed=1, minari_id="mujoco/hopper/medium-v0")
    for name in ("hopper-medium-v2", "mujoco/hopper/medium-v0"):
        root = tmp_path / name.replace("/", "_")
        main(fit_args(tiny_hopper, root, "--data.dataset", name, "--updates", "100"))
        result = json.loads((root / "result.json").read_text())
        assert result["dataset"] == name and result["updates"] == 100


BROKEN = {  # an out-of-tree algorithm that breaks one rule of the contract -> the error it gets
    "loss as a float": ('return {"loss/actor": loss.item()}', "returned loss/actor=", "return self.opt"),
    "optimiser not kept": ('return {"loss/actor": loss}', "returned other optimisers", "return torch.optim.SGD([self.mean], lr=0.1)"),
    "no optimiser returned": ('return {"loss/actor": loss}', "configure_optimizers returned None", "pass"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_contract_breaks_fail_with_a_message_naming_the_contract(case, tiny_hopper, tmp_path, monkeypatch, capsys):
    returned, message, optimizers = BROKEN[case]
    module = f"broken_algo_{list(BROKEN).index(case)}"  # one module name per case: imports are cached
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        import torch
        from offbench.module import OfflineRLModule

        class Broken(OfflineRLModule):
            def __init__(self, obs_dim: int, act_dim: int, max_action: float = 1.0):
                super().__init__()
                self.mean = torch.nn.Parameter(torch.zeros(act_dim))

            def configure_optimizers(self):
                self.opt = torch.optim.SGD([self.mean], lr=0.1)
                {optimizers}

            def update(self, batch):
                loss = (self.mean - batch.act).pow(2).mean()
                self.optimize(self.opt, loss)
                {returned}

            @torch.no_grad()
            def act(self, obs):
                return self.mean.expand(len(obs), -1)
    """))
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(tiny_hopper, tmp_path / "run", "--model", f"{module}.Broken")) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert message in err and "contract in offbench/module.py" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("config", "extra", "message"),
    [
        (BC_CONFIG, ["--model.init_args.lr", "0.01"], "`lr` (in the command line) is now called `actor_lr`: --model.init_args.actor_lr 0.01"),
        (str(REPO / "configs/algorithms/td3bc.yaml"), ["--model.init_args.policy_freq=3"], "is now called `policy_every`"),
        (str(REPO / "configs/algorithms/diffcps.yaml"), ["--model.init_args.hidden", "64"], "now a list of layer widths, e.g. [64, 64, 64]"),
    ],
)
def test_old_config_keys_fail_with_the_new_name(config, extra, message, tiny_hopper, tmp_path, capsys):
    args = fit_args(tiny_hopper, tmp_path / "run", *extra)
    args[2] = config
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_old_config_key_in_a_config_file(tiny_hopper, tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    lr: 0.001\n")
    assert main(fit_args(tiny_hopper, tmp_path / "run", "--config", str(old))) == 2
    assert f"`lr` (in {old}:3) is now called `actor_lr`" in capsys.readouterr().err
