"""Policy selection under an online-evaluation budget: the UCB budget curves of Jackson et al.

"A Clean Slate for Offline Reinforcement Learning" (Jackson et al., NeurIPS 2025, arXiv:2504.11453;
official code EmptyJackson/unifloral @ f2dc1278eae18ed3e22c92255119c54885414d17, `evaluation.py`:
`ucb`, `run_bandit`, `run_bandit_trials`, `bootstrap_confidence_interval`) count the online
evaluations that tuning spends. A set of candidate policies (hyperparameter settings x training
seeds) has each been evaluated on a pool of episodes; a bandit whose arms are the candidates and
whose pulls are evaluation episodes picks one of them, and the number reported is the true score of
the policy it picks after `b` episodes, as a function of the budget `b`.

The algorithm, as the official code runs it (one trial):

- `subsample` candidates (default 20) are drawn without replacement, in random order (all of them,
  shuffled, when there are fewer).
- Pull t = 1, 2, ...: arm values `ucb_i = m_i + sqrt(alpha * ln(t) / (n_i + 1e-9))` with `n_i` the
  arm's pulls so far, `m_i` the mean of its rewards (0 before its first pull) and alpha = 2.0; the arm
  is drawn uniformly among the arms of maximal value (at t = 1, ln 1 = 0 and every arm ties, from then
  on an unpulled arm's bonus is about 4.5e4 sqrt(ln t), so every arm is pulled once, in random order,
  before any second pull). Its reward is the normalized score of one of its pool's episodes, drawn uniformly
  WITH replacement (a pull is a fresh episode of that policy; the pool stands for its distribution).
- After the pull, the selected candidate is the arm of highest `m_i`, the first in the trial's
  (random) order on a tie. Its true score is the mean of its whole pool.

Reported for budget b: the mean over `repeats` trials (1000) of the selected candidate's true score
after b pulls, with a percentile-bootstrap confidence interval of that mean (1000 resamples of the
trials with replacement, 95%, numpy's linear percentile as `jnp.percentile`). That interval, as the
official one, measures the randomness of the selection (which episodes are drawn, ties): it is not an
interval over training seeds or over the episodes of the pools.

Quirk kept from the official code: `m_i` is 0 for an arm not yet pulled, also when the selected
candidate is chosen, so while b < candidates an unpulled arm beats pulled arms whose mean score is
negative (normalized scores below the random policy's). Deviations: randomness comes from numpy's
PCG64 (`numpy.random.default_rng(seed)`) instead of JAX's keys, so a seed gives other draws than the
official code (the same algorithm; tests/test_selection.py replays the official draws recorded in
tests/data/golden/selection.npz and compares the curves of both generators within their Monte Carlo
error); all arithmetic is float64 (the official code runs JAX's default float32); the bootstrap resamples
the trials once for all budgets (the official code draws other resamples for each pull: each budget's
interval is the same statistic, the budgets' intervals are just not independent), and only at the
reported budgets.

API: `budget_curve(pools, max_budget, seed=17)` -> `BudgetCurve` (budgets, expected, ci_low, ci_high,
oracle); `naive_score({setting: [each run's best evaluation]})`; `ucb_trials` and `random_draws` (the
trials themselves, with the caller's random choices); `sweep_parts` (a grid sweep's column name).

Beside the curve (`BudgetCurve`): the oracle, the best candidate's true score (what selection with
unlimited episodes converges to), and the naive score, `naive_score`: the best setting's mean over
seeds of each run's best evaluation, the number a paper reports when it picks hyperparameters and
checkpoints on the very evaluations it reports, with no budget counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 2.0  # official ucb_alpha
SUBSAMPLE = 20  # official num_subsample
REPEATS = 1000  # official num_repeats
BOOTSTRAPS = 1000  # official n_bootstraps
CONFIDENCE = 0.95  # official confidence
SEED = 17  # official seed
COUNT_EPSILON = 1e-9  # official: the bonus divides by n_i + 1e-9
SWEEP_MARK = "@"  # a grid sweep's column name: `<algorithm>@<key>=<value>,...` (offbench/bench/grid.py)

# choose(t, ties) -> arms: t the pull (1-based), ties (R, K) the arms of maximal UCB value per trial
Choose = Callable[[int, np.ndarray], np.ndarray]
# draw(t, arms) -> episode index in each pulled arm's pool, per trial
Draw = Callable[[int, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BudgetCurve:
    """Expected true score of the UCB-selected candidate at each budget, with its interval."""

    budgets: np.ndarray  # (B,) evaluation episodes spent, 1, 2, 4, ..., max
    expected: np.ndarray  # (B,) mean over trials of the selected candidate's true score
    ci_low: np.ndarray  # (B,) bootstrap interval of that mean
    ci_high: np.ndarray
    oracle: float  # the best candidate's true score
    candidates: int
    episodes: int  # pool size per candidate
    repeats: int
    subsample: int  # candidates per trial (min of SUBSAMPLE and the candidates)
    alpha: float
    confidence: float
    seed: int


def pool_array(pools: Sequence[Sequence[float]]) -> np.ndarray:
    """The pools as a (candidates, episodes) float64 array; a ValueError when they are empty, ragged or
    not finite (the official code takes one rectangular array too)."""
    if len(pools) == 0 or any(len(p) == 0 for p in pools):
        raise ValueError("selection needs at least one candidate, each with at least one episode score")
    sizes = sorted({len(p) for p in pools})
    if len(sizes) > 1:
        raise ValueError(f"every candidate's pool must hold the same number of episodes, got sizes {sizes}")
    scores = np.asarray(pools, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("episode scores must be finite numbers")
    return scores


def budgets_up_to(max_budget: int) -> np.ndarray:
    """1, 2, 4, ... (powers of two below `max_budget`) and `max_budget` itself."""
    if max_budget < 1:
        raise ValueError(f"the largest budget must be at least 1 episode, got {max_budget}")
    powers = [2**k for k in range(int(math.log2(max_budget)) + 1) if 2**k < max_budget]
    return np.array([*powers, max_budget], dtype=np.int64)


def ucb_trials(scores: np.ndarray, order: np.ndarray, pulls: int, choose: Choose, draw: Draw,
               alpha: float = ALPHA) -> np.ndarray:
    """Run R UCB trials side by side; the selected candidate (an index into `scores`) after each pull, (R, pulls).

    `scores` (candidates, episodes): the pools; `order` (R, K): each trial's arms, as candidate indices
    in the trial's order (its subsample). The random choices are the caller's: `choose(t, ties)` picks,
    for each trial, one arm (a column of `ties`, the (R, K) mask of the arms of maximal value) at pull t;
    `draw(t, arms)` the pulled episode of each trial's arm (`random_draws` gives the usual ones)."""
    repeats, k = order.shape
    rows = np.arange(repeats)
    pooled = scores[order]  # (R, K, E)
    counts = np.zeros((repeats, k), dtype=np.int64)
    sums = np.zeros((repeats, k))
    selected = np.empty((repeats, pulls), dtype=np.int64)
    for t in range(1, pulls + 1):
        means = sums / np.maximum(counts, 1)
        values = means + np.sqrt(alpha * math.log(t) / (counts + COUNT_EPSILON))
        arms = np.asarray(choose(t, values == values.max(axis=1, keepdims=True)))
        episodes = np.asarray(draw(t, arms))
        counts[rows, arms] += 1
        sums[rows, arms] += pooled[rows, arms, episodes]
        best = np.argmax(sums / np.maximum(counts, 1), axis=1)  # first maximum in the trial's order
        selected[:, t - 1] = order[rows, best]
    return selected


