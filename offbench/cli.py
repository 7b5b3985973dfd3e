"""The `offbench` command: a small dispatcher.

    offbench fit --config configs/algorithms/bc.yaml --data.dataset synthetic/hopper-random-v0
    offbench fit ... --compile true        # the update through torch.compile (CUDA graphs on CUDA)
    offbench fit ... --logger wandb        # W&B beside the CSV log (offline unless --wandb.mode online)
    offbench data synth|info ...

`fit` goes to LightningCLI (model by class path, DataModule arguments, Trainer arguments, one run
directory per run); the other commands are plain functions with their own arguments.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import Checkpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from offbench.data.datamodule import OfflineDataModule
from offbench.evaluation import EvalCallback
from offbench.module import OfflineRLModule
from offbench.wandb_logging import WandbOptions, require_wandb

USAGE = """usage: offbench COMMAND ...

commands:
  fit     train one algorithm on one dataset (LightningCLI: offbench fit --help)
  data    make or inspect datasets (offbench data --help)
  perf    measure training and evaluation throughput (offbench perf --help)
  bench   run a grid of algorithm x dataset x seed cells, resumable (offbench bench --help)
  table   tables and learning curves of a results directory (offbench table --help)
  toy     the DiffCPS toy bandit: train, sample, figure and score table (offbench toy --help)
