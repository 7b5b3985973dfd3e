"""Golden tests: PGD's building blocks against values recorded by running the official JAX code in float64.

tests/data/golden/pgd_x64.npz holds what the official code (EmptyJackson/policy-guided-diffusion, commit and recording
settings in tests/data/golden/README.md, section PGD; script tests/data/golden/recording/pgd_record.py) computed with
JAX's x64 on, from fixed flax weights, inputs and random draws: the temporal U-Net's forward pass (per sequence, as the
official code calls it, and on a batch of one), EDM's preconditioning, its loss and the loss's gradient, the stochastic
Heun sampler (6 steps, each step's trajectory), policy guidance with two settings (the log-likelihood gradient of each
step and the guided trajectories), the un-normalisation of the sampled rollouts, and the normalisation of windows.
Each test loads the flax weights into our torch modules through `unet_state` (the documented mapping), runs our
production code in float64 with the recorded draws and compares. Tolerance: 1e-10 (absolute and relative); the largest
difference measured is in the README (about 1e-13); a wrong sign, coefficient, order or normalisation axis moves the
values by far more (the mutation check in the README).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from offbench.pgd.edm import EDM, SamplerSettings, churn_schedule, sigma_schedule
from offbench.pgd.guidance import PolicyGuidance
from offbench.trajectory.unet import TemporalUNet
from offbench.trajectory.windows import TrajectoryNormalizer

GOLDEN = Path(__file__).parent / "data" / "golden" / "pgd_x64.npz"
TOL = dict(atol=1e-10, rtol=1e-10)


@functools.cache
def golden() -> dict[str, torch.Tensor]:
    with np.load(GOLDEN) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files if f[k].dtype.kind != "U"}


def close(actual, expected, msg: str = "") -> None:
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), **TOL,
                               msg=lambda m: f"{msg}: {m}" if msg else m)


def _dense(p: dict, name: str) -> dict[str, torch.Tensor]:
    return {"weight": p[f"{name}/kernel"].T, "bias": p[f"{name}/bias"]}


def _conv(p: dict, name: str) -> dict[str, torch.Tensor]:
    return {"weight": p[f"{name}/kernel"].permute(2, 1, 0), "bias": p[f"{name}/bias"]}  # (k, in, out) -> (out, in, k)


def _group_norm(p: dict, name: str) -> dict[str, torch.Tensor]:
    return {"weight": p[f"{name}/scale"], "bias": p[f"{name}/bias"]}


def unet_mapping(n_blocks: int) -> list[tuple[str, str, callable]]:
    """(our module, official flax module, converter) of every layer. Official names: encoder block i has Conv_{2i},
    Dense_i, GroupNorm_{2i}, Conv_{2i+1}, GroupNorm_{2i+1}; the decoder's j-th block (j = 0 the deepest) Conv_{3j} (the
    kernel-2 up-convolution), Dense_j, GroupNorm_{3j}, Conv_{3j+1}, GroupNorm_{3j+1}, Conv_{3j+2}, GroupNorm_{3j+2}; the
    output convolution is the decoder's Conv_{3(n_blocks - 1)}."""
    m = [("time.dense1", "TimeEmbedding_0/Dense_0", _dense), ("time.dense2", "TimeEmbedding_0/Dense_1", _dense)]
    for i in range(n_blocks):
        e = "Encoder_0"
        m += [(f"enc.{i}.conv1", f"{e}/Conv_{2 * i}", _conv), (f"enc.{i}.temb", f"{e}/Dense_{i}", _dense),
              (f"enc.{i}.norm1", f"{e}/GroupNorm_{2 * i}", _group_norm), (f"enc.{i}.conv2", f"{e}/Conv_{2 * i + 1}", _conv),
              (f"enc.{i}.norm2", f"{e}/GroupNorm_{2 * i + 1}", _group_norm)]
    for j in range(n_blocks - 1):
        d = "Decoder_0"
        m += [(f"dec.{j}.up", f"{d}/Conv_{3 * j}", _conv), (f"dec.{j}.temb", f"{d}/Dense_{j}", _dense),
              (f"dec.{j}.norm0", f"{d}/GroupNorm_{3 * j}", _group_norm), (f"dec.{j}.conv1", f"{d}/Conv_{3 * j + 1}", _conv),
              (f"dec.{j}.norm1", f"{d}/GroupNorm_{3 * j + 1}", _group_norm),
              (f"dec.{j}.conv2", f"{d}/Conv_{3 * j + 2}", _conv),
              (f"dec.{j}.norm2", f"{d}/GroupNorm_{3 * j + 2}", _group_norm)]
    return m + [("out", f"Decoder_0/Conv_{3 * (n_blocks - 1)}", _conv)]


