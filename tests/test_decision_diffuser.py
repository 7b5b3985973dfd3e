"""Decision Diffuser (algorithms/decision_diffuser.py): hand-computed pieces, refusals, exact resume and a
learning run. The official code's values are checked in tests/test_golden_dd.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from algorithms.decision_diffuser import DecisionDiffuser, UpdateDraws
from offbench.batch import Transitions
from offbench.cli import main
from offbench.data.datamodule import OfflineDataModule
from offbench.errors import UserError
from offbench.trajectory.cdf import CDFNormalizer
from tests.test_fit import interrupted_and_resumed

SMALL = dict(horizon=4, n_timesteps=3, dim=8, dim_mults=(1, 2), inv_hidden=8)


def episode(obs, act, rew, done_last: bool, first_id: int = 0) -> Transitions:
    n = len(rew)
    obs = np.asarray(obs, np.float32).reshape(n, -1)
    nxt = np.r_[obs[1:], obs[-1:] + 1]
    done = np.zeros(n, np.float32)
    done[-1] = float(done_last)
    return Transitions(obs, np.asarray(act, np.float32).reshape(n, -1), np.asarray(rew, np.float32), nxt, done,
                       np.full(n, first_id), np.arange(n), np.full(n, np.float32(sum(rew))))


# --------------------------------------------------------------------------- the CDF normaliser
def test_cdf_by_hand():
    """Data 0, 1, 1, 3: knots 0, 1, 3 with p = 1/4, 3/4, 1; F is linear between them and clipped outside."""
    norm = CDFNormalizer(2).fit(np.array([[0, 5], [1, 5], [1, 5], [3, 5]]))
    x = torch.tensor([[2.0, 7.0], [-5.0, 5.0], [1.0, -1.0], [3.0, 0.0]], dtype=torch.float64)
    y = norm.normalize(x)
    # F(2) = 3/4 + (2 - 1) / 2 * 1/4 = 7/8 -> 3/4; F(-5) = F(0) = 1/4 -> -1/2; F(1) -> 1/2; F(3) -> 1; dim 1 constant
    assert torch.equal(y, torch.tensor([[0.75, 7.0], [-0.5, 5.0], [0.5, -1.0], [1.0, 0.0]], dtype=torch.float64))
    # the inverse: -1 clips to p_1 = 1/4 -> 0; 0.75 -> 2; constant dims pass through
    back = norm.unnormalize(torch.tensor([[-1.0, 0.3], [0.75, 0.2]], dtype=torch.float64))
    assert torch.equal(back, torch.tensor([[0.0, 0.3], [2.0, 0.2]], dtype=torch.float64))


def test_cdf_maps_the_data_into_the_unit_interval_and_back():
    x = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    norm = CDFNormalizer(3).fit(x)
    y = norm.normalize(torch.as_tensor(x).double())
    assert y.min() >= -1 and y.max() == 1
    assert torch.allclose(norm.unnormalize(y), torch.as_tensor(x).double(), atol=1e-6)


# --------------------------------------------------------------------------- data and training pieces
def test_returns_are_discounted_to_the_episode_end_with_the_terminal_penalty():
    """Episode A (3 steps, terminated): rewards 1, 2, 3 - 100; episode B (4 steps, cut) 1, 1, 1, 1. H = 4,
    max_path_length 8: starts 0, 1 of A (range(min(3 - 1, 8 - 4))) and 0, 1, 2 of B."""
    t = episode([0, 1, 2], [0.1, 0.2, 0.3], [1, 2, 3], True)
    b = episode([5, 6, 7, 8], [0.4, 0.5, 0.6, 0.7], [1, 1, 1, 1], False, first_id=1)
    t = Transitions(*(np.concatenate([getattr(t, f), getattr(b, f)]) for f in t.__dataclass_fields__))
    m = DecisionDiffuser(1, 1, **SMALL, returns_scale=10.0)
    m.attach_dataset(t, max_path_length=8)
    g = 0.99
    want = [1 + g * 2 + g**2 * -97, 2 + g * -97, 1 + g + g**2 + g**3, 1 + g + g**2, 1 + g]
    assert torch.allclose(m.windows.value.double(), torch.tensor(want, dtype=torch.float64) / 10, rtol=1e-6)
    # window 1 of A (rows 1..4) runs into the padding: its last two states are the normalised 0, not 0
    traj = m.windows.batch(torch.tensor([1])).traj[0]
    padded = m.obs_normalizer.normalize(torch.zeros(1, 1))[0]
    assert torch.equal(traj[2:, 1:], padded.expand(2, 1)) and padded.item() != 0


def test_ema_follows_the_official_cadence():
    """Every ema_every updates: a copy before ema_start, ema <- d ema + (1 - d) net from it; nothing in between."""
    m = DecisionDiffuser(2, 1, **SMALL, ema_start=20, ema_every=10, ema_decay=0.5)
    p, e = next(m.net.parameters()), next(m.net_ema.parameters())
    for step, moves in ((3, False), (10, "copy"), (20, "lerp"), (25, False)):
        m.step = step
        before = e.detach().clone()
        with torch.no_grad():
            p.add_(1.0)
        m.update_ema()
        if moves == "copy":
            assert torch.equal(e, p)
        elif moves == "lerp":
            assert torch.allclose(e, 0.5 * before + 0.5 * p)
        else:
            assert torch.equal(e, before)


def test_training_inpaints_the_first_state_and_gives_it_loss_weight_zero():
    """The denoiser sees x_t with row 0 = s_0 (not noised); an error confined to row 0 costs nothing, and the
    mean still counts row 0's entries: an error of 1 on every other row gives (H - 1) / H."""
    m = DecisionDiffuser(2, 1, **SMALL)
    obs, act, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 1), torch.randn(3, 4, 2)
    seen = []

    def eps(x, t, returns, keep):
        seen.append(x)
        out = noise.clone()
        out[:, 0] += 5.0
        return out

    m.net.eps = eps
    draws = UpdateDraws(t=torch.tensor([0, 1, 2]), noise=noise, keep=torch.ones(3, 1))
    assert m.loss(obs, act, torch.zeros(3, 1), draws)["loss/diffusion"] == 0
    assert torch.equal(seen[0][:, 0], obs[:, 0]) and not torch.equal(seen[0][:, 1], obs[:, 1])
    m.net.eps = lambda x, t, returns, keep: noise + 1.0
    assert torch.isclose(m.loss(obs, act, torch.zeros(3, 1), draws)["loss/diffusion"], torch.tensor(3 / 4))


