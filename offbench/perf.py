"""`offbench perf` (`make perf`): training throughput of every algorithm of the suite side by side, with
Lightning and without, compiled, and evaluation env-steps/s with vectorised envs against one env at a time.

Rows: one per file of configs/algorithms/ (the suite's algorithms, listed from there and nowhere else) at its
settings, each followed by its rows in `EXTRA_ROWS` (the config with extra init args and a label: EDP with the
IQL rule, Diffusion-QL and DiffCPS with EDP's action approximation and at T = 100).
For each row: one OfflineDataModule and one module at the config's batch size and the class's default network
sizes, set up for the config's whole run (`updates`: what schedules such as IQL's cosine learning rate span) and
stopped after the epochs measured. Each row times `--updates` updates per window, or the fraction of it
`SLOW_ROWS` gives the rows whose update takes tenths of a second or more on a CPU (so that the default run fits
30 minutes on 2 CPU cores; `--equal-updates` times `--updates` everywhere); the table shows each row's count.
Lightning runs two epochs of those updates (the first is the warm-up); the second is timed. Then the same module,
optimisers and sampler run as many updates more in a plain Python loop (`module.run_update(sample())` with
`sample = module.batch_source(datamodule)`: transitions, or the trajectory planners' windows), timed the same
way, and again on the eager paths before issue 25 (`previous_paths`). The ratio of Lightning's time to the
plain loop's is Lightning's overhead. With `--compile` (as `make perf` runs it), the same module then switches
to the compiled path (`enable_compile`) and runs the plain loop's update numbers again, twice: the first
pass compiles every graph those updates need and warms up, the second is timed; the compile time
reported is the first pass's time minus the second's. Compiled modes: torch.compile's default
(inductor kernels, "compiled") everywhere, and on CUDA (`--device cuda`) also "reduce-overhead" (the same
kernels replayed as CUDA graphs, "cudagraphs", a column of its own), each after a torch._dynamo.reset().
On CUDA the clock is read after a device synchronisation. A compiled mode that fails is reported with
its error (the other measurements stand) and `offbench perf` then exits with status 1.
`--no-lightning` skips the Lightning timing (Lightning then only sets the module up).
Beside the rates, the diffusion rows' noise-model forward passes per update (`noise_models`: calls of the noise
or score network of every diffusion model in the module, EMA copies included, counted by forward hooks over the
plain loop; a batched call counts once; n/a for modules without one).
Evaluation: env steps/s of the evaluation loop for each `--eval-envs` count and for one env (and,
with `--eval-async-envs N`, for N envs stepped in subprocesses); for the trajectory planners (Diffuser,
Decision Diffuser), whose planning at every env step is their cost, also the env steps/s of their `act` at
their config's settings at `--planning-envs` envs (`measure_planning`: `--planning-calls` timed calls, after a
warm-up call on CUDA only; one env and one call by default, since a call plans for seconds to minutes on a CPU).
Results go to results/perf/perf.json and perf.md with the machine they were measured on.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lightning
import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from offbench import nets
from offbench.data.datamodule import OfflineDataModule
from offbench.diffusion import DiffusionPolicy, ScoreDiffusion
from offbench.errors import UserError
from offbench.evaluation import evaluate
from offbench.files import write_json_atomic, write_text_atomic
from offbench.grammar import DEVICE_HELP, DEVICES, Parser
from offbench.module import OfflineRLModule
from offbench.nets import DeterministicActor, Mish
from offbench.trajectory.planner_nets import PlannerUNet

REPO = Path(__file__).resolve().parents[1]


class PerfRow(NamedTuple):
    """One training measurement: a config, init args laid over its own, the label of its row, whether `--compile`
    compiles it, and the share of `--updates` it times (1/`divisor` of it)."""

    label: str
    config: Path
    init_args: dict[str, Any] = {}
    compile: bool = True
    divisor: int = 1


CONFIGS = REPO / "configs/algorithms"

# Rows measured beside a config's own row whenever that config is measured: the same algorithm with
# another setting whose cost matters (EDP's action approximation in the DDPM policies, EDP's IQL rule, T = 100).
# The T = 100 rows are timed eager only: their compiled update unrolls the 100-step reverse chain into one graph
# (diffusion_ql-T100: a generated kernel module of over 13,000 lines), whose compilation had not finished after 15
# minutes on this 2-core CPU (2026-12-07, shared with other jobs, load average 5-7).
EXTRA_ROWS = [
    PerfRow("edp-iql", CONFIGS / "edp.yaml", {"rule": "iql"}),
    PerfRow("diffusion_ql-approx", CONFIGS / "diffusion_ql.yaml", {"action_approximation": True}),
    PerfRow("diffusion_ql-T100", CONFIGS / "diffusion_ql.yaml", {"n_timesteps": 100, "beta_schedule": "linear_scaled"}, False),
    PerfRow("diffusion_ql-T100-approx", CONFIGS / "diffusion_ql.yaml",
            {"n_timesteps": 100, "beta_schedule": "linear_scaled", "action_approximation": True}, False),
    PerfRow("diffcps-approx", CONFIGS / "diffcps.yaml", {"action_approximation": True}),
    PerfRow("diffcps-T100", CONFIGS / "diffcps.yaml", {"n_timesteps": 100, "beta_schedule": "linear_scaled"}, False),
    PerfRow("diffcps-T100-approx", CONFIGS / "diffcps.yaml",
            {"n_timesteps": 100, "beta_schedule": "linear_scaled", "action_approximation": True}, False),
]

# The rows that time 1/n of `--updates` (row label: n), so that `make perf` (300 updates, --compile) fits 30
# minutes on 2 CPU cores. A row costs about 6 windows of its updates (Lightning's warm-up and timed epochs, the
# plain loop, the loop before issue 25, the compiled warm-up and timed passes; 4 without a compiled path) plus its
# compile time (up to about 30 s) and a few seconds of set-up. The divisors keep each row near a minute or less at
# the rates measured on this 2-core CPU with 2 torch threads (results/perf before the one-table run: Diffusion-QL
# 14 upd/s, IDQL 17, EDP 22, DiffCPS 24, ReBRAC 27, CQL 5.9, QGPO 3.1 and SfBC 2.5 at batch 4096; the T = 100
# rows 1.2-4.5 on one thread) and the planners' (about 1 s per Diffuser update and 5 s per Decision Diffuser
# update, from CPU seconds measured on the loaded machine).
SLOW_ROWS = {
    "rebrac": 2, "idql": 2, "edp": 2, "diffusion_ql": 2, "diffcps": 2, "diffusion_ql-approx": 2, "diffcps-approx": 2,
    "cql": 10, "diffusion_ql-T100-approx": 10, "diffcps-T100-approx": 10,
    "sfbc": 20, "qgpo": 20, "diffusion_ql-T100": 20, "diffcps-T100": 20,
    "diffuser": 30, "decision_diffuser": 100,
}


def perf_rows(configs: list[Path]) -> list[PerfRow]:
    """Each config's own row (labelled by its file name), each followed by its EXTRA_ROWS, with its SLOW_ROWS divisor."""
    rows = []
    for config in configs:
        rows.append(PerfRow(config.stem, config))
        rows += [row for row in EXTRA_ROWS if row.config.resolve() == config.resolve()]
    return [row._replace(divisor=SLOW_ROWS.get(row.label, 1)) for row in rows]


