"""Record golden values of the UCB policy selection by running the official JAX code (EmptyJackson/unifloral
@ f2dc1278eae18ed3e22c92255119c54885414d17, `evaluation.py`), for tests/test_selection.py.

Run in a virtualenv with jax 0.4.30, jaxlib 0.4.30 (CPU), numpy 1.26.4, from a checkout of the official file
(`git archive f2dc1278eae18ed3e22c92255119c54885414d17 evaluation.py | tar -x -C unifloral`):

    python selection_record.py --official unifloral --out tests/data/golden/selection.npz

Shims (no official line is changed): `pandas` is a stub module whose `DataFrame` is `object` (evaluation.py imports it
for its data loading and names it in a type hint; the bandit does not use it). Float64 throughout (`jax_enable_x64`; the official code runs JAX's default float32).

Two parts:

- `replay/<case>/...`: single trials of the official `run_bandit`, run eagerly (`jax.disable_jit()`, so that
  `lax.scan` runs its body in Python) with the module's `argmax_with_random_tiebreaking` and `jax.random.randint`
  replaced by pass-through wrappers that store, per pull, the UCB values, the arm chosen and the episode index drawn
  (the random stream is unchanged). Stored: the scores, policy_idx, the draws, and the official outputs
  (estimated_bests: the true score of the selected policy after each pull). The scores are multiples of 1/4 with
  pools of 8 episodes, so every mean is exact in any summation order (case `real` has real-valued scores).
- `trials/...`: the official `bootstrap_bandit_trials` with its defaults (seed 17, 20 subsampled policies, 1000
  repeats, alpha 2, 1000 bootstraps, 95%) at 64 pulls on a fixed pool of 12 policies x 16 episodes, and, from
  `run_bandit_trials` with the same arguments, the standard deviation over repeats of the selected score at each
  pull (the Monte Carlo error a curve drawn with another generator is compared with).
"""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="folder holding the official evaluation.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    pandas = types.ModuleType("pandas")  # shim: imported (and named in a type hint), unused by the bandit
    pandas.DataFrame = object
    sys.modules["pandas"] = pandas
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    sys.path.insert(0, args.official)
    import evaluation as official

    out: dict[str, np.ndarray] = {}
    gen = np.random.default_rng(2026)
    cases = {
        # discrete scores (as AntMaze's 0/100): many exact ties among pulled arms
        "ties": gen.choice([0.0, 100.0], size=(5, 8), p=[0.6, 0.4]),
        # well separated means, small noise (dyadic)
        "separated": np.round(4 * (np.array([[10.0], [30.0], [50.0], [20.0], [45.0], [5.0]])
                                   + gen.normal(0, 8, size=(6, 8)))) / 4,
        # negative means: the quirk of unpulled arms (mean 0) while budget < candidates
        "negative": np.round(4 * (np.array([[-20.0], [-5.0], [-30.0], [-10.0], [15.0], [-40.0], [-2.0]])
                                  + gen.normal(0, 10, size=(7, 8)))) / 4,
        # real-valued scores
        "real": gen.normal(40, 25, size=(6, 8)),
    }
    original_argmax = official.argmax_with_random_tiebreaking
    original_randint = jax.random.randint
    for case, scores in cases.items():
        policy_idx = gen.permutation(scores.shape[0])
        values, arms, episodes = [], [], []

        def argmax(rng, v, values=values, arms=arms):  # noqa: ANN001, ANN202
            arm = original_argmax(rng, v)
            values.append(np.asarray(v))
            arms.append(int(arm))
            return arm

        def randint(*a, episodes=episodes, **k):  # noqa: ANN002, ANN003, ANN202
            index = original_randint(*a, **k)
            episodes.append(int(index))
            return index

        official.argmax_with_random_tiebreaking = argmax
        jax.random.randint = randint
        try:
            with jax.disable_jit():
                pulls, bests = official.run_bandit(jnp.asarray(scores), jax.random.PRNGKey(len(out)), 40, 2.0,
                                                   jnp.asarray(policy_idx))
        finally:
            official.argmax_with_random_tiebreaking = original_argmax
            jax.random.randint = original_randint
        assert len(arms) == len(episodes) == 40
        out |= {
            f"replay/{case}/scores": scores, f"replay/{case}/policy_idx": policy_idx,
            f"replay/{case}/ucb_values": np.stack(values), f"replay/{case}/arms": np.array(arms),
            f"replay/{case}/episodes": np.array(episodes), f"replay/{case}/pulls": np.asarray(pulls),
            f"replay/{case}/estimated_bests": np.asarray(bests),
        }

    scores = np.round(4 * (np.linspace(0, 60, 12)[:, None] + gen.normal(0, 30, size=(12, 16)))) / 4
    result = official.bootstrap_bandit_trials(jnp.asarray(scores), max_pulls=64)
    _, bests = official.run_bandit_trials(jnp.asarray(scores), max_pulls=64)
    out |= {
        "trials/scores": scores,
        "trials/pulls": np.asarray(result["pulls"]),
        "trials/mean": np.asarray(result["estimated_bests_mean"]),
        "trials/ci_low": np.asarray(result["estimated_bests_ci_low"]),
        "trials/ci_high": np.asarray(result["estimated_bests_ci_high"]),
        "trials/std": np.asarray(bests).std(axis=0),
    }
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: " + ", ".join(sorted(out)))


if __name__ == "__main__":
    main()
