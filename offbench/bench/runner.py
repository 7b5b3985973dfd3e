"""Running a grid: `run_grid` takes every unfinished cell through a launcher (local or Ray), keeps
the output's lock, `failures.json` and `grid.json`, reports on the way and writes the tables at the end."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

from offbench.bench.cells import (
    Cell,
    CellState,
    Running,
    _unreadable_result,
    cell_state,
    make_packs,
    set_aside,
    stale_arguments,
)
from offbench.bench.grid import Grid
from offbench.bench.local import _gpu_count, _poll_local, _start_local, _stop
from offbench.bench.progress import GridReport, _hms, _poll_progress, _render
from offbench.bench.ray import (
    RayOptions,
    _check_ray_options,
    _import_ray,
    _ray_connect,
    _ray_poll,
    _ray_start,
    _ray_stop,
)
from offbench.errors import UserError
from offbench.files import LockBusy, read_json, run_dir_holder, take_lock, write_json_atomic


def _prepare_datasets(datasets: list[str]) -> None:
    """Generate the suite's synthetic datasets once, here: cells running in parallel would otherwise
    all try to write the same file on first use. Forge the families of `small` forge presets that are
    not forged yet (a few minutes each; larger presets must be forged by hand, see the README)."""
    import torch

    from offbench.data.catalog import unforged_family
    from offbench.data.synthetic import ensure_synthetic
    from offbench.forge import forge, forge_config

    for name in datasets:
        if name.startswith("synthetic/"):
            ensure_synthetic(name.removeprefix("synthetic/"))
        family = unforged_family(name)
        if family is not None:
            print(f"forging {family.env_id} for {name} ({family.cost}) ...", flush=True)
            # One torch thread: the small SAC nets gain little from more, and OpenMP threads fighting
            # another busy process for the cores made updates 26x slower here (1.1 s instead of 43 ms).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                forge(forge_config(family.env_id, family.preset))
            finally:
                torch.set_num_threads(threads)


def run_grid(
    grid: Grid,
    workers: int | None = None,
    devices: Literal["auto", "cpu", "cuda"] = "auto",
    console: Any = None,
    tables: bool = True,
    ray_options: RayOptions | None = None,
    rerun_stale: bool = False,
    restart_damaged: bool = False,
) -> GridReport:
    """Run every unfinished cell of `grid`, then write the tables. A cell whose run another process holds
    is skipped; a stale cell (run with other arguments than the grid file's now) is reported and left
    alone, unless `rerun_stale`: then its run directory is set aside and it runs again. SIGTERM and SIGHUP
    stop the grid as Ctrl+C does (the running cells are stopped; a rerun resumes them). A process runs one cell,
    or up to a column's `seeds_per_process` seeds of one dataset in the same state (make_packs; `offbench fit
    --seeds`). Locally (no `ray_options`): subprocesses, at most `workers` (None: 1) at a time; GPUs (when used) go to the least-loaded device, so cells
    spread round-robin and several processes may share one GPU. On Ray: one Ray task per process, at most
    `workers` at a time (None: as many as the cluster's resources allow). `restart_damaged`: a cell whose
    last checkpoint is unreadable continues from the one before it, or starts again (restart_damaged_cell)."""
    from rich.console import Console

    console = console or Console()
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if ray_options is not None:
        _check_ray_options(ray_options, devices)  # and that Ray is installed, before anything is written
    gpus = _gpu_count(devices) if ray_options is None else 0
    workers = workers or (1 if ray_options is None else len(grid.cells))
    lock = _lock(grid.output)
    previous = _interrupt_on_termination()
    try:
        return _run(grid, workers, devices, gpus, ray_options, console, tables, rerun_stale, restart_damaged)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(lock)


def _interrupt_on_termination() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so that a runner stopped by `kill`
    or a closed terminal stops its cells and releases its lock as on Ctrl+C. Returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _lock(output: Path) -> int:
    """One runner per output directory: two would start the same cells in the same run directories.
    An exclusive flock on `<output>/bench.lock` (holding our PID), which the OS releases when this
    process ends, however it ends. Returns the lock's file descriptor: close it to release."""
    lock = output / "bench.lock"
    try:
        output.mkdir(parents=True, exist_ok=True)
        return take_lock(lock)
    except LockBusy as busy:
        stop = f" or stop it (kill {busy.pid}: its cells stop, and the next run resumes them)" if busy.pid else ""
        raise UserError(
            f"another `offbench bench` (process {busy.pid or 'unknown'}) is running a grid into {output}: one runner "
            f"per output folder. Wait for it to end{stop}, or give this grid another output"
        ) from None
    except OSError as e:
        raise UserError(f"cannot write the grid's output folder {output} ({e.strerror}): make it writable or give "
                        "the grid another output") from e


def _run(
    grid: Grid, workers: int, devices: str, gpus: int, ray_options: RayOptions | None, console: Any, tables: bool,
    rerun_stale: bool = False, restart_damaged: bool = False,
) -> GridReport:
    from rich.live import Live

    _write_grid_json(grid)
    failures_path = grid.output / "failures.json"
    failures: dict[str, Any] = read_json(
        failures_path, fix="delete it: it only lists earlier failures, and failed cells are tried again anyway"
    ) or {}

    report = GridReport()
    pending = _sort_cells(grid, report, failures, console, rerun_stale)
    if restart_damaged:
        pending = deque((cell, restart_damaged_cell(cell, grid.output, console) if state == "resume" else state)
                        for cell, state in pending)
    write_json_atomic(failures_path, failures, default=str)
    if pending:
        _prepare_datasets(sorted({c.dataset for c, _ in pending}))
    packs = deque(make_packs(pending))  # the processes to run

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Unset, every torch process would use all cores: N workers would oversubscribe the CPU N times.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    mode = "cuda" if gpus else "cpu"
    where = f"{workers} worker(s) ({mode}{f', {gpus} GPU(s)' if gpus else ''})"
    cluster = _ray_connect(ray_options, devices) if ray_options is not None and pending else None
    if cluster is not None:
        mode, where = cluster.mode, cluster.description
    elif ray_options is not None:
        where = "Ray"  # nothing to run: not connected
    running: list[Running] = []
    start = time.monotonic()
    console.print(
        f"grid {grid.name}: {len(grid.cells)} cells, {len(report.skipped)} already finished, "
        f"{len(pending)} to run"
        + (f" in {len(packs)} processes (seeds_per_process)" if len(packs) != len(pending) else "")
        + f" on {where}; results in {grid.output}"
    )

    def render() -> Any:
        started = [r for r in running if r.started is not None]
        waiting = sum(len(cells) for cells, _ in packs) + sum(len(r.cells) for r in running if r.started is None)
        return _render(grid, report, started, waiting, time.monotonic() - start)

    try:
        with Live(render(), console=console, refresh_per_second=1, transient=False) as live:
            while packs or running:
                while packs and len(running) < workers:
                    cells, state = packs.popleft()
                    if cluster is not None:
                        running.append(_ray_start(cluster, cells, state))
                    else:
                        running.append(_start_local(cells, state, mode, env, gpus, running))
                    report.launched += [cell.id for cell in cells]
                for r in list(running):
                    _poll_progress(r)
                    outcome = _poll_local(r) if cluster is None else _ray_poll(r)
                    if outcome is None:
                        continue
                    running.remove(r)
                    code, elapsed, log_tail = outcome
                    on = f" on {r.node}" if r.node else ""
                    for cell in r.cells:
                        # In a pack, a seed whose run wrote its result.json is finished even if another seed then
                        # failed (the seeds of an unbatchable algorithm run one after another).
                        if (cell.run_dir / "result.json").exists() and (code == 0 or len(r.cells) > 1):
                            report.finished.append(cell.id)
                            failures.pop(cell.id, None)
                            console.print(f"[green]done[/green]   {cell.id} ({_hms(elapsed)}{on})")
                            continue
                        failures[cell.id] = report.failed[cell.id] = _failure(r, cell, code, elapsed, log_tail)
                        console.print(f"[red]failed[/red] {cell.id} ({_exit_text(code)}{on}); log: {r.log}")
                        if DAMAGED in log_tail:  # fit's way out (--ckpt_path) is not the runner's
                            failures[cell.id]["fix"] = fix = f"offbench bench {grid.path} --restart-damaged"
                            console.print(f"       its checkpoint is damaged: {fix} continues it from the checkpoint "
                                          "before, or from the start")
                    write_json_atomic(failures_path, failures, default=str)
                live.update(render())
                if running:
                    time.sleep(0.5)
    except KeyboardInterrupt:
        report.interrupted = True
        stopped = sum(len(r.cells) for r in running if r.started is not None)
        if cluster is not None:
            _ray_stop(running)
        else:
            _stop([r.process for r in running])
    finally:
        if cluster is not None and cluster.disconnect:
            _import_ray().shutdown()
    if not console.is_terminal:
        console.print()  # a non-terminal Live leaves its last line unterminated
    if report.interrupted:
        console.print(
            f"[yellow]interrupted[/yellow]: stopped {stopped} running cell(s); run the same command again "
            "to resume them from their last checkpoints"
        )
    else:
        console.print(
            f"grid {grid.name}: {len(report.finished)} finished, {len(report.skipped)} skipped (finished before), "
            f"{len(report.failed)} failed in {_hms(time.monotonic() - start)}"
            + (f", {len(report.busy)} busy elsewhere" if report.busy else "")
            + (f", {len(report.stale)} stale" if report.stale else "")
            + (f"; failures listed in {failures_path}" if failures else "")
        )
    if tables:
        _write_tables(grid, report, console)
    return report


def _sort_cells(
    grid: Grid, report: GridReport, failures: dict[str, Any], console: Any, rerun_stale: bool
) -> deque[tuple[Cell, CellState]]:
    """The cells to run, with their states. Finished cells are skipped (a damaged result.json is a failure),
    busy and stale ones reported in `report` (a stale one set aside and run again with `rerun_stale`)."""
    pending: deque[tuple[Cell, CellState]] = deque()
    for cell in grid.cells:
        state = cell_state(cell)
        if state == "stale" and rerun_stale:
            console.print(f"stale  {cell.id}: its run moved to {set_aside(cell, grid.output)}; running it again")
            state = "fresh"
        if state == "finished" and (damage := _unreadable_result(cell)):
            failures[cell.id] = report.failed[cell.id] = {
                "algorithm": cell.algorithm, "dataset": cell.dataset, "seed": cell.seed, "run_dir": str(cell.run_dir),
                "exit": "unreadable result.json", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": damage,
            }
            console.print(f"[red]damaged[/red] {cell.id}: {damage}")
        elif state == "finished":
            report.skipped.append(cell.id)
            failures.pop(cell.id, None)  # finished since (e.g. by hand): no longer a failure
        elif state == "running":
            pid = report.busy[cell.id] = run_dir_holder(cell.run_dir) or 0
            console.print(
                f"[yellow]busy[/yellow]   {cell.id}: its run is still alive in process {pid or '(unknown)'} "
                "(an earlier runner's cell, or a fit by hand); skipped: run the grid again when it has ended"
            )
        elif state == "stale":
            report.stale[cell.id] = stale_arguments(cell)
            console.print(
                f"[yellow]stale[/yellow]  {cell.id}: run with other arguments than the grid file's now "
                f"({report.stale[cell.id]}); left alone: pass --rerun-stale to run it again"
            )
        else:
            pending.append((cell, state))
    return pending


DAMAGED = "it is probably truncated or damaged"  # in fit's message of an unreadable checkpoint (read_checkpoint)


def restart_damaged_cell(cell: Cell, output: Path, console: Any) -> CellState:
    """A cell to resume whose `last.ckpt` is unreadable: continues from `previous.ckpt` when that reads
    (the damaged file kept as `last.ckpt.damaged`), else its run directory is set aside (to
    `<output>.stale/`) and the cell starts again. Returns its state now ("resume" or "fresh")."""
    from offbench.errors import UserError
    from offbench.run.checkpoints import read_checkpoint

    checkpoints = cell.run_dir / "checkpoints"
    try:
        read_checkpoint(checkpoints / "last.ckpt")
        return "resume"
    except UserError:
        pass
    try:
        read_checkpoint(checkpoints / "previous.ckpt")
    except UserError:
        console.print(f"damaged {cell.id}: no readable checkpoint; its run moved to {set_aside(cell, output)}, "
                      "starting it again")
        return "fresh"
    os.replace(checkpoints / "last.ckpt", checkpoints / "last.ckpt.damaged")
    os.replace(checkpoints / "previous.ckpt", checkpoints / "last.ckpt")
    console.print(f"damaged {cell.id}: last.ckpt unreadable (kept as last.ckpt.damaged); continuing from previous.ckpt")
    return "resume"


def _write_tables(grid: Grid, report: GridReport, console: Any) -> None:
    """The grid's tables, unless stale cells hold results of other settings."""
    if report.stale:
        console.print(
            f"[yellow]tables not written[/yellow]: {len(report.stale)} stale cell(s) hold results of other settings, "
            "which a table would mix with the grid's; rerun them with --rerun-stale (or restore the grid file)"
        )
    else:
        from offbench.errors import UserError
        from offbench.tables import write_tables

        try:
            written = write_tables(grid.output)
        except UserError as e:  # no finished run yet, or runs a table must not mix: the tables as they were stay
            console.print(f"[yellow]tables not written[/yellow]: {e}")
        else:
            console.print("tables: " + ", ".join(str(p) for p in written))


def _failure(r: Running, cell: Cell, code: int | None, elapsed: float, log_tail: str) -> dict[str, Any]:
    """A failed cell's entry in failures.json; the exit, log and reason are its process's (a pack's: all its seeds')."""
    return {
        "algorithm": cell.algorithm,
        "dataset": cell.dataset,
        "seed": cell.seed,
        "run_dir": str(cell.run_dir),
        **({"node": r.node} if r.node else {}),
        "exit": _exit_text(code),
        "returncode": code,
        "resumed": r.state == "resume",
        "seconds": round(elapsed, 1),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        **({"seeds": [c.seed for c in r.cells]} if len(r.cells) > 1 else {}),  # one process ran these seeds
        "log": str(r.log),
        "reason": log_tail or "the cell exited without output" + ("" if code else " and without a result.json"),
    }


def _exit_text(code: int | None) -> str:
    if code is None:
        return "its Ray task failed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}" + (" (but no result.json)" if code == 0 else "")


def _write_grid_json(grid: Grid) -> None:
    """What the tables need to know about the grid: the expected seeds, the row and column order,
    the paper references."""
    write_json_atomic(grid.output / "grid.json", {
        "name": grid.name,
        "grid_file": str(grid.path),
        "description": grid.description,
        "seeds": grid.seeds,
        "algorithms": grid.algorithms,
        "datasets": grid.datasets,
        "references": str(grid.references) if grid.references else None,
        "cells": [{"id": c.id, "algorithm": c.algorithm, "dataset": c.dataset, "seed": c.seed,
                   "run_dir": str(c.run_dir), "updates": c.updates, "args": c.args} for c in grid.cells],
    })
