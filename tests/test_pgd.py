"""PGD (offbench/pgd): windows, normalisation, EDM schedules, guidance, the policies' log-likelihoods,
the cached trajectory model (train, resume) and PGDDataModule through the real CLI (exact resume)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.bc import BC
from algorithms.iql import IQL
from algorithms.td3bc import TD3BC
from offbench.batch import Transitions
from offbench.cli import main
from offbench.module import OfflineRLModule
from offbench.pgd.edm import EDM, SamplerSettings, churn_schedule, sigma_schedule
from offbench.pgd.guidance import PolicyGuidance, guidance_schedule
from offbench.trajectory.unet import TemporalUNet
from offbench.trajectory.windows import TrajectoryNormalizer, window_starts, windows
from tests.test_fit import interrupted_and_resumed


def chained_transitions(lengths: list[int], terminal_last: list[bool], obs_dim: int = 2, act_dim: int = 1,
                        seed: int = 0) -> Transitions:
    """Episodes of the given lengths whose rows chain (next_obs of a row = obs of the next row)."""
    rng = np.random.default_rng(seed)
    parts = []
    for e, (n, term) in enumerate(zip(lengths, terminal_last)):
        states = rng.normal(size=(n + 1, obs_dim)).astype(np.float32)
        done = np.zeros(n, np.float32)
        done[-1] = float(term)
        parts.append((states[:-1], rng.uniform(-0.9, 0.9, (n, act_dim)).astype(np.float32), rng.normal(size=n).astype(np.float32),
                      states[1:], done, np.full(n, e), np.arange(n)))
    obs, act, rew, next_obs, done, episode, step = (np.concatenate(x) for x in zip(*parts))
    ret = np.bincount(episode, weights=rew)[episode].astype(np.float32)
    return Transitions(obs, act, rew, next_obs, done, episode.astype(np.int64), step.astype(np.int64), ret)


# --- windows and normalisation ------------------------------------------------------------------
def test_windows_stride_within_episodes_and_keep_the_terminal_window():
    t = chained_transitions([5, 10, 7], [False, False, True])  # rows 0-4, 5-14, 15-21 (21 terminal)
    starts = window_starts(t, length=4, stride=2)
    # episode 0: start 0; episode 1: 5, 7, 9, 11; episode 2: 15, 17 and the terminal window 18-21
    assert starts.tolist() == [0, 5, 7, 9, 11, 15, 17, 18]
    w = windows(t, starts, 4)
    for s, win in zip(starts, w):
        assert len(set(t.episode[s:s + 4])) == 1  # never crosses an episode end
        np.testing.assert_array_equal(win[:, :2], t.obs[s:s + 4])
        np.testing.assert_array_equal(win[1:, :2], t.next_obs[s:s + 3])  # row t+1's state is row t's next state
    assert w[-1, -1, -1] == 1.0 and w[:, :-1, -1].sum() == 0  # done only on a window's last row


def test_datasets_without_episode_structure_or_long_enough_episodes_fail_clearly():
    t = chained_transitions([12, 12], [False, False])
    shuffled = Transitions(*(getattr(t, f)[np.r_[1, 0, 2:24]] if f not in ("episode", "step", "episode_return")
                             else getattr(t, f) for f in ("obs", "act", "rew", "next_obs", "done", "episode", "step",
                                                          "episode_return")))
    with pytest.raises(ValueError, match="no usable episode structure"):
        window_starts(shuffled, 4, 2)
    with pytest.raises(ValueError, match="no episode has 20 transitions.*shorter --window"):
        window_starts(t, 20, 2)


def test_unnormalize_inverts_normalize():
    rng = np.random.default_rng(1)
    raw = np.concatenate([rng.normal(3, 5, (64, 8, 3)), rng.uniform(-1.9, 1.9, (64, 8, 2)), rng.normal(0, 2, (64, 8, 1)),
                          rng.integers(0, 2, (64, 8, 1))], axis=-1)
    raw = torch.as_tensor(raw, dtype=torch.float32)
    norm = TrajectoryNormalizer(obs_dim=3, act_dim=2, max_action=2.0).fit(raw)
    x = norm.normalize(raw)
    flat = x.reshape(-1, 7)
    torch.testing.assert_close(flat.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0, correction=0), torch.ones(7), atol=1e-4, rtol=0)
    # actions were z-scored after arctanh(a / max_action)
    torch.testing.assert_close(norm.mean[3:5], torch.atanh(raw[..., 3:5] / 2).reshape(-1, 2).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.unnormalize(x), raw, atol=1e-4, rtol=1e-5)
    obs, act, rew, next_obs, done = norm.to_transitions(x)
    assert obs.shape == (64 * 7, 3) and done.shape == (64 * 7,)
    torch.testing.assert_close(next_obs.reshape(64, 7, 3), raw[:, 1:, :3], atol=1e-4, rtol=1e-5)


# --- EDM and guidance schedules ------------------------------------------------------------------
def test_sigma_churn_and_guidance_schedules_by_hand():
    s = SamplerSettings(steps=4)
    sigmas = sigma_schedule(s)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[3].item() == pytest.approx(0.002) and sigmas[4] == 0
    mid = (80 ** (1 / 7) + (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 3) ** 7
    assert sigmas[1].item() == pytest.approx(mid)
    gammas = churn_schedule(s, sigmas)  # min(80 / 4, sqrt 2 - 1) where 0.05 <= sigma <= 50
    assert sigmas[1] < 50 and sigmas[2] > 0.05  # so steps 1 and 2 churn, 0 and 3 do not
    assert gammas.tolist() == pytest.approx([0.0, math.sqrt(2) - 1, math.sqrt(2) - 1, 0.0])
    lam = guidance_schedule(4, coeff=2.0, cos_coeff=0.3)
    assert lam == pytest.approx([2 * (1 + 0.3 * math.sin(math.pi / 4)), 2 * (0.75 + 0.3), 2 * (0.5 + 0.3 * math.sin(0.75 * math.pi)), 0.0])
    assert guidance_schedule(4, 2.0, 0.3, delay=1)[0] == 0.0


class ZeroNet(torch.nn.Module):
    """F = 0: then D(x; sigma) = x / (1 + sigma^2), the ideal denoiser of data N(0, 1) (sigma_data 1)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize(("steps", "edm_predictor", "low", "high"), [
    (256, False, 0.96, 1.08), (64, True, 0.96, 1.08), (16, False, 1.8, 2.5),
])
def test_sampler_with_the_ideal_denoiser_of_unit_gaussian_data_samples_unit_variance(steps, edm_predictor, low, high):
    """The official predictor (from x_i, not the churned x_hat) inflates the variance when steps are few."""
    x = EDM(ZeroNet()).sample((128, 4, 4), SamplerSettings(steps=steps, edm_predictor=edm_predictor),
                               torch.Generator().manual_seed(0))
    assert low < x.std().item() < high


