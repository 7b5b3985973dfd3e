"""`offbench gpu-check` (`make gpu-check`): every CUDA-specific check and measurement of the suite in one
go, within a time budget (440 s by default, then at most 120 s of the seeds part), for GPU machines that
are lent for a short while.

Parts, each in its own process with its own time limit (a hang costs its limit, not the machine):
1. environment: GPU, driver, CUDA, torch, and whether the packages the suite imports are there;
2. data: the synthetic dataset the measurements use (made once, before processes share it);
3. tests: the tests marked `cuda` (tests/test_cuda.py: every algorithm compiled with CUDA graphs against
   eager, no host sync in an update, `offbench fit` with evaluation and an exact resume on CUDA), with
   pytest-xdist workers when it is installed; meanwhile, processes that run the perf measurements briefly
   fill torch.compile's caches, so that part 5 compiles from them;
4. evaluation: env steps/s of batched evaluation, and of one env;
5. perf: each algorithm's updates/s, eager, compiled and with CUDA graphs (offbench/perf.py, `updates`
   per timing window), the algorithms with a target first; those the budget leaves no time for are
   reported as not run;
6. seeds: aggregate updates/s of N copies trained as one batched computation (offbench/seeds.py) against N
   single-seed processes, N = 1, 8, 32 (benchmarks/seeds.py), on its own limit after the budget's parts.
The report, results/perf/perf-cuda.md and perf-cuda.json, is rewritten after every part, so a part
that fails, hangs or is cut short still leaves the others' results; it states each figure beside its
target. The perf figures are per seed (one process per seed); the seeds part is the batched alternative.

`--device cpu` runs the same orchestration without CUDA (CUDA tests skipped, measurements on the CPU, a few
updates), which is how the driver itself is tested away from a GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offbench.errors import UserError
from offbench.files import write_json_atomic, write_text_atomic
from offbench.grammar import DEVICE_HELP, DEVICES, Parser

REPO = Path(__file__).resolve().parents[1]
DATASET = "synthetic/hopper-random-v0"
MODULES = ("torch", "lightning", "gymnasium", "mujoco", "jsonargparse", "minari", "gymnasium_robotics", "h5py", "pandas", "yaml")

# Goals for one H100/H200-class GPU at batch 256: updates/s per seed with CUDA graphs, and env
# steps/s of batched evaluation. Goals, not tests: the report states each figure beside its target.
TARGETS = {
    "algorithms.diffcps.DiffCPS": 700,
    "algorithms.diffusion_ql.DiffusionQL": 500,
    "algorithms.iql.IQL": 2000,
    "algorithms.td3bc.TD3BC": 2000,
}
EVAL_TARGET = 20_000
PRIORITY = ("diffcps", "diffusion_ql", "iql", "td3bc")  # configs with a target are measured first


@dataclass
class Part:
    """One part of the check: what ran, how it ended, and how long it took."""

    name: str
    status: str = "not run"  # running | passed | failed | timed out | stopped | not run
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Check:
    """Everything the report shows; `write_report` turns it into perf-cuda.md and perf-cuda.json."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    parts: list[Part] = field(default_factory=list)
    tests: list[dict[str, str]] = field(default_factory=list)
    deviations: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    seeds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        self.parts.append(Part(name))
        return self.parts[-1]


# --- the machine -------------------------------------------------------------------------------
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """GPU, driver, CUDA and library versions; only torch is imported (the rest may be missing)."""
    import torch

    from offbench.perf import gpu_driver

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "driver": gpu_driver() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "missing_modules": [m for m in MODULES if importlib.util.find_spec(m) is None],
    }


