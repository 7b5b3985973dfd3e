"""Policy-guided diffusion (Jackson et al. 2024, arXiv:2404.06356): a trajectory diffusion model of
the offline data, sampled with guidance towards the policy being trained, as synthetic training
data for any algorithm of the suite (docs/pgd.md)."""

from typing import Any

__all__ = ["PGDDataModule"]


def __getattr__(name: str) -> Any:  # lazy: `offbench data pgd` needs no Lightning import
    if name == "PGDDataModule":
        from offbench.pgd.datamodule import PGDDataModule

        return PGDDataModule
    raise AttributeError(name)