def tiny_edm(channels: int = 5) -> EDM:
    torch.manual_seed(0)
    return EDM(TemporalUNet(channels, features=16, n_blocks=2)).eval().requires_grad_(False)


def target_log_prob(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """A state-dependent Gaussian target policy: mean 0.6 tanh(s_0), std 0.2."""
    mean = 0.6 * torch.tanh(obs[:, :1]).expand_as(act)
    return torch.distributions.Normal(mean, 0.2).log_prob(act).sum(-1)


def sample(edm: EDM, norm: TrajectoryNormalizer, coeff: float | None, steps: int = 12, **options) -> torch.Tensor:
    guide = None if coeff is None else PolicyGuidance(target_log_prob, norm, steps, coeff, **options)
    return edm.sample((64, 8, 5), SamplerSettings(steps=steps), torch.Generator().manual_seed(3), guide)


def test_guidance_coefficient_zero_equals_unguided_sampling_for_the_same_noise():
    edm, norm = tiny_edm(), TrajectoryNormalizer(obs_dim=2, act_dim=1)
    unguided = sample(edm, norm, None)
    assert torch.equal(sample(edm, norm, 0.0), unguided)
    assert torch.equal(sample(edm, norm, 0.0, normalize=True, denoised=True), unguided)
    assert not torch.equal(sample(edm, norm, 0.1), unguided)


@pytest.mark.parametrize("options", [{}, {"normalize": True}, {"denoised": True}])
def test_guidance_raises_the_target_policys_log_likelihood_of_sampled_actions(options):
    edm, norm = tiny_edm(), TrajectoryNormalizer(obs_dim=2, act_dim=1)

    def mean_log_prob(traj):
        raw = norm.unnormalize(traj)
        return target_log_prob(raw[..., :2].reshape(-1, 2), raw[..., 2:3].reshape(-1, 1)).mean().item()

    coeff = 1.0 if options.get("normalize") else 0.02
    base, guided = mean_log_prob(sample(edm, norm, None)), mean_log_prob(sample(edm, norm, coeff, **options))
    assert guided > base + 1.0, (base, guided)


def test_guidance_gradient_is_taken_on_the_pre_tanh_actions():
    norm = TrajectoryNormalizer(obs_dim=2, act_dim=1, max_action=2.0)
    norm.mean.copy_(torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0]))
    norm.std.copy_(torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0]))
    traj = torch.randn(3, 4, 5)
    g = PolicyGuidance(target_log_prob, norm, 4, 1.0).gradient(traj)
    u = traj[..., 2] * 0.5 + 0.1
    a, s0 = 2 * torch.tanh(u), traj[..., 0]
    expected = -(a - 0.6 * torch.tanh(s0)) / 0.04 * 2 * (1 - torch.tanh(u) ** 2) * 0.5  # chain rule by hand
    torch.testing.assert_close(g[..., 0], expected, atol=1e-4, rtol=1e-4)


