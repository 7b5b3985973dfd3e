"""`offbench gpu-check` away from a GPU: its report writer on a made-up result, the reading of pytest's
output, and a part that hangs being stopped at its time limit with its child processes."""

import json
import sys
import time
from pathlib import Path

from offbench.gpu_check import Check, CompileCache, Part, parse_pytest_log, run_process, target_rows, write_report

REPO = Path(__file__).resolve().parents[1]


def fake_row(algorithm: str, cudagraphs: float | None, errors: dict[str, str] | None = None) -> dict:
    return {
        "algorithm": algorithm, "config": "configs/algorithms/x.yaml", "batch_size": 256, "parameters": 1234,
        "updates_timed": 1000, "block_size": 1000, "lightning_updates_per_s": None, "plain_updates_per_s": 100.0,
        "lightning_overhead_pct": None, "compiled_updates_per_s": 200.0, "compile_seconds": 30.0,
        "cudagraphs_updates_per_s": cudagraphs, "cudagraphs_compile_seconds": None if cudagraphs is None else 5.0,
        "cudagraph_skips": 0, "errors": errors or {},
    }


def fake_check() -> Check:
    machine = {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "driver": "580.159.03", "cuda": "13.0", "torch": "2.11.0+cu130",
               "lightning": "2.6.6", "python": "3.12.3", "cpu_count": 16, "missing_modules": []}
    check = Check(machine, {"budget": 420.0, "updates": 1000, "dataset": "synthetic/hopper-random-v0", "cpu": False})
    check.parts = [Part("environment", "passed"), Part("tests", "failed", 200.0, "1 passed, 1 failed"),
                   Part("perf", "failed", 150.0, "sfbc: timed out after 90 s")]
    check.tests = [
        {"test": "tests/test_cuda.py::test_a[bc]", "outcome": "passed", "message": ""},
        {"test": "tests/test_cuda.py::test_a[iql]", "outcome": "failed", "message": "AssertionError: loss | update 3"},
    ]
    check.deviations = [{"test": "compiled_vs_eager[bc]", "max_loss_rel_dev": 1.5e-6, "updates": 300}]
    check.training = [
        fake_row("algorithms.diffcps.DiffCPS", 812.5),
        fake_row("algorithms.diffusion_ql.DiffusionQL", 450.0),
        fake_row("algorithms.iql.IQL", None, {"cudagraphs": "RuntimeError: boom"}),
    ]
    check.evaluation = {"dataset": "synthetic/hopper-random-v0", "env_id": "Hopper-v4", "device": "cuda",
                        "policy": "untrained 2x256 MLP (DeterministicActor)", "runs": [
                            {"envs": 100, "asynchronous": False, "episodes": 100, "env_steps": 3800, "env_steps_per_s": 25000.0},
                            {"envs": 1, "asynchronous": False, "episodes": 100, "env_steps": 3800, "env_steps_per_s": 30000.0},  # not batched
                            {"envs": 16, "asynchronous": True, "episodes": 100, "env_steps": 3800, "env_steps_per_s": 18000.0},
                        ]}
    check.seconds = 400.0
    return check


def test_targets_compare_each_figure_with_its_goal():
    rows = {r["what"].split()[0]: r for r in target_rows(fake_check())}
    assert rows["DiffCPS"]["measured"] == 812.5 and rows["DiffCPS"]["met"] is True
    assert rows["DiffusionQL"]["met"] is False  # 450 < 500
    assert rows["IQL"]["measured"] is None and rows["IQL"]["met"] is None  # its CUDA-graph run failed
    assert rows["TD3BC"]["met"] is None  # not measured at all
    assert rows["evaluation"]["measured"] == 25000.0 and rows["evaluation"]["met"] is True  # best batched, not 1 env


