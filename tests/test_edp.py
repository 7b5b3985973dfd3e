"""EDP (algorithms/edp.py) and the pieces of offbench/diffusion it adds: the action approximation, the
likelihood surrogates, the scaled linear schedule, DPM-Solver on the discrete schedule, the rules'
weights, one noise-model pass per policy update, the EMA cadence and the per-network clipping; a slow
learning test on the forge's Pendulum data against behaviour cloning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from algorithms.edp import EDP, awr_weights, crr_weights
from offbench.batch import Batch
from offbench.diffusion import DiffusionPolicy, DiscreteVPSchedule, linear_beta_schedule, scaled_linear_beta_schedule

OBS, ACT, MAX_ACTION = 4, 2, 1.0


def random_batch(n: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, OBS, generator=g), (torch.rand(n, ACT, generator=g) * 2 - 1) * MAX_ACTION * 0.9,
        torch.randn(n, generator=g), torch.randn(n, OBS, generator=g), (torch.rand(n, generator=g) < 0.2).float(),
    )


def small_edp(**settings) -> EDP:
    torch.manual_seed(0)
    module = EDP(OBS, ACT, MAX_ACTION, hidden=(16, 16), **settings)
    module.configure_optimizers()
    return module


# --------------------------------------------------------------------------- schedules
def test_scaled_linear_betas_hand_values():
    betas = scaled_linear_beta_schedule(100)  # 1000 / 100 = 10: 1e-3 .. 0.2
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    assert betas[1].item() == pytest.approx(1e-3 + (0.2 - 1e-3) / 99)
    assert torch.equal(scaled_linear_beta_schedule(1000), linear_beta_schedule(1000))  # DDPM's at K = 1000
    with pytest.raises(ValueError, match="n_timesteps > 20"):
        scaled_linear_beta_schedule(20)  # the last beta would be 1: abar_K = 0


def test_discrete_schedule_is_read_piecewise_linearly_in_time():
    abar = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    sched = DiscreteVPSchedule(abar)  # steps 0, 1, 2 at t = 1/3, 2/3, 1
    la = 0.5 * torch.log(abar)
    t = torch.tensor([1 / 3, 2 / 3, 1.0, 0.5, 1e-3])
    expected = torch.stack([la[0], la[1], la[2], (la[0] + la[1]) / 2,
                            la[0] - (1 / 3 - 1e-3) * (la[1] - la[0]) * 3]).float()  # extended below t_0
    assert torch.allclose(sched.log_alpha(t), expected, atol=1e-6)
    assert torch.allclose(sched.sigma(t[:3]), torch.sqrt(1 - abar).float(), atol=1e-6)
    assert torch.allclose(sched.model_time(t[:3]), torch.tensor([0.0, 1.0, 2.0]), atol=1e-5)


# --------------------------------------------------------------------------- action approximation
class TrueEps(nn.Module):
    """A perfect noise model for a known clean action, passed in as the state: eps = (a_i - sqrt(abar_i) a0) / sqrt(1 - abar_i)."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = [policy]  # not a submodule
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so that gradients can reach "the model"

    def forward(self, x, i, a0):
        p = self.policy[0]
        return self.scale * (x - p.sqrt_abar[i, None] * a0) / p.sqrt_one_minus_abar[i, None]


