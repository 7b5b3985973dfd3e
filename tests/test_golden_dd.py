"""Decision Diffuser against its official code (anuragajay/decision-diffuser @01ce528c), float64.

tests/data/golden/dd_f64.pt was written by tests/data/golden/recording/record_dd.py (how and what:
tests/data/golden/README.md, part "Decision Diffuser"). Our module gets the official initial weights, the
official run's random draws and inputs; everything goes through the production code
(algorithms/decision_diffuser.py, offbench/trajectory/cdf.py, planner_nets.py, episode windows).
Tolerances: float64 round-off, measured at most 6.3e-14 (relative) over all pieces (the README's list);
RTOL = 1e-10 leaves a factor > 1500. Values the official code writes in float32 (dataset windows, returns,
CDF outputs of float32 inputs) are compared exactly where our code computes them in float32 too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from algorithms.decision_diffuser import DecisionDiffuser, UpdateDraws
from offbench.data.sources import transitions_from_d4rl

GOLDEN = torch.load(Path(__file__).parent / "data/golden/dd_f64.pt", weights_only=True)
SETTINGS = json.loads(GOLDEN["meta"]["settings"])
RTOL = 1e-10


def close(ours: torch.Tensor, official: torch.Tensor, rtol: float = RTOL) -> None:
    """|ours - official| <= rtol * max|official| (entries near 0 are judged on the tensor's scale)."""
    assert ours.shape == official.shape, (ours.shape, official.shape)
    scale = official.double().abs().max().clamp(min=1e-300)
    err = (ours.double() - official.double()).abs().max() / scale
    assert err <= rtol, f"relative difference {err:.3e} > {rtol:g}"


def name_map(module: DecisionDiffuser) -> dict[str, str]:
    """Our parameter name -> the official one: the returns MLP and the inverse model by name, the U-Net by
    position (planner_nets.py registers its modules in the official order)."""
    official = list(GOLDEN["weights"])
    out = {}
    for k in official:
        if k.startswith("model.returns_mlp."):
            out["net.returns_mlp." + k.removeprefix("model.returns_mlp.")] = k
        elif k.startswith("inv_model."):
            out["net." + k] = k
    unet_official = [k for k in official if k.startswith("model.") and not k.startswith("model.returns_mlp.")]
    unet_ours = module.net.unet.state_dict()
    assert len(unet_official) == len(unet_ours)
    for a, b in zip(unet_official, unet_ours):
        assert GOLDEN["weights"][a].shape == unet_ours[b].shape, (a, b)
        out["net.unet." + b] = a
    return out


def build(attach: bool = True) -> DecisionDiffuser:
    g = SETTINGS
    torch.set_default_dtype(torch.float64)
    try:
        m = DecisionDiffuser(obs_dim=g["obs_dim"], act_dim=g["act_dim"], horizon=g["horizon"], n_timesteps=g["n_timesteps"],
                             dim=g["dim"], dim_mults=tuple(g["dim_mults"]), inv_hidden=g["hidden_dim"],
                             guidance_w=g["condition_guidance_w"], target_return=g["test_ret"],
                             returns_scale=g["returns_scale"], condition_dropout=g["condition_dropout"],
                             discount=g["discount"], termination_penalty=g["termination_penalty"])
    finally:
        torch.set_default_dtype(torch.float32)
    m = m.double()
    m.net.load_state_dict({ours.removeprefix("net."): GOLDEN["weights"][official].double()
                           for ours, official in name_map(m).items()})
    m.net_ema.load_state_dict(m.net.state_dict())
    if attach:
        m.attach_dataset(transitions(), g["max_path_length"])
    return m


def transitions():
    d = {k: v.numpy() for k, v in GOLDEN["data"]["d4rl"].items()}
    return transitions_from_d4rl(d["observations"], d["actions"], d["rewards"], d["terminals"], d["timeouts"])


def test_schedule():
    m, s = build(attach=False), GOLDEN["schedule"]
    close(m.sqrt_recip_abar, s["sqrt_recip_alphas_cumprod"])
    close(m.sqrt_recipm1_abar, s["sqrt_recipm1_alphas_cumprod"])
    close(m.post_coef1, s["posterior_mean_coef1"])
    close(m.post_coef2, s["posterior_mean_coef2"])
    close(m.post_std, (0.5 * s["posterior_log_variance_clipped"]).exp())
    close(m.sqrt_abar, s["alphas_cumprod"].sqrt())


def test_windows_padding_returns_and_normalisation_equal_the_official_dataset():
    """The window table equals the official SequenceDataset's items: the same (episode, start) list, windows
    [actions, states] CDF-normalised with the zero padding normalised too, returns with the -100 penalty."""
    m, d = build(), GOLDEN["data"]
    W = len(d["indices"])
    assert len(m.windows) == W
    assert torch.equal(m.windows.first // SETTINGS["max_path_length"], d["indices"][:, 0])
    assert torch.equal(m.windows.first % SETTINGS["max_path_length"], d["indices"][:, 1])
    batch = m.windows.batch(torch.arange(W))
    assert torch.equal(batch.traj, d["trajectories"].double())  # float32 values, exactly
    assert torch.equal(batch.value[:, None], d["returns"].double())
    assert (d["returns"] < -0.2).any()  # windows of terminated episodes carry the -100 penalty


@pytest.mark.parametrize("key", ["observations", "actions"])
def test_cdf_normaliser(key):
    m, c = build(), GOLDEN["cdf"][key]
    norm = m.obs_normalizer if key == "observations" else m.act_normalizer
    close(norm.normalize(c["x64"]), c["normalize64"], rtol=1e-15)
    close(norm.unnormalize(c["y64"]), c["unnormalize64"], rtol=1e-15)
    assert torch.equal(norm.normalize(c["x32"]), c["normalize32"])
    assert torch.equal(norm.unnormalize(c["y32"]), c["unnormalize32"])


def test_unet_with_returns_conditioning():
    m, u = build(attach=False), GOLDEN["unet"]
    ones, zeros = torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    with torch.no_grad():
        close(m.net.eps(u["x"], u["t"], u["returns"], ones), u["cond"])
        close(m.net.eps(u["x"], u["t"], u["returns"], zeros), u["uncond"])
        close(m.net.eps(u["x"], u["t"], u["returns"], u["mask"]), u["masked"])
    assert not torch.allclose(u["cond"], u["uncond"])  # the condition matters at these weights


def test_training_loss_and_gradients():
    m, r = build(attach=False), GOLDEN["loss"]
    a = SETTINGS["act_dim"]
    metrics = m.loss(r["x"][..., a:], r["x"][..., :a], r["returns"], UpdateDraws(t=r["t"], noise=r["noise"], keep=r["mask"]))
    close(metrics["loss/total"], r["loss"])
    close(metrics["loss/diffusion"], r["diffusion_loss"])
    close(metrics["loss/inverse"], r["inv_loss"])
    metrics["loss/total"].backward()
    params = dict(m.named_parameters())
    for ours_name, official_name in name_map(m).items():
        g, want = params[ours_name].grad, r["grads"][official_name]
        for stat, value in (("sum", g.sum()), ("abs_sum", g.abs().sum()),
                            ("dot", (g.flatten() * torch.cos(torch.arange(g.numel()).double())).sum())):
            assert abs(value - want[stat]) <= RTOL * want["abs_sum"], (official_name, stat, float(value), float(want[stat]))
        if "whole" in want:
            close(g, want["whole"])


def test_inverse_dynamics():
    m, r = build(attach=False), GOLDEN["inverse"]
    o = SETTINGS["obs_dim"]
    with torch.no_grad():
        close(m.net.inverse(r["input"][:, :o], r["input"][:, o:]), r["output"])


def test_classifier_free_guided_steps_along_the_official_chain():
    """Each reverse step from the official chain's state gives the official next state (the guidance
    w * (cond - uncond), the x0 clamp, the posterior and the 0.5-scaled noise), and the whole plan too."""
    m, r = build(attach=False), GOLDEN["sample"]
    N = SETTINGS["n_timesteps"]
    chain = r["chain"]  # (n, N + 1, H, obs): x_N inpainted, then after each step
    with torch.no_grad():
        for k in range(N):
            i = N - 1 - k
            close(m.guided_step(m.net, chain[:, k].clone(), i, r["s0"], r["noise"][k]), chain[:, k + 1])
        noise = torch.cat([r["x_N"][None], r["noise"]])
        close(m.plan(r["s0"], net=m.net, noise=noise), r["plan"])
    guidance = r["eps"] - r["eps_uncond"]
    close(guidance, SETTINGS["condition_guidance_w"] * (r["eps_cond"] - r["eps_uncond"]))
    assert (r["x_recon"].abs() >= 1).any()  # the clamp acts in this recording


def test_acting_rule():
    m, r = build(), GOLDEN["act"]
    noise = torch.cat([r["x_N"][None], r["noise"]])
    close(m.act(r["obs"], noise=noise), r["action"])
    s = m.obs_normalizer.normalize(r["obs"])
    close(m.plan(s, noise=noise), r["plan"])


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
