"""The grid's live progress display: per running cell its updates, rate, elapsed time and ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from offbench.bench.cells import Running, _updates_done
from offbench.bench.grid import Grid


@dataclass
class GridReport:
    """What became of a grid's cells in one run_grid call (shown live by _render, returned at the end)."""

    finished: list[str] = field(default_factory=list)  # cells that finished in this run
    skipped: list[str] = field(default_factory=list)  # cells already finished before this run
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    launched: list[str] = field(default_factory=list)
    interrupted: bool = False
    busy: dict[str, int] = field(default_factory=dict)  # cells another process runs (its PID; 0: unknown)
    stale: dict[str, str] = field(default_factory=dict)  # cells run with other arguments: how they differ



def _poll_progress(r: Running) -> None:
    if r.started is None:
        return
    for cell in r.cells:
        updates = _updates_done(cell.run_dir)
        if updates is None:
            continue
        first = r.first_updates.get(cell.id)
        if first is None or updates < first[1]:
            r.first_updates[cell.id] = (time.monotonic(), updates)
        r.updates[cell.id] = updates


def _render(grid: Grid, report: GridReport, running: list[Running], waiting: int, elapsed: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    total = len(grid.cells)
    summary = Text.assemble(
        (f"{grid.name} ", "bold"),
        f"{len(report.finished) + len(report.skipped)}/{total} done ",
        (f"({len(report.skipped)} skipped) ", "dim"),
        (f"{sum(len(r.cells) for r in running)} running ", "cyan"),
        (f"{len(report.failed)} failed ", "red" if report.failed else "dim"),
        f"{waiting} waiting, elapsed {_hms(elapsed)}",
    )
    if not running:
        return summary
    nodes = any(r.node for r in running)
    table = Table(box=None, pad_edge=False)
    for column in ("cell", "updates", "updates/s", "elapsed", "ETA", "gpu", *(("node",) if nodes else ())):
        table.add_column(column, justify="left" if column in ("cell", "node") else "right")
    for r, cell in [(process, cell) for process in running for cell in process.cells]:  # a row per cell
        now = time.monotonic()
        rate = eta = None
        first, updates = r.first_updates.get(cell.id), r.updates.get(cell.id)
        if first is not None and updates is not None and now > first[0] + 1:
            rate = (updates - first[1]) / (now - first[0])
            eta = (cell.updates - updates) / rate if rate > 0 else None
        table.add_row(
            cell.id + (" (resumed)" if r.state == "resume" else ""),
            f"{updates or 0}/{cell.updates}",
            f"{rate:.0f}" if rate else "-",
            _hms(now - r.started),
            _hms(eta) if eta is not None else "-",
            "-" if r.gpu is None else str(r.gpu),
            *((r.node or "-",) if nodes else ()),
        )
    return Group(summary, table)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
