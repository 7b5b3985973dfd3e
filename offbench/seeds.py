"""Many seeds in one process: N independent copies of one algorithm trained as one batched computation.

`SeedBatch` takes N modules of one algorithm and its settings (each built, seeded and set up as its
single-seed run would be) and trains them together: one call of the algorithm's own `update(batch)`,
written for one seed, runs for all N copies through `torch.func.vmap`. Each parameter and buffer is
stacked along a new leading dimension (copy k at index k); the optimisers are rebuilt over the stacked
tensors with the copies' states stacked the same way (Adam, SGD and the other elementwise optimisers then
step each copy exactly as its own optimiser would); the batches are stacked too, each copy's drawn with
its own sampler. Why it is fast: the small networks of offline RL spend much of an update on
per-operation overhead (Python, dispatch, kernel launches on a GPU), which the N copies now share.

What vmap cannot do by itself, and how it is done here (the functorch internals live in this file only):

- backward inside vmap: `optimize(opt, loss, max_grad_norm)` (the algorithm's only way to step) takes
  each copy's loss (the batched loss's physical (N,) tensor), and steps outside the transform:
  backward of their sum (copy k's gradient is its own loss's gradient: the copies share no parameter),
  gradient-norm clipping per copy (each copy's own total norm, as `nn.utils.clip_grad_norm_`), and the
  optimiser's step on the stacked tensors.
- random numbers: each copy keeps its own global RNG state (CPU and, on CUDA, the device's), started
  from where its single-seed run's would be. The random functions in `RANDOM_FUNCTIONS` (torch.randn,
  rand, randint, their `_like` forms, bernoulli, normal, multinomial, dropout) are intercepted: each is
  called once per copy, outside vmap, under that copy's RNG state, and the N results stacked. So copy k
  draws exactly the numbers its single-seed run draws. Any other random operation inside `update`
  stops with an error naming the functions that work (vmap runs with randomness="error"): never
  silently correlated or silently different streams.
- foreach kernels (`torch._foreach_lerp_` and friends: Polyak targets, EMA) have no batching rule: those in
  FOREACH_IN_PLACE are intercepted the same way and run on the stacked tensors, every copy at once.

What an algorithm must respect to be batched (the contract in offbench/module.py asks it already):
no host synchronisation and no Python branching on tensor values in `update`; state that changes during
training is a parameter or a buffer (a plain tensor attribute would be one tensor for all copies:
`SeedBatch` checks after each update that no attribute holds a vmap-wrapped tensor and stops with an
error naming it). An algorithm that cannot be batched sets the class attribute `unbatchable` to the
reason; SeedBatch refuses it with that reason (its seeds train one by one, each its own run).

Numerics: copy k equals the single-seed run of seed k up to float round-off, not bit for bit: a batched
matmul sums in another order than N separate ones (and the CPU's oneDNN layers and the fused Mish of
offbench/nets.py fall back to aten's composite ops under vmap). tests/test_seeds.py measures the gap
per algorithm over a few hundred updates against a stated tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch._C._functorch as functorch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from offbench.errors import UserError
from offbench.module import ContractError, OfflineRLModule, clip_grad_norm

F = nn.functional

# Random functions each copy gets from its own RNG state (any other random op in update() is an error).
RANDOM_FUNCTIONS = {
    torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like, torch.randint_like,
    torch.bernoulli, torch.normal, torch.multinomial, torch.poisson, F.dropout,
}


# In-place random methods: a copy's own draws fill its slice (a tensor made inside update(), such as
# torch.empty(shape).uniform_(), is one tensor for all copies: the method's result holds each copy's draws).
RANDOM_IN_PLACE = {
    Tensor.normal_, Tensor.uniform_, Tensor.bernoulli_, Tensor.exponential_, Tensor.random_, Tensor.cauchy_,
    Tensor.log_normal_, Tensor.geometric_,
}


# In-place foreach kernels (Polyak targets, EMA, ...) have no batching rule: inside an update they run on the
# stacked tensors behind the copies' (every copy at once, the same per-element result).
FOREACH_IN_PLACE = {
    torch._foreach_lerp_, torch._foreach_copy_, torch._foreach_mul_, torch._foreach_add_, torch._foreach_addcmul_,
    torch._foreach_zero_,
}


_INTERCEPTED = RANDOM_FUNCTIONS | RANDOM_IN_PLACE | FOREACH_IN_PLACE  # what _PerCopyCalls handles (one lookup per op)


class SeedBatchError(UserError):
    """Seeds that cannot be trained as one batched computation (one line saying why and what to do)."""


def unbatchable_reason(cls: type[OfflineRLModule]) -> str:
    """Why `cls` cannot train its seeds as one batched computation ('' when it can)."""
    return str(getattr(cls, "unbatchable", "") or "")


@contextlib.contextmanager
def outside_vmap() -> Iterator[None]:
    """For the duration: out of the innermost vmap (ops see plain tensors; backward() is allowed)."""
    layer = functorch.pop_dynamic_layer_stack()
    try:
        yield
    finally:
        functorch.push_dynamic_layer_stack(layer)


_ACTIVE: list[tuple[int, int]] = []  # (vmap level, copies) of the SeedBatch update in progress


def in_seed_batch() -> bool:
    """Whether the code runs inside a SeedBatch update (not in an inner transform of its own)."""
    return bool(_ACTIVE) and torch._C._are_functorch_transforms_active() and functorch.current_level() == _ACTIVE[-1][0]


def physical(t: Tensor) -> Tensor:
    """The stacked (N, ...) tensor behind a copy's tensor inside a SeedBatch update (copy k at index k)."""
    level, n = _ACTIVE[-1]
    return functorch._remove_batch_dim(t, level, n, 0)


