"""SfBC: the in-sample planning recursion on a hand-made two-episode dataset, the stage schedule of
`update` (behaviour, critic rounds, planning with a critic reset), V(s) and action selection."""

import numpy as np
import pytest
import torch
from torch import nn

from algorithms.sfbc import SfBC, plan_returns
from offbench.batch import Batch, Transitions

OBS, ACT = 3, 2


def two_episodes() -> Transitions:
    """Episode 0: rewards 1, 2, 3, terminated. Episode 1: rewards 1, 1, cut by a timeout (not done)."""
    rew = np.array([1, 2, 3, 1, 1], np.float32)
    episode = np.array([0, 0, 0, 1, 1])
    obs = np.arange(5 * OBS, dtype=np.float32).reshape(5, OBS)
    return Transitions(
        obs=obs, act=np.zeros((5, ACT), np.float32), rew=rew, next_obs=obs + 100, done=np.array([0, 0, 1, 0, 0], np.float32),
        episode=episode, step=np.array([0, 1, 2, 0, 1]), episode_return=np.array([6, 6, 6, 2, 2], np.float32),
    )


def make(**kwargs) -> SfBC:
    torch.manual_seed(0)
    kwargs = {"solver_steps": 3, "n_planning_candidates": 4, "n_eval_candidates": 6, **kwargs}
    model = SfBC(OBS, ACT, **kwargs)
    model.configure_optimizers()
    return model


class FirstActionDim(nn.Module):
    """A fake critic: Q(s, a) = a[0], shaped (1, B) like CriticEnsemble."""

    def forward(self, obs, act):
        return act[None, :, 0]


def test_monte_carlo_returns_of_round_zero():
    model = make(gamma=0.5)
    model.set_dataset(two_episodes())
    # episode 0: R2 = 3, R1 = 2 + 3/2, R0 = 1 + 3.5/2;  episode 1: 0 after its last row
    assert torch.allclose(model.returns, torch.tensor([2.75, 3.5, 3.0, 1.5, 1.0]))
    assert model.ret_mean.item() == pytest.approx(11.75 / 5)
    assert model.ret_std.item() == pytest.approx(float(np.std([2.75, 3.5, 3.0, 1.5, 1.0])))


def test_in_sample_planning_recursion_by_hand():
    model = make(gamma=0.5)
    model.set_dataset(two_episodes())
    # paper: R_t = r_t + gamma (1 - d_t) max(R_{t+1}, V(s_{t+1})), V alone after the timeout
    v_next = torch.tensor([4.0, 1.0, 100.0, 0.0, 10.0])
    # ep 0: R2 = 3 (terminal: V ignored), R1 = 2 + max(3, 1)/2 = 3.5, R0 = 1 + max(3.5, 4)/2 = 3
    # ep 1: R1 = 1 + 10/2 = 6, R0 = 1 + max(6, 0)/2 = 4
    assert torch.allclose(model._plan(v_next), torch.tensor([3.0, 3.5, 3.0, 4.0, 6.0]))
    # official code: R_t = max(r_t + gamma R_{t+1} (0 after an episode's last row), V(s_t))
    code = make(gamma=0.5, planning="code")
    code.set_dataset(two_episodes())
    v_here = torch.tensor([5.0, 0.0, 0.0, 0.0, 2.0])
    # ep 0: R2 = 3, R1 = 3.5, R0 = max(2.75, 5) = 5;  ep 1: R1 = max(1, 2) = 2, R0 = max(1 + 1, 0) = 2
    assert torch.allclose(code._plan(v_here), torch.tensor([5.0, 3.5, 3.0, 2.0, 2.0]))


def test_plan_returns_on_padded_episodes():
    rew = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 0.0]])  # second episode padded to length 3
    has_next = torch.tensor([[True, True, False], [True, False, False]])
    not_done = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    R = plan_returns(rew, not_done, has_next, 0.5)
    assert torch.allclose(R[:, :2], torch.tensor([[2.75, 3.5], [1.5, 1.0]]))


