"""Measure the spread of tests/test_golden_jax.py's differences over CPU settings (tolerance table of
tests/data/golden/README.md, "Tolerances of the JAX golden tests").

Runs the test file under OMP_NUM_THREADS 1 and 2 x ATEN_CPU_CAPABILITY default, avx2, avx512 with
GOLDEN_JAX_MEASURE set (each comparison logs its largest |ours - official| and its ratio to the tolerance instead of
asserting) and prints, per precision and tolerance, the largest difference over all comparisons and settings and
the smallest factor between the tolerance and the measured difference. From the repository root, in the project's
environment:

    PYTHONPATH=$PWD python tests/data/golden/recording/edp_idql_spread.py [--out spreads.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="keep the raw log here")
    ap.add_argument("--test-file", default="tests/test_golden_jax.py")
    args = ap.parse_args()
    log = args.out or tempfile.mktemp(suffix=".jsonl")
    rows = []
    for threads in ("1", "2"):
        for cap in ("default", "avx2", "avx512"):
            part = f"{log}.{threads}.{cap}"
            if os.path.exists(part):
                os.remove(part)
            env = os.environ | {"OMP_NUM_THREADS": threads, "ATEN_CPU_CAPABILITY": cap, "GOLDEN_JAX_MEASURE": part}
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", args.test_file],
                               env=env, capture_output=True, text=True)
            print(f"threads {threads} {cap}: {r.stdout.strip().splitlines()[-1]}")
            with open(part) as f:
                rows += [json.loads(line) | {"threads": threads, "cap": cap} for line in f]
    with open(log, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["atol"], r["rtol"])].append(r)
    print(f"{'dtype':15} {'atol':>8} {'rtol':>8} {'n':>6} {'max |diff|':>11} {'max ratio':>10}  worst comparison")
    for (dtype, atol, rtol), rs in sorted(groups.items()):
        worst = max(rs, key=lambda r: r["ratio"])
        print(f"{dtype:15} {atol:8.0e} {rtol:8.0e} {len(rs):6d} {max(r['diff'] for r in rs):11.2e} "
              f"{worst['ratio']:10.2e}  {worst['test'].split('::')[-1]} {worst['msg'][:40]}")
    # the spread across settings of each comparison (same test, same message)
    per = collections.defaultdict(list)
    for r in rows:
        per[(r["test"], r["msg"])].append(r["diff"])
    spread = max((max(v) - min(v), k) for k, v in per.items())
    print(f"largest change of one comparison across the settings: {spread[0]:.2e} ({spread[1][0].split('::')[-1]} "
          f"{spread[1][1][:40]})")
    print(f"raw log: {log}")


if __name__ == "__main__":
    main()