# --- the policies' log-likelihoods -----------------------------------------------------------------
def test_log_prob_of_gaussian_and_deterministic_policies():
    obs, act = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    torch.manual_seed(0)
    for module in (IQL(3, 2), BC(3, 2, policy="gaussian")):
        dist = module.actor(obs)
        torch.testing.assert_close(module.log_prob(obs, act), dist.log_prob(act).sum(-1))
    for module in (TD3BC(3, 2), BC(3, 2, policy="deterministic")):
        a = act.clone().requires_grad_(True)
        logp = module.log_prob(obs, a)
        mean = module.act(obs)
        torch.testing.assert_close(logp, -0.5 * ((act - mean) ** 2).sum(-1) - math.log(2 * math.pi))
        (grad,) = torch.autograd.grad(logp.sum(), a)
        torch.testing.assert_close(grad, -(act - mean))  # N(pi(s), 1): the gradient pulls towards pi(s)
    with pytest.raises(NotImplementedError, match="does not define log_prob.*guidance_coeff 0"):
        OfflineRLModule().log_prob(obs, act)


# --- the trajectory model: train, cache, resume; the DataModule through the CLI -------------------
TRAIN = ["--window", "8", "--stride", "2", "--features", "16", "--blocks", "2", "--quiet"]


def train_args(dataset, *extra) -> list[str]:
    return ["data", "pgd", "train", str(dataset), *TRAIN, *extra]


def test_training_resumes_exactly_and_is_cached(tiny_hopper, tmp_path, monkeypatch, capsys):
    import offbench.pgd.train as train

    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "a"))
    assert main(train_args(tiny_hopper, "--steps", "20", "--checkpoint-every", "10")) == 0
    from offbench.pgd.model import model_dir

    full = torch.load(model_dir(str(tiny_hopper), "small") / "model.pt", weights_only=True)["state_dict"]
    manifest = json.loads((model_dir(str(tiny_hopper), "small") / "manifest.json").read_text())
    assert manifest["steps"] == 20 and [x["step"] for x in manifest["train_loss"]] == [10, 20]

    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "b"))
    save = train._save_atomic

    def crash_after_first_checkpoint(obj, path):
        save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_atomic", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(tiny_hopper, "--steps", "20", "--checkpoint-every", "10"))
    directory = model_dir(str(tiny_hopper), "small")
    assert (directory / "checkpoint.pt").exists() and not (directory / "manifest.json").exists()
    monkeypatch.setattr(train, "_save_atomic", save)
    assert main(train_args(tiny_hopper, "--steps", "20", "--checkpoint-every", "10")) == 0
    resumed = torch.load(directory / "model.pt", weights_only=True)["state_dict"]
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name
    assert not (directory / "checkpoint.pt").exists()
    assert main(train_args(tiny_hopper, "--steps", "30")) == 2
    err = capsys.readouterr().err
    assert "offbench: error: " in err and "other settings" in err and "--force" in err


PGD_DATA = [
    "--data.class_path", "offbench.pgd.PGDDataModule", "--data.synthetic_batch_size", "24", "--data.batch_size", "32",
    "--data.pool_trajectories", "8", "--data.rollout_length", "4", "--data.regenerate_every", "30",
    "--data.guidance_coeff", "1.0", "--data.sampling_steps", "4", "--data.block_size", "10",
]


