"""How much of each golden-test tolerance the observed differences use, across threads and CPU kernels.

A pytest plugin plus a driver. As a plugin (`-p tolerance_audit`, with this folder on PYTHONPATH) it wraps
torch.testing.assert_close: for every call from a golden test file it records, per call site (file:line),
the largest |actual - expected| / (atol + rtol |expected|) over the entries, i.e. the fraction of the
tolerance used (1 = at the limit), and writes them to $AUDIT_OUT (JSON) at the end of the session.
As a script it runs the given test files under OMP_NUM_THREADS in {1, 2} x ATEN_CPU_CAPABILITY in
{default, avx2, avx512 (if the CPU has it)} and prints, per call site, the largest fraction over the runs
and the margin (its inverse):
    PYTHONPATH=$PWD python tests/data/golden/recording/tolerance_audit.py tests/test_golden.py tests/test_golden_qgpo.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

USED: dict[str, float] = {}
_original = torch.testing.assert_close


def _site() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "test_golden" in name:
            return f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _fraction(actual, expected, atol, rtol) -> float:
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    if a.numel() == 0:
        return 0.0
    bound = atol + rtol * e.abs()
    diff = (a - e).abs()
    if (bound == 0).all():
        return 0.0 if torch.equal(a, e) else float("inf")
    return (diff / bound.clamp_min(1e-300)).max().item()


def assert_close(actual, expected, *args, **kwargs):
    site = _site()
    if site is not None and "atol" in kwargs and "rtol" in kwargs:
        try:
            frac = _fraction(actual, expected, kwargs["atol"], kwargs["rtol"])
            USED[site] = max(USED.get(site, 0.0), frac)
        except (TypeError, RuntimeError, ValueError):
            pass
    return _original(actual, expected, *args, **kwargs)


def pytest_configure(config):
    torch.testing.assert_close = assert_close


def pytest_unconfigure(config):
    torch.testing.assert_close = _original
    out = os.environ.get("AUDIT_OUT")
    if out:
        Path(out).write_text(json.dumps(USED))


def main() -> None:
    files = sys.argv[1:]
    caps = ["default", "avx2"] + (["avx512"] if "avx512f" in Path("/proc/cpuinfo").read_text() else [])
    here = str(Path(__file__).resolve().parent)
    worst: dict[str, float] = {}
    for threads in (1, 2):
        for cap in caps:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), ATEN_CPU_CAPABILITY=cap, AUDIT_OUT=tmp.name,
                           PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
                res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tolerance_audit", "-p", "no:cacheprovider",
                                      *files], env=env, capture_output=True, text=True)
                print(f"threads {threads} {cap}: {res.stdout.strip().splitlines()[-1]}", flush=True)
                for site, frac in json.loads(Path(tmp.name).read_text()).items():
                    worst[site] = max(worst.get(site, 0.0), frac)
    for site in sorted(worst, key=lambda s: (s.split(":")[0], int(s.split(":")[1]))):
        frac = worst[site]
        print(f"{site:28s} used {frac:9.3g}  margin {1 / frac if frac else float('inf'):9.3g}")


if __name__ == "__main__":
    main()
