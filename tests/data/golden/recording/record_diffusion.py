"""Record the float64 (and the target-distinguishing float32) golden pieces of Diffusion-QL and DiffCPS
by running their official code, and rerun the official float32 pieces for the spread measurement.

Official code (not copied here; pass a checkout of it with --official):
- Diffusion-QL: Zhendong-Wang/Diffusion-Policies-for-Offline-RL @ d871f5c6b4a3a3a19a10c662a54f32d5819dfcdb
- DiffCPS: felix-thu/DiffCPS @ e31b2671c7037a99214d9691d9a3aa29de1ab76f
Environment: the project's venv (PyTorch 2.13.0+cpu, NumPy 2.4.6), OMP_NUM_THREADS=1.

Run from the repository root:
    OMP_NUM_THREADS=1 python tests/data/golden/recording/record_diffusion.py \
        --official /path/to/Diffusion-Policies-for-Offline-RL --agent diffusion_ql
    OMP_NUM_THREADS=1 python tests/data/golden/recording/record_diffusion.py \
        --official /path/to/DiffCPS --agent diffcps
It reads tests/data/golden/<agent>.pt (the float32 recording: initial weights, batches, random draws)
and writes tests/data/golden/<agent>_f64.pt. `--check` only reruns the float32 pieces and prints their
largest difference from the float32 file (0 on the recording machine).

Method (tests/data/golden/README.md): the official `agent.train(buffer, iterations=1, batch_size=8)` and
`agent.sample_action(state)` run unmodified. Their random functions (`torch.randn`, `torch.randn_like`,
`torch.randint`, `torch.multinomial`, `np.random.uniform`) are replaced during the call by wrappers
that REPLAY the draws of the float32 recording, in order, after checking the function and shape the
official code asks for, cast to the dtype it asks for (float32 -> float64 is exact). Only the new
multinomial draw of `sample_action_t09` is a pass-through wrapper (it records what it returns).
Intermediates are the official functions' locals when they return (sys.setprofile); gradients are read
by a global optimiser step pre-hook, i.e. as `Adam.step` sees them (after clipping).

float64 shims (no official line changed; each documented in the README):
- torch's default dtype is float64 while the agent is built and run, so the MLP, Critic and the
  Diffusion buffers (`torch.ones`) are float64; the weights are the float32 ones cast (exact);
- `agents.diffusion.vp_beta_schedule` is called with its own `dtype=torch.float64` argument (the
  official Diffusion passes none, so the shipped schedule is float32);
- DiffCPS builds `LA = torch.tensor(LA, dtype=torch.float)`: after construction LA is replaced by the
  same value as a float64 leaf and its Adam (lr 3e-5) is rebuilt on it;
- `sample_action` converts the state with `torch.FloatTensor`: during the float64 call that name
  returns a float64 tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

GOLDEN = Path(__file__).resolve().parents[1]
TARGET_SCALE = 0.9  # sample_action_t09: critic_target = 0.9 x critic (float32), so a test can tell them apart
# sample_action_t09's state: one where the argmax over the 50 candidates of min_j Q'_j differs from that of
# max_j Q'_j and of min_j Q_j (the online critic), so that those choices are told apart (see the README)
T09_STATE = {"diffusion_ql": ("train_step", 1), "diffcps": ("sample_action", None)}
SMALL_GRAD = 1e-5  # relative gradient below which a float32 Adam step is round-off dominated (README)
BIG = 1024  # tensors with more entries are stored as their first 2 rows plus sums


# --------------------------------------------------------------------------- the official code
def load_official(checkout: str, agent: str):
    sys.path.insert(0, checkout)
    for name in [m for m in sys.modules if m == "agents" or m.startswith("agents.") or m == "utils" or m.startswith("utils.")]:
        del sys.modules[name]
    if agent == "diffusion_ql":
        mod = importlib.import_module("agents.ql_diffusion")
    else:
        mod = importlib.import_module("agents.diffcps")
    return mod, importlib.import_module("agents.diffusion"), importlib.import_module("agents.helpers")


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def build_agent(mod, diffusion_mod, helpers_mod, agent: str, g: dict, cfg: dict, dtype):
    """The official agent with the recording's settings, built in `dtype` (float64: the shims above)."""
    meta = g["meta"]
    schedule = helpers_mod.vp_beta_schedule
    with default_dtype(dtype), patched(diffusion_mod, "vp_beta_schedule", lambda n: schedule(n, dtype=dtype)):
        common = dict(state_dim=meta["obs_dim"], action_dim=meta["act_dim"], max_action=meta["max_action"], device="cpu",
                      discount=cfg["discount"], tau=cfg["tau"], max_q_backup=cfg["max_q_backup"],
                      beta_schedule=meta["beta_schedule"], n_timesteps=meta["n_timesteps"], ema_decay=cfg["ema_decay"],
                      step_start_ema=cfg["step_start_ema"], update_ema_every=cfg["update_ema_every"], lr=cfg["actor_lr"],
                      grad_norm=cfg["grad_norm"])
        if agent == "diffusion_ql":
            a = mod.Diffusion_QL(eta=cfg["eta"], **common)
        else:
            a = mod.DiffCPS(LA=cfg["LA"], policy_freq=cfg["policy_freq"], target_kl=cfg["target_kl"],
                            LA_max=cfg["LA_max"], LA_min=cfg["LA_min"], **common)
            if dtype == torch.float64:  # shim: LA is hard-coded float32
                a.LA = torch.tensor(cfg["LA"], dtype=torch.float64, requires_grad=True)
                a.LA_optimizer = torch.optim.Adam([a.LA], lr=cfg["lambda_lr"])
    assert a.actor.betas.dtype == dtype and next(a.critic.parameters()).dtype == dtype
    return a


