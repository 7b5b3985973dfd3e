"""Aggregate statistics over runs and datasets with rliable.

rliable is the library of "Deep Reinforcement Learning at the Edge of the Statistical Precipice"
(Agarwal et al., NeurIPS 2021, arXiv:2108.13264; repository google-research/rliable). Its unit is
one algorithm's score matrix of shape (runs, datasets); from it this module takes

- the aggregate metrics IQM, mean, median and optimality gap (rliable.metrics), each with a 95%
  percentile confidence interval from rliable's stratified bootstrap (runs resampled with
  replacement within each dataset: rliable.library.get_interval_estimates);
- the probability of improvement P(X > Y) between two algorithms, with rliable's stratified
  independent bootstrap;
- performance profiles, the fraction of runs scoring above tau, with rliable's
  bootstrap bands (rliable.library.create_performance_profile) and its plot (rliable.plot_utils).

Scores are D4RL normalized scores (expert = 100), so the optimality gap is 100 - mean(min(score, 100))
(rliable's gamma = 1 on its 0-1 scale). Two functions are our own vectorised forms of rliable's
(`probability_of_improvement`, `score_distribution`): rliable's call scipy's Mann-Whitney U and a
Python loop over thresholds once per bootstrap resample, 20 to 60 times slower; a test checks that
they agree with rliable's exactly. rliable's bootstraps draw from numpy's global RNG (its
`random_state` argument does not reach the resampling), so every estimate here seeds that RNG for
its own bootstrap and puts the caller's state back afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rliable import library as rly
from rliable import metrics

METRICS = ("IQM", "mean", "median", "optimality gap")
GAMMA = 100.0  # optimality-gap threshold on the normalized scale: the expert's score
REPS = 2000  # bootstrap resamples of every interval estimate (read when an estimate is made)
SEED = 0  # numpy seed of every bootstrap
CONFIDENCE = 0.95
MIN_RUNS = 2  # runs per dataset below which no interval is estimated (one run: resamples all equal it)

Estimate = tuple[float, float | None, float | None]  # point, CI low, CI high (None: no interval)


@dataclass(frozen=True)
class Matrix:
    """One algorithm's score matrix for rliable: scores[run, dataset]."""

    algorithm: str
    datasets: list[str]
    scores: np.ndarray
    finished: int  # runs found; more than scores.size when the datasets had unequal run counts

    @property
    def runs(self) -> int:
        return self.scores.shape[0]


def score_matrix(algorithm: str, by_dataset: Mapping[str, Sequence[float]]) -> Matrix:
    """The (runs, datasets) matrix of one algorithm from its per-run scores on each dataset (in seed
    order). rliable needs the same number of runs on every dataset: when they differ (an unfinished
    grid), each dataset gives its first n runs, n the smallest count, and `finished` says so."""
    datasets = [d for d, values in by_dataset.items() if len(values)]
    if not datasets:
        raise ValueError(f"{algorithm}: no scores")
    n = min(len(by_dataset[d]) for d in datasets)
    scores = np.array([[float(by_dataset[d][i]) for d in datasets] for i in range(n)], dtype=np.float64)
    return Matrix(algorithm, datasets, scores, sum(len(by_dataset[d]) for d in datasets))


@contextlib.contextmanager
def seeded(seed: int = SEED) -> Iterator[None]:
    """numpy's global RNG seeded for one rliable bootstrap, the caller's state restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregate_metrics(scores: np.ndarray) -> np.ndarray:
    """rliable's IQM, mean, median and optimality gap (gamma = 100) of a (runs, datasets) matrix."""
    return np.array([
        metrics.aggregate_iqm(scores),
        metrics.aggregate_mean(scores),
        metrics.aggregate_median(scores),
        metrics.aggregate_optimality_gap(scores, GAMMA),
    ])


def aggregates(m: Matrix, reps: int | None = None, seed: int = SEED) -> dict[str, Estimate]:
    """metric -> (point estimate, CI low, CI high), stratified bootstrap over the runs of each dataset.
    With one run per dataset there is nothing to resample (every resample is the run itself: a zero-width
    "interval"): the point estimate alone, CI low and high None."""
    if m.runs < MIN_RUNS:
        return {name: (float(value), None, None) for name, value in zip(METRICS, aggregate_metrics(m.scores))}
    with seeded(seed):
        point, interval = rly.get_interval_estimates(
            {m.algorithm: m.scores}, aggregate_metrics, reps=reps or REPS, confidence_interval_size=CONFIDENCE
        )
    values, (low, high) = point[m.algorithm], interval[m.algorithm]
    return {name: (float(values[i]), float(low[i]), float(high[i])) for i, name in enumerate(METRICS)}


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """P(X > Y): for each dataset the probability that a run of X beats a run of Y, ties counting
    one half (the Mann-Whitney U statistic over n_x * n_y), averaged over datasets; the same number
    as rliable.metrics.probability_of_improvement, without its per-dataset scipy call."""
    x, y = scores_x[:, None, :], scores_y[None, :, :]
    per_dataset = (x > y).mean(axis=(0, 1)) + 0.5 * (x == y).mean(axis=(0, 1))
    return float(per_dataset.mean())


