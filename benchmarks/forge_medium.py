"""Where the forge's `medium` level lands, per env and checkpoint spacing: results/forge/medium.md and medium.json.

D4RL's medium datasets come from a policy trained to about a third of the expert's return. The forge
(offbench/forge/) takes the SAC checkpoint whose evaluated return is closest to ref_min + (ref_max - ref_min) / 3,
so it lands as close to a third as its checkpoints allow: between two checkpoints the learning curve can jump
past the target. This runs `offbench data forge` on each env the forge has a CPU-sized preset for, at the
preset's checkpoint spacing and at a finer one, plus a shortened Hopper run (the `d4rl` preset's 1M SAC steps
take hours on a CPU: its numbers are for a 30k-step run, whose "expert" is its best checkpoint, far from
D4RL's), and tabulates for each run, on the normalized scale 100 * (return - ref_min) / (ref_max - ref_min):
the target (33.3), the medium checkpoint's evaluated score (10 episodes), the medium dataset's mean score, and
the two checkpoints that bracket the target (the last below it and the first above it, in training order).

    OMP_NUM_THREADS=1 python benchmarks/forge_medium.py     # all runs (about 20 minutes on one core of this CPU)
    python benchmarks/forge_medium.py --work /tmp/fm  # where the forged data goes (reused: a rerun resumes)

The forged data depends on the machine (SAC in float32; see `offbench data forge --help`): the table is this
machine's, the protocol line says which.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "results/forge"

# (label, env, extra forge arguments)
RUNS = [
    ("pendulum-small", "Pendulum-v1", []),
    ("pendulum-fine", "Pendulum-v1", ["--checkpoint-every", "50"]),
    ("invertedpendulum-small", "InvertedPendulum-v5", []),
    ("invertedpendulum-fine", "InvertedPendulum-v5", ["--checkpoint-every", "100"]),
    ("hopper-30k", "Hopper-v4", ["--sac-steps", "30000", "--start-steps", "5000", "--checkpoint-every", "1000",
                                 "--dataset-steps", "20000"]),
]


def normalized(value: float, ref_min: float, ref_max: float) -> float:
    return 100.0 * (value - ref_min) / (ref_max - ref_min)


def summary(label: str, env: str, extra: list[str], manifest: dict) -> dict:
    refs = manifest["references"]
    lo, hi = refs["ref_min"], refs["ref_max"]
    target = lo + manifest["config"]["medium_fraction"] * (hi - lo)
    checkpoints = manifest["sac"]["checkpoints"]
    below = [c for c in checkpoints if c["eval_return"] < target]
    above = [c for c in checkpoints if c["eval_return"] >= target]
    first_above = above[0] if above else None
    last_below = max((c for c in below if first_above is None or c["env_steps"] < first_above["env_steps"]),
                     key=lambda c: c["env_steps"], default=None)
    score = lambda c: None if c is None else normalized(c["eval_return"], lo, hi)  # noqa: E731
    return {
        "label": label,
        "env": env,
        "arguments": extra,
        "preset": manifest["config"]["preset"],
        "sac_steps": manifest["config"]["sac_steps"],
        "checkpoint_every": manifest["config"]["checkpoint_every"],
        "checkpoints": len(checkpoints),
        "ref_min": lo,
        "ref_max": hi,
        "target": normalized(target, lo, hi),
        "medium_env_steps": manifest["medium"]["env_steps"],
        "medium_checkpoint": normalized(manifest["medium"]["eval_return"], lo, hi),
        "medium_data": manifest["datasets"]["medium"]["normalized_mean"],
        "medium_fingerprint": manifest["datasets"]["medium"]["fingerprint"],  # which bytes (offbench/data/identity.py)
        "last_below": score(last_below),
        "last_below_env_steps": None if last_below is None else last_below["env_steps"],
        "first_above": score(first_above),
        "first_above_env_steps": None if first_above is None else first_above["env_steps"],
    }


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/offbench-forge-medium"), help="where the forged data goes")
    args = parser.parse_args()
    rows = []
    for label, env, extra in RUNS:
        out = args.work / label
        command = [sys.executable, "-m", "offbench.cli", "data", "forge", "--env", env, "--out", str(out), "--quiet", *extra]
        if not (out / "manifest.json").exists():
            print("$", " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True, cwd=REPO)
        manifest = json.loads((out / "manifest.json").read_text())
        rows.append(summary(label, env, extra, manifest))
        print(rows[-1], flush=True)
    import torch

    from offbench.perf import cpu_name

    threads = torch.get_num_threads()
    machine = (f"{cpu_name()}, Python {platform.python_version()}, torch {torch.__version__}, "
               f"{threads} torch thread{'s' if threads > 1 else ''} (the forged data depends on the machine and the thread "
               "count)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "medium.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Where the forge's medium level lands",
        "",
        f"`python benchmarks/forge_medium.py` on {machine}. Normalized scores 100 * (return - ref_min) / (ref_max - "
        "ref_min) with each run's own references (random policy and the run's expert checkpoint, 100 episodes each). "
        "target: a third of the way (D4RL's medium); medium checkpoint: its evaluated score (10 episodes); medium "
        "data: the mean episode score of the medium dataset (its rollouts); bracket: the last checkpoint below the "
        "target and the first at or above it (training order, with their env steps). hopper-30k is a 30k-step SAC "
        "run (the d4rl preset's 1M steps take hours on a CPU): its expert is its best checkpoint, not D4RL's.",
        "",
        "| run | env | checkpoint every | checkpoints | target | medium checkpoint | medium data | bracket (below -> above) "
        "| medium data fingerprint |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bracket = f"{fmt(r['last_below'])} ({r['last_below_env_steps']}) -> {fmt(r['first_above'])} ({r['first_above_env_steps']})"
        lines.append(f"| {r['label']} | {r['env']} | {r['checkpoint_every']} | {r['checkpoints']} | {fmt(r['target'])} | "
                     f"{fmt(r['medium_checkpoint'])} | {fmt(r['medium_data'])} | {bracket} | {r['medium_fingerprint']} |")
    (OUT / "medium.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'medium.md'} and medium.json")


if __name__ == "__main__":
    main()
