"""Record Decision Diffuser's golden values by running the official code in float64; writes
tests/data/golden/dd_f64.pt (read by tests/test_golden_dd.py; described in tests/data/golden/README.md,
part "Decision Diffuser").

Official code (imported from a checkout, not copied): anuragajay/decision-diffuser
@ 01ce528c30b4733dc59aa6203e46ec165561158d, folder code/ (diffuser/models/temporal.py, diffusion.py,
helpers.py; diffuser/datasets/sequence.py, buffer.py, d4rl.py, normalization.py; the acting rule of
scripts/evaluate_inv_parallel.py, whose loop body is reproduced by calling the official objects in its order).
Environment: the project's venv (Python 3.11, PyTorch 2.13.0+cpu, NumPy 2.4.6, SciPy 1.17.1) plus einops 0.8.2
(`pip install --target DIR einops==0.8.2`, DIR on PYTHONPATH), one thread:
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:DIR python tests/data/golden/recording/record_dd.py \
        --official /path/to/decision-diffuser/code

Shims (no official line changed): the packages `diffuser`, `diffuser.utils` and `diffuser.datasets` are
created empty so that their __init__ files (gym, mujoco_py, d4rl, ml_logger imports) do not run; only
`diffuser.utils.progress`/`arrays` are loaded into `diffuser.utils`; stub modules `gym` and `d4rl`; `np.int =
int` (buffer.py, NumPy >= 1.24). float64: torch's default dtype is float64 while the modules are built and
run, and `cosine_beta_schedule` (hard-coded float32) is called with dtype float64. The random functions
torch.randn, randn_like, randint and bernoulli (which Bernoulli.sample calls) are wrapped with pass-through
recorders; the other torch random functions are wrapped to fail if called. Intermediate values are read from
the official functions' locals when they return (a profiling hook).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).resolve().parents[1]
SETTINGS = dict(obs_dim=11, act_dim=3, horizon=8, n_timesteps=6, dim=16, dim_mults=(1, 2, 4), hidden_dim=64,
                condition_dropout=0.25, condition_guidance_w=1.2, returns_scale=400.0, discount=0.99,
                termination_penalty=-100.0, max_path_length=12, test_ret=0.9, batch=3, seed=0)
EPISODES = (5, 9, 12, 3, 7, 11)  # every episode ends with a terminal; one trailing unfinished row


def load_official(root: str):
    """The official modules without their import-time dependencies (see the docstring)."""
    for k in [k for k in sys.modules if k == "diffuser" or k.startswith("diffuser.")]:
        del sys.modules[k]

    def pkg(name, path):
        m = types.ModuleType(name)
        m.__path__ = [path]
        sys.modules[name] = m
        return m

    base = os.path.join(root, "diffuser")
    pkg("diffuser", base)
    u = pkg("diffuser.utils", os.path.join(base, "utils"))
    for sub in ("progress", "arrays"):
        for k, v in vars(importlib.import_module("diffuser.utils." + sub)).items():
            if not k.startswith("__"):
                setattr(u, k, v)
    pkg("diffuser.datasets", os.path.join(base, "datasets"))
    sys.modules["gym"] = types.ModuleType("gym")
    sys.modules["d4rl"] = types.ModuleType("d4rl")
    np.int = int  # buffer.py's np.int (removed in NumPy 1.24)
    models = importlib.import_module("diffuser.models")
    helpers = importlib.import_module("diffuser.models.helpers")
    diffusion = importlib.import_module("diffuser.models.diffusion")
    sequence = importlib.import_module("diffuser.datasets.sequence")
    return models, helpers, diffusion, sequence


class Draws:
    """Pass-through recorders of torch's random functions; unexpected ones raise."""

    RECORDED = ("randn", "randn_like", "randint", "bernoulli")
    FORBIDDEN = ("rand", "rand_like", "normal", "randperm", "multinomial", "randint_like", "poisson")

    def __init__(self) -> None:
        self.log: list[tuple[str, torch.Tensor]] = []

    @contextlib.contextmanager
    def __call__(self):
        saved = {n: getattr(torch, n) for n in self.RECORDED + self.FORBIDDEN}

        def recorder(name):
            def f(*args, **kwargs):
                out = saved[name](*args, **kwargs)
                self.log.append((name, out.detach().clone().contiguous()))
                return out
            return f

        def forbidden(name):
            def f(*args, **kwargs):
                raise AssertionError(f"the official code called torch.{name}, which the recording does not replay")
            return f

        for n in self.RECORDED:
            setattr(torch, n, recorder(n))
        for n in self.FORBIDDEN:
            setattr(torch, n, forbidden(n))
        try:
            yield self.log
        finally:
            for n, f in saved.items():
                setattr(torch, n, f)


