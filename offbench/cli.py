"""The `offbench` command: a small dispatcher.

    offbench fit --config configs/algorithms/bc.yaml --data.dataset synthetic/hopper-random-v0
    offbench fit ... --compile true        # the update through torch.compile (CUDA graphs on CUDA)
    offbench fit ... --logger wandb        # W&B beside the CSV log (offline unless --wandb.mode online)
    offbench data synth|info ...

`fit` goes to LightningCLI (model by class path, DataModule arguments, Trainer arguments, one run
directory per run); the other commands are plain functions with their own arguments.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import pandas as pd
import torch
import yaml
from lightning.pytorch.callbacks import Checkpoint, ModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from offbench.data.datamodule import OfflineDataModule
from offbench.errors import UserError
from offbench.evaluation import EVAL_COLUMNS, EvalCallback
from offbench.files import lock_run_dir
from offbench.module import OfflineRLModule
from offbench.wandb_logging import WandbOptions, require_wandb

USAGE = """usage: offbench [--debug] COMMAND ...

commands:
  fit     train one algorithm on one dataset (LightningCLI: offbench fit --help)
  data    make or inspect datasets (offbench data --help)
  perf    measure training and evaluation throughput (offbench perf --help)
  bench   run a grid of algorithm x dataset x seed cells, resumable (offbench bench --help)
  table   tables and learning curves of a results directory (offbench table --help)
  toy     the DiffCPS toy bandit: train, sample, figure and score table (offbench toy --help)
  gpu-check  CUDA tests and measurements in one go, report in results/perf/perf-cuda.md (offbench gpu-check --help)

A user error (bad argument, data or file) prints one message and exits with status 2; --debug (or
OFFBENCH_DEBUG=1) shows its traceback too.
"""

# Messages every `fit` printed that a user cannot act on, silenced by their exact text (nothing else):
# LightningCLI's note on `args` (the dispatcher passes argv on purpose), Lightning's pytree deprecation
# (its own code, torch 2.13), its notes on `weights_only` and on its logging service, the CSV
# logger's note on a non-empty run directory (it always holds run.lock; RunCSVLogger keeps the rows), and
# its note that a model summary callback is given (ParameterSummary, on purpose).
_QUIET_WARNINGS = (
    r"LightningCLI's args parameter is intended to run from within Python",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Experiment logs directory .* exists and is not empty\. Previous log files in this directory will be deleted",
)
_QUIET_LOGS = ("`weights_only` was not set, defaulting to", "💡 Tip: For seamless cloud logging",
               "Trainer already configured with model summary callbacks")


class _QuietLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(quiet) for quiet in _QUIET_LOGS)


def quiet_lightning() -> None:
    """Silence the messages of _QUIET_WARNINGS and _QUIET_LOGS (matched by their text)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.trainer.connectors.checkpoint_connector", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLogs) for f in logger.filters):
            logger.addFilter(_QuietLogs())


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
        trainer = config.trainer
        if trainer.default_root_dir is None:
            algo = config.model.class_path.rsplit(".", 1)[-1].lower()
            dataset = config.data.init_args.dataset  # data in subclass mode: --data.class_path picks the DataModule
            trainer.default_root_dir = str(Path("runs") / algo / _slug(dataset) / f"seed{config.seed_everything}")
        root = Path(trainer.default_root_dir)
        if config.get("ckpt_path") == "last":
            _last_checkpoint(root)  # before the lock makes the directory: a mistyped one stays unmade
        _HELD_LOCKS.append(lock_run_dir(root))  # one process per run directory, until this one ends
        _remove_partial_files(root)  # left by a crash mid-write; nobody else writes here now
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(_last_checkpoint(root))
        self.resumed_updates = None
        self.resumed_evaluation: dict[str, Any] | None = None
        self.checkpoint_shapes: dict[str, tuple[int, ...]] | None = None
        self.changes: list[str] = []
        if config.get("ckpt_path") is None:
            _check_run_dir(root)
        else:
            checkpoint = read_checkpoint(Path(config.ckpt_path))
            self.resumed_updates = int(checkpoint["state_dict"]["updates"])
            self.resumed_evaluation = _last_evaluation(checkpoint, self.resumed_updates)
            self.checkpoint_shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}
            self.changes = self._changed_settings(root, config, self.resumed_updates)
            if self.changes and not config.get("accept_changes"):
                raise UserError(
                    f"the settings differ from those of the run being resumed in {root} (its config.yaml):\n  "
                    + "\n  ".join(self.changes)
                    + "\nResume with the run's own settings, start a new run in another --trainer.default_root_dir, "
                    "or pass --accept_changes true to continue this run with the new values"
                )

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
        except ValueError as e:  # the model and data are subclass types: show the class's own error, not the wrapper
            cause: BaseException = e
            while str(cause).startswith("Does not validate against any of the Union subtypes") and cause.__cause__:
                cause = cause.__cause__
            if cause is e:
                raise
            raise cause from None

    def before_fit(self) -> None:
        self.model.compile_update = bool(self._get(self.config_init, "compile", default=False))
        if self.checkpoint_shapes is not None:
            _check_networks_fit(self.checkpoint_shapes, self.model, self.config_init[self.subcommand].ckpt_path)
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

    algo = config.model.class_path.rsplit(".", 1)[-1].lower()
    name = f"{algo}/{config.data.init_args.dataset}/seed{config.seed_everything}"
    resolved = json.loads(json.dumps(config.as_dict(), default=str))  # the whole resolved config, JSON-safe
    return RunWandbLogger(root, WandbOptions(**config.wandb.as_dict()), name, resolved, resumed)


