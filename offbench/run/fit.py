"""`offbench fit`: LightningCLI with the suite's conventions (offbench/run/ holds the rest of a run:
run directory, checkpoints, resume checks, metrics, screen)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from offbench.data.datamodule import OfflineDataModule
from offbench.errors import UserError
from offbench.evaluation import EvalCallback
from offbench.files import lock_run_dir
from offbench.grammar import require_device
from offbench.module import OfflineRLModule
from offbench.run.arguments import algorithms_help, fit_argv, renamed_message
from offbench.run.checkpoints import LastCheckpoint, check_networks_fit, last_evaluation, read_checkpoint
from offbench.run.lockstep import Lockstep, SeedFinished, fit_seeds, split_seeds
from offbench.run.metrics import RunCSVLogger
from offbench.run.resume import ApplyNewSettings, settings_changes
from offbench.run.run_dir import (
    HELD_LOCKS,
    algorithm_name,
    check_run_dir,
    check_writable,
    default_run_dir,
    last_checkpoint,
    remove_partial_files,
)
from offbench.run.screen import FinalScoreProgressBar, ParameterSummary, quiet_lightning
from offbench.settings import RENAMED as RENAMED_HPARAMS
from offbench.wandb_logging import WandbOptions, require_wandb


def budget_problem(updates: int | None, eval_every: int | None) -> str | None:
    """What is wrong with a run of `updates` updates evaluated every `eval_every`, or None."""
    if updates is None or updates <= 0:
        return f"--updates must be a positive number of gradient updates, got {updates}"
    if eval_every is None or eval_every <= 0:
        return f"--data.eval_every must be a positive number of updates between evaluations, got {eval_every}"
    if updates % eval_every:
        return (
            f"--updates {updates} is not a multiple of --data.eval_every {eval_every}: every run ends on an "
            f"evaluation, so choose e.g. --updates {max(1, round(updates / eval_every)) * eval_every}"
        )
    return None


def epochs_for(updates: int, eval_every: int) -> int:
    """Lightning epochs for a run of `updates` updates, one epoch per evaluation interval (a bad budget
    gives 1 here: it is refused as a UserError before anything is built, see before_instantiate_classes)."""
    if budget_problem(updates, eval_every):
        return 1
    return updates // eval_every


class OffbenchCLI(LightningCLI):
    """LightningCLI with the suite's conventions: total `--updates`, data dims linked into the model,
    evaluation callback arguments under `eval.`, and a run directory holding everything of a run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--updates", type=int, required=True, help="total gradient updates (multiple of data.eval_every)")
        parser.add_argument(
            "--compile", type=bool, default=False,
            help="run the update through torch.compile (CUDA graphs on CUDA): OfflineRLModule.enable_compile",
        )
        parser.add_argument(
            "--accept_changes", type=bool, default=False,
            help="when resuming (--ckpt_path): continue even though settings differ from the run's config.yaml; "
            "the new values apply from here on (learning rates are re-applied to the restored optimisers)",
        )
        parser.add_lightning_class_args(EvalCallback, "eval")
        parser.add_argument(
            "--logger", type=Literal["csv", "wandb"], default="csv",
            help="csv: metrics.csv (and TensorBoard when installed) in the run directory; wandb: also a W&B run "
            "(options under --wandb.*; pip install 'offbench[wandb]')",
        )
        parser.add_class_arguments(WandbOptions, "wandb", instantiate=False)
        parser.link_arguments(
            ("updates", "data.init_args.eval_every"), "trainer.max_epochs", compute_fn=epochs_for, apply_on="parse"
        )
        for name in ("obs_dim", "act_dim", "max_action"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        problem = budget_problem(config.updates, config.data.init_args.eval_every)
        if problem:
            raise UserError(problem)
        _check_logger(config)  # before the run directory is made
        require_device(str(config.trainer.accelerator), "--trainer.accelerator")  # Lightning's own message is a traceback
        trainer = config.trainer
        if trainer.default_root_dir is None:
            dataset = config.data.init_args.dataset  # data in subclass mode: --data.class_path picks the DataModule
            trainer.default_root_dir = str(default_run_dir(config.model.class_path, dataset, config.seed_everything))
        root = Path(trainer.default_root_dir)
        self.claim_run_dir(root)
        if config.get("ckpt_path") == "last":
            last_checkpoint(root)  # before the lock makes the directory: a mistyped one stays unmade
        HELD_LOCKS.append(lock_run_dir(root))  # one process per run directory, until this one ends
        remove_partial_files(root)  # left by a crash mid-write; nobody else writes here now
        check_writable(root / "checkpoints")  # before training, not at the first checkpoint
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(last_checkpoint(root))
        self.resumed_updates = None
        self.resumed_evaluation: dict[str, Any] | None = None
        self.checkpoint_shapes: dict[str, tuple[int, ...]] | None = None
        self.changes: list[str] = []
        if config.get("ckpt_path") is None:
            check_run_dir(root)
        else:
            checkpoint = read_checkpoint(Path(config.ckpt_path))
            self.resumed_updates = int(checkpoint["state_dict"]["updates"])
            self.resumed_evaluation = last_evaluation(checkpoint, self.resumed_updates)
            self.checkpoint_shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}
            self.changes = self._changed_settings(root, config, self.resumed_updates)
            if self.changes and not config.get("accept_changes"):
                raise UserError(
                    f"the settings differ from those of the run being resumed in {root} (its config.yaml):\n  "
                    + "\n  ".join(self.changes)
                    + "\nResume with the run's own settings, start a new run in another --trainer.default_root_dir, "
                    "or pass --accept_changes true to continue this run with the new values"
                )

    def claim_run_dir(self, root: Path) -> None:
        """Once the run directory is known, before anything reads or makes it: a run of several seeds (SeedCopyCLI)
        checks that no two share it and resumes each seed as far as it got."""

    def _changed_settings(self, root: Path, config: Any, resumed_updates: int) -> list[str]:
        """What differs between the run's config.yaml (the settings it ran with so far) and `config`."""
        path = root / "config.yaml"
        new = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_unset=False))
        changes = []
        if path.is_file():
            try:
                old = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise UserError(f"{path} is not readable YAML ({e}): restore it, or delete it to resume without "
                                "checking the settings against the run's") from e
            changes = settings_changes(old if isinstance(old, dict) else {}, new)
        if new["updates"] < resumed_updates and not any(c.startswith("updates:") for c in changes):
            changes.append(f"updates: {new['updates']} is less than the {resumed_updates} updates already done")
        return changes

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as e:  # the model and data are subclass types: show the class's own error
            cause: BaseException = e
            while str(cause).startswith("Does not validate against any of the Union subtypes") and cause.__cause__:
                cause = cause.__cause__
            old = re.search(r"got an unexpected keyword argument '(\w+)'", str(cause))
            new = RENAMED_HPARAMS.get(old.group(1)) if old else None
            if old and new:  # a subclass passing a setting under its old name to a built-in algorithm
                owner = self.config[self.subcommand].model.class_path
                raise UserError(renamed_message(owner, old.group(1), new, "its call of a built-in algorithm's __init__")) from e
            if cause is e:
                raise
            raise cause from None

    def before_fit(self) -> None:
        self.model.compile_update = bool(self._get(self.config_init, "compile", default=False))
        if self.checkpoint_shapes is not None:
            check_networks_fit(self.checkpoint_shapes, self.model, self.config_init[self.subcommand].ckpt_path)
        if self.changes:  # accepted: new observation statistics replace the checkpoint's
            self.datamodule.accept_changed_statistics = True

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self._get(self.config_init, "trainer", default={})
        root = trainer_config["default_root_dir"]
        if trainer_config.get("logger") in (None, True):
            # name="" and version="" keep metrics in the run directory itself, so a resume appends.
            loggers: list[Logger] = [RunCSVLogger(root, self.resumed_updates, self.resumed_evaluation)]
            if importlib.util.find_spec("tensorboard") is not None:
                loggers.append(TensorBoardLogger(root, name="", version="", default_hp_metric=False))
            if self.config[self.subcommand].logger == "wandb":
                loggers.append(_wandb_logger(self.config[self.subcommand], root, self.resumed_updates is not None))
            kwargs["logger"] = loggers
        ckpt_path = self._get(self.config_init, "ckpt_path")
        keep_previous = ckpt_path is None or Path(ckpt_path).name == "last.ckpt"
        callbacks = [*(trainer_config.get("callbacks") or []), LastCheckpoint(Path(root) / "checkpoints", keep_previous)]
        if self.changes:
            callbacks.append(ApplyNewSettings())
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.append(FinalScoreProgressBar())
        if trainer_config.get("enable_model_summary") is not False:
            callbacks.append(ParameterSummary())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def _check_logger(config: Any) -> None:
    """`--logger wandb` adds W&B beside the suite's CSV log; it needs wandb and the default loggers."""
    if config.logger != "wandb":
        return
    require_wandb("--logger wandb")
    if config.trainer.logger not in (None, True):
        raise UserError(
            "--logger wandb adds W&B beside the run directory's CSV log, but --trainer.logger replaces the "
            "loggers: use one of them."
        )