def test_guidance_weight_one_is_the_conditional_model():
    """w = 1: eps_uncond + (eps_cond - eps_uncond) = eps_cond, so the plan equals the conditional chain's."""
    torch.manual_seed(0)
    m = DecisionDiffuser(2, 1, **SMALL, guidance_w=1.0)
    s = torch.randn(2, 2)
    noise = torch.randn(SMALL["n_timesteps"] + 1, 2, 4, 2)
    plan = m.plan(s, net=m.net, noise=noise)
    x = 0.5 * noise[0]
    x[:, 0] = s
    for k, i in enumerate(reversed(range(SMALL["n_timesteps"]))):
        t = torch.full((2,), i)
        eps = m.net.eps(x, t, torch.full((2, 1), 0.9), torch.ones(2, 1))
        x0 = (m.sqrt_recip_abar[i] * x - m.sqrt_recipm1_abar[i] * eps).clamp(-1, 1)
        x = m.post_coef1[i] * x0 + m.post_coef2[i] * x + (m.post_std[i] * 0.5 * noise[k + 1] if i > 0 else 0)
        x[:, 0] = s
    assert torch.allclose(plan, x, atol=1e-6)
    assert torch.equal(plan[:, 0], s)


# --------------------------------------------------------------------------- through `offbench fit`
def fit_args(dataset, root, *extra):
    return ["fit", "--config", "configs/algorithms/decision_diffuser.yaml", "--data.dataset", str(dataset),
            "--updates", "40", "--data.eval_every", "20", "--data.block_size", "10", "--data.batch_size", "16",
            *sum(([f"--model.init_args.{k}", str(list(v) if isinstance(v, tuple) else v)] for k, v in SMALL.items()), []),
            "--eval.episodes", "1", "--eval.num_envs", "1", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def test_resumed_run_matches_uninterrupted_run(tiny_hopper, tmp_path):
    """The window draws (the DataModule's generator), dropout masks, noise, EMA and Adam continue exactly."""
    interrupted_and_resumed(lambda root, *extra: fit_args(tiny_hopper, root, *extra), tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--data.normalize_obs", "true"], "--data.normalize_obs false"),
    (["--model.init_args.horizon", "5"], "multiple of 2"),
])
def test_bad_settings_fail_with_one_line(extra, message, tiny_hopper, tmp_path, capsys):
    try:  # a user error: status 2, from main or from the argument parser
        code = main(fit_args(tiny_hopper, tmp_path / "run", *extra))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_antmaze_is_refused():
    class Info:
        name, env_id, success_scored = "D4RL/antmaze/umaze-v1", "AntMaze_UMaze-v4", True

    class DM:
        info, normalize = Info(), False

    m = DecisionDiffuser(2, 1, **SMALL)
    m.trainer = type("T", (), {"datamodule": DM()})()  # what setup() reads
    with pytest.raises(UserError, match="AntMaze"):
        m.setup("fit")