def _stacked(t: Tensor | None) -> Tensor | None:
    """`physical(t)`, or an unbatched tensor expanded to every copy (one value shared by all)."""
    if t is None:
        return None
    level, n = _ACTIVE[-1]
    return physical(t) if functorch.maybe_get_level(t) == level else t.expand(n, *t.shape)


def stacked_call(fn: Callable[..., Tensor], *tensors: Tensor | None) -> Tensor:
    """Inside a SeedBatch update: fn on the copies' stacked (N, ...) tensors, outside vmap (an autograd.Function
    of offbench/nets.py that loops over the copies with the single-seed kernels, say), its (N, ...) result
    handed back as each copy's own. Autograd records it on the stacked tensors, where optimize() runs backward."""
    stacked = [_stacked(t) for t in tensors]
    with outside_vmap():
        out = fn(*stacked)
    return functorch._add_batch_dim(out, 0, _ACTIVE[-1][0])


class CopyRNG:
    """The global RNG states of N copies (CPU, and the CUDA device's when training there)."""

    def __init__(self, cpu: list[Tensor], cuda: list[Tensor] | None = None) -> None:
        self.cpu, self.cuda = list(cpu), None if cuda is None else list(cuda)

    @classmethod
    def capture(cls, cuda: bool) -> tuple[Tensor, Tensor | None]:
        """The current global states: what one copy starts from."""
        return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None

    def draw(self, k: int, fn: Callable[[], Any]) -> Any:
        """fn() under copy k's RNG states, which then move on; the global states are left as they were."""
        saved = self.capture(self.cuda is not None)
        torch.set_rng_state(self.cpu[k])
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[k])
        try:
            return fn()
        finally:
            self.cpu[k] = torch.get_rng_state()
            if self.cuda is not None:
                self.cuda[k] = torch.cuda.get_rng_state()
            torch.set_rng_state(saved[0])
            if saved[1] is not None:
                torch.cuda.set_rng_state(saved[1])


