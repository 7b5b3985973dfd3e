"""Golden tests: Diffusion-QL and DiffCPS against values recorded by running their official code.

tests/data/golden/ holds, for each of the two official implementations (Zhendong-Wang/Diffusion-Policies-
for-Offline-RL and felix-thu/DiffCPS, commits in its README), the initial weights, a batch, every random
draw in the order the official code consumed it, and what the code computed from them: the noise
schedule, the denoising loss, the reverse sampling chain, one whole training update (Diffusion-QL also
with the max-Q backup) and the evaluation's choice among 50 candidates. Each test loads the official
weights into our modules, passes the recorded draws through the explicit draw arguments of our own
functions (`DiffusionPolicy.loss(noise=, i=)`, `sample(noise=)`, `UpdateDraws`, `act(chain=, u=)`) and
compares. The float64 files (`*_f64.pt`) hold the same official update run in float64 (and one at
update 1000 with the EMA actor and target critic apart from the online ones, and the evaluation choice
with a distinct target critic): they are compared to 1e-10. The float32 tolerances are about 50 times
the spread measured across thread counts and CPU kernels (README, "Tolerances"); a sign, a clip, a
coefficient or a cadence changed anywhere in an update moves a value by far more (README, "Mutation check").
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.diffcps import DiffCPS
from algorithms.diffusion_ql import DiffusionQL, UpdateDraws
from offbench.batch import Batch
from offbench.diffusion import DiffusionPolicy, repeat_rows

GOLDEN = Path(__file__).parent / "data" / "golden"
FILES = ["diffusion_ql", "diffcps"]
# float32 pieces 1-3 and the evaluation choice: 50 x the largest spread measured (README: chain 3.9e-7)
F32 = dict(atol=2e-5, rtol=1e-6)
# float64 update and choice: observed <= 4e-15 (sums over up to 65,536 entries: 6e-14). Adam's first step
# lr g / (|g| + 1e-8) multiplies a gradient's round-off by up to lr / 1e-8 = 3e4 where g ~ 0, hence 1e-10.
F64 = dict(atol=1e-10, rtol=1e-10)
F64_SUM = dict(atol=1e-9, rtol=1e-12)
# float32 update: 50 x the largest spread measured across threads (1, 2) and ATen CPU capabilities (default,
# avx2, avx512), official code and ours, against the float32 recording, rounded up (README's table); the spread
# seen on an Intel CPU (loss/q 1.5e-5 = 8 x the one measured here) passes with a margin of 6.
T32 = {
    "action": dict(atol=3e-5, rtol=0.0),  # measured 4.8e-7
    "critic_loss": dict(atol=0.0, rtol=1e-6),  # measured 0 (1e-6 of 66.6 is 9 float32 ulps)
    "bc_loss": dict(atol=0.0, rtol=1e-6),  # measured 0 (17 ulps)
    "q_loss": dict(atol=1e-4, rtol=0.0),  # measured 1.9e-6 (also the actor loss)
    "actor_grad": 7e-5,  # relative to the largest entry; measured 1.3e-6 (the grad norm: 3.8e-7, tolerance 2e-5)
    "actor_grad_norm": 2e-5,
    "critic_grad": 2e-5,  # measured 3.1e-7
    "params": dict(atol=2e-6, rtol=0.0),  # where well-posed (|g64| >= 1e-5 max|g64|); measured 3e-8
}


@functools.cache
def golden(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


# --------------------------------------------------------------------------- mapping the official weights
def eps_model_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official MLP's names (time_mlp, mid_layer, final_layer) to NoiseMLP's (time_mlp, mid, final)."""
    renamed = {k.replace("mid_layer.", "mid.").replace("final_layer.", "final."): v for k, v in official.items()}
    return {k: v.clone() for k, v in renamed.items()}


