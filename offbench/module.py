"""OfflineRLModule: the one thin base class between Lightning and the algorithms.

The contract an algorithm author relies on (an algorithm is one subclass; examples/awac.py is a
complete one outside the package, algorithms/bc.py the smallest inside it):

__init__(obs_dim, act_dim, max_action, ...)
    Typed arguments with defaults are the hyperparameters: `offbench fit` turns them into the config
    schema (`--model.init_args.NAME`). Call `self.save_hyperparameters()` and read them from
    `self.hparams`. Check each numeric setting first, at the top of __init__, with offbench/settings.py
    (`check.integer("policy_every", policy_every)`, `check.interval("gamma", gamma, "[0, 1)")`): a value
    out of range then stops `offbench fit` when the module is built, with one line naming
    `model.init_args.NAME` and its valid range. The CLI fills three of the arguments from the dataset:
    `obs_dim`, `act_dim` and `max_action` (the evaluation env's action bound; D4RL's envs have +-1).
    An algorithm without a `max_action` argument runs only on envs whose bounds are +-1: on any other
    env `offbench fit` stops with an error before training, never silently.
    One naming scheme across the algorithms (configs rely on it): learning rates `<network>_lr`
    (`actor_lr`, `critic_lr`, `value_lr`, `lambda_lr`; never a bare `lr`), a policy delay
    `policy_every`, layer widths `hidden: tuple[int, ...]` (one entry per hidden layer; a second
    network's `critic_hidden`), gradient clipping `max_grad_norm`, EMA `ema_decay` / `ema_start` /
    `ema_every`, and state before action in every call (`critic(obs, act)`).
configure_optimizers() -> list[torch.optim.Optimizer]
    Creates raw `torch.optim` optimisers, keeps each as an attribute (`self.actor_opt = Adam(...)`)
    and returns them all. Lightning checkpoints the returned ones; the compiled path finds them as
    attributes; training stops with an error when the two differ.
update(batch) -> dict[str, Tensor]
    One gradient step on one `offbench.batch.Batch` (obs, act, rew, next_obs, done, idx, next_act; all on the
    training device; obs normalised when the DataModule normalises; a module that overrides
    `batch_source` gets its own batches instead, e.g. the trajectory planners' windows), in plain PyTorch: compute the
    losses, then `self.optimize(opt, loss, max_grad_norm)` (zero_grad, backward, optional clipping,
    step) for each optimiser. No `manual_backward`, no LightningOptimizer, and no host
    synchronisation (no `.item()`, `float(tensor)`, `bool(tensor)`, printing, or Python branching on
    tensor values): the update must stay compilable and run at GPU speed. Return scalar tensors named
    like `loss/critic`, `loss/actor`, `q/mean`; the base class averages them over a block of updates
    and logs them (anything else fails with a TypeError naming this contract). Cadences (policy delay,
    EMA, phases) key off `self.step`, the number of updates done before this one (a Python int).
act(obs) -> Tensor
    Actions (n, act_dim) within [-max_action, max_action] for normalised observations (n, obs_dim),
    under torch.no_grad; the evaluation calls it in eval mode on batches of vectorised envs.
log_prob(obs, act) -> Tensor   (optional)
    log pi(act | obs) (n,) of the current policy, differentiable w.r.t. `act`; only guided PGD data
    (offbench/pgd, docs/pgd.md) calls it. Exact for Gaussian policies, N(act(s), 1) for deterministic ones.

Many seeds as one computation (`offbench fit --seeds 0,1,2`; offbench/seeds.py, `SeedBatch`): N copies of an algorithm train as one
batched computation through torch.func.vmap over this same `update`, each copy with its own parameters,
optimiser state, batches and random stream. Nothing extra to write when `update` keeps the rules above
(no host sync, no Python branching on tensor values, every tensor that changes during training a
parameter or a buffer), draws its random numbers with torch's random functions (torch.randn, rand,
randint, their `_like` forms, bernoulli, normal, multinomial, dropout, or in-place ones like
`Tensor.uniform_`) and steps only through `self.optimize` (its `clip` argument takes an algorithm's own
gradient clipping). An algorithm that cannot keep them sets the class attribute `unbatchable` to the
reason (AWR, SfBC and QGPO do): SeedBatch then refuses it, naming the reason.

Lightning hooks: the base class owns `training_step` (a block of `update` calls per Lightning call,
batches from the DataModule's device-resident sampler), `on_train_start` (update count, compiled path,
optimiser checks), `on_save_checkpoint` and `on_load_checkpoint` (RNG states): an override must call
`super()`. An algorithm may use the others, e.g. `on_fit_start` or `setup` to build per-dataset tables
on the device from `self.trainer.datamodule.transitions` (a `Transitions` of numpy arrays, with
`normalize_obs` to apply the run's observation normalisation); `Batch.idx` holds the dataset rows of
a batch, so per-row quantities (AWR's TD(lambda) returns, SfBC's planned returns) are read as
`table[batch.idx]` (algorithms/awr.py). Such an algorithm sets the class attribute
`needs_dataset_rows = True`: a DataModule whose batches carry no rows (offbench/pgd's synthetic data)
then refuses it before training instead of the algorithm drawing real rows in their place.

Counting: one *update* is one `update()` call. The buffer `updates` (saved in checkpoints) and its
host mirror `self.step` count them; `metrics.csv` has one counter column, `updates`, in every row.
Lightning's `global_step` is not used (it counts Lightning-stepped optimisers: none here).

Checkpoints carry modules, optimisers, `updates` and the global RNG states, so a resumed run continues
bit-identically on the CPU; state that is not a parameter or buffer (a Python attribute that changes
during training) must be saved by the algorithm (`on_save_checkpoint`) or registered as a buffer.

The compiled path (`offbench fit --compile true`, opt-in; see `enable_compile`): methods marked
`@compilable` run through torch.compile (CUDA graphs on CUDA). Rules: a compilable method reads no
update counter (`self.step`): `update()` keeps the cadence in plain Python and picks which compilable
methods to call; it steps optimisers only through `self.optimize`; see `graph_break` for the one rule
that eager code does not need. `--compile true` on a module with no `@compilable` method, or whose
optimisers are not attributes, stops with an error (compiling nothing would run eager silently).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
import torch.optim.optimizer as torch_optimizer
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.utilities.parsing import AttributeDict
from torch import Tensor, nn

from offbench.batch import Batch
from offbench.errors import UserError
from offbench.settings import RENAMED as RENAMED_HPARAMS

Method = TypeVar("Method", bound=Callable[..., Any])


class ContractError(UserError, TypeError):
    """An algorithm that breaks a rule of this contract (its author's mistake): one line naming the rule."""


class Hyperparameters(AttributeDict):
    """`self.hparams`: a name the module did not save is one line naming the rule (call
    `self.save_hyperparameters()` first in __init__) or the setting's new name, not a bare AttributeError."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            owner = self.__dict__.get("owner", "the module")
            new = RENAMED_HPARAMS.get(key)
            if new and new in self:
                raise HyperparameterError(f"{owner}: `{key}` (in self.hparams) is now called `{new}`: use "
                                          f"self.hparams.{new}") from None
            if not self:
                raise HyperparameterError(f"{owner} reads self.hparams.{key}, but its __init__ did not call "
                                          "self.save_hyperparameters() (the contract in offbench/module.py)") from None
            raise HyperparameterError(f"{owner}: self.hparams has no `{key}` (its hyperparameters: "
                                      f"{', '.join(sorted(self))})") from None


class HyperparameterError(ContractError, AttributeError):
    """A hyperparameter read that cannot work (also an AttributeError, so hasattr() keeps its meaning)."""


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

    needs_dataset_rows = False  # True: update() reads per-row tables by Batch.idx (see the contract above)
    unbatchable = ""  # why N seeds of it cannot train as one batched computation ('' : they can; offbench/seeds.py)

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

    def log_prob(self, obs: Tensor, act: Tensor) -> Tensor:
        """Optional: log pi(act | obs) (n,) of the current policy, differentiable w.r.t. `act`."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define log_prob(obs, act), which policy-guided PGD data needs: implement "
            "it (the contract in offbench/module.py; docs/pgd.md), or use unguided PGD data (--data.guidance_coeff 0)."
        )

    def batch_source(self, datamodule: Any) -> Callable[[], Any]:
        """The function each update's batch comes from: the DataModule's transition sampler. The trajectory
        planners (Diffuser, Decision Diffuser) train on windows of episodes instead: they override this to
        return a sampler of `offbench.trajectory.padded.WindowBatch` that draws window indices with the
        DataModule's seeded generator (`OfflineDataModule.sample_indices`), and their `update` takes those."""
        return datamodule.sample

    # --- helpers for update() ---------------------------------------------------------------
    @staticmethod
    def optimize(optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float | None = None,
                 clip: Callable[[list[Tensor]], None] | None = None) -> None:
        """zero_grad, backward, optional gradient clipping, step. max_grad_norm: clip the global norm of the
        optimiser's gradients (nn.utils.clip_grad_norm_); clip: an algorithm's own rule, called with the list
        of the optimiser's gradients to change in place (EDP clips each Q-network on its own)."""
        for group in optimizer.param_groups:  # = optimizer.zero_grad(set_to_none=True), without its Python around it
            for p in group["params"]:
                p.grad = None
        loss.backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if max_grad_norm is not None:
            clip_grad_norm(grads, max_grad_norm)
        if clip is not None:
            clip(grads)
        if torch.compiler.is_compiling() or not fused_adam_step(optimizer):
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
        compiled = sorted({name for cls in type(self).__mro__ for name, v in vars(cls).items() if getattr(v, "compilable", False)})
        if not compiled:
            raise ValueError(
                f"--compile true: {type(self).__name__} marks no method @compilable, so nothing would be compiled. Mark the "
                "step-free parts of update() with @offbench.module.compilable (see the contract in offbench/module.py), "
                "or run without --compile."
            )
        if not self._raw_optimizers():
            raise ValueError(
                f"--compile true: {type(self).__name__} keeps no torch.optim optimiser as an attribute; the compiled path "
                "needs them (configure_optimizers: self.opt = torch.optim.Adam(...); return [self.opt])."
            )
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
    @property
    def hparams(self) -> Hyperparameters:  # type: ignore[override]
        """Lightning's hyperparameters, whose missing names say what to do (Hyperparameters)."""
        hparams = super().hparams
        if not isinstance(hparams, Hyperparameters):
            hparams = self._hparams = Hyperparameters(hparams)
            hparams.__dict__["owner"] = type(self).__name__
        return hparams

    def on_train_start(self) -> None:
        self.step = int(self.updates)  # one host read per fit: picks up the count after a resume
        found, returned = self._raw_optimizers(), self.trainer.optimizers
        if any(isinstance(o, _MockOptimizer) for o in returned):  # Lightning's stand-in when it got None
            raise ContractError(
                f"{type(self).__name__}.configure_optimizers returned None: it creates the optimisers, keeps each as an "
                "attribute and returns them all, e.g. `return [self.actor_opt, self.critic_opt]` (the contract in "
                "offbench/module.py)."
            )
        if {id(o) for o in found} != {id(o) for o in returned}:
            raise ContractError(
                f"{type(self).__name__}.configure_optimizers returned other optimisers ({len(returned)}) than the module "
                f"keeps as attributes ({len(found)}): keep each returned optimiser as an attribute and return them all "
                "(the contract in offbench/module.py)."
            )
        if self.compile_update:
            self.enable_compile()  # after the checkpoint's optimiser states are loaded
        else:  # a compiled run's checkpoint holds tensor learning rates: eager steps take floats
            for optimizer in self._raw_optimizers():
                for group in optimizer.param_groups:
                    if torch.is_tensor(group["lr"]):
                        group["lr"] = group["lr"].item()
                fused_optimizer(optimizer)  # after the checkpoint's param_groups (which may say fused=None) are loaded

    def training_step(self, n_updates: int, batch_idx: int) -> None:
        sample = self.batch_source(self.trainer.datamodule)
        totals: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for _ in range(n_updates):
            metrics = self.run_update(sample())
            for name, value in metrics.items():
                if not isinstance(value, Tensor):
                    raise ContractError(
                        f"{type(self).__name__}.update() returned {name}={value!r} ({type(value).__name__}): update() returns "
                        "a dict of scalar tensors, without .item() or float() (the contract in offbench/module.py)."
                    )
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


