"""The forge's progress display: rich progress bars and log lines on stderr, or nothing (quiet)."""

from __future__ import annotations

from typing import Any


class _Progress:
    """Rich progress bars and log lines on stderr, or nothing (quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
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
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True, log_path=False),
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, description: str, total: int, completed: int = 0) -> Any:
        return self.bar.add_task(description, total=total, completed=completed, info="") if self.bar else None

    def update(self, task: Any, completed: int, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(task, completed=completed, info=info)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.log(message)
