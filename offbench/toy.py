"""The DiffCPS toy bandit (He et al. 2023, section 3.1 and the appendix "More toy experiments").

A 2-D bandit without state: 5000 actions on the unit circle plus N(0, 0.05^2) noise (std 0.05 on
each coordinate), every reward 1. A unimodal Gaussian policy fitted to it (AWR, BC) puts its mean
action at the centre of the ring, where there is no data; a diffusion policy can place its actions
on the ring. `offbench toy` trains each method of configs/toy/ on this data through its normal
module class and the normal block loop, samples actions with each method's `act()` rule, and
writes a figure like the paper's Figure 1 and a table of scores to results/toy/.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from torch import Tensor

from offbench.batch import Transitions
from offbench.data.datamodule import OfflineDataModule
from offbench.errors import MissingFileError, UserError
from offbench.grammar import DEVICE_HELP, DEVICES, Parser, require_device
from offbench.module import OfflineRLModule

NOISE = 0.05  # std of the Gaussian noise on each coordinate of the ring's points (the paper's N(0, 0.05))


# --------------------------------------------------------------------------- data
def ring_bandit(n: int = 5000, noise: float = NOISE, seed: int = 0, obs_dim: int = 1) -> Transitions:
    """`n` actions a = (cos u, sin u) + N(0, noise^2 I), u ~ U[0, 2 pi), each a one-step episode with
    reward 1 and done 1. There is no state: the observation is a constant zero vector of `obs_dim`
    (the algorithms' networks want an input; a constant one carries no information)."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    act = np.stack([np.cos(angle), np.sin(angle)], 1) + rng.normal(0.0, noise, (n, 2))
    zeros = np.zeros((n, obs_dim), np.float32)
    ones = np.ones(n, np.float32)
    return Transitions(
        obs=zeros, act=act.astype(np.float32), rew=ones, next_obs=zeros.copy(), done=ones,
        episode=np.arange(n), step=np.zeros(n, np.int64), episode_return=ones.copy(),
    )


class BanditDataModule(OfflineDataModule):
    """The ring bandit with OfflineDataModule's contract (`transitions`, `sample()`,
    `train_dataloader()`, `normalize_obs`, `max_action`, state_dict), but no catalog entry and no
    evaluation env: the toy scores the actions themselves.

    Only `__init__` differs: the parent's resolves a dataset name and reads an env's action space,
    neither of which exists here, so the fields it would set are set directly.
    `max_action` is 1 + 5 noise std (1.25): the bounds must not cut the ring's noisy outer edge (with
    bounds at 1 the diffusion policies' clipping would flatten the ring where it meets them).
    """

    def __init__(self, n: int = 5000, noise: float = NOISE, data_seed: int = 0, batch_size: int = 100,
                 updates: int = 20_000, block_size: int = 1000) -> None:
        pl.LightningDataModule.__init__(self)
        self.batch_size, self.block_size = batch_size, min(block_size, updates)
        self.eval_every = updates  # one epoch: the toy has no evaluation during training
        self.normalize = False
        self.info = _BanditInfo(f"toy/ring-bandit-n{n}-noise{noise}-seed{data_seed}")
        self.transitions = ring_bandit(n, noise, data_seed)
        self.max_action = 1.0 + 5.0 * noise
        self.obs_mean = torch.zeros(self.obs_dim)
        self.obs_std = torch.ones(self.obs_dim)
        self._tensors: tuple[Tensor, ...] | None = None
        self._generator: torch.Generator | None = None


@dataclass(frozen=True)
class _BanditInfo:
    name: str  # what OfflineDataModule's error messages call the dataset


# --------------------------------------------------------------------------- scores
def nearest_distance(actions: Tensor, data: Tensor, chunk: int = 4096) -> Tensor:
    """Distance from each action (n, 2) to its nearest data point (m, 2), shape (n,)."""
    return torch.cat([torch.cdist(a, data).amin(1) for a in actions.split(chunk)])


def score(actions: Tensor, data: Tensor, threshold: float, sectors: int = 36) -> dict[str, float]:
    """The toy's scores of sampled actions (n, 2) against the dataset's actions (m, 2):

    on_data: the share of actions whose nearest data point is closer than `threshold` (the paper's
        "modified Jaccard index", with a threshold that continuous samples can meet);
    sectors: the share of the ring's `sectors` equal angle sectors that hold at least one on-data
        action (1 = actions all around the ring; 1/sectors = collapsed onto one arc);
    radius, radius_std: mean and std of |a| (the data: 1 and about the noise std).
    """
    actions = actions.double()
    on = nearest_distance(actions, data.double()) < threshold
    radius = actions.norm(dim=1)
    angle = torch.atan2(actions[:, 1], actions[:, 0])  # (-pi, pi]
    sector = ((angle + torch.pi) / (2 * torch.pi) * sectors).long().clamp(0, sectors - 1)
    return {
        "on_data": float(on.double().mean()),
        "sectors": len(torch.unique(sector[on])) / sectors,
        "radius": float(radius.mean()),
        "radius_std": float(radius.std(correction=0)),
    }


def calibration(data: Tensor, threshold: float, noise: float, n: int = 4000, seed: int = 1) -> dict[str, float]:
    """What the on-data share means at this threshold: the share of points that pass on circles of
    radius 1 +- k noise std (k = 2, 3, 4; both sides pooled) and at the centre."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * torch.pi
    out = {}
    for k in (2, 3, 4):
        shares = []
        for r in (1 - k * noise, 1 + k * noise):
            points = torch.stack([r * angle.cos(), r * angle.sin()], 1)
            shares.append(float((nearest_distance(points, data.double()) < threshold).double().mean()))
        out[f"{k} std off the ring"] = sum(shares) / 2
    out["centre"] = float(data.double().norm(dim=1).min() < threshold)
    return out


# --------------------------------------------------------------------------- methods
@dataclass
class ToyMethod:
    """One configs/toy/<name>.yaml: the module class by import path, the arguments that differ from
    its defaults on the bandit, and which constructor argument is the diffusion step count T."""

    name: str
    label: str
    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    steps_arg: str | None = None  # the constructor argument that is T (None: not a diffusion method)
    steps_at: Literal["train", "sample"] = "train"  # "sample": T only changes sampling, one model serves all T
    per_update: dict[str, float] = field(default_factory=dict)  # init args given as fractions of --updates
    batch_size: int | None = None  # None: the toy's default

    @classmethod
    def load(cls, path: Path) -> ToyMethod:
        raw = yaml.safe_load(path.read_text())
        model = raw.pop("model")
        known = {"label", "steps_arg", "steps_at", "per_update", "batch_size"}
        unknown = set(raw) - known
        if unknown:
            raise UserError(f"{path}: unknown keys {sorted(unknown)}; a toy config has model, {', '.join(sorted(known))}")
        return cls(name=path.stem, class_path=model["class_path"], init_args=dict(model.get("init_args") or {}),
                   label=raw.get("label", path.stem), steps_arg=raw.get("steps_arg"),
                   steps_at=raw.get("steps_at", "train"), per_update=dict(raw.get("per_update") or {}),
                   batch_size=raw.get("batch_size"))

    def module(self, dm: BanditDataModule, updates: int, steps: int | None) -> OfflineRLModule:
        """The module class of the config, built for the bandit's dimensions."""
        module_name, class_name = self.class_path.rsplit(".", 1)
        module_cls = getattr(importlib.import_module(module_name), class_name)
        args = dict(self.init_args)
        args.update({k: max(1, round(f * updates)) for k, f in self.per_update.items()})
        if steps is not None and self.steps_arg:
            args[self.steps_arg] = steps
        return module_cls(obs_dim=dm.obs_dim, act_dim=dm.act_dim, max_action=dm.max_action, **args)


def find_methods(names: list[str], config_dir: Path) -> list[ToyMethod]:
    """Toy configs by name (configs/toy/<name>.yaml) or by path."""
    if not config_dir.is_dir() and not all(name.endswith((".yaml", ".yml")) for name in names):
        raise MissingFileError(f"no folder of toy configs at {config_dir}: pass --configs with the repository's "
                               "configs/toy (or name config files with --methods FILE.yaml)")
    methods = []
    for name in names:
        path = Path(name) if name.endswith((".yaml", ".yml")) else config_dir / f"{name}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in config_dir.glob("*.yaml"))
            raise MissingFileError(f"no toy config {path}; available in {config_dir}: {', '.join(available)}")
        methods.append(ToyMethod.load(path))
    return methods


# --------------------------------------------------------------------------- train and sample
@torch.no_grad()
def distribution_samples(module: OfflineRLModule, obs: Tensor) -> Tensor | None:
    """Draws from a Gaussian policy's distribution (its act() returns the mean or mode), unclipped;
    None for policies whose act() already samples (the diffusion policies) or that have no distribution."""
    from offbench.nets import GaussianActor
    from offbench.sac import TanhGaussianActor

    actor = getattr(module, "actor", None)
    if isinstance(actor, GaussianActor):  # BC (gaussian), IQL
        return actor(obs).sample()
    if isinstance(actor, TanhGaussianActor):  # CQL: act() is its mode, tanh of the Gaussian's mean
        return actor(obs)[0]
    if "action_std" in module.hparams:  # AWR: N(mean, action_std^2), both in units of max_action
        h = module.hparams
        return (actor(obs) + h.action_std * torch.randn(obs.shape[0], h.act_dim, device=obs.device)) * h.max_action
    return None


@dataclass
class Panel:
    """Actions sampled from one trained model, with what they are."""

    method: str  # config name
    label: str
    steps: int | None  # T, for diffusion methods
    kind: str  # "act()", "act() (its Gaussian's mean)" or "samples of its Gaussian"
    actions: np.ndarray
    train_seconds: float

    @property
    def title(self) -> str:
        return f"{self.label}" + ("" if self.steps is None else f", T={self.steps}") + f": {self.kind}"


def train_and_sample(method: ToyMethod, steps: int | None, sample_steps: list[int | None], updates: int,
                     samples: int, seed: int, n_data: int, noise: float, data_seed: int, batch_size: int,
                     accelerator: str) -> list[Panel]:
    """Train one model of `method` on the bandit for `updates` updates through a Lightning Trainer
    (the block loop of OfflineRLModule), then sample `samples` actions with its act() rule for each
    T in `sample_steps` (and from its Gaussian, if it has one)."""
    pl.seed_everything(seed, verbose=False)
    dm = BanditDataModule(n_data, noise, data_seed, batch_size=method.batch_size or batch_size, updates=updates)
    module = method.module(dm, updates, steps)
    trainer = pl.Trainer(
        max_epochs=1, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    module.eval()
    obs = torch.zeros(samples, dm.obs_dim, device=module.device)
    panels = []
    with torch.no_grad():
        torch.manual_seed(seed)
        drawn = distribution_samples(module, obs)
        tanh = type(getattr(module, "actor", None)).__name__ == "TanhGaussianActor"
        gaussian = "tanh-Gaussian" if tanh else "Gaussian"
        act_kind = "act()" if drawn is None else f"act() (its {gaussian}'s {'mode' if tanh else 'mean'})"
        for t in sample_steps:
            if t is not None and method.steps_at == "sample":
                module.hparams[method.steps_arg] = t  # a sampling setting: the same model, sampled with T steps
            torch.manual_seed(seed)
            panels.append(Panel(method.name, method.label, t, act_kind, module.act(obs).cpu().numpy(), seconds))
        if drawn is not None:
            panels.append(Panel(method.name, method.label, None, f"samples of its {gaussian}", drawn.cpu().numpy(), seconds))
    return panels


def _cached(path: Path, key: str) -> list[Panel] | None:
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored.get("key") != key:
        return None
    return [Panel(**{**p, "actions": np.asarray(p["actions"], dtype=np.float32)}) for p in stored["panels"]]


def _store(path: Path, key: str, panels: list[Panel]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"key": key, "panels": [{**asdict(p), "actions": p.actions.tolist()} for p in panels]}
    part = path.with_suffix(".part")
    part.write_text(json.dumps(body))
    part.replace(path)


# --------------------------------------------------------------------------- figure and table
def plot(panels: list[Panel], data: np.ndarray, scores: list[dict[str, float]], path: Path, threshold: float,
         ncols: int = 5) -> None:
    """One panel per row of the table, the dataset faintly behind each; the first panel is the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels) + 1
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.75 * nrows), squeeze=False)
    lim = 1.35
    for ax in axes.flat:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].scatter(data[:, 0], data[:, 1], s=1, color="tab:blue", alpha=0.3, linewidths=0)
    axes.flat[0].set_title(f"data: {len(data)} actions", fontsize=9)
    for ax, panel, s in zip(axes.flat[1:], panels, scores):
        ax.scatter(data[:, 0], data[:, 1], s=1, color="0.8", alpha=0.25, linewidths=0)
        color = "tab:purple" if panel.kind.startswith("samples") else "tab:red"
        if panel.actions.std(0).max() < 0.01:  # one action repeated (a mean or a deterministic policy): mark it
            ax.scatter(*panel.actions.mean(0), s=40, marker="x", color=color)
        else:
            ax.scatter(panel.actions[:, 0], panel.actions[:, 1], s=2, color=color, alpha=0.5, linewidths=0)
        ax.set_title(f"{panel.title}\non data {100 * s['on_data']:.0f}%, mean |a| {s['radius']:.2f}", fontsize=8)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(f"Toy bandit: sampled actions (red: act(); purple: samples of the policy's Gaussian); "
                 f"on data = nearest data point closer than {threshold}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, label: str, steps: int | None, what: str, s: dict[str, float], seconds: float | None) -> dict:
    return {"method": name, "label": label, "T": steps, "actions": what, **s, "train_seconds": seconds}


def _t_meaning(p: dict[str, Any]) -> str:
    """What T is, per method: the diffusion chain's length (one model per T) or a sampler's steps."""
    parts = [f"{arg} of {', '.join(labels)} (one model trained per T)" for arg, labels in p["T_trained"].items()]
    parts += [f"{arg} of {', '.join(labels)} (one model, sampled with each T)" for arg, labels in p["T_sampled"].items()]
    return "; ".join(parts) or "no method here has one"


def write_table(rows: list[dict], protocol: dict[str, Any], cal: dict[str, float], out: Path) -> str:
    """table.md and table.json in `out`; returns the markdown."""
    p = protocol
    lines = [
        "# Toy bandit (DiffCPS paper, section 3.1 and appendix)",
        "",
        f"Protocol: {p['n_data']} actions on the unit circle plus Gaussian noise of std {p['noise']} on each "
        f"coordinate (data seed {p['data_seed']}), every reward 1, one constant observation (a zero); each "
        f"method trained for {p['updates']} updates (batch {p['batch_size']}, seed {p['seed']}) through its "
        f"module class and the block loop, settings in configs/toy/; then {p['samples']} actions sampled per "
        f"row (seed {p['seed']}) with the method's act() rule, or, where labelled, from its Gaussian "
        f"(act() returns its mean or mode). T: {_t_meaning(p)}. Device: {p['device']}; "
        f"training time of the {p['models']} models together {p['train_seconds_total'] / 60:.1f} min.",
        "",
        f"*on data*: the share of sampled actions whose nearest data point is closer than {p['threshold']} "
        f"({p['threshold'] / p['noise']:g} x the noise std), the paper's \"modified Jaccard index\" with a "
        f"threshold that continuous samples can meet (the paper's 1e-8 never is). At this threshold new draws "
        f"from the data distribution itself score {100 * rows[0]['on_data']:.0f}% (first row), points 2 noise std "
        f"off the ring {100 * cal['2 std off the ring']:.0f}%, 3 std {100 * cal['3 std off the ring']:.0f}%, "
        f"4 std {100 * cal['4 std off the ring']:.0f}%, the centre {100 * cal['centre']:.0f}%. *sectors*: the "
        f"share of the ring's 36 angle sectors of 10 degrees holding at least one on-data action (low: "
        f"collapsed onto an arc). *mean |a|*, *std |a|*: mean and std of the actions' radius (data: 1 and "
        f"about {p['noise']}).",
        "",
        "| method | T | actions | on data | sectors | mean \\|a\\| | std \\|a\\| | train (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "" if r["T"] is None else str(r["T"])
        secs = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {r['label']} | {t} | {r['actions']} | {100 * r['on_data']:.1f}% | {r['sectors']:.2f} | "
                     f"{r['radius']:.3f} | {r['radius_std']:.3f} | {secs} |")
    markdown = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    (out / "table.json").write_text(json.dumps({"protocol": protocol, "calibration": cal, "rows": rows}, indent=1) + "\n")
    return markdown


# --------------------------------------------------------------------------- the command
CONFIGS = Path(__file__).resolve().parents[1] / "configs/toy"  # the repository's, found from any working directory
# the table's row order; configs not named here follow in alphabetical order
ORDER = ["awr", "bc", "iql", "cql", "td3bc", "rebrac", "diffusion_ql", "sfbc", "idql", "qgpo", "edp", "diffcps",
         "diffcps-approx"]


def all_methods(config_dir: Path) -> list[str]:
    """Every config in `config_dir` (the default of --methods), in table order."""
    names = sorted(p.stem for p in config_dir.glob("*.yaml"))
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def _parser() -> Parser:
    p = Parser(
        prog="offbench toy", renamed={"--accelerator": ["--device"]},
        description="The DiffCPS toy bandit (paper section 3.1): train each method on a noisy ring of actions, "
        "sample actions with its act() rule, write toy.png, table.md and table.json.",
    )
    p.add_argument("--methods", nargs="+", default=None,
                   help="config names in --configs (or paths to toy configs); default: every config in --configs")
    p.add_argument("--configs", type=Path, default=CONFIGS,
                   help="directory of toy configs (default: the repository's configs/toy, wherever it is run from)")
    p.add_argument("--updates", type=int, default=20_000, help="gradient updates per model (paper: 20000)")
    p.add_argument("--samples", type=int, default=1000, help="actions sampled per row")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 15, 20], help="diffusion steps T of the diffusion methods")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the dataset")
    p.add_argument("--n-data", type=int, default=5000, help="actions in the dataset")
    p.add_argument("--noise", type=float, default=NOISE, help="std of the noise on the ring")
    p.add_argument("--batch-size", type=int, default=100, help="batch per update (configs may override)")
    p.add_argument("--threshold", type=float, default=None,
                   help="on-data distance threshold (default: half the noise std, 0.025)")
    p.add_argument("--out", type=Path, default=Path("results/toy"), help="where toy.png, table.md, table.json go")
    p.add_argument("--cache", type=Path, default=Path("runs/toy"),
                   help="finished models' samples, so an interrupted run resumes; --fresh ignores it")
    p.add_argument("--fresh", action="store_true", help="retrain everything")
    p.add_argument("--device", choices=DEVICES, default="cpu", help=DEVICE_HELP + " (default: cpu)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.updates <= 0 or args.samples <= 0:
        raise UserError(f"--updates and --samples must be positive, got {args.updates} and {args.samples}")
    require_device(args.device)
    threshold = args.threshold if args.threshold is not None else args.noise / 2
    if args.methods is None and not args.configs.is_dir():
        raise MissingFileError(f"no folder of toy configs at {args.configs}: pass --configs with the repository's configs/toy")
    methods = find_methods(args.methods or all_methods(args.configs), args.configs)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    start = time.perf_counter()

    data = torch.as_tensor(ring_bandit(args.n_data, args.noise, args.data_seed).act)
    protocol = {
        "n_data": args.n_data, "noise": args.noise, "data_seed": args.data_seed, "updates": args.updates,
        "samples": args.samples, "seed": args.seed, "batch_size": args.batch_size, "threshold": threshold,
        "steps": args.steps, "accelerator": args.device,
    }
    rows, panels, scores, model_seconds = [], [], [], []
    fresh = torch.as_tensor(ring_bandit(args.samples, args.noise, args.data_seed + 1).act)
    rows.append(_row("data", "data distribution", None, "new draws", score(fresh, data, threshold), None))
    g = torch.Generator().manual_seed(args.seed)
    d64 = data.double()
    cov = torch.cov(d64.T)
    fitted = d64.mean(0) + torch.randn(args.samples, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    rows.append(_row("gaussian_fit", "Gaussian fitted to the data (ML)", None, "samples", score(fitted, data, threshold), None))

    for method in methods:
        if method.steps_arg is None:
            jobs = [(None, [None])]
        elif method.steps_at == "sample":
            jobs = [(args.steps[-1], list(args.steps))]
        else:
            jobs = [(t, [t]) for t in args.steps]
        for steps, sample_steps in jobs:
            config = {**asdict(method), "train_steps": steps, "sample_steps": sample_steps}
            # the key holds what this one model depends on: not the threshold (scoring only) nor the whole
            # --steps list (its own T are in `config`), so a run of some T reuses and feeds the full run's cache
            key = json.dumps({**protocol, "threshold": None, "steps": None, "config": config}, sort_keys=True)
            cell = args.cache / f"{method.name}{'' if steps is None or method.steps_at == 'sample' else f'-T{steps}'}.json"
            got = None if args.fresh else _cached(cell, hashlib.sha256(key.encode()).hexdigest())
            what = f"{method.label}" + ("" if steps is None or method.steps_at == "sample" else f" T={steps}")
            if got is None:
                print(f"offbench toy: training {what} for {args.updates} updates ...", flush=True)
                got = train_and_sample(method, steps, sample_steps, args.updates, args.samples, args.seed,
                                       args.n_data, args.noise, args.data_seed, args.batch_size, args.device)
                _store(cell, hashlib.sha256(key.encode()).hexdigest(), got)
            else:
                print(f"offbench toy: {what}: reusing {cell}", flush=True)
            model_seconds.append(got[0].train_seconds)
            for panel in got:
                s = score(torch.as_tensor(panel.actions), data, threshold)
                rows.append(_row(panel.method, panel.label, panel.steps, panel.kind, s, panel.train_seconds))
                panels.append(panel)
                scores.append(s)
                print(f"  {panel.title}: on data {100 * s['on_data']:.1f}%, mean |a| {s['radius']:.3f}", flush=True)

    for kind, at in (("T_trained", "train"), ("T_sampled", "sample")):
        protocol[kind] = {}
        for m in methods:
            if m.steps_arg and m.steps_at == at:
                protocol[kind].setdefault(m.steps_arg, []).append(m.label)
    protocol["device"] = _device(args.device)
    protocol["models"] = len(model_seconds)
    protocol["train_seconds_total"] = sum(model_seconds)
    protocol["wall_seconds"] = time.perf_counter() - start  # of this invocation (shorter when models were cached)
    cal = calibration(data, threshold, args.noise)
    plot(panels, data.numpy(), scores, args.out / "toy.png", threshold)
    print(write_table(rows, protocol, cal, args.out))
    print(f"offbench toy: wrote {args.out / 'toy.png'}, {args.out / 'table.md'}, {args.out / 'table.json'}")
    return 0


def _device(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


if __name__ == "__main__":  # `python -m offbench.toy`: a user's mistake is one message and status 2, as in `offbench toy`
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"offbench: error: {e}", file=sys.stderr)
        sys.exit(2)