def load_weights(a, weights: dict) -> None:
    a.actor.model.load_state_dict(weights["actor"])
    a.ema_model.model.load_state_dict(weights.get("ema_actor", weights["actor"]))
    a.critic.load_state_dict(weights["critic"])
    a.critic_target.load_state_dict(weights.get("critic_target", weights["critic"]))


# --------------------------------------------------------------------------- random draws and hooks
class Replay:
    """Hand out the recorded draws in order (cast to the requested dtype); `record_multinomial`
    makes torch.multinomial a pass-through that records instead."""

    def __init__(self, draws: list[dict], record_multinomial: bool = False):
        self.draws, self.k, self.record_multinomial, self.new = list(draws), 0, record_multinomial, []

    def next(self, fn: str, shape) -> object:
        d = self.draws[self.k]
        assert d["fn"] == fn and list(d["shape"]) == list(shape), (self.k, d["fn"], d["shape"], fn, shape)
        self.k += 1
        return d["value"]

    @contextlib.contextmanager
    def active(self):
        multinomial = torch.multinomial

        def r_randn(*shape, dtype=None, device=None, **kw):
            shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
            return self.next("torch.randn", shape).to(dtype or torch.get_default_dtype()).clone()

        def r_randn_like(x, **kw):
            return self.next("torch.randn_like", x.shape).to(x.dtype).clone()

        def r_randint(low, high, size, device=None, **kw):
            assert (low, high) == (0, 5)
            return self.next("torch.randint", size).clone()

        def r_multinomial(p, n):
            if self.record_multinomial:
                out = multinomial(p, n)
                self.new.append(dict(fn="torch.multinomial", shape=list(out.shape), caller="sample_action", module="agent",
                                     dtype=str(out.dtype), value=out.clone(), probs=p.detach().clone(), num_samples=n))
                return out
            return self.next("torch.multinomial", (n,)).clone()

        def r_uniform(*args, **kw):
            assert not args and not kw
            return self.next("np.random.uniform", [])

        with (patched(torch, "randn", r_randn), patched(torch, "randn_like", r_randn_like),
              patched(torch, "randint", r_randint), patched(torch, "multinomial", r_multinomial),
              patched(np.random, "uniform", r_uniform)):
            yield self
        assert self.k == len(self.draws), f"{len(self.draws) - self.k} recorded draws left unused"


@contextlib.contextmanager
def locals_at_return(names: set[str], root: str):
    """The locals of the official functions `names` (files under `root`) when they return."""
    seen: dict[str, dict] = {}

    def prof(frame, event, arg):
        if event == "return" and frame.f_code.co_name in names and frame.f_code.co_filename.startswith(root):
            seen[frame.f_code.co_name] = dict(frame.f_locals)

    sys.setprofile(prof)
    try:
        yield seen
    finally:
        sys.setprofile(None)


