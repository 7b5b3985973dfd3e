"""The Ray launcher (`--launcher ray`): each cell (or pack of seeds, cells.make_packs) is one Ray task running the
local launcher's `offbench fit` subprocess on whichever node of the cluster has room."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from offbench.bench.cells import (
    LOG_TAIL_LINES,
    Cell,
    CellState,
    Running,
    _log_tail,
    note_pack,
    pack_command,
    start_cell,
)
from offbench.bench.local import _stop
from offbench.errors import UserError

# The driver's variables that a Ray cell gets too: where the datasets are (the nodes share the disk).
RAY_FORWARD_ENV = ("OFFBENCH_", "MINARI_", "OMP_NUM_THREADS")


@dataclass(frozen=True)


class RayOptions:
    """`--launcher ray`: the cluster and each cell's task resources (gpus_per_cell None: one GPU when
    the cluster has GPUs and --device allows them, else none)."""

    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float | None = None


@dataclass


class RayCluster:
    """The connection one grid run made to Ray, and what its cells are given."""

    task: Any  # ray.remote(_ray_cell) with the cells' resources
    mode: str  # the cells' accelerator: "cuda" when they have a GPU (fraction), else "cpu"
    env: dict[str, str]  # set in each cell's environment, over the node's own
    description: str
    disconnect: bool  # this run connected (or started the local instance), so it disconnects at the end


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "--launcher ray needs Ray, which is not installed here: pip install 'offbench[ray]'"
        ) from None
    return ray


def _check_ray_options(options: RayOptions, devices: str) -> None:
    """Everything that can be checked before connecting (Ray installed, sensible resources)."""
    _import_ray()
    if options.cpus_per_cell <= 0:
        raise UserError(f"--cpus-per-cell must be positive, got {options.cpus_per_cell:g}")
    if options.gpus_per_cell is not None and not 0 <= options.gpus_per_cell <= 1:
        raise UserError(
            f"--gpus-per-cell is a share of one GPU, from 0 to 1 (a cell runs on one device), "
            f"got {options.gpus_per_cell:g}"
        )
    if devices == "cpu" and options.gpus_per_cell:
        raise UserError("--gpus-per-cell asks for GPUs, but --device cpu runs the cells on CPUs")


def _ray_connect(options: RayOptions, devices: str) -> RayCluster:
    """Connect to the Ray cluster (or start a local instance) and size the cells' tasks."""
    ray = _import_ray()
    disconnect = not ray.is_initialized()  # a connection the caller made (a notebook, a test) stays theirs
    if disconnect:
        # The cells' output goes to their bench.log files; the driver shows only the grid's progress.
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0)
    if devices == "cuda" and not cluster_gpus:
        if disconnect:
            ray.shutdown()
        raise UserError("--device cuda, but the Ray cluster has no GPU")
    gpus = options.gpus_per_cell
    if gpus is None:
        gpus = 1.0 if devices != "cpu" and cluster_gpus else 0.0
    # max_retries=0: Ray would rerun a task whose worker or node died, while that cell's first
    # `offbench fit` might still write its run directory (a node cut off from the cluster, say). A failed
    # cell is recorded and tried again by the next run, as locally: never two runs of one cell at once.
    task = ray.remote(_ray_cell).options(num_cpus=options.cpus_per_cell, num_gpus=gpus, max_retries=0)
    env = {name: value for name, value in os.environ.items() if name.startswith(RAY_FORWARD_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(options.cpus_per_cell))))
    per_cell = f"{options.cpus_per_cell:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    description = (
        f"Ray at {ray.get_runtime_context().gcs_address} ({resources.get('CPU', 0):g} CPUs, "
        f"{cluster_gpus:g} GPUs; {per_cell} per cell)"
    )
    return RayCluster(task, "cuda" if gpus else "cpu", env, description, disconnect)


def _ray_start(cluster: RayCluster, cells: list[Cell], state: CellState) -> Running:
    """Submit a cell, or a pack of seeds; it waits in Ray's queue until a node has its resources."""
    task = cluster.task.remote(cells, state, cluster.mode, os.getcwd(), cluster.env)
    return Running(cells, state, task=task, started=None)


def _ray_cell(cells: list[Cell], state: CellState, mode: str, cwd: str, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A cell (or a pack of seeds) as a Ray task, on the node Ray chose: the local launcher's `offbench fit` subprocess, run
    in the driver's working directory (the filesystem is shared, so the grid's relative paths hold).
    A generator, so that the driver learns where and when the cell started before how it ended."""
    import ray

    os.chdir(cwd)
    yield {"node": socket.gethostname(), "gpu": ",".join(map(str, ray.get_gpu_ids())) or None}
    # Ray has set CUDA_VISIBLE_DEVICES to the GPU it gave this task (others may share it). Its worker
    # processes block SIGINT and a child inherits that: unblock it for the cell, so that the stop below
    # is the local launcher's (SIGINT, Lightning shuts down cleanly) instead of a kill after the grace.
    command = pack_command(cells, state, mode)
    for cell in cells[1:]:
        note_pack(cell, cells[0].run_dir / "bench.log", command)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        process = start_cell(cells[0], command, {**os.environ, **env}, die_with_parent=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    started = time.monotonic()
    try:
        while process.poll() is None:
            time.sleep(0.5)  # not process.wait(): ray.cancel's KeyboardInterrupt arrives between Python calls
    except KeyboardInterrupt:  # the grid run was interrupted (_ray_stop)
        _stop([process])
        raise
    yield {"returncode": process.returncode, "seconds": time.monotonic() - started,
           "log_tail": _log_tail(cells[0].run_dir / "bench.log")}


def _ray_poll(r: Running) -> tuple[int | None, float, str] | None:
    """Take what the cell's task has yielded: where it started (kept in `r`), then how it ended, as
    (exit code, seconds, log tail); the exit code is None when the task itself failed (its node died)."""
    import ray

    while ray.wait([r.task], timeout=0)[0]:
        try:
            item = ray.get(next(r.task))
        except ray.exceptions.RayError as e:
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # without the terminal colours
            elapsed = time.monotonic() - r.started if r.started is not None else 0.0
            return None, elapsed, "\n".join(reason.splitlines()[-LOG_TAIL_LINES:])
        if "returncode" in item:
            return item["returncode"], item["seconds"], item["log_tail"]
        r.node, r.gpu, r.started = item["node"], item["gpu"], time.monotonic()
    return None


def _ray_stop(running: list[Running]) -> None:
    """Cancel the cells' tasks: a waiting one never starts, a running one stops its `offbench fit` as the
    local launcher does. Wait for them to end, so that no cell outlives this run and its lock."""
    import ray

    for r in running:
        ray.cancel(r.task)
    for r in running:
        with contextlib.suppress(ray.exceptions.RayError):  # the cancelled tasks end with TaskCancelledError
            for item in r.task:
                ray.get(item)