class _PerCopyCalls(TorchFunctionMode):
    """Inside a SeedBatch update: each random function in RANDOM_FUNCTIONS called once per copy, under that
    copy's RNG state, with that copy's slice of any batched argument; the results stacked and wrapped back.
    (The in-place foreach kernels of FOREACH_IN_PLACE are run on the stacked tensors here too.)"""

    def __init__(self, rng: CopyRNG) -> None:
        super().__init__()
        self.rng = rng

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in _INTERCEPTED or not in_seed_batch():
            return func(*args, **kwargs)
        if func in FOREACH_IN_PLACE:
            return foreach_stacked(func, *args, **kwargs)
        level, n = _ACTIVE[-1]
        flat, spec = pytree.tree_flatten((args, kwargs))
        batched = [torch.is_tensor(x) and functorch.maybe_get_level(x) == level for x in flat]
        flat = [physical(x) if b else x for x, b in zip(flat, batched)]
        in_place_on_copies = func in RANDOM_IN_PLACE and batched[0]
        with outside_vmap():
            outs = []
            for k in range(n):
                copy_args = [x[k] if b else x for x, b in zip(flat, batched)]
                if func in RANDOM_IN_PLACE and not batched[0]:  # one tensor for all copies: each fills its own
                    copy_args[0] = copy_args[0].clone()
                a, kw = pytree.tree_unflatten(copy_args, spec)
                outs.append(self.rng.draw(k, lambda a=a, kw=kw: func(*a, **kw)))
            if in_place_on_copies:  # the copies' slices were filled in place
                return args[0]
            out = torch.stack(outs)
        return functorch._add_batch_dim(out, 0, level)


def foreach_stacked(op: Callable[..., Any], targets: list[Tensor], *args: Any, **kwargs: Any) -> None:
    """An in-place foreach kernel `op(targets, *args)` inside a SeedBatch update, run on the stacked tensors
    behind the copies' (every copy at once, outside vmap): foreach kernels have no batching rule."""
    level = _ACTIVE[-1][0]
    if not all(functorch.maybe_get_level(t) == level for t in targets):
        raise ContractError(f"{op.__name__} inside a SeedBatch update must write parameters or buffers of the module")
    args = tuple([_stacked(x) for x in a] if isinstance(a, (list, tuple)) and a and torch.is_tensor(a[0]) else a for a in args)
    with outside_vmap():
        op([physical(t) for t in targets], *args, **kwargs)


def stack_batches(batches: Sequence[Any]) -> Any:
    """N batches (a Batch, WindowBatch or other pytree of tensors) as one with a leading copy dimension."""
    return pytree.tree_map(lambda *xs: torch.stack(xs) if torch.is_tensor(xs[0]) else xs[0], *batches)


