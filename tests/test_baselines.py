"""The classic baselines (algorithms/awr.py, iql.py, cql.py, td3bc.py): their maths on hand-computed
cases, their update cadences, the update/act contract (shapes, finiteness, no host sync), and a
small learning test on Pendulum-v1 data from a noisy swing-up controller (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.awr import AWR, advantage_weights, td_lambda_returns, trajectories
from algorithms.cql import CQL, cql_gap
from algorithms.iql import IQL, expectile_loss
from algorithms.td3bc import TD3BC
from offbench.batch import Batch, Transitions
from offbench.sac import TanhGaussianActor
from tests.test_fit import interrupted_and_resumed

REPO = Path(__file__).resolve().parents[1]
OBS, ACT, MAX_ACTION = 5, 2, 2.0


def random_batch(n: int = 16, device: str = "cpu") -> Batch:
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(n, OBS, generator=g), (torch.rand(n, ACT, generator=g) * 2 - 1) * MAX_ACTION,
        torch.randn(n, generator=g), torch.randn(n, OBS, generator=g), (torch.rand(n, generator=g) < 0.2).float(),
    )
    return Batch(*(None if x is None else x.to(device) for x in batch))


def random_transitions(lengths=(6, 4), terminal=(True, False)) -> Transitions:
    """Episodes of the given lengths, each ending in a termination or a truncation."""
    rng = np.random.default_rng(0)
    n = sum(lengths)
    episode = np.repeat(np.arange(len(lengths)), lengths)
    step = np.concatenate([np.arange(k) for k in lengths])
    done = np.zeros(n, np.float32)
    done[np.cumsum(lengths) - 1] = np.asarray(terminal, np.float32)
    rew = rng.normal(size=n).astype(np.float32)
    return Transitions(
        obs=rng.normal(size=(n, OBS)).astype(np.float32), act=rng.uniform(-MAX_ACTION, MAX_ACTION, (n, ACT)).astype(np.float32),
        rew=rew, next_obs=rng.normal(size=(n, OBS)).astype(np.float32), done=done, episode=episode, step=step,
        episode_return=np.bincount(episode, weights=rew)[episode].astype(np.float32),
    )


# Small networks keep these tests fast; each case runs both branches of its cadence within 4 updates.
CASES = {
    "td3bc": (TD3BC, {"hidden": (32, 32)}),
    "iql": (IQL, {"hidden": (32, 32)}),
    "cql": (CQL, {"hidden": (32, 32), "bc_steps": 2}),
    "cql-lagrange": (CQL, {"hidden": (32, 32), "bc_steps": 0, "with_lagrange": True}),
    "awr": (AWR, {"hidden": (32, 32), "critic_steps": 2, "actor_steps": 2}),
}


def build(name: str, device: str = "cpu", **overrides):
    torch.manual_seed(0)
    cls, kwargs = CASES[name]
    module = cls(OBS, ACT, MAX_ACTION, **{**kwargs, **overrides}).to(device)
    module.configure_optimizers()
    if isinstance(module, AWR):
        module.attach_dataset(random_transitions())
    return module


def run_updates(module, n: int, batch: Batch) -> list[dict]:
    out = []
    for _ in range(n):
        out.append(module.update(batch))
        module.step += 1  # what OfflineRLModule.training_step does after each update
    return out


# --------------------------------------------------------------------------- the update/act contract


@pytest.mark.parametrize("name", list(CASES))
def test_update_returns_finite_scalars_and_act_stays_in_bounds(name):
    module = build(name)
    keys = set()
    for metrics in run_updates(module, 4, random_batch()):
        keys |= set(metrics)
        for key, value in metrics.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0, key
            assert torch.isfinite(value), key
    assert any(k.startswith("loss/") for k in keys)
    obs = torch.randn(7, OBS) * 100  # far outside the data: actions must still be in bounds
    actions = module.act(obs)
    assert actions.shape == (7, ACT)
    assert (actions.abs() <= MAX_ACTION).all()


@pytest.mark.parametrize(
    "name",
    ["td3bc", "cql", "cql-lagrange", "awr", "iql"],
)
def test_update_never_reads_tensors_on_the_host(name):
    """On the meta device every value read (.item(), float(t), `if t:`, .numpy()) raises, so an update
    that runs there never synchronises with the device. (Optimiser step counters live on the CPU.)"""
    module = build(name, device="meta")
    for metrics in run_updates(module, 4, random_batch(device="meta")):
        assert all(v.device.type == "meta" for v in metrics.values())


# --------------------------------------------------------------------------- maths, hand-computed


def test_expectile_loss_hand_values():
    diff = torch.tensor([-2.0, 0.5, 0.0])
    # |0.7 - 1(u < 0)| u^2: 0.3 * 4, 0.7 * 0.25, 0
    assert torch.allclose(expectile_loss(diff, 0.7), torch.tensor([1.2, 0.175, 0.0]))
    assert torch.allclose(expectile_loss(diff, 0.5), 0.5 * diff**2)  # expectile 0.5 = half the squared error


def test_iql_advantage_weights_are_clipped_at_100():
    """With V = 0 and target heads Q_1 = c_1, Q_2 = c_2 everywhere, the weight is min(exp(3 min(c)), 100)."""
    for heads, expected in [((1.0, 2.0), math.exp(3.0)), ((2.0, 3.0), 100.0)]:
        module = build("iql", value_lr=0.0)
        with torch.no_grad():
            module.value[-1].weight.zero_()
            module.value[-1].bias.zero_()
            module.critic_target.net[-1].weight.zero_()
            module.critic_target.net[-1].bias.copy_(torch.tensor(heads).view(2, 1, 1))
        metrics = module.update(random_batch())
        assert metrics["adv/weight_mean"].item() == pytest.approx(expected, rel=1e-5)


def test_awr_weights_standardise_exponentiate_and_clip():
    adv = torch.tensor([-1.0, 1.0]) * 7.0 + 3.0  # standardises to (-1, 1) whatever the scale and shift
    s = 1.0 / (1.0 + 1e-5)
    assert torch.allclose(advantage_weights(adv, 1.0, 20.0), torch.tensor([math.exp(-s), math.exp(s)]), rtol=1e-4)
    # beta = 0.25: exp(4) = 54.6 is clipped to 20
    assert torch.allclose(advantage_weights(adv, 0.25, 20.0), torch.tensor([math.exp(-4 * s), 20.0]), rtol=1e-4)


def test_td_lambda_returns_on_a_terminal_and_a_truncated_episode():
    # episode 0: rows 0-2, terminates after row 2; episode 1: rows 3-4, truncated after row 4
    episode, step = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1])
    index, mask, position = trajectories(episode, step)
    assert index.tolist() == [[0, 1, 2], [3, 4, 0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    rew = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    next_v = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    done = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    layout = [torch.as_tensor(x) for x in (index, mask, position)]

    returns = td_lambda_returns(rew, next_v, done, *layout, gamma=0.5, lam=0.5)
    # G_t = r_t + gamma [(1 - lam) V(s_t+1) + lam G_t+1]; last row: r + gamma (1 - done) V(s')
    g2 = 3.0  # terminal: no bootstrap
    g1 = 2.0 + 0.5 * (0.5 * 20.0 + 0.5 * g2)  # 7.75
    g0 = 1.0 + 0.5 * (0.5 * 10.0 + 0.5 * g1)  # 5.4375
    g4 = 5.0 + 0.5 * 50.0  # truncated: bootstrap from V(s')
    g3 = 4.0 + 0.5 * (0.5 * 40.0 + 0.5 * g4)  # 21.5
    assert torch.allclose(returns, torch.tensor([g0, g1, g2, g3, g4]))
    # lambda = 0 is the one-step TD target; lambda = 1 the Monte-Carlo return (bootstrapped at truncation)
    assert torch.allclose(td_lambda_returns(rew, next_v, done, *layout, gamma=0.5, lam=0.0), rew + 0.5 * (1 - done) * next_v)
    mc = torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 4 + 0.5 * 5 + 0.25 * 50, 5 + 0.5 * 50])
    assert torch.allclose(td_lambda_returns(rew, next_v, done, *layout, gamma=0.5, lam=1.0), mc)


def test_trajectories_split_at_gaps_in_time():
    index, mask, _ = trajectories(np.array([0, 0, 0, 0]), np.array([0, 1, 5, 6]))  # a dropped step inside
    assert index[mask].tolist() == [0, 1, 2, 3] and mask.sum(1).tolist() == [2, 2]


def test_cql_gap_on_identical_q_values_and_importance_weights():
    c, m = 1.5, 10
    q = torch.full((2, 4, 3 * m), c)
    q_data = torch.full((2, 4), c)
    # identical values, no correction: logsumexp over 3m equal terms = c + log(3m)
    assert torch.allclose(cql_gap(q, torch.zeros(4, 3 * m), q_data), torch.full((2,), math.log(3 * m)))
    # importance weights for d = 3 unit-bounded actions: uniform density 0.5^3, then policy log-probs 0 and log 2
    log_density = torch.cat([torch.full((4, m), 3 * math.log(0.5)), torch.zeros(4, m), torch.full((4, m), math.log(2.0))], 1)
    expected = math.log(m * 8 + m * 1 + m * 0.5)  # sum of exp(Q - log rho) / exp(c)
    assert torch.allclose(cql_gap(q, log_density, q_data), torch.full((2,), expected))
    # temperature T: T logsumexp(Q / T) of equal values = c + T log(3m)
    assert torch.allclose(cql_gap(q, torch.zeros(4, 3 * m), q_data, temperature=2.0), torch.full((2,), 2 * math.log(3 * m)))


def test_tanh_gaussian_log_prob_is_a_density_on_the_action_interval():
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 1, max_action=2.0, hidden=(16,))
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([0.3, -0.5]))  # mean 0.3, log-std -0.5
    obs = torch.zeros(1, 3)
    actions, log_probs = actor(obs.expand(5, 3))
    assert torch.allclose(actor.log_prob(obs.expand(5, 3), actions), log_probs, atol=1e-4)
    grid = torch.linspace(-2.0, 2.0, 20001)[1:-1].unsqueeze(-1)
    density = actor.log_prob(obs.expand(len(grid), 3), grid).exp()
    assert torch.trapezoid(density, grid.squeeze(-1)).item() == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- cadences and targets


def _params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])


def test_td3bc_policy_delay_moves_actor_and_targets_every_second_update():
    module, batch = build("td3bc", policy_every=2), random_batch()
    moved = []
    for _ in range(4):
        before = {k: _params(getattr(module, k)) for k in ("actor", "actor_target", "critic", "critic_target")}
        run_updates(module, 1, batch)
        moved.append({k: not torch.equal(v, _params(getattr(module, k))) for k, v in before.items()})
    assert [m["critic"] for m in moved] == [True] * 4
    for k in ("actor", "actor_target", "critic_target"):
        assert [m[k] for m in moved] == [False, True, False, True], k  # the official total_it % 2 == 0


@pytest.mark.parametrize("name", ["iql", "cql"])
def test_critic_target_is_a_polyak_average_after_every_update(name):
    module = build(name, tau=0.25)
    target_before = _params(module.critic_target)
    run_updates(module, 1, random_batch())
    expected = 0.75 * target_before + 0.25 * _params(module.critic)
    assert torch.allclose(_params(module.critic_target), expected, atol=1e-6)


def test_awr_alternates_value_and_policy_phases_and_freezes_v_for_the_targets():
    module, batch = build("awr", critic_steps=2, actor_steps=3), random_batch()
    values, snapshots, moved = [_params(module.value)], [], []
    for _ in range(6):
        actor_before = _params(module.actor)
        run_updates(module, 1, batch)
        values.append(_params(module.value))
        snapshots.append(_params(module.value_at_refresh))
        moved.append((not torch.equal(values[-2], values[-1]), not torch.equal(actor_before, _params(module.actor))))
    # updates 0, 1 and 5 fit V; 2, 3, 4 fit the policy
    assert moved == [(True, False), (True, False), (False, True), (False, True), (False, True), (True, False)]
    # targets use V as it was when its phase began: before update 0, 2 (after the value phase) and 5
    for update, value_index in [(0, 0), (1, 0), (2, 2), (4, 2), (5, 5)]:
        assert torch.equal(snapshots[update], values[value_index]), update


def test_awr_weights_follow_the_frozen_value_function():
    module = build("awr")
    module.refresh()
    weights, returns = module.weights.clone(), module.returns.clone()
    with torch.no_grad():
        for p in module.value.parameters():
            p.add_(1.0)  # V changes, its frozen copy does not
    module._recompute()
    assert torch.equal(module.weights, weights) and torch.equal(module.returns, returns)
    assert module.weights.max() <= module.hparams.weight_clip


# --------------------------------------------------------------------------- resume through the CLI


RESUME_CASES = {
    # AWR: 40 value + 40 policy steps per iteration, so the checkpoint at update 100 falls inside a
    # value phase whose targets came from V at update 80 (kept as value_at_refresh).
    "awr": ["--model.init_args.critic_steps", "40", "--model.init_args.actor_steps", "40"],
    "iql": [],  # the actor's cosine lr schedule must resume where it was
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resumed_run_matches_uninterrupted_run(name, tiny_hopper, tmp_path):

    def args(root, *extra):
        return [
            "fit", "--config", str(REPO / f"configs/algorithms/{name}.yaml"), "--data.dataset", str(tiny_hopper),
            "--data.reward_tuning", "none", "--updates", "200", "--data.eval_every", "100", "--data.block_size", "50",
            "--data.batch_size", "32", "--model.init_args.hidden", "[32, 32]", "--eval.episodes", "1",
            "--eval.num_envs", "1", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *RESUME_CASES[name], *extra,
        ]

    full, resumed = interrupted_and_resumed(args, tmp_path)
    assert full["lr_schedulers"] == resumed["lr_schedulers"]


# --------------------------------------------------------------------------- learning on Pendulum (slow)
#
# Pendulum-v1 data from a behaviour that is poor but informative: at each step, with probability
# 1/2 a uniform random torque, otherwise an energy-pumping swing-up controller (balancing PD near the
# top) plus N(0, 1) noise. The noiseless controller returns about -180 per 200-step episode, the
# behaviour about -630, behaviour cloning of it about -530 (measured while writing this test; the
# four algorithms reached about -320 (TD3+BC), -210 (IQL), -250 (AWR) and -350 (CQL)).
# Margin: the final return (mean of the last five evaluations, 10 episodes each) must close at
# least 40% of the gap from the behaviour's mean return to the noiseless controller's, i.e. about
# -450. Cloning the behaviour does not reach that; it takes using the rewards to pick out the
# controller's actions from the random ones.
#
# Test-only settings, for a CPU budget of a few thousand updates: 64-64 networks; gamma 0.95 (the
# values settle within the budget; the swing-up takes about 100 steps); AWR's SGD policy lr 5e-4
# (official 5e-5 is tuned for ~1M updates); IQL temperature 1 (3 with 64-unit nets gives noisy
# advantages that exp(3 A) amplifies); CQL policy lr 3e-4 (the README's alternative), 1000 BC
# warm-up updates and 4 sampled actions per source (the penalty's cost grows with it).

LEARNING = {  # name: (class, settings, normalise observations, reward tuning, batch size, updates)
    "td3bc": (TD3BC, {}, True, "none", 256, 12000),
    "iql": (IQL, {"temperature": 1.0}, False, "iql_locomotion", 256, 8000),
    "awr": (AWR, {"actor_lr": 5e-4}, True, "none", 256, 8000),
    "cql": (CQL, {"actor_lr": 3e-4, "bc_steps": 1000, "num_random": 4}, False, "none", 256, 10000),
}
FINAL_EVALUATIONS, EVAL_EVERY = 5, 500  # the final return: mean over evaluations at the last 5 x 500 updates


def swing_up(obs: np.ndarray) -> float:
    """Energy pumping towards the upright energy, then a PD balance near the top (Pendulum-v1 units)."""
    cos, sin, speed = obs
    if cos > 0.85:
        return float(np.clip(-(10.0 * np.arctan2(sin, cos) + 2.0 * speed), -2.0, 2.0))
    energy = speed**2 / 6.0 + 5.0 * (cos - 1.0)  # 0 = upright at rest
    return 2.0 * np.sign(speed) if energy < 0 else -2.0 * np.sign(speed)


def pendulum_rollouts(episodes: int, p_random: float, noise: float, seed: int) -> tuple[Transitions, np.ndarray]:
    import gymnasium as gym

    env, rng = gym.make("Pendulum-v1"), np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next_obs", "done", "episode", "step")}
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, ended, t = 0.0, False, 0
        while not ended:
            a = rng.uniform(-2, 2) if rng.random() < p_random else swing_up(obs) + noise * rng.normal()
            action = np.clip(np.array([a], np.float32), -2.0, 2.0)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(rows, (obs, action, reward, next_obs, float(terminated), ep, t)):
                rows[key].append(value)
            total, obs, t, ended = total + reward, next_obs, t + 1, terminated or truncated
        returns.append(total)
    env.close()
    episode, returns = np.asarray(rows["episode"]), np.asarray(returns, np.float32)
    arrays = {k: np.asarray(v, np.float32) for k, v in rows.items() if k not in ("episode", "step")}
    return Transitions(**arrays, episode=episode, step=np.asarray(rows["step"]), episode_return=returns[episode]), returns


@pytest.fixture(scope="module")
def pendulum():
    data, behaviour = pendulum_rollouts(episodes=100, p_random=0.5, noise=1.0, seed=0)
    _, controller = pendulum_rollouts(episodes=10, p_random=0.0, noise=0.0, seed=1000)
    threshold = behaviour.mean() + 0.4 * (controller.mean() - behaviour.mean())
    return data, float(behaviour.mean()), float(threshold)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LEARNING))
def test_learns_to_beat_poor_pendulum_data(name, pendulum):
    from offbench.data.catalog import resolve
    from offbench.data.datamodule import tune_rewards
    from offbench.evaluation import evaluate

    data, behaviour_mean, threshold = pendulum
    cls, settings, normalize, tuning, batch_size, updates = LEARNING[name]
    torch.manual_seed(0)
    module = cls(3, 1, 2.0, hidden=(64, 64), gamma=0.95, **settings)
    module.configure_optimizers()
    mean = torch.as_tensor(data.obs.mean(0) if normalize else np.zeros(3), dtype=torch.float32)
    std = torch.as_tensor(data.obs.std(0) + 1e-3 if normalize else np.ones(3), dtype=torch.float32)
    norm = lambda obs: (obs - mean) / std
    tuned = tune_rewards(data, tuning)
    tensors = [torch.as_tensor(x) for x in (tuned.obs, tuned.act, tuned.rew, tuned.next_obs, tuned.done)]
    tensors[0], tensors[3] = norm(tensors[0]), norm(tensors[3])
    if isinstance(module, AWR):
        module.attach_dataset(tuned, norm)
    info = resolve("synthetic/pendulum-random-v0")  # only its evaluation env (Pendulum-v1, 200 steps)
    generator = torch.Generator().manual_seed(0)
    final = []
    for update in range(1, updates + 1):
        idx = torch.randint(len(tuned), (batch_size,), generator=generator)
        module.update(Batch(*(x[idx] for x in tensors), idx=idx))
        module.step += 1
        if update > updates - FINAL_EVALUATIONS * EVAL_EVERY and update % EVAL_EVERY == 0:
            module.eval()
            final.append(evaluate(lambda obs: module.act(norm(obs)), info, episodes=10, num_envs=10, seed=100)["return"])
            module.train()
    score = float(np.mean(final))
    print(f"{name}: final return {score:.0f} {final}, behaviour {behaviour_mean:.0f}, threshold {threshold:.0f}")
    assert score > threshold, f"{name}: final return {score:.0f} (evaluations {final}); behaviour {behaviour_mean:.0f}, needed > {threshold:.0f}"
