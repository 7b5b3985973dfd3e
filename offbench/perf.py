"""`offbench perf`: training throughput of every algorithm, with Lightning and without, and
evaluation env-steps/s with vectorised envs against one env at a time.

For each algorithm config: one OfflineDataModule and one module at the config's batch size and the
class's default network sizes. Lightning runs two epochs of `updates` updates (the first is the
warm-up); the second is timed. Then the same module, optimisers and sampler run `updates` more
updates in a plain Python loop (`module.update(dm.sample())`), timed the same way. The ratio of the
two is Lightning's overhead. With `--compile` (as `make perf` runs it), the same module then switches to
the compiled path (`enable_compile`: torch.compile, CUDA graphs on CUDA) and runs the plain loop's
update numbers again, twice: the first pass compiles every graph those updates need and warms up,
the second is timed; the compile time reported is the first pass's time minus the second's.
On CUDA the clock is read after a device synchronisation.
Rows: one per config at its settings, plus the rows of `EXTRA_ROWS` whose config is measured (a config
with extra init args and a label, e.g. EDP with the IQL rule). Beside the rates, the noise model's forward
passes per update (calls of every `NoiseMLP` in the module, counted by forward hooks over the plain
loop; a batched call counts once; n/a for modules without one).
Results go to results/perf/perf.json and perf.md with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import lightning
import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from offbench.data.datamodule import OfflineDataModule
from offbench.diffusion import NoiseMLP
from offbench.evaluation import evaluate
from offbench.files import write_json_atomic, write_text_atomic
from offbench.module import OfflineRLModule
from offbench.nets import DeterministicActor

REPO = Path(__file__).resolve().parents[1]


class PerfRow(NamedTuple):
    """One training measurement: a config, init args laid over its own, and the label of its row."""

    label: str
    config: Path
    init_args: dict[str, Any] = {}


# Rows measured beside a config's own row whenever that config is measured.
EXTRA_ROWS = [
    PerfRow("edp-iql", REPO / "configs/algorithms/edp.yaml", {"rule": "iql"}),
]


def perf_rows(configs: list[Path]) -> list[PerfRow]:
    """Each config's own row (labelled by its file name), each followed by its EXTRA_ROWS."""
    rows = []
    for config in configs:
        rows.append(PerfRow(config.stem, config))
        rows += [row for row in EXTRA_ROWS if row.config.resolve() == config.resolve()]
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, read after a device sync."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


def load_algorithm_config(path: Path) -> tuple[type[OfflineRLModule], dict[str, Any], dict[str, Any]]:
    """(module class, its init_args, the data section) of a configs/algorithms/*.yaml file."""
    config = yaml.safe_load(path.read_text())
    module_name, class_name = config["model"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls, dict(config["model"].get("init_args") or {}), dict(config.get("data") or {})


def measure_training(
    config: Path, dataset: str, updates: int, block_size: int, accelerator: str, compile_update: bool = False,
    extra_init_args: dict[str, Any] | None = None, label: str | None = None,
) -> dict[str, Any]:
    cls, init_args, data = load_algorithm_config(config)
    init_args |= extra_init_args or {}
    dm = OfflineDataModule(
        dataset, batch_size=data.get("batch_size", 256), eval_every=updates, block_size=block_size,
        normalize_obs=data.get("normalize_obs", False),
    )
    model = cls(obs_dim=dm.obs_dim, act_dim=dm.act_dim, max_action=dm.max_action, **init_args)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_epochs=2, accelerator=accelerator, devices=1, logger=CSVLogger(logs), callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=1,
        )
        trainer.fit(model, dm)
    lightning_seconds = timer.seconds[1]  # epoch 0 was the warm-up

    # The same update, sampler and optimisers in a plain loop: what the update costs without Lightning,
    # over the same update numbers as the timed epoch (phases and cadences, e.g. AWR's value and policy
    # phases or a policy delay, make some updates cost more than others).
    first = updates
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in model.modules() if isinstance(m, NoiseMLP)]
    plain_seconds = _time_updates(model, dm, updates, first)
    for hook in hooks:
        hook.remove()
    compiled: dict[str, Any] = {"compiled_updates_per_s": None, "compile_seconds": None}
    if compile_update:
        # The plain loop's update numbers again (the same cadence: policy delays, phases), compiled.
        # Dynamo's recompile limit counts per code object and process: the shared `optimize` is compiled
        # once per optimiser, so every algorithm starts from a clean slate rather than the last ones' count.
        torch._dynamo.reset()
        model.enable_compile()
        warmup_seconds, compiled_seconds = (_time_updates(model, dm, updates, first) for _ in range(2))
        compiled = {
            "compiled_updates_per_s": updates / compiled_seconds,
            "compile_seconds": warmup_seconds - compiled_seconds,
        }
    return {
        "label": label or config.stem,
        "algorithm": f"{cls.__module__}.{cls.__qualname__}",
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "extra_init_args": extra_init_args or {},
        "noise_model_calls_per_update": calls[0] / updates if hooks else None,
        "batch_size": dm.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "updates_timed": updates,
        "block_size": block_size,
        "lightning_updates_per_s": updates / lightning_seconds,
        "plain_updates_per_s": updates / plain_seconds,
        "lightning_overhead_pct": 100.0 * (lightning_seconds / plain_seconds - 1.0),
        **compiled,
    }


