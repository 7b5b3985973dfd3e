"""`offbench bench GRID.yaml`: run a grid of (algorithm x dataset x seed) cells and tabulate them.

Every cell is one `offbench fit` in its own subprocess and its own run directory
`<output>/runs/<algorithm>/<dataset>/seed<k>`, so a crash, a NaN loss or a kill stays inside its
cell (or its pack of seeds, `seeds_per_process` below). The run directory is the state: a cell with `result.json` (written atomically at the end of
a fit) is finished and skipped, a cell with `checkpoints/last.ckpt` but no result is continued with
`--ckpt_path last`, anything else starts fresh. Re-running the same command therefore resumes an
interrupted grid. Failed cells are listed with their reason in `<output>/failures.json` (their
full output is in `<run dir>/bench.log`) and are tried again on the next run.

A grid file (YAML; relative paths are relative to the working directory):

    name: quick                        # output goes to results/<name>/ unless `output:` is given
    seeds: 2                           # a count (0..n-1) or a list of seeds
    updates: 10000                     # the settings below may appear at the top level, in an
    eval_every: 2000                   #   algorithm entry, and in `overrides` blocks (per dataset,
    eval_episodes: 5                   #   at the top level or inside an algorithm); the most
    block_size: 500                    #   specific one wins; `args` and `config` accumulate
    seeds_per_process: 1               # seeds of one column and dataset per process (see below)
    args: [--eval.num_envs, 5]         # extra `offbench fit` arguments
    algorithms:
      - name: bc
        config: configs/algorithms/bc.yaml
      - name: diffcps
        config: configs/algorithms/diffcps.yaml
        overrides:
          hopper-medium-v2: {config: configs/tasks/diffcps/hopper-medium-v2.yaml}
        datasets: [hopper-medium-v2]   # optional: only these of the grid's datasets for this algorithm
      - name: td3bc                    # `sweep`: one column per combination of values (product over
        config: configs/algorithms/td3bc.yaml  # keys), named by them: td3bc@alpha=1, td3bc@alpha=2.5
        sweep: {model.init_args.alpha: [1, 2.5]}   # (key's last part; passed as --model.init_args.alpha
                                                   #   after all `args`); tables: budget curves, see below
    datasets: [synthetic/hopper-random-v0, hopper-medium-v2]
    overrides:
      hopper-medium-v2: {updates: 2000000}
    references: configs/references/table1.yaml   # optional paper numbers for the tables
    wandb: {project: offbench, mode: offline}    # optional: every cell also logs to W&B (`true` for the
                                                 #   defaults; pip install 'offbench[wandb]'), see below

Sweeps. An algorithm entry's `sweep:` maps setting keys (dotted `offbench fit` names) to lists of values
(numbers, booleans, plain words); the entry becomes one column per combination, `<name>@<key>=<value>,...`
with each key's last part (`rebrac@actor_bc_coef=0.1,critic_bc_coef=0.01`: a directory name too), each with
the grid's seeds. `offbench table` then also writes the budget curves of each swept algorithm: the expected
score of the policy a UCB bandit selects among its settings x seeds after 1, 2, 4, ... evaluation episodes
(selection.md, selection.csv, selection.png; docs/statistics.md, "Budget curves"; configs/grids/sweep.yaml).

Seeds per process. `seeds_per_process: N` (a positive integer, default 1) runs up to N seeds of one column and
one dataset in one process, `offbench fit --seeds a,b,c` (docs/seeds.md): their updates one batched computation,
each seed's run directory and files exactly those of its single-seed run. A pack holds cells in the same state
only (all fresh, or all resumed: then with `--ckpt_path last`), in the grid's order; finished cells are skipped as
always, so an interrupted grid packs what is left. The pack's command is the cells' common arguments without
`--seed_everything N`, with `--trainer.default_root_dir <output>/runs/<algorithm>/<dataset>/seed{seed}` and
`--seeds a,b,c`; a pack of one is the cell's own command. Everything else stays per cell: its state, its cell.json
(its single-seed arguments, so a stale cell is found as before), its row in the progress display, its entry in
failures.json (a failed pack records each of its unfinished cells, with the pack's exit and log tail; a seed that
wrote its result.json before another failed is finished). The process's output goes to the first cell's
bench.log; the others' bench.log name it. `--workers` counts processes, and Ray's `--cpus-per-cell` and
`--gpus-per-cell` are each process's resources. The default 1 is measured: on this suite's 2-core CPU, one batched process of N seeds trains slower
than N separate ones (batched / separate 0.43 to 1.00 at N = 1, 4, 8: results/perf/seeds.md); on a GPU, where
small networks' updates are bound by kernel launches, 8 is the value to try (not measured yet). Not with `wandb`
(one W&B run per process: a grid problem) nor `--compile` (refused by `offbench fit --seeds`).

The fit arguments of a cell are, in order: the algorithm config, the extra configs (top level,
top-level dataset override, the algorithm's dataset override), dataset, seed, budget, evaluation
protocol, run directory, the W&B arguments when the grid has `wandb:` (`--logger wandb`, the grid's
name as the W&B group, the run name algorithm/dataset/seed<k>, its options), then `args` (top level,
dataset override, algorithm, algorithm's dataset override): later arguments win, as in `offbench fit`.

Launchers. `local` (the default) runs the cells as subprocesses of this machine, `--workers N` at a
time, GPUs round-robin. `ray` (`--launcher ray`; `pip install 'offbench[ray]'`) hands each cell (or pack
of seeds) to a Ray cluster as one task, which runs the same `offbench fit` subprocess on whichever node has room:
`--address` names the cluster (default: $RAY_ADDRESS, else the cluster that `ray start` made on this
machine, else a new local Ray instance), `--cpus-per-cell` and `--gpus-per-cell` are each task's
resources (a GPU share such as 0.5 lets several cells use one GPU at once), and `--workers` caps the
cells in flight (default: whatever the cluster fits). The nodes must share the filesystem with this
machine (repository, datasets, output directory) and its Python environment: a cell runs in this
working directory and writes the same run directory and files as a local one, so skipping, resuming
and the failure records are the same. The runner itself (its lock, progress display, failures.json
and tables) stays on this machine; a cell is never retried by Ray (a failure is recorded, and the
next run tries it again), and Ctrl+C stops the running cells before the lock goes.

Modules: grid.py (grid files -> cells), cells.py (a cell's state, command and subprocess), local.py and
ray.py (the launchers), progress.py (the live display), runner.py (run_grid), cli.py (`offbench bench`).
"""

from offbench.bench.cells import (
    CellState,
    Running,
    _updates_done,  # noqa: F401 (imported from here by tests on other branches)
    cell_command,
    cell_state,
    make_packs,
    pack_command,
    set_aside,
    stale_arguments,
    start_cell,
)
from offbench.bench.cli import main
from offbench.bench.grid import Cell, Grid, GridError, dataset_slug, expand_grid, load_grid
from offbench.bench.ray import RayOptions
from offbench.bench.runner import GridReport, run_grid

__all__ = [
    "Cell", "CellState", "Grid", "GridError", "GridReport", "RayOptions", "Running", "cell_command", "cell_state",
    "dataset_slug", "expand_grid", "load_grid", "main", "make_packs", "pack_command", "run_grid", "set_aside",
    "stale_arguments", "start_cell",
]
