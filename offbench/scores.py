"""D4RL reference scores and the normalized score.

score = 100 * (return - ref_min) / (ref_max - ref_min): 0 is a random policy, 100 an expert
(D4RL's `infos.py`; the -v2 locomotion datasets reuse the -v0 values). AntMaze is 0/1 per episode,
so its normalized score is the success rate in percent.
"""

from __future__ import annotations

import numpy as np

# family -> (ref_min, ref_max), from D4RL's infos.py (REF_MIN_SCORE / REF_MAX_SCORE)
REF_SCORES: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "antmaze": (0.0, 1.0),
}


def normalized_score(ret: float | np.ndarray, ref_min: float, ref_max: float) -> float | np.ndarray:
    """D4RL normalized score in percent, for one return or an array of returns."""
    if ref_max == ref_min:
        raise ValueError(f"ref_max equals ref_min ({ref_min}): the normalized score is undefined")
    return 100.0 * (ret - ref_min) / (ref_max - ref_min)