@contextlib.contextmanager
def grads_at_step():
    """Each parameter's gradient as Adam.step sees it, keyed by id(parameter)."""
    grads: dict[int, torch.Tensor] = {}

    def hook(opt, args, kwargs):
        grads.update({id(p): p.grad.detach().clone() for group in opt.param_groups for p in group["params"]
                      if p.grad is not None})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield grads
    finally:
        handle.remove()


class Buffer:
    def __init__(self, batch: dict, dtype):
        self.batch = [batch[k].to(dtype) for k in ("state", "action", "next_state", "reward", "not_done")]

    def sample(self, batch_size):
        assert batch_size == self.batch[0].shape[0]
        return self.batch


# --------------------------------------------------------------------------- the pieces
def summary(t: torch.Tensor) -> dict:
    """A big tensor (> 1024 entries) as its first 2 rows plus float64 sums; a small one whole."""
    t = t.detach()
    out = {"sum": t.double().sum().item(), "abs_sum": t.double().abs().sum().item(),
           "dot": (t.double().flatten() * torch.cos(torch.arange(t.numel(), dtype=torch.float64))).sum().item()}
    out["head"] = t.clone() if t.numel() <= BIG else t[:2].clone()
    return out


def step1000_init(init: dict) -> dict:
    """The initial weights of the `train_step_1000` piece: the piece's own actor and critic, the EMA
    actor 0.9 x actor and the target critic 0.9 x critic (float32), so that every term's reading of
    online or averaged weights shows, and the EMA step (active from update 1000) moves the EMA actor."""
    return {"actor": init["actor"], "critic": init["critic"], "ema_actor": target_weights(init["actor"]),
            "critic_target": target_weights(init["critic"])}


def official_train(checkout: str, agent: str, g: dict, piece: str, dtype, step: int = 0) -> dict:
    """One official train() iteration of `piece` in `dtype`, from update number `step` (1000: with the
    weights of `step1000_init`). Returns the quantities named as in the float32 file, gradients and
    parameters after the step (full, keyed by official names)."""
    mod, dmod, hmod = load_official(checkout, agent)
    ref = g[piece]
    cfg = ref["config"]
    a = build_agent(mod, dmod, hmod, agent, g, cfg, dtype)
    load_weights(a, ref["init"] if step == 0 else step1000_init(ref["init"]))
    a.step = step
    nets = {"actor": a.actor.model, "critic": a.critic, "critic_target": a.critic_target, "ema_actor": a.ema_model.model}
    names = {id(p): (net, n) for net, m in nets.items() if net in ("actor", "critic") for n, p in m.named_parameters()}
    init = {net: {k: v.detach().clone() for k, v in m.state_dict().items()} for net, m in nets.items()}
    replay = Replay(ref["random_draws"])
    with default_dtype(dtype), replay.active(), grads_at_step() as grads, locals_at_return({"train"}, checkout) as seen:
        metrics = a.train(Buffer(ref["batch"], dtype), iterations=1, batch_size=cfg["batch_size"])
    loc = seen["train"]
    out = {
        "next_action": (loc["next_action_rpt"] if cfg["max_q_backup"] else loc["next_action"]).detach().clone(),
        "target_q": loc["target_q"].detach().clone(), "current_q1": loc["current_q1"].detach().clone(),
        "current_q2": loc["current_q2"].detach().clone(), "critic_loss": loc["critic_loss"].detach().clone(),
        "critic_grad_norm": loc["critic_grad_norms"].detach().clone(),
        "bc_loss": (loc["bc_loss"] if agent == "diffusion_ql" else loc["kl_loss"]).detach().clone(),
        "new_action": loc["new_action"].detach().clone(), "q1_new_action": loc["q1_new_action"].detach().clone(),
        "q2_new_action": loc["q2_new_action"].detach().clone(), "q_loss": loc["q_loss"].detach().clone(),
        "actor_loss": loc["actor_loss"].detach().clone(), "actor_grad_norm": loc["actor_grad_norms"].detach().clone(),
        "metrics": {k: v[0] for k, v in metrics.items()},
        "grad": {"actor": {}, "critic": {}},
        "init": init,
        "after": {net: {k: v.detach().clone() for k, v in m.state_dict().items()} for net, m in nets.items()},
    }
    for pid, grad in grads.items():
        if pid in names:
            net, n = names[pid]
            out["grad"][net][n] = grad
    if agent == "diffcps":
        out["lambda_loss"] = loc["LA_loss"].detach().clone()
        out["lambda_grad"] = grads[id(a.LA)].clone()
        out["lambda_after"] = a.LA.detach().clone()
    return out


