"""The DiffCPS toy bandit (offbench/toy.py): the dataset, its DataModule, the scores by hand, and a
reduced-budget run of `offbench toy` in which a diffusion policy lands on the ring and AWR does not."""

import json
import math

import numpy as np
import pytest
import torch

from offbench.cli import main
from offbench.toy import (
    CONFIGS,
    ORDER,
    BanditDataModule,
    ToyMethod,
    all_methods,
    distribution_samples,
    ring_bandit,
    score,
)


def test_ring_bandit_is_the_papers_dataset():
    t = ring_bandit(5000, noise=0.05, seed=0)
    assert t.act.shape == (5000, 2) and t.obs.shape == (5000, 1)
    assert (t.obs == 0).all() and (t.next_obs == 0).all()  # no state: one constant observation
    assert (t.rew == 1).all() and (t.done == 1).all() and (t.episode_return == 1).all()
    assert t.n_episodes == 5000 and (t.step == 0).all()  # one-step episodes, in the trajectory layout
    radius = np.linalg.norm(t.act, axis=1)
    assert abs(radius.mean() - 1.0) < 0.01 and abs(radius.std() - 0.05) < 0.005
    angle = np.arctan2(t.act[:, 1], t.act[:, 0])
    counts = np.histogram(angle, bins=8, range=(-np.pi, np.pi))[0]
    assert counts.min() > 0.8 * 5000 / 8  # uniform angle


def test_bandit_datamodule_keeps_the_offline_datamodule_contract():
    dm = BanditDataModule(n=500, batch_size=32, updates=2500, block_size=1000)
    dm.setup()
    batch = dm.sample()
    assert batch.obs.shape == (32, 1) and batch.act.shape == (32, 2)
    assert (batch.rew == 1).all() and (batch.done == 1).all()
    assert sum(dm.train_dataloader()) == 2500  # one epoch holds the whole run
    assert dm.max_action == pytest.approx(1.25)  # the ring's noisy edge stays inside the bounds
    assert np.abs(dm.transitions.act).max() < dm.max_action
    obs = torch.zeros(3, 1)
    assert torch.equal(dm.normalize_obs(obs), obs)
    state = dm.state_dict()
    first = dm.sample().act
    dm.load_state_dict(state)
    assert torch.equal(dm.sample().act, first)  # the sampler's generator is saved and restored


def test_scores_by_hand():
    data = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    actions = torch.tensor([
        [1.01, 0.0],  # 0.01 from (1, 0): on the data
        [0.0, 0.0],  # 1 from both
        [0.0, 1.02],  # 0.02 from (0, 1): on the data
        [0.7, 0.7],  # sqrt(0.09 + 0.49) = 0.76 from both
    ])
    s = score(actions, data, threshold=0.025)
    assert s["on_data"] == pytest.approx(0.5)
    radii = [1.01, 0.0, 1.02, math.sqrt(0.98)]
    assert s["radius"] == pytest.approx(sum(radii) / 4)
    assert s["radius_std"] == pytest.approx(float(np.std(radii)))
    # the two on-data actions lie at angles 0 and pi/2: two of the 36 sectors
    assert s["sectors"] == pytest.approx(2 / 36)
    assert score(actions, data, threshold=0.015)["on_data"] == pytest.approx(0.25)  # 0.02 is now too far


def test_gaussian_policies_are_also_shown_as_samples_of_their_distribution():
    dm = BanditDataModule(n=100, updates=10)
    awr = ToyMethod(name="awr", label="AWR", class_path="algorithms.awr.AWR").module(dm, 10, None)
    drawn = distribution_samples(awr, torch.zeros(4000, 1))
    # AWR's fixed std is 0.4 in units of the action bound; its mean starts near 0
    assert drawn.std(0).numpy() == pytest.approx([0.4 * 1.25] * 2, rel=0.05)
    dql = ToyMethod(name="dql", label="DQL", class_path="algorithms.diffusion_ql.DiffusionQL").module(dm, 10, 5)
    assert distribution_samples(dql, torch.zeros(4, 1)) is None  # act() already samples
    assert dql.actor.n_timesteps == 5


