"""One cell on disk: its state (finished, resume, fresh, running, stale), its `offbench fit` command,
its subprocess (`start_cell`, which dies with its runner), its log and progress, and `Running`, a launched
process: one cell, or a pack of one column's seeds (`make_packs`, `pack_command`: `offbench fit --seeds`).
"""

from __future__ import annotations

import difflib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from offbench.bench.grid import Cell
from offbench.files import read_json, run_dir_holder, write_json_atomic

LOG_TAIL_LINES = 25  # lines of a failed cell's output kept as its reason in failures.json

CellState = Literal["finished", "resume", "fresh", "running", "stale"]


def cell_state(cell: Cell) -> CellState:
    """running: a process (a cell of an earlier runner, a fit by hand) holds the run directory's lock;
    stale: the run has a result or a checkpoint made with other arguments than the grid file's now;
    finished: result.json exists; resume: a checkpoint but no result; fresh: nothing to continue."""
    if run_dir_holder(cell.run_dir) is not None:
        return "running"
    finished = (cell.run_dir / "result.json").exists()
    resume = (cell.run_dir / "checkpoints" / "last.ckpt").exists()
    if (finished or resume) and stale_arguments(cell):
        return "stale"
    return "finished" if finished else "resume" if resume else "fresh"


def _unreadable_result(cell: Cell) -> str:
    """Why a finished cell's result.json cannot be read (a damaged file: it is written atomically), with
    the way out; empty when it reads."""
    from offbench.errors import UserError

    try:
        read_json(
            cell.run_dir / "result.json",
            fix=f"delete it and run the grid again: the cell then resumes from {cell.run_dir / 'checkpoints/last.ckpt'} "
            "and writes it again (or delete the run directory to run the cell from the start)",
        )
    except UserError as e:
        return str(e)
    return ""


def stale_arguments(cell: Cell) -> str:
    """How the arguments recorded in the cell's `cell.json` (those its run was made with) differ from
    the grid file's now, as `old -> new` pieces; empty when they agree or nothing is recorded."""
    recorded = read_json(cell.run_dir / "cell.json", fix="delete it (the runner writes it again when the cell starts)")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), list):
        return ""
    old, new = [str(a) for a in recorded["args"]], cell.args
    pieces = [
        f"{shlex.join(old[i1:i2]) or '(none)'} -> {shlex.join(new[j1:j2]) or '(none)'}"
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes()
        if tag != "equal"
    ]
    return "; ".join(pieces)


