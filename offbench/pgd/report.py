"""`offbench data pgd report`: what the synthetic data of a trained PGD model is worth, measured.

For one dataset, its trained trajectory model and a target policy (the last checkpoint of an
`offbench fit` run directory), it writes <out>/<dataset>/report.{json,md} (--out, default results/pgd) with, per source of
transitions:
- dynamics error: mean over transitions of the mean squared difference between the transition's
  next state and the real simulator's next state from the same state and action
  (offbench/pgd/dynamics.py; the real data's own value is the floor of the measurement);
- reward error: the transition's reward minus the simulator's for the same state and action (mean
  absolute value and mean: a bias towards optimistic rewards is what value learning exploits);
- the target policy's mean log-likelihood log pi(a|s) of the transitions' actions.
Sources: the real data; PGD samples at each guidance coefficient of the sweep (0 = unguided), from
the same noise; and the world-model baseline: an ensemble of MLP dynamics models (s, a) -> (s' - s, r)
trained on the data, rolled out autoregressively from dataset states with the target policy's
actions (act(s)) for the same horizon, one random member per step.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from offbench.data.catalog import resolve
from offbench.data.sources import load_transitions
from offbench.errors import UserError
from offbench.files import write_json_atomic, write_text_atomic
from offbench.module import OfflineRLModule
from offbench.nets import CriticEnsemble
from offbench.pgd.dynamics import simulator_errors
from offbench.pgd.edm import SamplerSettings
from offbench.pgd.guidance import PolicyGuidance
from offbench.pgd.model import load_trajectory_model


def load_policy(run_dir: Path, env_id: str | None = None, obs_dim: int | None = None, act_dim: int | None = None
                ) -> tuple[OfflineRLModule, torch.Tensor, torch.Tensor]:
    """The algorithm of a run directory at its last checkpoint, and its observation mean and std; a
    UserError when it is not a finished `offbench fit` run of `env_id` with these sizes."""
    import importlib

    fix = "pass the directory of an `offbench fit` run on this dataset's env (--policy-run)"
    config_path, ckpt_path = run_dir / "config.yaml", run_dir / "checkpoints/last.ckpt"
    for path in (config_path, ckpt_path):
        if not path.is_file():
            raise UserError(f"--policy-run {run_dir}: no {path}; {fix}")
    try:
        config = yaml.safe_load(config_path.read_text())
        module_name, class_name = config["model"]["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as e:  # noqa: BLE001 - an unreadable config is the user's to fix
        raise UserError(f"--policy-run {run_dir}: {config_path} names no loadable algorithm ({e}); {fix}") from e
    data = (config.get("data") or {}).get("init_args") or {}
    if env_id is not None and data.get("dataset"):
        try:
            run_env = resolve(data["dataset"], env_id=data.get("env_id")).env_id
        except Exception:  # noqa: BLE001 - a dataset this machine cannot resolve: the sizes below still decide
            run_env = None
        if run_env is not None and run_env != env_id:
            raise UserError(f"--policy-run {run_dir} trained on {data['dataset']!r} (env {run_env}), not on this "
                            f"dataset's env {env_id}: {fix}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        hparams = checkpoint["hyper_parameters"]
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint
        raise UserError(f"--policy-run {run_dir}: {ckpt_path} is unreadable ({e}); {fix}") from e
    sizes = (hparams.get("obs_dim"), hparams.get("act_dim"))
    if obs_dim is not None and sizes != (obs_dim, act_dim):
        raise UserError(f"--policy-run {run_dir}: its policy takes {sizes[0]}-dim observations and {sizes[1]}-dim "
                        f"actions, the dataset has {obs_dim} and {act_dim}; {fix}")
    module = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.load_state_dict(checkpoint["state_dict"])
    data = next(v for k, v in checkpoint.items() if k.endswith("DataModule"))
    return module.eval(), data["obs_mean"], data["obs_std"]


class DynamicsEnsemble(torch.nn.Module):
    """n MLPs (s, a) -> (s' - s, r) in one batched module (the critic ensemble's layers), inputs and
    targets standardised with the data's statistics."""

    def __init__(self, obs_dim: int, act_dim: int, n: int = 5, hidden: tuple[int, ...] = (200, 200, 200)) -> None:
        super().__init__()
        self.n, self.obs_dim = n, obs_dim
        self.net = CriticEnsemble(obs_dim, act_dim, n, hidden).net
        last = self.net[-1]  # CriticEnsemble ends in one output: widen it to obs_dim + 1
        self.net[-1] = type(last)(n, last.weight.shape[1], obs_dim + 1)
        for name in ("x_mean", "x_std", "y_mean", "y_std"):
            self.register_buffer(name, torch.zeros(0))

    def fit(self, obs, act, rew, next_obs, steps: int, batch: int = 256, seed: int = 0) -> float:
        x, y = torch.cat([obs, act], 1), torch.cat([next_obs - obs, rew[:, None]], 1)
        self.x_mean, self.x_std = x.mean(0), x.std(0) + 1e-6
        self.y_mean, self.y_std = y.mean(0), y.std(0) + 1e-6
        xn, yn = (x - self.x_mean) / self.x_std, (y - self.y_mean) / self.y_std
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(x), (self.n, batch), generator=g)  # each member its own batch
            loss = (self.net(xn[idx]) - yn[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    @torch.no_grad()
    def step(self, obs, act, member: torch.Tensor):
        x = (torch.cat([obs, act], 1) - self.x_mean) / self.x_std
        y = self.net(x.expand(self.n, *x.shape))[member, torch.arange(len(obs))] * self.y_std + self.y_mean
        return obs + y[:, : self.obs_dim], y[:, self.obs_dim]


def _policy_log_prob(policy, mean, std, obs, act) -> float:
    with torch.no_grad():
        return policy.log_prob((obs - mean) / std, act).mean().item()


def report(dataset: str, model_name: str, policy_dir: Path, coeffs: list[float], trajectories: int, length: int,
           sampling_steps: int, ensemble_steps: int, out: Path, seed: int = 0, edm_predictor: bool = False
           ) -> dict[str, Any]:
    for flag, value, low in (("--trajectories", trajectories, 1), ("--length", length, 1),
                             ("--sampling-steps", sampling_steps, 2), ("--ensemble-steps", ensemble_steps, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if not coeffs:
        raise UserError("--coeffs needs at least one guidance coefficient (0: unguided)")
    info = resolve(dataset)
    t = load_transitions(info)
    model, manifest = load_trajectory_model(info.name, model_name, t)
    policy, mean, std = load_policy(policy_dir, info.env_id, t.obs_dim, t.act_dim)
    rows: list[dict[str, Any]] = []
    n_tr = trajectories * length

    def add(source: str, obs, act, rew, next_obs, seconds: float) -> None:
        obs, act, rew, next_obs = (np.asarray(x, np.float64) for x in (obs, act, rew, next_obs))
        err, rew_err = simulator_errors(info.env_id, obs, act, next_obs, rew)
        lp = _policy_log_prob(policy, mean, std, torch.as_tensor(obs, dtype=torch.float32),
                              torch.as_tensor(act, dtype=torch.float32))
        rows.append({"source": source, "transitions": len(obs), "dynamics_mse": float(err.mean()),
                     "dynamics_mse_median": float(np.median(err)), "reward_abs_error": float(np.abs(rew_err).mean()),
                     "reward_bias": float(rew_err.mean()), "policy_log_prob": lp, "seconds": round(seconds, 1)})

    rng = np.random.default_rng(seed)
    real = rng.choice(len(t), min(n_tr, len(t)), replace=False)
    add("real data", t.obs[real], t.act[real], t.rew[real], t.next_obs[real], 0.0)
    settings = SamplerSettings(steps=sampling_steps, edm_predictor=edm_predictor)
    for c in coeffs:
        start = time.perf_counter()
        guide = PolicyGuidance(policy.log_prob, model.normalizer, sampling_steps, c,
                               obs_transform=lambda o: (o - mean) / std) if c else None
        traj = model.sample(trajectories, length + 1, settings, torch.Generator().manual_seed(seed), guide)
        obs, act, rew, next_obs, _ = model.transitions(traj)
        add(f"PGD c={c:g}" + (" (unguided)" if c == 0 else ""), obs, act, rew, next_obs, time.perf_counter() - start)

    start = time.perf_counter()
    tensors = [torch.as_tensor(x) for x in (t.obs, t.act, t.rew, t.next_obs)]
    torch.manual_seed(seed)
    ens = DynamicsEnsemble(t.obs_dim, t.act_dim)
    ens.fit(*tensors, steps=ensemble_steps, seed=seed)
    obs = tensors[0][torch.as_tensor(rng.choice(len(t), trajectories))]
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(length):
        with torch.no_grad():
            act = policy.act((obs - mean) / std)
        next_obs, rew = ens.step(obs, act, torch.randint(ens.n, (len(obs),), generator=g))
        parts.append((obs, act, rew, next_obs))
        obs = next_obs
    o, a, r, n = (torch.cat(x).numpy() for x in zip(*parts))
    add(f"MLP ensemble ({ens.n} x 200x3, {ensemble_steps} steps), policy rollouts", o, a, r, n, time.perf_counter() - start)

    result = {
        "dataset": info.name, "env_id": info.env_id, "trajectory_model": manifest["config"],
        "model_train_steps": manifest["steps"], "policy_run": str(policy_dir), "trajectories": trajectories,
        "horizon": length, "sampling_steps": sampling_steps, "edm_predictor": edm_predictor, "seed": seed, "rows": rows,
    }
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", info.name).strip("-")
    write_json_atomic(out / slug / "report.json", result)
    lines = [f"# PGD report: {info.name}", "", f"Trajectory model `{model_name}` ({manifest['steps']} steps, "
             f"{manifest['parameters']} parameters); target policy: last checkpoint of `{policy_dir}`; "
             f"{trajectories} trajectories x {length} transitions per source; {sampling_steps} sampler steps"
             f"{' (EDM predictor)' if edm_predictor else ''}; seed {seed}.",
             "", "| source | transitions | dynamics MSE (mean) | median | reward error (mean abs / mean) | log pi(a|s) | "
             "seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['transitions']} | {r['dynamics_mse']:.4g} | {r['dynamics_mse_median']:.3g} | "
                     f"{r['reward_abs_error']:.3g} / {r['reward_bias']:.2g} | {r['policy_log_prob']:.3f} | {r['seconds']} |")
    write_text_atomic(out / slug / "report.md", "\n".join(lines) + "\n")
    return result


def report_main(args: argparse.Namespace) -> int:
    result = report(args.dataset, args.model, Path(args.policy_run), args.coeffs, args.trajectories, args.length,
                    args.sampling_steps, args.ensemble_steps, Path(args.out), args.seed, args.edm_predictor)
    for r in result["rows"]:
        print(f"{r['source']:60s} dynamics MSE {r['dynamics_mse']:.4g}  log pi {r['policy_log_prob']:.3f}")
    return 0
