"""Golden tests: QGPO against values recorded by running its official code.

tests/data/golden/qgpo.pt holds what the official code (ChenDRAG/CEP-energy-guided-diffusion, folder
Offline_RL_2D; commit and settings in tests/data/golden/README.md) computed from fixed weights, a fixed
batch and its own random draws (all recorded): the behaviour loss and one behaviour update, the guided
noise it hands its solver, its DPM-Solver samples, and one iteration of its critic loop (the in-support
softmax Q update with its Polyak step, then the contrastive energy update). Each test loads the same
weights into our modules, passes the recorded draws through our explicit draw arguments (`QGPODraws`,
`ScoreDiffusion.loss(u=, noise=)`, `sample(noise=)`, `act(noise=)`) and compares. The weights are not
stored: they are regenerated here from the file's recipe and checked bit for bit against its checksums.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from algorithms.qgpo import QGPO, GuidedNoise, QGPODraws
from offbench.batch import Batch
from offbench.diffusion import repeat_rows
from offbench.diffusion.solvers import singlestep_orders

GOLDEN = Path(__file__).parent / "data" / "golden" / "qgpo.pt"
DTYPES = [torch.float32, torch.float64]
# float32: about 50 x the largest difference measured across threads (1, 2) and ATen CPU capabilities (default,
# avx2, avx512), rounded up (README, "Tolerances"; largest: the critic's Q values, 3.2e-7); float64: round-off.
F32 = dict(atol=2e-5, rtol=2e-5)
F64 = dict(atol=1e-12, rtol=1e-10)
PARAMS = dict(atol=3e-6, rtol=0.0)  # after one Adam step (measured 6e-8): a wrong sign moves an entry by 2 lr (2e-4 or 6e-4)
ULP1 = 1.2e-7  # float32's spacing at 1: the official sigma_t = sqrt(1 - exp(2 log alpha_t)) is off by up to ULP1 / (2 sigma_t)


@functools.cache
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


def key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- the official weights
def fixed_weights(spec: list[dict]) -> dict[str, torch.Tensor]:
    """The recipe of the recording script: per tensor a torch.Generator seeded with `seed`, a float64
    draw, uniform (rand * 2 - 1) * scale or normal randn * scale, rounded to float32."""
    out = {}
    for e in spec:
        g = torch.Generator().manual_seed(e["seed"])
        if e["kind"] == "uniform":
            v = (torch.rand(e["shape"], generator=g, dtype=torch.float64) * 2 - 1) * e["scale"]
        else:
            v = torch.randn(e["shape"], generator=g, dtype=torch.float64) * e["scale"]
        out[e["name"]] = v.float()
    return out


@functools.cache
def official_weights() -> dict[str, dict[str, torch.Tensor]]:
    g = golden()["weights"]
    return {net: fixed_weights(spec) for net, spec in g["spec"].items()}


BLOCKS = {"down_block1": "down.0", "down_block2": "down.1", "down_block3": "down.2", "middle1": "middle",
          "up_block3": "up.0", "up_block2": "up.1"}
BLOCK_PARTS = {"time_mlp.1": "time.1", "dense1.0": "dense1.0", "dense2.0": "dense2.0", "modify_x": "skip"}


def behavior_name(name: str) -> str:
    """The official ScoreNet's names to algorithms.sfbc.ScoreNet's."""
    fixed = {"embed.0.W": "fourier", "embed.1.weight": "t_embed.weight", "embed.1.bias": "t_embed.bias"}
    if name in fixed:
        return fixed[name]
    for old, new in (("pre_sort_condition.0.dense.", "cond.0."), ("sort_t.", "mix."), ("last.", "last.")):
        if name.startswith(old):
            return new + name[len(old):]
    block, rest = name.split(".", 1)
    part, kind = rest.rsplit(".", 1)
    return f"{BLOCKS[block]}.{BLOCK_PARTS[part]}.{kind}"


def behavior_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ScoreNet predicts the noise eps; the official one's last layer h gives the score h / sigma_t
    and its loss is ||h + z||^2, i.e. h = -eps: our `last` is the official one negated (exact)."""
    return {behavior_name(k): (-v if k.startswith("last.") else v).clone() for k, v in official.items()}