class SeedBatch:
    """N copies of one algorithm trained as one batched computation (see the module docstring).

    modules: the copies, one class and one set of hyperparameters, each built, seeded and set up as its
        single-seed run would be, with its optimisers made (configure_optimizers) and switched to the fused
        kernels as training does (OfflineRLModule.on_train_start); copy k keeps its own weights.
    rng: the copies' global RNG states at the start of training (CopyRNG); by default each copy continues
        from the current global state (fine for speed, not for equality with single-seed runs).
    """

    def __init__(self, modules: Sequence[OfflineRLModule], rng: CopyRNG | None = None) -> None:
        if len(modules) < 1:
            raise SeedBatchError("a SeedBatch needs at least one copy")
        cls = type(modules[0])
        if any(type(m) is not cls for m in modules):
            raise SeedBatchError("the copies of a SeedBatch must be one algorithm (one module class)")
        reason = unbatchable_reason(cls)
        if reason:
            raise SeedBatchError(f"{cls.__name__} cannot train its seeds as one batched computation: {reason}")
        self.modules = list(modules)
        self.n = len(modules)
        self.template = modules[0]
        if rng is None:
            cpu, cuda = CopyRNG.capture(self.template.device.type == "cuda")
            rng = CopyRNG([cpu] * self.n, None if cuda is None else [cuda] * self.n)
        self.rng = rng
        self._names = [name for name, _ in self.template.named_parameters()]
        self._buffer_names = [name for name, _ in self.template.named_buffers() if name != "updates"]
        self.params = {
            name: nn.Parameter(torch.stack([_get(m, name).detach() for m in modules]), requires_grad=_get(self.template, name).requires_grad)
            for name in self._names
        }
        self.buffers = {name: torch.stack([_get(m, name) for m in modules]) for name in self._buffer_names}
        self._originals = {name: _get(self.template, name) for name in self._names + self._buffer_names}
        self._optimizers = self._stacked_optimizers()
        self._vmapped = torch.func.vmap(self._one_update, in_dims=(0, 0, 0), randomness="error")

    # --- construction -----------------------------------------------------------------------
    def _stacked_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Each optimiser attribute of the template rebuilt over the stacked parameters, the copies' states
        stacked; learning-rate schedulers follow their optimiser."""
        names = {id(p): name for name, p in self.template.named_parameters()}
        stacked: dict[str, torch.optim.Optimizer] = {}
        for attr, opt in vars(self.template).items():
            if not isinstance(opt, torch.optim.Optimizer):
                continue
            copies = [getattr(m, attr) for m in self.modules]
            groups = []
            for group in opt.param_groups:
                options = {key: value for key, value in group.items() if key != "params"}
                groups.append({**options, "params": [self.params[names[id(p)]] for p in group["params"]]})
            new = type(opt)(groups)
            for i, p in enumerate(group_params(opt)):
                states = [c.state.get(group_params(c)[i], {}) for c in copies]
                if states[0]:
                    new.state[self.params[names[id(p)]]] = {
                        key: torch.stack([s[key] for s in states]) if torch.is_tensor(value) and value.dim() > 0 else value
                        for key, value in states[0].items()
                    }
            stacked[attr] = new
        replacing = {id(getattr(self.template, attr)): new for attr, new in stacked.items()}
        for value in vars(self.template).values():  # schedulers step the stacked optimiser from now on
            if isinstance(value, torch.optim.lr_scheduler.LRScheduler) and id(value.optimizer) in replacing:
                value.optimizer = replacing[id(value.optimizer)]
                # what the scheduler's own wrapper of optimizer.step() marks (else torch warns at its step())
                value.optimizer.step = _mark_stepped(value.optimizer)
        return stacked

    # --- one update of every copy -----------------------------------------------------------
    def run_update(self, batches: Sequence[Any]) -> dict[str, Tensor]:
        """One update of each copy on its batch (batches[k] for copy k); metrics (N,) per name."""
        template = self.template
        if template.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        saved = {attr: vars(template)[attr] for attr in self._optimizers}
        vars(template).update(self._optimizers)
        template.optimize = self._optimize  # type: ignore[method-assign]
        try:
            with _PerCopyCalls(self.rng):
                metrics = self._vmapped(self.params, self.buffers, stack_batches(batches))
        except RuntimeError as e:
            if "randomness error mode" in str(e):
                raise ContractError(
                    f"{type(template).__name__}.update() draws random numbers with an operation that a SeedBatch cannot give "
                    "each copy its own stream of: use " + ", ".join(sorted(f.__name__ for f in RANDOM_FUNCTIONS))
                    + " (offbench/seeds.py), or set the class attribute `unbatchable` to say why it cannot be batched"
                ) from e
            raise
        finally:
            del template.optimize
            vars(template).update(saved)
            self._restore()
        self._check_no_leaks()
        template.step += 1
        template.updates += 1
        for m in self.modules:  # each copy's counters follow (its weights live in the stacked tensors)
            if m is not template:
                m.step = template.step
                m.updates.copy_(template.updates)
        return metrics

    def _one_update(self, params: dict[str, Tensor], buffers: dict[str, Tensor], batch: Any) -> dict[str, Tensor]:
        for name, value in (params | buffers).items():
            _set(self.template, name, value)
        _ACTIVE.append((functorch.current_level(), self.n))
        try:
            return self.template.update(batch)
        finally:
            _ACTIVE.pop()

    def _restore(self) -> None:
        for name, value in self._originals.items():
            _set(self.template, name, value)

    def _optimize(self, optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float | None = None,
                  clip: Callable[[list[Tensor]], None] | None = None) -> None:
        """OfflineRLModule.optimize for N copies: backward of the sum of the copies' losses, clipping per copy."""
        if functorch.maybe_get_level(loss) != _ACTIVE[-1][0]:
            raise ContractError(f"{type(self.template).__name__}: a loss passed to optimize() depends on no parameter or batch")
        losses = physical(loss)
        with outside_vmap():
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            grads = [p.grad for p in group_params(optimizer) if p.grad is not None]
            for k in range(self.n):  # each copy's gradients, clipped as its single-seed run clips them
                own = [g[k] for g in grads]
                if max_grad_norm is not None:
                    clip_grad_norm(own, max_grad_norm)
                if clip is not None:
                    clip(own)
            optimizer.step()

    def _check_no_leaks(self) -> None:
        for name, value in vars(self.template).items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            if any(torch.is_tensor(v) and functorch.is_batchedtensor(v) for v in values):
                raise ContractError(
                    f"{type(self.template).__name__}.update() keeps a tensor in the attribute `{name}`, which holds one tensor "
                    "for all copies of a SeedBatch: register it as a buffer (self.register_buffer), or set the class "
                    "attribute `unbatchable` to say why the algorithm cannot be batched (offbench/seeds.py)"
                )

    # --- copies as single modules -----------------------------------------------------------
    def unstack(self, copies: Sequence[int] | None = None) -> list[OfflineRLModule]:
        """Write each copy's parameters, buffers, optimiser states and learning-rate schedulers back into its own
        module (for its evaluation, checkpoint or a single-seed continuation); returns the modules.
        copies: which (all by default)."""
        names = {id(p): name for name, p in self.template.named_parameters()}
        schedulers = {attr: value for attr, value in vars(self.template).items()
                      if isinstance(value, torch.optim.lr_scheduler.LRScheduler)}
        with torch.no_grad():
            for k in range(self.n) if copies is None else copies:
                m = self.modules[k]
                for attr, scheduler in schedulers.items():  # only the template's steps (the stacked optimiser)
                    if getattr(m, attr) is not scheduler:
                        getattr(m, attr).load_state_dict(scheduler.state_dict())
                for name in self._names:
                    _get(m, name).copy_(self.params[name][k])
                for name in self._buffer_names:
                    _get(m, name).copy_(self.buffers[name][k])
                for attr, stacked in self._optimizers.items():
                    own = getattr(m, attr)
                    for p, q in zip(group_params(getattr(self.template, attr)), group_params(own)):
                        state = stacked.state.get(self.params[names[id(p)]])
                        if state:
                            own.state[q] = {key: value[k].clone() if torch.is_tensor(value) and value.dim() > 0 else
                                            (value.clone() if torch.is_tensor(value) else value) for key, value in state.items()}
                    for g_own, g in zip(own.param_groups, stacked.param_groups):
                        g_own["lr"] = g["lr"]
        return self.modules


def _mark_stepped(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """optimizer.step, wrapped as an LRScheduler wraps its optimiser's (torch checks for the mark)."""
    step = optimizer.step

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return wrapper


def group_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _get(module: nn.Module, name: str) -> Tensor:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return sub._parameters[leaf] if leaf in sub._parameters else sub._buffers[leaf]


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    """Put `value` where the parameter or buffer `name` is, bypassing nn.Module's type checks (a vmap-wrapped
    tensor in place of a Parameter), so the module's own code and `parameters()` see it."""
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    (sub._parameters if leaf in sub._parameters else sub._buffers)[leaf] = value