def critic_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official twin `q{1,2}_model` Sequentials (nn.Linear: weight (out, in)) to CriticEnsemble's
    batched layers (weight (2, in, out), bias (2, 1, out))."""
    state = {}
    for k in (0, 2, 4, 6):
        state[f"net.{k}.weight"] = torch.stack([official[f"q{h}_model.{k}.weight"].T for h in (1, 2)]).contiguous()
        state[f"net.{k}.bias"] = torch.stack([official[f"q{h}_model.{k}.bias"][None] for h in (1, 2)]).contiguous()
    return state


def policy(g: dict, dtype: torch.dtype = torch.float32) -> DiffusionPolicy:
    """Our DiffusionPolicy with the official initial eps-model, built in `dtype` (float64: buffers and time
    frequencies computed in float64, as the golden file's float64 variant)."""
    meta = g["meta"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        net = DiffusionPolicy(meta["obs_dim"], meta["act_dim"], meta["max_action"], meta["n_timesteps"], meta["beta_schedule"])
    finally:
        torch.set_default_dtype(previous)
    net.model.load_state_dict({k: v.to(dtype) for k, v in eps_model_state(g["weights"]["init"]["actor"]).items()})
    return net


def chain_noise(draws: list[dict]) -> torch.Tensor:
    """The draws of one reverse chain (a_T, then one normal per step) as `sample(noise=)` takes them."""
    assert [d["fn"] for d in draws] == ["torch.randn"] + ["torch.randn_like"] * (len(draws) - 1)
    return torch.stack([d["value"] for d in draws])


# --------------------------------------------------------------------------- pieces 1-3: the diffusion module
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_schedule_buffers(name, dtype):
    g = golden(name)
    ref = g["schedule"][str(dtype).removeprefix("torch.")]
    tol = F32 if dtype == torch.float32 else dict(atol=1e-12, rtol=0.0)
    net = policy(g, dtype)
    pairs = {
        "betas": "betas", "sqrt_abar": "sqrt_alphas_cumprod", "sqrt_one_minus_abar": "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_abar": "sqrt_recip_alphas_cumprod", "sqrt_recipm1_abar": "sqrt_recipm1_alphas_cumprod",
        "post_coef_x0": "posterior_mean_coef1", "post_coef_xt": "posterior_mean_coef2",
    }
    for ours, theirs in pairs.items():
        assert getattr(net, ours).dtype == dtype
        torch.testing.assert_close(getattr(net, ours), ref[theirs], **tol, msg=f"{ours} vs official {theirs}")
    # The reverse step's noise scale: exp(0.5 posterior_log_variance_clipped), and no noise at the last step.
    torch.testing.assert_close(net.sample_std[1:], ref["posterior_log_variance_clipped"][1:].mul(0.5).exp(), **tol)
    assert net.sample_std[0] == 0


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_denoising_loss(name, dtype):
    g = golden(name)
    ref = g["loss"][str(dtype).removeprefix("torch.")]
    tol = F32 if dtype == torch.float32 else dict(atol=1e-12, rtol=0.0)
    i, noise = (d["value"] for d in ref["random_draws"])
    assert [d["fn"] for d in ref["random_draws"]] == ["torch.randint", "torch.randn_like"]
    terms = policy(g, dtype).denoise(ref["state"], ref["x0"], noise=noise, i=i)
    torch.testing.assert_close(terms.eps_pred, ref["eps_pred"], **tol)
    torch.testing.assert_close(terms.loss(), ref["loss"], **tol)
    torch.testing.assert_close(policy(g, dtype).loss(ref["state"], ref["x0"], noise=noise, i=i), ref["loss"], **tol)


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_reverse_chain(name, dtype):
    g = golden(name)
    ref = g["sample"][str(dtype).removeprefix("torch.")]
    tol = F32 if dtype == torch.float32 else dict(atol=1e-12, rtol=0.0)
    net = policy(g, dtype)
    noise = chain_noise(ref["random_draws"])
    torch.testing.assert_close(noise[0], ref["x_T"], atol=0, rtol=0)
    with torch.no_grad():
        for k, i in enumerate(ref["t"].tolist()):  # each step from the official x entering it
            x_out = net.reverse_step(ref["x_in"][k], i, ref["state"], ref["noise"][k])
            torch.testing.assert_close(x_out, ref["x_out"][k], **tol, msg=f"reverse step t={i}")
        torch.testing.assert_close(net.sample(ref["state"], noise=noise), ref["action"], **tol)


# --------------------------------------------------------------------------- piece 4: one training update
def build_agent(name: str, g: dict, weights: dict, config: dict) -> DiffusionQL:
    meta = g["meta"]
    common = dict(
        max_action=meta["max_action"], actor_lr=config["actor_lr"], critic_lr=config["critic_lr"],
        max_grad_norm=config["grad_norm"], gamma=config["discount"], tau=config["tau"],
        max_q_backup=config["max_q_backup"], n_backup_actions=config["n_backup_actions"],
        n_timesteps=meta["n_timesteps"], beta_schedule=meta["beta_schedule"], ema_decay=config["ema_decay"],
        ema_start=config["step_start_ema"], ema_every=config["update_ema_every"], hidden=(meta["hidden"],) * 3,
    )
    if name == "diffcps":
        agent = DiffCPS(
            meta["obs_dim"], meta["act_dim"], kappa=config["target_kl"], lambda_init=config["LA"],
            lambda_clip=config["LA_min"], lambda_max=config["LA_max"], policy_every=config["policy_freq"],
            lambda_lr=config["lambda_lr"], **common,
        )
    else:
        agent = DiffusionQL(meta["obs_dim"], meta["act_dim"], eta=1.0, **common)
    agent.actor.model.load_state_dict(eps_model_state(weights["actor"]))
    agent.actor_ema.model.load_state_dict(eps_model_state(weights["ema_actor"] if "ema_actor" in weights else weights["actor"]))
    agent.critic.load_state_dict(critic_state(weights["critic"]))
    agent.critic_target.load_state_dict(critic_state(weights.get("critic_target", weights["critic"])))
    return agent


def record_grads(optimizer: torch.optim.Optimizer, into: dict) -> None:
    """Keep a copy of each parameter's gradient as the optimiser's step sees it (after clipping)."""
    def hook(opt, args, kwargs):
        into.update({id(p): p.grad.clone() for group in opt.param_groups for p in group["params"]})
    optimizer.register_step_pre_hook(hook)


STEPS = [("diffusion_ql", "train_step"), ("diffusion_ql", "train_step_max_q_backup"), ("diffcps", "train_step")]


def official_names(agent: DiffusionQL) -> dict[str, dict[int, tuple[str, torch.Tensor]]]:
    """For each network, id(parameter) -> (official name, how to turn our tensor into the official one)."""
    out: dict[str, dict] = {"actor": {}, "critic": {}}
    for key, p in agent.actor.model.named_parameters():
        official = key.replace("mid.", "mid_layer.").replace("final.", "final_layer.")
        out["actor"][id(p)] = [(official, lambda t: t)]
    for key, p in agent.critic.named_parameters():
        _, k, kind = key.split(".")
        out["critic"][id(p)] = [
            (f"q{h + 1}_model.{k}.{kind}", (lambda t, h=h: t[h].T) if kind == "weight" else (lambda t, h=h: t[h, 0]))
            for h in (0, 1)
        ]
    return out


def as_official(agent: DiffusionQL, module: torch.nn.Module, net: str, values: dict[int, torch.Tensor] | None = None):
    """Our parameters (or `values`, keyed by id(parameter)) of `module` under the official names and layouts."""
    names = official_names(agent)[net]
    params = dict(zip([id(p) for p in (agent.actor.model if net == "actor" else agent.critic).parameters()],
                      module.parameters()))
    out = {}
    for pid, entries in names.items():
        tensor = params[pid].detach() if values is None else values[pid]
        for official, view in entries:
            out[official] = view(tensor)
    return out


def update_draws(draws: list[dict], dtype: torch.dtype) -> UpdateDraws:
    """The official draws, in order: the EMA actor's chain for a' (1-6), the denoising loss's step and
    noise (7, 8), the online actor's chain for the Q term (9-14), the head coin (15: u > 0.5 puts Q1 in
    the numerator, our head 0)."""
    assert [d["fn"] for d in draws[6:8]] == ["torch.randint", "torch.randn_like"] and draws[14]["fn"] == "np.random.uniform"
    u = draws[14]["value"]
    return UpdateDraws(
        next_chain=chain_noise(draws[0:6]).to(dtype), bc_i=draws[6]["value"], bc_noise=draws[7]["value"].to(dtype),
        new_chain=chain_noise(draws[8:14]).to(dtype), head=torch.tensor([0 if u > 0.5 else 1]),
    )


def scaled(weights: dict[str, torch.Tensor], factor: float = 0.9) -> dict[str, torch.Tensor]:
    """factor x weights in float32: the recordings' averaged networks set apart from the online ones."""
    return {k: (factor * v).to(torch.float32) for k, v in weights.items()}


def run_update(name: str, piece: str, dtype: torch.dtype = torch.float32, step: int = 0) -> dict:
    """Our one update from the official initial weights (cast to `dtype`, exact), batch and draws, at
    update number `step`: 0, or 1000 (the file's `train_step_1000`: the EMA actor 0.9 x actor and the target
    critic 0.9 x critic, and the EMA step active). Returns the quantities under the official names (as the
    recording script's `official_train`)."""
    g = golden(name)
    ref = g[piece]
    cfg = ref["config"]
    init = ref["init"]
    if step:
        init = {"actor": init["actor"], "critic": init["critic"], "ema_actor": scaled(init["actor"]),
                "critic_target": scaled(init["critic"])}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # buffers, time frequencies and lambda in `dtype`
    try:
        agent = build_agent(name, g, init, cfg)
    finally:
        torch.set_default_dtype(previous)
    agent.configure_optimizers()
    grads: dict[int, torch.Tensor] = {}
    record_grads(agent.critic_opt, grads)
    record_grads(agent.actor_opt, grads)
    draws = update_draws(ref["random_draws"], dtype)
    assert ref["actor_update"]["numerator_head"] == int(draws.head) + 1
    b = ref["batch"]
    batch = Batch(obs=b["state"].to(dtype), act=b["action"].to(dtype), rew=b["reward"][:, 0].to(dtype),
                  next_obs=b["next_state"].to(dtype), done=1.0 - b["not_done"][:, 0].to(dtype))
    n = cfg["n_backup_actions"] if cfg["max_q_backup"] else 1
    out: dict = {}
    with torch.no_grad():  # the sampled actions before the update, from the same draws
        out["next_action"] = agent.actor_ema.sample(repeat_rows(batch.next_obs, n), noise=draws.next_chain)
        out["new_action"] = agent.actor.sample(batch.obs, noise=draws.new_chain)
    assert agent.step == cfg["step_before"] == 0
    agent.step = step
    if name == "diffcps":
        agent.lambda_opt.register_step_pre_hook(lambda opt, a, k: out.update(lambda_grad=agent.lagrange.grad.clone()))
    metrics = agent.update(batch, draws)
    out |= {
        "critic_loss": metrics["loss/critic"], "q_loss": metrics["loss/q"], "actor_loss": metrics["loss/actor"],
        "bc_loss": metrics["L_c" if name == "diffcps" else "loss/bc"], "metrics": metrics,
        "grad": {net: as_official(agent, agent.critic if net == "critic" else agent.actor.model, net, grads)
                 for net in ("actor", "critic")},
        "after": {"actor": as_official(agent, agent.actor.model, "actor"),
                  "critic": as_official(agent, agent.critic, "critic"),
                  "critic_target": as_official(agent, agent.critic_target, "critic"),
                  "ema_actor": as_official(agent, agent.actor_ema.model, "actor")},
    }
    for net in ("actor", "critic"):
        out[f"{net}_grad_norm"] = torch.linalg.vector_norm(torch.stack([v.norm() for v in out["grad"][net].values()]))
    if name == "diffcps":
        out["lambda_after"] = agent.lagrange.detach().clone()
        out["lambda_loss"] = metrics["loss/lambda"]
        out["lambda_used"] = metrics["lambda"]
    return out


@functools.cache
def golden64(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}_f64.pt", weights_only=True)


def small_grad_mask(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The recording's entries with |official float64 gradient| < 1e-5 of the network's largest (packed bits)."""
    flat = torch.from_numpy(np.unpackbits(bits.numpy())[: like.numel()].astype(bool))
    return flat.view(like.shape)


@pytest.mark.parametrize("name,piece", STEPS, ids=[f"{n}-{p}" for n, p in STEPS])
def test_one_update_equals_the_official_one(name, piece):
    """float32: our update against the official float32 recording, at the README's measured tolerances."""
    g = golden(name)
    ref = g[piece]
    cfg, critic_ref, actor_ref = ref["config"], ref["critic_update"], ref["actor_update"]
    ours = run_update(name, piece, torch.float32)

    # Before the critic step: the sampled actions, the TD target's consequences, the critic's gradients
    torch.testing.assert_close(ours["next_action"], critic_ref["next_action"], **T32["action"])
    torch.testing.assert_close(ours["new_action"], actor_ref["new_action"], **T32["action"])
    torch.testing.assert_close(ours["critic_loss"], critic_ref["critic_loss"], **T32["critic_loss"])
    torch.testing.assert_close(ours["bc_loss"], actor_ref["bc_loss"], **T32["bc_loss"])
    # After it (the actor step reads the stepped critic, whose small-gradient entries are round-off; README)
    torch.testing.assert_close(ours["q_loss"], actor_ref["q_loss"], **T32["q_loss"])
    torch.testing.assert_close(ours["actor_loss"], actor_ref["actor_loss"], **T32["q_loss"])
    if name == "diffcps":
        torch.testing.assert_close(ours["lambda_used"], actor_ref["lambda_used"], atol=0.0, rtol=0.0)
        torch.testing.assert_close(ours["lambda_loss"], actor_ref["lambda_loss"], **T32["bc_loss"])
        torch.testing.assert_close(ours["lambda_after"], ref["after"]["lambda"], atol=1e-7, rtol=0.0)
        assert ref["after"]["lambda"] > actor_ref["lambda_before"]

    # The gradients as the optimisers saw them (the critic's clipped to norm 9, the actor's below it)
    for net in ("actor", "critic"):
        official = ref["grad_subset"][net]
        scale = max(v.abs().max() for v in official.values())
        for key, value in official.items():
            torch.testing.assert_close(ours["grad"][net][key], value, atol=T32[f"{net}_grad"] * scale, rtol=0.0,
                                       msg=f"{net} gradient {key}")
    torch.testing.assert_close(ours["actor_grad_norm"], actor_ref["actor_grad_norm"], atol=0.0, rtol=T32["actor_grad_norm"])
    raw = critic_ref["critic_grad_norm"]
    assert raw > cfg["grad_norm"]  # the clip is active in every recorded step
    torch.testing.assert_close(ours["critic_grad_norm"], cfg["grad_norm"] * raw / (raw + 1e-6), atol=0.0,
                               rtol=T32["critic_grad"])

    # The parameters after the step, where the step is well-posed in float32 (README): Adam's first step
    # is lr g / (|g| + 1e-8), so an entry whose gradient is within round-off of 0 moves by an arbitrary
    # amount up to lr. Those (|g| < 1e-5 of the largest, from the official float64 run) are only bounded.
    bits = golden64(name)[piece]["float64"]["small_grad_bits"]
    after = ref["after"]
    tau = cfg["tau"]
    target = after.get("critic_target") or {k: tau * v + (1 - tau) * ref["init"]["critic"][k] for k, v in after["critic"].items()}
    for net, official in (("actor", after["actor"]), ("critic", after["critic"]), ("critic_target", target)):
        for key, value in official.items():
            small = small_grad_mask(bits["actor" if net == "actor" else "critic"][key], ref["init"]["actor" if net == "actor" else "critic"][key])[: len(value)]
            mine = ours["after"][net][key]
            torch.testing.assert_close(mine[~small], value[~small], **T32["params"], msg=f"{net} {key} after the step")
            bound = 2.1 * cfg["actor_lr"] * (tau if net == "critic_target" else 1.0)
            torch.testing.assert_close((mine[small] - value[small]).abs().max() if small.any() else mine.new_zeros(()),
                                       mine.new_zeros(()), atol=bound, rtol=0.0, msg=f"{net} {key}: small-gradient entries")
    # EMA: step 0 is before the official step_start_ema (1000): the EMA actor keeps its initial weights.
    for key, value in after["ema_actor"].items():
        torch.testing.assert_close(ours["after"]["ema_actor"][key], value, atol=0.0, rtol=0.0)


STEPS64 = STEPS + [("diffusion_ql", "train_step_1000"), ("diffcps", "train_step_1000")]


@pytest.mark.parametrize("name,piece", STEPS64, ids=[f"{n}-{p}" for n, p in STEPS64])
def test_one_update_equals_the_official_one_in_float64(name, piece):
    """float64: the official update run in float64 (README) against ours, to round-off (~1e-15 observed)."""
    ref = golden64(name)[piece]["float64"]
    ours = run_update(name, piece.replace("_1000", ""), torch.float64, step=1000 if piece.endswith("_1000") else 0)
    for key in ("next_action", "new_action", "critic_loss", "bc_loss", "q_loss", "actor_loss", "actor_grad_norm"):
        torch.testing.assert_close(ours[key], ref[key], **F64, msg=key)
    torch.testing.assert_close(ours["critic_grad_norm"], 9.0 * ref["critic_grad_norm"] / (ref["critic_grad_norm"] + 1e-6), **F64)
    assert ref["critic_grad_norm"] > 9.0  # the clip is active
    if name == "diffcps":
        for key in ("lambda_loss", "lambda_grad", "lambda_after"):
            torch.testing.assert_close(ours[key], ref[key], **F64, msg=key)
        assert ref["lambda_after"] > 1.0
    metrics = ref["metrics"]
    if name == "diffcps":
        torch.testing.assert_close(ours["bc_loss"].item(), metrics["kl_loss"], **F64)
    else:
        torch.testing.assert_close(ours["q_loss"].item(), metrics["ql_loss"], **F64)

    def check(mine: torch.Tensor, summary: dict, what: str) -> None:
        # whole (<= 1024 entries) or the first 2 rows, plus three sums over every entry
        torch.testing.assert_close(mine[: len(summary["head"])], summary["head"], **F64, msg=what)
        flat = mine.flatten()
        sums = {"sum": flat.sum(), "abs_sum": flat.abs().sum(),
                "dot": (flat * torch.cos(torch.arange(flat.numel(), dtype=torch.float64))).sum()}
        for kind, value in sums.items():
            torch.testing.assert_close(value.item(), summary[kind], **F64_SUM, msg=f"{what}: {kind}")

    for net, grads in ref["grad"].items():
        for key, summary in grads.items():
            check(ours["grad"][net][key], summary, f"{net} gradient {key}")
    for net, params in ref["after"].items():
        for key, summary in params.items():
            check(ours["after"][net][key], summary, f"{net} {key} after the step")
    if piece.endswith("_1000"):  # the EMA step moved the EMA actor (0.9 x actor towards the stepped actor)
        assert not ref["ema_unchanged"]
    else:
        assert ref["ema_unchanged"]
        for key, value in golden(name)[piece]["init"]["actor"].items():
            torch.testing.assert_close(ours["after"]["ema_actor"][key], value.double(), atol=0.0, rtol=0.0)


# --------------------------------------------------------------------------- piece 5: evaluation's choice
@pytest.mark.parametrize("name", FILES)
def test_action_selection(name):
    g = golden(name)
    ref = g["sample_action"]
    weights = ref["weights"]  # the online actor and the target critic, the two that the official choice uses
    agent = build_agent(name, g, {**weights, "critic": weights["critic_target"]}, g["train_step"]["config"])
    draws = ref["random_draws"]
    chain = chain_noise(draws[:6])
    pick = draws[6]
    assert pick["fn"] == "torch.multinomial"
    index = int(pick["value"])
    # The draw that our Gumbel-max turns into the official multinomial's index.
    u = torch.full((1, agent.hparams.n_eval_candidates), 1e-12)
    u[0, index] = 1 - 1e-7
    state = ref["state"][None]
    with torch.no_grad():
        candidates = agent.actor.sample(repeat_rows(state, 50), noise=chain)
        torch.testing.assert_close(candidates, ref["candidates"], **F32)
        q = agent.critic_target(repeat_rows(state, 50), candidates).amin(0)  # min over heads of the target critic
        torch.testing.assert_close(q, ref["q_value"], **F32)
        torch.testing.assert_close(q.softmax(0), ref["probs"], atol=2e-7, rtol=1e-6)  # measured 3e-9
    action = agent.act(state, chain=chain, u=u)
    torch.testing.assert_close(action[0], ref["action"], **F32)


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_action_selection_reads_the_target_critic(name, dtype):
    """The official choice with critic_target = 0.9 x critic (`sample_action_t09`), and an online critic whose
    own choice differs: the candidates, the target's Q and probabilities, the recorded multinomial draw, and
    with no Gumbel noise (u = exp(-1): -log(-log u) = 0) the choice is the argmax of min_j Q'_j."""
    g, ref = golden(name), golden64(name)["sample_action_t09"]
    rec = ref[str(dtype).removeprefix("torch.")]
    tol = F32 if dtype == torch.float32 else F64
    online = dict(g["sample_action"]["weights"]["critic_target"])  # what the official online critic held
    online["q1_model.6.weight"], online["q2_model.6.weight"] = -online["q1_model.6.weight"], -online["q2_model.6.weight"]
    weights = {"actor": g["sample_action"]["weights"]["actor"], "critic": online, "critic_target": ref["critic_target"]}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        agent = build_agent(name, g, weights, g["train_step"]["config"])
    finally:
        torch.set_default_dtype(previous)
    draws = ref["random_draws"]
    chain = chain_noise(draws[:6]).to(dtype)
    state = ref["state"][None].to(dtype)
    n = agent.hparams.n_eval_candidates
    with torch.no_grad():
        candidates = agent.actor.sample(repeat_rows(state, n), noise=chain)
        torch.testing.assert_close(candidates, rec["candidates"], **tol)
        q_target = agent.critic_target(repeat_rows(state, n), candidates)
        torch.testing.assert_close(q_target.amin(0), rec["q_value"], **tol)
        torch.testing.assert_close(q_target.amin(0).softmax(0), rec["probs"], **tol)
        q_online = agent.critic(repeat_rows(state, n), candidates).amin(0)
    best = int(rec["q_value"].argmax())
    # The setting tells the choices apart: online critic, max instead of min over the heads, a single head
    assert int(q_online.argmax()) != best
    assert int(torch.maximum(rec["q1"], rec["q2"]).argmax()) != best
    assert int(rec["q1"].argmax()) != best or int(rec["q2"].argmax()) != best
    top2 = rec["q_value"].topk(2).values
    assert top2[0] - top2[1] > 10 * tol["atol"]  # round-off cannot reorder the best two (gap 1.1e-3, 5.1e-4)
    action = agent.act(state, chain=chain, u=torch.full((1, n), math.exp(-1.0), dtype=dtype))
    torch.testing.assert_close(action[0], rec["candidates"][best], **tol)
    # The recorded multinomial draw (probabilities near uniform here: Q varies by ~0.03 over the candidates)
    index = int(draws[6]["value"])
    u = torch.full((1, n), 1e-12, dtype=dtype)
    u[0, index] = 1 - 1e-7
    torch.testing.assert_close(agent.act(state, chain=chain, u=u)[0], rec["action"].to(dtype), **tol)