def critic_state(official: dict[str, torch.Tensor], act_dim: int) -> dict[str, torch.Tensor]:
    """The official TwinQ (q1, q2: nn.Linear weights (out, in) on [a, s]) to CriticEnsemble's batched
    layers (weight (2, in, out), bias (2, 1, out)) on [s, a]: the first layer's input columns reordered."""
    state = {}
    for k in (0, 2, 4, 6):
        ws = []
        for h in (1, 2):
            w = official[f"q{h}.{k}.weight"]
            if k == 0:
                w = torch.cat([w[:, act_dim:], w[:, :act_dim]], 1)
            ws.append(w.T)
        state[f"net.{k}.weight"] = torch.stack(ws).contiguous()
        state[f"net.{k}.bias"] = torch.stack([official[f"q{h}.{k}.bias"][None] for h in (1, 2)]).contiguous()
    return state


def energy_name(name: str) -> str:
    """The official GuidanceQt's names to EnergyNet's (same layout, input [a_t, time features, s])."""
    fixed = {"embed.0.W": "fourier", "embed.1.weight": "t_embed.weight", "embed.1.bias": "t_embed.bias"}
    return fixed.get(name, name.replace("qt.", "net.", 1))


def energy_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {energy_name(k): v.clone() for k, v in official.items()}


def build(dtype: torch.dtype = torch.float32, **kwargs) -> QGPO:
    """Our QGPO at the file's sizes with the official weights (float64: built and loaded in float64)."""
    meta = golden()["meta"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        sizes = dict(n_support=meta["M"], critic_batch_size=meta["batch_size"])
        model = QGPO(meta["obs_dim"], meta["act_dim"], **{**sizes, **kwargs})
    finally:
        torch.set_default_dtype(previous)
    # Our defaults are the official settings: beta (--alpha) 3, beta_Q (--q_alpha) 1, 15 solver steps of order 2
    # in the data-prediction form (DPM-Solver++, the code's DPM_Solver(predict_x0=True)),
    # gamma 0.99, tau 0.005, Adam 1e-4 (behaviour) and 3e-4 (Q, f_phi).
    official = dict(beta=meta["alpha"], beta_q=meta["q_alpha"], solver_steps=meta["diffusion_steps"],
                    solver_order=meta["solver_order"], solver_form="data", gamma=0.99, tau=0.005, behavior_lr=1e-4, critic_lr=3e-4, energy_lr=3e-4)
    for name, value in official.items():
        assert name in kwargs or model.hparams[name] == value, f"QGPO's default {name} is not the official {value}"
    w = official_weights()
    cast = lambda state: {k: v.to(dtype) for k, v in state.items()}  # noqa: E731
    model.behavior.model.load_state_dict(cast(behavior_state(w["behavior"])))
    model.critic.load_state_dict(cast(critic_state(w["q0"], meta["act_dim"])))
    model.critic_target.load_state_dict(cast(critic_state(w["q0_target"], meta["act_dim"])))
    model.energy.load_state_dict(cast(energy_state(w["qt"])))
    model.configure_optimizers()
    return model


def tolerance(dtype: torch.dtype) -> dict:
    return F32 if dtype == torch.float32 else F64


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Our solver's time grid follows torch's default dtype: float64 comparisons run under float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------------- the weights themselves
def test_the_regenerated_weights_are_the_official_ones():
    checksum = golden()["weights"]["checksum"]
    for net, weights in official_weights().items():
        for name, value in weights.items():
            ref = checksum[net][name]
            ours = torch.stack([value.double().sum(), value.double().abs().sum(), value.flatten()[0].double()])
            # rtol 1e-12, not bit equality: a float64 sum's rounding depends on how many threads reduce it
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0.0,
                                       msg=f"{net}/{name}: the weight recipe no longer reproduces the recorded weights")


