"""Diffuser against its official code (jannerm/diffuser @7ea4228) in float64: tests/data/golden/diffuser_f64.pt,
recorded by tests/data/golden/recording/diffuser_record.py with the official modules' own initial weights and
every random draw of the official calls (tests/data/golden/README.md, section Diffuser).

Tolerances: the float64 pieces agree to 1e-10. Measured largest differences: networks 0 (U-Net with
attention 1.3e-14), losses 0, plans and values 1.2e-13 / 3.2e-13 / 6.7e-12 (the three guidance settings; the
reverse chain amplifies rounding differences of the attention-free U-Net's operation order), actions 1.5e-14.
The loss weights of the official code are float32 even in float64 (see the loss test). The dataset pieces are
float32 in the official code (its replay buffer and normaliser are float32): 1e-6 relative (1e-5 for the
normalised windows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.diffuser import Diffuser, PlanDraws
from offbench.batch import Transitions
from offbench.trajectory.padded import discounted_values, gaussian_statistics, padded_episodes, sequence_starts
from offbench.trajectory.planner_nets import PlannerUNet, PlannerValue

GOLDEN = Path(__file__).parent / "data/golden/diffuser_f64.pt"
TOL = 1e-10


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture
def float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the schedule buffers are made in the default dtype, as the recording's
    yield
    torch.set_default_dtype(saved)


def load_positional(module: torch.nn.Module, official: dict[str, torch.Tensor]) -> None:
    """The official state dict onto ours: the same modules in the same order, so position by position."""
    ours = module.state_dict()
    assert len(ours) == len(official)
    for (name, value), (off_name, off_value) in zip(ours.items(), official.items()):
        assert value.shape == off_value.shape, (name, off_name)
        value.copy_(off_value)


def test_networks_match_the_official_forward(golden, float64):
    obs, act = golden["settings"]["obs_dim"], golden["settings"]["act_dim"]
    for name in ("A", "B"):
        g = golden[f"net_{name}"]
        cfg = g["config"]
        unet = PlannerUNet(obs + act, cfg["dim"], tuple(cfg["dim_mults"]), cfg["attention"])
        value = PlannerValue(cfg["horizon"], obs + act, cfg["dim"], tuple(cfg["dim_mults"]))
        load_positional(unet, g["unet"])
        load_positional(value, g["value"])
        with torch.no_grad():
            torch.testing.assert_close(unet(g["x"], g["t"]), g["unet_out"], rtol=0, atol=TOL)
            torch.testing.assert_close(value(g["x"], g["t"]), g["value_out"], rtol=0, atol=TOL)


def diffuser(golden: dict, **kwargs) -> Diffuser:
    s, g = golden["settings"], golden["net_A"]
    cfg = g["config"]
    module = Diffuser(s["obs_dim"], s["act_dim"], max_action=100.0, horizon=cfg["horizon"], n_timesteps=s["n_timesteps"],
                      dim=cfg["dim"], dim_mults=tuple(cfg["dim_mults"]), attention=cfg["attention"], **kwargs)
    for net in (module.model, module.model_ema):
        load_positional(net, g["unet"])
    for net in (module.value, module.value_ema):
        load_positional(net, g["value"])
    return module


def test_schedule_matches_the_official_buffers(golden, float64):
    m, s = diffuser(golden), golden["schedule"]
    abar = s["alphas_cumprod"]
    for ours, official in [(m.sqrt_abar, abar.sqrt()), (m.sqrt_one_minus_abar, (1 - abar).sqrt()),
                           (m.post_coef_x0, s["posterior_mean_coef1"]), (m.post_coef_xt, s["posterior_mean_coef2"]),
                           (m.post_var, s["posterior_log_variance_clipped"].exp()),
                           (m.post_std, (0.5 * s["posterior_log_variance_clipped"]).exp())]:
        torch.testing.assert_close(ours, official, rtol=TOL, atol=0)


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_losses_match_the_official_ones(golden, float64, discount):
    g = golden["losses"]
    m = diffuser(golden, loss_discount=discount)
    loss, a0_loss = m.diffusion_loss(g["x0"], g["t"], g[f"discount_{discount}"]["noise"])
    # The official loss weights are float32 even in float64 (discount ** arange(H, dtype=torch.float)): exact for
    # discount 1, rounded to float32 (relative 6e-8 at most) otherwise; measured 8.2e-9 for 0.9.
    torch.testing.assert_close(loss, g[f"discount_{discount}"]["loss"], rtol=TOL if discount == 1.0 else 1e-7, atol=0)
    # The official `a0_loss` info divides the first action's error by its weight (10): ours logs the error itself.
    torch.testing.assert_close(a0_loss / 10.0, g[f"discount_{discount}"]["a0_loss"], rtol=TOL, atol=0)
    value_loss = m.value_loss(g["x0"], g["target"][:, 0], g["t"], g["value"]["noise"])
    torch.testing.assert_close(value_loss, g["value"]["loss"], rtol=TOL, atol=0)


@pytest.mark.parametrize("case", ["stopgrad2", "stopgrad0", "unscaled"])
def test_guided_plans_and_the_action_match_the_official_sampler(golden, float64, case):
    """Two states with P plans each: the official sampler was called once per state (sorted by value); ours
    plans both in one batch with the same draws."""
    p, c = golden["plans"], golden["plans"][case]
    kw = c["kwargs"]
    m = diffuser(golden, n_plans=p["P"], guide_scale=kw["scale"], n_guide_steps=kw["n_guide_steps"],
                 t_stopgrad=kw["t_stopgrad"], scale_grad_by_std=kw["scale_grad_by_std"])
    m.norm_mean.copy_(p["norm_mean"])
    m.norm_std.copy_(p["norm_std"])
    runs = c["runs"]
    draws = PlanDraws(torch.cat([r["draws"][0] for r in runs]),
                      torch.stack([torch.cat([r["draws"][k] for r in runs]) for k in range(1, len(runs[0]["draws"]))]))
    assert len(draws.noise) == golden["settings"]["n_timesteps"]
    a = golden["settings"]["act_dim"]
    s0 = (p["obs"] - m.norm_mean[a:]) / m.norm_std[a:]
    torch.testing.assert_close(s0, torch.stack([r["cond"] for r in runs]), rtol=0, atol=TOL)
    plans, values = m.plan(s0, draws)
    for k, run in enumerate(runs):
        order = values[k].argsort(descending=True)
        torch.testing.assert_close(values[k][order], run["values"], rtol=0, atol=TOL)
        torch.testing.assert_close(plans[k][order], run["trajectories"], rtol=0, atol=TOL)
    action = m.act(p["obs"], draws)
    torch.testing.assert_close(action, torch.stack([r["action"] for r in runs]), rtol=0, atol=TOL)


def test_windows_normaliser_and_value_targets_match_the_official_dataset(golden):
    g = golden["dataset"]
    arr = {k: v.numpy() for k, v in g["arrays"].items()}
    lengths = np.array(g["lengths"])
    episode = np.repeat(np.arange(len(lengths)), lengths)
    step = np.concatenate([np.arange(n) for n in lengths])
    obs = arr["observations"]
    next_obs = np.r_[obs[1:], obs[-1:]]  # within an episode the next row's observation (the last rows' are unused)
    rew = arr["rewards"]
    t = Transitions(obs, arr["actions"], rew, next_obs, arr["terminals"].astype(np.float32), episode, step,
                    np.bincount(episode, weights=rew)[episode].astype(np.float32))
    ep = padded_episodes(t, g["max_path_length"], g["termination_penalty"])
    raw = np.concatenate([ep.act, ep.obs], axis=-1)
    mean, std = gaussian_statistics(raw, ep.lengths, "test data")
    np.testing.assert_allclose(mean, g["mean"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(std, g["std"].numpy(), rtol=1e-6)
    e, s = sequence_starts(ep.lengths, g["horizon"], g["max_path_length"])
    np.testing.assert_array_equal(np.stack([e, s, s + g["horizon"]], 1), g["indices"].numpy())
    normed = (raw - mean) / std
    windows = normed[e[:, None], s[:, None] + np.arange(g["horizon"])]
    np.testing.assert_allclose(windows, g["trajectories"].numpy(), rtol=1e-5, atol=1e-5)
    values = discounted_values(ep.rew, g["discount"])[e, s]
    np.testing.assert_allclose(values, g["values"].numpy(), rtol=1e-6)