def test_stages_planning_round_and_critic_reset(monkeypatch):
    model = make(behavior_steps=2, critic_steps=3, planning_iterations=2, gamma=0.5)
    model.set_dataset(two_episodes())
    seen = []
    value = torch.tensor([4.0, 1.0, 100.0, 0.0, 10.0])
    monkeypatch.setattr(model, "state_value", lambda states: seen.append(states) or value)
    b = Batch(torch.randn(4, OBS), torch.rand(4, ACT) * 2 - 1, torch.zeros(4), torch.randn(4, OBS), torch.zeros(4))
    keys = []
    for step in range(9):
        model.step = step
        if step == 5:
            trained = [p.detach().clone() for p in model.critic.parameters()]
            assert any(not torch.equal(p, q) for p, q in zip(trained, model.critic_init.parameters()))
        keys.append(set(model.update(b)))
        if step == 5:  # round 1 starts: new returns from V(s'), critic restarted from its initial weights
            assert len(seen) == 1 and torch.equal(seen[0], model.data_next_obs)
            assert torch.allclose(model.returns, torch.tensor([3.0, 3.5, 3.0, 4.0, 6.0]))
            moved = max((p - q).abs().max().item() for p, q in zip(model.critic.parameters(), model.critic_init.parameters()))
            assert moved <= 1.1e-3  # one Adam step (lr 1e-3) from the initial weights
            assert all(s["step"].item() == 1 for s in model.critic_opt.state.values())
    assert len(seen) == 1  # no planning before round 1 nor after the last round
    assert keys == [{"loss/behavior"}] * 2 + [{"loss/critic", "q/mean"}] * 7


def test_code_rule_plans_with_the_current_states_value(monkeypatch):
    model = make(behavior_steps=0, critic_steps=1, planning="code")
    model.set_dataset(two_episodes())
    seen = []
    monkeypatch.setattr(model, "state_value", lambda states: seen.append(states) or torch.zeros(5))
    model.step = 1
    model.update(Batch(*(torch.zeros(2, d) for d in (OBS, ACT)), torch.zeros(2), torch.zeros(2, OBS), torch.zeros(2)))
    assert torch.equal(seen[0], model.data_obs)


def test_state_value_is_the_softmax_weighted_q_of_behaviour_candidates():
    model = make(planning_alpha=3.0, n_planning_candidates=5)
    model.set_dataset(two_episodes())
    model.critic = FirstActionDim()
    states = torch.randn(4, OBS)
    torch.manual_seed(1)
    q = model.behavior.sample(states.repeat_interleave(5, 0), 3, 3)[:, 0].view(4, 5)
    torch.manual_seed(1)
    v = model.state_value(states)
    expected = (torch.softmax(3.0 * q, -1) * q).sum(-1) * model.ret_std + model.ret_mean
    assert torch.allclose(v, expected, atol=1e-6)


def test_act_resamples_behaviour_candidates_by_q():
    model = make(eval_alpha=1e4, n_select=1, n_eval_candidates=8)
    model.critic = FirstActionDim()
    obs = torch.randn(3, OBS)
    torch.manual_seed(2)
    candidates = model.behavior.sample(obs.repeat_interleave(8, 0), 3, 3).view(3, 8, ACT)
    torch.manual_seed(2)
    actions = model.act(obs)
    assert actions.shape == (3, ACT) and actions.abs().max() <= 1.0
    best = candidates.gather(1, candidates[..., 0].argmax(1)[:, None, None].expand(-1, 1, ACT)).squeeze(1)
    assert torch.allclose(actions, best)  # alpha -> infinity: the best candidate


def test_updates_give_finite_losses_and_the_checkpoint_reloads():
    model = make(behavior_steps=2, critic_steps=2)
    model.set_dataset(two_episodes())
    b = Batch(torch.randn(8, OBS), torch.rand(8, ACT) * 2 - 1, torch.randn(8), torch.randn(8, OBS), torch.zeros(8))
    for step in range(6):  # behaviour, critic round 0, planning + round 1 (real V from candidates)
        model.step = step
        metrics = model.update(b)
        assert all(torch.isfinite(v) for v in metrics.values())
    fresh = SfBC(OBS, ACT, solver_steps=3)  # no dataset: the returns buffer takes the checkpoint's size
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.returns, model.returns)
