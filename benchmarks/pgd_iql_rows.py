"""Why IQL loses on PGD data: what the synthetic rows give IQL that the real rows do not (issue 24).

    PYTHONPATH=. python benchmarks/pgd_iql_rows.py shipped/pendulum-medium-replay-v0 \
        --run results/pgd/iql-rows/runs/iql/... --run ... --out results/pgd/iql-rows/measurements.json

For one dataset, its trained PGD trajectory model (`--model`, default `small`) and IQL runs (their last checkpoints),
it writes a JSON file with:

1. `data`: the real rows as an IQL run of the learning grid sees them (rewards as stored, no observation
   normalisation) and a pool of synthetic rows sampled as the grid samples them (512 trajectories x 32 transitions,
   64 sampler steps with EDM's predictor, unguided, seed 0): per channel mean and std; the share of rows with values
   Pendulum-v1 cannot produce (|cos|, |sin| > 1, |thdot| > 8, reward outside [-(pi^2 + 0.1 * 8^2 + 0.001 * 2^2), 0]);
   the unit-circle error |cos^2 + sin^2 - 1|; the reward and dynamics error in the simulator (offbench/pgd/dynamics.py);
   the share of done rows.
2. `runs`: per IQL run, on the real rows and on the synthetic rows: the value target min_k Q_targ(s, a), V(s), the
   expectile residual u = Q_targ(s, a) - V(s) (mean, std, share > 0), the actor's weight min(exp(beta u), 100) (mean,
   share at the clip, and the share of the batch's total weight that synthetic rows carry at the grid's 240 / 16
   mix), the TD target r + gamma V(s') and the TD residual min_k Q(s, a) - target.

The DataModules below are the experiments that separate the candidate causes (--data.class_path
benchmarks.pgd_iql_rows.SimulatorPGDDataModule --data.fix reward|next_obs|both): the synthetic rows keep their
(s, a) and take the simulator's reward and/or next state for them, so a run on them tells whether IQL loses to the
model's reward or dynamics errors or to the synthetic state-action distribution itself.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from offbench.data.catalog import resolve
from offbench.data.sources import load_transitions
from offbench.errors import UserError
from offbench.pgd.datamodule import PGDDataModule
from offbench.pgd.dynamics import simulate
from offbench.pgd.edm import SamplerSettings
from offbench.pgd.model import load_trajectory_model
from offbench.pgd.report import load_policy

MIN_REWARD = -(math.pi**2 + 0.1 * 8.0**2 + 0.001 * 2.0**2)  # Pendulum-v1's reward range [MIN_REWARD, 0]


class SimulatorPGDDataModule(PGDDataModule):
    """PGDDataModule whose synthetic rows take the simulator's reward (`fix` reward), next state (next_obs) or both for
    their own (s, a): an experiment, not a data source (it needs an env whose state the observation gives)."""

    def __init__(self, *args, fix: str = "both", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if fix not in ("reward", "next_obs", "both"):
            raise UserError(f"data.fix must be reward, next_obs or both, got {fix!r}")
        if self.normalize_obs_flag or self.reward_scale != 1.0 or self.reward_shift != 0.0:
            raise UserError("SimulatorPGDDataModule needs raw observations and rewards (normalize_obs false, "
                            "reward_tuning none)")
        self.fix = fix

    @property
    def normalize_obs_flag(self) -> bool:
        return bool(self.obs_std.ne(1).any() or self.obs_mean.ne(0).any())

    def generate(self, module):
        obs, act, rew, next_obs, done, next_act = super().generate(module)
        sim_next, sim_rew = simulate(self.info.env_id, obs.cpu().numpy(), act.cpu().numpy())
        if self.fix in ("reward", "both"):
            rew = torch.as_tensor(sim_rew, dtype=rew.dtype, device=rew.device)
        if self.fix in ("next_obs", "both"):
            next_obs = torch.as_tensor(sim_next, dtype=next_obs.dtype, device=next_obs.device)
        return obs, act, rew, next_obs, done, next_act


def _stats(x: np.ndarray) -> dict:
    return {"mean": x.mean(0).round(4).tolist(), "std": x.std(0).round(4).tolist()}


def action_effect(obs, act, next_obs) -> dict:
    """How a row's next state depends on its action. Pendulum-v1: thdot' = thdot + 0.75 sin(th) + 0.15 a (g 10,
    l 1, m 1, dt 0.05; before the clip at +-8), and the reward depends on a only through 0.001 a^2, so this slope is
    the only way an action's advantage can be read off the rows. Least squares of y = thdot' - thdot - 0.75 sin(th)
    on a over the rows whose thdot' is inside the clip: the slope (0.15 in the simulator), R^2, and the std of the
    part of y the action does not explain against that of 0.15 a (the signal)."""
    sin_th = np.sin(np.arctan2(obs[:, 1], obs[:, 0]))  # the angle the simulator reads (dynamics.simulate)
    y = next_obs[:, 2] - obs[:, 2] - 0.75 * sin_th
    a = act[:, 0]
    keep = np.abs(next_obs[:, 2]) < 7.99
    y, a = y[keep], a[keep]
    slope, intercept = np.polyfit(a, y, 1)
    resid = y - (slope * a + intercept)
    return {"slope": round(float(slope), 4), "r2": round(float(1 - resid.var() / y.var()), 4),
            "noise_std": round(float((y - 0.15 * a).std()), 4), "signal_std": round(float((0.15 * a).std()), 4)}


def data_measurements(env_id: str, obs, act, rew, next_obs, done) -> dict:
    sim_next, sim_rew = simulate(env_id, obs, act)
    circle = np.abs(obs[:, 0] ** 2 + obs[:, 1] ** 2 - 1)
    out_of_range = (np.abs(obs[:, :2]) > 1).any(1) | (np.abs(obs[:, 2]) > 8) | (rew > 0) | (rew < MIN_REWARD)
    return {
        "rows": len(obs), "obs": _stats(obs), "act": _stats(act), "rew": _stats(rew[:, None]),
        "act_at_bound_share": float((np.abs(act) > 0.99 * 2.0).any(1).mean()),
        "out_of_range_share": float(out_of_range.mean()),
        "reward_out_of_range_share": float(((rew > 0) | (rew < MIN_REWARD)).mean()),
        "cos_sin_out_of_range_share": float((np.abs(obs[:, :2]) > 1).any(1).mean()),
        "thdot_out_of_range_share": float((np.abs(obs[:, 2]) > 8).mean()),
        "unit_circle_error": {"mean": float(circle.mean()), "max": float(circle.max())},
        "reward_error": {"mean": float((rew - sim_rew).mean()), "mean_abs": float(np.abs(rew - sim_rew).mean())},
        "dynamics_mse": float(np.mean((sim_next - next_obs) ** 2)),
        "done_share": float(done.mean()),
        "action_effect": action_effect(obs, act, next_obs),
    }


@torch.no_grad()
def value_measurements(iql, obs, act, rew, next_obs, done) -> dict:
    h = iql.hparams
    o, a, rew, next_obs, done = (torch.as_tensor(x, dtype=torch.float32) for x in (obs, act, rew, next_obs, done))
    q_targ = iql.critic_target(o, a).min(0).values
    q = iql.critic(o, a).min(0).values
    v = iql.v(o)
    u = q_targ - v
    w = torch.exp(h.temperature * u).clamp(max=h.weight_clip)
    td_target = rew + h.gamma * (1 - done) * iql.v(next_obs)

    def s(x):
        return {"mean": round(float(x.mean()), 4), "std": round(float(x.std()), 4)}

    return {"value_target": s(q_targ), "v": s(v), "residual": s(u) | {"share_positive": float((u > 0).float().mean())},
            "weight": s(w) | {"share_clipped": float((w >= h.weight_clip).float().mean())},
            "td_target": s(td_target), "td_residual": s(q - td_target), "_weight_mean": float(w.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("--model", default="small")
    ap.add_argument("--run", action="append", default=[], help="an IQL `offbench fit` run directory (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--trajectories", type=int, default=512)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--sampling-steps", type=int, default=64)
    args = ap.parse_args()

    torch.set_num_threads(1)
    info = resolve(args.dataset)
    t = load_transitions(info)
    model, manifest = load_trajectory_model(info.name, args.model, t)
    generator = torch.Generator().manual_seed(0)
    settings = SamplerSettings(steps=args.sampling_steps, edm_predictor=True)
    traj = model.sample(args.trajectories, args.length + 1, settings, generator)
    syn = [x.numpy().astype(np.float64) for x in model.transitions(traj)]
    real = [np.asarray(x, np.float64) for x in (t.obs, t.act, t.rew, t.next_obs, t.done)]
    result = {"dataset": info.name, "model": manifest["config"], "sampler": vars(args) | {"run": None},
              "data": {"real": data_measurements(info.env_id, *real), "synthetic": data_measurements(info.env_id, *syn)},
              "runs": {}}
    for run in args.run:
        iql, _, _ = load_policy(Path(run), info.env_id, t.obs_dim, t.act_dim)
        r, s = value_measurements(iql, *real), value_measurements(iql, *syn)
        n_syn, n_real = 240, 16  # the grid's batch mix
        w_syn, w_real = s.pop("_weight_mean"), r.pop("_weight_mean")
        share = n_syn * w_syn / (n_syn * w_syn + n_real * w_real)
        result["runs"][run] = {"real": r, "synthetic": s, "synthetic_weight_share": round(share, 4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
