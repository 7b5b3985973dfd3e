"""The forge's progress display on stderr: rich progress bars on a terminal, plain lines elsewhere
(a CI log, `2> log`, nohup: rich would show nothing there until the end), or nothing (quiet)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

# Not a terminal: a line per task at its start, then whenever it has moved on by this fraction of its
# total or this many seconds have passed since its last line, and at its end.
LINE_EVERY_FRACTION = 0.1
LINE_EVERY_SECONDS = 30.0


@dataclass
class _Task:
    description: str
    total: int
    first: int  # completed when the task began in this process (a resumed task starts part-way)
    started: float
    printed: int
    printed_at: float


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class _Progress:
    """Progress of long steps (SAC, rollouts, the PGD model) and log lines on `stream` (stderr): rich
    bars when it is a terminal, plain lines such as `PGD model 3000/20000 (15%) 0:00:50 elapsed, ~0:04:43
    left, loss 0.28` otherwise, nothing when not `enabled`."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.tasks: list[_Task] = []
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description:<14}"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream, log_path=False),
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, description: str, total: int, completed: int = 0) -> Any:
        if self.bar is not None:
            return self.bar.add_task(description, total=total, completed=completed, info="")
        if not self.enabled:
            return None
        now = time.monotonic()
        self.tasks.append(_Task(description, total, completed, now, completed, now))
        self._line(self.tasks[-1], completed, "")
        return len(self.tasks) - 1

    def update(self, task: Any, completed: int, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(task, completed=completed, info=info)
        elif self.enabled:
            t = self.tasks[task]
            if (completed >= t.total or completed - t.printed >= LINE_EVERY_FRACTION * t.total
                    or time.monotonic() - t.printed_at >= LINE_EVERY_SECONDS):
                self._line(t, completed, info)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.log(message)
        elif self.enabled:
            from rich.text import Text

            print(Text.from_markup(message).plain, file=self.stream, flush=True)

    def _line(self, t: _Task, completed: int, info: str) -> None:
        now = time.monotonic()
        elapsed = now - t.started
        line = f"{t.description} {completed}/{t.total} ({100 * completed / max(t.total, 1):.0f}%) {_hms(elapsed)} elapsed"
        if t.first < completed < t.total:
            line += f", ~{_hms(elapsed * (t.total - completed) / (completed - t.first))} left"
        print(f"{line}, {info}" if info else line, file=self.stream, flush=True)
        t.printed, t.printed_at = completed, now