def improvement(mx: Matrix, my: Matrix, reps: int | None = None, seed: int = SEED) -> tuple[float, float | None, float | None, list[str]] | None:
    """(P(X > Y), CI low, CI high, datasets) over the datasets both algorithms ran; None if none.
    The runs of X and of Y are resampled independently within each dataset (rliable's
    StratifiedIndependentBootstrap). When X or Y has one run per dataset: the point alone, CI None."""
    common = [d for d in mx.datasets if d in my.datasets]
    if not common:
        return None
    x = mx.scores[:, [mx.datasets.index(d) for d in common]]
    y = my.scores[:, [my.datasets.index(d) for d in common]]
    if min(mx.runs, my.runs) < MIN_RUNS:
        return probability_of_improvement(x, y), None, None, common
    with seeded(seed):
        point, interval = rly.get_interval_estimates(
            {"pair": [x, y]}, probability_of_improvement, reps=reps or REPS, confidence_interval_size=CONFIDENCE
        )
    low, high = np.ravel(interval["pair"])
    return float(point["pair"]), float(low), float(high), common


def score_distribution(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The fraction of all runs (over all datasets) with a score above each tau: rliable's
    `score_distributions`, vectorised over the thresholds."""
    return (scores.reshape(-1, 1) > np.asarray(taus).reshape(1, -1)).mean(axis=0)


def profiles(
    matrices: Mapping[str, Matrix], taus: np.ndarray, reps: int | None = None, seed: int = SEED
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Performance profiles (score distributions) at `taus` and their (2, len(taus)) 95% bands."""
    points, bands = {}, {}
    for name, m in matrices.items():
        with seeded(seed):
            point, band = rly.create_performance_profile(
                {name: m.scores}, taus, custom_profile_func=score_distribution, reps=reps or REPS,
                confidence_interval_size=CONFIDENCE,
            )
        points[name], bands[name] = point[name], band[name]
    return points, bands


def taus_for(matrices: Sequence[Matrix], points: int = 101) -> np.ndarray:
    """Thresholds from min(0, lowest score) to max(100, highest score)."""
    values = np.concatenate([m.scores.ravel() for m in matrices])
    return np.linspace(min(0.0, float(values.min())), max(GAMMA, float(values.max())), points)


def plot_profiles(panels: Mapping[str, Mapping[str, Matrix]], path: Path, titles: Mapping[str, str]) -> Path:
    """One figure, one panel per per-run score (`panels`: kind -> algorithm -> matrix), drawn with
    rliable.plot_utils; written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    algorithms = list(dict.fromkeys(a for panel in panels.values() for a in panel))
    palette = plt.get_cmap("tab20").colors  # 20 colours, repeated past 20 algorithms
    colors = {a: palette[i % len(palette)] for i, a in enumerate(algorithms)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (kind, matrices) in zip(axes[0], panels.items()):
        taus = taus_for(list(matrices.values()))
        points, bands = profiles(matrices, taus)
        labels = {f"{a} ({m.runs}×{len(m.datasets)}{'' if m.runs >= MIN_RUNS else ', no band'})": a
                  for a, m in matrices.items()}
        plot_utils.plot_performance_profiles(
            {label: points[a] for label, a in labels.items()}, taus,
            performance_profile_cis={label: bands[a] for label, a in labels.items() if matrices[a].runs >= MIN_RUNS},
            colors={label: colors[a] for label, a in labels.items()}, ax=ax,
            xlabel=r"normalized score $\tau$", ylabel=r"fraction of runs with score $> \tau$",
            labelsize="medium", ticklabelsize="small",
        )
        ax.set_title(titles.get(kind, kind), fontsize="medium")
        ax.legend(fontsize="x-small", title="algorithm (runs × datasets)", title_fontsize="x-small")
    fig.suptitle(r"Performance profiles (rliable): fraction of runs scoring above $\tau$; bands: 95% stratified-bootstrap CIs",
                 fontsize="medium")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure as PNG, written beside its place and renamed (no half-written file)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # No "Software" entry (matplotlib's version): the same records give the same bytes on any install.
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: no partial file left, the figure as it was stays
        from offbench.errors import UserError

        tmp.unlink(missing_ok=True)
        raise UserError(f"writing {path} failed ({e.strerror or e}): free space or make its folder writable, then run "
                        "again (the file as it was before is unchanged)") from e
    return path
