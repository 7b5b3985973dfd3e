"""Dataset forge: D4RL's recipe for its locomotion data, on any gymnasium env with flat Box spaces.

D4RL trained SAC online (rlkit) and saved, per env (D4RL paper section 5; scripts/generation/mujoco):
    random         rollouts of the uniform random policy
    medium         rollouts of a policy stopped at about a third of expert performance
    medium-replay  the replay buffer of that run up to the medium policy
    expert         rollouts of the fully trained policy
    medium-expert  medium and expert concatenated (stitch_dataset.py: medium first)
`forge` does the same offline, in four phases, and writes each dataset in D4RL's HDF5 layout and as
a Minari dataset, plus `manifest.json` saying how each was made:

1. SAC (Haarnoja et al. 2018, automatic entropy tuning): TanhGaussianActor and a twin
   CriticEnsemble of 2 x 256 ReLU layers, Adam lr 3e-4 for actor, critics and temperature, batch
   256, gamma 0.99, tau 0.005, target entropy -act_dim, initial temperature 1, one gradient update
   per env step after `start_steps` steps of uniform random actions, replay buffer holding every
   step. Actions are scaled from [-1, 1] to the env's bounds. Every `checkpoint_every` env steps the
   actor is saved with its evaluated return: `offbench.evaluation.evaluate` over `eval_episodes`
   episodes of the *sampled* (stochastic) policy, the policy that makes the data.
2. References: the 3 checkpoints (`expert_candidates`) with the highest evaluated returns are
   evaluated again over 30 other episodes (`select_episodes`) and the best becomes the expert (the best of many
   10-episode evaluations overrates its checkpoint). ref_min / ref_max are the mean returns of the
   uniform random policy and of the expert (sampled actions) over `ref_episodes` other episodes, as
   D4RL's REF_MIN/REF_MAX are random and expert returns. Medium is the checkpoint, other than the
   expert's, whose evaluated return is closest to ref_min + medium_fraction * (ref_max - ref_min),
   medium_fraction = 1/3 (ties: the earlier). D4RL's "a third of expert" is stated in raw returns,
   where its random returns are near 0; measured from the random return it also works for envs with
   negative returns (Pendulum).
3. Rollouts: whole episodes until at least `dataset_steps` steps, with sampled actions, as D4RL's
   collect_data.py (`distr.sample()` on rlkit's TanhGaussian policy) did. Medium-replay is the
   buffer up to the medium checkpoint, without the unfinished episode at its end.
4. Writing: <out>/{random,medium,medium-replay,expert,medium-expert}.hdf5 (each atomic), the Minari
   datasets offbench/<slug>/<kind>-v0 (each staged, then renamed into place), manifest.json last.
   A family is complete only when its manifest exists; the manifest is removed before rewriting.

Deterministic given the seed on CPU (same machine and thread count): torch is seeded with `seed`,
the env's first reset with `seed`, warm-up actions and minibatches come from numpy generators seeded
with `seed`, evaluations and rollouts from seeds derived from it (manifest "seeds"). Resume: the
full SAC state (networks, optimisers, replay buffer, every RNG including the env's) is saved at the
first episode end after each checkpoint, so an interrupted forge continues from there with the same
numbers as an uninterrupted one; the rollouts and writing (minutes) are redone on a re-run.

Modules: config.py (ForgeConfig, presets, seeds), envs.py (env, action scaling, policies), sac.py (phase 1),
selection.py (phase 2), rollouts.py (phase 3), writing.py (phase 4 and the manifest), progress.py (the
display), run.py (`forge`, the phases in order).
"""

from offbench.forge.config import DEFAULT_PRESET, FORMAT, KINDS, MANIFEST, PRESETS, ForgeConfig, eval_seed, forge_config
from offbench.forge.envs import ActionScale
from offbench.forge.progress import _Progress  # noqa: F401 (offbench/pgd/train.py imports it from here)
from offbench.forge.rollouts import rollout
from offbench.forge.run import forge
from offbench.forge.sac import SAC, ReplayBuffer, _save_atomic  # noqa: F401 (offbench/pgd/train.py imports it)
from offbench.forge.selection import choose_expert, choose_medium, expert_candidates

__all__ = [
    "DEFAULT_PRESET", "FORMAT", "KINDS", "MANIFEST", "PRESETS", "SAC", "ActionScale", "ForgeConfig", "ReplayBuffer",
    "choose_expert", "choose_medium", "eval_seed", "expert_candidates", "forge", "forge_config", "rollout",
]
