"""DiffCPS (and Diffusion-QL, its parent): one update on hand-checkable settings. The dual update's
sign, lambda's clamp, the policy interval, the EMA cadence and the scale of L_c."""

import pytest
import torch

from algorithms.diffcps import DiffCPS
from algorithms.diffusion_ql import DiffusionQL
from offbench.batch import Batch

OBS, ACT = 3, 2


def batch(n=32, act_dim=ACT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, OBS, generator=g), torch.rand(n, act_dim, generator=g) * 2 - 1, torch.randn(n, generator=g),
        torch.randn(n, OBS, generator=g), (torch.rand(n, generator=g) < 0.2).float(),
    )


def make(cls=DiffCPS, act_dim=ACT, zero_noise_model=False, **kwargs):
    torch.manual_seed(0)
    model = cls(OBS, act_dim, hidden=(32, 32, 32), **kwargs)
    model.configure_optimizers()
    if zero_noise_model:  # eps_theta = 0, so L_c = E ||eps||^2 / act_dim, about 1
        torch.nn.init.zeros_(model.actor.model.final.weight)
        torch.nn.init.zeros_(model.actor.model.final.bias)
    return model


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cls", [DiffCPS, DiffusionQL])
@pytest.mark.parametrize("max_q_backup", [False, True])
def test_update_on_a_random_batch_gives_finite_losses(cls, max_q_backup):
    model = make(cls, max_q_backup=max_q_backup)
    metrics = model.update(batch())
    expected = {"loss/critic", "loss/actor", "q/mean"} | ({"loss/lambda", "lambda", "L_c", "slack"} if cls is DiffCPS else set())
    assert expected <= set(metrics)
    assert all(v.shape == () and torch.isfinite(v) for v in metrics.values())
    actions = model.act(torch.randn(5, OBS))
    assert actions.shape == (5, ACT) and actions.abs().max() <= 1.0


@pytest.mark.parametrize("kappa, rises", [(0.5, True), (2.0, False)])
def test_lambda_rises_while_the_constraint_is_violated(kappa, rises):
    # L_c is about 1 with a zero noise model: above kappa = 0.5 (violated), below kappa = 2
    model = make(zero_noise_model=True, kappa=kappa, lambda_lr=0.01)
    before = model.lagrange.item()
    metrics = model.update(batch(256))
    assert (metrics["L_c"].item() > kappa) == rises
    assert metrics["slack"].item() == pytest.approx(kappa - metrics["L_c"].item())
    assert metrics["loss/lambda"].item() == pytest.approx(before * (kappa - metrics["L_c"].item()), rel=1e-5)
    assert (model.lagrange.item() > before) == rises
    assert abs(model.lagrange.item() - before) == pytest.approx(0.01, rel=1e-3)  # Adam's first step is lr


@pytest.mark.parametrize("raw, used", [(-5.0, 0.3), (0.7, 0.7), (500.0, 100.0)])
def test_lambda_is_clamped_to_clip_and_max_where_used(raw, used):
    model = make(lambda_clip=0.3, lambda_max=100.0)
    with torch.no_grad():
        model.lagrange.fill_(raw)
    m = model.update(batch())
    assert m["lambda"].item() == pytest.approx(used)
    assert m["loss/actor"].item() == pytest.approx(m["loss/q"].item() + used * m["L_c"].item(), rel=1e-5)
    assert model.lagrange.item() == pytest.approx(raw, abs=1e-3)  # the raw parameter itself is not clamped


def test_actor_and_lambda_update_every_policy_interval():
    model = make(policy_every=3)
    b = batch()
    for step in range(7):
        model.step = step
        actor, lam, critic = params(model.actor), model.lagrange.item(), params(model.critic)
        metrics = model.update(b)
        stepped = step % 3 == 0
        assert not same(params(model.critic), critic)  # the critic learns every update
        assert (not same(params(model.actor), actor)) == stepped
        assert (model.lagrange.item() != lam) == stepped
        assert ("loss/actor" in metrics) == stepped and ("L_c" in metrics) == stepped


