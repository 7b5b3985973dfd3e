"""SAC's squashed Gaussian policy (Haarnoja et al. 2018), shared by CQL and by anything SAC-based.

    u ~ N(mu(s), sigma(s)),   a = max_action * tanh(u)
    log pi(a|s) = log N(u; mu, sigma) - sum_i log(max_action * (1 - tanh(u_i)^2))

The network outputs the mean and the log-std of u (a state-dependent std, clamped to [-5, 2]); the
last layer starts near zero (uniform +-1e-3), as in rlkit's TanhGaussianPolicy, which the official
CQL code uses. log(1 - tanh(u)^2) is computed as 2 (log 2 - u - softplus(-2u)), which is exact and
stays finite where rlkit adds 1e-6 inside the log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offbench.nets import mlp

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # rlkit's clamp of the log-std
MEAN_LIMIT = 9.0  # rlkit clamps the pre-tanh mean to +-9 when scoring given actions


def _log_squash_jacobian(u: Tensor, max_action: float) -> Tensor:
    """sum_i log |d a_i / d u_i| for a = max_action * tanh(u), stable for large |u|."""
    return (math.log(max_action) + 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


class TanhGaussianActor(nn.Module):
    """pi(a|s): a Gaussian squashed by tanh into [-max_action, max_action], with a state-dependent std.

    forward(obs) -> (actions, log_probs) is a reparameterised sample; log_prob(obs, actions) scores
    given actions (behaviour cloning); mode(obs) is the deterministic action max_action * tanh(mu).
    """

    def __init__(
        self, obs_dim: int, act_dim: int, max_action: float = 1.0, hidden: tuple[int, ...] = (256, 256, 256),
        init_w: float = 1e-3,
    ):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)
        nn.init.uniform_(self.net[-1].weight, -init_w, init_w)
        nn.init.uniform_(self.net[-1].bias, -init_w, init_w)
        self.max_action = max_action

    def _dist(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self._dist(obs)
        normal = torch.distributions.Normal(mean, log_std.exp(), validate_args=False)  # validation syncs the host
        u = normal.rsample()
        log_prob = normal.log_prob(u).sum(-1) - _log_squash_jacobian(u, self.max_action)
        return self.max_action * torch.tanh(u), log_prob

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log pi(actions|obs), shape (B,); actions on the bounds are pulled in by 1e-6 (as rlkit's atanh)."""
        mean, log_std = self._dist(obs)
        y = (actions / self.max_action).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
        u = torch.atanh(y)
        normal = torch.distributions.Normal(mean.clamp(-MEAN_LIMIT, MEAN_LIMIT), log_std.exp(), validate_args=False)
        return normal.log_prob(u).sum(-1) - _log_squash_jacobian(u, self.max_action)

    def mode(self, obs: Tensor) -> Tensor:
        return self.max_action * torch.tanh(self._dist(obs)[0])
