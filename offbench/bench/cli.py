"""`offbench bench` on the command line: its arguments, the dry run, the exit status."""

from __future__ import annotations

import shlex

from offbench.bench.cells import cell_state, make_packs, pack_command
from offbench.bench.grid import load_grid
from offbench.bench.ray import RayOptions
from offbench.bench.runner import run_grid
from offbench.grammar import DEVICES, Parser


def _parser() -> Parser:
    parser = Parser(
        prog="offbench bench", renamed={"--devices": ["--device"], "--output": ["--out"]},
        description="Run a grid of (algorithm x dataset x seed) cells, one `offbench fit` subprocess each; "
        "finished cells are skipped, interrupted ones resumed from their last checkpoint; tables at the end.",
    )
    parser.add_argument("grid", help="grid file, e.g. configs/grids/quick.yaml")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="processes run at the same time, each one cell or a pack of seeds (the grid's seeds_per_process) "
        "(default: 1 locally; with Ray, as many as the cluster's resources allow)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="where the cells run: auto (CUDA when available: cells spread over the visible GPUs, several per GPU "
        "allowed; else CPU), cpu or cuda",
    )
    parser.add_argument(
        "--launcher", choices=("local", "ray"), default="local",
        help="local: subprocesses of this machine; ray: one Ray task per cell on a Ray cluster whose nodes share "
        "this machine's filesystem (repository, datasets, results) and Python environment "
        "(needs pip install 'offbench[ray]')",
    )
    ray = parser.add_argument_group("Ray (--launcher ray)")
    ray.add_argument(
        "--address", default=None,
        help="the Ray cluster, as ray.init(address=...) takes it: 'auto' or HOST:PORT run on a node of the cluster, 'local' for a new local instance "
        "(default: $RAY_ADDRESS, else the cluster that `ray start` made on this machine, else a new local Ray instance)",
    )
    ray.add_argument("--cpus-per-cell", type=float, default=None, help="CPUs reserved for each cell (default 1)")
    ray.add_argument(
        "--gpus-per-cell", type=float, default=None,
        help="share of a GPU reserved for each cell, e.g. 0.5: two cells per GPU (default: 1 when the cluster "
        "has GPUs, else 0)",
    )
    parser.add_argument(
        "--out", default=None,
        help="folder of the run directories and tables instead of the grid's (`output`, default results/<name>); "
        "e.g. a measurement of your own beside the committed one: --out runs/benchmark/quick",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cells, their state and commands; run nothing")
    parser.add_argument("--no-tables", action="store_true", help="do not write the tables at the end")
    parser.add_argument(
        "--rerun-stale", action="store_true",
        help="run again the cells whose runs were made with other arguments than the grid file's now (their run "
        "directories are moved to <output>.stale/); without it they are reported and left alone",
    )
    parser.add_argument(
        "--restart-damaged", action="store_true",
        help="a cell whose last checkpoint is unreadable continues from the checkpoint before it (the damaged one "
        "kept as last.ckpt.damaged), or starts again when there is none (its run directory moved to <output>.stale/)",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ray_args = {"--address": args.address, "--cpus-per-cell": args.cpus_per_cell, "--gpus-per-cell": args.gpus_per_cell}
    if args.launcher != "ray" and any(value is not None for value in ray_args.values()):
        given = [name for name, value in ray_args.items() if value is not None]
        parser.error(f"{', '.join(given)}: only with --launcher ray")
    grid = load_grid(args.grid, args.out)  # a GridError (a UserError) lists every problem of the grid file
    if args.dry_run:
        states = {c.id: cell_state(c) for c in grid.cells}
        packs = make_packs((c, states[c.id]) for c in grid.cells if states[c.id] in ("fresh", "resume"))
        pack_of = {cell.id: cells for cells, _ in packs for cell in cells}
        for cell in grid.cells:
            cells = pack_of.get(cell.id, [cell])  # a pack of seeds is one process, listed at its first cell
            line = (f"offbench {shlex.join(pack_command(cells, states[cell.id], 'auto')[3:])}" if cell is cells[0]
                    else f"(in the process of {cells[0].id})")
            print(f"[{states[cell.id]:8}] {cell.id}\n    {line}")
        counts = {s: list(states.values()).count(s) for s in ("finished", "resume", "fresh", "running", "stale")}
        print(f"grid {grid.name}: {len(grid.cells)} cells: {counts['finished']} finished (skipped), "
              f"{counts['resume']} to resume, {counts['fresh']} to start, {counts['running']} running elsewhere, "
              f"{counts['stale']} stale (run with other arguments; --rerun-stale runs them again); output {grid.output}")
        return 0
    ray_options = None
    if args.launcher == "ray":
        cpus = 1.0 if args.cpus_per_cell is None else args.cpus_per_cell
        ray_options = RayOptions(args.address, cpus, args.gpus_per_cell)
    report = run_grid(
        grid, args.workers, args.device, tables=not args.no_tables, ray_options=ray_options, rerun_stale=args.rerun_stale,
        restart_damaged=args.restart_damaged,
    )
    if report.interrupted:
        return 130
    return 1 if report.failed or report.busy or report.stale else 0
