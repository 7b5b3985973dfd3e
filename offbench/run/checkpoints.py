"""A run's checkpoints: written atomically at every evaluation (the one before kept), read back with
a message naming the way back when damaged, and checked against the model that resumes them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint

from offbench.errors import UserError


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
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            kept = f"{last} still holds the last good checkpoint: free space or make {self.dirpath} writable, then " \
                "resume with --ckpt_path last" if last.exists() else \
                f"no checkpoint was written yet: free space or make {self.dirpath} writable, then run again"
            raise UserError(f"writing the checkpoint {partial} failed ({reason}); {kept}") from e
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


def check_networks_fit(shapes: dict[str, tuple[int, ...]], model: torch.nn.Module, path: str) -> None:
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


def last_evaluation(checkpoint: dict[str, Any], updates: int) -> dict[str, Any] | None:
    """The evaluation at `updates` in a checkpoint's EvalCallback history, or None."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and "history" in state:
            return next((dict(h) for h in state["history"] if h.get("updates") == updates), None)
    return None