class LastCheckpoint(Checkpoint):
    """Writes `last.ckpt` at every epoch end (= after every evaluation), atomically, and keeps the one
    before as `previous.ckpt` (a way back should `last.ckpt` ever be damaged).

    Lightning's ModelCheckpoint deduplicates saves by `global_step`, which stays 0 here because the
    algorithms step their own optimisers; the update count lives in the module instead.
    `keep_previous`: whether the `last.ckpt` found at the start may become `previous.ckpt` (not when
    this run was resumed from another file because `last.ckpt` was unreadable)."""

    def __init__(self, dirpath: Path, keep_previous: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.keep_previous = keep_previous

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()  # the metric log on disk reaches at least as far as the checkpoint
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial, last = self.dirpath / "last.ckpt.part", self.dirpath / "last.ckpt"
        try:
            trainer.save_checkpoint(partial, weights_only=False)
        except (OSError, RuntimeError) as e:  # a full disk shows as either, depending on where torch.save fails
            partial.unlink(missing_ok=True)
            kept = f"{last} still holds the last good checkpoint: free space, then resume with --ckpt_path last" \
                if last.exists() else "no checkpoint was written yet"
            raise UserError(f"writing the checkpoint {partial} failed ({e}); {kept}") from e
        if last.exists() and self.keep_previous:
            link = self.dirpath / "previous.ckpt.part"
            link.unlink(missing_ok=True)
            try:
                os.link(last, link)  # no copy: previous.ckpt keeps the old file when last.ckpt is replaced
                os.replace(link, self.dirpath / "previous.ckpt")
            except OSError:  # a filesystem without hard links: no way back, but nothing lost either
                link.unlink(missing_ok=True)
        os.replace(partial, last)  # a crash mid-write never leaves a broken last.ckpt
        self.keep_previous = True


class FinalScoreProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing the last evaluation's score when the run ends: the bar reads
    its metrics in on_train_epoch_end, before Lightning adds that epoch's evaluation (logged on_epoch) to
    them, so the finished bar showed the evaluation before the last one."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_metrics(trainer, pl_module)
        self.refresh()


class ParameterSummary(ModelSummary):
    """Lightning's model summary (layers and parameter counts) without its FLOPs column and "Total FLOPs"
    line: Lightning counts FLOPs on a module's `example_input_array`, which the algorithms do not define,
    so it printed 0 on every run."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        try:  # Lightning's own table formatter (private: bounded by pyproject's lightning<2.7; tests/test_fit.py checks it)
            from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
        except ImportError:  # another Lightning: its summary as it is, FLOPs line included (cosmetic only)
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                   total_training_modes, total_flops, **kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        lines = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + "\n".join(lines))


class ApplyNewSettings(pl.Callback):
    """On a resume with accepted changes (--accept_changes true): the optimisers' settings as the new
    arguments configured them (learning rate, betas, weight decay, ...) replace those restored from
    the checkpoint, whose optimiser states (moments, step counts) are kept. A learning-rate scheduler
    keeps its progress: the restored rate is rescaled to the new base rate."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimisers are configured from the new arguments here; the checkpoint's states come after.
        self.fresh = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer, groups in zip(trainer.optimizers, self.fresh):
            for group, fresh in zip(optimizer.param_groups, groups):
                for key, value in fresh.items():
                    if key not in ("lr", "initial_lr"):
                        group[key] = value
                new_base = float(fresh.get("initial_lr", fresh["lr"]))
                old_base = float(group.get("initial_lr", group["lr"]))
                if new_base != old_base:
                    scale = float(group["lr"]) / old_base if old_base else 1.0
                    group["lr"] = new_base * scale
                    if "initial_lr" in group:
                        group["initial_lr"] = new_base
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in config.scheduler.optimizer.param_groups]