"""


def epochs_for(updates: int, eval_every: int) -> int:
    """Lightning epochs for a run of `updates` updates, one epoch per evaluation interval."""
    if updates is None or updates <= 0:
        raise ValueError(f"--updates must be a positive number of gradient updates, got {updates}")
    if updates % eval_every:
        raise ValueError(
            f"--updates {updates} is not a multiple of --data.eval_every {eval_every}: every run ends on an "
            f"evaluation, so choose e.g. --updates {max(1, round(updates / eval_every)) * eval_every}"
        )
    return updates // eval_every


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


class OffbenchCLI(LightningCLI):
    """LightningCLI with the suite's conventions: total `--updates`, data dims linked into the model,
    evaluation callback arguments under `eval.`, and a run directory holding everything of a run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--updates", type=int, required=True, help="total gradient updates (multiple of data.eval_every)")
        parser.add_argument(
            "--compile", type=bool, default=False,
            help="run the update through torch.compile (CUDA graphs on CUDA): OfflineRLModule.enable_compile",
        )
        parser.add_lightning_class_args(EvalCallback, "eval")
        parser.add_argument(
            "--logger", type=Literal["csv", "wandb"], default="csv",
            help="csv: metrics.csv (and TensorBoard when installed) in the run directory; wandb: also a W&B run "
            "(options under --wandb.*; pip install 'offbench[wandb]')",
        )
        parser.add_class_arguments(WandbOptions, "wandb", instantiate=False)
        parser.link_arguments(("updates", "data.eval_every"), "trainer.max_epochs", compute_fn=epochs_for, apply_on="parse")
        for name in ("obs_dim", "act_dim", "max_action"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        if trainer.default_root_dir is None:
            algo = config.model.class_path.rsplit(".", 1)[-1].lower()
            trainer.default_root_dir = str(Path("runs") / algo / _slug(config.data.dataset) / f"seed{config.seed_everything}")
        root = Path(trainer.default_root_dir)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(_last_checkpoint(root))
        _check_logger(config)
        self.resumed_updates = None
        if config.get("ckpt_path") is None:
            _check_run_dir(root)
        else:
            checkpoint = torch.load(config.ckpt_path, map_location="cpu", weights_only=False)
            self.resumed_updates = int(checkpoint["state_dict"]["updates"])

    def before_fit(self) -> None:
        self.model.compile_update = bool(self._get(self.config_init, "compile", default=False))

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self._get(self.config_init, "trainer", default={})
        root = trainer_config["default_root_dir"]
        if trainer_config.get("logger") in (None, True):
            # name="" and version="" keep metrics in the run directory itself, so a resume appends.
            loggers: list[Logger] = [RunCSVLogger(root, self.resumed_updates)]
            if importlib.util.find_spec("tensorboard") is not None:
                loggers.append(TensorBoardLogger(root, name="", version="", default_hp_metric=False))
            if self.config[self.subcommand].logger == "wandb":
                loggers.append(_wandb_logger(self.config[self.subcommand], root, self.resumed_updates is not None))
            kwargs["logger"] = loggers
        callbacks = [*(trainer_config.get("callbacks") or []), LastCheckpoint(Path(root) / "checkpoints")]
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.append(RichProgressBar())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def _check_logger(config: Any) -> None:
    """`--logger wandb` adds W&B beside the suite's CSV log; it needs wandb and the default loggers."""
    if config.logger != "wandb":
        return
    require_wandb("--logger wandb")
    if config.trainer.logger not in (None, True):
        raise SystemExit(
            "error: --logger wandb adds W&B beside the run directory's CSV log, but --trainer.logger replaces the "
            "loggers: use one of them."
        )


def _wandb_logger(config: Any, root: str, resumed: bool) -> Logger:
    from offbench.wandb_logging import RunWandbLogger

    algo = config.model.class_path.rsplit(".", 1)[-1].lower()
    name = f"{algo}/{config.data.dataset}/seed{config.seed_everything}"
    resolved = json.loads(json.dumps(config.as_dict(), default=str))  # the whole resolved config, JSON-safe
    return RunWandbLogger(root, WandbOptions(**config.wandb.as_dict()), name, resolved, resumed)


class LastCheckpoint(Checkpoint):
    """Writes `last.ckpt` at every epoch end (= after every evaluation), atomically.

    Lightning's ModelCheckpoint deduplicates saves by `global_step`, which stays 0 here because the
    algorithms step their own optimisers; the update count lives in the module instead."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()  # the metric log on disk reaches at least as far as the checkpoint
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial = self.dirpath / "last.ckpt.part"
        trainer.save_checkpoint(partial)
        os.replace(partial, self.dirpath / "last.ckpt")  # a crash mid-write never leaves a broken last.ckpt


def _last_checkpoint(root: Path) -> Path:
    path = root / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise SystemExit(
            f"error: --ckpt_path last, but {path} does not exist: nothing to resume in {root}. "
            "Check --trainer.default_root_dir and --seed_everything (they name the run directory)."
        )
    return path


class RunCSVLogger(CSVLogger):
    """metrics.csv in the run directory itself. On resume it keeps the rows logged up to the
    checkpoint and drops later ones (they are logged again); Lightning's CSVLogger would delete
    the whole file when its writer starts."""

    def __init__(self, root: str, resumed_updates: int | None) -> None:
        super().__init__(root, name="", version="")
        self.resumed_updates = resumed_updates

    @property
    def experiment(self):
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            kept = pd.read_csv(path) if self.resumed_updates is not None and path.exists() else None
            writer = super().experiment
            if kept is not None:
                later = pd.Series(False, index=kept.index)
                for column in ("updates", "eval/updates"):
                    if column in kept:
                        later |= kept[column] > self.resumed_updates
                kept = kept[~later]
                kept.to_csv(path, index=False)
                writer.metrics_keys = list(kept.columns)
        return self._experiment


def _check_run_dir(root: Path) -> None:
    """Refuse to start a fresh run on top of an earlier one: nothing of a run is ever overwritten."""
    if (root / "result.json").exists():
        raise SystemExit(
            f"error: {root} already holds a finished run (result.json). Choose another "
            "--trainer.default_root_dir or --seed_everything, or delete that directory to run it again."
        )
    if (root / "checkpoints").exists() and any((root / "checkpoints").iterdir()):
        raise SystemExit(
            f"error: {root} holds an interrupted run. Continue it with --ckpt_path last, or delete the directory "
            "to start over."
        )


def fit_main(argv: list[str]) -> None:
    OffbenchCLI(
        OfflineRLModule,
        OfflineDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 1, "devices": 1},
        args=["fit", *argv],
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Algorithms are named by import path; let files in the working directory be found, as `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "fit":
        fit_main(rest)
        return 0
    if command == "data":
        from offbench.data.commands import main as data_main

        return data_main(rest)
    if command == "perf":
        from offbench.perf import main as perf_main

        return perf_main(rest)
    if command == "bench":
        from offbench.bench import main as bench_main

        return bench_main(rest)
    if command == "table":
        from offbench.tables import main as table_main

        return table_main(rest)
    if command == "toy":
        from offbench.toy import main as toy_main

        return toy_main(rest)
    print(f"offbench: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