# --- running a part ------------------------------------------------------------------------------
def run_process(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """Run `command` with stdout and stderr into `log`; kill its whole process group after `timeout`
    seconds. Returns (exit status or None when it timed out, seconds)."""
    process = _start(command, log, env)
    return _finish(process, timeout)


_LIVE: set[subprocess.Popen] = set()  # started and not yet waited for: stopped if the driver itself is stopped


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    process.started = time.perf_counter()  # type: ignore[attr-defined]
    _LIVE.add(process)
    return process


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    try:
        code: int | None = process.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        _kill(process)
        code = None
    _LIVE.discard(process)
    return code, time.perf_counter() - process.started  # type: ignore[attr-defined]


def _kill(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (compile workers included), SIGKILL 5 s later if still there."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class CompileCache:
    """torch.compile's cache directory for the check's processes (TORCHINDUCTOR_CACHE_DIR; Triton's cache sits
    inside it). A process killed while it compiles can leave a truncated file there (seen on the CPU: a
    kernel's .so "file too short") that the next process would load and fail on, so after any kill the
    processes that follow get a fresh directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.generation = root, 0

    def env(self) -> dict[str, str]:
        return {"TORCHINDUCTOR_CACHE_DIR": str(self.root / f"compile-cache-{self.generation}")}

    def after(self, code: int | None) -> None:
        """Call with each process's exit status (None: it was killed)."""
        if code is None:
            self.generation += 1


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "offbench.gpu_check", "--worker", *args]


# --- test results ------------------------------------------------------------------------------
_OUTCOME = r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_NODE = r"(tests/\S+::\S+)"


def parse_pytest_log(text: str) -> list[dict[str, str]]:
    """Per-test outcomes from `pytest -v -rfE` output (plain or pytest-xdist lines), with the failure
    messages of the short summary; a test whose line never came (a part cut short) is not listed."""
    outcomes: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        match = re.search(rf"{_NODE} {_OUTCOME}", line) or re.search(rf"{_OUTCOME} {_NODE}", line)
        if match is None or line.startswith(("FAILED ", "ERROR ")):
            continue
        node, outcome = (match.group(1), match.group(2)) if match.group(1).startswith("tests/") else match.group(2, 1)
        outcomes.setdefault(node, {"test": node, "outcome": outcome.lower(), "message": ""})
        if outcome == "ERROR":  # an error in teardown after a pass counts
            outcomes[node]["outcome"] = "error"
    for match in re.finditer(rf"^(FAILED|ERROR) {_NODE}(?: - (.*))?$", text, re.MULTILINE):
        entry = outcomes.setdefault(match.group(2), {"test": match.group(2), "outcome": match.group(1).lower(), "message": ""})
        entry["message"] = (match.group(3) or "").strip()
    return list(outcomes.values())


# --- the report --------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def target_rows(check: Check) -> list[dict[str, Any]]:
    """Each target with the figure measured for it (None: not measured) and whether it was met."""
    rows = []
    by_algorithm = {r["algorithm"]: r for r in check.training}
    for algorithm, target in TARGETS.items():
        measured = by_algorithm.get(algorithm, {}).get("cudagraphs_updates_per_s")
        rows.append({"what": f"{algorithm.rsplit('.', 1)[1]} updates/s per seed, CUDA graphs", "target": target,
                     "measured": measured, "met": None if measured is None else measured >= target})
    batched = [r["env_steps_per_s"] for r in (check.evaluation or {}).get("runs", []) if r["envs"] > 1]
    measured = max(batched) if batched else None
    rows.append({"what": "evaluation env steps/s, batched (best env count)", "target": EVAL_TARGET, "measured": measured,
                 "met": None if measured is None else measured >= EVAL_TARGET})
    return rows


def write_report(check: Check, out_dir: Path) -> None:
    """results/perf/perf-cuda.json (everything) and perf-cuda.md (the same, to read)."""
    m, s = check.machine, check.settings
    targets = target_rows(check)
    verdict = {True: "met", False: "not met", None: "not measured"}
    lines = [
        "# GPU check",
        "",
        f"`offbench gpu-check` on {m.get('gpu') or 'no GPU'} ({_fmt(m.get('gpu_memory_gib'), 1)} GiB), driver "
        f"{m.get('driver') or 'n/a'}, CUDA {m.get('cuda') or 'n/a'}, torch {m['torch']}, Lightning {m.get('lightning') or 'n/a'}, "
        f"Python {m['python']}, {m['cpu_count']} CPUs. Budget {s['budget']:.0f} s, used {check.seconds:.0f} s; "
        f"{s['updates']} updates per timing window, dataset `{s['dataset']}`."
        + (" **CPU rehearsal (--device cpu): no CUDA part ran.**" if s.get("cpu") else ""),
        "",
    ]
    if m.get("missing_modules"):
        lines += [f"Missing Python modules: {', '.join(m['missing_modules'])} (install the wheels of `make gpu-wheels`).", ""]
    lines += ["## Parts", "", "| part | status | seconds | detail |", "|---|---|---|---|"]
    for p in check.parts:
        detail = p.detail.replace("\n", " ").replace("|", "/")
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} | {detail[:300]} |")
    lines += ["", "## Targets", "",
              "Goals for one H100/H200-class GPU at batch 256, not tests; every perf figure is per seed (one seed per process; "
              "the seeds section below measures N seeds as one batched computation).",
              "", "| what | target | measured | |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['what']} | {t['target']:,} | {_fmt(t['measured'])} | {verdict[t['met']]} |")
    lines += ["", "## CUDA tests", ""]
    if check.tests:
        lines += ["| test | outcome | message |", "|---|---|---|"]
        for t in check.tests:
            lines.append(f"| {t['test']} | {t['outcome']} | {t['message'].replace('|', '/')[:300]} |")
    else:
        lines.append("No test results (see the tests part above).")
    if check.deviations:
        lines += ["", "Eager against compiled with CUDA graphs (largest relative loss deviation over all updates; the "
                  "weights' distance over how far training moved them, at the end):", ""]
        for d in check.deviations:
            fields = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items() if k != "test")
            lines.append(f"- {d['test']}: {fields}")
    lines += ["", "## Training throughput", "",
              "Each algorithm in its own process: its config's batch size and network sizes; plain = eager update() "
              "in a Python loop, compiled = torch.compile's default mode, CUDA graphs = mode reduce-overhead, each timed "
              f"over {s['updates']} updates after a pass over the same updates that compiles and warms up; compile s = "
              "that pass's time minus the timed one's (from torch.compile's caches where part 3 filled them). "
              "Lightning is not timed here (`offbench perf` does).", ""]
    # offbench.perf imports the whole suite; rows or an evaluation exist only where it imported in a worker
    if check.training:
        from offbench.perf import training_table

        lines += training_table(check.training)
    else:
        lines.append("No algorithm measured (see the perf part above).")
    lines += ["", "## Evaluation", ""]
    if check.evaluation:
        from offbench.perf import evaluation_lines

        e = check.evaluation
        lines += [f"`{e['env_id']}`, {e['policy']} on {e['device']}, one policy call per step for all envs "
                  "(in-process unless said otherwise):", "", *evaluation_lines(e)]
    else:
        lines.append("Not measured (see the evaluation part above).")
    lines += ["", "## Many seeds as one batched computation (benchmarks/seeds.py)", ""]
    if check.seeds:
        lines += ["Aggregate updates/s of N copies in one SeedBatch against N single-seed processes started together.", "",
                  "| algorithm | N | updates each | separate upd/s (sum) | batched upd/s (sum) | speed-up |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['algorithm']} | {r['copies']} | {r['updates']} | {r['separate_updates_per_s']:.1f} | "
                  f"{r['batched_updates_per_s']:.1f} | {r['speedup']:.2f}x |" for r in check.seeds]
    else:
        lines.append("Not measured (see the seeds part above).")
    report = {**asdict(check), "targets": targets}
    write_json_atomic(out_dir / "perf-cuda.json", report)
    write_text_atomic(out_dir / "perf-cuda.md", "\n".join(lines) + "\n")