def t09_state(g: dict, agent: str) -> torch.Tensor:
    piece, row = T09_STATE[agent]
    return g["sample_action"]["state"] if row is None else g[piece]["batch"]["state"][row]


def official_sample_action(checkout: str, agent: str, g: dict, dtype, weights: dict, draws: list[dict],
                           state: torch.Tensor, record_multinomial: bool = False) -> dict:
    """The official sample_action(state) with `weights` (actor, critic_target; the online critic gets
    `weights["critic"]`)."""
    mod, dmod, hmod = load_official(checkout, agent)
    cfg = g["train_step"]["config"]
    a = build_agent(mod, dmod, hmod, agent, g, cfg, dtype)
    load_weights(a, weights)
    state = state.numpy()
    replay = Replay(draws, record_multinomial)
    float_tensor = (lambda x: torch.as_tensor(x, dtype=torch.float64)) if dtype == torch.float64 else torch.FloatTensor
    with (default_dtype(dtype), patched(torch, "FloatTensor", float_tensor), replay.active(),
          locals_at_return({"sample_action", "q_min"}, checkout) as seen):
        action = a.sample_action(state)
    loc, qm = seen["sample_action"], seen["q_min"]
    return {"candidates": loc["action"].clone(), "q1": qm["q1"].clone(), "q2": qm["q2"].clone(),
            "q_value": loc["q_value"].clone(), "probs": torch.softmax(loc["q_value"], 0), "index": loc["idx"].clone(),
            "action": torch.as_tensor(action), "multinomial": replay.new}


# --------------------------------------------------------------------------- storing
def compact_step(run: dict, agent: str) -> dict:
    """What the float64 file keeps of one training step: every scalar and small output whole; each
    gradient and each parameter after the step as `summary` (first 2 rows + sums) when big."""
    keep = ["next_action", "target_q", "current_q1", "current_q2", "critic_loss", "critic_grad_norm", "bc_loss",
            "new_action", "q1_new_action", "q2_new_action", "q_loss", "actor_loss", "actor_grad_norm", "metrics"]
    if agent == "diffcps":
        keep += ["lambda_loss", "lambda_grad", "lambda_after"]
    out = {k: run[k] for k in keep}
    out["grad"] = {net: {k: summary(v) for k, v in d.items()} for net, d in run["grad"].items()}
    nets = ("actor", "critic", "critic_target", "ema_actor")
    out["after"] = {net: {k: summary(v) for k, v in run["after"][net].items()} for net in nets}
    out["moved_abs_sum"] = {net: {k: (run["after"][net][k] - run["init"][net][k]).abs().sum().item()
                                  for k in run["after"][net]} for net in nets}
    out["ema_unchanged"] = all(torch.equal(run["after"]["ema_actor"][k], run["init"]["ema_actor"][k])
                               for k in run["init"]["ema_actor"])
    return out