# Settings that may change when a run is resumed: where and how it runs, not what it computes.
RESUME_FREE = ("trainer", "ckpt_path", "compile", "accept_changes", "config", "weights_only", "logger", "wandb")


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting of a run's config that differs (RESUME_FREE aside; `updates`
    may grow: that extends the run). A changed algorithm is one line, not one per argument."""
    flat_old = _flatten({k: v for k, v in old.items() if k not in RESUME_FREE})
    flat_new = _flatten({k: v for k, v in new.items() if k not in RESUME_FREE})
    algorithm_changed = flat_old.get("model.class_path") != flat_new.get("model.class_path")
    changes = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        before, after = flat_old.get(key, "(not set)"), flat_new.get(key, "(not set)")
        if before == after or (algorithm_changed and key.startswith("model.init_args.")):
            continue
        if key == "updates" and isinstance(before, int) and isinstance(after, int) and after > before:
            continue
        changes.append(f"{key}: {before} -> {after}")
    return changes


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, or a UserError naming it and the way back when it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint["state_dict"]["updates"]
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path} (--ckpt_path)") from None
    except Exception as e:  # torch.load reports a damaged file as RuntimeError, EOFError, UnpicklingError, ...
        previous = path.with_name("previous.ckpt")
        way = (
            f"the checkpoint before it is kept: resume from it with --ckpt_path {previous}"
            if previous.is_file() and previous != path
            else "no earlier checkpoint is kept here: delete the run directory and start again"
        )
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable ({reason}): it is probably truncated or damaged; {way}") from e
    return checkpoint


def _check_networks_fit(shapes: dict[str, tuple[int, ...]], model: torch.nn.Module, path: str) -> None:
    """A resumed model must have the checkpoint's tensors with their shapes: another algorithm or other
    network sizes cannot continue a run (their weights would not load)."""
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k}: {shapes[k]} in the checkpoint, {now[k]} now" for k in shapes.keys() & now.keys() if shapes[k] != now[k]]
    problems += [f"{k}: in the checkpoint only" for k in shapes.keys() - now.keys()]
    problems += [f"{k}: in the model only" for k in now.keys() - shapes.keys()]
    if problems:
        shown = "\n  ".join(sorted(problems)[:8]) + (f"\n  ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(
            f"the checkpoint {path} does not fit the model (the algorithm or its network sizes changed):\n  {shown}\n"
            "A run cannot continue with other networks: resume with the run's settings, or start a new run in "
            "another --trainer.default_root_dir"
        )


_HELD_LOCKS: list[int] = []  # run-directory locks of this process's fits (lock_run_dir)


def _remove_partial_files(root: Path) -> None:
    """Partial files of a crashed write (a checkpoint's `*.part`, an atomic write's `*.tmp<pid>`) hold
    nothing usable; they are removed under the run directory's lock."""
    for path in [*(root / "checkpoints").glob("*.part"), *root.glob("*.tmp[0-9]*")]:
        path.unlink(missing_ok=True)


def _last_checkpoint(root: Path) -> Path:
    path = root / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise UserError(
            f"--ckpt_path last, but {path} does not exist: nothing to resume in {root}. "
            "Check --trainer.default_root_dir and --seed_everything (they name the run directory)."
        )
    return path


