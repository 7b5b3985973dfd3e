"""Dataset identity: which bytes a run was trained on.

A dataset name is not an identity: `forge/...` data depends on the machine that forged it (its SAC run
is a float32 CPU computation), a D4RL file can be re-downloaded in another version, a user's file can be
rewritten. Every run therefore records the *fingerprint* of the arrays it read (result.json `data`), the
tables refuse to pool runs of different fingerprints in one cell, and `offbench data info` prints it.

The fingerprint is the first 16 hex digits of a SHA-256 over the dataset's arrays as loaded, before any
transform (reward tuning, observation normalisation, action clipping): observations, actions, rewards,
next observations, terminals, episode ids and steps (the last two carry the episode boundaries, so
timeouts count), each with its name, dtype and shape. It depends on the arrays only, not on the container
(a file rewritten with other compression or attributes keeps it; the D4RL-layout HDF5 and the Minari copy of one
dataset differ, since the HDF5 layout drops each truncated episode's last transition). For a file it is computed
once and cached beside it
(`<file>.fingerprint.json`, keyed by the file's size and modification time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from offbench.batch import Transitions
from offbench.data.catalog import DatasetInfo
from offbench.data.sources import local_path
from offbench.errors import UserError
from offbench.files import write_json_atomic

FIELDS = ("obs", "act", "rew", "next_obs", "done", "episode", "step")
CACHE_SUFFIX = ".fingerprint.json"


def fingerprint(t: Transitions) -> str:
    """16 hex digits of SHA-256 over the arrays of `t` (FIELDS, each with its name, dtype and shape)."""
    h = hashlib.sha256()
    for name in FIELDS:
        array = np.ascontiguousarray(getattr(t, name))
        h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def cached_fingerprint(t: Transitions, path: str | Path | None) -> str:
    """`fingerprint(t)` of the data read from the file `path`, cached beside it while the file is unchanged
    (same size and modification time). Without a path (data made in memory) it is computed each time;
    a folder where the cache cannot be written (read-only) only costs the recomputation."""
    if path is None or not Path(path).is_file():
        return fingerprint(t)
    path = Path(path)
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = path.with_name(path.name + CACHE_SUFFIX)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        stored = json.loads(cache.read_text())
        if {k: stored[k] for k in key} == key and isinstance(stored["fingerprint"], str):
            return stored["fingerprint"]
    value = fingerprint(t)
    with contextlib.suppress(OSError, UserError):  # write_json_atomic reports a failed write as a UserError
        write_json_atomic(cache, {**key, "fingerprint": value, "fields": list(FIELDS)})
    return value


def checked_fingerprint(t: Transitions, info: DatasetInfo) -> str:
    """The fingerprint of dataset `info`'s arrays `t` (cached beside its file); a UserError when `info` pins
    another one (a shipped dataset whose file was changed or damaged)."""
    if info.fingerprint is None:
        return cached_fingerprint(t, local_path(info))
    value = fingerprint(t)  # a pinned dataset is checked on every load (its folder may be read-only, or a checkout)
    if value != info.fingerprint:
        raise UserError(
            f"{info.name}: the data at {info.location} has fingerprint {value}, but {info.name} is pinned to "
            f"{info.fingerprint}: the file was changed or damaged; restore it (`git checkout -- {info.location}` in "
            "a checkout of offbench, or reinstall offbench)"
        )
    return value
