"""`offbench fit ... --seeds 0,1,2,3`: N seeds of one run in one process, their updates one batched computation.

Each seed is a complete `offbench fit` run, made by the same code as a single-seed run: its own run directory
(runs/<algorithm>/<dataset>/seed<N>), config.yaml, metrics.csv, checkpoints, evaluations and result.json, so
tables cannot tell the difference. Only the updates are shared: when every seed's run has reached its next
update, the N updates run as one call of offbench/seeds.py's `SeedBatch` (torch.func.vmap over the algorithm's
own `update`).

How the runs share a process: each seed's run (Lightning's fit loop, callbacks, loggers) runs in a thread of its
own, but only one thread runs at a time: a baton passes from seed to seed at each update (`Lockstep.update`),
and with it the process's global random states (torch's CPU and CUDA generators, numpy's, Python's, and
Lightning's PL_GLOBAL_SEED): each run sees its own streams exactly as it would alone, and the batched update
draws each copy's random numbers from that copy's saved state (offbench/seeds.py). Threads here are turns, not
parallelism: nothing runs concurrently.

Resuming (`--ckpt_path last`): each seed resumes its own run directory's last checkpoint. An interruption
between two seeds' checkpoint writes can leave them at different update counts; a seed behind the others then
trains on alone (its own single-seed updates, evaluations and checkpoints) until it has caught up, and from
there the seeds train together again: nothing is lost and every seed continues exactly. A seed without a
checkpoint starts from the beginning; a seed whose run finished (result.json) is not trained again. Ctrl-C
(in the main thread) stops every seed at its next update or block; the checkpoints written stay.

An algorithm that cannot be batched (its class attribute `unbatchable`) runs its seeds one after another in
the process, each a plain single-seed run, after a line saying so. Not combined with --seeds (each refused with
a message): --compile, --logger wandb, and one --trainer.default_root_dir for several seeds (use `{seed}` in it).
"""

from __future__ import annotations

import os
import random
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from offbench.errors import UserError
from offbench.module import OfflineRLModule
from offbench.seeds import CopyRNG, SeedBatch, unbatchable_reason


class SeedsStopped(RuntimeError):
    """Raised in a seed's run when another seed's run failed or was interrupted (that one's error is reported)."""


class SeedFinished(Exception):
    """Raised before a resumed seed's run when its run directory already holds its result: nothing to train."""


def split_seeds(argv: list[str]) -> tuple[list[str], list[int] | None]:
    """`argv` without `--seeds LIST` (or `--seeds=LIST`), and the seeds it names (None: not given).
    LIST: integers and ranges separated by commas, `0,1,2,3` or `0-3`."""
    out, spec = [], None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--seeds" or word.startswith("--seeds="):
            if spec is not None:
                raise UserError("--seeds is given twice: give it once, e.g. --seeds 0,1,2,3")
            if "=" in word:
                spec = word.partition("=")[2]
            elif i + 1 < len(argv):
                spec, i = argv[i + 1], i + 1
            else:
                raise UserError("--seeds needs a list of seeds, e.g. --seeds 0,1,2,3 or --seeds 0-3")
        else:
            out.append(word)
        i += 1
    for i, word in enumerate(out):  # `--seed 0,1` for `--seeds 0,1`: say so, not "expected type int"
        key, eq, inline = word.partition("=")
        value = inline if eq else (out[i + 1] if i + 1 < len(out) else "")
        if key in ("--seed", "--seed_everything") and "," in value:
            raise UserError(f"{key} {value} names several seeds: one run per seed in this process is --seeds {value}")
    return out, None if spec is None else parse_seeds(spec)


