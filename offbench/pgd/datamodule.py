"""PGDDataModule: the shared DataModule with most of each batch drawn from synthetic trajectories.

    offbench fit --config configs/algorithms/td3bc.yaml --data.class_path offbench.pgd.PGDDataModule \
        --data.dataset forge/pendulum-medium-v0 --data.model small ...

A pool of synthetic transitions is sampled from the dataset's trained trajectory model
(`offbench data pgd train DATASET`) on the training device: `pool_trajectories` trajectories of
`rollout_length` + 1 rows, i.e. `rollout_length` transitions each. The first pool is unguided; every
`regenerate_every` updates the pool is sampled again, guided towards the policy being trained
through the algorithm's `log_prob(obs, act)` (offbench/module.py). Each batch holds
`synthetic_batch_size` synthetic rows and `batch_size - synthetic_batch_size` real ones, each drawn
uniformly with replacement. The pool, the step it was made at and its noise generator are saved
in the checkpoint, so a resumed run continues exactly.

Official settings (EmptyJackson/policy-guided-diffusion, util/args.py, train_agent.py): 240 of 256
rows synthetic; 32 x 256 = 8192 trajectories of 129 rows; regenerated every 10,000 updates; guidance
coefficient 0 (unguided) by default, cosine coefficient 0.3, no gradient normalisation; 256 sampler
steps. Deviation: the official loop regenerates after the update whose 0-based index is a multiple
of 10,000 (so after 10,001 updates); here it happens before that update (after exactly 10,000).
The synthetic rewards get the run's reward tuning (every tuning is affine), and the synthetic states
its observation normalisation. The synthetic rows' next actions (`Batch.next_act`, ReBRAC's critic
penalty) are the synthetic trajectory's action at the next row, as the dataset's are. Batches carry no
dataset row indices (`Batch.idx` is None): algorithms that train from per-row tables of the real
dataset (`needs_dataset_rows`: AWR, SfBC, QGPO) are refused before training.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from offbench.batch import Batch
from offbench.data.datamodule import OfflineDataModule, RewardTuning, tune_rewards
from offbench.errors import UserError
from offbench.module import OfflineRLModule
from offbench.pgd.edm import SamplerSettings
from offbench.pgd.guidance import PolicyGuidance
from offbench.pgd.model import load_trajectory_model


class PGDDataModule(OfflineDataModule):
    """OfflineDataModule's dataset and arguments, plus synthetic trajectories from the PGD model.

    Args (besides OfflineDataModule's):
        model: name of the dataset's trained trajectory model (`offbench data pgd train DATASET --preset NAME`).
        synthetic_batch_size: synthetic rows per batch (official 240 of 256).
        pool_trajectories: trajectories per pool (official 8192).
        rollout_length: transitions per trajectory (official 128: 129 rows are sampled).
        regenerate_every: updates between two pools (official 10,000).
        guidance_coeff: c of the guidance schedule (official default 0: unguided).
        guidance_cos_coeff: c_cos of the schedule's sine bump (official 0.3).
        normalize_guidance: divide the guidance gradient by its norm (official flag, off).
        denoised_guidance: take the gradient on the denoised estimate (official flag, off).
        guidance_delay: sampler steps without guidance at the start (official 0).
        sampling_steps: EDM sampler steps (official 256).
        edm_predictor: EDM's Heun predictor from the churned sample (the official code's starts from the
            unchurned one, which inflates the samples' variance with few steps: offbench/pgd/edm.py).
        generation_batch: trajectories sampled at once (memory, not results).
    """

    def __init__(
        self,
        dataset: str,
        model: str = "small",
        synthetic_batch_size: int = 240,
        pool_trajectories: int = 8192,
        rollout_length: int = 128,
        regenerate_every: int = 10_000,
        guidance_coeff: float = 0.0,
        guidance_cos_coeff: float = 0.3,
        normalize_guidance: bool = False,
        denoised_guidance: bool = False,
        guidance_delay: int = 0,
        sampling_steps: int = 256,
        edm_predictor: bool = False,
        generation_batch: int = 1024,
        batch_size: int = 256,
        eval_every: int = 5000,
        block_size: int = 1000,
        normalize_obs: bool = False,
        reward_tuning: RewardTuning = "none",
        env_id: str | None = None,
        ref_family: str | None = None,
        ref_min: float | None = None,
        ref_max: float | None = None,
        max_episode_steps: int | None = None,
        clip_actions: bool = False,
    ) -> None:
        super().__init__(
            dataset, batch_size=batch_size, eval_every=eval_every, block_size=block_size, normalize_obs=normalize_obs,
            reward_tuning="none", env_id=env_id, ref_family=ref_family, ref_min=ref_min, ref_max=ref_max,
            max_episode_steps=max_episode_steps, clip_actions=clip_actions,
        )
        if not 0 <= synthetic_batch_size <= batch_size:
            raise UserError(f"data.synthetic_batch_size must be within 0..data.batch_size ({batch_size}), got "
                            f"{synthetic_batch_size}: lower it or raise --data.batch_size")
        for name, value in (("pool_trajectories", pool_trajectories), ("rollout_length", rollout_length),
                            ("regenerate_every", regenerate_every), ("generation_batch", generation_batch)):
            if value <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {value}")
        if sampling_steps < 2:
            raise UserError(f"data.sampling_steps must be at least 2 (the EDM sampler's noise levels run from "
                            f"sigma_max to sigma_min), got {sampling_steps}; the official value is 256")
        if guidance_delay < 0:
            raise UserError(f"data.guidance_delay must be 0 or more sampler steps, got {guidance_delay}")
        raw = self.transitions
        self.transitions = tune_rewards(raw, reward_tuning)
        # Every tuning is affine in the reward; read its scale and shift off two probe rewards 0 and 1.
        probe = np.zeros(len(raw), np.float32)
        probe[1:2] = 1.0
        tuned = tune_rewards(replace(raw, rew=probe), reward_tuning).rew
        self.reward_shift, self.reward_scale = float(tuned[0]), float(tuned[1] - tuned[0]) if len(raw) > 1 else 1.0
        self.model_name = model
        self.trajectory_model, self.model_manifest = load_trajectory_model(self.info.name, model, raw)
        if abs(self.trajectory_model.normalizer.max_action - self.max_action) > 1e-6:
            raise UserError(f"the trajectory model's action bound {self.trajectory_model.normalizer.max_action} "
                            f"differs from the env's {self.max_action}: retrain it "
                            f"(offbench data pgd train {self.info.name} ... --force)")
        self.synthetic_batch_size = synthetic_batch_size
        self.pool_trajectories, self.rollout_length = pool_trajectories, rollout_length
        self.regenerate_every, self.generation_batch = regenerate_every, generation_batch
        self.guidance = {"coeff": guidance_coeff, "cos_coeff": guidance_cos_coeff, "normalize": normalize_guidance,
                         "denoised": denoised_guidance, "delay": guidance_delay}
        self.sampler = SamplerSettings(steps=sampling_steps, edm_predictor=edm_predictor)
        self._pool: tuple[Tensor, ...] | None = None
        self._pool_step = -1
        self._pool_generator: torch.Generator | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        device = self._tensors[0].device
        self.trajectory_model.to(device)
        if self._pool_generator is None or self._pool_generator.device != device:
            self._pool_generator = torch.Generator(device=device)
            self._pool_generator.manual_seed(torch.initial_seed() + 1)  # apart from the batch sampler's stream
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and getattr(module, "needs_dataset_rows", False):
            raise UserError(
                f"{type(module).__name__} trains from per-row tables of the real dataset (Batch.idx), which PGD's "
                "synthetic rows do not have: train it with the plain DataModule (drop --data.class_path "
                "offbench.pgd.PGDDataModule), or use PGD data with an algorithm that trains on the batch it is given "
                "(docs/pgd.md)"
            )
        if self.guidance["coeff"] != 0 and module is not None and type(module).log_prob is OfflineRLModule.log_prob:
            raise UserError(
                f"PGD guidance (data.guidance_coeff {self.guidance['coeff']}) needs the policy's log-likelihood, and "
                f"{type(module).__name__} does not define log_prob(obs, act): implement it (offbench/module.py, "
                "docs/pgd.md) or set --data.guidance_coeff 0 for unguided synthetic data"
            )

    # --- the synthetic pool ------------------------------------------------------------------
    def generate(self, module: OfflineRLModule | None) -> tuple[Tensor, ...]:
        """A pool of synthetic transitions (obs, act, rew, next_obs, done, next_act) on the device, guided
        by `module.log_prob` when a module is given and the coefficient is not 0."""
        model = self.trajectory_model
        guide = None
        if module is not None and self.guidance["coeff"] != 0:
            guide = PolicyGuidance(module.log_prob, model.normalizer, self.sampler.steps,
                                   obs_transform=self.normalize_obs, **self.guidance)
        parts = []
        for start in range(0, self.pool_trajectories, self.generation_batch):
            n = min(self.generation_batch, self.pool_trajectories - start)
            traj = model.sample(n, self.rollout_length + 1, self.sampler, self._pool_generator, guide)
            parts.append((*model.transitions(traj), model.next_actions(traj)))
        obs, act, rew, next_obs, done, next_act = (torch.cat(p) for p in zip(*parts))
        rew = rew * self.reward_scale + self.reward_shift
        return self.normalize_obs(obs), act, rew, self.normalize_obs(next_obs), done, next_act

    def _refresh(self, step: int) -> None:
        guided = step > 0 and self.guidance["coeff"] != 0
        rank_zero_info(f"PGD: sampling {self.pool_trajectories} trajectories of {self.rollout_length} transitions "
                       f"({'guided, c=' + str(self.guidance['coeff']) if guided else 'unguided'}) at update {step}")
        self._pool = self.generate(self.trainer.lightning_module if step > 0 else None)
        self._pool_step = step

    def sample(self) -> Batch:
        """`synthetic_batch_size` pool rows and the rest real rows, uniform with replacement, on the device,
        with their next actions (a pool from a checkpoint written before they were kept has none)."""
        step = self.trainer.lightning_module.step
        if self._pool is None or (step % self.regenerate_every == 0 and step != self._pool_step):
            self._refresh(step)
        real, pool = self._tensors, self._pool
        device = real[0].device
        n_syn = self.synthetic_batch_size
        i_syn = torch.randint(len(pool[0]), (n_syn,), device=device, generator=self._generator)
        i_real = torch.randint(len(real[0]), (self.batch_size - n_syn,), device=device, generator=self._generator)
        next_act = torch.cat([pool[5][i_syn], self._next_act[i_real]]) if len(pool) > 5 else None
        return Batch(*(torch.cat([p[i_syn], r[i_real]]) for p, r in zip(pool[:5], real)), idx=None, next_act=next_act)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["pgd"] = {
            "pool": None if self._pool is None else [x.cpu() for x in self._pool],
            "pool_step": self._pool_step,
            "generator": self._pool_generator.get_state(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "pgd" not in state:
            raise ValueError("this checkpoint was not written by a PGDDataModule run: resume it with its own DataModule")
        pgd = state["pgd"]
        device = self._tensors[0].device
        self._pool = None if pgd["pool"] is None else tuple(x.to(device) for x in pgd["pool"])
        self._pool_step = pgd["pool_step"]
        self._pool_generator.set_state(pgd["generator"])
