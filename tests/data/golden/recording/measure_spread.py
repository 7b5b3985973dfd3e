"""Measure how far float32 runs of the official Diffusion-QL / DiffCPS update and of ours move from the
float32 golden files across thread counts and ATen CPU capabilities (the spread that the float32
tolerances of tests/test_golden.py are set from; table in tests/data/golden/README.md).

Run from the repository root, with checkouts of the official repositories at the commits of
record_diffusion.py:
    PYTHONPATH=$PWD python tests/data/golden/recording/measure_spread.py \
        --dql /path/to/Diffusion-Policies-for-Offline-RL --diffcps /path/to/DiffCPS
It reruns itself (`--one`) under OMP_NUM_THREADS in {1, 2} x ATEN_CPU_CAPABILITY in {default, avx2,
avx512} (the ones the CPU has) and prints, per quantity, the largest difference over the settings for
the official code and for ours, both against the recorded float32 values, plus our float64 run against
the official float64 recording (tests/data/golden/<agent>_f64.pt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
THRESHOLDS = [1e-3, 1e-4, 1e-5, 1e-6, 0.0]  # |g64| / max |g64| below which an after-step entry is skipped


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def absd(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def grad_rel(ours: dict, ref: dict) -> float:
    """Largest difference over the recorded gradient subset, relative to its largest entry."""
    return max(absd(ours[k], v) for k, v in ref.items()) / max(v.abs().max().item() for v in ref.values())


def compare32(run: dict, g: dict, piece: str, name: str, g64: dict) -> dict:
    ref = g[piece]
    cu, au = ref["critic_update"], ref["actor_update"]
    out = {
        "next_action": absd(run["next_action"], cu["next_action"]),
        "new_action": absd(run["new_action"], au["new_action"]),
        "critic_loss": absd(run["critic_loss"], cu["critic_loss"]),
        "bc_loss": absd(run["bc_loss"], au["bc_loss"]),
        "q_loss": absd(run["q_loss"], au["q_loss"]),
        "actor_loss": absd(run["actor_loss"], au["actor_loss"]),
        "actor_grad_rel": grad_rel(run["grad"]["actor"], ref["grad_subset"]["actor"]),
        "critic_grad_rel": grad_rel(run["grad"]["critic"], ref["grad_subset"]["critic"]),
        "actor_grad_norm_rel": abs(float(run["actor_grad_norm"]) / float(au["actor_grad_norm"]) - 1),
    }
    if name == "diffcps":
        out["lambda_after"] = absd(run["lambda_after"], ref["after"]["lambda"])
    for net in ("actor", "critic"):
        top = max(v.abs().max().item() for v in g64["grad"][net].values())
        for th in THRESHOLDS:
            worst = 0.0
            for k, v in ref["after"][net].items():
                keep = g64["grad"][net][k].abs() >= th * top
                d = (run["after"][net][k].double() - v.double()).abs()
                worst = max(worst, d[keep].max().item() if keep.any() else 0.0)
            out[f"{net}_after@{th:g}"] = worst
    return out


def compare64(run: dict, ref: dict) -> dict:
    out = {k: absd(run[k], ref[k]) for k in ("next_action", "new_action", "critic_loss", "bc_loss", "q_loss", "actor_loss")}
    for net in ("actor", "critic"):
        out[f"{net}_grad_head"] = max(absd(run["grad"][net][k][: len(v["head"])], v["head"]) for k, v in ref["grad"][net].items())
        out[f"{net}_after_head"] = max(absd(run["after"][net][k][: len(v["head"])], v["head"]) for k, v in ref["after"][net].items())
        out[f"{net}_after_sum"] = max(abs(run["after"][net][k].double().sum().item() - v["sum"]) for k, v in ref["after"][net].items())
    return out


def ours_pieces(name: str) -> dict:
    """Our float32 pieces 1-3 and the evaluation choice's candidates and Q against the float32 recordings."""
    from tests.test_golden import chain_noise, golden, policy
    g = golden(name)
    net = policy(g, torch.float32)
    out = {"schedule": max(absd(getattr(net, a), g["schedule"]["float32"][b]) for a, b in (
        ("betas", "betas"), ("sqrt_abar", "sqrt_alphas_cumprod"), ("sqrt_recip_abar", "sqrt_recip_alphas_cumprod"),
        ("sqrt_recipm1_abar", "sqrt_recipm1_alphas_cumprod"), ("post_coef_x0", "posterior_mean_coef1"),
        ("post_coef_xt", "posterior_mean_coef2")))}
    ref = g["loss"]["float32"]
    i, noise = (d["value"] for d in ref["random_draws"])
    terms = net.denoise(ref["state"], ref["x0"], noise=noise, i=i)
    out["eps_pred"], out["loss"] = absd(terms.eps_pred, ref["eps_pred"]), absd(terms.loss(), ref["loss"])
    ref = g["sample"]["float32"]
    with torch.no_grad():
        out["reverse_step"] = max(absd(net.reverse_step(ref["x_in"][k], t, ref["state"], ref["noise"][k]), ref["x_out"][k])
                                  for k, t in enumerate(ref["t"].tolist()))
        out["chain"] = absd(net.sample(ref["state"], noise=chain_noise(ref["random_draws"])), ref["action"])
    return out


