"""File helpers shared by every writer of results, tables and manifests: a reader (a resumed grid,
a table, a person) never sees half a file, because each is written beside its place and renamed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: the file as it was stays
        from offbench.errors import UserError

        tmp.unlink(missing_ok=True)
        raise UserError(f"writing {path} failed ({e.strerror or e}): free space or make its folder writable, then run "
                        "again (the file as it was before is unchanged)") from e
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, **dumps_kwargs) + "\n")


def read_json(path: str | os.PathLike, fix: str = "restore it or delete it") -> Any:
    """The parsed file, or None when it does not exist; a UserError naming the file and `fix` (the way
    out) when it cannot be read or parsed (truncated by a crash or a full disk, edited by hand)."""
    from offbench.errors import UserError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}): {fix}") from e


RUN_LOCK = "run.lock"


class LockBusy(Exception):
    """Another process holds the lock; `pid` is its PID (0 when the lock file names none)."""

    def __init__(self, path: Path, pid: int) -> None:
        super().__init__(f"{path} is held by process {pid or '(unknown)'}")
        self.path, self.pid = path, pid


def take_lock(path: str | os.PathLike) -> int:
    """An exclusive fcntl.flock on `path` (created if absent; it then holds our PID) for as long as the
    returned file descriptor stays open: the OS releases it when the process ends, however it ends, so
    a killed holder never leaves a stale lock. Raises LockBusy when another process holds it, OSError
    when the file cannot be opened. The file stays after release (deleting it would race a newcomer)."""
    import fcntl

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(10):  # a prober (lock_holder) holds a shared lock for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        os.close(fd)
        raise LockBusy(path, lock_holder(path) or 0)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_holder(path: str | os.PathLike) -> int | None:
    """The PID of the live process holding the lock `path` (0 when it is held but names no PID), or
    None when nobody holds it. Probes with a shared, non-blocking flock, so it never waits."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_run_dir(run_dir: str | os.PathLike) -> int:
    """Take the exclusive lock of a run directory (`<run_dir>/run.lock`, see take_lock) for this
    process's lifetime. Returns the lock's file descriptor (keep it open); raises UserError naming the
    holder's PID when another process holds the lock."""
    from offbench.errors import UserError

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return take_lock(run_dir / RUN_LOCK)
    except LockBusy as busy:
        pid = busy.pid
        who = f"process {pid}" if pid else "another process"
        raise UserError(
            f"{run_dir} is in use by {who} (an `offbench fit` running into it): one run directory belongs to one "
            f"process at a time. Wait for it to end{f' or stop it (kill {pid})' if pid else ''}, or choose another "
            "--trainer.default_root_dir"
        ) from None
    except OSError as e:
        raise UserError(f"cannot write the run directory {run_dir} ({e.strerror}): choose a writable "
                        "--trainer.default_root_dir") from e


def run_dir_holder(run_dir: str | os.PathLike) -> int | None:
    """The PID of the live process holding `run_dir`'s lock (0 when it names no PID), or None."""
    return lock_holder(Path(run_dir) / RUN_LOCK)
