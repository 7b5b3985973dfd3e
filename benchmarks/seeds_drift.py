"""How far round-off alone moves a training run, against how far a SeedBatch copy drifts from its single-seed run.

For each algorithm given (tests/test_seeds.py's small settings, float64, seed 0, its tiny Hopper dataset), three
runs of `--updates` updates on the same batches and random draws:

- single: the single-seed run;
- nudged: the same, with every trainable tensor's first entry moved by one ulp once, before training (round-off,
  once);
- copy 0 of a 2-copy SeedBatch (the batched kernels: another summation order in many ops at every update).

It prints the largest relative gap (tests/test_seeds.py's `largest_gap`) of nudged and of the batched copy
against single, and the parameters where the batched copy drifts most, with their largest gradient over the
run. A drift of the batched copy of the same order as the nudge's says the training amplifies round-off; a
batched drift far above it would point at a difference in the computation.

    python benchmarks/seeds_drift.py diffuser.Diffuser decision_diffuser.DecisionDiffuser edp.EDP --data FILE.hdf5

FILE: a tiny Hopper dataset as tests/conftest.py writes it (pytest's `tiny_hopper`, e.g.
/tmp/pytest-of-$USER/pytest-*/data0/hopper-random-tiny.hdf5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from offbench.seeds import CopyRNG, SeedBatch  # noqa: E402
from tests.test_seeds import BATCHABLE, algorithm, build, largest_gap, single_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="tests/test_seeds.py BATCHABLE keys, e.g. diffuser.Diffuser")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--updates", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.names:
        grads: dict[str, float] = {}
        single = single_run(name, args.data, args.updates, grads=grads)
        nudged = single_run(name, args.data, args.updates, nudge=True)
        built = [build(algorithm(name), BATCHABLE[name], s, args.data, torch.float64) for s in (0, 1)]
        batch = SeedBatch([m for m, _, _ in built], CopyRNG([states[0] for _, _, states in built]))
        for _ in range(args.updates):
            batch.run_update([sample() for _, sample, _ in built])
        copy0 = batch.unstack()[0]
        print(f"{name}, {args.updates} updates, float64: one-ulp nudge once {largest_gap(single, nudged):.1e}; "
              f"batched copy {largest_gap(single, copy0):.1e}")
        rows = sorted(((((p - q).abs().max() / p.abs().max().clamp(min=1e-2)).item(), n)
                       for (n, p), q in zip(single.named_parameters(), copy0.parameters())), reverse=True)[:3]
        for gap, n in rows:
            print(f"  {n}: batched gap {gap:.1e}, largest |gradient| {grads.get(n, 0.0):.1e}")


if __name__ == "__main__":
    main()
