"""Aggregate training speed of N seeds as one batched computation (offbench/seeds.py) against N separate
single-seed processes on the same cores, per algorithm: results/perf/seeds.md and seeds.json.

For each algorithm (its configs/algorithms/*.yaml batch size and default networks, the synthetic dataset)
and each N in --copies:

- separate: N processes started together, each one seed's module, optimisers and sampler in a plain loop
  of `update()` calls (the training path without Lightning), with max(1, cores // N) torch threads each;
  after set-up and warm-up they wait at a barrier, then time --updates updates. Aggregate rate = N x updates /
  (last end - first start).
- batched: one process with `cores` torch threads, the N copies in a SeedBatch (copy k seeded as seed k's
  run), warmed up the same way, timing --updates batched updates. Aggregate rate = N x updates / time.

Speed-up = batched / separate. N = 1 compares one SeedBatch copy with the plain loop: the cost of the
machinery. Algorithms that cannot be batched (their `unbatchable` reason) are listed, not timed. Set-up,
warm-up and compilation are not timed; each measurement is one window, so on a shared machine expect
noise (the machine's load average is written beside the table).

    python benchmarks/seeds.py --configs $(ls configs/algorithms/*.yaml | grep -v diffuser)
                                                                # the CPU table (20 min on 2 cores; the planners'
                                                                # updates take seconds on a CPU: left out)
    python benchmarks/seeds.py --device cuda --copies 1 8 32    # the GPU rows (make gpu-check runs them)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET = "synthetic/hopper-random-v0"


def _setup(config: str, seeds: list[int], device: str, dataset: str, threads: int):
    """Modules, samplers and RNG states of `seeds` as their single-seed runs start training."""
    import lightning.pytorch as pl
    import torch

    from offbench.data.datamodule import OfflineDataModule
    from offbench.module import fused_optimizer
    from offbench.perf import load_algorithm_config

    torch.set_num_threads(threads)
    cls, init_args, data, _ = load_algorithm_config(Path(config))
    built = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        dm = OfflineDataModule(dataset, batch_size=data.get("batch_size", 256), normalize_obs=data.get("normalize_obs", False))
        model = cls(obs_dim=dm.obs_dim, act_dim=dm.act_dim, max_action=dm.max_action, **init_args).to(device)
        _setup_datamodule(dm, device)
        if hasattr(model, "prepare"):
            model.prepare(dm)
        elif type(model).__name__ == "DecisionDiffuser":
            model.attach_dataset(dm.transitions, dm.info.max_episode_steps)
        model.configure_optimizers()
        for optimizer in model._raw_optimizers():
            fused_optimizer(optimizer)
        cuda = torch.cuda.get_rng_state() if device.startswith("cuda") else None
        built.append((model, model.batch_source(dm), (torch.get_rng_state(), cuda)))
    return built


def _setup_datamodule(dm, device: str) -> None:
    """OfflineDataModule.setup on `device` without a Trainer."""
    import types

    dm.trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=__import__("torch").device(device)))
    dm.setup()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _separate_worker(config, seed, device, dataset, threads, updates, warmup, barrier, out) -> None:
    (model, sample, _), = _setup(config, [seed], device, dataset, threads)
    for _ in range(warmup):
        model.run_update(sample())
    _sync(device)
    barrier.wait()
    start = time.time()
    for _ in range(updates):
        model.run_update(sample())
    _sync(device)
    out.put((start, time.time()))


def _batched_worker(config, n, device, dataset, threads, updates, warmup, out) -> None:
    from offbench.seeds import CopyRNG, SeedBatch

    built = _setup(config, list(range(n)), device, dataset, threads)
    cpu, cuda = zip(*[states for _, _, states in built])
    batch = SeedBatch([m for m, _, _ in built], CopyRNG(list(cpu), None if cuda[0] is None else list(cuda)))
    samplers = [s for _, s, _ in built]
    for _ in range(warmup):
        batch.run_update([s() for s in samplers])
    _sync(device)
    start = time.time()
    for _ in range(updates):
        batch.run_update([s() for s in samplers])
    _sync(device)
    out.put((start, time.time()))


def measure(config: str, n: int, device: str, dataset: str, cores: int, updates: int, warmup: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(n)
    threads = max(1, cores // n)
    procs = [ctx.Process(target=_separate_worker, args=(config, seed, device, dataset, threads, updates, warmup, barrier, out))
             for seed in range(n)]
    for p in procs:
        p.start()
    spans = [out.get() for _ in procs]
    for p in procs:
        p.join()
    separate = n * updates / (max(e for _, e in spans) - min(s for s, _ in spans))
    p = ctx.Process(target=_batched_worker, args=(config, n, device, dataset, cores, updates, warmup, out))
    p.start()
    start, end = out.get()
    p.join()
    batched = n * updates / (end - start)
    return {"copies": n, "updates": updates, "separate_updates_per_s": separate, "batched_updates_per_s": batched,
            "speedup": batched / separate, "separate_threads_each": threads, "batched_threads": cores}


def probe_seconds(config: str, device: str, dataset: str, threads: int) -> float:
    """Seconds of one plain-loop update (after 3 of warm-up), to size the timing windows."""
    (model, sample, _), = _setup(config, [0], device, dataset, threads)
    for _ in range(3):
        model.run_update(sample())
    _sync(device)
    start = time.perf_counter()
    for _ in range(3):
        model.run_update(sample())
    _sync(device)
    return (time.perf_counter() - start) / 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", type=Path, default=sorted((REPO / "configs/algorithms").glob("*.yaml")))
    p.add_argument("--copies", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the measurement may use (default: all)")
    p.add_argument("--window", type=float, default=4.0, help="target seconds of a separate single-seed timing window")
    p.add_argument("--max-updates", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "results/perf/seeds.md")
    args = p.parse_args()

    import torch

    from offbench.perf import load_algorithm_config
    from offbench.seeds import unbatchable_reason

    rows, skipped = [], []
    started = time.time()
    for config in args.configs:
        cls = load_algorithm_config(config)[0]
        reason = unbatchable_reason(cls)
        if reason:
            skipped.append({"algorithm": config.stem, "reason": reason})
            print(f"{config.stem}: not batched ({reason})", flush=True)
            continue
        seconds = probe_seconds(str(config), args.device, args.dataset, 1)
        updates = int(min(args.max_updates, max(5, args.window / seconds)))
        for n in args.copies:
            row = {"algorithm": config.stem, **measure(str(config), n, args.device, args.dataset, args.cores, updates, args.warmup)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, rows, skipped, started, torch)
    write(args, rows, skipped, started, torch)
    return 0


def write(args, rows, skipped, started, torch) -> None:
    load = os.getloadavg()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()}, {args.cores} cores)"
    lines = [
        "# Many seeds as one batched computation: aggregate training speed",
        "",
        f"Written by `benchmarks/seeds.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.time() - started) / 60:.0f} min): "
        f"{device}, torch {torch.__version__}, dataset `{args.dataset}`, each algorithm at its configs/algorithms/ batch size "
        "and default networks. *separate*: N single-seed processes started together (plain update loop, "
        "max(1, cores // N) threads each), aggregate = N x updates / (last end - first start); *batched*: one process "
        "with every core, the N copies in one SeedBatch (offbench/seeds.py). One timing window each, after set-up and "
        f"warm-up; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min). "
        f"Command: `python benchmarks/seeds.py {' '.join(sys.argv[1:])}`.",
        "",
        "| algorithm | N | updates each | separate upd/s (sum) | batched upd/s (sum) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['copies']} | {r['updates']} | {r['separate_updates_per_s']:.1f} | "
                     f"{r['batched_updates_per_s']:.1f} | {r['speedup']:.2f}x |")
    if skipped:
        lines += ["", "Not batched (each trains its seeds one by one):", ""]
        lines += [f"- {s['algorithm']}: {s['reason']}" for s in skipped]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    js = args.out.with_suffix(".json")
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"device": device, "torch": torch.__version__, "dataset": args.dataset, "rows": rows,
                               "not_batched": skipped, "load_average": load}, indent=1))
    tmp.replace(js)


if __name__ == "__main__":
    sys.exit(main())