def set_aside(cell: Cell, output: Path) -> Path:
    """Move a stale cell's run directory out of the grid's output (to `<output>.stale/<time>/...`), so
    that the tables never mix its results with those of the grid's current settings."""
    target = output.with_name(f"{output.name}.stale") / time.strftime("%Y%m%d-%H%M%S") / cell.run_dir.relative_to(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(cell.run_dir, target)
    return target


def cell_command(cell: Cell, state: CellState, devices: str = "cpu") -> list[str]:
    """The subprocess command of a cell: `python -m offbench.cli fit ...` (the interpreter running
    the grid, so the cell sees the same environment), resumed from its last checkpoint if it has one."""
    command = [sys.executable, "-m", "offbench.cli", *cell.args]
    if devices == "cpu":
        command += ["--trainer.accelerator", "cpu"]
    elif devices == "cuda":
        command += ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    if state == "resume":
        command += ["--ckpt_path", "last"]
    return command


def make_packs(pending: Iterable[tuple[Cell, CellState]]) -> list[tuple[list[Cell], CellState]]:
    """The processes that run `pending` cells: cells with the same arguments but for their seed (one column, one
    dataset) and the same state (all fresh or all resumed, never mixed) share one, at most `seeds_per_process` of
    them, in the grid's order. With seeds_per_process 1 (the default), one process per cell."""
    packs: list[tuple[list[Cell], CellState]] = []
    filling: dict[tuple[tuple[str, ...], CellState], list[Cell]] = {}
    for cell, state in pending:
        if cell.seeds_per_process == 1:
            packs.append(([cell], state))
            continue
        key = (tuple(seedless_args(cell)), state)
        pack = filling.get(key)
        if pack is None or len(pack) >= cell.seeds_per_process:
            pack = filling[key] = []
            packs.append((pack, state))
        pack.append(cell)
    return packs


def seedless_args(cell: Cell) -> list[str]:
    """The cell's fit arguments without its seed, as `offbench fit --seeds` takes them: no `--seed_everything N`
    (the grid's, see grid._cell), the run directory `.../seed{seed}` (filled in for each seed)."""
    args = list(cell.args)
    i = args.index("--seed_everything")
    del args[i:i + 2]
    template = str(cell.run_dir.parent / "seed{seed}")
    return [template if a == str(cell.run_dir) else a for a in args]


def pack_command(cells: list[Cell], state: CellState, devices: str = "cpu") -> list[str]:
    """The subprocess command of a pack: a pack of one is its cell's own command (cell_command); several
    seeds run as `offbench fit <their common arguments> --seeds a,b,c`, each seed's run writing the run
    directory, result.json, metrics.csv and checkpoints its single-seed run writes (docs/seeds.md)."""
    if len(cells) == 1:
        return cell_command(cells[0], state, devices)
    args = [*seedless_args(cells[0]), "--seeds", ",".join(str(c.seed) for c in cells)]
    return cell_command(replace(cells[0], args=args), state, devices)


def write_cell_json(cell: Cell) -> None:
    """`<run dir>/cell.json`: the cell as its single-seed run has it (its args: what stale_arguments compares)."""
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    record = {**asdict(cell), "run_dir": str(cell.run_dir)}
    del record["seeds_per_process"]  # how the runner runs the cell, not part of its run
    write_json_atomic(cell.run_dir / "cell.json", record, default=str)


def note_pack(cell: Cell, log: Path, command: list[str]) -> None:
    """For a cell that runs in another cell's process (a pack of seeds): its cell.json, and a line in its
    bench.log saying where the process's output goes (`log`, the first cell's bench.log)."""
    write_cell_json(cell)
    with open(cell.run_dir / "bench.log", "a") as f:
        f.write(f"\n### offbench bench {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n"
                f"(one process for several seeds: its output is in {log})\n")


def start_cell(cell: Cell, command: list[str], env: dict[str, str], die_with_parent: bool = True) -> subprocess.Popen:
    """Start one cell (the first of a pack), its stdout and stderr appended to `<run dir>/bench.log`. With `die_with_parent`
    (Linux), the cell is killed when this process dies, however it dies: no cell outlives its runner.
    (Leftover partial files of a crash are removed by the cell's `fit` itself, under its run lock.)
    The cell starts with SIGINT and SIGTERM at their defaults whatever this process inherited (a runner
    started in the background by a script has SIGINT ignored): the runner's stop reaches it at once."""
    write_cell_json(cell)
    preexec = _die_with_parent(os.getpid()) if die_with_parent and _LIBC is not None else _default_signals
    with open(cell.run_dir / "bench.log", "a") as log:
        log.write(f"\n### offbench bench {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
        log.flush()
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec
        )


def _load_libc() -> Any:
    """libc, loaded once here: the child side of a fork must not load libraries (see _die_with_parent)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load
        return None


_LIBC = _load_libc()
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _default_signals() -> None:
    """A Popen preexec_fn: SIGINT and SIGTERM at their defaults in the child (an ignored SIGINT is
    inherited through exec; Python then never turns it into KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _die_with_parent(parent: int) -> Any:
    """A Popen preexec_fn: the child gets SIGKILL when `parent` dies (prctl PR_SET_PDEATHSIG), and exits
    at once if it already has; its signals at their defaults (_default_signals). Its last checkpoint stays
    (checkpoints are written atomically)."""

    def preexec() -> None:
        _default_signals()
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the runner died between fork and prctl
            os._exit(1)

    return preexec


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the cell's latest attempt (the reason a failed cell failed)."""
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    attempt = text.rsplit("\n### offbench bench ", 1)[-1]
    return "\n".join(attempt.splitlines()[1:][-lines:])


def _updates_done(run_dir: Path) -> int | None:
    """The latest `updates` value in the cell's metrics.csv (read from its header and tail only)."""
    path = run_dir / "metrics.csv"
    try:
        with open(path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode(errors="replace").splitlines()[1:]
    except OSError:
        return None
    if "updates" not in header:
        return None
    column = header.index("updates")
    for line in reversed(tail):
        values = line.split(",")
        if len(values) == len(header) and values[column]:
            try:
                return int(float(values[column]))
            except ValueError:
                return None
    return None


@dataclass


class Running:
    """A launched process (a local subprocess or a Ray task) of one cell or of a pack of seeds (make_packs)."""

    cells: list[Cell]
    state: CellState
    process: subprocess.Popen | None = None  # local launcher
    task: Any = None  # Ray launcher: the task's ObjectRefGenerator (see _ray_cell)
    gpu: int | str | None = None
    node: str | None = None  # Ray: the host the cells run on
    started: float | None = field(default_factory=time.monotonic)  # None: a Ray task waiting for resources
    first_updates: dict[str, tuple[float, int]] = field(default_factory=dict)  # cell id: (time, updates) first seen
    updates: dict[str, int] = field(default_factory=dict)  # cell id: updates done

    @property
    def log(self) -> Path:
        """The process's output: its first cell's bench.log."""
        return self.cells[0].run_dir / "bench.log"
