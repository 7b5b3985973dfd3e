"""OfflineRLModule: the one thin base class between Lightning and the algorithms.

It owns the contract of shared/design.md and no algorithm logic:
- an algorithm writes `update(batch)`: one gradient step in plain PyTorch that steps its own raw
  `torch.optim` optimisers and returns its losses as tensors (no `.item()`, no host sync);
- `training_step` runs a block of updates per Lightning call (Lightning's per-call overhead is
  about as large as a small update), drawing batches from the DataModule's device-resident sampler;
- the number of updates done is the buffer `updates` (saved in checkpoints) mirrored by the Python
  int `step`; every cadence keys off them, never off Lightning's `global_step`;
- checkpoints also carry the global RNG states, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from offbench.batch import Batch


class OfflineRLModule(pl.LightningModule):
    """Base class of every algorithm: subclasses implement `update`, `act` and `configure_optimizers`."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # algorithms step their own raw optimisers in update()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.step = 0  # host mirror of `updates`: Python branching on it costs no device sync

    # --- what an algorithm implements -------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, Tensor]:
        """One gradient step on `batch`; returns scalar loss tensors, e.g. {"loss/critic": ...}."""
        raise NotImplementedError

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Actions (n, act_dim) within the action bounds for normalised observations (n, obs_dim)."""
        raise NotImplementedError

    # --- helpers for update() ---------------------------------------------------------------
    @staticmethod
    def optimize(optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float | None = None) -> None:
        """zero_grad, backward, optional grad-norm clipping of the optimiser's parameters, step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        optimizer.step()

    # --- the Lightning side -----------------------------------------------------------------
    def on_train_start(self) -> None:
        self.step = int(self.updates)  # one host read per fit: picks up the count after a resume

    def training_step(self, n_updates: int, batch_idx: int) -> None:
        sample = self.trainer.datamodule.sample
        totals: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for _ in range(n_updates):
            metrics = self.update(sample())
            self.step += 1
            self.updates += 1
            for name, value in metrics.items():
                value = value.detach()
                totals[name] = totals[name] + value if name in totals else value
                counts[name] = counts.get(name, 0) + 1
        means = {name: totals[name] / counts[name] for name in totals}
        if means:
            # One host sync per block (not per update): stop at once when a loss is NaN or inf.
            finite = torch.stack([torch.isfinite(v).all() for v in means.values()])
            if not bool(finite.all()):
                bad = [name for name, ok in zip(means, finite.tolist()) if not ok]
                raise FloatingPointError(
                    f"{', '.join(bad)} became NaN/inf in the block ending at update {self.step}. "
                    "Lower the learning rate, enable gradient clipping, or check the data for outliers "
                    "(observation normalisation: --data.normalize_obs true)."
                )
        self.log_dict(means, on_step=True, on_epoch=False)
        self.log("updates", float(self.step), on_step=True, on_epoch=False, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            # Plain types and tensors only: Lightning loads checkpoints with weights_only=True.
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(states["python"])


def _numpy_state_to_torch(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging target <- (1 - tau) * target + tau * source, one fused op over all params."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
