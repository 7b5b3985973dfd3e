"""Golden tests: Diffusion-QL and DiffCPS against values recorded by running their official code.

tests/data/golden/ holds, for each of the two official implementations (Zhendong-Wang/Diffusion-Policies-
for-Offline-RL and felix-thu/DiffCPS, commits in its README), the initial weights, a batch, every random
draw in the order the official code consumed it, and what the code computed from them: the noise
schedule, the denoising loss, the reverse sampling chain, one whole training update (Diffusion-QL also
with the max-Q backup) and the evaluation's choice among 50 candidates. Each test loads the official
weights into our modules, passes the recorded draws through the explicit draw arguments of our own
functions (`DiffusionPolicy.loss(noise=, i=)`, `sample(noise=)`, `UpdateDraws`, `act(chain=, u=)`) and
compares. Tolerances are float32 round-off (the README's table lists the differences observed); a
sign, a clip, a coefficient or a cadence changed anywhere in an update moves a value by far more.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from algorithms.diffcps import DiffCPS
from algorithms.diffusion_ql import DiffusionQL, UpdateDraws
from offbench.batch import Batch
from offbench.diffusion import DiffusionPolicy, repeat_rows

GOLDEN = Path(__file__).parent / "data" / "golden"
FILES = ["diffusion_ql", "diffcps"]
F32 = dict(atol=1e-6, rtol=1e-6)  # float32 pieces
PARAMS = dict(atol=2e-6, rtol=0.0)  # parameters after one Adam step (a wrong sign moves an entry by 3e-4 or more)


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


@pytest.mark.parametrize("name,piece", STEPS, ids=[f"{n}-{p}" for n, p in STEPS])
def test_one_update_equals_the_official_one(name, piece):
    g = golden(name)
    ref = g[piece]
    cfg, batch_ref, draws = ref["config"], ref["batch"], ref["random_draws"]
    critic_ref, actor_ref = ref["critic_update"], ref["actor_update"]
    agent = build_agent(name, g, ref["init"], cfg)
    agent.configure_optimizers()
    grads: dict[int, torch.Tensor] = {}
    record_grads(agent.critic_opt, grads)
    record_grads(agent.actor_opt, grads)

    # The official draws, in order: the EMA actor's chain for a' (1-6), the denoising loss's step and
    # noise (7, 8), the online actor's chain for the Q term (9-14), the head coin (15: u > 0.5 puts Q1
    # in the numerator, our head 0).
    assert [d["fn"] for d in draws[6:8]] == ["torch.randint", "torch.randn_like"] and draws[14]["fn"] == "np.random.uniform"
    u = draws[14]["value"]
    assert actor_ref["numerator_head"] == (1 if u > 0.5 else 2)
    update_draws = UpdateDraws(
        next_chain=chain_noise(draws[0:6]), bc_i=draws[6]["value"], bc_noise=draws[7]["value"],
        new_chain=chain_noise(draws[8:14]), head=torch.tensor([0 if u > 0.5 else 1]),
    )
    batch = Batch(
        obs=batch_ref["state"], act=batch_ref["action"], rew=batch_ref["reward"][:, 0],
        next_obs=batch_ref["next_state"], done=1.0 - batch_ref["not_done"][:, 0],
    )
    n = cfg["n_backup_actions"] if cfg["max_q_backup"] else 1
    with torch.no_grad():  # the sampled actions before the update, from the same draws
        torch.testing.assert_close(
            agent.actor_ema.sample(repeat_rows(batch.next_obs, n), noise=update_draws.next_chain),
            critic_ref["next_action"], **F32)
        torch.testing.assert_close(agent.actor.sample(batch.obs, noise=update_draws.new_chain), actor_ref["new_action"], **F32)

    assert agent.step == cfg["step_before"] == 0
    metrics = agent.update(batch, update_draws)

    # The losses
    torch.testing.assert_close(metrics["loss/critic"], critic_ref["critic_loss"], **F32)
    torch.testing.assert_close(metrics["loss/q"], actor_ref["q_loss"], **F32)
    torch.testing.assert_close(metrics["loss/actor"], actor_ref["actor_loss"], **F32)
    if name == "diffcps":
        torch.testing.assert_close(metrics["L_c"], actor_ref["bc_loss"], **F32)
        torch.testing.assert_close(metrics["lambda"], actor_ref["lambda_used"], **F32)
        torch.testing.assert_close(metrics["loss/lambda"], actor_ref["lambda_loss"], **F32)
    else:
        torch.testing.assert_close(metrics["loss/bc"], actor_ref["bc_loss"], **F32)

    # The gradients as the optimisers saw them (the critic's clipped to norm 9, the actor's below it)
    def check_grads(module: torch.nn.Module, official: dict[str, torch.Tensor], ours_of) -> None:
        scale = max(v.abs().max() for v in official.values())
        for key, value in official.items():
            torch.testing.assert_close(ours_of(module, key), value, atol=2e-6 * scale, rtol=0.0, msg=f"gradient {key}")

    def actor_grad(actor, key):
        name_ = key.replace("mid_layer.", "mid.").replace("final_layer.", "final.")
        return grads[id(actor.model.get_parameter(name_))]

    def critic_grad(critic, key):
        head, k, kind = int(key[1]) - 1, key.split(".")[1], key.split(".")[2]
        grad = grads[id(critic.get_parameter(f"net.{k}.{kind}"))][head]
        return grad.T if kind == "weight" else grad[0]

    check_grads(agent.actor, ref["grad_subset"]["actor"], actor_grad)
    check_grads(agent.critic, ref["grad_subset"]["critic"], critic_grad)
    actor_norm = torch.linalg.vector_norm(torch.stack([grads[id(p)].norm() for p in agent.actor.parameters()]))
    torch.testing.assert_close(actor_norm, actor_ref["actor_grad_norm"], atol=0.0, rtol=2e-6)
    critic_norm = torch.linalg.vector_norm(torch.stack([grads[id(p)].norm() for p in agent.critic.parameters()]))
    raw = critic_ref["critic_grad_norm"]
    assert raw > cfg["grad_norm"]  # the clip is active in every recorded step
    torch.testing.assert_close(critic_norm, cfg["grad_norm"] * raw / (raw + 1e-6), atol=0.0, rtol=2e-6)

    # The parameters after the step
    after = ref["after"]
    ours_actor = eps_model_state(dict(agent.actor.model.state_dict()))
    for key, value in eps_model_state(after["actor"]).items():
        torch.testing.assert_close(ours_actor[key], value, **PARAMS, msg=f"actor {key} after the step")
    for key, value in critic_state(after["critic"]).items():
        torch.testing.assert_close(agent.critic.state_dict()[key], value, **PARAMS, msg=f"critic {key} after the step")
    # EMA: step 0 is before the official step_start_ema (1000): the EMA actor keeps its initial weights.
    for key, value in eps_model_state(after["ema_actor"]).items():
        torch.testing.assert_close(agent.actor_ema.model.state_dict()[key], value, atol=0.0, rtol=0.0)
    # Target critic: one Polyak step, tau = 0.005 (DiffCPS stores it; for Diffusion-QL it is derived, bit-exactly).
    tau = cfg["tau"]
    target = after.get("critic_target") or {
        k: tau * v + (1 - tau) * ref["init"]["critic"][k] for k, v in after["critic"].items()
    }
    for key, value in critic_state(target).items():
        torch.testing.assert_close(agent.critic_target.state_dict()[key], value, **PARAMS, msg=f"critic target {key}")
    if name == "diffcps":  # the dual step: lambda rises by lambda_lr while L_c > kappa
        torch.testing.assert_close(agent.lagrange.detach(), after["lambda"], atol=1e-7, rtol=0.0)
        assert after["lambda"] > actor_ref["lambda_before"]


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
        torch.testing.assert_close(q.softmax(0), ref["probs"], atol=1e-7, rtol=1e-6)
    action = agent.act(state, chain=chain, u=u)
    torch.testing.assert_close(action[0], ref["action"], **F32)
