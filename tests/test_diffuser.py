"""Diffuser (algorithms/diffuser.py) and its networks (offbench/trajectory/planner_nets.py)."""

import pytest
import torch

from offbench.errors import UserError
from offbench.trajectory.planner_nets import PlannerUNet, PlannerValue


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_planner_nets_shapes_and_the_official_parameter_counts():
    # parameter counts of the official TemporalUnet / ValueFunction (jannerm/diffuser @7ea4228, run):
    # hopper (D=14), walker2d (D=23), halfcheetah (D=23, H=4, dim_mults (1, 4, 8), attention)
    assert n_params(PlannerUNet(14)) == 3_956_302
    assert n_params(PlannerUNet(23)) == 3_958_327
    assert n_params(PlannerUNet(23, dim_mults=(1, 4, 8), attention=True)) == 4_114_423
    assert n_params(PlannerValue(32, 14)) == 2_294_817
    assert n_params(PlannerValue(4, 23, dim_mults=(1, 4, 8))) == 2_180_833
    t = torch.tensor([0, 3, 7])
    net = PlannerUNet(5, dim=16, dim_mults=(1, 2), attention=True)
    assert net(torch.randn(3, 8, 5), t).shape == (3, 8, 5)
    value = PlannerValue(8, 5, dim=16, dim_mults=(1, 2))
    assert value(torch.randn(3, 8, 5), t).shape == (3, 1)
    cond = PlannerUNet(5, dim=16, dim_mults=(1, 2), cond_dim=16)  # DD: cat(time_emb, returns_emb)
    assert cond(torch.randn(3, 8, 5), t, torch.randn(3, 16)).shape == (3, 8, 5)
    assert cond.mid1.emb[1].in_features == 32
    with pytest.raises(ValueError, match="needs cond_emb"):
        cond(torch.randn(3, 8, 5), t)
    with pytest.raises(UserError, match="multiple of 2"):
        net(torch.randn(3, 7, 5), t)