def _time_updates(model: OfflineRLModule, dm: OfflineDataModule, updates: int, first: int | None = None) -> float:
    """Seconds for `updates` updates in a plain loop, from update number `first` (default: where the module is)."""
    if first is not None:
        model.step = first
        model.updates.fill_(first)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(updates):
        model.run_update(dm.sample())
    _sync(model.device)
    return time.perf_counter() - start


def measure_evaluation(dataset: str, episodes: int, num_envs: int, accelerator: str) -> dict[str, Any]:
    """Env steps/s of the evaluation loop with `num_envs` envs and with one, for an MLP policy."""
    dm = OfflineDataModule(dataset)
    device = torch.device("cuda" if accelerator in ("gpu", "cuda") else "cpu")
    policy = DeterministicActor(dm.obs_dim, dm.act_dim, dm.max_action).to(device).eval()
    rates = {}
    for n in (num_envs, 1):
        result = evaluate(policy, dm.info, episodes, num_envs=n, seed=0, device=device)
        rates[n] = result["env_steps"] / result["seconds"]
    return {
        "dataset": dataset, "env_id": dm.info.env_id, "episodes": episodes,
        "policy": "untrained 2x256 MLP (DeterministicActor)",
        f"env_steps_per_s_{num_envs}_envs": rates[num_envs], "env_steps_per_s_1_env": rates[1],
    }


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    m = report["machine"]
    lines = [
        "# Training throughput",
        "",
        f"Measured on {m['device']}, {m['torch_threads']} torch threads, torch {m['torch']}, Lightning "
        f"{m['lightning']}, dataset `{report['dataset']}`. Each algorithm: its config's batch size and "
        "default network sizes; Lightning = second of two epochs of `updates` updates (the first is warm-up), "
        "blocks of `block` updates per training_step, CSV logging on; plain = the same module, optimisers and "
        "sampler calling update() in a Python loop over the same update numbers (the same phases). One timing "
        "window each: on a shared or virtual machine expect several percent of noise. Overhead = Lightning time / plain time - 1. Compiled = the "
        "plain loop's update numbers again after `enable_compile()` (torch.compile; CUDA graphs on CUDA), timed "
        "after a first pass that compiles and warms up; compile s = that pass's time minus the timed one's "
        "(n/a: run without --compile). eps calls = forward passes of the diffusion noise model per update (batched "
        "calls, counted over the plain loop; n/a: no NoiseMLP). Rows with extra init args name them after the label.",
        "",
        "| row | algorithm | batch | params | updates | block | Lightning upd/s | plain upd/s | eps calls/upd | overhead "
        "| compiled upd/s | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["training"]:
        rate, seconds = r.get("compiled_updates_per_s"), r.get("compile_seconds")
        calls, extra = r.get("noise_model_calls_per_update"), r.get("extra_init_args") or {}
        row = r.get("label", "") + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")
        lines.append(
            f"| {row} | {r['algorithm']} | {r['batch_size']} | {r['parameters']:,} | {r['updates_timed']} | {r['block_size']} "
            f"| {r['lightning_updates_per_s']:.1f} | {r['plain_updates_per_s']:.1f} | {'n/a' if calls is None else f'{calls:g}'} "
            f"| {r['lightning_overhead_pct']:+.1f}% "
            f"| {'n/a' if rate is None else f'{rate:.1f}'} | {'n/a' if seconds is None else f'{seconds:.1f}'} |"
        )
    e = report["evaluation"]
    n = report["eval_envs"]
    lines += [
        "",
        "# Evaluation",
        "",
        f"{e['episodes']} episodes of `{e['env_id']}` with an {e['policy']}: "
        f"{e[f'env_steps_per_s_{n}_envs']:.0f} env steps/s with {n} vectorised envs (one policy call per "
        f"step for all), {e['env_steps_per_s_1_env']:.0f} env steps/s with one env.",
        "",
    ]
    write_json_atomic(out_dir / "perf.json", report)
    write_text_atomic(out_dir / "perf.md", "\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="offbench perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", type=Path, default=sorted((REPO / "configs/algorithms").glob("*.yaml")))
    parser.add_argument("--dataset", default="synthetic/hopper-random-v0")
    parser.add_argument("--updates", type=int, default=500, help="updates timed per measurement")
    parser.add_argument("--block-size", type=int, default=250, help="updates per Lightning training_step")
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--eval-envs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "results/perf")
    parser.add_argument("--compile", action="store_true", help="also time the compiled update (enable_compile)")
    args = parser.parse_args(argv)
    if args.updates <= 0 or args.block_size <= 0:
        parser.error("--updates and --block-size must be positive")
    training = []
    for row in perf_rows(args.configs):
        result = measure_training(row.config, args.dataset, args.updates, args.block_size, args.accelerator, args.compile,
                                  row.init_args, row.label)
        compiled = (
            f", compiled {result['compiled_updates_per_s']:.1f} upd/s (compile {result['compile_seconds']:.0f} s)"
            if args.compile else ""
        )
        print(
            f"{result['label']} ({result['algorithm']}): Lightning {result['lightning_updates_per_s']:.1f} upd/s, plain "
            f"{result['plain_updates_per_s']:.1f} upd/s, overhead {result['lightning_overhead_pct']:+.1f}%{compiled}",
            flush=True,
        )
        training.append(result)
    evaluation = measure_evaluation(args.dataset, args.eval_episodes, args.eval_envs, args.accelerator)
    report = {
        "machine": machine(), "dataset": args.dataset, "training": training, "evaluation": evaluation,
        "eval_envs": args.eval_envs,
    }
    write_report(report, args.out)
    print(f"wrote {args.out / 'perf.md'} and perf.json")
    return 0
