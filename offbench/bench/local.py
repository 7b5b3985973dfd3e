"""The local launcher: cells (or packs of seeds) as subprocesses of this machine, on the least-loaded GPU when
there are GPUs."""

from __future__ import annotations

import signal
import subprocess
import time

from offbench.bench.cells import Cell, CellState, Running, _log_tail, note_pack, pack_command, start_cell
from offbench.errors import UserError


def _gpu_count(devices: str) -> int:
    if devices == "cpu":
        return 0
    import torch  # only here: the dry run and the grid checks need no torch

    count = torch.cuda.device_count()
    if devices == "cuda" and count == 0:
        raise UserError("--device cuda, but no CUDA device is visible: use --device cpu (or auto)")
    return count


def _start_local(
    cells: list[Cell], state: CellState, mode: str, env: dict[str, str], gpus: int, running: list[Running]
) -> Running:
    """Start a cell, or a pack of seeds, as one subprocess here, on the least-loaded GPU when there are GPUs."""
    cell_env = dict(env)
    gpu = None
    if gpus:
        load = [sum(r.gpu == g for r in running) for g in range(gpus)]
        gpu = load.index(min(load))
        cell_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    else:
        cell_env["CUDA_VISIBLE_DEVICES"] = ""
    command = pack_command(cells, state, mode)
    for cell in cells[1:]:
        note_pack(cell, cells[0].run_dir / "bench.log", command)
    return Running(cells, state, process=start_cell(cells[0], command, cell_env), gpu=gpu)


def _poll_local(r: Running) -> tuple[int, float, str] | None:
    """(exit code, seconds, log tail) once the subprocess has ended, else None."""
    code = r.process.poll()
    if code is None:
        return None
    return code, time.monotonic() - r.started, _log_tail(r.log)


def _stop(processes: list[subprocess.Popen], grace: float = 30.0) -> None:
    """Stop running cells (SIGINT first, so Lightning shuts down cleanly), then kill stragglers.
    Their last checkpoints stay, so the next run resumes them."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
