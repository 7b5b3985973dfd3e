"""Record tests/data/golden/diffuser_f64.pt by running the official Diffuser code in float64.

Official code: jannerm/diffuser, commit 7ea422860cc0106e5ca5949d980f04b799d5462c (diffuser/models/temporal.py,
helpers.py, diffusion.py, sampling/functions.py, guides.py, datasets/sequence.py, buffer.py, normalization.py),
imported unmodified from a checkout given on the command line (`git archive` of that commit); gym, d4rl and
mujoco_py are not needed: the packages' __init__ files that import them are skipped (empty package modules),
and the dataset code gets a fake env whose get_dataset() returns arrays made here.
Environment: Python 3.11, torch 2.13.0 (CPU), NumPy 2.4.6, SciPy 1.17.1, einops 0.8.2, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/einops python tests/data/golden/recording/diffuser_record.py /path/to/diffuser-checkout

float64: torch's default dtype is float64 before any official module is built, and the official
`cosine_beta_schedule` (which hard-codes float32) is called with dtype float64 (a wrapper passed to
diffusion.py's name). Random draws: torch.randn and torch.randn_like are wrapped by pass-through recorders
during the official sampling and loss calls (every output stored, in order; after the first reverse step the
official x has the U-Net output's transposed strides, so randn_like's values are stored as tensors, never
replayed from a seed). The weights are the official modules' own initialisation after torch.manual_seed.
Shims: numpy's removed `np.int` is set to `int` for buffer.py (NumPy >= 1.24).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "diffuser_f64.pt"
OBS, ACT, N = 3, 2, 6  # observation and action sizes, diffusion steps
D = OBS + ACT


def load_official(root: str):
    def pkg(name: str, path: str) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__path__ = [path]
        sys.modules[name] = m
        return m

    base = os.path.join(root, "diffuser")
    pkg("diffuser", base)  # skips diffuser/__init__ (gym)
    u = pkg("diffuser.utils", os.path.join(base, "utils"))  # skips utils/__init__ (mujoco_py, d4rl)
    for sub in ("progress", "arrays"):
        for k, v in vars(importlib.import_module("diffuser.utils." + sub)).items():
            if not k.startswith("__"):
                setattr(u, k, v)
    models = importlib.import_module("diffuser.models")
    pkg("diffuser.sampling", os.path.join(base, "sampling"))  # skips sampling/__init__ (policies -> gym)
    functions = importlib.import_module("diffuser.sampling.functions")
    guides = importlib.import_module("diffuser.sampling.guides")
    return models, functions, guides


class Recorder:
    """Pass-through wrappers of torch.randn / torch.randn_like that keep every output."""

    def __init__(self) -> None:
        self.draws: list[torch.Tensor] = []

    def __enter__(self):
        self.saved = torch.randn, torch.randn_like

        def wrap(f):
            def g(*args, **kwargs):
                out = f(*args, **kwargs)
                self.draws.append(out.detach().clone(memory_format=torch.contiguous_format))
                return out
            return g

        torch.randn, torch.randn_like = wrap(torch.randn), wrap(torch.randn_like)
        return self

    def __exit__(self, *exc) -> None:
        torch.randn, torch.randn_like = self.saved


def cond_of(x: torch.Tensor) -> dict[int, torch.Tensor]:
    return {0: x[:, 0, ACT:].clone()}


def main(root: str) -> None:
    torch.set_default_dtype(torch.float64)
    np.int = int  # buffer.py's np.int (removed in NumPy 1.24)
    sys.modules.setdefault("gym", types.ModuleType("gym"))  # datasets/ imports them; the fake env needs neither
    sys.modules.setdefault("d4rl", types.ModuleType("d4rl"))
    models, functions, guides = load_official(root)
    helpers = importlib.import_module("diffuser.models.helpers")
    diffusion_mod = importlib.import_module("diffuser.models.diffusion")
    diffusion_mod.cosine_beta_schedule = lambda n, f=helpers.cosine_beta_schedule: f(n, dtype=torch.float64)
    out: dict = {"settings": {"obs_dim": OBS, "act_dim": ACT, "n_timesteps": N}}

    # --- networks: A = the hopper/walker layout (no attention), B = the halfcheetah layout (attention)
    nets = {"A": dict(horizon=8, dim=8, dim_mults=(1, 2, 4), attention=False),
            "B": dict(horizon=4, dim=8, dim_mults=(1, 4, 8), attention=True)}
    built = {}
    for name, cfg in nets.items():
        torch.manual_seed(10 if name == "A" else 11)
        unet = models.TemporalUnet(cfg["horizon"], D, cond_dim=OBS, dim=cfg["dim"], dim_mults=cfg["dim_mults"],
                                   attention=cfg["attention"])
        value = models.ValueFunction(cfg["horizon"], D, cond_dim=OBS, dim=cfg["dim"], dim_mults=cfg["dim_mults"])
        x = torch.randn(3, cfg["horizon"], D)
        t = torch.tensor([0, 2, N - 1])
        with torch.no_grad():
            out[f"net_{name}"] = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                                  "unet": unet.state_dict(), "value": value.state_dict(), "x": x, "t": t,
                                  "unet_out": unet(x, None, t), "value_out": value(x, None, t)}
        built[name] = (unet, value, cfg)

    unet, value, cfg = built["A"]
    H = cfg["horizon"]

    # --- training losses with injected t and recorded noise
    torch.manual_seed(20)
    x0 = torch.randn(4, H, D)
    t = torch.tensor([0, 1, 3, N - 1])
    target = torch.randn(4, 1)
    losses = {"x0": x0, "t": t, "target": target}
    for discount in (1.0, 0.9):
        diff = models.GaussianDiffusion(unet, H, OBS, ACT, n_timesteps=N, loss_type="l2", clip_denoised=False,
                                        predict_epsilon=False, action_weight=10, loss_discount=discount,
                                        loss_weights=None).double()
        with Recorder() as rec:
            loss, info = diff.p_losses(x0, cond_of(x0), t)
        losses[f"discount_{discount}"] = {"noise": rec.draws[0], "loss": loss.detach(), "a0_loss": info["a0_loss"].detach()}
    vdiff = models.ValueDiffusion(value, H, OBS, ACT, n_timesteps=N, loss_type="value_l2").double()
    with Recorder() as rec:
        vloss, _ = vdiff.p_losses(x0, cond_of(x0), target, t)
    losses["value"] = {"noise": rec.draws[0], "loss": vloss.detach()}
    out["losses"] = losses

    # --- guided planning: two states, P plans each, through the official sampler and GaussianNormalizer
    diff = models.GaussianDiffusion(unet, H, OBS, ACT, n_timesteps=N, loss_type="l2", clip_denoised=False,
                                    predict_epsilon=False, action_weight=10).double()
    guide = guides.ValueGuide(vdiff)
    normalization = importlib.import_module("diffuser.datasets.normalization")
    torch.manual_seed(30)
    data_x = np.random.default_rng(0).normal(size=(50, D)) * np.linspace(0.5, 2.0, D) + np.linspace(-1, 1, D)
    norm_act = normalization.GaussianNormalizer(data_x[:, :ACT])
    norm_obs = normalization.GaussianNormalizer(data_x[:, ACT:])
    obs = torch.randn(2, OBS)
    P = 5
    plans = {"obs": obs, "P": P, "norm_mean": torch.as_tensor(np.r_[norm_act.means, norm_obs.means]),
             "norm_std": torch.as_tensor(np.r_[norm_act.stds, norm_obs.stds])}
    for name, kwargs in {"stopgrad2": dict(scale=0.5, n_guide_steps=2, t_stopgrad=2, scale_grad_by_std=True),
                         "stopgrad0": dict(scale=0.5, n_guide_steps=2, t_stopgrad=0, scale_grad_by_std=True),
                         "unscaled": dict(scale=0.05, n_guide_steps=1, t_stopgrad=1, scale_grad_by_std=False)}.items():
        runs = []
        for k in range(2):
            s = torch.as_tensor(norm_obs.normalize(obs[k].numpy()))
            cond = {0: s[None].repeat(P, 1)}
            with Recorder() as rec:
                sample = diff(cond, guide=guide, sample_fn=functions.n_step_guided_p_sample, verbose=False,
                              **kwargs)
            traj = sample.trajectories
            action = norm_act.unnormalize(traj[0, 0, :ACT].numpy())
            runs.append({"draws": rec.draws, "trajectories": traj, "values": sample.values,
                         "action": torch.as_tensor(action), "cond": s})
        plans[name] = {"kwargs": kwargs, "runs": runs}
    out["plans"] = plans
    out["schedule"] = {k: getattr(diff, k) for k in ("betas", "alphas_cumprod", "posterior_variance",
                                                      "posterior_log_variance_clipped", "posterior_mean_coef1",
                                                      "posterior_mean_coef2")}

    # --- the dataset pipeline: windows, normaliser, value targets (float32 in the official code)
    out["dataset"] = record_dataset(root)
    torch.save(out, OUT)
    print(f"wrote {OUT}")


def record_dataset(root: str) -> dict:
    sequence = importlib.import_module("diffuser.datasets.sequence")
    rng = np.random.default_rng(1)
    lengths, terminal = [6, 10, 3, 10, 7], [True, False, True, False, True]  # max_path_length 10: 10-step episodes time out
    obs, act, rew, term, tout = [], [], [], [], []
    for n, is_term in zip(lengths, terminal):
        obs.append(rng.normal(size=(n, OBS)))
        act.append(rng.uniform(-1, 1, size=(n, ACT)))
        rew.append(rng.normal(size=n))
        term.append(np.r_[np.zeros(n - 1), float(is_term)])
        tout.append(np.r_[np.zeros(n - 1), float(not is_term)])
    arrays = {"observations": np.concatenate(obs).astype(np.float32), "actions": np.concatenate(act).astype(np.float32),
              "rewards": np.concatenate(rew).astype(np.float32), "terminals": np.concatenate(term).astype(bool),
              "timeouts": np.concatenate(tout).astype(bool)}

    class FakeEnv:
        name = "fake-medium-v2"
        _max_episode_steps = 10

        def get_dataset(self):
            return {k: v.copy() for k, v in arrays.items()}

        def seed(self, seed=None):
            return None

        def __str__(self):
            return self.name

    ds = sequence.ValueDataset(env=FakeEnv(), horizon=4, normalizer="GaussianNormalizer", preprocess_fns=[],
                               max_path_length=10, use_padding=True, termination_penalty=-100, discount=0.997)
    items = [ds[i] for i in range(len(ds))]
    return {
        "arrays": {k: torch.as_tensor(v) for k, v in arrays.items()},
        "lengths": lengths, "terminal": terminal, "horizon": 4, "max_path_length": 10, "discount": 0.997,
        "termination_penalty": -100.0,
        "indices": torch.as_tensor(ds.indices),
        "mean": torch.as_tensor(np.r_[ds.normalizer.normalizers["actions"].means, ds.normalizer.normalizers["observations"].means]),
        "std": torch.as_tensor(np.r_[ds.normalizer.normalizers["actions"].stds, ds.normalizer.normalizers["observations"].stds]),
        "trajectories": torch.as_tensor(np.stack([b.trajectories for b in items])),
        "values": torch.as_tensor(np.concatenate([b.values for b in items])),
    }


if __name__ == "__main__":
    main(sys.argv[1])
