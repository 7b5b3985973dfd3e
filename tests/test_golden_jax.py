"""Golden tests: IDQL and EDP against values recorded by running their official JAX code.

tests/data/golden/idql.npz and edp.npz (+ edp_extra.npz) hold what the official code (philippe-eecs/IDQL and
sail-sg/edp, commits and recording settings in tests/data/golden/README.md) computed in float32 from fixed flax
weights, inputs and random draws: schedules, network outputs, losses, EDP's action approximation, reverse chains
and DPM-Solver sampling, one whole update (IDQL; EDP with the TD3 and the IQL rule, and EDP's update with the EMA
policy active), IDQL's greedy choice and EDP's energy-based action selection. idql_x64.npz and edp_x64.npz hold the
same pieces computed by the official code with JAX's x64 on, from the same parameters, inputs and draws cast to
float64. Each test runs twice: float32 (our modules in float32 against the float32 recording) and float64 (our
modules built in float64 against the x64 recording). It loads the flax weights into our torch modules (a Dense
kernel is (in, out), nn.Linear's weight (out, in)), passes the recorded draws through the explicit draw arguments
of our functions and compares. Tolerances (`TOL`): a stated factor above the largest difference measured over
thread counts 1 and 2 and ATEN_CPU_CAPABILITY default/avx2/avx512 (README); a wrong sign, coefficient, clip or
order moves the values by far more. With GOLDEN_JAX_MEASURE=FILE set (the measurement only,
tests/data/golden/recording/edp_idql_spread.py), each comparison appends its largest difference, and its ratio to
the tolerance, to FILE instead of asserting.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.edp import EDP
from algorithms.edp import UpdateDraws as EDPDraws
from algorithms.idql import IDQL, UpdateDraws
from offbench.batch import Batch
from offbench.diffusion import DiffusionPolicy, make_betas

GOLDEN = Path(__file__).parent / "data" / "golden"
PRECISIONS = ("float32", "float64")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Tolerances per kind of value and precision; README "Tolerances of the JAX golden tests" gives the measured
# spreads they are set above.
TOL = {
    "float32": {  # each at least 4 x the largest difference measured (README table)
        "value": dict(atol=1e-5, rtol=1e-5),  # network outputs, losses, chains (XLA vs torch float32)
        "params": dict(atol=2e-6, rtol=0.0),  # after one Adam step (a wrong sign moves an entry by 3e-4 or more)
        "slow": dict(atol=2.4e-7, rtol=0.0),  # EMA / target weights: they move by 1e-3 .. 5e-3 of the step
        "table": dict(atol=2e-7, rtol=2e-6),  # schedules
        "norm": dict(atol=0.0, rtol=1e-5),  # clipped gradient norms
    },
    "float64": {
        "value": dict(atol=1e-10, rtol=1e-10),
        "params": dict(atol=2e-11, rtol=0.0),
        "slow": dict(atol=2e-11, rtol=0.0),
        "table": dict(atol=1e-13, rtol=4e-12),
        "norm": dict(atol=0.0, rtol=1e-11),
    },
}
MEASURE = os.environ.get("GOLDEN_JAX_MEASURE")


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, msg: str = "") -> None:
    """torch.testing.assert_close; with GOLDEN_JAX_MEASURE set, the largest |difference| is logged first."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if MEASURE:  # the measurement of the spreads (README): log, and go on to the next comparison
        err = (actual.double() - expected.double()).abs()
        ratio = err / (tol["atol"] + tol["rtol"] * expected.double().abs()).clamp(min=1e-300)
        with open(MEASURE, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "msg": msg,
                                "dtype": str(actual.dtype), "atol": tol["atol"], "rtol": tol["rtol"],
                                "diff": float(err.max()), "ratio": float(ratio.max())}) + "\n")
        return
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{msg}: {m}" if msg else m)


def _load(name: str) -> dict[str, torch.Tensor]:
    path = GOLDEN / f"{name}.npz"
    if not path.exists():
        return {}
    with np.load(path) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files if f[k].dtype.kind != "U"}


@functools.cache
def golden(name: str, precision: str = "float32") -> dict[str, torch.Tensor]:
    """The float32 recording (name.npz and name_extra.npz); float64: its inputs (parameters, batches, draws) cast
    to float64, which is exact, overlaid with the x64 recording's results (name_x64.npz)."""
    g = _load(name) | _load(f"{name}_extra")
    if precision == "float64":
        x64 = _load(f"{name}_x64")
        assert x64, f"{name}_x64.npz missing"
        g = {k: v.double() if v.is_floating_point() else v for k, v in g.items()} | x64
    return g


def built_in(dtype: torch.dtype, make):
    """make() with torch's default dtype set to `dtype` (buffers and parameters in that dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make()
    finally:
        torch.set_default_dtype(previous)


def tree(g: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The flax parameters under `prefix/`, keyed by their path below it."""
    return {k[len(prefix) + 1:]: v for k, v in g.items() if k.startswith(prefix + "/")}


