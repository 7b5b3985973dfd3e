"""What a run shows on the screen: Lightning's notes a user cannot act on silenced, the progress bar
ending on the last score, the parameter summary without its FLOPs line."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar

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