def parse_seeds(spec: str) -> list[int]:
    """`0,1,2,3` or `0-3` or `0-3,8`: the seeds, in the order given; a repeated seed is an error."""
    seeds: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if not match:
            raise UserError(f"--seeds {spec}: expected integers and ranges separated by commas, e.g. --seeds 0,1,2,3 or 0-3")
        first, last = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
        if last < first:
            raise UserError(f"--seeds {spec}: the range {part.strip()} is empty (write the smaller seed first)")
        seeds += range(first, last + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds {spec} names seed {repeated[0]} twice: each seed is one run")
    return seeds


def check_seeds_argv(argv: list[str], seeds: list[int]) -> None:
    """The settings that do not combine with --seeds, refused before anything is built."""
    for i, word in enumerate(argv):
        key, eq, inline = word.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if key == "--seed_everything":
            raise UserError("--seeds names the runs' seeds: leave out --seed_everything (--seed)")
        if key == "--compile" and value.lower() in ("true", "yes", "1"):
            raise UserError("--compile true does not combine with --seeds (the batched update runs eager): drop one of them")
        if key == "--logger" and value == "wandb":
            raise UserError("--logger wandb does not combine with --seeds yet (one W&B run per process): run the seeds "
                            "one by one, or leave out --logger wandb")
        if key == "--trainer.default_root_dir" and len(seeds) > 1 and "{seed}" not in value:
            raise UserError(f"--trainer.default_root_dir (--out) {value} names one run directory, and each of --seeds needs "
                            "its own: put {seed} in it (e.g. --out runs/mine/seed{seed}), or leave it out for "
                            "runs/<algorithm>/<dataset>/seed<N>")


class Lockstep:
    """The baton and the shared update of N seeds' runs, each run in its own thread (one runs at a time)."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = list(seeds)
        self.n = len(seeds)
        self.cond = threading.Condition()
        self.turn = 0  # the copy whose thread runs now
        self.finished = [False] * self.n  # its thread has ended
        self.skipped = [False] * self.n  # resumed, and its run had finished already: not trained here
        self.errors: list[tuple[int, BaseException]] = []
        self.interrupted = False
        self.states: list[tuple[Any, ...] | None] = [None] * self.n  # each waiting copy's global random states
        self.modules: list[OfflineRLModule | None] = [None] * self.n
        self.roots: dict[str, int] = {}  # run directory -> copy: two seeds never share one
        self.pending: list[Any] = [None] * self.n  # each copy's batch of the update in progress
        self.counts: list[int | None] = [None] * self.n  # updates done by each copy before its pending update
        self.batch: SeedBatch | None = None
        self.metrics: dict[str, torch.Tensor] = {}
        self.serial = ""  # why the seeds run one after another ('' : batched)
        self.ended = [threading.Event() for _ in seeds]  # copy k's thread has passed the baton for the last time

    # --- turns ----------------------------------------------------------------------------------
    def run(self, k: int, fit: Callable[[], None]) -> None:
        """Thread body of copy k: its single-seed fit, in turns with the other copies."""
        self._wait_turn(k)
        try:
            if not self.errors and not self.interrupted:
                fit()
        except SeedFinished as e:
            self.skipped[k] = True
            print(e, file=sys.stderr)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread (fit_seeds)
            if not isinstance(e, SeedsStopped):
                self.errors.append((k, e))
        finally:
            try:
                self.finished[k] = True
                self._pass_turn(k, wait=False)
            finally:
                self.ended[k].set()  # whatever happens, fit_seeds must not wait for this copy forever

    def _wait_turn(self, k: int) -> None:
        with self.cond:
            while self.turn != k:
                self.cond.wait()
        if self.states[k] is not None:
            _set_global_states(self.states[k])

    def _pass_turn(self, k: int, wait: bool = True) -> None:
        """Give the baton (and this copy's random states) to the next unfinished copy; with `wait`, until it comes back."""
        self.states[k] = _global_states()
        with self.cond:
            waiting = [j for j in range(k + 1, k + 1 + self.n) if not self.finished[j % self.n]]
            if waiting:
                self.turn = waiting[0] % self.n
            self.cond.notify_all()
        if wait:
            self._wait_turn(k)

    def _stop_if_failed(self, k: int) -> None:
        if self.errors or self.interrupted:
            raise SeedsStopped(f"seed {self.seeds[k]} stopped with the other seeds")
        if any(f and not skipped for f, skipped in zip(self.finished, self.skipped)):
            raise SeedsStopped(f"seed {self.seeds[k]}: another seed's run ended before this one (their --updates differ?)")

    # --- the runs' hooks --------------------------------------------------------------------------
    def claim(self, k: int, root: Any) -> None:
        """Copy k's run directory, before its lock is taken: two seeds never share one."""
        other = self.roots.setdefault(os.path.abspath(root), k)
        if other != k:
            raise UserError(f"seeds {self.seeds[other]} and {self.seeds[k]} would share the run directory {root}: "
                            "give each its own (put {seed} in --trainer.default_root_dir, or leave it out)")

    def attach(self, k: int, module: OfflineRLModule) -> None:
        """Called by copy k's run before its fit: route its updates through the lockstep (see the docstring)."""
        training_step = module.training_step

        def block(*args: Any, **kwargs: Any) -> Any:
            if self.interrupted:  # Ctrl-C (fit_seeds): also a seed running alone stops within a block
                raise SeedsStopped(f"seed {self.seeds[k]} interrupted")
            out = training_step(*args, **kwargs)
            if self.batch is not None:  # the block's end: the copy's own tensors for its logs, evaluation, checkpoint
                self.batch.unstack([self._position(k)])
            return out

        module.training_step = block  # type: ignore[method-assign]
        reason = unbatchable_reason(type(module))
        if reason or self.serial:
            if not self.serial:
                self.serial = reason
                print(f"{type(module).__name__} cannot train its seeds as one batched computation ({reason}): seeds "
                      f"{','.join(map(str, self.seeds))} run one after another in this process", file=sys.stderr)
            return
        self.modules[k] = module
        module.run_update = lambda batch: self.update(k, batch)  # type: ignore[method-assign]

    def update(self, k: int, batch: Any) -> dict[str, torch.Tensor]:
        """Copy k's update: its batch waits for the other copies' at the same update count, then all run as one
        SeedBatch update. A copy behind another (resumed from an earlier checkpoint) updates alone until level."""
        module = self.modules[k]
        assert module is not None
        count = module.step
        self._stop_if_failed(k)
        self.pending[k], self.counts[k] = batch, count
        while self.counts[k] is not None:  # cleared by the batched update that did it
            self._stop_if_failed(k)
            if count < max(c for c in self.counts if c is not None):  # behind: catch up alone, as its own run would
                self.pending[k], self.counts[k] = None, None
                return OfflineRLModule.run_update(module, batch)
            if all(skipped or c == count for c, skipped in zip(self.counts, self.skipped)):
                self.states[k] = _global_states()
                self._batched_update()
                _set_global_states(self.states[k])
            else:
                self._pass_turn(k)
        return {name: value[self._position(k)] for name, value in self.metrics.items()}

    def _position(self, k: int) -> int:
        """Copy k's index in the SeedBatch (the copies that train here, in order)."""
        return sum(m is not None for m in self.modules[:k])

    def _batched_update(self) -> None:
        batched = [j for j, m in enumerate(self.modules) if m is not None]  # the copies that train here, in order
        states = [self.states[j] for j in batched]
        rng = CopyRNG([s[0] for s in states], None if any(s[1] is None for s in states) else [s[1] for s in states])
        if self.batch is None:  # every copy at the same count: their states as their runs left them
            self.batch = SeedBatch([self.modules[j] for j in batched], rng)
        self.batch.rng.cpu, self.batch.rng.cuda = rng.cpu, rng.cuda
        self.metrics = self.batch.run_update([self.pending[j] for j in batched])
        for i, j in enumerate(batched):  # each copy's random states moved on by its own draws
            cuda = self.batch.rng.cuda[i] if self.batch.rng.cuda is not None else states[i][1]
            self.states[j] = (self.batch.rng.cpu[i], cuda, *states[i][2:])
        self.pending = [None] * self.n
        self.counts = [None] * self.n


def _global_states() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(), os.environ.get("PL_GLOBAL_SEED")


def _set_global_states(state: tuple[Any, ...]) -> None:
    cpu, cuda, numpy_state, python_state, seed = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if seed is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed


def fit_seeds(argv: list[str], seeds: list[int], run_fit: Callable[[list[str], Lockstep, int], None]) -> None:
    """Train `seeds` of the run `argv` (fit's arguments without a seed) in this process: `run_fit(argv_k,
    lockstep, k)` is copy k's single-seed fit (offbench/run/fit.py), here run in turns (see the docstring)."""
    check_seeds_argv(argv, seeds)
    lockstep = Lockstep(seeds)
    threads = []
    for k, seed in enumerate(seeds):
        argv_k = [word.replace("{seed}", str(seed)) for word in argv] + ["--seed_everything", str(seed)]
        threads.append(threading.Thread(target=lockstep.run, args=(k, lambda a=argv_k, k=k: run_fit(a, lockstep, k)),
                                        name=f"offbench-seed{seed}", daemon=True))
    for thread in threads:
        thread.start()
    # Waits on the runs' own `ended` events, not Thread.join: a Thread.join that Ctrl-C interrupts while the thread
    # runs can mark that thread as ended (CPython 3.11's bpo-45274 handler releases the running thread's lock), and
    # the process would then exit under a training thread (measured: "terminate called without an active exception").
    interrupted = False
    try:
        for ended in lockstep.ended:
            while not ended.wait(timeout=0.5):  # a short wait: Ctrl-C reaches this (main) thread
                pass
    except KeyboardInterrupt:  # Ctrl-C reaches the main thread only
        interrupted = lockstep.interrupted = True  # each run stops at its next update; checkpoints already written stay
        for ended in lockstep.ended:
            ended.wait()
    for thread in threads:
        thread.join()  # the threads' last steps after their run (a join that nothing interrupted)
    if interrupted:
        print("interrupted: each seed's run keeps its last checkpoint; continue with the same command and "
              "--ckpt_path last", file=sys.stderr)
        raise SystemExit(1) from None
    if lockstep.errors:
        k, error = lockstep.errors[0]
        others = [str(s) for j, s in enumerate(seeds) if j != k and not lockstep.skipped[j]]
        stopped = f"; seeds {','.join(others)} stopped with it (their last checkpoints stay)" if others else ""
        if isinstance(error, UserError):
            raise UserError(f"seed {seeds[k]}: {error}{stopped}") from error
        print(f"offbench: seed {seeds[k]} failed{stopped}:", file=sys.stderr)
        raise error