def test_toy_command_diffusion_policy_lands_on_the_ring_and_awr_does_not(tmp_path, capsys):
    """Reduced budget: 800 updates of a small Diffusion-QL (3 x 64 networks, T = 10, Adam 1e-2,
    batch 128; the full run's settings are in configs/toy/) against AWR's official settings. AWR's
    act() is the mean action at the centre (on data 0%); the diffusion policy's act() must put at
    least 40 points more of its actions on the data, with a mean radius near 1 (seeds 0 and 1 gave
    82% and 85% with these settings; samples spread like the Gaussian fitted to the ring score ~20%)."""
    dql = tmp_path / "dql_small.yaml"
    dql.write_text(
        "label: Diffusion-QL (small)\nsteps_arg: n_timesteps\nmodel:\n  class_path: algorithms.diffusion_ql.DiffusionQL\n"
        "  init_args: {hidden: [64, 64, 64], actor_lr: 0.01, max_grad_norm: null}\n"
    )
    out, cache = tmp_path / "toy", tmp_path / "cache"
    args = ["toy", "--methods", "awr", str(dql), "--updates", "800", "--samples", "300", "--steps", "10",
            "--batch-size", "128", "--out", str(out), "--cache", str(cache)]
    assert main(args) == 0
    result = json.loads((out / "table.json").read_text())
    rows = {(r["method"], r["actions"]): r for r in result["rows"]}
    awr = rows["awr", "act() (its Gaussian's mean)"]
    diffusion = rows["dql_small", "act()"]
    assert diffusion["T"] == 10
    assert awr["on_data"] < 0.05 and awr["radius"] < 0.2  # the mean action: the centre of the ring
    assert diffusion["on_data"] >= awr["on_data"] + 0.4
    assert 0.85 < diffusion["radius"] < 1.15
    assert ("awr", "samples of its Gaussian") in rows  # the Gaussian is shown too, labelled
    assert rows["data", "new draws"]["on_data"] > 0.9  # the threshold accepts the data distribution itself
    assert result["protocol"]["updates"] == 800 and result["protocol"]["threshold"] == 0.025
    assert (out / "toy.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "trained for 800 updates" in table and "closer than 0.025" in table

    capsys.readouterr()
    assert main(args) == 0  # a second run reuses the trained models' samples
    assert capsys.readouterr().out.count("reusing") == 2
    again = json.loads((out / "table.json").read_text())["rows"]
    assert [r["on_data"] for r in again] == [r["on_data"] for r in result["rows"]]

    capsys.readouterr()  # a model's cache key holds its own T, not the --steps list: other steps reuse AWR
    assert main([*args[:3], *args[4:8], "--steps", "7", *args[10:]]) == 0  # args without dql and T = 10
    assert capsys.readouterr().out.count("reusing") == 1


def test_default_methods_are_every_config_in_table_order(tmp_path):
    # ORDER places each of the repository's configs; a new config gets a place there deliberately
    assert sorted(ORDER) == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert all_methods(CONFIGS) == ORDER
    for name in ("zz", "bc", "aa"):
        (tmp_path / f"{name}.yaml").write_text("model:\n  class_path: algorithms.bc.BC\n")
    assert all_methods(tmp_path) == ["bc", "aa", "zz"]  # configs outside ORDER follow alphabetically



def test_shipped_table_has_every_config_of_configs_toy():
    # results/toy is one `offbench toy` run of every method: a config added later needs a rerun (`make toy`)
    result = json.loads((CONFIGS.parents[1] / "results/toy/table.json").read_text())
    assert {r["method"] for r in result["rows"]} - {"data", "gaussian_fit"} == {p.stem for p in CONFIGS.glob("*.yaml")}
    assert result["protocol"]["updates"] == 20_000 and result["protocol"]["steps"] == [5, 15, 20]