FUSED_DEVICES = ("cpu", "cuda")


def fused_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Switch a torch.optim optimiser (Adam, AdamW, SGD, ...) to its fused kernel in place, where it has
    one for the parameters' device and dtype; returns it.

    The same update to float round-off (one fused pass per tensor instead of a chain of per-tensor ops:
    measured 1-2 ulps after 50 Adam steps, tests/test_speed.py), about 6x faster for Adam on one CPU core
    (torch 2.13's default on the CPU is the per-parameter loop). The flags live in the param_groups, so
    a checkpoint saved before the switch loads as it is (eager training calls this after loading it)."""
    for group in optimizer.param_groups:
        params = group["params"]
        if "fused" not in group or group.get("differentiable") or torch.is_tensor(group["lr"]) or not params:
            continue
        if all(p.device.type in FUSED_DEVICES and p.dtype in (torch.float32, torch.float64) for p in params):
            group["fused"], group["foreach"] = True, False
            for p in params:  # fused kernels take the step counter on the parameter's device
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
    return optimizer


def fused_adam_step(optimizer: torch.optim.Optimizer) -> bool:
    """Adam's (AdamW's) step as `optimizer.step()` takes it once `fused_optimizer` has switched it to the fused
    kernel, without the Python around the kernel; returns False (nothing done) where that is not this step.

    The same two kernels that torch.optim.Adam.step calls for fused groups on one device and dtype (the step
    counters' increment, then torch._fused_adam_ or _fused_adamw_), with the same arguments, on the optimiser's
    own state tensors: the same numbers bit for bit and the same state dict (tests/test_speed.py). What it
    skips is the per-step Python (step hooks, rebuilding the per-group lists, grouping tensors by device):
    measured about 3x the kernel itself on one CPU core for a 2 x 256 MLP (results/perf/peers.md). Falls back
    (False) wherever the full step does more: not Adam/AdamW, a group not fused or with amsgrad, maximize,
    capturable, differentiable or a tensor learning rate, mixed devices or dtypes, a parameter without a
    gradient or state (the first step makes the state), step hooks, or gradient scaling."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or getattr(optimizer, "grad_scale", None) is not None \
            or getattr(optimizer, "found_inf", None) is not None or optimizer._optimizer_step_pre_hooks \
            or optimizer._optimizer_step_post_hooks or torch_optimizer._global_optimizer_pre_hooks \
            or torch_optimizer._global_optimizer_post_hooks:
        return False
    calls = []
    for group in optimizer.param_groups:
        if not group["params"]:  # an empty group: Adam.step does nothing with it either
            continue
        if not group.get("fused") or group["amsgrad"] or group["maximize"] or group["capturable"] \
                or group["differentiable"] or torch.is_tensor(group["lr"]):
            return False
        params = group["params"]
        states = [optimizer.state.get(p) for p in params]
        if any(p.grad is None for p in params) or not all(states):
            return False
        first = params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in params):
            return False
        calls.append((group, params, states))
    for group, params, states in calls:
        steps = [state["step"] for state in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        kernel(params, [p.grad for p in params], [state["exp_avg"] for state in states],
               [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
               grad_scale=None, found_inf=None)
    return True


def _compilable_optimizer(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Set up a torch.optim optimiser in place for torch.compile (and, with `capturable`, CUDA graphs):
    tensor learning rates (on the parameters' device, in their dtype) and, where the optimiser has
    the options, capturable steps with foreach kernels (inductor fuses them)."""
    for group in optimizer.param_groups:
        device, dtype = group["params"][0].device, group["params"][0].dtype
        group["lr"] = torch.as_tensor(group["lr"], dtype=dtype, device=device)
        if group.get("fused"):  # set by eager training (fused_optimizer): inductor compiles the unfused form
            group["fused"] = None
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


def unit_gaussian_log_prob(act: Tensor, mean: Tensor) -> Tensor:
    """log N(act; mean, I) summed over the action dimensions (n,): a deterministic policy's `log_prob`."""
    return -0.5 * (act - mean).pow(2).sum(-1) - 0.5 * act.shape[-1] * math.log(2 * math.pi)


@torch.no_grad()
def clip_grad_norm(grads: list[Tensor], max_norm: float) -> None:
    """nn.utils.clip_grad_norm_ on a list of gradients (foreach): scale them all by
    min(1, max_norm / (||g||_2 + 1e-6)), ||g||_2 their global norm."""
    total = nn.utils.get_total_norm(grads, 2.0, False, True)
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging target <- (1 - tau) * target + tau * source, one fused op over all params."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