def fit_args(config: str, dataset, root, *extra) -> list[str]:
    return ["fit", "--config", f"configs/algorithms/{config}.yaml", "--data.dataset", str(dataset), *PGD_DATA,
            "--updates", "60", "--data.eval_every", "20", "--eval.episodes", "1", "--eval.num_envs", "1",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def test_pgd_fit_through_the_cli_resumes_exactly(tiny_hopper, tmp_path, monkeypatch, capsys):
    """TD3+BC on 24 synthetic + 8 real rows; the pool is regenerated with guidance at update 30, after
    the interruption, so the resumed run needs the checkpoint's pool, its step and its generator."""
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(fit_args("td3bc", tiny_hopper, tmp_path / "none")) == 2  # no trained model: one line, the way out
    assert f"Train it first: offbench data pgd train {tiny_hopper} --preset small" in capsys.readouterr().err
    assert main(train_args(tiny_hopper, "--steps", "10")) == 0
    full, resumed = interrupted_and_resumed(lambda root, *extra: fit_args("td3bc", tiny_hopper, root, *extra), tmp_path)
    for a, b in zip(full["PGDDataModule"]["pgd"]["pool"], resumed["PGDDataModule"]["pgd"]["pool"]):
        assert torch.equal(a, b)
    assert full["PGDDataModule"]["pgd"]["pool_step"] == 30
    # An algorithm without log_prob cannot be guided: test_rebrac_trains_on_pgd_data_and_guidance_needs_log_prob


def test_the_simulator_check_reproduces_real_transitions_and_measures_a_reward_error(tiny_hopper, tmp_path):
    """Real transitions are their own simulator's: dynamics and reward errors at round-off (Pendulum
    exactly; Hopper's median, a few contact-rich rows excepted); a reward off by 0.5 reads as 0.5."""
    from offbench.data.sources import read_d4rl_hdf5
    from offbench.data.synthetic import write_random_dataset
    from offbench.pgd.dynamics import simulator_errors

    path = tmp_path / "pendulum.hdf5"
    write_random_dataset("Pendulum-v1", path, episodes=2, seed=0, ref_min=-1500.0, ref_max=-150.0)
    for env_id, t, exact in (("Pendulum-v1", read_d4rl_hdf5(path), True),
                             ("Hopper-v4", read_d4rl_hdf5(tiny_hopper), False)):
        rows = slice(0, 150)
        rew = t.rew[rows].astype(np.float64) + np.where(np.arange(150) % 2 == 0, 0.5, 0.0)
        dyn, rew_err = simulator_errors(env_id, t.obs[rows], t.act[rows], t.next_obs[rows], rew)
        assert (np.max(dyn) if exact else np.median(dyn)) < 1e-10, env_id
        np.testing.assert_allclose(rew_err[0::2], 0.5, atol=1e-5 if exact else 1e-3, err_msg=env_id)
        assert (np.max(np.abs(rew_err[1::2])) if exact else np.median(np.abs(rew_err[1::2]))) < 1e-5, env_id


@pytest.mark.slow
def test_trained_model_generates_transitions_with_low_dynamics_error(tmp_path, monkeypatch):
    """Pendulum (a known system whose observation gives the simulator state): the small U-Net trained
    for 1,500 steps on 20 random-policy episodes samples transitions whose next states the real
    simulator reproduces far better than the trivial model s' = s does (measured: 0.0139 against
    0.107, a ratio of 0.13; about 3 minutes on a busy CPU)."""
    from offbench.data.sources import read_d4rl_hdf5
    from offbench.data.synthetic import write_random_dataset
    from offbench.pgd.dynamics import simulator_errors
    from offbench.pgd.model import load_trajectory_model

    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path))
    path = tmp_path / "pendulum.hdf5"
    write_random_dataset("Pendulum-v1", path, episodes=20, seed=0, ref_min=-1500.0, ref_max=-150.0)
    t = read_d4rl_hdf5(path)
    # EMA every step: with the official every 10 steps the EMA would still hold half the initial weights
    assert main(["data", "pgd", "train", str(path), "--steps", "1500", "--ema-every", "1", "--quiet"]) == 0
    model, _ = load_trajectory_model(str(path), "small", t)
    traj = model.sample(32, 33, SamplerSettings(steps=64, edm_predictor=True), torch.Generator().manual_seed(0))
    obs, act, rew, next_obs, done = (x.numpy() for x in model.transitions(traj))
    error = simulator_errors("Pendulum-v1", obs, act, next_obs, rew)[0].mean()
    trivial = np.mean((t.next_obs - t.obs) ** 2)
    print(f"dynamics error {error:.5f}, trivial s' = s {trivial:.5f}")
    assert error < 0.25 * trivial


