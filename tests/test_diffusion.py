"""offbench/diffusion.py: schedules, the DDPM policy's loss and reverse chain, the EMA cadence, the
softmax resampling, and the DPM-Solver sampler of the continuous VP SDE, against hand computation."""

import math

import pytest
import torch
from torch import nn

from offbench.diffusion import (
    DiffusionPolicy,
    ScoreDiffusion,
    _singlestep_orders,
    cosine_beta_schedule,
    dpm_solver_sample,
    dpm_step,
    linear_beta_schedule,
    resample,
    sample_by_score,
    update_ema,
    vp_beta_schedule,
)


class Echo(nn.Module):
    def forward(self, x, t, s):
        return x


def vp_beta(i, T, bmin=0.1, bmax=10.0):
    return 1 - math.exp(-bmin / T - 0.5 * (bmax - bmin) * (2 * i - 1) / T**2)


class Const(nn.Module):
    """A noise model that predicts the constant c whatever its input."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t, s):
        return torch.full_like(x, self.c)


def test_vp_schedule_hand_values_T5():
    # beta_1 = 1 - exp(-0.1/5 - 0.5 * 9.9 * 1/25) = 1 - exp(-0.218)
    assert vp_beta(1, 5) == pytest.approx(1 - math.exp(-0.218))
    expected = [vp_beta(i, 5) for i in range(1, 6)]
    assert torch.allclose(vp_beta_schedule(5), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert vp_beta_schedule(5)[-1].item() == pytest.approx(1 - math.exp(-0.02 - 0.5 * 9.9 * 9 / 25))


def test_linear_and_cosine_schedules_hand_values_T5():
    assert torch.allclose(linear_beta_schedule(5), torch.tensor([1e-4, 0.005075, 0.01005, 0.015025, 0.02], dtype=torch.float64))
    abar = [math.cos((k / 5 + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(6)]
    expected = [min(1 - abar[k + 1] / abar[k], 0.999) for k in range(5)]
    assert torch.allclose(cosine_beta_schedule(5), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_schedule_buffers_follow_the_module():
    policy = DiffusionPolicy(3, 2, n_timesteps=5)
    names = {name for name, _ in policy.named_buffers()}
    assert {"betas", "sqrt_abar", "sample_std"} <= names
    assert "betas" in policy.state_dict() and policy.betas.dtype == torch.float32
    assert policy.sample_std[0] == 0  # the last reverse step adds no noise
    policy.to(torch.float64)
    assert policy.betas.dtype == torch.float64


def test_loss_and_sample_shapes_and_devices():
    torch.manual_seed(0)
    policy = DiffusionPolicy(3, 2, max_action=0.5)
    s, a = torch.randn(7, 3), torch.rand(7, 2) - 0.5
    loss = policy.loss(s, a)
    assert loss.shape == () and loss.device == s.device and torch.isfinite(loss)
    assert policy.loss(s, a, per_sample=True).shape == (7,)
    actions = policy.sample(s)
    assert actions.shape == (7, 2) and actions.abs().max() <= 0.5 and actions.grad_fn is None
    candidates = policy.sample(s[:, None, :].expand(7, 4, 3))  # several candidates per state
    assert candidates.shape == (7, 4, 2)


def test_loss_hand_values():
    policy = DiffusionPolicy(1, 2, n_timesteps=5)
    a0, s = torch.tensor([[0.5, -1.0], [0.0, 1.0]]), torch.zeros(2, 1)
    noise, i = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 4])
    policy.model = Const(0.0)  # error = noise^2: mean over batch and action dims
    assert policy.loss(s, a0, noise=noise, i=i).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert torch.allclose(policy.loss(s, a0, per_sample=True, noise=noise, i=i), torch.tensor([2.5, 12.5]))
    policy.model = Echo()  # predicts the noised action itself: checks the forward noising
    abar = [math.prod(1 - vp_beta(k, 5) for k in range(1, j + 2)) for j in (0, 4)]
    err = [
        (math.sqrt(ab) * a + math.sqrt(1 - ab) * n - n) ** 2
        for ab, row_a, row_n in zip(abar, a0.tolist(), noise.tolist())
        for a, n in zip(row_a, row_n)
    ]
    assert policy.loss(s, a0, noise=noise, i=i).item() == pytest.approx(sum(err) / 4, rel=1e-5)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("max_action", [10.0, 0.1])
def test_reverse_chain_1d_by_hand(variance, max_action):
    T, c = 2, 0.3
    policy = DiffusionPolicy(1, 1, max_action=max_action, n_timesteps=T, variance=variance)
    policy.model = Const(c)
    torch.manual_seed(0)
    out = policy.sample(torch.zeros(1, 1)).item()
    torch.manual_seed(0)  # the draws in sample()'s order: a_T, then one normal per step
    x, z1, _ = torch.randn(1, 1).item(), torch.randn(1, 1).item(), torch.randn(1, 1).item()
    b1, b2 = vp_beta(1, T), vp_beta(2, T)
    ab1, ab2 = 1 - b1, (1 - b1) * (1 - b2)
    # step i = 2: predicted a_0, clipped; posterior mean; noise with the chosen variance
    x0 = max(-max_action, min(max_action, x / math.sqrt(ab2) - math.sqrt(1 / ab2 - 1) * c))
    mean = b2 * math.sqrt(ab1) / (1 - ab2) * x0 + (1 - ab1) * math.sqrt(1 - b2) / (1 - ab2) * x
    std = math.sqrt(b2 * (1 - ab1) / (1 - ab2)) if variance == "posterior" else math.sqrt(b2)
    x = mean + std * z1
    # step i = 1: abar_0 = 1, so the posterior mean is the clipped a_0 prediction and there is no noise
    x0 = max(-max_action, min(max_action, x / math.sqrt(ab1) - math.sqrt(1 / ab1 - 1) * c))
    assert out == pytest.approx(max(-max_action, min(max_action, x0)), rel=1e-5, abs=1e-6)


def test_sample_with_grad_reaches_every_actor_parameter():
    torch.manual_seed(0)
    policy = DiffusionPolicy(3, 2)
    s = torch.randn(16, 3)
    assert policy.sample(s).grad_fn is None
    policy.sample(s, grad=True).pow(2).sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_update_ema_cadence():
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    w0 = ema.weight.detach().clone()
    update_ema(ema, model, step=999, start=1000, every=5)  # before start: hold the initial weights
    assert torch.equal(ema.weight, w0)
    update_ema(ema, model, step=3, start=1000, warmup="copy")  # or copy the model
    assert torch.equal(ema.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, step=1001, start=1000, every=5)  # not a multiple of `every`
    assert torch.allclose(ema.weight, model.weight - 1.0)
    update_ema(ema, model, step=1005, decay=0.995, start=1000, every=5)
    assert torch.allclose(ema.weight, model.weight - 1.0 + 0.005)


def test_sample_by_score_is_softmax_sampling():
    torch.manual_seed(0)
    scores = torch.tensor([0.0, math.log(3.0)]).expand(40000, 2)
    picked = sample_by_score(scores).squeeze(-1).float()
    assert picked.mean().item() == pytest.approx(0.75, abs=0.01)
    # very peaked scores neither underflow nor fail when k > 1 are drawn without replacement
    idx = sample_by_score(torch.tensor([[0.0, 1e4, -1e4, 5e3]]), k=3)
    assert idx[0, 0] == 1 and len(set(idx[0].tolist())) == 3


def test_resample_averages_the_k_picks():
    candidates = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    logits = torch.tensor([[-1e4, 1e4, -1e4, 1e4]])  # only candidates 1 and 3 are possible
    assert resample(candidates, logits, k=2).item() == 2.0
    assert resample(candidates, torch.tensor([[0.0, 0.0, 0.0, 1e4]])).item() == 3.0


def test_singlestep_orders_use_all_model_evaluations():
    assert _singlestep_orders(15, 3) == [3, 3, 3, 3, 2, 1]
    assert _singlestep_orders(15, 2) == _singlestep_orders(15, 2, "data") == [2] * 7 + [1]
    # an even number at order 2: upstream DPM-Solver's split (noise form), the official QGPO code's (data form)
    assert _singlestep_orders(16, 2) == [2] * 8
    assert _singlestep_orders(16, 2, "data") == [2] * 7 + [1, 1]
    assert _singlestep_orders(2, 2, "data") == [1, 1]
    for steps in range(1, 20):
        for order in (1, 2, 3):
            for form in ("noise", "data"):
                assert sum(_singlestep_orders(steps, order, form)) == steps
                assert form == "data" and order == 2 or _singlestep_orders(steps, order, form) == _singlestep_orders(steps, order)
    with pytest.raises(ValueError, match="choose noise .* or data"):
        _singlestep_orders(15, 2, "x0")


class GaussianEps(nn.Module):
    """The exact noise prediction for data a ~ N(0, c^2): eps(x, t) = sigma_t x / (alpha_t^2 c^2 + sigma_t^2)."""

    def __init__(self, sde, c):
        super().__init__()
        self.sde, self.c = sde, c

    def forward(self, x, t, s):
        alpha, sigma = self.sde.log_alpha(t).exp()[:, None], self.sde.sigma(t)[:, None]
        return sigma * x / (alpha**2 * self.c**2 + sigma**2)


def gaussian_sde(c):
    sde = ScoreDiffusion(nn.Identity(), act_dim=1, max_action=100.0)
    sde.model = GaussianEps(sde, c)
    return sde, lambda t: torch.sqrt(sde.log_alpha(t).exp() ** 2 * c**2 + sde.sigma(t) ** 2)


@pytest.mark.parametrize("form", ["noise", "data"])
def test_dpm_solver_steps_have_their_order(form):
    # The probability-flow ODE is linear here: x_b = x_a * std(b) / std(a), std(t)^2 = alpha_t^2 c^2 + sigma_t^2.
    # A DPM-Solver-k (or DPM-Solver++-k) step has local error O(h^(k+1)): halving the step divides it by
    # about 2^(k+1).
    sde, std = gaussian_sde(0.5)
    x, s = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    t = torch.tensor([1.0, 0.3, 1e-3], dtype=torch.float64)
    assert torch.allclose(sde.time_of(sde.half_log_snr(t)), t)
    errors = {}
    for k in (1, 2, 3):
        for b in (0.3, 0.45):
            ts = torch.linspace(0.6, b, k + 1, dtype=torch.float64)
            errors[k, b] = (dpm_step(sde.eps_fn(s), sde.schedule, x, ts, form) - x * std(ts[-1]) / std(ts[0])).abs().item()
        assert errors[k, 0.3] / errors[k, 0.45] > 0.7 * 2 ** (k + 1)
    assert errors[3, 0.3] < errors[2, 0.3] < errors[1, 0.3]


# Measured maximum errors over the 256 samples (float32) of the sampler on the time-uniform grid 1 -> 1e-3. Its last
# steps span long stretches of lambda (lambda ~ -log(t) / 2 near t = 0), where the data form is the less accurate
# on this Gaussian; the local orders above hold for both forms.
#   form   steps   order 1   order 2   order 3
#   noise   15     0.30      0.058     0.074
#   noise   60     0.078     0.056     0.0015
#   noise  120     0.040     0.013     0.00085
#   data    15     0.30      0.19      0.18
#   data    60     0.078     0.029     0.013
#   data   120     0.040     0.0091    0.0033
@pytest.mark.parametrize("form, bound_3, bound_15", [("noise", 5e-3, 0.1), ("data", 2e-2, 0.25)])
def test_dpm_solver_sampler_follows_the_exact_flow(form, bound_3, bound_15):
    sde, std = gaussian_sde(0.5)
    s = torch.zeros(256, 3)
    torch.manual_seed(0)
    exact = torch.randn(256, 1) * std(torch.tensor(1e-3)) / std(torch.tensor(1.0))

    def error(steps: int, order: int) -> float:
        torch.manual_seed(0)  # the same a_T as `exact`
        return (sde.sample(s, steps=steps, order=order, form=form) - exact).abs().max().item()

    errors = {order: error(60, order) for order in (1, 2, 3)}
    assert errors[3] < bound_3 and errors[1] > 5 * errors[3] and errors[2] < errors[1]
    assert error(120, 2) < errors[2] / 2.5  # order 2 (QGPO's) converges faster than order 1 (ratio 2)
    assert error(15, 3) < bound_15  # SfBC's setting
    assert error(15, 2) < bound_15  # QGPO's
    assert sde.loss(torch.zeros(8, 3), torch.randn(8, 1)).shape == ()


def test_the_data_form_checks_its_schedule():
    eps = lambda x, t: x  # noqa: E731
    policy = DiffusionPolicy(3, 2, n_timesteps=10)
    with pytest.raises(ValueError, match="time_of"):
        dpm_solver_sample(eps, policy.schedule, torch.zeros(4, 2), 4, 2, t_end=0.1, form="data")
    with pytest.raises(ValueError, match="choose noise .* or data"):
        dpm_solver_sample(eps, policy.schedule, torch.zeros(4, 2), 4, 2, t_end=0.1, form="x0")


def test_first_order_steps_are_the_same_in_both_forms():
    # DPM-Solver-1 = DPM-Solver++-1 = DDIM: x_t = sigma_t / sigma_s x - alpha_t expm1(-h) x0(x, s), which equals
    # alpha_t / alpha_s x - sigma_t expm1(h) eps(x, s); the second-order steps differ
    sde, _ = gaussian_sde(0.5)
    s, x = torch.zeros(5, 3, dtype=torch.float64), torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    ts = torch.tensor([0.8, 0.5], dtype=torch.float64)
    noise, data = (dpm_step(sde.eps_fn(s), sde.schedule, x, ts, form) for form in ("noise", "data"))
    torch.testing.assert_close(noise, data, atol=1e-15, rtol=1e-14)
    ts = torch.tensor([0.8, 0.65, 0.5], dtype=torch.float64)
    assert not torch.allclose(*(dpm_step(sde.eps_fn(s), sde.schedule, x, ts, form) for form in ("noise", "data")), atol=1e-6)
