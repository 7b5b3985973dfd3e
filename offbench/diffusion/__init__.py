"""The diffusion family: schedules, the DDPM policy and the score model, one DPM-Solver, and helpers.

- schedules.py: beta schedules (plain functions) and the VP schedules in continuous time
- policies.py:  NoiseMLP, DiffusionPolicy (DDPM policy: denoise / action approximation, log_prob
                surrogates, reverse chain or DPM-Solver sampling), ScoreDiffusion (SfBC)
- solvers.py:   singlestep DPM-Solver (noise prediction) and DPM-Solver++ (data prediction) for VP schedules
- helpers.py:   the EMA cadence, repeat_rows, softmax selection of candidates
"""

from offbench.diffusion.helpers import repeat_rows, resample, sample_by_score, update_ema
from offbench.diffusion.policies import (
    DenoisingTerms,
    DiffusionPolicy,
    NoiseMLP,
    ScoreDiffusion,
    SinusoidalEmbedding,
    Surrogate,
)
from offbench.diffusion.schedules import (
    BetaSchedule,
    DiscreteVPSchedule,
    LinearVPSchedule,
    cosine_beta_schedule,
    linear_beta_schedule,
    make_betas,
    scaled_linear_beta_schedule,
    vp_beta_schedule,
)
from offbench.diffusion.solvers import SolverForm, dpm_solver_sample, dpm_step, singlestep_orders

_singlestep_orders = singlestep_orders  # the name tests and earlier code import

__all__ = [
    "BetaSchedule", "DenoisingTerms", "DiffusionPolicy", "DiscreteVPSchedule", "LinearVPSchedule", "NoiseMLP",
    "ScoreDiffusion", "SinusoidalEmbedding", "SolverForm", "Surrogate", "cosine_beta_schedule", "dpm_solver_sample", "dpm_step",
    "linear_beta_schedule", "make_betas", "repeat_rows", "resample", "sample_by_score", "scaled_linear_beta_schedule",
    "singlestep_orders", "update_ema", "vp_beta_schedule",
]