# --- fault trials: each mistake is one line naming the fix (exit 2), before any work is lost -------
def one_line_error(capsys) -> str:
    """The error `offbench` printed: exactly one line, `offbench: error: ...` (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("offbench: error: ")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


@pytest.fixture
def trained(tiny_hopper, tmp_path, monkeypatch):
    """A 2-step trajectory model of tiny_hopper in a fresh data root (the cwd is the repository, for configs)."""
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(train_args(tiny_hopper, "--steps", "2")) == 0
    return tiny_hopper


SHORT = ("--updates", "10", "--data.eval_every", "10")  # override fit_args' budget: the trials need few updates


@pytest.mark.parametrize("algorithm", ["awr", "sfbc"])
def test_algorithms_that_read_dataset_rows_are_refused_before_training(trained, tmp_path, capsys, algorithm):
    """AWR and SfBC look their per-row tables up by Batch.idx, which PGD batches lack: refused at setup
    instead of silently training on random real rows (a result labelled PGD that is not)."""
    assert main(fit_args(algorithm, trained, tmp_path / algorithm, *SHORT, "--data.guidance_coeff", "0")) == 2
    line = one_line_error(capsys)
    assert "trains from per-row tables of the real dataset" in line and "drop --data.class_path" in line
    assert not list((tmp_path / algorithm).rglob("*.ckpt"))  # nothing trained


def test_which_algorithms_need_dataset_rows():
    from algorithms.awr import AWR
    from algorithms.qgpo import QGPO
    from algorithms.rebrac import ReBRAC
    from algorithms.sfbc import SfBC

    assert AWR.needs_dataset_rows and SfBC.needs_dataset_rows and QGPO.needs_dataset_rows
    assert not any(c.needs_dataset_rows for c in (TD3BC, IQL, BC, ReBRAC, OfflineRLModule))


def test_synthetic_next_actions_are_the_next_rows_actions():
    """ReBRAC's penalty needs a'_D: for synthetic rows it is the synthetic trajectory's next action."""
    from offbench.pgd.model import TrajectoryModel

    model = TrajectoryModel(obs_dim=2, act_dim=1, max_action=2.0, features=16, n_blocks=2)
    traj = torch.randn(3, 6, model.channels)
    obs, act, rew, next_obs, done = model.transitions(traj)
    next_act = model.next_actions(traj)
    assert next_act.shape == act.shape == (3 * 5, 1)
    torch.testing.assert_close(next_act.reshape(3, 5, 1)[:, :-1], act.reshape(3, 5, 1)[:, 1:])
    torch.testing.assert_close(next_act.reshape(3, 5, 1)[:, -1], model.normalizer.unnormalize(traj)[:, -1, 2:3])


def test_rebrac_trains_on_pgd_data_and_guidance_needs_log_prob(trained, tmp_path, capsys):
    """ReBRAC gets next actions on PGD batches (it failed mid-run); CQL's tanh-Gaussian log-likelihood
    guides (a TypeError traceback before); an algorithm without log_prob is one line naming the fix."""
    assert main(fit_args("rebrac", trained, tmp_path / "rebrac", *SHORT, "--data.guidance_coeff", "0")) == 0
    assert main(fit_args("rebrac", trained, tmp_path / "guided", *SHORT)) == 2
    line = one_line_error(capsys)
    assert "ReBRAC does not define log_prob(obs, act)" in line and "--data.guidance_coeff 0" in line
    assert main(fit_args("cql", trained, tmp_path / "cql", *SHORT, "--data.regenerate_every", "5")) == 0


