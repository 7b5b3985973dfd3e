"""OfflineRLModule: the one thin base class between Lightning and the algorithms.

It owns the contract of shared/design.md and no algorithm logic:
- an algorithm writes `update(batch)`: one gradient step in plain PyTorch that steps its own raw
  `torch.optim` optimisers and returns its losses as tensors (no `.item()`, no host sync);
- `training_step` runs a block of updates per Lightning call (Lightning's per-call overhead is
  about as large as a small update), drawing batches from the DataModule's device-resident sampler;
- the number of updates done is the buffer `updates` (saved in checkpoints) mirrored by the Python
  int `step`; every cadence keys off them, never off Lightning's `global_step`;
- checkpoints also carry the global RNG states, so a resumed run continues bit-identically;
- an opt-in compiled path (`enable_compile`, `offbench fit --compile true`) runs the methods an
  algorithm marks `@compilable` through torch.compile (CUDA graphs on CUDA). Those methods never read
  the update counter, so the graphs do not change from one update to the next: the cadence (policy
  delay, EMA, phases) stays in `update()`, in plain Python, around them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from offbench.batch import Batch

Method = TypeVar("Method", bound=Callable[..., Any])


def compilable(method: Method) -> Method:
    """Marks a method of an update that the compiled path runs through torch.compile (eager: no effect).

    A compilable method reads no update counter (`self.step`): a graph is specialised on the Python
    numbers it reads, so one that read the counter would be recompiled at every update. `update()`
    keeps the cadence in plain Python: it picks which compilable methods to call, or passes them bool
    flags (one graph per value). See `graph_break` for the one rule that eager code does not need."""
    method.compilable = True  # type: ignore[attr-defined]
    return method


def graph_break() -> None:
    """In a `@compilable` method, end the compiled graph here; in eager code it does nothing.

    Compiled, each graph (the code between two breaks; every `optimize` call breaks) is one autograd
    node: a loss's backward() frees all of its graph. So when a forward pass feeds a loss stepped
    first and, with gradients, a loss stepped later (SAC: the log-probabilities of the temperature's
    loss, detached, and of the actor's), break the graph between that forward pass and the first
    loss. Values used detached (`.detach()`) may come from any graph."""
    torch._dynamo.graph_break()


class OfflineRLModule(pl.LightningModule):
    """Base class of every algorithm: subclasses implement `update`, `act` and `configure_optimizers`."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # algorithms step their own raw optimisers in update()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.step = 0  # host mirror of `updates`: Python branching on it costs no device sync
        self.compile_update = False  # the compiled path, switched on at the start of training (enable_compile)
        self.cudagraphs = False  # compiled with CUDA graphs: outputs are overwritten by the next replay

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

    # --- the compiled path ------------------------------------------------------------------
    def enable_compile(self, mode: str | None = None) -> None:
        """Run every `@compilable` method through torch.compile from now on, with optimisers that compile.

        mode: torch.compile's; by default "reduce-overhead" (CUDA graphs) on CUDA and inductor's
        default elsewhere. The optimisers (the module's `torch.optim` attributes) get a tensor
        learning rate (a graph input, so a scheduler changes it without a recompilation), and on CUDA
        `capturable=True` and `foreach=True` (their step counters move to the device, as CUDA graphs
        need). Call it after the optimisers exist and any checkpoint is loaded (training does it in
        on_train_start). A recompilation past torch._dynamo.config.recompile_limit raises instead of
        falling back to eager code; that limit counts per process, and `optimize` is compiled once per
        optimiser, so a process that compiles several modules calls torch._dynamo.reset() between them
        (as `offbench perf` does). Known limit (torch 2.13): compiled Adam divides by the learning
        rate, so a rate of exactly 0 gives NaN (IQL's cosine schedule reaches 0 after its last update)."""
        scalars = [n for n, p in self.named_parameters() if p.dim() == 0 and p.dtype == torch.float64 and not p.is_cuda]
        if scalars:  # seen with torch 2.13 on the CPU: the compiled Adam step leaves them unchanged
            raise ValueError(f"the compiled path cannot train 0-dim float64 parameters on the CPU ({', '.join(scalars)}): use float32")
        cuda = self.device.type == "cuda"
        mode = mode or ("reduce-overhead" if cuda else None)
        for optimizer in self._raw_optimizers():
            _compilable_optimizer(optimizer, capturable=cuda)
        for name in {name for cls in type(self).__mro__ for name in vars(cls)}:
            method = getattr(type(self), name, None)
            if getattr(method, "compilable", False):  # the most derived definition: an override may drop the mark
                setattr(self, name, torch.compile(method.__get__(self), mode=mode, dynamic=False))
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
        self.compile_update = True
        self.cudagraphs = mode == "reduce-overhead"

    def _raw_optimizers(self) -> list[torch.optim.Optimizer]:
        return [value for value in vars(self).values() if isinstance(value, torch.optim.Optimizer)]

    def run_update(self, batch: Batch) -> dict[str, Tensor]:
        """One update as training runs it: `update(batch)`, then the counters move on."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last update's graph outputs may be overwritten
        metrics = self.update(batch)
        self.step += 1
        self.updates += 1
        return metrics

    # --- the Lightning side -----------------------------------------------------------------
    def on_train_start(self) -> None:
        self.step = int(self.updates)  # one host read per fit: picks up the count after a resume
        if self.compile_update:
            self.enable_compile()  # after the checkpoint's optimiser states are loaded
        else:  # a compiled run's checkpoint holds tensor learning rates: eager steps take floats
            for optimizer in self._raw_optimizers():
                for group in optimizer.param_groups:
                    if torch.is_tensor(group["lr"]):
                        group["lr"] = group["lr"].item()

    def training_step(self, n_updates: int, batch_idx: int) -> None:
        sample = self.trainer.datamodule.sample
        totals: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for _ in range(n_updates):
            metrics = self.run_update(sample())
            for name, value in metrics.items():
                value = value.detach()
                # The first value is copied: a CUDA graph's output is overwritten by its next replay.
                totals[name] = totals[name] + value if name in totals else value.clone()
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


def _compilable_optimizer(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Set up a torch.optim optimiser in place for torch.compile (and, with `capturable`, CUDA graphs):
    tensor learning rates (on the parameters' device, in their dtype) and, where the optimiser has
    the options, capturable steps with foreach kernels (inductor fuses them)."""
    for group in optimizer.param_groups:
        device, dtype = group["params"][0].device, group["params"][0].dtype
        group["lr"] = torch.as_tensor(group["lr"], dtype=dtype, device=device)
        if capturable and "capturable" in group:
            group["capturable"] = True
            for p in group["params"]:  # counters made before (eager updates, a checkpoint) move to the device
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)
        if capturable and "foreach" in group:
            group["foreach"] = True


def _numpy_state_to_torch(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging target <- (1 - tau) * target + tau * source, one fused op over all params."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
