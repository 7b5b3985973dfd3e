"""The run directory: one per run (runs/<algo>/<dataset>/seed<N> by default), one process at a time,
never overwritten; partial files of a crashed write removed under its lock."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from offbench.errors import UserError

HELD_LOCKS: list[int] = []  # run-directory locks of this process's fits (files.lock_run_dir), released by fit_main


def slug(text: str) -> str:
    """`text` as one path component (a dataset name such as d4rl/hopper/medium-v2 -> d4rl-hopper-medium-v2)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def algorithm_name(class_path: str) -> str:
    """An algorithm's name in run directories: its module's name where that is its class's name (as the
    grids name it: algorithms.diffusion_ql.DiffusionQL -> diffusion_ql), else the class's name in lower case."""
    module, _, name = class_path.rpartition(".")
    module = module.rpartition(".")[2]
    return module if module.replace("_", "") == name.lower() else name.lower()


def default_run_dir(class_path: str, dataset: str, seed: int) -> Path:
    """runs/<algorithm>/<dataset>/seed<N>. A run begun under the name used before (the class's name in
    lower case: runs/diffusionql/) is still found there, with a one-line warning, until it is moved."""
    run_dir = Path("runs") / algorithm_name(class_path) / slug(dataset) / f"seed{seed}"
    old = Path("runs") / class_path.rpartition(".")[2].lower() / slug(dataset) / f"seed{seed}"
    if old != run_dir and old.is_dir() and not run_dir.exists():
        print(f"warning: {old} has the old name of {run_dir}: using it; move it there (mv {old} {run_dir}), the old "
              "name is not looked up after the next release", file=sys.stderr)
        return old
    return run_dir


def remove_partial_files(root: Path) -> None:
    """Partial files of a crashed write (a checkpoint's `*.part`, an atomic write's `*.tmp<pid>`) hold
    nothing usable; they are removed under the run directory's lock."""
    for path in [*(root / "checkpoints").glob("*.part"), *root.glob("*.tmp[0-9]*")]:
        path.unlink(missing_ok=True)


def last_checkpoint(root: Path) -> Path:
    path = root / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise UserError(
            f"--ckpt_path last, but {path} does not exist: nothing to resume in {root}. "
            "Check --trainer.default_root_dir and --seed_everything (they name the run directory)."
        )
    return path


def check_run_dir(root: Path) -> None:
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




def check_writable(folder: Path) -> None:
    """A UserError naming `folder` when a file cannot be made in it (read-only, not a folder, a full disk):
    found before training, not when the first checkpoint is due."""
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=folder if folder.exists() else folder.parent):  # made at the first checkpoint
            pass
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or e}): make it a writable folder (or free space), or "
                        "choose another run directory with --trainer.default_root_dir") from e