def unet_state(p: dict, n_blocks: int) -> dict[str, torch.Tensor]:
    """The official flax parameters (keys below `params/`) as our TemporalUNet's state dict."""
    state = {}
    for ours, theirs, convert in unet_mapping(n_blocks):
        state |= {f"{ours}.{k}": v.contiguous() for k, v in convert(p, theirs).items()}
    return state


def build_unet(norm: str = "per_step") -> TemporalUNet:
    g = golden()
    channels = int(g["meta/obs_dim"] + g["meta/act_dim"] + 2)
    net = TemporalUNet(channels, int(g["meta/features"]), int(g["meta/n_blocks"]), norm=norm).double()
    params = {k[len("unet/params/params/"):]: v for k, v in g.items() if k.startswith("unet/params/params/")}
    net.load_state_dict(unet_state(params, net.n_blocks))
    return net


def normalizer(prefix: str) -> TrajectoryNormalizer:
    """Our normaliser holding the official norm_stats of `prefix` (obs, action, reward, done; max_action 1)."""
    g = golden()
    n = TrajectoryNormalizer(int(g["meta/obs_dim"]), int(g["meta/act_dim"]), 1.0).double()
    parts = ("obs", "action", "reward", "done")
    n.mean.copy_(torch.cat([g[f"{prefix}/stats/{k}/mean"] for k in parts]))
    n.std.copy_(torch.cat([g[f"{prefix}/stats/{k}/std"] for k in parts]))
    return n


@pytest.mark.parametrize("norm,key", [("per_step", "unet/y_per_step"), ("window", "unet/y_window")])
def test_unet_forward(norm, key):
    """per_step = the official model as it runs (one unbatched sequence at a time); window = the official model on a
    batch of one sequence."""
    g = golden()
    with torch.no_grad():
        close(build_unet(norm)(g["unet/x"], g["unet/t"]), g[key], norm)


def test_unet_norms_differ():
    """The two normalisations give different networks on these weights (so each test above can fail)."""
    g = golden()
    assert (g["unet/y_per_step"] - g["unet/y_window"]).abs().max() > 0.1


def test_edm_preconditioning():
    """Our denoise D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) reads the official c functions off a stub network."""
    g = golden()
    sigma = g["edm/sigma"]
    x = torch.ones(len(sigma), 1, 1, dtype=torch.float64)
    seen = {}

    class Stub(torch.nn.Module):  # F(x, t) = a constant; keeps its inputs
        def forward(self, x_in, t):
            seen["x_in"], seen["t"] = x_in, t
            return torch.full_like(x_in, seen["out"])

    edm = EDM(Stub())
    seen["out"] = 0.0
    c_skip = edm.denoise(x, sigma).flatten()
    close(c_skip, g["edm/c_skip"], "c_skip")
    close(seen["x_in"].flatten(), g["edm/c_in"], "c_in")
    close(seen["t"], g["edm/c_noise"], "c_noise")
    seen["out"] = 1.0
    close(edm.denoise(x, sigma).flatten() - c_skip, g["edm/c_out"], "c_out")


def test_edm_loss_and_gradient():
    g = golden()
    net = build_unet()
    edm = EDM(net)
    loss = edm.loss_at(g["edm/x0"], g["edm/sigma_normal"], g["edm/noise"])
    close(loss, g["edm/loss"], "loss")
    loss.backward()
    grads = {k[len("edm/grad/params/"):]: v for k, v in g.items() if k.startswith("edm/grad/params/")}
    expected = unet_state(grads, net.n_blocks)
    for name, p in net.named_parameters():
        close(p.grad, expected[name], f"gradient of {name}")