def _wandb_logger(config: Any, root: str, resumed: bool) -> Logger:
    from offbench.wandb_logging import RunWandbLogger

    algo = algorithm_name(config.model.class_path)
    name = f"{algo}/{config.data.init_args.dataset}/seed{config.seed_everything}"
    resolved = json.loads(json.dumps(config.as_dict(), default=str))  # the whole resolved config, JSON-safe
    return RunWandbLogger(root, WandbOptions(**config.wandb.as_dict()), name, resolved, resumed)


def fit_main(argv: list[str]) -> None:
    """`offbench fit ARGV`: the checks of offbench/run/arguments.py, then LightningCLI, whose own errors
    (a value of the wrong type, say) are one line too. With `--seeds 0,1,2`: every seed's run in this
    process, their updates one batched computation (offbench/run/lockstep.py)."""
    quiet_lightning()
    argv, seeds = split_seeds(argv)
    argv = fit_argv(argv)
    try:
        if seeds is None or "-h" in argv or "--help" in argv:
            run_cli(argv)
        else:
            fit_seeds(argv, seeds, lambda argv_k, lockstep, k: run_cli(argv_k, SeedCopyCLI, lockstep=lockstep, copy=k))
    finally:
        while HELD_LOCKS:  # the OS would release them at exit; a caller in the same process may fit again
            os.close(HELD_LOCKS.pop())