def row_updates(updates: int, divisor: int) -> int:
    """The updates a row times: 1/divisor of `updates`, at least one."""
    return max(1, updates // divisor)


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


class StopAfter(pl.Callback):
    """Ends fit after `epochs` epochs, whatever the trainer's max_epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def load_algorithm_config(path: Path) -> tuple[type[OfflineRLModule], dict[str, Any], dict[str, Any], int]:
    """(module class, its init_args, the data section, the run's updates or 0) of a configs/algorithms/*.yaml file."""
    config = yaml.safe_load(path.read_text())
    module_name, class_name = config["model"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls, dict(config["model"].get("init_args") or {}), dict(config.get("data") or {}), int(config.get("updates") or 0)


def gpu_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (None without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def describe(error: BaseException) -> str:
    """The exception's type and message on one line, without torch's hints on how to get more logs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Set TORCHDYNAMO_VERBOSE", "For even more developer context"))]
    return f"{type(error).__name__}: {' '.join(lines)}"[:500]


def resolve_accelerator(accelerator: str) -> str:
    """Lightning's accelerator name for "auto", "cpu", "gpu" or "cuda": "gpu" when CUDA is there for "auto"."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {accelerator}, but torch {torch.__version__} sees no CUDA device: use --device cpu "
                            "(or auto), or run on a machine with CUDA and a CUDA build of torch")
        return "gpu"
    if accelerator != "cpu":
        raise UserError(f"--device must be auto, cpu or cuda, got {accelerator!r}")
    return "cpu"


def compile_modes(accelerator: str) -> dict[str, str]:
    """{result name: torch.compile mode} of the compiled path on this accelerator."""
    modes = {"compiled": "default"}
    if accelerator == "gpu":
        modes["cudagraphs"] = "reduce-overhead"
    return modes


def measure_training(
    config: Path, dataset: str, updates: int, block_size: int, accelerator: str, compile_update: bool = False,
    lightning: bool = True, progress: Callable[[dict[str, Any]], None] | None = None,
    extra_init_args: dict[str, Any] | None = None, label: str | None = None,
) -> dict[str, Any]:
    """Updates/s of one algorithm config: Lightning, plain loop, and (with `compile_update`) each compiled mode.
    Without `lightning`, Lightning only sets the module up (one epoch of a few updates) and is not timed.
    `progress` gets the row as it stands after each measurement (a caller that may be stopped keeps those)."""
    began = time.perf_counter()
    accelerator = resolve_accelerator(accelerator)
    cls, init_args, data, run_updates = load_algorithm_config(config)
    init_args |= extra_init_args or {}
    epoch = updates if lightning else min(updates, 10)
    block_size = min(block_size, epoch)
    dm = OfflineDataModule(
        dataset, batch_size=data.get("batch_size", 256), eval_every=epoch, block_size=block_size,
        normalize_obs=data.get("normalize_obs", False),
    )
    model = cls(obs_dim=dm.obs_dim, act_dim=dm.act_dim, max_action=dm.max_action, **init_args)
    timer = EpochTimer()
    epochs = 2 if lightning else 1
    # The trainer is told the config's whole run (what schedules over the run, e.g. IQL's cosine learning
    # rate, are set up from) and stopped after the epochs measured here.
    run_epochs = max(epochs, -(-run_updates // epoch))
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_epochs=run_epochs, accelerator=accelerator, devices=1, logger=CSVLogger(logs),
            callbacks=[timer, StopAfter(epochs)], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, log_every_n_steps=1,
        )
        trainer.fit(model, dm)  # also what sets the module up: device, optimisers, the dataset hooks
    lightning_seconds = timer.seconds[1] if lightning else None  # epoch 0 was the warm-up
    back_to_device(model, trainer.strategy.root_device)
    modes = compile_modes(accelerator)
    row: dict[str, Any] = {
        "label": label or config.stem,
        "algorithm": f"{cls.__module__}.{cls.__qualname__}",
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "batch_size": dm.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "updates_timed": updates,
        "block_size": block_size,
        "extra_init_args": extra_init_args or {},
        "noise_model_calls_per_update": None,
        "lightning_updates_per_s": updates / lightning_seconds if lightning else None,
        "plain_updates_per_s": None,
        "plain_previous_updates_per_s": None,
        "lightning_overhead_pct": None,
        **{key: None for name in modes for key in (f"{name}_updates_per_s", _seconds_key(name))},
        "errors": {},
        "compiled_path": has_compiled_path(model),
        "seconds": None,
    }

    # The same update, sampler and optimisers in a plain loop: what the update costs without Lightning,
    # over the same update numbers as the timed epoch (phases and cadences, e.g. AWR's value and policy
    # phases or a policy delay, make some updates cost more than others).
    first = updates
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in noise_models(model)]
    plain_seconds = _time_updates(model, dm, updates, first)
    for hook in hooks:
        hook.remove()
    with previous_paths(model):  # the same loop on the eager paths before issue 25: what the new ones gained
        row["plain_previous_updates_per_s"] = updates / _time_updates(model, dm, updates, first)
    if hooks:
        row["noise_model_calls_per_update"] = calls[0] / updates
    row["plain_updates_per_s"] = updates / plain_seconds
    if lightning:
        row["lightning_overhead_pct"] = 100.0 * (lightning_seconds / plain_seconds - 1.0)
    for name, mode in modes.items():
        if progress is not None:
            progress(row)
        if not compile_update or not row["compiled_path"]:  # nothing to compile: n/a, said under the table
            continue
        # The plain loop's update numbers again (the same cadence: policy delays, phases), compiled.
        # Dynamo's recompile limit counts per code object and process: the shared `optimize` is compiled
        # once per optimiser, so every algorithm and mode starts from a clean slate rather than the last ones' count.
        torch._dynamo.reset()
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        try:
            model.enable_compile(mode)
            warmup_seconds, compiled_seconds = (_time_updates(model, dm, updates, first) for _ in range(2))
        except Exception as error:  # reported in the row and by the exit status; the other modes still run
            traceback.print_exc()
            row["errors"][name] = describe(error)
            continue
        row[f"{name}_updates_per_s"] = updates / compiled_seconds
        row[_seconds_key(name)] = warmup_seconds - compiled_seconds
        if name == "cudagraphs":  # graphs inductor ran without CUDA graphs (its log says why)
            row["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
    row["seconds"] = time.perf_counter() - began
    if progress is not None:
        progress(row)
    return row


def has_compiled_path(model: OfflineRLModule) -> bool:
    """Whether the module marks a method @compilable (the most derived definition, as `enable_compile` reads it):
    without one there is no compiled path to time (Decision Diffuser's update is eager only)."""
    return any(getattr(getattr(type(model), name, None), "compilable", False) for name in dir(type(model)))


def noise_models(model: nn.Module) -> list[nn.Module]:
    """The noise (or score) networks of a module's diffusion models, whose forward passes per update the table
    counts: the network of every DiffusionPolicy (NoiseMLP; IDQL's LN-ResNet) and ScoreDiffusion (SfBC's and
    QGPO's ScoreNet; QGPO's guided sampler calls it), and every PlannerUNet (Diffuser, Decision Diffuser),
    EMA copies included."""
    found = {id(m.model): m.model for m in model.modules() if isinstance(m, (DiffusionPolicy, ScoreDiffusion))}
    found |= {id(m): m for m in model.modules() if isinstance(m, PlannerUNet)}
    return list(found.values())


@contextlib.contextmanager
def previous_paths(model: OfflineRLModule) -> Iterator[None]:
    """For the duration: the eager paths before issue 25, torch's default optimiser steps (a per-parameter loop
    on the CPU) instead of the fused kernels, torch's nn.Mish instead of offbench.nets.Mish, and aten's
    matmuls instead of oneDNN's for the float32 CPU layers (offbench.nets.linear) and of per-member products for
    the ensembles' small output layers (offbench.nets.SMALL_OUTPUT_LOOP)."""
    groups = [(group, group["fused"], group["foreach"]) for opt in model._raw_optimizers() for group in opt.param_groups
              if "fused" in group and "foreach" in group]
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, Mish)]
    for group, _, _ in groups:
        group["fused"] = group["foreach"] = None
    for parent, name, _ in swapped:
        setattr(parent, name, nn.Mish())
    onednn, nets._ONEDNN = nets._ONEDNN, False
    loop, nets.SMALL_OUTPUT_LOOP = nets.SMALL_OUTPUT_LOOP, False
    try:
        yield
    finally:
        nets._ONEDNN, nets.SMALL_OUTPUT_LOOP = onednn, loop
        for group, fused, foreach in groups:
            group["fused"], group["foreach"] = fused, foreach
        for parent, name, child in swapped:
            setattr(parent, name, child)


def back_to_device(model: OfflineRLModule, device: torch.device) -> None:
    """Lightning's teardown at the end of fit moves the module and its optimisers' states to the CPU; the
    plain loops run on the device the sampler's tensors are on, so put them back (Adam's `step` counters
    stay where they are: on the CPU unless capturable, as torch.optim keeps them)."""
    model.to(device)
    for optimizer in model._raw_optimizers():
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)


def _time_updates(model: OfflineRLModule, dm: OfflineDataModule, updates: int, first: int | None = None) -> float:
    """Seconds for `updates` updates in a plain loop, from update number `first` (default: where the module is)."""
    if first is not None:
        model.step = first
        model.updates.fill_(first)
    sample = model.batch_source(dm)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(updates):
        model.run_update(sample())
    _sync(model.device)
    return time.perf_counter() - start


def measure_evaluation(
    dataset: str, episodes: int, num_envs: int | list[int], accelerator: str, async_envs: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Env steps/s of the evaluation loop with each of `num_envs` envs and with one, for an MLP policy,
    and with `async_envs` envs in subprocesses (gymnasium's AsyncVectorEnv) when it is positive.
    `episodes` per measurement, at least as many as envs (every env slot runs an episode). `progress`
    gets the result as it stands after each run."""
    dm = OfflineDataModule(dataset)
    device = torch.device("cuda" if resolve_accelerator(accelerator) == "gpu" else "cpu")
    policy = DeterministicActor(dm.obs_dim, dm.act_dim, dm.max_action).to(device).eval()
    counts = sorted({*(num_envs if isinstance(num_envs, list) else [num_envs]), 1}, reverse=True)
    result: dict[str, Any] = {
        "dataset": dataset, "env_id": dm.info.env_id, "device": str(device),
        "policy": "untrained 2x256 MLP (DeterministicActor)", "runs": [],
    }
    for n, asynchronous in [(n, False) for n in counts] + ([(async_envs, True)] if async_envs > 0 else []):
        run = evaluate(policy, dm.info, max(episodes, n), num_envs=n, seed=0, device=device, asynchronous=asynchronous)
        rate = run["env_steps"] / run["seconds"]
        result["runs"].append({"envs": n, "asynchronous": asynchronous, "episodes": run["episodes"], "env_steps": run["env_steps"],
                               "seconds": run["seconds"], "env_steps_per_s": rate})
        result[f"env_steps_per_s_{n}_env{'s' if n > 1 else ''}{'_async' if asynchronous else ''}"] = rate
        if progress is not None:
            progress(result)
    return result


def measure_planning(config: Path, dataset: str, num_envs: list[int], accelerator: str, calls: int = 3) -> dict[str, Any]:
    """Evaluation env steps/s of a trajectory planner (a module with `plan`, e.g. Diffuser) at its config's
    settings (the official batch of plans): seconds of `calls` calls of `act` on the observations of n envs at
    once, for each n of `num_envs` and 1; on CUDA after one warm-up call (lazy initialisation, kernel selection),
    on the CPU without (one call plans for seconds to minutes there: Decision Diffuser's 200 steps of a U-Net on
    a 100-step window; what a first call adds, memory allocation, is small beside it). The planner's weights are
    untrained (the cost does not depend on them) and the env stepping is left out (negligible beside the
    planning: tens of ms per step)."""
    cls, init_args, data, _ = load_algorithm_config(config)
    dm = OfflineDataModule(dataset, batch_size=data.get("batch_size", 256), normalize_obs=data.get("normalize_obs", False))
    device = torch.device("cuda" if resolve_accelerator(accelerator) == "gpu" else "cpu")
    model = cls(obs_dim=dm.obs_dim, act_dim=dm.act_dim, max_action=dm.max_action, **init_args).to(device).eval()
    if hasattr(model, "attach_dataset"):  # acting reads tables built from the data (Decision Diffuser's CDF normaliser)
        model.attach_dataset(dm.transitions, dm.info.max_episode_steps)
    row: dict[str, Any] = {"label": config.stem, "algorithm": f"{cls.__module__}.{cls.__qualname__}", "device": str(device),
                           "settings": {k: init_args[k] for k in ("horizon", "n_timesteps", "n_plans") if k in init_args},
                           "warm_up_call": device.type == "cuda", "runs": []}
    for n in sorted({*num_envs, 1}, reverse=True):
        obs = dm.normalize_obs(torch.as_tensor(dm.transitions.obs[:n], device=device))
        with torch.no_grad():
            if device.type == "cuda":
                model.act(obs)
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                model.act(obs)
            _sync(device)
        seconds = (time.perf_counter() - start) / calls
        row["runs"].append({"envs": n, "calls": calls, "seconds_per_step": seconds, "env_steps_per_s": n / seconds})
    return row


def _seconds_key(name: str) -> str:
    return "compile_seconds" if name == "compiled" else f"{name}_compile_seconds"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor or machine name."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({cpu_name()})",
        "driver": gpu_driver() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def training_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of `measure_training` rows (n/a: a mode not run or failed). The CUDA graphs columns
    are there when a row was measured with them (on CUDA)."""
    cudagraphs = any("cudagraphs_updates_per_s" in r for r in rows)
    lines = [
        "| row | algorithm | batch | params | updates | block | Lightning upd/s | plain upd/s | plain before #25 upd/s "
        "| eps calls/upd | overhead | compiled upd/s | compile s |" + (" CUDA graphs upd/s | compile s |" if cudagraphs else ""),
        "|---" * (15 if cudagraphs else 13) + "|",
    ]
    for r in rows:
        calls, extra = r.get("noise_model_calls_per_update"), r.get("extra_init_args") or {}
        label = r.get("label", "") + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")
        lines.append(
            f"| {label} | {r['algorithm']} | {r['batch_size']} | {r['parameters']:,} | {r['updates_timed']} | {r['block_size']} "
            f"| {_rate(r['lightning_updates_per_s'])} | {_rate(r['plain_updates_per_s'])} | {_rate(r.get('plain_previous_updates_per_s'))} "
            f"| {'n/a' if calls is None else f'{calls:g}'} "
            f"| {_percent(r['lightning_overhead_pct'])} "
            f"| {_rate(r.get('compiled_updates_per_s'))} | {_rate(r.get('compile_seconds'))} |"
            + (f" {_rate(r.get('cudagraphs_updates_per_s'))} | {_rate(r.get('cudagraphs_compile_seconds'))} |" if cudagraphs else "")
        )
    notes = []
    for r in rows:
        if r.get("not_compiled"):
            notes.append(f"- {r['label']}: not compiled by offbench perf ({r['not_compiled']})")
        if r.get("compiled_path") is False:
            notes.append(f"- {r.get('label', r['algorithm'])}: no compiled path (no method of {r['algorithm']} is marked "
                         "@compilable), so its compiled columns are n/a")
        for mode, error in (r.get("errors") or {}).items():
            notes.append(f"- {r.get('label', r['algorithm'])}, {mode}: failed with {error}")
        if r.get("cudagraph_skips"):
            notes.append(f"- {r.get('label', r['algorithm'])}: {r['cudagraph_skips']} graph(s) ran without CUDA graphs (inductor's log says why)")
    return lines + ([""] + notes if notes else [])


def updates_line(report: dict[str, Any]) -> str:
    """The protocol's sentence on the updates per timing window: `--updates`, and the rows that time fewer."""
    updates, reduced = report["updates"], [r for r in report["training"] if r["updates_timed"] < report["updates"]]
    line = f"Updates per timing window (`updates`): {updates}"
    if not reduced:
        return line + " for every row."
    return line + (", except the rows whose update is slow on a CPU, which time a fraction of it (`SLOW_ROWS` of "
                   "offbench/perf.py; `--equal-updates` times all alike) so that the whole run fits 30 minutes on 2 CPU "
                   "cores: " + ", ".join(f"{r['label']} {r['updates_timed']}" for r in reduced) + ".")


def evaluation_lines(e: dict[str, Any]) -> list[str]:
    """One line per run of a `measure_evaluation` result."""
    return [
        f"- {r['envs']} env{'s' if r['envs'] > 1 else ''}{' in subprocesses (async)' if r['asynchronous'] else ''}: "
        f"{r['env_steps_per_s']:.0f} env steps/s ({r['episodes']} episodes of {r['env_steps'] / r['episodes']:.0f} steps on average)"
        for r in e["runs"]
    ]


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    m = report["machine"]
    e = report["evaluation"]
    cuda = "" if m.get("cuda") is None else f", CUDA {m['cuda']}, driver {m['driver']}"
    lines = [
        "# Training throughput",
        "",
        f"Measured on {m['device']}{cuda}, {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"Lightning {m['lightning']}, Python {m['python']}, dataset `{report['dataset']}`, in one run of "
        f"{report['seconds'] / 60:.0f} minutes. {updates_line(report)} Each row: its config's batch size and "
        "default network sizes (rows with extra init args name them after the label); Lightning = second of two epochs of "
        "`updates` updates (the first is warm-up), blocks of `block` updates per training_step, CSV logging on; plain = "
        "the same module, optimisers and sampler (the module's `batch_source`: transitions, or the trajectory planners' "
        "windows) calling update() in a Python loop over the same update numbers (the same phases); plain before #25 = the same "
        "loop on the eager paths before issue 25 (torch's default per-parameter optimiser steps instead of the fused kernels, "
        "torch's nn.Mish instead of offbench.nets.Mish, aten's matmuls instead of oneDNN's). One timing "
        "window each: on a shared or virtual machine expect several percent of noise. Overhead = Lightning time / plain time - 1. "
        "Compiled = the plain loop's update numbers again after `enable_compile()` (torch.compile, inductor's default mode), "
        "timed after a first pass that compiles and warms up; compile s = that pass's time minus the timed one's; CUDA "
        "graphs (on CUDA only, `--device cuda`) = the same with mode reduce-overhead. n/a: not run (the compiled columns "
        "without --compile, Lightning's with --no-lightning; the notes under the table say why for a row) or failed. eps calls = forward passes of the diffusion models' noise (or score) networks per update "
        "(batched calls, EMA copies included, counted over the plain loop; n/a: no diffusion model).",
        "",
        *training_table(report["training"]),
        "",
        "# Evaluation",
        "",
        f"`{e['env_id']}` with an {e['policy']} on {e['device']}, one policy call per step for all "
        "vectorised envs (in-process unless said otherwise):",
        "",
        *evaluation_lines(e),
        "",
    ]
    if report.get("planning"):
        lines += ["# Evaluation of the trajectory planners", "",
                  "Env steps/s of `act` alone (the planning at every env step; untrained weights, env stepping left out), "
                  "at each config's settings (the official batch of plans); on CUDA after a warm-up call:", ""]
        for row in report["planning"]:
            lines += [f"- {row['label']} ({row['settings']}, {row['device']}): " + ", ".join(
                f"{r['envs']} env{'s' if r['envs'] > 1 else ''} {r['env_steps_per_s']:.2f} env steps/s "
                f"({r['seconds_per_step']:.2f} s per step, {r['calls']} call{'s' if r['calls'] > 1 else ''})" for r in row["runs"])]
        lines.append("")
    write_json_atomic(out_dir / "perf.json", report)
    write_text_atomic(out_dir / "perf.md", "\n".join(lines))


def _check_configs_and_out(configs: list[Path], out: Path) -> None:
    """At least one config file, each there, and an output folder that is not a file: UserError otherwise."""
    if not configs:
        raise UserError("--configs names no file: name configs/algorithms/*.yaml files, or leave --configs out "
                        "to measure every algorithm")
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise UserError(f"--configs: no config file {', '.join(missing)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: --out names the folder that gets perf.md and perf.json")


def main(argv: list[str]) -> int:
    parser = Parser(prog="offbench perf", description=__doc__.split("\n\n")[0], renamed={"--accelerator": ["--device"]})
    parser.add_argument("--configs", nargs="*", type=Path, default=sorted(CONFIGS.glob("*.yaml")),
                        help="algorithm configs to time (default: every file of configs/algorithms/, the suite's algorithms)")
    parser.add_argument("--dataset", default="synthetic/hopper-random-v0", help="the dataset trained and evaluated on (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=300,
                        help="updates timed per measurement (default: %(default)s); the slow rows time a fraction of it")
    parser.add_argument("--equal-updates", action="store_true", help="every row times --updates (no fewer for the slow rows)")
    parser.add_argument("--block-size", type=int, help="updates per Lightning training_step (default: the row's updates, one call per epoch)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation measurement (at least one per env)")
    parser.add_argument("--eval-envs", type=int, nargs="+", default=[10], help="vectorised env counts to time (and always 1)")
    parser.add_argument("--eval-async-envs", type=int, default=0, help="also time this many envs in subprocesses (0: no)")
    parser.add_argument("--planning-envs", type=int, nargs="+", default=[1],
                        help="env counts whose planning a trajectory planner's act() is timed at (default: %(default)s)")
    parser.add_argument("--planning-calls", type=int, default=1,
                        help="timed act() calls of a trajectory planner per env count (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "results/perf", help="folder for perf.md and perf.json")
    parser.add_argument(
        "--compile", action="store_true",
        help="also time the compiled update (enable_compile): inductor's default mode, and CUDA graphs on CUDA",
    )
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning timing (plain and compiled loops only)")
    args = parser.parse_args(argv)
    if args.updates <= 0 or (args.block_size is not None and args.block_size <= 0):
        parser.error("--updates and --block-size must be positive")
    if min(args.eval_episodes, *args.eval_envs, *args.planning_envs, args.planning_calls) <= 0:
        parser.error("--eval-episodes, --eval-envs, --planning-envs and --planning-calls must be positive")
    resolve_accelerator(args.device)  # an unknown or absent accelerator stops here, before any measurement
    _check_configs_and_out(args.configs, args.out)  # so do these: a run measures for minutes before it writes
    began = time.perf_counter()
    training = []
    for perf_row in perf_rows(args.configs):
        updates = args.updates if args.equal_updates else row_updates(args.updates, perf_row.divisor)
        result = measure_training(
            perf_row.config, args.dataset, updates, args.block_size or updates, args.device, args.compile and perf_row.compile,
            not args.no_lightning, extra_init_args=perf_row.init_args, label=perf_row.label,
        )
        if args.compile and not perf_row.compile:
            result["not_compiled"] = "its compiled update unrolls the 100-step reverse chain: minutes of compilation on a CPU"
        compiled = "".join(
            f", {name} {_rate(result[f'{name}_updates_per_s'])} upd/s (compile {_rate(result[_seconds_key(name)])} s)"
            for name in compile_modes(resolve_accelerator(args.device)) if args.compile
        )
        print(
            f"{result['label']} ({result['algorithm']}, {updates} updates, {result['seconds']:.0f} s): Lightning "
            f"{_rate(result['lightning_updates_per_s'])} upd/s, plain {result['plain_updates_per_s']:.1f} upd/s, overhead "
            f"{_percent(result['lightning_overhead_pct'])}{compiled}",
            flush=True,
        )
        for mode, error in result["errors"].items():
            print(f"{result['algorithm']}: {mode} failed: {error}", file=sys.stderr, flush=True)
        training.append(result)
    evaluation = measure_evaluation(args.dataset, args.eval_episodes, args.eval_envs, args.device, args.eval_async_envs)
    planning = []
    for config in args.configs:
        if hasattr(load_algorithm_config(config)[0], "plan"):
            row = measure_planning(config, args.dataset, args.planning_envs, args.device, args.planning_calls)
            print(f"{row['label']} planning: " + ", ".join(f"{r['envs']} envs {r['env_steps_per_s']:.2f} env steps/s"
                                                            for r in row["runs"]), flush=True)
            planning.append(row)
    report = {"machine": machine(), "dataset": args.dataset, "updates": args.updates, "equal_updates": args.equal_updates,
              "compile": args.compile, "lightning": not args.no_lightning, "seconds": time.perf_counter() - began,
              "training": training, "evaluation": evaluation, "planning": planning}
    write_report(report, args.out)
    print(f"wrote {args.out / 'perf.md'} and perf.json ({report['seconds'] / 60:.1f} minutes)")
    return 1 if any(r["errors"] for r in training) else 0