@pytest.mark.parametrize("cls", [DiffCPS, DiffusionQL])
def test_ema_actor_cadence(cls):
    model = make(cls, ema_start=4, ema_every=2, ema_decay=0.9)
    initial = params(model.actor_ema)
    b = batch()
    for step in range(4):  # before ema_start: the EMA keeps its initial weights (official code)
        model.step = step
        model.update(b)
        assert same(params(model.actor_ema), initial)
    for step in (4, 5, 6):
        model.step = step
        ema = params(model.actor_ema)
        model.update(b)
        if step % 2 == 0:
            expected = [e + 0.1 * (a - e) for e, a in zip(ema, params(model.actor))]
            assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(params(model.actor_ema), expected))
        else:
            assert same(params(model.actor_ema), ema)
    copier = make(cls, ema_warmup="copy")
    copier.update(b)
    assert same(params(copier.actor_ema), params(copier.actor))


@pytest.mark.parametrize("target_actor, uses_ema", [("ema", True), ("online", False)])
def test_td_target_next_actions_come_from_the_chosen_actor(target_actor, uses_ema):
    model = make(target_actor=target_actor)
    with torch.no_grad():  # poison the EMA actor: the critic loss shows whether it was used
        for p in model.actor_ema.parameters():
            p.fill_(float("nan"))
    assert torch.isfinite(model.update(batch())["loss/critic"]).item() != uses_ema


@pytest.mark.parametrize("reduction, scale", [("mean", 1.0), ("sum", 3.0)])
def test_lc_is_a_mean_over_batch_and_action_dims(reduction, scale):
    # zero noise model: L_c = mean of eps^2 over B x act_dim draws = 1 (+- 0.04 at B = 4096);
    # summing over the 3 action dims would give 3: kappa is tuned on the mean's scale
    model = make(act_dim=3, zero_noise_model=True, lc_reduction=reduction)
    l_c = model.update(batch(4096, act_dim=3))["L_c"].item()
    assert l_c == pytest.approx(scale, rel=0.05)


def test_diffusion_ql_actor_loss_is_bc_plus_eta_q():
    model = make(DiffusionQL, eta=2.5)
    m = model.update(batch())
    assert m["loss/actor"].item() == pytest.approx(m["loss/bc"].item() + 2.5 * m["loss/q"].item(), rel=1e-5)


@pytest.mark.parametrize("cls", [DiffCPS, DiffusionQL])
@pytest.mark.parametrize("approximation", [False, True])
def test_action_approximation_makes_the_actor_step_one_noise_model_pass(cls, approximation):
    """EDP's option: the Q term at a0_hat from L_c's own pass (1 call) instead of the T-step chain (1 + T)."""
    model = make(cls, n_timesteps=5, action_approximation=approximation)
    calls = []
    model.actor.model.register_forward_hook(lambda *_: calls.append(1))
    out = model.actor_update(batch())
    assert len(calls) == (1 if approximation else 1 + 5)
    assert torch.isfinite(out["loss/actor"])


def test_action_approximation_takes_the_q_gradient_through_a0_hat():
    """With the approximation, Q's gradient reaches the noise model through a0_hat; a0_hat is clipped
    to the bounds and equals the noised action's one-step reconstruction."""
    model = make(DiffusionQL, action_approximation=True)
    b = batch()
    i, noise = torch.randint(0, 5, (len(b.act),)), torch.randn_like(b.act)
    terms = model.actor.denoise(b.obs, b.act, noise=noise, i=i)
    a_i = model.actor.sqrt_abar[i, None] * b.act + model.actor.sqrt_one_minus_abar[i, None] * noise
    expected = (a_i - model.actor.sqrt_one_minus_abar[i, None] * terms.eps_pred) / model.actor.sqrt_abar[i, None]
    torch.testing.assert_close(terms.a0_hat, expected.clamp(-1, 1))
    model.q_loss(b.obs, terms.a0_hat, torch.tensor([0])).backward()
    assert model.actor.model.final.weight.grad.abs().sum() > 0