@contextlib.contextmanager
def calls_of(names: set[str], root: str):
    """The locals of every return of the official functions `names`, in call order."""
    seen: dict[str, list[dict]] = {n: [] for n in names}

    def prof(frame, event, arg):
        if event == "return" and frame.f_code.co_name in names and frame.f_code.co_filename.startswith(root):
            seen[frame.f_code.co_name].append({k: (v.detach().clone() if torch.is_tensor(v) else v)
                                               for k, v in frame.f_locals.items()})

    sys.setprofile(prof)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def summary(t: torch.Tensor) -> dict:
    """A tensor as float64 sums (sum, sum of |.|, sum of x_k cos(k) over the flat index k), whole when small."""
    t = t.detach().double()
    out = {"sum": t.sum(), "abs_sum": t.abs().sum(), "dot": (t.flatten() * torch.cos(torch.arange(t.numel()).double())).sum()}
    if t.numel() <= 1024:
        out["whole"] = t.clone()
    return out


def fake_dataset(g: dict) -> dict:
    """A D4RL-layout dict: episodes of EPISODES steps, each ending with a terminal, and one trailing row
    (an unfinished episode, which the official loader and the suite's both drop). Dimension 2 of the states is
    rounded (repeated values), dimension 5 constant, the actions rounded to 0.05 in (-1, 1)."""
    rng = np.random.default_rng(g["seed"])
    n = sum(EPISODES) + 1
    obs = rng.normal(size=(n, g["obs_dim"])).astype(np.float32)
    obs[:, 2] = np.round(obs[:, 2], 1)
    obs[:, 5] = 0.5
    for start, length in zip(np.cumsum((0,) + EPISODES[:-1]), EPISODES):  # states chain within an episode
        obs[start : start + length, 0] = np.cumsum(rng.normal(size=length)).astype(np.float32)
    act = np.clip(np.round(rng.uniform(-1.2, 1.2, size=(n, g["act_dim"])) / 0.05) * 0.05, -1, 1).astype(np.float32)
    rew = rng.uniform(0.0, 3.0, size=n).astype(np.float32)
    terminals = np.zeros(n, bool)
    terminals[np.cumsum(EPISODES) - 1] = True
    return {"observations": obs, "actions": act, "rewards": rew, "terminals": terminals, "timeouts": np.zeros(n, bool)}


class FakeEnv:
    """What SequenceDataset reads of an env: get_dataset(), name, str()."""

    name = "hopper-golden"

    def __init__(self, data: dict) -> None:
        self.data = data

    def get_dataset(self) -> dict:
        return {k: v.copy() for k, v in self.data.items()}

    def seed(self, s=None) -> None:
        pass

    def __str__(self) -> str:
        return self.name