def test_report_states_parts_targets_tests_and_failures(tmp_path):
    write_report(fake_check(), tmp_path)
    md = (tmp_path / "perf-cuda.md").read_text()
    assert "NVIDIA H200" in md and "driver 580.159.03" in md and "torch 2.11.0+cu130" in md
    assert "| DiffCPS updates/s per seed, CUDA graphs | 700 | 812 | met |" in md
    assert "| DiffusionQL updates/s per seed, CUDA graphs | 500 | 450 | not met |" in md
    assert "| TD3BC updates/s per seed, CUDA graphs | 2,000 | n/a | not measured |" in md
    assert "| evaluation env steps/s, batched (best env count) | 20,000 | 25,000 | met |" in md
    assert "| perf | failed | 150 | sfbc: timed out after 90 s |" in md
    assert "| tests/test_cuda.py::test_a[iql] | failed | AssertionError: loss / update 3 |" in md  # a | would break the table
    assert "algorithms.iql.IQL, cudagraphs: failed with RuntimeError: boom" in md
    assert "- 100 envs: 25000 env steps/s (100 episodes of 38 steps on average)" in md and "- 1 env: 30000 env steps/s" in md
    assert "- 16 envs in subprocesses (async): 18000 env steps/s" in md
    report = json.loads((tmp_path / "perf-cuda.json").read_text())
    assert report["machine"]["gpu"] == "NVIDIA H200" and [p["status"] for p in report["parts"]] == ["passed", "failed", "failed"]
    assert report["targets"][0]["met"] is True and report["training"][2]["errors"] == {"cudagraphs": "RuntimeError: boom"}


def test_report_without_results_says_why(tmp_path):
    check = Check({"gpu": None, "torch": "2.13.0+cpu", "python": "3.12.3", "cpu_count": 2, "missing_modules": ["gymnasium"]},
                  {"budget": 420.0, "updates": 1000, "dataset": "d", "cpu": False})
    check.parts = [Part("environment", "failed", 0.0, "missing modules: gymnasium; torch sees no CUDA device")]
    write_report(check, tmp_path)
    md = (tmp_path / "perf-cuda.md").read_text()
    assert "Missing Python modules: gymnasium" in md and "No test results" in md and "No algorithm measured" in md
    assert "| evaluation env steps/s, batched (best env count) | 20,000 | n/a | not measured |" in md


def test_pytest_output_is_read_in_both_layouts():
    plain = """tests/test_cuda.py::test_a[bc] PASSED                                   [ 50%]
tests/test_cuda.py::test_a[iql] FAILED                                  [100%]
=========================== short test summary info ============================
FAILED tests/test_cuda.py::test_a[iql] - AssertionError: update 3, loss/critic: Tensor-likes are not close!
"""
    xdist = """[gw1] [ 50%] SKIPPED tests/test_cuda.py::test_b[eager]
[gw0] [100%] PASSED tests/test_cuda.py::test_a[bc]
"""
    assert parse_pytest_log(plain) == [
        {"test": "tests/test_cuda.py::test_a[bc]", "outcome": "passed", "message": ""},
        {"test": "tests/test_cuda.py::test_a[iql]", "outcome": "failed",
         "message": "AssertionError: update 3, loss/critic: Tensor-likes are not close!"},
    ]
    assert [(t["test"], t["outcome"]) for t in parse_pytest_log(xdist)] == [
        ("tests/test_cuda.py::test_b[eager]", "skipped"), ("tests/test_cuda.py::test_a[bc]", "passed"),
    ]


def test_a_hanging_part_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child-alive"
    # The child outlives its parent unless the whole process group is killed.
    script = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
              f"'import time, pathlib; time.sleep(3); pathlib.Path(r\"{marker}\").write_text(\"x\")']); "
              "print('started', flush=True); import time; time.sleep(60)")
    start = time.perf_counter()
    code, seconds = run_process([sys.executable, "-c", script], tmp_path / "part.log", timeout=1.0)
    assert code is None and seconds < 10 and time.perf_counter() - start < 10
    time.sleep(3.5)
    assert not marker.exists(), "the child of the stopped part kept running"
    assert "started" in (tmp_path / "part.log").read_text()
    code, _ = run_process([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "ok.log", timeout=30)
    assert code == 3


def test_a_kill_moves_later_processes_to_a_fresh_compile_cache(tmp_path):
    cache = CompileCache(tmp_path)
    first = cache.env()["TORCHINDUCTOR_CACHE_DIR"]
    cache.after(0)
    cache.after(1)  # a failure is no reason: nothing was cut off mid-write
    assert cache.env()["TORCHINDUCTOR_CACHE_DIR"] == first
    cache.after(None)  # killed: it may have left a truncated kernel behind
    assert cache.env()["TORCHINDUCTOR_CACHE_DIR"] != first and cache.env()["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