class _MetricsWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, safe against a write cut short (a full disk): a new header
    rewrites the file atomically (Lightning truncates it first), and a failed append is cut back to
    the last whole row (or the file removed when it was new), so the file is always readable."""

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        # Here, not in the logger after the call: CSVLogger may write the rows out and empty the list first.
        self.metrics[-1].pop("step", None)

    def save(self) -> None:
        path = Path(self.metrics_file_path)
        self._existed = path.is_file()
        self._whole = path.stat().st_size if self._existed else 0
        try:
            super().save()
        except OSError:
            if self._existed:
                os.truncate(path, self._whole)
            else:
                path.unlink(missing_ok=True)
            raise

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._existed, self._whole = True, path.stat().st_size


class RunCSVLogger(CSVLogger):
    """metrics.csv in the run directory itself, with one counter column, `updates`, in every row (the
    training rows log it, the evaluation rows' `eval/updates` is written under it, as an integer; Lightning's `step`
    and `epoch` columns, which count nothing here, are left out). On resume it keeps the rows logged up
    to the checkpoint and drops later ones (they are logged again); Lightning's CSVLogger would delete
    the whole file when its writer starts. A failed write (a full disk) stops the run with one message;
    the file keeps its whole rows, which reach the last checkpoint (LastCheckpoint saves the log first)."""

    def __init__(self, root: str, resumed_updates: int | None, resumed_evaluation: dict[str, Any] | None = None) -> None:
        super().__init__(root, name="", version="")
        self.resumed_updates = resumed_updates
        self.resumed_evaluation = resumed_evaluation  # the checkpoint's last evaluation (EvalCallback.history)
        self.write_failed = False

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if "eval/updates" in metrics:
            metrics["updates"] = metrics.pop("eval/updates")
        if "updates" in metrics:  # a count, logged as a float by Lightning: written as 50, not 50.0
            metrics["updates"] = int(metrics["updates"])
        super().log_metrics(metrics, step)  # the writer drops the `step` column (_MetricsWriter.log_metrics)

    def log_hyperparams(self, params: Any = None) -> None:
        try:
            super().log_hyperparams(params)
        except OSError as e:
            raise self._failed(Path(self.log_dir) / ExperimentWriter.NAME_HPARAMS_FILE, e) from e

    def save(self) -> None:
        if self.write_failed:  # Lightning's clean-up after the error below saves again: nothing more to say
            return
        try:
            super().save()
        except OSError as e:
            raise self._failed(Path(self.experiment.metrics_file_path), e) from e

    def _failed(self, path: Path, error: OSError) -> UserError:
        self.write_failed = True
        last = Path(self.log_dir) / "checkpoints/last.ckpt"
        then = (f"continue the run with --ckpt_path last ({path.name} keeps its rows up to {last}; the later ones are "
                "logged again)") if last.exists() else "run the same command again (no checkpoint was written yet)"
        return UserError(f"writing {path} failed ({error.strerror or error}): free space or make {path.parent} "
                         f"writable, then {then}")

    @property
    def experiment(self):
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            kept = None
            if self.resumed_updates is not None and path.exists():
                try:
                    kept = pd.read_csv(path)
                except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                    raise UserError(
                        f"{path} is unreadable ({str(e).strip()}): repair it, or move it away to resume with a new "
                        f"metrics.csv (without the rows up to update {self.resumed_updates})"
                    ) from e
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer = self._experiment = _MetricsWriter(log_dir=self.log_dir)  # as CSVLogger.experiment, safer
            if kept is not None:
                later = pd.Series(False, index=kept.index)
                for column in ("updates", "eval/updates"):
                    if column in kept:
                        later |= kept[column] > self.resumed_updates
                kept = kept[~later]
                evaluated = kept["eval/score"].notna() & (kept["updates"] == self.resumed_updates) \
                    if {"eval/score", "updates"} <= set(kept.columns) else pd.Series(False, index=kept.index)
                if self.resumed_evaluation is not None and not evaluated.any():
                    # Lightning logs an evaluation after the checkpoint of its epoch is written: a run
                    # stopped in between (a crash, a full disk) lacks that row; the checkpoint holds it.
                    row = {f"eval/{k}": self.resumed_evaluation[k] for k in EVAL_COLUMNS if k in self.resumed_evaluation}
                    kept = pd.concat([kept, pd.DataFrame([{**row, "updates": self.resumed_updates}])], ignore_index=True)
                kept = kept[sorted(kept.columns)]  # the writer keeps its columns sorted, and appends in that order
                kept.to_csv(path, index=False)
                writer.metrics_keys = list(kept.columns)
        return self._experiment


def _last_evaluation(checkpoint: dict[str, Any], updates: int) -> dict[str, Any] | None:
    """The evaluation at `updates` in a checkpoint's EvalCallback history, or None."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and "history" in state:
            return next((dict(h) for h in state["history"] if h.get("updates") == updates), None)
    return None