def run_cli(argv: list[str], cli: type[OffbenchCLI] | None = None, **kwargs: Any) -> None:
    """One run: `cli` (OffbenchCLI by default) on fit's arguments `argv`."""
    fit_parser: dict[str, Any] = {"exit_on_error": False}
    if "-h" in argv or "--help" in argv:
        fit_parser["description"] = algorithms_help()
    try:
        (cli or OffbenchCLI)(
            OfflineRLModule,
            OfflineDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,  # OfflineDataModule by default; a subclass by --data.class_path (offbench.pgd.PGDDataModule)
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"log_every_n_steps": 1, "devices": 1},
            parser_kwargs={"prog": "offbench", "exit_on_error": False, "formatter_class": HelpFormatter, "fit": fit_parser},
            auto_configure_optimizers=False,  # no --optimizer/--lr_scheduler: the algorithms own their optimisers
            args=["fit", *argv],
            **kwargs,
        )
    except argparse.ArgumentError as e:
        raise UserError(one_line(str(e))) from None


class SeedCopyCLI(OffbenchCLI):
    """Copy `copy` of a run of several seeds (`offbench fit --seeds`): the single-seed run, its updates routed
    through the Lockstep (offbench/run/lockstep.py); only the first copy shows a progress bar and summary."""

    def __init__(self, *args: Any, lockstep: Lockstep, copy: int, **kwargs: Any) -> None:
        self.lockstep, self.copy = lockstep, copy
        super().__init__(*args, **kwargs)

    def claim_run_dir(self, root: Path) -> None:
        """Also, when resuming (--ckpt_path last): a seed whose run finished is not trained again, and a seed without a
        checkpoint (it had not started, or not reached its first evaluation) starts from the beginning, each with a line."""
        self.lockstep.claim(self.copy, root)
        config = self.config[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        seed = config.seed_everything
        if (root / "result.json").exists():
            raise SeedFinished(f"seed {seed}: {root} holds its finished run (result.json): not trained again")
        if not (root / "checkpoints" / "last.ckpt").exists():
            print(f"seed {seed}: no checkpoint in {root}: it starts from the beginning", file=sys.stderr)
            config.ckpt_path = None

    def instantiate_trainer(self, **kwargs: Any):
        if self.copy > 0:  # one progress bar for all: the runs move in step (config.yaml keeps the settings given)
            trainer_config = self._get(self.config_init, "trainer")
            trainer_config["enable_progress_bar"] = trainer_config["enable_model_summary"] = False
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        super().before_fit()
        self.lockstep.attach(self.copy, self.model)


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's table of algorithms kept as it is written."""


def one_line(message: str) -> str:
    """A jsonargparse error in one line: the innermost key and its complaint (a class's own, where it is
    wrapped in a Union's), e.g. `--model.init_args.actor_lr (algorithms.bc.BC): expected type float, got abc`."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys, owner = [], ""
    for line in lines:
        key = re.fullmatch(r'Parser key "([^"]+)":?(.*)', line)
        wrapped = re.fullmatch(r"- Problem with given class_path '([^']+)':", line)
        if key:
            keys.append(key.group(1))
            if key.group(2).strip():
                lines = [key.group(2).strip()]
                break
        elif wrapped:
            owner = f" ({wrapped.group(1)})"
        elif keys and not line.startswith(("Does not validate", "Subtypes:", "Errors:")):
            lines = [line]
            break
    if len(keys) > 1 and keys[0] == "model":
        keys.insert(1, "init_args")
    problem = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"expected type \1, got \2", lines[0])
    where = f"--{'.'.join(keys)}{owner}: " if keys else ""
    return f"{where}{problem} (offbench fit --help lists the options)"
