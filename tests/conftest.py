"""Shared fixtures: small datasets written once per test session from real MuJoCo rollouts."""

from pathlib import Path

import pytest

from offbench.data.synthetic import write_random_dataset
from offbench.scores import REF_SCORES


@pytest.fixture(scope="session")
def tiny_hopper(tmp_path_factory) -> Path:
    """20 random-policy episodes of Hopper-v4 in the D4RL HDF5 layout, scored with D4RL's hopper refs."""
    path = tmp_path_factory.mktemp("data") / "hopper-random-tiny.hdf5"
    ref_min, ref_max = REF_SCORES["hopper"]
    write_random_dataset("Hopper-v4", path, episodes=20, seed=0, ref_min=ref_min, ref_max=ref_max)
    return path