def test_cql_log_prob_is_the_tanh_gaussian_likelihood():
    from algorithms.cql import CQL

    torch.manual_seed(0)
    module, obs = CQL(3, 2, max_action=2.0), torch.randn(4, 3)
    act = (torch.rand(4, 2) * 3.8 - 1.9).requires_grad_(True)
    mean, log_std = module.actor._dist(obs)
    u = torch.atanh(act.detach() / 2)
    expected = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
                - torch.log(2 * (1 - torch.tanh(u) ** 2))).sum(-1)  # change of variables a = 2 tanh(u)
    logp = module.log_prob(obs, act)
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=1e-5)
    assert torch.autograd.grad(logp.sum(), act)[0].abs().sum() > 0  # differentiable w.r.t. the actions


@pytest.mark.parametrize(("extra", "message"), [
    (("--data.sampling_steps", "1"), "data.sampling_steps must be at least 2"),
    (("--data.synthetic_batch_size", "40"), "data.synthetic_batch_size must be within 0..data.batch_size (32), got 40"),
    (("--data.pool_trajectories", "0"), "data.pool_trajectories must be a positive integer, got 0"),
])
def test_pgd_datamodule_settings_are_checked_when_it_is_built(tiny_hopper, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))  # no model needed: refused before loading it
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(fit_args("td3bc", tiny_hopper, tmp_path / "run", *extra)) == 2
    assert message in one_line_error(capsys)


def test_pgd_train_runs_fits_data_checks(tiny_hopper, tmp_path, monkeypatch, capsys):
    """Actions outside the env's bounds: refused as by fit, or clipped with --clip-actions; the model
    then matches the data a fit with --data.clip_actions true trains on."""
    import shutil

    import h5py

    from offbench.pgd.datamodule import PGDDataModule

    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "wide.hdf5"
    shutil.copy(tiny_hopper, path)
    with h5py.File(path, "r+") as f:
        f["actions"][...] = f["actions"][...] * 3.0
    assert main(train_args(path, "--steps", "2")) == 2
    line = one_line_error(capsys)
    assert "outside the action bounds of Hopper-v4" in line and "--clip-actions" in line
    assert main(train_args(path, "--steps", "2", "--clip-actions")) == 0
    data = PGDDataModule(str(path), clip_actions=True, synthetic_batch_size=8, batch_size=16)
    assert data.transitions.act.max() <= 1.0


@pytest.mark.parametrize(("extra", "message"), [
    (("--steps", "0"), "--steps must be at least 1, got 0"),
    (("--epochs", "0"), "--epochs must be at least 1, got 0"),
    (("--checkpoint-every", "0"), "--checkpoint-every must be at least 1 step, got 0"),
    (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    (("--window", "1"), "--window must be at least 2, got 1"),
    (("--lr", "0"), "--lr must be positive, got 0.0"),
    (("--ema-decay", "1"), "--ema-decay must be in [0, 1), got 1.0"),
])
def test_pgd_train_arguments_are_checked_up_front(tiny_hopper, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    assert main(train_args(tiny_hopper, *extra)) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").rglob("*.pt"))


def test_damaged_checkpoint_or_model_names_the_file_and_the_fix(trained, tmp_path, capsys):
    from offbench.data.sources import read_d4rl_hdf5
    from offbench.errors import UserError
    from offbench.pgd.model import load_trajectory_model, model_dir

    directory = model_dir(str(trained), "small")
    model_file = directory / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match=f"{model_file} is unreadable .*: it is missing, truncated or damaged; "
                                        "retrain it with offbench data pgd train .* --force"):
        load_trajectory_model(str(trained), "small", read_d4rl_hdf5(trained))
    assert main(fit_args("td3bc", trained, tmp_path / "run", *SHORT)) == 2
    assert f"{model_file} is unreadable" in one_line_error(capsys)

    checkpoint = directory / "checkpoint.pt"
    (directory / "manifest.json").unlink()  # an unfinished training with a damaged resume state
    checkpoint.write_bytes(b"not a checkpoint")
    assert main(train_args(trained, "--steps", "2")) == 2
    line = one_line_error(capsys)
    assert f"the resume checkpoint {checkpoint} is unreadable" in line and "delete it and rerun" in line
    checkpoint.unlink()
    assert main(train_args(trained, "--steps", "2")) == 0  # the fix it names works


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tiny_hopper, tmp_path, monkeypatch, capsys):
    """A full disk while saving: one line, no `checkpoint.pt.tmp<pid>` left; a rerun succeeds, and a
    temporary left by a killed process (its PID gone) is removed too."""
    import offbench.forge.sac as sac
    from offbench.pgd.model import model_dir

    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    save = torch.save

    def full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sac.torch, "save", full_disk)
    assert main(train_args(tiny_hopper, "--steps", "2", "--checkpoint-every", "1")) == 2
    line = one_line_error(capsys)
    directory = model_dir(str(tiny_hopper), "small")
    assert f"writing {directory / 'checkpoint.pt'} failed (No space left on device): free space" in line
    assert sorted(p.name for p in directory.iterdir()) == []
    monkeypatch.setattr(sac.torch, "save", save)
    (directory / "model.pt.tmp999999999").write_bytes(b"left by a killed process")
    assert main(train_args(tiny_hopper, "--steps", "2")) == 0
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.pt"]


