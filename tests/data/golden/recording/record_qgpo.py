"""Record the float64 training steps of QGPO (one behaviour update, one critic iteration: the Q step with
its Polyak step, then the energy step) by running the official code; writes tests/data/golden/qgpo_f64.pt.

Official code (not copied here; pass a checkout with --official): ChenDRAG/CEP-energy-guided-diffusion
@ 4cc0622fbe6a032df3e2fd661c5adcdc69cf4b0f, folder Offline_RL_2D (diffusion_SDE/model.py, loss.py,
schedule.py). Environment: the project's venv (PyTorch 2.13.0+cpu, NumPy 2.4.6, SciPy), OMP_NUM_THREADS=1.
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/data/golden/recording/record_qgpo.py \
        --official /path/to/CEP-energy-guided-diffusion
`--check` only reruns the float32 steps and prints their largest difference from qgpo.pt (0 expected).

Method (tests/data/golden/README.md, QGPO part): the weights are qgpo.pt's recipe (`weights/spec`, float32,
cast exactly to float64); the steps are the bodies of the official loops: `train_behavior`'s
`score_model.condition = s; loss = loss_fn(score_model, a, marginal_prob_std_fn)`, then its Adam (lr 1e-4)
`zero_grad`, `backward`, `step`; `train_critic`'s `score_model.q[0].update_q0(data)` then
`score_model.q[0].update_qt(data)`. The random functions replay qgpo.pt's draws (`behavior_step`'s float32
draws cast to float64; `critic_step/float64`'s own float64 draws), checking function and shape. Gradients
are read by a global optimiser step pre-hook, the losses from the functions' locals when they return.
float64 shims (as qgpo.pt's float64 pieces): torch's default dtype is float64 while the ScoreNet is built
(GaussianFourierProjection, the ScoreNet's layers); `mlp()` casts the TwinQ and GuidanceQt to float32, so
the critic (`score_model.q[0]`) is cast with `.double()` and its two Adams rebuilt on the cast parameters
(lr 3e-4, as the code builds them). `update_q0`'s `(1. - d.float()) * self.discount` stays as written (float32
discount, 0.99000000953674316). `schedule.marginal_prob_std`'s default `device="cuda"` is given "cpu".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_diffusion import default_dtype, grads_at_step, locals_at_return, patched, summary  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1]


def fixed_weights(spec: list[dict]) -> dict[str, torch.Tensor]:
    """qgpo.pt's recipe (the same as tests/test_golden_qgpo.py's)."""
    out = {}
    for e in spec:
        g = torch.Generator().manual_seed(e["seed"])
        if e["kind"] == "uniform":
            v = (torch.rand(e["shape"], generator=g, dtype=torch.float64) * 2 - 1) * e["scale"]
        else:
            v = torch.randn(e["shape"], generator=g, dtype=torch.float64) * e["scale"]
        out[e["name"]] = v.float()
    return out


def load_official(checkout: str):
    root = str(Path(checkout) / "Offline_RL_2D")
    sys.path.insert(0, root)
    return (importlib.import_module("diffusion_SDE.model"), importlib.import_module("diffusion_SDE.loss"),
            importlib.import_module("diffusion_SDE.schedule"), root)


@contextlib.contextmanager
def replay(draws: list[dict]):
    """torch.rand / torch.randn_like hand out the recorded values in order, cast to the requested dtype."""
    k = [0]

    def take(fn, shape):
        d = draws[k[0]]
        assert d["fn"] == fn and list(d["shape"]) == list(shape), (k[0], d["fn"], d["shape"], fn, shape)
        k[0] += 1
        return d["value"]

    def rand(*shape, dtype=None, device=None, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return take("torch.rand", shape).to(dtype or torch.get_default_dtype()).clone()

    def randn_like(x, **kw):
        return take("torch.randn_like", x.shape).to(x.dtype).clone()

    with patched(torch, "rand", rand), patched(torch, "randn_like", randn_like):
        yield
    assert k[0] == len(draws), "recorded draws left unused"


def build(model_mod, schedule_mod, g: dict, dtype):
    meta = g["meta"]
    args = types.SimpleNamespace(device="cpu", alpha=meta["alpha"], q_alpha=meta["q_alpha"], method="CEP")
    schedule_mod.marginal_prob_std.__defaults__ = ("cpu",)  # its default "cuda", which update_qt relies on
    std_fn = functools.partial(schedule_mod.marginal_prob_std, device="cpu")
    with default_dtype(dtype):
        score = model_mod.ScoreNet(input_dim=meta["obs_dim"] + meta["act_dim"], output_dim=meta["act_dim"],
                                   marginal_prob_std=std_fn, args=args)
    critic = score.q[0]
    if dtype == torch.float64:  # shim: mlp() casts the critic's networks to float32
        critic.double()
        critic.q_optimizer = torch.optim.Adam(critic.q0.parameters(), lr=3e-4)
        critic.qt_optimizer = torch.optim.Adam(critic.qt.parameters(), lr=3e-4)
    w = {net: fixed_weights(spec) for net, spec in g["weights"]["spec"].items()}
    score.load_state_dict(w["behavior"])
    critic.q0.load_state_dict(w["q0"])
    critic.q0_target.load_state_dict(w["q0_target"])
    critic.qt.load_state_dict(w["qt"])
    return score, std_fn


def behavior_step(checkout: str, g: dict, dtype) -> dict:
    model_mod, loss_mod, schedule_mod, root = load_official(checkout)
    ref = g["behavior_step"]
    score, std_fn = build(model_mod, schedule_mod, g, dtype)
    before = {k: v.clone() for k, v in score.state_dict().items()}
    names = {id(p): n for n, p in score.named_parameters()}
    optimizer = torch.optim.Adam(score.parameters(), lr=ref["lr"])  # train_behavior's
    s, a = ref["s"].to(dtype), ref["a"].to(dtype)
    with default_dtype(dtype), replay(ref["random_draws"]), grads_at_step() as grads:
        score.condition = s
        loss = loss_mod.loss_fn(score, a, std_fn)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        score.condition = None
    grad = {names[pid]: v for pid, v in grads.items() if pid in names}
    after = {k: v.detach().clone() for k, v in score.state_dict().items()}
    return {"loss": loss.detach(), "grad": grad, "after": after, "before": before,
            "total_grad_norm": torch.linalg.vector_norm(torch.stack([v.double().norm() for v in grad.values()]))}


def critic_step(checkout: str, g: dict, dtype) -> dict:
    model_mod, loss_mod, schedule_mod, root = load_official(checkout)
    ref = g["critic_step"][str(dtype).removeprefix("torch.")]
    score, _ = build(model_mod, schedule_mod, g, dtype)
    critic = score.q[0]
    nets = {"q0": critic.q0, "q0_target": critic.q0_target, "qt": critic.qt}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in nets.items()}
    names = {id(p): (n, k) for n in ("q0", "qt") for k, p in nets[n].named_parameters()}
    data = {k: v.to(dtype) for k, v in g["data"].items()}
    with (default_dtype(dtype), replay(ref["random_draws"]), grads_at_step() as grads,
          locals_at_return({"update_q0", "update_qt"}, root) as seen):
        critic.update_q0(data)
        critic.update_qt(data)
    grad: dict = {"q0": {}, "qt": {}}
    for pid, v in grads.items():
        if pid in names:
            n, k = names[pid]
            grad[n][k] = v
    return {"q_loss": seen["update_q0"]["q_loss"].detach(), "energy_loss": seen["update_qt"]["loss"].detach(),
            "grad": grad, "before": before, "after": {n: {k: v.detach().clone() for k, v in m.state_dict().items()}
                                                      for n, m in nets.items()}}


def compact(run: dict, nets=None) -> dict:
    """Summaries (record_diffusion.summary) of the gradients and parameters after the step, and per tensor
    the sum of |after - before|."""
    if nets is None:
        return {"loss": run["loss"], "total_grad_norm": run["total_grad_norm"],
                "grad": {k: summary(v) for k, v in run["grad"].items()},
                "after": {k: summary(v) for k, v in run["after"].items()},
                "moved_abs_sum": {k: (run["after"][k] - run["before"][k]).double().abs().sum().item() for k in run["after"]}}
    return {"q_loss": run["q_loss"], "energy_loss": run["energy_loss"],
            "grad": {n: {k: summary(v) for k, v in run["grad"][n].items()} for n in run["grad"]},
            "after": {n: {k: summary(v) for k, v in run["after"][n].items()} for n in nets},
            "moved_abs_sum": {n: {k: (run["after"][n][k] - run["before"][n][k]).double().abs().sum().item()
                                  for k in run["after"][n]} for n in nets}}


def maxdiff(ours: dict, ref: dict) -> float:
    return max((ours[k][: len(v)].double() - v.double()).abs().max().item() for k, v in ref.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    checkout = str(Path(args.official).resolve())
    g = torch.load(GOLDEN / "qgpo.pt", weights_only=True)
    b32 = behavior_step(checkout, g, torch.float32)
    ref = g["behavior_step"]
    print("behavior_step float32 replay vs qgpo.pt: loss", (b32["loss"] - ref["loss"]).abs().item(),
          "after", maxdiff(b32["after"], ref["after"]), "grad", maxdiff(b32["grad"], ref["grad"]))
    c32 = critic_step(checkout, g, torch.float32)
    ref = g["critic_step"]["float32"]
    print("critic_step float32 replay vs qgpo.pt: q_loss", (c32["q_loss"] - ref["q0"]["q_loss"]).abs().item(),
          "energy loss", abs(float(c32["energy_loss"]) - float(ref["qt"]["loss"])) if "loss" in ref["qt"] else None,
          "q0 after", maxdiff(c32["after"]["q0"], ref["q0_step"]["after"]),
          "q0 target after", maxdiff(c32["after"]["q0_target"], ref["q0_target_after"]["after"]),
          "qt after", maxdiff(c32["after"]["qt"], ref["qt_step"]["after"]))
    if args.check:
        return
    b64 = behavior_step(checkout, g, torch.float64)
    c64 = critic_step(checkout, g, torch.float64)
    ref64 = g["critic_step"]["float64"]
    print("critic_step float64 gradients vs qgpo.pt's:", maxdiff(c64["grad"]["q0"], ref64["q0_grad"]["grad"]),
          maxdiff(c64["grad"]["qt"], ref64["qt_grad"]["grad"]))
    out = {"meta": {"repository": "ChenDRAG/CEP-energy-guided-diffusion", "commit": "4cc0622fbe6a032df3e2fd661c5adcdc69cf4b0f",
                    "torch_version": str(torch.__version__), "numpy_version": np.__version__,
                    "threads": torch.get_num_threads()},
           "behavior_step": {"float64": compact(b64)},
           "critic_step": {"float64": compact(c64, ("q0", "q0_target", "qt"))}}
    path = GOLDEN / "qgpo_f64.pt"
    torch.save(out, path)
    print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
