"""Checks of an algorithm's settings, called explicitly at the top of its __init__.

A setting outside its valid range is a user's config mistake: it stops the run when the module is
built (not at the first update or evaluation, and not as a raw error from deep inside torch) with one
line that names the setting as a config writes it and says what is valid, e.g.

    model.init_args.n_timesteps must be a positive integer (>= 1), got -5

Each check raises offbench.errors.UserError (`offbench` prints it as one line and exits with status 2).
Usage, at the top of an algorithm's __init__ (the ranges come from the maths of each setting; where 0
is meaningful, e.g. a weight that switches a term off, the rule allows it and the call says why):

    from offbench import settings as check
    check.integer("policy_every", policy_every)            # >= 1
    check.learning_rate("actor_lr", actor_lr)              # >= 0 (0 freezes the network)
    check.interval("gamma", gamma, "[0, 1)")
    check.positive("max_grad_norm", max_grad_norm, or_null="no clipping")
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from offbench.errors import UserError

# Settings renamed for one naming scheme: old name -> new. A config key, a command-line flag, a subclass's
# keyword or its `self.hparams.lr` under the old name all get the same one-line message.
RENAMED = {"lr": "actor_lr", "policy_freq": "policy_every"}

PREFIX = "model.init_args."  # the settings' place in a config (`--model.init_args.NAME` on the command line)


def _show(value: Any) -> str:
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value.item() if hasattr(value, "item") else value)  # numpy scalars as plain numbers
    return repr(value)


def env_sizes(obs_dim: Any, act_dim: Any, max_action: Any) -> None:
    """The three arguments of every algorithm that the CLI fills from the dataset (offbench/module.py's
    contract): observation and action sizes of at least 1, a positive action bound."""
    integer("obs_dim", obs_dim)
    integer("act_dim", act_dim)
    positive("max_action", max_action)


def require(ok: bool, name: str, value: Any, expected: str) -> None:
    """Raise the user error "model.init_args.NAME must be EXPECTED, got VALUE" unless `ok`."""
    if not ok:
        raise UserError(f"{PREFIX}{name} must be {expected}, got {_show(value)}")


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _or_null(expected: str, or_null: str | None) -> str:
    return f"{expected} or null ({or_null})" if or_null else expected


def integer(name: str, value: Any, low: int = 1, high: int | None = None, note: str = "", or_null: str | None = None) -> None:
    """An integer in [low, high] (high: no bound when None); `note` is appended to the expected range,
    `or_null` (what null means) also allows None."""
    if or_null and value is None:
        return
    if high is not None:
        expected = f"an integer in [{low}, {high}]"
    else:
        expected = {1: "a positive integer (>= 1)", 0: "a non-negative integer (>= 0)"}.get(low, f"an integer >= {low}")
    ok = is_integer(value) and value >= low and (high is None or value <= high)
    require(ok, name, value, _or_null(expected + note, or_null))


def positive(name: str, value: Any, note: str = "", or_null: str | None = None) -> None:
    """A number > 0 (NaN is refused, infinity allowed: e.g. a clip value of inf clips nothing)."""
    if or_null and value is None:
        return
    require(is_number(value) and value > 0, name, value, _or_null(f"a positive number (> 0){note}", or_null))


def non_negative(name: str, value: Any, note: str = "") -> None:
    """A number >= 0 (NaN refused): for weights where 0 switches a term off, and the like."""
    require(is_number(value) and value >= 0, name, value, f"a non-negative number (>= 0){note}")


def learning_rate(name: str, value: Any) -> None:
    """A learning rate: >= 0. Zero is allowed on purpose: it freezes that network (the tests of ReBRAC and
    IQL do so), eagerly; the compiled path's Adam divides by it (OfflineRLModule.enable_compile)."""
    require(is_number(value) and value >= 0, name, value, "a non-negative learning rate (>= 0; 0 freezes the network)")


def finite(name: str, value: Any) -> None:
    """Any finite number (e.g. a threshold whose sign is meaningful)."""
    require(is_number(value) and abs(value) < float("inf"), name, value, "a finite number")


def interval(name: str, value: Any, bounds: str, note: str = "") -> None:
    """A number in an interval written as in maths: "[0, 1)", "(0, 1]", "(0, 1)" or "[0, 1]" (any numbers)."""
    left, right = bounds[0], bounds[-1]
    if left not in "[(" or right not in ")]":
        raise ValueError(f"interval: bounds like '[0, 1)' expected, got {bounds!r}")
    low, high = (float(x) for x in bounds[1:-1].split(","))
    ok = is_number(value) and (low <= value if left == "[" else low < value) and (value <= high if right == "]" else value < high)
    require(ok, name, value, f"in {bounds}{note}")


def one_of(name: str, value: Any, choices: Iterable[Any]) -> None:
    """One of the given values (e.g. a solver order 1, 2 or 3)."""
    choices = list(choices)
    shown = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])
    require(not isinstance(value, bool) and value in choices, name, value, shown)


def widths(name: str, value: Any) -> None:
    """Layer widths: a list of positive integers, one per hidden layer (an empty list: no hidden layer)."""
    ok = isinstance(value, tuple | list) and all(is_integer(w) and w >= 1 for w in value)
    require(ok, name, list(value) if isinstance(value, tuple | list) else value,
            "a list of positive layer widths (each >= 1), e.g. [256, 256]")


def diffusion_steps(name: str, value: Any, beta_schedule: str) -> None:
    """The number of diffusion steps K of a discrete schedule: >= 1, and > 20 with "linear_scaled" (DDPM's
    linear betas scaled by 1000 / K end at 20 / K, which must stay below 1)."""
    if beta_schedule == "linear_scaled":
        integer(name, value, low=21, note=" with beta_schedule linear_scaled (its last beta is 20 / n_timesteps)")
    else:
        integer(name, value)