def fake_run(run_dir: Path, dataset: str, obs_dim: int, act_dim: int) -> Path:
    """A run directory as `offbench fit` leaves it: config.yaml and checkpoints/last.ckpt of TD3+BC."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"model:\n  class_path: algorithms.td3bc.TD3BC\ndata:\n  class_path: offbench.pgd.PGDDataModule\n"
        f"  init_args:\n    dataset: {dataset}\n")
    torch.save({"hyper_parameters": {"obs_dim": obs_dim, "act_dim": act_dim}}, run_dir / "checkpoints/last.ckpt")
    return run_dir


def report_args(dataset, run_dir, *extra) -> list[str]:
    return ["data", "pgd", "report", str(dataset), "--policy-run", str(run_dir), "--trajectories", "2", "--length", "2",
            "--sampling-steps", "2", "--ensemble-steps", "1", *extra]


def test_pgd_report_arguments_and_policy_run_are_checked(trained, tmp_path, capsys):
    hopper_run = fake_run(tmp_path / "hopper", str(trained), 11, 3)
    for extra, message in ((("--trajectories", "0"), "--trajectories must be at least 1, got 0"),
                           (("--ensemble-steps", "0"), "--ensemble-steps must be at least 1, got 0"),
                           (("--sampling-steps", "1"), "--sampling-steps must be at least 2, got 1")):
        assert main(report_args(trained, hopper_run, *extra)) == 2
        assert message in one_line_error(capsys)
    assert main(report_args(trained, tmp_path / "missing")) == 2
    assert f"no {tmp_path / 'missing' / 'config.yaml'}" in one_line_error(capsys)
    other = fake_run(tmp_path / "pendulum", "synthetic/pendulum-random-v0", 3, 1)
    assert main(report_args(trained, other)) == 2
    line = one_line_error(capsys)
    assert "trained on 'synthetic/pendulum-random-v0' (env Pendulum-v1), not on this dataset's env Hopper-v4" in line
    sizes = fake_run(tmp_path / "sizes", str(tmp_path / "nowhere.hdf5"), 3, 1)  # dataset not resolvable: sizes decide
    assert main(report_args(trained, sizes)) == 2
    assert "takes 3-dim observations and 1-dim actions, the dataset has 11 and 3" in one_line_error(capsys)


def test_models_record_their_normalisation_and_old_ones_load_as_window(trained, tmp_path, capsys):
    """New models use the official per-step GroupNorm and say so in model.pt; a model.pt written before the option
    existed (no `norm`) loads with the whole-window GroupNorm it was trained with, and a one-line note."""
    from offbench.data.sources import read_d4rl_hdf5
    from offbench.pgd.model import load_trajectory_model, model_dir
    from offbench.trajectory.unet import StepGroupNorm

    t = read_d4rl_hdf5(trained)
    model, _ = load_trajectory_model(str(trained), "small", t)
    assert model.edm.net.norm == "per_step" and isinstance(model.edm.net.enc[0]["norm1"], StepGroupNorm)
    assert "note:" not in capsys.readouterr().err
    path = model_dir(str(trained), "small") / "model.pt"
    saved = torch.load(path, weights_only=True)
    del saved["shape"]["norm"]
    torch.save(saved, path)
    model, _ = load_trajectory_model(str(trained), "small", t)
    assert model.edm.net.norm == "window" and type(model.edm.net.enc[0]["norm1"]) is torch.nn.GroupNorm
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predates the official per-step normalisation" in err[0] and "--force" in err[0]
    assert main(train_args(trained, "--steps", "2", "--norm", "window", "--name", "w")) == 0
    assert load_trajectory_model(str(trained), "w", t)[0].edm.net.norm == "window"