# --- the parts -----------------------------------------------------------------------------------
def ordered_configs(configs: list[Path]) -> list[Path]:
    """The configs with a target first, in PRIORITY order, then the others by name."""
    rank = {name: i for i, name in enumerate(PRIORITY)}
    return sorted(configs, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def _perf_args(args: argparse.Namespace) -> list[str]:
    return ["--dataset", args.dataset, "--device", "cpu" if args.cpu else "cuda"]


PARTS = ("environment", "data", "tests", "evaluation", "perf", "seeds")


def run_check(args: argparse.Namespace, check: Check) -> None:
    """Run the parts in order, rewriting the report after each (a part in progress shows as running)."""
    start = time.perf_counter()
    deadline = start + args.budget
    left = lambda: deadline - time.perf_counter()
    logs = args.logs
    cache = CompileCache(logs)
    for name in PARTS:
        check.part(name)

    def save(part: Part | None = None, status: str | None = None, seconds: float | None = None, detail: str = "") -> None:
        if part is not None:
            part.status, part.seconds, part.detail = status or part.status, seconds or part.seconds, detail or part.detail
        check.seconds = time.perf_counter() - start
        write_report(check, args.out)
        if part is not None and part.status != "running":
            print(f"gpu-check: {part.name}: {part.status} ({part.seconds:.0f} s){' - ' + part.detail if part.detail else ''}", flush=True)

    def begin(name: str) -> Part:
        part = check.part(name)
        save(part, "running")
        return part

    # 1. environment
    env_part = check.part("environment")
    cuda_ok = args.cpu or check.machine["gpu"] is not None
    problems = [f"missing modules: {', '.join(check.machine['missing_modules'])}"] if check.machine["missing_modules"] else []
    if not cuda_ok:
        problems.append(f"torch {check.machine['torch']} sees no CUDA device")
    found = "packages found (CPU rehearsal)" if args.cpu else "GPU, driver and packages found"
    save(env_part, "failed" if problems else "passed", 0.0, "; ".join(problems) or found)
    if not cuda_ok:
        for name in ("data", "tests", "evaluation", "perf"):
            check.part(name).detail = "no CUDA device"
        save()
        return

    # 2. data
    part = begin("data")
    code, seconds = run_process(_worker("data", "--dataset", args.dataset), logs / "data.log", min(args.data_timeout, left()), cache.env())
    save(part, _status(code), seconds, "" if code == 0 else tail(logs / "data.log", 5))
    if code != 0:
        return

    # 3. tests, while the perf measurements fill the compile caches
    part = begin("tests")
    deviations = logs / "deviations.jsonl"
    deviations.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    if args.test_workers > 1 and importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(args.test_workers)]
    parallel_env = {"TORCHINDUCTOR_COMPILE_THREADS": str(args.compile_threads), **cache.env()}
    tests = _start(command, logs / "tests.log", {**parallel_env, "OFFBENCH_CUDA_REPORT": str(deviations)})
    test_deadline = time.perf_counter() + min(args.tests_timeout, left())
    warmers = ordered_configs(args.configs) if args.warm_caches else []
    running: list[subprocess.Popen] = []
    while tests.poll() is None and time.perf_counter() < test_deadline:
        running = [w for w in running if w.poll() is None]
        while warmers and len(running) < args.warm_workers:
            config = warmers.pop(0)
            command = _worker("train", "--config", str(config), "--updates", "20", "--out", str(logs / f"warm-{config.stem}.json"), *_perf_args(args))
            running.append(_start(command, logs / f"warm-{config.stem}.log", parallel_env))
        time.sleep(0.5)
    code, seconds = _finish(tests, test_deadline - time.perf_counter())
    cache.after(code)
    for w in running:  # the one algorithm each is compiling goes into the cache: worth its time, unless it takes too long
        cache.after(_finish(w, min(args.warm_grace, left() - args.min_perf_seconds))[0])
    check.tests = parse_pytest_log((logs / "tests.log").read_text(errors="replace"))
    check.deviations = [json.loads(line) for line in deviations.read_text().splitlines()] if deviations.exists() else []
    counts = {o: sum(t["outcome"] == o for t in check.tests) for o in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    status = _status(code, ok=(0, 5) if args.cpu else (0,))  # 5: every test deselected or skipped
    if code == 0 and counts["skipped"] and not args.cpu:
        status = "failed"  # a CUDA test skipped on a CUDA machine did not check anything
    if code is None:
        summary = f"{summary}; cut short after {seconds:.0f} s"
    elif not check.tests:  # nothing ran (an import error at collection, say): the end of pytest's output says why
        summary = tail(logs / "tests.log", 5)
    save(part, status, seconds, summary)

    # 4. evaluation
    part = begin("evaluation")
    out = logs / "evaluation.json"
    command = _worker("eval", "--out", str(out), "--episodes", str(args.eval_episodes), "--envs", *map(str, args.eval_envs),
                      "--async-envs", str(args.eval_async_envs), *_perf_args(args))
    out.unlink(missing_ok=True)
    code, seconds = run_process(command, logs / "evaluation.log", min(args.eval_timeout, left()), cache.env())
    check.evaluation = json.loads(out.read_text()) if out.exists() else None  # what it measured, also when stopped
    save(part, _status(code), seconds, "" if code == 0 else tail(logs / "evaluation.log", 5))

    # 5. perf, one process per algorithm
    part = begin("perf")
    problems, begun = [], time.perf_counter()
    for config in ordered_configs(args.configs):
        if left() < args.min_perf_seconds:
            problems.append(f"{config.stem}: not run (budget)")
            continue
        out = logs / f"train-{config.stem}.json"
        command = _worker("train", "--config", str(config), "--updates", str(args.updates), "--out", str(out), *_perf_args(args))
        out.unlink(missing_ok=True)
        limit = min(args.perf_timeout, left())
        code, seconds = run_process(command, logs / f"train-{config.stem}.log", limit, cache.env())
        cache.after(code)
        if out.exists():  # the measurements it finished, also when it was stopped
            row = json.loads(out.read_text())
            check.training.append(row)
            problems += [f"{config.stem} {mode}: {error}" for mode, error in row["errors"].items()]
        if code is None:
            why = "timed out" if limit == args.perf_timeout else "stopped at the end of the budget"
            problems.append(f"{config.stem}: {why} after {seconds:.0f} s")
        elif code != 0:
            problems.append(f"{config.stem}: failed ({tail(logs / f'train-{config.stem}.log', 1)})")
        save(part, seconds=time.perf_counter() - begun, detail="; ".join(problems))
    save(part, "failed" if problems else "passed", time.perf_counter() - begun, "; ".join(problems))

    # 6. many seeds as one batched computation (benchmarks/seeds.py), on its own time limit after the budget's parts
    part = begin("seeds")
    out = logs / "seeds-cuda.md"
    command = [sys.executable, str(REPO / "benchmarks/seeds.py"), "--device", "cpu" if args.cpu else "cuda",
               "--copies", *map(str, args.seeds_copies), "--window", "2", "--out", str(out), "--dataset", args.dataset,
               "--configs", *(str(REPO / f"configs/algorithms/{name}.yaml") for name in args.seeds_algorithms)]
    out.with_suffix(".json").unlink(missing_ok=True)
    code, seconds = run_process(command, logs / "seeds.log", args.seeds_timeout, cache.env())
    js = out.with_suffix(".json")
    check.seeds = json.loads(js.read_text())["rows"] if js.exists() else []  # what it measured, also when stopped
    save(part, _status(code), seconds, "" if code == 0 else tail(logs / "seeds.log", 5))


def _status(code: int | None, ok: tuple[int, ...] = (0,)) -> str:
    return "timed out" if code is None else "passed" if code in ok else "failed"


# --- the workers (one process each) ---------------------------------------------------------------
def worker_main(argv: list[str]) -> int:
    parser = Parser(prog="offbench gpu-check --worker", description="one measurement of gpu-check, in its own process")
    parser.add_argument("kind", choices=["data", "train", "eval"], help="load the dataset, time training or time evaluation")
    parser.add_argument("--dataset", default=DATASET, help="the dataset (default: %(default)s)")
    parser.add_argument("--config", type=Path, help="the algorithm config timed (train)")
    parser.add_argument("--updates", type=int, default=1000, help="updates per timing window (train)")
    parser.add_argument("--device", choices=DEVICES, default="cuda", help=DEVICE_HELP)
    parser.add_argument("--episodes", type=int, default=100, help="episodes per evaluation (eval)")
    parser.add_argument("--envs", type=int, nargs="+", default=[100], help="vectorised env counts (eval)")
    parser.add_argument("--async-envs", type=int, default=0, help="envs in subprocesses (eval; 0: none)")
    parser.add_argument("--out", type=Path, help="the JSON file of the result, rewritten after each measurement")
    args = parser.parse_args(argv)
    if args.kind == "data":
        from offbench.data.datamodule import OfflineDataModule

        dm = OfflineDataModule(args.dataset)
        print(f"{args.dataset}: {len(dm.transitions)} transitions")
        return 0
    from offbench.perf import measure_evaluation, measure_training

    # The result so far is written after each measurement: a worker stopped at its limit leaves what it measured.
    save = lambda result: write_json_atomic(args.out, result)
    if args.kind == "train":
        result = measure_training(
            args.config, args.dataset, args.updates, args.updates, args.device, True, lightning=False, progress=save
        )
    else:
        result = measure_evaluation(args.dataset, args.episodes, args.envs, args.device, args.async_envs, progress=save)
    print(json.dumps(result, indent=2))
    return 0


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"gpu-check: no GPU here (torch {torch.__version__} sees no CUDA device); run it on a machine with "
                        "CUDA and a CUDA build of torch, or rehearse it here with --device cpu (report in runs/, not results/)")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    parser = Parser(prog="offbench gpu-check", description=__doc__.split("\n\n")[0], renamed={"--cpu": ["--device", "cpu"]})
    parser.add_argument(
        "--out", type=Path, default=None,
        help="where perf-cuda.md and .json go (default results/perf; with --device cpu runs/gpu-check-rehearsal, kept out "
        "of results)",
    )
    parser.add_argument("--logs", type=Path, default=None, help="each part's log (default: a new temporary directory)")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for the parts before the seeds part")
    parser.add_argument("--seeds-timeout", type=float, default=120.0,
                        help="seconds of the seeds part (N copies as one SeedBatch against N processes), after the budget")
    parser.add_argument("--seeds-copies", type=int, nargs="+", default=[1, 8, 32], help="copy counts of the seeds part")
    parser.add_argument("--seeds-algorithms", nargs="+", default=["bc", "td3bc"], help="configs/algorithms/ names the seeds part times")
    parser.add_argument("--configs", nargs="+", type=Path, default=sorted((REPO / "configs/algorithms").glob("*.yaml")),
                        help="algorithm configs timed by the perf part (default: every file of configs/algorithms/)")
    parser.add_argument("--dataset", default=DATASET, help="the dataset of the data, perf and evaluation parts (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=1000, help="updates per timing window")
    parser.add_argument("--eval-envs", type=int, nargs="+", default=[10, 50, 100], help="vectorised env counts timed by the evaluation part")
    parser.add_argument("--eval-episodes", type=int, default=100, help="episodes per evaluation measurement")
    parser.add_argument("--eval-async-envs", type=int, default=min(os.cpu_count() or 1, 32), help="envs in subprocesses (0: none)")
    parser.add_argument("--data-timeout", type=float, default=60.0, help="seconds of the data part")
    parser.add_argument("--tests-timeout", type=float, default=210.0, help="seconds of the CUDA tests part")
    parser.add_argument("--eval-timeout", type=float, default=45.0, help="seconds of the evaluation part")
    parser.add_argument("--perf-timeout", type=float, default=90.0, help="seconds per algorithm")
    parser.add_argument("--min-perf-seconds", type=float, default=20.0, help="start no algorithm with less time left")
    parser.add_argument("--test-workers", type=int, default=6, help="pytest-xdist workers (when installed)")
    parser.add_argument("--warm-workers", type=int, default=3, help="processes filling the compile caches during the tests")
    parser.add_argument("--warm-grace", type=float, default=60.0, help="seconds those may go on compiling after the tests")
    parser.add_argument("--compile-threads", type=int, default=2, help="inductor compile threads per process while parts run side by side")
    parser.add_argument("--no-warm-caches", dest="warm_caches", action="store_false",
                        help="do not fill the compile caches while the tests run (the perf part compiles then)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the check); cpu: rehearse without CUDA (CUDA tests skip, measurements on the CPU)")
    args = parser.parse_args(argv)
    args.cpu = args.device == "cpu"
    if not args.cpu:
        _require_cuda()  # before anything is written: a machine without a GPU gets one line, no report
    if args.budget <= 0 or args.updates <= 0:
        parser.error("--budget and --updates must be positive")
    missing = [str(c) for c in args.configs if not c.exists()]
    if missing:
        parser.error(f"no such config: {', '.join(missing)}")
    args.configs = [c.resolve() for c in args.configs]
    args.out = (args.out or REPO / ("runs/gpu-check-rehearsal" if args.cpu else "results/perf")).resolve()
    args.logs = (args.logs or Path(tempfile.mkdtemp(prefix="offbench-gpu-check-"))).resolve()
    print(f"gpu-check: logs in {args.logs}, report in {args.out}/perf-cuda.md", flush=True)
    # Each part runs in its own process group (so that a stop reaches its compile workers): if the driver is
    # stopped (SIGTERM, Ctrl-C), it stops them; the report holds the parts finished so far.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    check = Check(machine_info(), {"budget": args.budget, "updates": args.updates, "dataset": args.dataset, "cpu": args.cpu})
    try:
        run_check(args, check)
    except BaseException:
        for part in check.parts:
            if part.status == "running":
                part.status, part.detail = "stopped", "the check itself was stopped or failed here"
        write_report(check, args.out)
        raise
    finally:
        for process in list(_LIVE):
            _kill(process)
    print(f"gpu-check: wrote {args.out / 'perf-cuda.md'} and perf-cuda.json ({check.seconds:.0f} s)")
    return 0 if all(p.status == "passed" for p in check.parts) else 1


if __name__ == "__main__":  # `python -m offbench.gpu_check` (make gpu-check): a user's mistake is one line, status 2
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"offbench: error: {e}", file=sys.stderr)
        sys.exit(2)
