"""The base module's maths and bookkeeping: target updates, the optimiser helper, reward tuning."""

import numpy as np
import pytest
import torch
from torch import nn

from offbench.batch import Transitions
from offbench.data.datamodule import tune_rewards
from offbench.module import OfflineRLModule, soft_update


def _transitions(rew, episode):
    n = len(rew)
    rew = np.asarray(rew, dtype=np.float32)
    episode = np.asarray(episode, dtype=np.int64)
    return Transitions(
        obs=np.zeros((n, 2), np.float32), act=np.zeros((n, 1), np.float32), rew=rew,
        next_obs=np.zeros((n, 2), np.float32), done=np.zeros(n, np.float32), episode=episode,
        step=np.zeros(n, np.int64), episode_return=np.bincount(episode, weights=rew)[episode].astype(np.float32),
    )


def test_soft_update_is_polyak_average():
    source, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        source.weight.fill_(1.0)
        source.bias.fill_(2.0)
        target.weight.fill_(0.0)
        target.bias.fill_(-2.0)
    soft_update(target, source, tau=0.25)
    # (1 - tau) * target + tau * source
    assert torch.allclose(target.weight, torch.full((1, 2), 0.25))
    assert torch.allclose(target.bias, torch.tensor([-1.0]))


def test_optimize_clips_gradient_norm():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    # d/dw (w . w) = 2w = (6, 8), norm 10; clipped to norm 1 -> (0.6, 0.8)
    OfflineRLModule.optimize(opt, (w * w).sum(), max_grad_norm=1.0)
    assert torch.allclose(w.detach(), torch.tensor([2.4, 3.2]))


def test_reward_tuning_hand_values():
    t = _transitions([1.0, 0.0, 0.5, 2.0], [0, 0, 1, 1])
    assert np.allclose(tune_rewards(t, "cql_antmaze").rew, [2.0, -2.0, 0.0, 6.0])
    assert np.allclose(tune_rewards(t, "iql_antmaze").rew, [0.0, -1.0, -0.5, 1.0])
    # episode returns 1.0 and 2.5: scale 1000 / 1.5
    tuned = tune_rewards(t, "iql_locomotion")
    assert np.allclose(tuned.rew, np.array([1.0, 0.0, 0.5, 2.0]) * 1000 / 1.5)
    assert np.allclose(tuned.episode_returns(), [1000 / 1.5, 2500 / 1.5])
    assert tune_rewards(t, "none") is t


def test_reward_tuning_rejects_flat_returns():
    with pytest.raises(ValueError, match="spread of episode returns"):
        tune_rewards(_transitions([1.0, 1.0], [0, 1]), "iql_locomotion")


class _Linear(OfflineRLModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def configure_optimizers(self):
        self.opt = torch.optim.Adam(self.net.parameters())
        return [self.opt]


def test_compile_with_nothing_compilable_is_an_error():
    module = _Linear()
    module.configure_optimizers()
    with pytest.raises(ValueError, match="marks no method @compilable"):
        module.enable_compile()


def test_compile_with_optimisers_it_cannot_find_is_an_error():
    from offbench.module import compilable

    class Hidden(_Linear):
        @compilable
        def step_fn(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return [torch.optim.Adam(self.net.parameters())]  # not kept as an attribute

    module = Hidden()
    module.configure_optimizers()
    with pytest.raises(ValueError, match="keeps no torch.optim optimiser as an attribute"):
        module.enable_compile()
