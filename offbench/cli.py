"""The `offbench` command: a dispatcher.

    offbench fit --config configs/algorithms/bc.yaml --data.dataset synthetic/hopper-random-v0
    offbench data synth|forge|info|pgd ...
    offbench bench|table|perf|toy|gpu-check ...

`fit` is the run of offbench/run/ (LightningCLI); the other commands are plain functions with their
own arguments, in one grammar (docs/cli.md). A user's mistake (offbench.errors.UserError) is one
message and exit status 2.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback

from offbench.errors import UserError

USAGE = """usage: offbench [--debug] COMMAND ...

commands:
  fit     train one algorithm on one dataset (LightningCLI: offbench fit --help)
  data    make or inspect datasets (offbench data --help)
  perf    measure training and evaluation throughput (offbench perf --help)
  bench   run a grid of algorithm x dataset x seed cells, resumable (offbench bench --help)
  table   tables and learning curves of a results directory (offbench table --help)
  toy     the DiffCPS toy bandit: train, sample, figure and score table (offbench toy --help)
  gpu-check  CUDA tests and measurements in one go, report in results/perf/perf-cuda.md (offbench gpu-check --help)

The same flag names the same idea in every command (--dataset, --env, --device, --workers, --out,
--compile, --seed; hyphens or underscores): docs/cli.md. A user error (bad argument, data or file)
prints one message and exits with status 2; --debug (or OFFBENCH_DEBUG=1) shows its traceback too.
"""


def main(argv: list[str] | None = None) -> int:
    """Run an `offbench` command; a UserError becomes one message on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OFFBENCH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"offbench: error: {e}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    # Algorithms are named by import path; let files in the working directory be found, as `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "fit":
        from offbench.run.fit import fit_main

        fit_main(rest)
        return 0
    if command == "data":
        from offbench.data.commands import main as data_main

        return data_main(rest)
    if command == "perf":
        from offbench.perf import main as perf_main

        return perf_main(rest)
    if command == "bench":
        from offbench.bench import main as bench_main

        return bench_main(rest)
    if command == "table":
        from offbench.tables import main as table_main

        return table_main(rest)
    if command == "gpu-check":
        from offbench.gpu_check import main as gpu_check_main

        return gpu_check_main(rest)
    if command == "toy":
        from offbench.toy import main as toy_main

        return toy_main(rest)
    commands = ("fit", "data", "perf", "bench", "table", "gpu-check", "toy")
    close = difflib.get_close_matches(command, commands, n=1)
    print(f"offbench: error: unknown command {command!r}{f': did you mean {close[0]}?' if close else ''} "
          f"(commands: {', '.join(commands)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