def one(args) -> None:
    import record_diffusion as rd

    from tests.test_golden import golden, run_update
    result = {}
    for name, checkout in (("diffusion_ql", args.dql), ("diffcps", args.diffcps)):
        g = golden(name)
        f64 = torch.load(HERE.parent / f"{name}_f64.pt", weights_only=True)
        pieces = ["train_step", "train_step_max_q_backup"] if name == "diffusion_ql" else ["train_step"]
        for piece in pieces:
            o64 = rd.official_train(str(Path(checkout).resolve()), name, g, piece, torch.float64)
            o32 = rd.official_train(str(Path(checkout).resolve()), name, g, piece, torch.float32)
            ours32 = run_update(name, piece, torch.float32)
            ours64 = run_update(name, piece, torch.float64)
            result[f"{name}/{piece}"] = {
                "official32": compare32(o32, g, piece, name, o64), "ours32": compare32(ours32, g, piece, name, o64),
                "ours64": compare64(ours64, f64[piece]["float64"]), "official64": compare64(o64, f64[piece]["float64"]),
            }
        result[f"{name}/pieces"] = {"ours32": ours_pieces(name)}
    print("JSON" + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dql", required=True)
    p.add_argument("--diffcps", required=True)
    p.add_argument("--one", action="store_true")
    args = p.parse_args()
    if args.one:
        return one(args)
    flags = Path("/proc/cpuinfo").read_text()
    caps = ["default", "avx2"] + (["avx512"] if "avx512f" in flags else [])
    runs = {}
    for threads in (1, 2):
        for cap in caps:
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), ATEN_CPU_CAPABILITY=cap)
            res = subprocess.run([sys.executable, __file__, "--one", "--dql", args.dql, "--diffcps", args.diffcps],
                                 env=env, capture_output=True, text=True, check=True)
            line = next(ln for ln in res.stdout.splitlines() if ln.startswith("JSON"))
            runs[f"{threads}/{cap}"] = json.loads(line[4:])
            print("ran", threads, cap, file=sys.stderr)
    print(json.dumps(runs, indent=1))
    worst: dict = {}
    for res in runs.values():
        for _piece, by_who in res.items():
            for who, d in by_who.items():
                for q, v in d.items():
                    key = (who, q)
                    worst[key] = max(worst.get(key, 0.0), v)
    for (who, q), v in sorted(worst.items()):
        print(f"{who:11s} {q:24s} {v:.3g}")


if __name__ == "__main__":
    main()