# --------------------------------------------------------------------------- IDQL
IDQL_SIZES = dict(obs_dim=11, act_dim=3, hidden=(32, 32), critic_hidden=(32, 32), time_dim=16, n_timesteps=5,
                  n_candidates=16, actor_dropout=0.0, expectile=0.7, lr_decay_steps=3_000_000)


def dense(p: dict, name: str) -> dict[str, torch.Tensor]:
    return {"weight": p[f"{name}/kernel"].T.contiguous(), "bias": p[f"{name}/bias"]}


def idql_noise_state(p: dict, n_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Official DDPM (FourierFeatures, cond MLP, MLPResNet) -> LNResNetNoise."""
    state = {"time.0.w": p["FourierFeatures_0/kernel"][:, 0]}
    for ours, theirs in [("time.1", "MLP_0/Dense_0"), ("time.3", "MLP_0/Dense_1"), ("net.net.0", "MLPResNet_0/Dense_0"),
                         (f"net.net.{n_blocks + 2}", "MLPResNet_0/Dense_1")]:
        state |= {f"{ours}.{k}": v for k, v in dense(p, theirs).items()}
    for b in range(n_blocks):
        blk = f"MLPResNet_0/MLPResNetBlock_{b}"
        state[f"net.net.{b + 1}.net.1.weight"] = p[f"{blk}/LayerNorm_0/scale"]
        state[f"net.net.{b + 1}.net.1.bias"] = p[f"{blk}/LayerNorm_0/bias"]
        state |= {f"net.net.{b + 1}.net.2.{k}": v for k, v in dense(p, f"{blk}/Dense_0").items()}
        state |= {f"net.net.{b + 1}.net.4.{k}": v for k, v in dense(p, f"{blk}/Dense_1").items()}
    return state


def ensemble_state(p: dict, layers: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """A vmapped flax ensemble (kernel (n, in, out), bias (n, out)) -> CriticEnsemble's net.{0,2,...}."""
    state = {}
    for k, name in enumerate(layers):
        state[f"net.{2 * k}.weight"] = p[f"{prefix}/{name}/kernel"]
        state[f"net.{2 * k}.bias"] = p[f"{prefix}/{name}/bias"][:, None]
    return state


def idql_critic_state(p: dict) -> dict[str, torch.Tensor]:
    return ensemble_state(p, ["MLP_0/Dense_0", "MLP_0/Dense_1", "Dense_0"], "VmapStateActionValue_0")


def idql_value_state(p: dict) -> dict[str, torch.Tensor]:
    state = {"0.weight": p["MLP_0/LayerNorm_0/scale"], "0.bias": p["MLP_0/LayerNorm_0/bias"]}
    for ours, theirs in [("1.0", "MLP_0/Dense_0"), ("1.2", "MLP_0/Dense_1"), ("1.4", "OutputVDense")]:
        state |= {f"{ours}.{k}": v for k, v in dense(p, theirs).items()}
    return state


def idql_agent(g: dict, stage: str = "init", dtype: torch.dtype = torch.float32) -> IDQL:
    """Our IDQL built in `dtype` with the official weights of `stage` ("init": online actor = EMA)."""
    agent = built_in(dtype, lambda: IDQL(**IDQL_SIZES))
    actor = "actor_ema" if stage == "after" else "actor"
    agent.actor.model.load_state_dict(idql_noise_state(tree(g, f"{stage}/actor")))
    agent.actor_ema.model.load_state_dict(idql_noise_state(tree(g, f"{stage}/{actor}")))
    agent.critic.load_state_dict(idql_critic_state(tree(g, f"{stage}/critic")))
    agent.critic_target.load_state_dict(idql_critic_state(tree(g, f"{stage}/critic_target")))  # init: 0.9 x critic
    agent.value.load_state_dict(idql_value_state(tree(g, f"{stage}/value")))
    return agent


def idql_batch(g: dict) -> Batch:
    return Batch(obs=g["batch/observations"], act=g["batch/actions"], rew=g["batch/rewards"],
                 next_obs=g["batch/next_observations"], done=1.0 - g["batch/masks"])


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("schedule", ["vp", "cosine"])
def test_idql_schedule(schedule, prec):
    g, dtype, tol = golden("idql", prec), DTYPES[prec], TOL[prec]["table"]
    close(make_betas(schedule, 5).to(dtype), g[f"schedule/{schedule}/betas"], tol, "betas")
    abar = torch.cumprod(1 - make_betas(schedule, 5), 0).to(dtype)
    close(abar, g[f"schedule/{schedule}/alpha_hats"], tol, "alpha_hats")
    if schedule == "vp":  # the buffers of the policy IDQL builds
        actor = idql_agent(g, dtype=dtype).actor
        close(actor.betas, g["schedule/vp/betas"], tol, "policy betas")
        close(actor.sqrt_abar ** 2, g["schedule/vp/alpha_hats"], tol, "policy abar")
        close(actor.sample_std[1:], g["schedule/vp/betas"][1:].sqrt(), tol, "policy std")
        assert actor.sample_std[0] == 0


@pytest.mark.parametrize("prec", PRECISIONS)
def test_idql_expectile_loss(prec):
    from algorithms.iql import expectile_loss

    g = golden("idql", prec)
    for tau in ("0.7", "0.9"):
        close(expectile_loss(g["expectile/diff"], float(tau)), g[f"expectile/loss_{tau}"], TOL[prec]["table"], tau)


@pytest.mark.parametrize("prec", PRECISIONS)
def test_idql_networks(prec):
    g, tol = golden("idql", prec), TOL[prec]["value"]
    agent = idql_agent(g, dtype=DTYPES[prec])
    b = idql_batch(g)
    with torch.no_grad():
        close(agent.actor.model(b.act, g["forward/t"].long(), b.obs), g["forward/eps"], tol, "eps")
        close(agent.critic(b.obs, b.act), g["forward/q"], tol, "q")
        close(agent.v(b.obs), g["forward/v"], tol, "v")


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("clip", ["clip", "noclip"])
def test_idql_reverse_chain(clip, prec):
    g, tol = golden("idql", prec), TOL[prec]["value"]
    agent = idql_agent(g, dtype=DTYPES[prec])
    actor, obs, noise = agent.actor_ema, g["sample/obs"], g[f"sample/{clip}/noise"]
    x_in, ts = g[f"sample/{clip}/x_in"], g[f"sample/{clip}/t"].tolist()
    assert ts == [4, 3, 2, 1, 0]
    torch.testing.assert_close(x_in[0], noise[0], atol=0, rtol=0)
    x_out = [*x_in[1:], g[f"sample/{clip}/action"]]
    with torch.no_grad():
        for k, i in enumerate(ts):  # each step from the official x entering it
            close(actor.model(x_in[k], torch.full((len(obs),), i), obs), g[f"sample/{clip}/eps"][k], tol, f"eps t={i}")
            x = actor.reverse_step(x_in[k], i, obs, noise[k + 1])
            if clip == "clip" or i == 0:  # clip_sampler clips after every step; the final action is always clipped
                x = x.clamp(-1, 1)
            close(x, x_out[k], tol, f"step t={i}")
        if clip == "clip":
            close(agent.sample_behaviour(obs, noise), g["sample/clip/action"], tol, "chain")


@pytest.mark.parametrize("prec", PRECISIONS)
def test_idql_one_update_equals_the_official_one(prec):
    g, tols = golden("idql", prec), TOL[prec]
    agent = idql_agent(g, dtype=DTYPES[prec])
    agent.configure_optimizers()
    draws = UpdateDraws(bc_i=g["update/actor/t"].long(), bc_noise=g["update/actor/noise"])
    metrics = agent.update(idql_batch(g), draws)
    close(metrics["loss/actor"], g["update/info/actor_loss"], tols["value"], "actor loss")
    close(metrics["loss/value"], g["update/info/value_loss"], tols["value"], "value loss")
    close(metrics["loss/critic"], g["update/info/critic_loss"], tols["value"], "critic loss")
    close(metrics["q/mean"], g["update/info/q"], tols["value"], "q mean")
    with torch.no_grad():  # the TD target uses V after its own step
        close(agent.v(g["batch/next_observations"]), g["update/critic/next_v"], tols["value"], "next v")
    for name, module, ours_of in [
        ("actor", agent.actor.model, idql_noise_state), ("actor_ema", agent.actor_ema.model, idql_noise_state),
        ("critic", agent.critic, idql_critic_state), ("critic_target", agent.critic_target, idql_critic_state),
        ("value", agent.value, idql_value_state),
    ]:
        # The EMA and the target move by 1e-3 and 5e-3 of the step (about 3e-7 and 1.5e-6): compared at the
        # round-off of the weights themselves.
        tol = tols["slow"] if name in ("actor_ema", "critic_target") else tols["params"]
        state = module.state_dict()
        for key, value in ours_of(tree(g, f"after/{name}")).items():
            close(state[key], value, tol, f"{name} {key} after the update")


@pytest.mark.parametrize("prec", PRECISIONS)
def test_idql_greedy_selection(prec):
    g, tol = golden("idql", prec), TOL[prec]["value"]
    agent = idql_agent(g, "after", DTYPES[prec])
    with torch.no_grad():  # the official choice reads only the target critic: make the online one disagree
        agent.critic.net[-1].weight.neg_()
    state, noise = g["eval/state"][None], g["eval/noise"]
    with torch.no_grad():
        candidates = agent.sample_behaviour(state.expand(16, -1), noise)
        close(candidates, g["eval/candidates"], tol, "candidates")
        q = agent.critic_target(state.expand(16, -1), candidates).amin(0)
        close(q, g["eval/q"], tol, "q")
    assert int(q.argmax()) == int(g["eval/index"])
    close(agent.act(state, chain=noise)[0], g["eval/action"], tol, "action")


# --------------------------------------------------------------------------- EDP
EDP_K = 30


def edp_noise_state(p: dict, obs_dim: int = 11, act_dim: int = 3) -> dict[str, torch.Tensor]:
    """Official PolicyNet (input [s, a, temb], temb = TimeEmbedding of [cos, sin]) -> NoiseMLP (input
    [a, temb, s], embedding [sin, cos]): the first two layers' input columns permuted."""
    p = {k.removeprefix("params/base_net/"): v for k, v in p.items()}
    time0 = dense(p, "TimeEmbedding_0/Dense_0")
    half = time0["weight"].shape[1] // 2
    time0["weight"] = torch.cat([time0["weight"][:, half:], time0["weight"][:, :half]], 1)  # [cos, sin] -> [sin, cos]
    state = {f"time_mlp.1.{k}": v for k, v in time0.items()}
    state |= {f"time_mlp.3.{k}": v for k, v in dense(p, "TimeEmbedding_0/Dense_1").items()}
    layers = sorted({k.split("/")[0] for k in p if k.startswith("Dense_")}, key=lambda n: int(n.split("_")[1]))
    first = dense(p, layers[0])
    w = first["weight"]  # (out, obs + act + temb)
    first["weight"] = torch.cat([w[:, obs_dim:obs_dim + act_dim], w[:, obs_dim + act_dim:], w[:, :obs_dim]], 1)
    state |= {f"mid.0.{k}": v for k, v in first.items()}
    for n, name in enumerate(layers[1:-1], start=1):
        state |= {f"mid.{2 * n}.{k}": v for k, v in dense(p, name).items()}
    state |= {f"final.{k}": v for k, v in dense(p, layers[-1]).items()}
    return state


def edp_critic_state(g: dict, stage: str, names=("qf1", "qf2")) -> dict[str, torch.Tensor]:
    """Two official Critic networks (separate flax params) -> CriticEnsemble (members stacked)."""
    heads = [{k.removeprefix("params/"): v for k, v in tree(g, f"{stage}/{n}").items()} for n in names]
    state = {}
    for k in range(len(heads[0]) // 2):
        state[f"net.{2 * k}.weight"] = torch.stack([h[f"Dense_{k}/kernel"] for h in heads])
        state[f"net.{2 * k}.bias"] = torch.stack([h[f"Dense_{k}/bias"][None] for h in heads])
    return state


def official_embedding(policy) -> None:
    """The code's sinusoid frequencies, 10000^(-k / half) (NoiseMLP's are Diffusion-QL's 10000^(-k / (half - 1))),
    in the module's dtype (the float64 recording computes them in float64)."""
    emb = policy.model.time_mlp[0]
    half = emb.freqs.shape[0]
    dtype = policy.betas.dtype
    emb.freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=dtype) / half)