def record(official: str) -> dict:
    g = dict(SETTINGS)
    models, helpers, diffusion, sequence = load_official(official)
    root = str(Path(official).resolve())
    torch.set_default_dtype(torch.float64)
    out: dict = {"meta": {"settings": json.dumps({**g, "episodes": EPISODES}), "versions": json.dumps({
        "official": "anuragajay/decision-diffuser@01ce528c30b4733dc59aa6203e46ec165561158d",
        "torch": torch.__version__, "numpy": np.__version__, "scipy": importlib.import_module("scipy").__version__})}}

    # 1. data: the official SequenceDataset (windows, padding, CDF normalisation, returns)
    data = fake_dataset(g)
    ds = sequence.SequenceDataset(env=FakeEnv(data), horizon=g["horizon"], normalizer="CDFNormalizer", preprocess_fns=[],
                                  max_path_length=g["max_path_length"], max_n_episodes=10,
                                  termination_penalty=g["termination_penalty"], use_padding=True, discount=g["discount"],
                                  returns_scale=g["returns_scale"], include_returns=True)
    items = [ds[i] for i in range(len(ds))]
    out["data"] = {
        "d4rl": {k: torch.as_tensor(v) for k, v in data.items()},
        "indices": torch.as_tensor(ds.indices),
        "trajectories": torch.as_tensor(np.stack([b.trajectories for b in items])),  # (W, H, act + obs) float32
        "conditions": torch.as_tensor(np.stack([b.conditions[0] for b in items])),
        "returns": torch.as_tensor(np.stack([b.returns for b in items])),  # (W, 1) float32
    }

    # 2. the CDF normalisers of that dataset on other inputs (in and out of the data range; float32 and float64)
    rng = np.random.default_rng(1)
    cdf = {}
    for key, dim in (("observations", g["obs_dim"]), ("actions", g["act_dim"])):
        norm = ds.normalizer.normalizers[key]
        x64 = rng.normal(scale=1.5, size=(40, dim))
        y64 = np.clip(rng.normal(scale=0.7, size=(40, dim)), -1.1, 1.1)
        cdf[key] = {"x64": torch.as_tensor(x64), "x32": torch.as_tensor(x64.astype(np.float32)),
                    "y64": torch.as_tensor(y64), "y32": torch.as_tensor(y64.astype(np.float32)),
                    "normalize64": torch.as_tensor(norm.normalize(x64.copy())),
                    "normalize32": torch.as_tensor(norm.normalize(x64.astype(np.float32))),
                    "unnormalize64": torch.as_tensor(norm.unnormalize(y64.copy())),
                    "unnormalize32": torch.as_tensor(norm.unnormalize(y64.astype(np.float32)))}
    out["cdf"] = cdf

    # 3. the official model, float64, its initial weights
    cosine = helpers.cosine_beta_schedule
    diffusion.cosine_beta_schedule = lambda n, f=cosine: f(n, dtype=torch.float64)
    torch.manual_seed(g["seed"])
    unet = models.TemporalUnet(horizon=g["horizon"], transition_dim=g["obs_dim"], cond_dim=g["obs_dim"], dim=g["dim"],
                               dim_mults=g["dim_mults"], returns_condition=True, condition_dropout=g["condition_dropout"])
    dd = models.GaussianInvDynDiffusion(unet, horizon=g["horizon"], observation_dim=g["obs_dim"], action_dim=g["act_dim"],
                                        n_timesteps=g["n_timesteps"], loss_type="l2", clip_denoised=True,
                                        predict_epsilon=True, hidden_dim=g["hidden_dim"], action_weight=10, loss_discount=1,
                                        loss_weights=None, returns_condition=True,
                                        condition_guidance_w=g["condition_guidance_w"]).double()
    assert dd.betas.dtype == torch.float64 and next(dd.parameters()).dtype == torch.float64
    with torch.no_grad():  # the official initial weights rounded to float32 (stored so, cast exactly to float64)
        for p in dd.parameters():
            p.copy_(p.float().double())
    out["weights"] = {k: v.detach().float() for k, v in dd.state_dict().items() if k.startswith(("model.", "inv_model."))}
    out["schedule"] = {k: getattr(dd, k).clone() for k in ("betas", "alphas_cumprod", "sqrt_recip_alphas_cumprod",
                                                          "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                                                          "posterior_mean_coef2", "posterior_log_variance_clipped")}

    # 4. the U-Net with returns conditioning: conditional, unconditional, and with a drawn dropout mask
    x = torch.as_tensor(out["data"]["trajectories"][[0, 7, 13], :, g["act_dim"]:]).double()
    t = torch.tensor([5, 0, 3])
    returns = torch.as_tensor(out["data"]["returns"][[0, 7, 13]]).double()
    draws = Draws()
    with torch.no_grad(), draws() as log:
        masked = dd.model(x, {}, t, returns)  # use_dropout=True: a Bernoulli mask
    assert [n for n, _ in log] == ["bernoulli"]
    with torch.no_grad():
        out["unet"] = {"x": x, "t": t, "returns": returns, "cond": dd.model(x, {}, t, returns, use_dropout=False),
                       "uncond": dd.model(x, {}, t, returns, force_dropout=True), "mask": log[0][1], "masked": masked}

    # 5. the training loss and its gradients, on windows of the dataset
    rows = [2, 9, 17]
    batch = torch.as_tensor(out["data"]["trajectories"][rows]).double()
    cond = {0: batch[:, 0, g["act_dim"]:].clone()}
    ret = torch.as_tensor(out["data"]["returns"][rows]).double()
    draws = Draws()
    dd.zero_grad()
    with draws() as log, calls_of({"loss", "p_losses"}, root) as seen:
        loss, _ = dd.loss(batch, cond, ret)
    loss.backward()
    assert [n for n, _ in log] == ["randint", "randn_like", "bernoulli"], [n for n, _ in log]
    out["loss"] = {"rows": torch.tensor(rows), "x": batch, "returns": ret, "t": log[0][1], "noise": log[1][1],
                   "mask": log[2][1], "loss": loss.detach(), "diffusion_loss": seen["p_losses"][-1]["loss"],
                   "inv_loss": seen["loss"][-1]["inv_loss"],
                   "grads": {k: summary(p.grad) for k, p in dd.named_parameters()}}
    dd.zero_grad()

    # 6. the inverse-dynamics model alone
    pairs = torch.as_tensor(rng.uniform(-1, 1, size=(5, 2 * g["obs_dim"])))
    with torch.no_grad():
        out["inverse"] = {"input": pairs, "output": dd.inv_model(pairs)}

    # 7. the classifier-free sampler: a whole plan with its chain and the guidance terms of every step
    s0 = torch.as_tensor(out["data"]["conditions"][[1, 11]]).double()
    target = g["test_ret"] * torch.ones(2, 1)
    draws = Draws()
    with draws() as log, calls_of({"p_mean_variance"}, root) as seen:
        plan, chain = dd.conditional_sample({0: s0}, returns=target, verbose=False, return_diffusion=True)
    names = [n for n, _ in log]
    assert names == ["randn"] + ["bernoulli", "randn_like"] * g["n_timesteps"], names
    out["sample"] = {"s0": s0, "returns": target, "x_N": log[0][1], "noise": torch.stack([z for n, z in log[2::2]]),
                     "bernoulli": torch.stack([z for n, z in log[1::2]]), "chain": chain, "plan": plan,
                     "eps_cond": torch.stack([c["epsilon_cond"] for c in seen["p_mean_variance"]]),
                     "eps_uncond": torch.stack([c["epsilon_uncond"] for c in seen["p_mean_variance"]]),
                     "eps": torch.stack([c["epsilon"] for c in seen["p_mean_variance"]]),
                     "x_recon": torch.stack([c["x_recon"] for c in seen["p_mean_variance"]])}

    # 8. the acting rule (evaluate_inv_parallel.py's loop body) on raw states, with the dataset's normalisers
    obs = np.stack([data["observations"][3].astype(np.float64) + 0.01, rng.normal(scale=2.0, size=g["obs_dim"])])
    normed = ds.normalizer.normalize(obs, "observations")
    draws = Draws()
    with draws() as log, torch.no_grad():
        samples = dd.conditional_sample({0: torch.as_tensor(normed)}, returns=g["test_ret"] * torch.ones(2, 1), verbose=False)
        obs_comb = torch.cat([samples[:, 0, :], samples[:, 1, :]], dim=-1).reshape(-1, 2 * g["obs_dim"])
        action_normalized = dd.inv_model(obs_comb)
    action = ds.normalizer.unnormalize(action_normalized.numpy(), "actions")
    out["act"] = {"obs": torch.as_tensor(obs), "x_N": log[0][1], "noise": torch.stack([z for n, z in log[2::2]]),
                  "plan": samples, "action_normalized": action_normalized, "action": torch.as_tensor(action)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="the decision-diffuser checkout's code/ folder")
    parser.add_argument("--out", default=str(GOLDEN / "dd_f64.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = record(args.official)
    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
