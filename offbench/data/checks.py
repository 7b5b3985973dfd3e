"""Checks of a dataset against its evaluation env, run before the first update (and shown by
`offbench data info`): every problem names the dataset's file (or id) and the field.

Errors: no transitions; observation or action sizes other than the env's; actions outside the env's
action bounds (unless they are clipped on request: --data.clip_actions true). Warnings: values so
large (|x| > EXTREME) that observation normalisation (float32 mean and std) and the losses break.
NaN/inf values and terminals or timeouts other than 0/1 are refused when a file is read
(offbench/data/sources.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from offbench.batch import Transitions

EXTREME = 1e6  # |value| above which a feature is reported: float32 statistics lose their precision


@dataclass
class DataCheck:
    """What the checks found: errors (`problems`), `warnings`, and the action ranges compared."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outside_rows: int = 0  # transitions with an action outside the env's bounds
    env_low: np.ndarray | None = None
    env_high: np.ndarray | None = None
    data_min: np.ndarray | None = None
    data_max: np.ndarray | None = None


def check_transitions(
    t: Transitions, where: str, env_id: str, env_obs_dim: int, low: np.ndarray, high: np.ndarray,
    clip_flag: str = "--data.clip_actions true",
) -> DataCheck:
    """Check `t` (read from `where`) against the evaluation env `env_id`: its observation size and its
    Box action bounds `low`, `high`. `clip_flag` is the calling command's way to clip actions to the bounds."""
    check = DataCheck(env_low=low, env_high=high)
    if len(t) == 0:
        check.problems.append(f"{where}: no transitions (an empty dataset)")
        return check
    if t.obs_dim != env_obs_dim:
        check.problems.append(
            f"{where}: 'observations' are {t.obs_dim}-dim but the evaluation env {env_id} gives {env_obs_dim}-dim "
            "observations: pass the env the data was collected in (--data.env_id)"
        )
    check.data_min, check.data_max = t.act.min(0), t.act.max(0)
    if t.act_dim != len(low):
        check.problems.append(
            f"{where}: 'actions' are {t.act_dim}-dim but the evaluation env {env_id} takes {len(low)}-dim actions: "
            "pass the env the data was collected in (--data.env_id)"
        )
    else:
        tolerance = 1e-6 * np.maximum(1.0, np.maximum(np.abs(low), np.abs(high)))  # float32 rounding of the bounds
        outside = (t.act < low - tolerance) | (t.act > high + tolerance)
        check.outside_rows = int(outside.any(axis=1).sum())
        if check.outside_rows:
            features = np.flatnonzero(outside.any(axis=0))
            ranges = ", ".join(
                f"feature {i}: data {check.data_min[i]:.4g}..{check.data_max[i]:.4g}, env {low[i]:.4g}..{high[i]:.4g}"
                for i in features[:5]
            )
            check.problems.append(
                f"{where}: 'actions' of {check.outside_rows} of {len(t)} transitions are outside the action bounds of "
                f"{env_id} ({ranges}): the policy could never take them. Check --data.env_id, or pass "
                f"{clip_flag} to clip them to the bounds"
            )
    for name, array in (("observations", t.obs), ("actions", t.act), ("rewards", t.rew[:, None])):
        peak = np.abs(array).max(axis=0)
        for i in np.flatnonzero(peak > EXTREME)[:5]:
            feature = "" if name == "rewards" else f" feature {i}"
            check.warnings.append(
                f"{where}: '{name}'{feature} reaches {peak[i]:.3g}; values this large break observation normalisation "
                "and the losses (float32): rescale or drop it"
            )
    return check