# --------------------------------------------------------------------------- (a) the behaviour loss
@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_behavior_loss(dtype):
    ref = golden()["behavior_loss"][key(dtype)]
    draws = ref["random_draws"]
    assert [(d["fn"], d["caller"]) for d in draws] == [("torch.rand", "loss_fn"), ("torch.randn_like", "loss_fn")]
    u, z = draws[0]["value"], draws[1]["value"]
    model = build(dtype)
    b = model.behavior
    t = u * (1 - b.t_eps) + b.t_eps
    torch.testing.assert_close(t, ref["random_t"], **tolerance(dtype))
    torch.testing.assert_close(b.sigma(t), ref["std"], **tolerance(dtype))
    x = b.log_alpha(t).exp()[:, None] * ref["a"] + b.sigma(t)[:, None] * z
    torch.testing.assert_close(x, ref["perturbed_x"], **tolerance(dtype))
    with torch.no_grad():
        torch.testing.assert_close(b.model(x, t, ref["s"]), -ref["h"], **tolerance(dtype))
        torch.testing.assert_close(b.loss(ref["s"], ref["a"], u=u, noise=z), ref["loss"], **tolerance(dtype))


# --------------------------------------------------------------------------- (d) the guided noise
@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_guided_noise_is_what_the_official_code_hands_its_solver(dtype):
    ref = golden()["guided_noise"][key(dtype)]
    model = build(dtype)
    for scale in ref["scales"]:
        out = ref["by_scale"][str(scale)]
        guided = model.guided(scale).model
        assert isinstance(guided, GuidedNoise)
        with torch.no_grad():
            eps = guided(ref["x"], ref["t"], ref["s"])
            torch.testing.assert_close(eps, out["result"], **tolerance(dtype), msg=f"guided noise, scale {scale}")
            # the official score = h / sigma_t = -eps_theta / sigma_t, and f_phi at (x, t, s)
            # (float32: the official sigma_t = sqrt(1 - exp(2 log alpha_t)) loses digits at t = 1e-3, ours uses expm1)
            score = -model.behavior.model(ref["x"], ref["t"], ref["s"]) / model.behavior.sigma(ref["t"])[:, None]
            if dtype == torch.float32:  # the official score's relative error from its sigma_t: up to ULP1 / (2 sigma_t^2)
                # (observed 1.2e-4 at t = 1e-3, against 5.4e-4 there), allowed per row on top of F32
                slack = ULP1 / model.behavior.sigma(ref["t"])[:, None] ** 2 * out["score"].abs()
                excess = ((score - out["score"]).abs() - slack).clamp_min(0)
                torch.testing.assert_close(excess, torch.zeros_like(excess), atol=F32["atol"], rtol=0.0)
            else:
                torch.testing.assert_close(score, out["score"], **F64)
            torch.testing.assert_close(model.energy(ref["x"], ref["t"], ref["s"]), out["energy"][:, 0], **tolerance(dtype))