def target_weights(critic: dict) -> dict:
    return {k: (TARGET_SCALE * v).to(torch.float32) for k, v in critic.items()}


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max((max_diff(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return abs(float(a) - float(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help="checkout of the official repository at the commit above")
    p.add_argument("--agent", choices=["diffusion_ql", "diffcps"], required=True)
    p.add_argument("--check", action="store_true", help="only rerun the float32 pieces against the float32 file")
    args = p.parse_args()
    checkout = str(Path(args.official).resolve())
    g = torch.load(GOLDEN / f"{args.agent}.pt", weights_only=True)
    pieces = ["train_step", "train_step_max_q_backup"] if args.agent == "diffusion_ql" else ["train_step"]
    for piece in pieces:  # the float32 replay reproduces the float32 file (the replay is faithful)
        run = official_train(checkout, args.agent, g, piece, torch.float32)
        ref = g[piece]
        d = {"next_action": max_diff(run["next_action"], ref["critic_update"]["next_action"]),
             "q_loss": max_diff(run["q_loss"], ref["actor_update"]["q_loss"]),
             "critic_after": max_diff(run["after"]["critic"], ref["after"]["critic"]),
             "actor_after": max_diff(run["after"]["actor"], ref["after"]["actor"]),
             "actor_grad": max_diff(run["grad"]["actor"], ref["grad_subset"]["actor"])}
        print(f"{piece} float32 replay vs the float32 file:", d)
    sa = g["sample_action"]
    run = official_sample_action(checkout, args.agent, g, torch.float32, sa["weights"] | {"critic": sa["weights"]["critic_target"]},
                                 sa["random_draws"], sa["state"])
    print("sample_action float32 replay vs the float32 file:",
          {k: max_diff(run[k], sa[k]) for k in ("candidates", "q_value", "index", "action")})
    if args.check:
        return

    out: dict = {"meta": {"repository": g["meta"]["repository"], "agent": g["meta"]["agent"],
                          "torch_version": str(torch.__version__), "numpy_version": np.__version__,
                          "threads": torch.get_num_threads(), "target_scale": TARGET_SCALE, "big": BIG}}
    for piece in pieces:
        run = official_train(checkout, args.agent, g, piece, torch.float64)
        out[piece] = {"float64": compact_step(run, args.agent)}
        # The float32 after-step entries whose value the float32 gradient fixes only to within round-off:
        # Adam's first step is lr g / (|g| + 1e-8); these are the entries with |g64| < SMALL_GRAD max|g64|
        # of their network, stored as packed bits (np.packbits of the flattened mask, per tensor).
        small = {}
        for net in ("actor", "critic"):
            top = max(v.abs().max().item() for v in run["grad"][net].values())
            small[net] = {k: torch.from_numpy(np.packbits((v.abs() < SMALL_GRAD * top).flatten().numpy()))
                          for k, v in run["grad"][net].items()}
        out[piece]["float64"]["small_grad_bits"] = small
        print(piece, "float64 recorded; small-gradient entries:",
              {net: sum(int(np.unpackbits(b.numpy()).sum()) for b in d.values()) for net, d in small.items()})

    # one update at step 1000 (EMA step active) with EMA actor and target critic apart from the online ones
    run = official_train(checkout, args.agent, g, "train_step", torch.float64, step=1000)
    out["train_step_1000"] = {"float64": compact_step(run, args.agent)}
    assert not out["train_step_1000"]["float64"]["ema_unchanged"]

    # sample_action with critic_target = 0.9 x critic: float32 (new multinomial draw, recorded) and float64
    weights = {"actor": sa["weights"]["actor"], "critic": sa["weights"]["critic_target"]}
    weights["critic_target"] = target_weights(weights["critic"])
    state = t09_state(g, args.agent)
    torch.manual_seed(20260)
    r32 = official_sample_action(checkout, args.agent, g, torch.float32, weights, sa["random_draws"][:6], state,
                                record_multinomial=True)
    draws = sa["random_draws"][:6] + r32["multinomial"]
    r64 = official_sample_action(checkout, args.agent, g, torch.float64, weights, draws, state)
    online = official_sample_action(checkout, args.agent, g, torch.float64,
                                    weights | {"critic_target": weights["critic"]}, draws, state)
    out["sample_action_t09"] = {"state": state, "critic_target": weights["critic_target"], "random_draws": draws,
                                "float32": {k: v for k, v in r32.items() if k != "multinomial"},
                                "float64": {k: v for k, v in r64.items() if k != "multinomial"}}
    print("sample_action_t09: index", r32["index"].item(), "argmax q target", r64["q_value"].argmax().item(),
          "argmax q online", online["q_value"].argmax().item(),
          "argmax max-heads", torch.maximum(r64["q1"], r64["q2"]).flatten().argmax().item(), "float32 vs float64 q", max_diff(r32["q_value"], r64["q_value"]))
    path = GOLDEN / f"{args.agent}_f64.pt"
    torch.save(out, path)
    print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