def random_draws(rng: np.random.Generator, episodes: int) -> tuple[Choose, Draw]:
    """The random choices of `ucb_trials`: a uniform arm among the tied ones, a uniform episode (with
    replacement) of the pulled arm's pool."""

    def choose(t: int, ties: np.ndarray) -> np.ndarray:
        u = rng.random(ties.shape)
        return np.argmax(np.where(ties, u, -1.0), axis=1)

    def draw(t: int, arms: np.ndarray) -> np.ndarray:
        return rng.integers(episodes, size=arms.shape)

    return choose, draw


def bootstrap_interval(rng: np.random.Generator, values: np.ndarray, resamples: int = BOOTSTRAPS,
                       confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of `values` (R, B) over its first axis, for each column:
    `resamples` means of R values drawn with replacement, their (1 -+ confidence) / 2 percentiles."""
    repeats = values.shape[0]
    means = np.stack([values[rng.integers(repeats, size=repeats)].mean(axis=0) for _ in range(resamples)])
    low = np.percentile(means, 100 * (1 - confidence) / 2, axis=0)
    high = np.percentile(means, 100 * (1 + confidence) / 2, axis=0)
    return low, high


def budget_curve(pools: Sequence[Sequence[float]], max_budget: int | None = None, *, seed: int = SEED,
                 repeats: int = REPEATS, alpha: float = ALPHA, subsample: int = SUBSAMPLE,
                 resamples: int = BOOTSTRAPS, confidence: float = CONFIDENCE) -> BudgetCurve:
    """The UCB budget curve of candidates whose pools of per-episode normalized scores are `pools`
    (one list per candidate, all of one length E), at budgets 1, 2, 4, ..., `max_budget` episodes
    (default: candidates x E, the episodes of evaluating every candidate on its whole pool).
    Deterministic given `seed`: the trials draw from numpy's default_rng(seed), the bootstrap from
    default_rng([seed, 1])."""
    scores = pool_array(pools)
    candidates, episodes = scores.shape
    budgets = budgets_up_to(max_budget or candidates * episodes)
    rng = np.random.default_rng(seed)
    k = min(subsample, candidates)
    order = np.stack([rng.permutation(candidates)[:k] for _ in range(repeats)])
    selected = ucb_trials(scores, order, int(budgets[-1]), *random_draws(rng, episodes), alpha=alpha)
    true = scores.mean(axis=1)[selected[:, budgets - 1]]  # (R, B)
    low, high = bootstrap_interval(np.random.default_rng([seed, 1]), true, resamples, confidence)
    return BudgetCurve(budgets, true.mean(axis=0), low, high, float(scores.mean(axis=1).max()), candidates,
                       episodes, repeats, k, alpha, confidence, seed)


def naive_score(best_scores: Mapping[str, Sequence[float]]) -> float:
    """The papers' tuned number: for each hyperparameter setting, the mean over its seeds of each run's
    best evaluation (`scores.best`: the checkpoint picked on the evaluations themselves), and the best
    setting's mean (picked on those same numbers)."""
    if not best_scores or any(len(v) == 0 for v in best_scores.values()):
        raise ValueError("the naive score needs at least one setting with at least one run")
    return float(max(np.mean(v) for v in best_scores.values()))


def sweep_parts(column: str) -> tuple[str, dict[str, str]] | None:
    """A grid sweep column's algorithm and settings (`td3bc@alpha=2.5` -> ("td3bc", {"alpha": "2.5"}));
    None for a column that is not part of a sweep (a plain algorithm name has no `@`)."""
    if SWEEP_MARK not in column:
        return None
    algorithm, settings = column.split(SWEEP_MARK, 1)
    return algorithm, dict(part.split("=", 1) for part in settings.split(","))