def _chain(piece: str, traj: int, guide: PolicyGuidance | None = None, raw_guide: PolicyGuidance | None = None):
    """Our sampler steps from the recorded draws, compared step by step; returns the final trajectory."""
    g = golden()
    p = f"{piece}/{traj}"
    settings = SamplerSettings(steps=int(g["sample/steps"]))
    sigmas = sigma_schedule(settings)
    gammas = churn_schedule(settings, sigmas)
    edm = EDM(build_unet()).requires_grad_(False)
    draws = g[f"{p}/draws"][:, None]  # (steps + 1, 1, L, C): the initial noise, then each step's
    x = draws[0] * sigmas[0]
    for i in range(settings.steps):
        sigma = float(sigmas[i])
        if raw_guide is not None:  # the official gradient before normalisation, on the trajectory it is taken on
            traj_for_grad = edm.denoise(x, sigma) if raw_guide.denoised else x
            close(raw_guide.gradient(traj_for_grad)[0], g[f"{p}/grad"][i], f"guidance gradient, step {i}")
        if guide is not None:
            x = guide(x, i, sigma, edm)
        with torch.no_grad():
            x = edm.step(x, sigma, float(sigmas[i + 1]), float(gammas[i]), draws[i + 1], settings)
        close(x[0], g[f"{p}/states"][i], f"{p} after step {i}")
    return x


def _rollout_matches(piece: str, traj: int, x: torch.Tensor) -> None:
    g = golden()
    obs, act, rew, next_obs, done = normalizer("sample").to_transitions(x)
    p = f"{piece}/{traj}/rollout"
    for name, ours, key in [("obs", obs, "obs"), ("act", act, "action"), ("rew", rew[:, None], "reward"),
                            ("next_obs", next_obs, "next_obs"), ("done", done[:, None], "done")]:
        close(ours, g[f"{p}/{key}"], name)


@pytest.mark.parametrize("traj", [0, 1])
def test_sampler_unguided(traj):
    _rollout_matches("sample", traj, _chain("sample", traj))


def policy_log_prob(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The recording's fixed policy N(0.8 tanh(obs W + b), exp(log_std)^2), summed over action dimensions."""
    g = golden()
    mean = 0.8 * torch.tanh(obs @ g["policy/w"] + g["policy/b"])
    return torch.distributions.Normal(mean, g["policy/log_std"].exp()).log_prob(act).sum(-1)


GUIDES = {"guide_a": dict(coeff=0.7, cos_coeff=0.3, normalize=False, denoised=False, delay=0),
          "guide_b": dict(coeff=0.5, cos_coeff=0.3, normalize=True, denoised=True, delay=1)}


@pytest.mark.parametrize("traj", [0, 1])
@pytest.mark.parametrize("piece", sorted(GUIDES))
def test_sampler_guided(piece, traj):
    steps, kw = int(golden()["sample/steps"]), GUIDES[piece]
    guide = PolicyGuidance(policy_log_prob, normalizer("sample"), steps, **kw)
    raw = PolicyGuidance(policy_log_prob, normalizer("sample"), steps, **(kw | {"normalize": False}))
    _rollout_matches(piece, traj, _chain(piece, traj, guide, raw))


def test_window_normalisation():
    g = golden()
    raw = torch.cat([g[f"norm/raw/{k}"] for k in ("obs", "action", "reward", "done")], dim=-1)
    n = TrajectoryNormalizer(int(g["meta/obs_dim"]), int(g["meta/act_dim"]), 1.0).double().fit(raw)
    parts = ("obs", "action", "reward", "done")
    close(n.mean, torch.cat([g[f"norm/stats/{k}/mean"] for k in parts]), "mean")
    close(n.std, torch.cat([g[f"norm/stats/{k}/std"] for k in parts]), "std")
    close(n.normalize(raw), g["norm/normalized"], "normalized windows")