@pytest.mark.parametrize("steps,schedule", [(5, "vp"), (100, "linear_scaled"), (1000, "linear_scaled")])
def test_action_approximation_is_exact_for_a_perfect_noise_model(steps, schedule):
    policy = DiffusionPolicy(ACT, ACT, 1.0, steps, schedule)
    policy.model = TrueEps(policy)
    a0 = torch.tensor([[0.3, -0.7], [0.9, 0.0], [-0.2, 0.5]])
    i = torch.tensor([0, steps // 2, steps - 1])
    terms = policy.denoise(a0, a0, noise=torch.tensor([[1.0, -2.0], [0.5, 0.5], [-1.5, 0.3]]), i=i)
    assert torch.allclose(terms.eps_pred, terms.noise, atol=1e-4)
    # float32 rounding of a_i is amplified by sqrt(1 / abar_i): at most about 6 at K = 100, 160 at K = 1000
    assert torch.allclose(terms.a0_hat, a0, atol={5: 1e-5, 100: 1e-4, 1000: 2e-3}[steps])


def test_action_approximation_hand_values_and_clipping():
    policy = DiffusionPolicy(1, 1, 1.0, 5, "vp")
    abar = torch.cumprod(1 - policy.betas.double(), 0)
    policy.model = ConstEps(0.5)
    a0, noise = torch.tensor([[0.2], [0.9]]), torch.tensor([[1.0], [3.0]])
    i = torch.tensor([1, 4])
    terms = policy.denoise(torch.zeros(2, 1), a0, noise, i)
    a_i = abar[i].sqrt()[:, None] * a0.double() + (1 - abar[i]).sqrt()[:, None] * noise.double()
    expected = ((a_i - (1 - abar[i]).sqrt()[:, None] * 0.5) / abar[i].sqrt()[:, None]).clamp(-1, 1)
    assert expected[1].item() == 1.0  # the second one is clipped to the bound
    assert torch.allclose(terms.a0_hat.double(), expected, atol=1e-5)


def test_action_approximation_is_differentiable_in_the_noise_model_only():
    torch.manual_seed(0)
    policy = DiffusionPolicy(OBS, ACT, 1.0, 100, "linear_scaled", hidden=(16, 16))
    batch = random_batch()
    a0_hat = policy.denoise(batch.obs, batch.act).a0_hat
    grads = torch.autograd.grad(a0_hat.sum(), list(policy.model.parameters()))
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert not any(b.requires_grad for b in policy.buffers())
    policy.model.requires_grad_(False)  # with the noise model frozen nothing else carries a gradient
    assert not policy.denoise(batch.obs, batch.act).a0_hat.requires_grad


# --------------------------------------------------------------------------- surrogates
def test_gaussian_surrogate_hand_value():
    policy = DiffusionPolicy(1, 2, 1.0, 5)
    terms = policy.denoise(torch.zeros(1, 1), torch.zeros(1, 2))._replace(a0_hat=torch.tensor([[0.2, 0.1]]))
    log_prob = policy.log_prob(terms, torch.tensor([[0.5, -0.5]]), "gaussian")
    # -(0.3^2 + 0.6^2) / 2 - log(2 pi) = -0.225 - 1.837877
    assert log_prob.item() == pytest.approx(-0.225 - math.log(2 * math.pi), abs=1e-6)
    far = policy.log_prob(terms, torch.tensor([[1.0, -1.0]]), "gaussian")
    assert far.item() < log_prob.item()  # further from a0_hat, less likely


def test_elbo_surrogate_weights_and_hand_value():
    K = 40
    policy = DiffusionPolicy(1, 2, 1.0, K, "linear_scaled")
    betas = [25 * 1e-4 + k * (25 * 0.02 - 25 * 1e-4) / (K - 1) for k in range(K)]  # scale 1000 / 40 = 25
    abar, w = 1.0, []
    for b in betas:
        abar *= 1 - b
        w.append(b / (2 * (1 - abar) * (1 - b)))
    expected = [x * K / sum(w) for x in w]
    assert torch.allclose(policy.elbo_weights.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    assert policy.elbo_weights.sum().item() == pytest.approx(K, rel=1e-5)
    assert w[0] == pytest.approx(1 / (2 * (1 - betas[0])))  # w_0 = 1 / (2 alpha_0)
    terms = policy.denoise(torch.zeros(2, 1), torch.zeros(2, 2), noise=torch.zeros(2, 2), i=torch.tensor([0, 7]))
    terms = terms._replace(eps_pred=torch.tensor([[0.3, -0.1], [1.0, 2.0]]))
    log_prob = policy.log_prob(terms, torch.zeros(2, 2), "elbo")
    assert torch.allclose(log_prob, torch.tensor([-expected[0] * 0.05, -expected[7] * 2.5]), rtol=1e-5)  # mean over dims
    assert "elbo_weights" not in policy.state_dict()  # derived, not saved


# --------------------------------------------------------------------------- rules
def test_crr_and_iql_weights_are_clipped_as_the_official_code():
    adv = torch.tensor([-1.0, 0.0, 1.0, 10.0])
    assert torch.allclose(crr_weights(adv), torch.tensor([math.exp(-1), 1.0, math.e, 20.0]))  # min(exp(A), 20)
    assert torch.allclose(crr_weights(adv, beta=2.0), torch.tensor([math.exp(-0.5), 1.0, math.exp(0.5), 20.0]))
    assert torch.equal(crr_weights(adv, kind="binary"), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    adv = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert torch.allclose(awr_weights(adv), torch.tensor([math.exp(-3), 1.0, math.exp(3), 100.0]))  # exp(6) > 100


class ConstEps(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, s):
        return torch.full_like(x, self.value)


class ConstCritic(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, obs, act):
        return (self.value + self.w + 0.0 * act.sum(-1)).expand(2, -1)


def test_td3_guide_term_is_minus_alpha_q_over_mean_abs_q():
    module = small_edp(n_timesteps=25)
    module.critic = ConstCritic(-3.0)
    metrics = module.policy_step(random_batch())
    assert metrics["loss/guide"].item() == pytest.approx(2.0)  # -alpha * (-3) / 3
    assert metrics["lambda"].item() == pytest.approx(2.0 / 3.0)


def test_iql_guide_term_is_the_weighted_gaussian_log_likelihood():
    module = small_edp(rule="iql", n_timesteps=25)
    batch = random_batch()
    torch.manual_seed(1)
    metrics = module.iql_steps(batch)
    assert metrics["loss/guide"].item() > 0  # -E[w log N(a; a0_hat, I)] with log N < 0 in two dims
    assert 0 < metrics["adv/weight_mean"].item() <= 100


@pytest.mark.parametrize("rule", ["td3", "crr", "iql"])
def test_a_policy_update_calls_the_noise_model_once(rule):
    module = small_edp(rule=rule, n_timesteps=100)
    calls = {"online": 0, "ema": 0}
    module.actor.model.register_forward_hook(lambda *_: calls.__setitem__("online", calls["online"] + 1))
    module.actor_ema.model.register_forward_hook(lambda *_: calls.__setitem__("ema", calls["ema"] + 1))
    metrics = module.update(random_batch())
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert calls["online"] == 1  # the denoising loss and the guide term share one pass
    assert calls["ema"] == (0 if rule == "iql" else 15)  # the critic's a' by DPM-Solver, 15 calls
    module.hparams.sampler = "ddpm"
    module.actor_ema.sampler = "ddpm"
    calls["ema"] = 0
    module.update(random_batch())
    assert calls["ema"] == (0 if rule == "iql" else 100)  # the code's default: the K-step chain


@pytest.mark.parametrize("rule", ["td3", "crr", "iql"])
def test_every_rule_acts_within_bounds_with_eas(rule):
    module = small_edp(rule=rule, n_timesteps=25, n_eval_candidates=4)
    module.update(random_batch())
    actions = module.act(torch.randn(3, OBS))
    assert actions.shape == (3, ACT) and actions.abs().max() <= MAX_ACTION


def test_ema_policy_moves_every_5_updates_after_the_1000th_counted_from_1():
    module = small_edp(rule="iql", n_timesteps=25, ema_start=3, ema_every=2)
    moved = []
    for step in range(8):
        before = [p.clone() for p in module.actor_ema.parameters()]
        module.update(random_batch(seed=step))
        module.step += 1
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, module.actor_ema.parameters())))
    # the code: after update k (k = 1, 2, ...) when k > start and k % every == 0
    assert moved == [False, False, False, True, False, True, False, True]


def test_each_q_network_is_clipped_on_its_own():
    module = small_edp(max_grad_norm=1.0, n_timesteps=25)
    module.critic_opt = torch.optim.SGD(module.critic.parameters(), lr=1.0)
    before = [p.detach().clone() for p in module.critic.parameters()]
    # member 0 gets a gradient of 10 in every entry (norm far above 1), member 1 of 1e-4 (norm below 1)
    loss = sum((p[0] * 10.0).sum() + (p[1] * 1e-4).sum() for p in module.critic.parameters())
    module.optimize_critic(loss)
    steps = [b - p.detach() for b, p in zip(before, module.critic.parameters())]
    norm0 = torch.sqrt(sum(s[0].pow(2).sum() for s in steps))
    assert norm0.item() == pytest.approx(1.0, rel=1e-5)  # clipped to 1
    assert all(torch.allclose(s[1], torch.full_like(s[1], 1e-4), rtol=1e-2) for s in steps)  # not scaled


# --------------------------------------------------------------------------- DPM-Solver on the discrete schedule
class GaussianEpsDiscrete(nn.Module):
    """The exact noise prediction for data a ~ N(0, c^2) under the policy's schedule read in continuous time:
    eps(x, t) = sigma_t x / (alpha_t^2 c^2 + sigma_t^2), t = (n + 1) / N for the model's (fractional) step n."""

    def __init__(self, policy: DiffusionPolicy, c: float):
        super().__init__()
        self.policy, self.c = [policy], c

    def forward(self, x, n, s):
        sched = self.policy[0].schedule
        t = (n.float() + 1) / sched.n
        alpha, sigma = sched.log_alpha(t).exp()[:, None], sched.sigma(t)[:, None]
        return sigma * x / (alpha**2 * self.c**2 + sigma**2)


def gaussian_policy(c: float, steps: int = 1000, **kw) -> DiffusionPolicy:
    policy = DiffusionPolicy(1, 1, max_action=100.0, n_timesteps=steps, beta_schedule="linear_scaled", **kw)
    policy.model = GaussianEpsDiscrete(policy, c)
    return policy


def test_dpm_solver_on_the_discrete_schedule_follows_the_exact_flow():
    # The probability-flow ODE of Gaussian data is linear: x(t_end) = x(1) std(t_end) / std(1),
    # std(t)^2 = alpha_t^2 c^2 + sigma_t^2; at K = 1000 and t_end = 1e-3 (step 0) std(t_end) ~ c.
    c = 0.5
    policy = gaussian_policy(c, sampler="dpm")
    sched = policy.schedule
    std = lambda t: torch.sqrt(sched.log_alpha(t).exp() ** 2 * c**2 + sched.sigma(t) ** 2)
    s = torch.zeros(512, 1)
    x_T = torch.randn(512, 1, generator=torch.Generator().manual_seed(0))
    exact = x_T * std(torch.tensor(1e-3)) / std(torch.tensor(1.0))
    errors = {}
    for steps in (15, 30, 60):
        policy.dpm_steps = steps
        errors[steps] = (policy.sample(s, noise=x_T[None]) - exact).abs().max().item()
    # measured: 0.087, 0.0085, 0.0013 (|x_T| up to 3.5); 15 calls is the bound SfBC's test sets too
    assert errors[15] < 0.1 and errors[30] < 0.015 and errors[60] < 3e-3
    policy.dpm_steps, policy.dpm_order = 15, 1  # first order (DDIM) is much further off at 15 calls (0.36)
    assert (policy.sample(s, noise=x_T[None]) - exact).abs().max().item() > 3 * errors[15]


@pytest.mark.slow  # about a minute of CPU: 1000-step chains over many samples
def test_dpm_solver_and_the_1000_step_ddpm_chain_sample_the_same_gaussian():
    # The data's std is c = 0.5; a sample std of n = 8192 draws has a standard error of about 0.8%.
    torch.manual_seed(0)
    c, n = 0.5, 8192
    ddpm = gaussian_policy(c, sampler="ddpm").sample(torch.zeros(n, 1))  # the 1000-step ancestral chain
    policy = gaussian_policy(c, sampler="dpm")
    policy.dpm_steps = 60
    dpm_60 = policy.sample(torch.zeros(n, 1))
    policy.dpm_steps = 15
    dpm_15 = policy.sample(torch.zeros(n, 1))
    assert ddpm.std().item() == pytest.approx(c, rel=0.03) and dpm_60.std().item() == pytest.approx(c, rel=0.03)
    assert dpm_15.std().item() == pytest.approx(c, rel=0.07)  # 15 calls: about 4% narrow here
    assert max(abs(x.mean().item()) for x in (ddpm, dpm_60, dpm_15)) < 0.03


def test_dpm_noise_clipping_keeps_the_implied_action_in_the_bounds():
    policy = DiffusionPolicy(1, 1, max_action=1.0, n_timesteps=100, beta_schedule="linear_scaled", sampler="dpm")
    policy.model = ConstEps(-50.0)  # would imply a_0 far above the bound
    eps = policy._dpm_eps(torch.zeros(3, 1))
    x, t = torch.tensor([[0.5], [-2.0], [3.0]]), torch.tensor(0.37)
    out = eps(x, t)
    alpha, sigma = policy.schedule.log_alpha(t).exp(), policy.schedule.sigma(t)
    implied = (x - sigma * out) / alpha
    assert torch.allclose(implied, torch.ones(3, 1), atol=1e-4)  # clipped onto the upper bound exactly
    assert policy.sample(torch.zeros(5, 1)).abs().max() <= 1.0


# --------------------------------------------------------------------------- learning (slow)
@pytest.mark.slow
def test_edp_td3_beats_behaviour_cloning_on_shipped_pendulum_data():
    """EDP (td3) and BC trained on the forge's Pendulum medium-replay data as shipped (`small` preset: SAC
    online, D4RL's recipe; docs/data.md) with the same updates and evaluations; EDP must
    score higher. Test-only settings for a CPU: 2 x 64 networks, K = 100 with DPM-Solver 15, gamma 0.95.
    Measured once (final mean of the last four evaluations): EDP -1022, BC -1400, data mean -1328; 9.4 minutes
    on 2 busy cores."""

    import numpy as np

    from algorithms.bc import BC
    from offbench.data.catalog import resolve
    from offbench.data.datamodule import OfflineDataModule
    from offbench.evaluation import evaluate

    dm = OfflineDataModule("shipped/pendulum-medium-replay-v0", batch_size=256, eval_every=500)
    dm.setup("fit")
    info = resolve("shipped/pendulum-medium-replay-v0")
    updates, final_evals, every = 4000, 4, 500
    scores = {}
    for name in ("bc", "edp"):
        torch.manual_seed(0)
        if name == "bc":
            module = BC(dm.obs_dim, dm.act_dim, dm.max_action, hidden=(64, 64))
        else:
            module = EDP(dm.obs_dim, dm.act_dim, dm.max_action, hidden=(64, 64), n_timesteps=100, gamma=0.95,
                         max_grad_norm=5.0, ema_start=500)
        module.configure_optimizers()
        final = []
        for update in range(1, updates + 1):
            module.update(dm.sample())
            module.step += 1
            if update > updates - final_evals * every and update % every == 0:
                module.eval()
                final.append(evaluate(module.act, info, episodes=10, num_envs=10, seed=100)["return"])
                module.train()
        scores[name] = float(np.mean(final))
        print(f"{name}: final return {scores[name]:.0f} {final}")
    assert scores["edp"] > scores["bc"], scores


@pytest.mark.slow  # a perf run of two K = 1000 rows: about 40 s of CPU
def test_perf_counts_the_noise_model_passes_of_edp_rows(tiny_hopper, tmp_path):
    import json
    from pathlib import Path

    from offbench.cli import main

    config = Path(__file__).resolve().parents[1] / "configs/algorithms/edp.yaml"
    main(["perf", "--configs", str(config), "--dataset", str(tiny_hopper), "--updates", "4", "--block-size", "2",
          "--device", "cpu", "--eval-episodes", "1", "--eval-envs", "1", "--out", str(tmp_path)])
    rows = {r["label"]: r for r in json.loads((tmp_path / "perf.json").read_text())["training"]}
    assert rows["edp"]["noise_model_calls_per_update"] == 16  # 1 policy pass + 15 DPM-Solver calls for a'
    assert rows["edp-iql"]["noise_model_calls_per_update"] == 1 and rows["edp-iql"]["extra_init_args"] == {"rule": "iql"}
    assert "edp-iql (rule=iql)" in (tmp_path / "perf.md").read_text()