def _check_run_dir(root: Path) -> None:
    """Refuse to start a fresh run on top of an earlier one: nothing of a run is ever overwritten."""
    if (root / "result.json").exists():
        raise UserError(
            f"{root} already holds a finished run (result.json). Choose another "
            "--trainer.default_root_dir or --seed_everything, or delete that directory to run it again."
        )
    if (root / "checkpoints").exists() and any((root / "checkpoints").iterdir()):
        raise UserError(
            f"{root} holds an interrupted run. Continue it with --ckpt_path last, or delete the directory "
            "to start over."
        )


# Hyperparameters renamed for one naming scheme (the contract in offbench/module.py): old name -> new.
RENAMED_KEYS = {"lr": "actor_lr", "policy_freq": "policy_every"}


def check_renamed_keys(argv: list[str]) -> None:
    """Refuse model settings under their old names (and `hidden` as one width) with the new form, before
    LightningCLI's generic 'not accepted' message: the model class is read from the command line or the
    configs, and a key counts as renamed only where that class lacks it and has the new name."""
    given: dict[str, tuple[Any, str]] = {}  # init_args key -> (value, where it was given)
    class_path = None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--config" and value and Path(value).is_file():
            try:
                config = yaml.safe_load(Path(value).read_text()) or {}
            except yaml.YAMLError:
                continue  # LightningCLI reports it
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict):
                class_path = model.get("class_path", class_path)
                for key, v in (model.get("init_args") or {}).items():
                    given[key] = (v, value)
        elif arg in ("--model", "--model.class_path") and value:
            class_path = value
        elif arg.startswith("--model.init_args."):
            key, _, inline = arg.removeprefix("--model.init_args.").partition("=")
            given[key] = (yaml.safe_load(inline) if inline else (yaml.safe_load(value) if value else None), "the command line")
    if not class_path or "." not in class_path:
        return
    module_name, _, name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module_name), name)).parameters
    except Exception:  # noqa: BLE001 - an unknown class is LightningCLI's to report
        return
    for key, (value, where) in given.items():
        new = RENAMED_KEYS.get(key)
        if new and key not in params and new in params:
            raise UserError(f"{class_path}: `{key}` (in {where}) is now called `{new}`: --model.init_args.{new} {value}")
        hidden = params.get("hidden")
        if key == "hidden" and isinstance(value, int) and hidden is not None and "tuple" in str(hidden.annotation):
            raise UserError(
                f"{class_path}: `hidden` (in {where}) is now a list of layer widths, e.g. [{value}, {value}, {value}] "
                "for three layers of that width"
            )


def fit_main(argv: list[str]) -> None:
    quiet_lightning()
    check_renamed_keys(argv)
    try:
        OffbenchCLI(
            OfflineRLModule,
            OfflineDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,  # OfflineDataModule by default; a subclass by --data.class_path (offbench.pgd.PGDDataModule)
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"log_every_n_steps": 1, "devices": 1},
            args=["fit", *argv],
        )
    finally:
        while _HELD_LOCKS:  # the OS would release them at exit; a caller in the same process may fit again
            os.close(_HELD_LOCKS.pop())


def main(argv: list[str] | None = None) -> int:
    """Run an `offbench` command; a UserError becomes one message on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OFFBENCH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"offbench: error: {e}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
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
    if command == "gpu-check":
        from offbench.gpu_check import main as gpu_check_main

        return gpu_check_main(rest)
    if command == "toy":
        from offbench.toy import main as toy_main

        return toy_main(rest)
    print(f"offbench: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
