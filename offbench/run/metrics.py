"""Where a run's numbers are written: metrics.csv in the run directory, safe against a full disk and
continued (not rewritten) on resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from offbench.errors import UserError
from offbench.evaluation import EVAL_COLUMNS


class MetricsWriter(ExperimentWriter):
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
        super().log_metrics(metrics, step)  # the writer drops the `step` column (MetricsWriter.log_metrics)

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
            writer = self._experiment = MetricsWriter(log_dir=self.log_dir)  # as CSVLogger.experiment, safer
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


