"""Golden tests: IDQL and EDP against values recorded by running their official JAX code.

tests/data/golden/idql.npz and edp.npz hold what the official code (philippe-eecs/IDQL and sail-sg/edp,
commits and recording settings in tests/data/golden/README.md) computed from fixed flax weights, inputs and
random draws: schedules, network outputs, losses, reverse chains, one whole update (IDQL) and the
evaluation's choice. Each test loads the flax weights into our torch modules (a Dense kernel is (in, out),
nn.Linear's weight (out, in)), passes the recorded draws through the explicit draw arguments of our
functions and compares. Tolerances: float32 round-off between XLA and torch (the README lists the observed
differences); a wrong sign, coefficient, clip or order moves the values by far more.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.idql import IDQL, UpdateDraws
from offbench.batch import Batch
from offbench.diffusion import make_betas

GOLDEN = Path(__file__).parent / "data" / "golden"
F32 = dict(atol=1e-5, rtol=1e-5)  # float32 values computed by XLA and by torch
PARAMS = dict(atol=2e-6, rtol=0.0)  # parameters after one Adam step (a wrong sign moves an entry by 3e-4 or more)


@functools.cache
def golden(name: str) -> dict[str, torch.Tensor]:
    with np.load(GOLDEN / f"{name}.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files if f[k].dtype.kind != "U"}


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


def idql_agent(g: dict, stage: str = "init") -> IDQL:
    """Our IDQL with the official weights of `stage` ("init": online = EMA, critic = target)."""
    agent = IDQL(**IDQL_SIZES)
    actor = "actor_ema" if stage == "after" else "actor"
    agent.actor.model.load_state_dict(idql_noise_state(tree(g, f"{stage}/actor")))
    agent.actor_ema.model.load_state_dict(idql_noise_state(tree(g, f"{stage}/{actor}")))
    agent.critic.load_state_dict(idql_critic_state(tree(g, f"{stage}/critic")))
    target = "critic_target" if stage == "after" else "critic"
    agent.critic_target.load_state_dict(idql_critic_state(tree(g, f"{stage}/{target}")))
    agent.value.load_state_dict(idql_value_state(tree(g, f"{stage}/value")))
    return agent


def idql_batch(g: dict) -> Batch:
    return Batch(obs=g["batch/observations"], act=g["batch/actions"], rew=g["batch/rewards"],
                 next_obs=g["batch/next_observations"], done=1.0 - g["batch/masks"])


@pytest.mark.parametrize("schedule", ["vp", "cosine"])
def test_idql_schedule(schedule):
    g = golden("idql")
    betas = make_betas(schedule, 5).float()
    torch.testing.assert_close(betas, g[f"schedule/{schedule}/betas"], atol=1e-7, rtol=1e-6)
    abar = torch.cumprod(1 - make_betas(schedule, 5), 0).float()
    torch.testing.assert_close(abar, g[f"schedule/{schedule}/alpha_hats"], atol=1e-7, rtol=1e-6)
    if schedule == "vp":  # the buffers of the policy IDQL builds
        actor = idql_agent(g).actor
        torch.testing.assert_close(actor.betas, g["schedule/vp/betas"], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(actor.sqrt_abar ** 2, g["schedule/vp/alpha_hats"], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(actor.sample_std[1:], g["schedule/vp/betas"][1:].sqrt(), atol=1e-7, rtol=1e-6)
        assert actor.sample_std[0] == 0


def test_idql_expectile_loss():
    from algorithms.iql import expectile_loss

    g = golden("idql")
    for tau in ("0.7", "0.9"):
        torch.testing.assert_close(expectile_loss(g["expectile/diff"], float(tau)), g[f"expectile/loss_{tau}"],
                                   atol=1e-7, rtol=1e-6)


def test_idql_networks():
    g = golden("idql")
    agent = idql_agent(g)
    b = idql_batch(g)
    with torch.no_grad():
        eps = agent.actor.model(b.act, g["forward/t"].long(), b.obs)
        torch.testing.assert_close(eps, g["forward/eps"], **F32)
        torch.testing.assert_close(agent.critic(b.obs, b.act), g["forward/q"], **F32)
        torch.testing.assert_close(agent.v(b.obs), g["forward/v"], **F32)


@pytest.mark.parametrize("clip", ["clip", "noclip"])
def test_idql_reverse_chain(clip):
    g = golden("idql")
    agent = idql_agent(g)
    actor, obs, noise = agent.actor_ema, g["sample/obs"], g[f"sample/{clip}/noise"]
    x_in, ts = g[f"sample/{clip}/x_in"], g[f"sample/{clip}/t"].tolist()
    assert ts == [4, 3, 2, 1, 0]
    torch.testing.assert_close(x_in[0], noise[0], atol=0, rtol=0)
    with torch.no_grad():
        for k, i in enumerate(ts):  # each step from the official x entering it
            x = actor.reverse_step(x_in[k], i, obs, noise[k + 1])
            if clip == "clip":
                x = x.clamp(-1, 1)
            want = x_in[k + 1] if k + 1 < len(ts) else g[f"sample/{clip}/action"]
            torch.testing.assert_close(x.clamp(-1, 1) if k + 1 == len(ts) else x, want, **F32, msg=f"step t={i}")
        if clip == "clip":
            torch.testing.assert_close(agent.sample_behaviour(obs, noise), g["sample/clip/action"], **F32)


def test_idql_one_update_equals_the_official_one():
    g = golden("idql")
    agent = idql_agent(g)
    agent.configure_optimizers()
    draws = UpdateDraws(bc_i=g["update/actor/t"].long(), bc_noise=g["update/actor/noise"])
    metrics = agent.update(idql_batch(g), draws)
    torch.testing.assert_close(metrics["loss/actor"], g["update/info/actor_loss"], **F32)
    torch.testing.assert_close(metrics["loss/value"], g["update/info/value_loss"], **F32)
    torch.testing.assert_close(metrics["loss/critic"], g["update/info/critic_loss"], **F32)
    torch.testing.assert_close(metrics["q/mean"], g["update/info/q"], **F32)
    with torch.no_grad():  # the TD target uses V after its own step
        torch.testing.assert_close(agent.v(g["batch/next_observations"]), g["update/critic/next_v"], **F32)
    for name, module, ours_of in [
        ("actor", agent.actor.model, idql_noise_state), ("actor_ema", agent.actor_ema.model, idql_noise_state),
        ("critic", agent.critic, idql_critic_state), ("critic_target", agent.critic_target, idql_critic_state),
        ("value", agent.value, idql_value_state),
    ]:
        # The EMA and the target move by 1e-3 and 5e-3 of the step (about 3e-7 and 1.5e-6): compared at float32
        # round-off of the weights themselves.
        tol = dict(atol=1e-7, rtol=0.0) if name in ("actor_ema", "critic_target") else PARAMS
        state = module.state_dict()
        for key, value in ours_of(tree(g, f"after/{name}")).items():
            torch.testing.assert_close(state[key], value, **tol, msg=f"{name} {key} after the update")


def test_idql_greedy_selection():
    g = golden("idql")
    agent = idql_agent(g, "after")
    with torch.no_grad():  # the official choice reads only the target critic: make the online one disagree
        agent.critic.net[-1].weight.neg_()
    state, noise = g["eval/state"][None], g["eval/noise"]
    with torch.no_grad():
        candidates = agent.sample_behaviour(state.expand(16, -1), noise)
        torch.testing.assert_close(candidates, g["eval/candidates"], **F32)
        q = agent.critic_target(state.expand(16, -1), candidates).amin(0)
        torch.testing.assert_close(q, g["eval/q"], **F32)
    assert int(q.argmax()) == int(g["eval/index"])
    torch.testing.assert_close(agent.act(state, chain=noise)[0], g["eval/action"], **F32)