def edp_agent(g: dict, dtype: torch.dtype = torch.float32, stage: str = "init", **kw) -> EDP:
    agent = built_in(dtype, lambda: EDP(11, 3, hidden=(32, 32), n_timesteps=kw.pop("n_timesteps", EDP_K),
                                        sampler=kw.pop("sampler", "ddpm"), alpha=2.0, max_grad_norm=1.0, **kw))
    ema = "tgt_policy" if stage != "init" else "policy"
    for policy, name in ((agent.actor, "policy"), (agent.actor_ema, ema)):
        policy.model.load_state_dict(edp_noise_state(tree(g, f"{stage}/{name}")))
        official_embedding(policy)
    agent.critic.load_state_dict(edp_critic_state(g, stage))
    agent.critic_target.load_state_dict(edp_critic_state(g, stage, ("tgt_qf1", "tgt_qf2")))  # init: 0.9 x online
    return agent


def record_grad_norms(agent: EDP) -> dict[str, torch.Tensor]:
    """The gradient norms as each optimiser's step sees them (after clipping); the critic's per Q-network."""
    norms: dict[str, torch.Tensor] = {}

    def hook(name: str, per_member: bool):
        def record(opt, args, kwargs):
            grads = [p.grad for group in opt.param_groups for p in group["params"]]
            if per_member:
                norms[name] = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
            else:
                norms[name] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        return record

    agent.actor_opt.register_step_pre_hook(hook("policy", False))
    agent.critic_opt.register_step_pre_hook(hook("critic", True))
    if agent.value is not None:
        agent.value_opt.register_step_pre_hook(hook("value", False))
    return norms