# --------------------------------------------------------------------------- (e) sampling
def sample_tolerance(dtype: torch.dtype, x: torch.Tensor) -> dict:
    """The samples of these untrained models reach |x| ~ 600: round-off relative to the largest entry."""
    scale = x.abs().max().item()
    return dict(atol=3e-5 * scale, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-13 * scale, rtol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_first_order_sampling_equals_the_official_solver(dtype):
    """With order 1 (DDIM) the noise- and data-prediction forms are the same update: ours equals the
    official solver's in both forms, unclipped (max_action large) and clipped to the bounds (the documented
    deviation)."""
    ref = golden()["sample"][key(dtype)]
    states, official = golden()["guided_noise"][key(dtype)]["s"], ref["order1"]
    assert official["orders"] == singlestep_orders(official["steps"], 1)
    tol = sample_tolerance(dtype, official["actions"])
    with default_dtype(dtype):
        for form in ("data", "noise"):
            model = build(dtype, max_action=1e9, solver_order=1, solver_form=form, guidance_scale=official["scale"])
            torch.testing.assert_close(model.act(states, noise=official["init_x"]), official["actions"], **tol)
        bounded = build(dtype, max_action=100.0, solver_order=1, guidance_scale=official["scale"])
        clipped = official["actions"].clamp(-100.0, 100.0)
        assert (official["actions"].abs() > 100).any() and (official["actions"].abs() < 100).any()
        torch.testing.assert_close(bounded.act(states, noise=official["init_x"]), clipped, **tol)


def check_official_grid(official: dict, dtype: torch.dtype) -> None:
    """The official run's solver steps: orders [2] * 7 + [1] on the time-uniform grid 1 -> 1e-3 (ours)."""
    assert official["orders"] == [2] * 7 + [1] == singlestep_orders(official["steps"], 2, "data")
    grid = torch.linspace(1.0, 1e-3, official["steps"] + 1, dtype=dtype)
    starts = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14])
    torch.testing.assert_close(official["s"], grid[starts], **tolerance(dtype))
    torch.testing.assert_close(official["t"], grid[starts + torch.tensor([2] * 7 + [1])], **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_acting_equals_the_official_select_actions(dtype):
    """`act` with the default settings (15 steps of order 2, solver_form "data": DPM-Solver++) on the
    recorded initial draw gives the official guided actions (scale 1) to round-off (unclipped: max_action
    large)."""
    official = golden()["sample"][key(dtype)]["select_actions"]
    states = golden()["guided_noise"][key(dtype)]["s"]
    check_official_grid(official, dtype)
    with default_dtype(dtype):
        model = build(dtype, max_action=1e9)
        assert model.hparams.guidance_scale == official["scale"]
        ours = model.act(states, noise=official["init_x"])
    torch.testing.assert_close(ours, official["actions"], **sample_tolerance(dtype, official["actions"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_support_actions_equal_the_official_ones(dtype, monkeypatch):
    """`draw_support` (the production path: repeat_rows, the solver at scale 0, the (N, M, A) layout)
    on the recorded initial draw gives the official `sample(states, sample_per_state=M)`. torch.randn is
    replaced by the recorded draw for the two solver calls (support at s, then at s')."""
    official = golden()["sample"][key(dtype)]["support"]
    n, m, a = official["actions"].shape
    init_x = official["init_x"]
    calls = []

    def recorded(*shape, **kwargs):
        assert tuple(shape) == tuple(init_x.shape), shape
        calls.append(shape)
        return init_x.clone()

    with default_dtype(dtype):
        model = build(dtype, max_action=1e9, n_support=m)
        model.data_obs, model.data_next_obs = official["states"], official["states"]
        monkeypatch.setattr(torch, "randn", recorded)
        model.draw_support()
        monkeypatch.undo()
    assert len(calls) == 2
    tol = sample_tolerance(dtype, official["actions"])
    torch.testing.assert_close(model.support, official["actions"], **tol)
    torch.testing.assert_close(model.support_next, official["actions"], **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_the_noise_form_differs_from_the_official_solver(dtype):
    """solver_form "noise" (DPM-Solver, noise prediction; the paper's generic "DPM-Solver") is a real
    alternative: the same grid and orders, different second-order updates, so its samples differ from the
    official DPM-Solver++ ones (15-18 % on these untrained models, README) for acting and the support."""
    ref = golden()["sample"][key(dtype)]
    states = golden()["guided_noise"][key(dtype)]["s"]
    sup = ref["support"]
    with default_dtype(dtype):
        model = build(dtype, max_action=1e9, solver_form="noise")
        acted = model.act(states, noise=ref["select_actions"]["init_x"])
        support = model.behavior.sample(repeat_rows(sup["states"], sup["actions"].shape[1]), sup["steps"], 2,
                                        noise=sup["init_x"], form="noise")
    for ours, official in ((acted, ref["select_actions"]["actions"]), (support, sup["actions"].reshape(support.shape))):
        rel = ((ours - official).norm() / official.norm()).item()
        assert 0.05 < rel < 0.3, rel


# --------------------------------------------------------------------------- (b, c, f) the critic loop
def critic_stage(dtype: torch.dtype) -> tuple[QGPO, dict, torch.Tensor]:
    """Our QGPO in its critic stage on the file's rows, its support actions the official fake_a, fake_a_."""
    g = golden()
    d = {k: v.to(dtype) for k, v in g["data"].items()}
    # The official target computes (1 - d.float()) * 0.99 in float32 whatever the variant: its discount is
    # float32(0.99) = 0.99000000953674316, which the float64 comparison uses.
    model = build(dtype, behavior_steps=0, **({"gamma": float(torch.tensor(0.99, dtype=torch.float32))}
                                              if dtype == torch.float64 else {}))
    model.set_dataset(SimpleNamespace(obs=d["s"], act=d["a"], rew=d["r"][:, 0], next_obs=d["s_"], done=d["d"][:, 0]))
    model.data_obs, model.data_act, model.data_rew, model.data_next_obs, model.data_done = (
        d["s"], d["a"], d["r"][:, 0], d["s_"], d["d"][:, 0])  # exact, in the test's dtype
    model.support, model.support_next = d["fake_a"].clone(), d["fake_a_"].clone()
    model.support_seed.fill_(0)
    return model, d, torch.arange(len(d["s"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=key)
def test_one_critic_iteration_equals_the_official_one(dtype):
    ref = golden()["critic_step"][key(dtype)]
    tol = tolerance(dtype)
    draws = ref["random_draws"]
    assert [(x["fn"], x["caller"]) for x in draws] == [("torch.rand", "update_qt"), ("torch.randn_like", "update_qt")]
    model, d, idx = critic_stage(dtype)
    n, m, a = ref["qt"]["z"].shape
    grads: dict[int, torch.Tensor] = {}
    for opt in (model.critic_opt, model.energy_opt):
        opt.register_step_pre_hook(lambda o, args, kw: grads.update({id(p): p.grad.clone() for gr in o.param_groups
                                                                     for p in gr["params"]}))
    before = {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
              for name in ("critic", "critic_target", "energy")}

    # the in-support softmax target before the update, from the target critic
    with torch.no_grad():
        next_q = model.critic_target(repeat_rows(d["s_"], m), d["fake_a_"].reshape(-1, a)).amin(0).view(n, m)
        torch.testing.assert_close(next_q, ref["q0"]["next_energy"], **tol)
        torch.testing.assert_close(model.critic(d["s"], d["a"]), torch.stack([ref["q0"]["q1"], ref["q0"]["q2"]])[..., 0], **tol)

    model.step = 0
    metrics = model.update(Batch(d["s"], d["a"], d["r"][:, 0], d["s_"], d["d"][:, 0], idx=idx),
                           QGPODraws(energy_u=draws[0]["value"], energy_noise=draws[1]["value"].reshape(n * m, a)))
    torch.testing.assert_close(metrics["loss/critic"], ref["q0"]["q_loss"], **tol)
    torch.testing.assert_close(metrics["loss/energy"], ref["qt"]["loss"], **tol)
    # the energy stage's labels: the target critic after its Polyak step, on the support actions
    with torch.no_grad():
        q = model.critic_target(repeat_rows(d["s"], m), d["fake_a"].reshape(-1, a)).amin(0).view(n, m)
        torch.testing.assert_close(q, ref["qt"]["energy"], **tol)
        torch.testing.assert_close(torch.softmax(model.hparams.beta * q, -1), ref["qt"]["p_label"], **tol)
        t = (draws[0]["value"] * (1 - 1e-3) + 1e-3).repeat_interleave(m)
        z = draws[1]["value"].reshape(n * m, a)
        a_t = model.behavior.log_alpha(t).exp()[:, None] * d["fake_a"].reshape(-1, a) + model.behavior.sigma(t)[:, None] * z
        if dtype == torch.float32:  # the official sigma_t's float32 error (ULP1 / (2 sigma_t)) times |z|, per entry,
            # on top of F32 (observed 1.0e-6 at t = 0.0057, 0.15 of that allowance)
            slack = (z.abs() * ULP1 / model.behavior.sigma(t)[:, None]).view(n, m, a)
            excess = ((a_t.view(n, m, a) - ref["qt"]["perturbed_fake_a"]).abs() - slack).clamp_min(0)
            torch.testing.assert_close(excess, torch.zeros_like(excess), atol=F32["atol"], rtol=0.0)
        else:
            torch.testing.assert_close(a_t.view(n, m, a), ref["qt"]["perturbed_fake_a"], **tol)
    to_official = lambda st: to_official_critic(st, a)  # noqa: E731
    to_energy = lambda st: {ENERGY_OFFICIAL[k]: v for k, v in st.items() if k in ENERGY_OFFICIAL}  # noqa: E731
    critic_grads = to_official({k: grads[id(p)] for k, p in model.critic.named_parameters()})
    energy_grads = to_energy({k: grads[id(p)] for k, p in model.energy.named_parameters()})
    if dtype == torch.float64:  # the gradients, tightly, then the official float64 steps (qgpo_f64.pt)
        for ours, official in ((critic_grads, ref["q0_grad"]), (energy_grads, ref["qt_grad"])):
            top = max(v.abs().max() for v in official["grad"].values())
            for name, value in official["grad"].items():
                torch.testing.assert_close(ours[name][: len(value)], value, atol=1e-10 * top, rtol=0.0, msg=f"grad {name}")
                torch.testing.assert_close(ours[name].norm(), official["grad_norm"][name], atol=1e-15, rtol=1e-8)
        ref64 = golden64()["critic_step"]["float64"]
        torch.testing.assert_close(metrics["loss/critic"], ref64["q_loss"], **F64)
        torch.testing.assert_close(metrics["loss/energy"], ref64["energy_loss"], **F64)
        for what, params, old in (("q0", to_official(model.critic.state_dict()), to_official(before["critic"])),
                                  ("q0_target", to_official(model.critic_target.state_dict()), to_official(before["critic_target"])),
                                  ("qt", to_energy(model.energy.state_dict()), to_energy(before["energy"]))):
            check_summaries(params, ref64["after"][what], ref64["moved_abs_sum"][what], old, what)
        return

    # gradients as the optimisers saw them, and the parameters after the step (float32 only)
    def official_view(module, rename, grad=True):
        """Our module's parameters (and gradients) under the official names and layouts."""
        return rename({k: v.detach() for k, v in module.state_dict().items()}), (
            rename({k: grads[id(p)] for k, p in module.named_parameters()}) if grad else None)

    check_step(ref["q0_step"], *official_view(model.critic, to_official), "critic", 3e-4, before=to_official(before["critic"]))
    # the Polyak step: tau = 0.005 of the way to the stepped critic (the two nets' weights differ by ~0.04, so a
    # wrong rate or direction moves entries by ~2e-4, against atol 2e-7)
    check_step(ref["q0_target_after"], official_view(model.critic_target, to_official, grad=False)[0], None,
               "critic target", 3e-4, grad_ref=ref["q0_step"], before=to_official(before["critic_target"]))
    # The CEP gradient is a difference of near-equal terms (softmax(f) - p over similar candidates): in float32
    # its round-off relative to its largest entry is larger (observed 3.2e-5) than the critic's; the float64
    # variant above checks it to 1e-12.
    check_step(ref["qt_step"], *official_view(model.energy, to_energy), "energy", 3e-4, before=to_energy(before["energy"]),
               grad_atol=2e-3)


@functools.cache
def golden64() -> dict:
    """qgpo_f64.pt: the official float64 behaviour update and critic iteration (README, recording/record_qgpo.py)."""
    return torch.load(GOLDEN.with_name("qgpo_f64.pt"), weights_only=True)


F64_SUM = dict(atol=1e-9, rtol=1e-12)  # float64 sums over up to 262,144 entries: observed <= 9.1e-13 (README)
F64_STEP = dict(atol=1e-10, rtol=1e-10)  # float64 values after an Adam step (observed <= 4.2e-13, see check_summaries)


def check_summaries(params: dict[str, torch.Tensor], ref: dict, moved: dict, before: dict[str, torch.Tensor],
                    what: str) -> None:
    """float64 parameters (or gradients, `before` None) after one official float64 step, against the recording's
    summaries: the whole tensor (<= 1024 entries) or its first 2 rows at F64_STEP (Adam's first step multiplies
    a gradient's round-off by up to lr / 1e-8 = 3e4 where g ~ 0: still < 1e-11 in float64), and over every
    entry its sum, sum of |x| and sum of x_k cos(k) at F64_SUM, and the sum of |after - before|."""
    for name, summary in ref.items():
        mine = params[name].double()
        torch.testing.assert_close(mine[: len(summary["head"])], summary["head"], **F64_STEP, msg=f"{what} {name}")
        flat = mine.flatten()
        sums = {"sum": flat.sum(), "abs_sum": flat.abs().sum(),
                "dot": (flat * torch.cos(torch.arange(flat.numel(), dtype=torch.float64))).sum()}
        for kind, value in sums.items():
            torch.testing.assert_close(value.item(), summary[kind], **F64_SUM, msg=f"{what} {name}: {kind}")
        if before is not None:
            torch.testing.assert_close((mine - before[name].double()).abs().sum().item(), moved[name], **F64_SUM,
                                       msg=f"{what} {name}: sum of |after - before|")


def check_step(ref: dict, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor] | None, what: str,
               lr: float, grad_ref: dict | None = None, before: dict[str, torch.Tensor] | None = None,
               grad_atol: float = 1e-5) -> None:
    """One optimiser step against the official one (names and layouts official; `after` and `grad` hold
    whole small tensors and the first rows of large ones):
    - gradients: atol `grad_atol` (1e-5; the energy net's 2e-3, see the critic test; 50 x the measured
      1.9e-7 and 3.2e-5) of the largest entry;
      each tensor's norm to rtol 10 grad_atol, atol 1e-4 of the largest norm (a gradient that is 0 up to
      round-off, as the energy net's last bias, see below);
    - parameters after the step: atol 3e-6 (a wrong sign moves an entry by 2 lr = 2e-4 or 6e-4) where the
      official gradient is large enough for the gradient tolerance dg to move Adam's first step
      lr g / (|g| + 1e-8) by at most 1e-7 (|g| >= max(2 dg, sqrt(lr 1e-8 dg / 1e-7))), or exactly 0 (dead
      ReLU units). Below that the step turns the gradient's round-off into differences up to lr (the energy net's last bias: its gradient
      is 0 up to round-off, since the CEP loss is invariant to a constant shift of f); there, only
      |difference| < 1e-3 is checked;
    - the sum of |after - before| over every entry of each tensor (not only the stored rows): rtol 5e-2
      (observed 1e-6, the energy net's 6e-4 from its ill-posed entries, up to 6.4e-4 across settings), except for
      gradients that are 0 up to round-off. The float64 steps (qgpo_f64.pt) check these sums to 1e-12."""
    grad_ref = ref if grad_ref is None else grad_ref  # the step whose gradients moved these parameters
    top = max(v.abs().max() for v in grad_ref["grad"].values())
    top_norm = max(grad_ref["grad_norm"].values())
    zero = {name for name, norm in grad_ref["grad_norm"].items() if norm <= 1e-5 * top_norm}  # 0 up to round-off
    if grads is not None:
        for name, value in ref["grad"].items():
            if name not in zero:  # else only its norm is checked
                torch.testing.assert_close(grads[name][: len(value)], value, atol=grad_atol * top, rtol=0.0,
                                           msg=f"{what} grad {name}")
            torch.testing.assert_close(grads[name].double().norm(), ref["grad_norm"][name], atol=1e-4 * top_norm,
                                       rtol=10 * grad_atol, msg=f"{what} grad norm {name}")
    for name, value in ref["after"].items():
        ours = params[name][: len(value)]
        if name not in grad_ref["grad"]:  # no gradient (the fixed Fourier features): unchanged
            assert torch.equal(ours, value), f"{what} {name} has no gradient and must not move"
            continue
        dg = grad_atol * top  # the gradients' tolerance: Adam's first step moves by lr g / (|g| + 1e-8), whose
        # change under a gradient change dg is at most lr 1e-8 dg / g^2: at most 1e-7 where |g| >= g_min
        g_min = max(2 * dg, (lr * 1e-8 * dg / 1e-7) ** 0.5)
        g = grad_ref["grad"][name].abs()
        well_posed = (g >= g_min) | (g == 0)  # (exact zeros: ReLU units inactive on the whole batch)
        torch.testing.assert_close(ours[well_posed], value[well_posed], **PARAMS, msg=f"{what} {name} after the step")
        torch.testing.assert_close((ours - value).abs().max().item(), 0.0, atol=1e-3, rtol=0.0)  # no entry beyond 3 lr
    for name, value in ref["moved_abs_sum"].items() if before is not None else ():
        if name in zero:
            continue
        moved = (params[name].double() - before[name].double()).abs().sum()
        torch.testing.assert_close(moved, value, atol=0.0, rtol=5e-2, msg=f"{what} {name}: sum of |after - before|")


def to_official_critic(state: dict[str, torch.Tensor], act_dim: int) -> dict[str, torch.Tensor]:
    """CriticEnsemble's state (or gradients) in the official TwinQ's names and layouts."""
    out = {}
    for k in (0, 2, 4, 6):
        for h in (1, 2):
            w = state[f"net.{k}.weight"][h - 1].T
            if k == 0:
                obs_dim = w.shape[1] - act_dim
                w = torch.cat([w[:, obs_dim:], w[:, :obs_dim]], 1)
            out[f"q{h}.{k}.weight"] = w
            out[f"q{h}.{k}.bias"] = state[f"net.{k}.bias"][h - 1, 0]
    return out


ENERGY_OFFICIAL = {energy_name(k): k for k in ("qt.0.weight", "qt.0.bias", "qt.2.weight", "qt.2.bias", "qt.4.weight",
                                               "qt.4.bias", "qt.6.weight", "qt.6.bias", "qt.8.weight", "qt.8.bias",
                                               "embed.0.W", "embed.1.weight", "embed.1.bias")}


# --------------------------------------------------------------------------- (a, f) one behaviour update
def test_one_behavior_update_equals_the_official_one():
    ref = golden()["behavior_step"]
    draws = ref["random_draws"]
    assert [(x["fn"], x["caller"]) for x in draws] == [("torch.rand", "loss_fn"), ("torch.randn_like", "loss_fn")]
    model = build(torch.float32, behavior_steps=1)
    grads: dict[int, torch.Tensor] = {}
    model.behavior_opt.register_step_pre_hook(
        lambda o, args, kw: grads.update({id(p): p.grad.clone() for gr in o.param_groups for p in gr["params"]}))
    model.step = 0
    n = len(ref["s"])
    batch = Batch(ref["s"], ref["a"], torch.zeros(n), ref["s"], torch.zeros(n))
    metrics = model.update(batch, QGPODraws(behavior_u=draws[0]["value"], behavior_noise=draws[1]["value"]))
    torch.testing.assert_close(metrics["loss/behavior"], ref["loss"], **F32)
    net = model.behavior.model
    ours_grad = {k: grads[id(p)] for k, p in net.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in ours_grad.values()]))
    torch.testing.assert_close(norm, ref["total_grad_norm"], atol=0.0, rtol=5e-6)  # measured 8.4e-8
    check_step(ref, to_official_behavior(net.state_dict()), to_official_behavior(ours_grad), "behaviour", 1e-4,
               before=official_weights()["behavior"])


def test_one_behavior_update_equals_the_official_one_in_float64():
    """The official behaviour update run in float64 (qgpo_f64.pt; the draws are behavior_step's, cast)."""
    ref, ref64 = golden()["behavior_step"], golden64()["behavior_step"]["float64"]
    draws = ref["random_draws"]
    model = build(torch.float64, behavior_steps=1)
    grads: dict[int, torch.Tensor] = {}
    model.behavior_opt.register_step_pre_hook(
        lambda o, args, kw: grads.update({id(p): p.grad.clone() for gr in o.param_groups for p in gr["params"]}))
    model.step = 0
    n = len(ref["s"])
    s, a = ref["s"].double(), ref["a"].double()
    batch = Batch(s, a, torch.zeros(n, dtype=torch.float64), s, torch.zeros(n, dtype=torch.float64))
    metrics = model.update(batch, QGPODraws(behavior_u=draws[0]["value"].double(), behavior_noise=draws[1]["value"].double()))
    torch.testing.assert_close(metrics["loss/behavior"], ref64["loss"], **F64)
    net = model.behavior.model
    ours_grad = to_official_behavior({k: grads[id(p)] for k, p in net.named_parameters()})
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ours_grad.values()]))
    torch.testing.assert_close(norm, ref64["total_grad_norm"], **F64)
    check_summaries(ours_grad, ref64["grad"], {}, None, "behaviour grad")
    before = {k: v.double() for k, v in official_weights()["behavior"].items()}  # official names already
    check_summaries(to_official_behavior(net.state_dict()), ref64["after"], ref64["moved_abs_sum"], before, "behaviour")


def to_official_behavior(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ScoreNet's state (or gradients) in the official names, `last` negated back."""
    names = {behavior_name(k): k for k in official_weights()["behavior"]}
    return {names[k]: (-v if k.startswith("last.") else v).detach() for k, v in state.items() if k in names}