@pytest.mark.slow
def test_what_it_reaches_on_pendulum_medium_replay(tmp_path):
    """The quick grid's cell (configs/grids/quick.yaml: H = 32, N = 20, dim 32, 1000 updates at batch 64) on the
    suite's pendulum data. At this CPU scale Decision Diffuser does NOT beat BC (9.2 in results/quick): measured
    (2026-12-07, seed 0, windows then drawn from torch's global generator) -25 and -32 at updates 500 and 1000
    (target return -0.25; -35 at 500 with -0.9), below the random policy's 0. What it does learn: the losses fall about tenfold and the inverse-dynamics model reads the
    action off true consecutive states (RMSE 0.38 against the actions' std 1.12); but the planned next state misses
    the true one by more than a whole step (RMS 0.23 against 0.13 in CDF units), so the actions it reads off the
    plans hardly correlate with the data's (0.04). The test checks the learning, not a score."""
    root = tmp_path / "run"
    main(["fit", "--config", "configs/algorithms/decision_diffuser.yaml", "--data.dataset", "shipped/pendulum-medium-replay-v0",
          "--model.init_args.horizon", "32", "--model.init_args.n_timesteps", "20", "--model.init_args.dim", "32",
          "--model.init_args.dim_mults", "[1, 2, 4]", "--model.init_args.target_return", "-0.25",
          "--updates", "1000", "--data.eval_every", "500", "--data.block_size", "100", "--eval.episodes", "5",
          "--eval.num_envs", "5", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    result = json.loads(Path(root / "result.json").read_text())
    assert np.isfinite(result["scores"]["last"])
    losses = pd.read_csv(root / "metrics.csv").dropna(subset=["loss/diffusion"])
    assert losses["loss/diffusion"].iloc[-1] < 0.25 * losses["loss/diffusion"].iloc[0]
    ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
    m = DecisionDiffuser(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    m.load_state_dict(ckpt["state_dict"])
    m.attach_dataset(OfflineDataModule("shipped/pendulum-medium-replay-v0").transitions, 200)
    batch = m.windows.batch(torch.arange(0, len(m.windows), 7))
    obs, act = batch.traj[..., 1:], batch.traj[:, 0, :1]
    with torch.no_grad():
        true = m.act_normalizer.unnormalize(act)
        read = m.act_normalizer.unnormalize(m.net_ema.inverse(obs[:, 0], obs[:, 1]))
    assert (read - true).pow(2).mean().sqrt() < 0.5 * true.std()