def check_clipped_norms(norms: dict[str, torch.Tensor], m: dict[str, torch.Tensor], tol: dict, clip: float = 1.0) -> None:
    """Each optimiser saw min(official raw norm, clip): the code clips each network (each Q on its own) at `clip`.
    Policy and V are clipped by torch's clip_grad_norm_, which scales by clip / (norm + 1e-6) where optax's
    clip_by_global_norm scales by clip / norm: the clipped norm is clip * norm / (norm + 1e-6) (relative 4e-7 below
    clip here; a documented deviation, README). The critic's per-Q clipping (EDP.optimize_critic) has no 1e-6."""
    def seen(raw: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.where(raw > clip, raw * (clip / (raw + eps)), raw)

    close(norms["policy"], seen(m["policy_grad_norm"], 1e-6), tol, "policy grad norm")
    close(norms["critic"], seen(torch.stack([m["qf1_grad_norm"], m["qf2_grad_norm"]]), 0.0), tol, "critic grad norms")
    if "vf_grad" in m:
        close(norms["value"], seen(m["vf_grad"], 1e-6), tol, "value grad norm")


def edp_batch(g: dict) -> Batch:
    return Batch(obs=g["batch/observations"], act=g["batch/actions"], rew=g["batch/rewards"],
                 next_obs=g["batch/next_observations"], done=g["batch/dones"])


def td3_draws(g: dict) -> EDPDraws:
    u = float(g["update/uniform"])
    return EDPDraws(bc_i=g["update/bc_t"].long(), bc_noise=g["update/bc_noise"],
                    head=torch.tensor([0 if u > 0.5 else 1]), next_chain=g["update/next_chain"])


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("k", [EDP_K, 1000])
def test_edp_schedule(k, prec):
    g, dtype = golden("edp", prec), DTYPES[prec]
    actor = built_in(dtype, lambda: DiffusionPolicy(11, 3, 1.0, k, "linear_scaled"))
    ref = tree(g, f"schedule/{k}")
    pairs = {
        "betas": "betas", "sqrt_abar": "sqrt_alphas_cumprod", "sqrt_one_minus_abar": "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_abar": "sqrt_recip_alphas_cumprod", "sqrt_recipm1_abar": "sqrt_recipm1_alphas_cumprod",
        "post_coef_x0": "posterior_mean_coef1", "post_coef_xt": "posterior_mean_coef2", "elbo_weights": "normalized_ts_weights",
    }
    # float32: the code computes its tables in float32 (its float64 request is dropped: JAX runs without x64), ours
    # in float64 then rounded: at K = 1000, 1 - abar near step 0 loses digits in float32 (relative 1.7e-4 observed).
    tol = {"float32": dict(atol=1e-6, rtol={EDP_K: 2e-5, 1000: 7e-4}[k]), "float64": TOL["float64"]["table"]}[prec]
    for ours, theirs in pairs.items():
        close(getattr(actor, ours), ref[theirs], tol, ours)
    close(actor.sample_std[1:], ref["posterior_log_variance_clipped"][1:].mul(0.5).exp(), tol, "sample_std")
    assert actor.sample_std[0] == 0


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_networks_and_embedding(prec):
    g, tol = golden("edp", prec), TOL[prec]["value"]
    agent = edp_agent(g, DTYPES[prec])
    b = edp_batch(g)
    with torch.no_grad():
        emb = agent.actor.model.time_mlp[0](g["embedding/t"])
        half = emb.shape[1] // 2
        close(torch.cat([emb[:, half:], emb[:, :half]], 1), g["embedding/value"], tol, "embedding")
        close(agent.actor.model(b.act, g["forward/t"].long(), b.obs), g["forward/eps"], tol, "eps")
        close(agent.critic(b.obs, b.act), torch.stack([g["forward/q1"], g["forward/q2"]]), tol, "q")


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_action_approximation_and_surrogates(prec):
    g, tol = golden("edp", prec), TOL[prec]["value"]
    agent = edp_agent(g, DTYPES[prec])
    b = edp_batch(g)
    with torch.no_grad():
        terms = agent.actor.denoise(b.obs, b.act, noise=g["approx/noise"], i=g["approx/t"].long())
        close(terms.eps_pred, g["approx/eps_pred"], tol, "eps_pred")
        close(terms.a0_hat, g["approx/a0_hat"], tol, "a0_hat")
        assert (terms.a0_hat.abs() == 1).any() and (terms.a0_hat.abs() < 1).any()  # the clip is exercised
        close(terms.loss(per_sample=True), g["approx/loss"], tol, "loss")
        close(agent.actor.log_prob(terms, b.act, "gaussian"), g["approx/log_prob_gaussian"], tol, "gaussian")
        close(agent.actor.log_prob(terms, b.act, "elbo"), g["approx/log_prob_elbo"], tol, "elbo")


def check_td3_update(agent: EDP, g: dict, prefix: str, metrics_at: str, draws: EDPDraws, tols: dict,
                     policy_target: str) -> None:
    """One TD3-rule update of `agent` against the official one: parameters after it under `prefix`, metrics under
    `metrics_at`."""
    norms = record_grad_norms(agent)
    metrics = agent.update(edp_batch(g), draws)
    m = tree(g, metrics_at)
    for ours, theirs in [("loss/diffusion", "diff_loss"), ("loss/guide", "guide_loss"), ("lambda", "lmbda"),
                         ("loss/actor", "policy_loss"), ("loss/critic", "qf_loss")]:
        close(metrics[ours], m[theirs], tols["value"], ours)
    # every raw gradient norm is above max_grad_norm (1.0): the clipping of each network is exercised
    assert min(float(m["qf1_grad_norm"]), float(m["qf2_grad_norm"]), float(m["policy_grad_norm"])) > 1.0
    check_clipped_norms(norms, m, tols["norm"])
    ours_policy = agent.actor.model.state_dict()
    for key, value in edp_noise_state(tree(g, f"{prefix}/policy")).items():
        close(ours_policy[key], value, tols["params"], f"policy {key} after the update")
    for names, module, tol in [(("qf1", "qf2"), agent.critic, tols["params"]),
                               (("tgt_qf1", "tgt_qf2"), agent.critic_target, tols["slow"])]:  # target: 5e-3 of the step
        state = module.state_dict()
        for key, value in edp_critic_state(g, prefix, names).items():
            close(state[key], value, tol, f"{names[0][:-1]} {key} after the update")
    ema = agent.actor_ema.model.state_dict()
    for key, value in edp_noise_state(tree(g, f"{prefix}/tgt_policy")).items():
        if policy_target == "hold":  # the code's policy_tgt_update is off: the EMA policy holds exactly
            torch.testing.assert_close(ema[key], value, atol=0, rtol=0, msg=f"EMA policy {key} held")
        else:
            close(ema[key], value, tols["params"], f"EMA policy {key} after the update")


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_td3_update_equals_the_official_one(prec):
    g, tols = golden("edp", prec), TOL[prec]
    agent = edp_agent(g, DTYPES[prec])
    agent.configure_optimizers()
    b, draws = edp_batch(g), td3_draws(g)
    with torch.no_grad():  # the EMA policy's a' for the TD target, and the target itself
        next_action = agent.actor_ema.sample(b.next_obs, noise=draws.next_chain)
        close(next_action, g["update/next_action"], tols["value"], "next action")
        y = b.rew + 0.99 * (1 - b.done) * agent.critic_target(b.next_obs, next_action).amin(0)
        close(y, g["update/target_q"], tols["value"], "target q")
    check_td3_update(agent, g, "after", "update/metrics", draws, tols, "hold")  # update 1: before update 1000 the EMA policy holds


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("case", ["hold_1000", "hold_1004", "active_1005"])
def test_edp_ema_policy_update(case, prec):
    """The EMA policy (the code's policy target, read by the TD target's a') moves with rate 1 - 0.995 = 0.005 on
    updates 1005, 1010, ... (the code: _total_steps > 1000 and % 5 == 0) and holds otherwise. Recorded from the
    initial weights with the EMA policy at 0.9 x the online one, so that the EMA step is large (about 5e-4 of
    each weight); the target critics are 0.9 x the online ones as everywhere."""
    g, tols = golden("edp", prec), TOL[prec]
    agent = edp_agent(g, DTYPES[prec])
    agent.actor_ema.model.load_state_dict(edp_noise_state(tree(g, "ema/tgt_policy_before")))
    agent.configure_optimizers()
    agent.step = {"hold_1000": 999, "hold_1004": 1003, "active_1005": 1004}[case]  # updates done before this one
    b, draws = edp_batch(g), td3_draws(g)
    if case == "active_1005":
        with torch.no_grad():  # a' from the (0.9 x) EMA policy
            next_action = agent.actor_ema.sample(b.next_obs, noise=draws.next_chain)
            close(next_action, g[f"ema/{case}/next_action"], tols["value"], "next action")
        before = {k: v.clone() for k, v in agent.actor_ema.model.state_dict().items()}
        online = {k: v.clone() for k, v in agent.actor.model.state_dict().items()}
    check_td3_update(agent, g, f"ema/{case}", f"ema/{case}/metrics", draws, tols, "hold" if case.startswith("hold") else "ema")
    if case == "active_1005":  # the EMA step is far above the tolerance: a wrong decay cannot pass
        after = agent.actor_ema.model.state_dict()
        moved = max(float((after[k] - before[k]).abs().max()) for k in before)
        assert moved > 100 * tols["params"]["atol"] and moved > 1e-5, moved
        assert any(not torch.equal(online[k], agent.actor.model.state_dict()[k]) for k in online)


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_energy_based_action_selection(prec, monkeypatch):
    """EAS (the code's SamplerPolicy.ddpmensemble_act, 50 candidates): candidates from the ONLINE policy, scored
    by min(Q1, Q2) of the ONLINE critics, one drawn by jax.random.categorical (Gumbel-max; its uniforms are
    stored). Recorded with the agent after the TD3 update, where the EMA policy (held at init) and the target
    critics differ from the online ones, and all critics' output layers scaled by 1000 so that Q, not the Gumbel
    noise, decides; the test then also makes our EMA policy and target critics disagree more."""
    import algorithms.edp as edp_module
    from offbench.diffusion.helpers import sample_by_score

    g, tol = golden("edp", prec), TOL[prec]["value"]
    agent = edp_agent(g, DTYPES[prec], stage="act/params", n_eval_candidates=50)
    sample, pick = agent.actor.sample, edp_module.resample
    flips = 0
    for wrong in (False, True):
        if wrong:  # the official choice reads neither the targets nor the EMA policy: make them disagree
            with torch.no_grad():
                agent.critic_target.net[-1].weight.neg_()
                for p in agent.actor_ema.parameters():
                    p.mul_(-1.0)
        for s in range(4):
            state, chain, u = g[f"act/{s}/state"], g[f"act/{s}/chain"].flatten(1, 2), g[f"act/{s}/u"]  # (31, 50, 3)
            idx = int(g[f"act/{s}/index"][0])
            with torch.no_grad():
                candidates = agent.actor.sample(state.expand(50, -1), noise=chain)
                close(candidates, g[f"act/{s}/candidates"][0], tol, "candidates")
                q = agent.critic(state.expand(50, -1), candidates).amin(0)
                # Q carries the factor 1000 of the output layers (and so does its round-off): compared in units of 1000
                close(q / 1000, g[f"act/{s}/q"][0] / 1000, tol, "q / 1000")
            assert int(sample_by_score(q[None], 1, u)[0, 0]) == idx  # the Gumbel-max of the official draw
            flips += int(sample_by_score(-q[None], 1, u)[0, 0]) != idx  # Q decides (other critics, other choice)
            monkeypatch.setattr(agent.actor, "sample", functools.partial(sample, noise=chain))
            monkeypatch.setattr(edp_module, "resample", functools.partial(pick, u=u))
            action = agent.act(state)
            monkeypatch.undo()
            close(action, g[f"act/{s}/action"][0], tol, f"action of state {s}")
            close(action[0], g[f"act/{s}/candidates"][0, idx], tol, "the chosen candidate")
    assert flips == 8  # with the critics negated every choice would differ: the test sees which critics are read


def code_noise_clip(policy: DiffusionPolicy, s: torch.Tensor):
    """eps(x, t) with the code's noise clipping: the bounds from the tables at step int(N t - 1) (ours: at t).
    At some solver times N t - 1 is an integer (666 at t = 0.667); round-off puts it a few 1e-13 below or above
    (ours 665.9999999999999, the code's float64 run above), and int() then picks neighbouring table entries: the
    index is taken of N t - 1 + 1e-9 (in float32 the 1e-9 vanishes)."""
    schedule = policy.schedule

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = schedule.model_time(t)
        out = policy.model(x, step.expand(x.shape[0]), s)
        k = (step + 1e-9).to(torch.int32)
        xw, ew = policy.sqrt_recip_abar[k], policy.sqrt_recipm1_abar[k]
        return torch.clamp(out, (-1 + xw * x) / ew, (1 + xw * x) / ew)

    return eps


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_dpm_solver(prec):
    """DPM-Solver, K = 1000, 15 steps of order 3, t_end 1e-3 (the paper's sampler). The code returns its sample
    unclipped (41 of the 48 entries here lie outside [-1, 1], by up to 0.023); ours clips, so the official
    values are compared clipped. With the code's noise-clipping indices our solver gives the official sample
    (float32: 8.7e-5 observed, the code's float32 schedule tables; float64: 1e-13); with ours (the bounds at t
    itself, a documented deviation) 2.6e-3."""
    g = golden("edp", prec)
    agent = edp_agent(g, DTYPES[prec], n_timesteps=1000, sampler="dpm")
    policy, obs, x_T = agent.actor, g["dpm/obs"], g["dpm/x_T"][None]
    official = g["dpm/action"].clamp(-1, 1)
    assert (official.abs() < 1).sum() >= 5  # some entries inside the bounds, where the solver shows
    tol_ours = dict(atol=1e-2, rtol=0.0)  # bounds the documented deviation (2.6e-3 measured)
    tol_code = {"float32": dict(atol=4e-4, rtol=0.0), "float64": TOL["float64"]["value"]}[prec]
    with torch.no_grad():
        close(policy.sample(obs, noise=x_T), official, tol_ours, "ours")
        policy._dpm_eps = functools.partial(code_noise_clip, policy)
        close(policy.sample(obs, noise=x_T), official, tol_code, "code's clip indices")


def edp_value_state(p: dict) -> dict[str, torch.Tensor]:
    p = {k.removeprefix("params/"): v for k, v in p.items()}
    state = {}
    for k in range(len(p) // 2):
        state |= {f"{2 * k}.{n}": v for n, v in dense(p, f"Dense_{k}").items()}
    return state


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_iql_update_equals_the_official_one(prec):
    """The IQL rule (AntMaze): V by expectile regression on the target Qs, the policy with the new V (AWR weights
    on the Gaussian surrogate around a0_hat), Q onto the new V(s'); gradient clipping at 1.0 (active for the
    policy and both critics, not for V: raw norm 0.59). The target critics differ from the online ones."""
    g, tols = golden("edp", prec), TOL[prec]
    agent = edp_agent(g, DTYPES[prec], rule="iql")
    agent.value.load_state_dict(edp_value_state(tree(g, "init/vf")))
    agent.configure_optimizers()
    norms = record_grad_norms(agent)
    metrics = agent.update(edp_batch(g), EDPDraws(bc_i=g["iql/bc_t"].long(), bc_noise=g["iql/bc_noise"]))
    m = tree(g, "iql/metrics")
    for ours, theirs in [("loss/value", "vf_loss"), ("loss/diffusion", "diff_loss"), ("loss/guide", "guide_loss"),
                         ("loss/actor", "policy_loss")]:  # (our v/mean is V after its step, the code's vf_pred before)
        close(metrics[ours], m[theirs], tols["value"], ours)
    close(metrics["loss/critic"], m["qf1_loss"] + m["qf2_loss"], tols["value"], "critic loss")
    assert m["vf_grad"] < 1.0 < min(m["policy_grad_norm"], m["qf1_grad_norm"], m["qf2_grad_norm"])
    check_clipped_norms(norms, m, tols["norm"])
    for name, module, state_of, tol in [
        ("policy", agent.actor.model, lambda: edp_noise_state(tree(g, "iql/after/policy")), tols["params"]),
        ("vf", agent.value, lambda: edp_value_state(tree(g, "iql/after/vf")), tols["params"]),
        ("critic", agent.critic, lambda: edp_critic_state(g, "iql/after"), tols["params"]),
        ("target", agent.critic_target, lambda: edp_critic_state(g, "iql/after", ("tgt_qf1", "tgt_qf2")),
         tols["slow"]),
    ]:
        state = module.state_dict()
        for key, value in state_of().items():
            close(state[key], value, tol, f"{name} {key} after the update")


@pytest.mark.parametrize("prec", PRECISIONS)
def test_edp_crr_update_equals_the_official_one(prec, monkeypatch):
    """The CRR rule (the code's _train_step_crr with its defaults: exp weights min(exp(A), 20), A = min Q(s, a) -
    mean over 10 samples a' ~ N(a0_hat, I) of min Q(s, a'), online critics; the Gaussian surrogate), one update
    from the TD3 update's parameters, batch and draws, plus the 10 recorded samples' noise (passed in place of
    our torch.randn). The critics' output layers are the initial ones x 30 (crr/init), so that the clip at 20
    binds for some samples and not for others."""
    import algorithms.edp as edp_module

    g, tols = golden("edp", prec), TOL[prec]
    agent = edp_agent(g, DTYPES[prec], rule="crr")
    agent.critic.load_state_dict(edp_critic_state(g, "crr/init"))
    agent.critic_target.load_state_dict(edp_critic_state(g, "crr/init", ("tgt_qf1", "tgt_qf2")))
    b = edp_batch(g)
    with torch.no_grad():  # the advantages of the official rule, from our critics and the recorded samples
        a0_hat = agent.actor.denoise(b.obs, b.act, noise=g["update/bc_noise"], i=g["update/bc_t"].long()).a0_hat
        a_v = (a0_hat + g["crr/vf_noise"]).flatten(0, 1)
        v = agent.critic(b.obs.repeat(10, 1), a_v).amin(0).view(10, -1).mean(0)
        adv = agent.critic(b.obs, b.act).amin(0) - v
    assert (adv > np.log(20.0)).any() and (adv < np.log(20.0)).any()  # the weight clip is exercised
    agent.configure_optimizers()
    norms = record_grad_norms(agent)
    vf_noise = g["crr/vf_noise"]

    class RecordedRandn:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def randn(*shape, **kw):
            assert tuple(shape) == tuple(vf_noise.shape)
            return vf_noise.clone()

    monkeypatch.setattr(edp_module, "torch", RecordedRandn())
    metrics = agent.update(edp_batch(g), td3_draws(g)._replace(head=None))
    monkeypatch.undo()
    m = tree(g, "crr/metrics")
    for ours, theirs in [("loss/diffusion", "diff_loss"), ("loss/guide", "guide_loss"), ("loss/actor", "policy_loss"),
                         ("loss/critic", "qf_loss"), ("adv/weight_mean", "lmbda"), ("log_prob", "log_prob")]:
        close(metrics[ours], m[theirs], tols["value"], ours)
    assert 0.0 < float(m["lmbda"]) < 20.0  # the mean weight
    assert min(float(m["qf1_grad_norm"]), float(m["qf2_grad_norm"]), float(m["policy_grad_norm"])) > 1.0
    check_clipped_norms(norms, m, tols["norm"])
    for key, value in edp_noise_state(tree(g, "crr/after/policy")).items():
        close(agent.actor.model.state_dict()[key], value, tols["params"], f"policy {key} after the update")
    for names, module, tol in [(("qf1", "qf2"), agent.critic, tols["params"]),
                               (("tgt_qf1", "tgt_qf2"), agent.critic_target, tols["slow"])]:
        state = module.state_dict()
        last = max(int(k.split(".")[1]) for k in state)
        for key, value in edp_critic_state(g, "crr/after", names).items():
            scale = 30.0 if key.startswith(f"net.{last}.") else 1.0  # the output layer x 30, and its round-off
            close(state[key] / scale, value / scale, tol, f"{names[0][:-1]} {key} (/ {scale:g}) after the update")
