"""The PGD trajectory model: normaliser + EDM denoiser, its settings, and where it is cached.

`offbench data pgd train DATASET` (offbench/pgd/train.py) trains it once per dataset into
<data root>/pgd/<dataset>/<name>/ (data root: $OFFBENCH_DATA_DIR, else ~/.offbench/datasets):
model.pt (the EMA weights, as the official code saves), manifest.json (written last: settings, the
data's fingerprint, losses, timing) and, while training, checkpoint.pt (resume state).
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offbench.batch import Transitions
from offbench.data.identity import fingerprint
from offbench.data.synthetic import data_root
from offbench.errors import MissingFileError, UserError, first_line
from offbench.files import read_json
from offbench.pgd.edm import EDM, Guide, SamplerSettings
from offbench.trajectory.unet import NORMS, UNET_PRESETS, TemporalUNet
from offbench.trajectory.windows import TrajectoryNormalizer

# Training budgets of the presets: the official 10,000 epochs over the windows (batch 32), or a
# fixed number of steps that a CPU does in minutes for the small U-Net.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "official": {"epochs": 10_000, "steps": None},
    "small": {"epochs": None, "steps": 10_000},
}


@dataclass
class TrajectoryModelConfig:
    """Settings of one trained trajectory model (official defaults unless the preset says otherwise)."""

    dataset: str
    preset: str = "small"
    name: str = ""  # cache folder; default: the preset's name
    features: int = 0  # 0: the preset's U-Net size
    n_blocks: int = 0
    window: int = 32  # --trajectory_length
    stride: int = 8  # --dataset_stride
    batch_size: int = 32
    lr: float = 2e-3
    warmup: float = 0.1  # fraction of steps warming up from 0.1 lr, then cosine decay to 0
    steps: int | None = None
    epochs: int | None = None  # steps = epochs * (windows // batch_size), as the official loop
    ema_decay: float = 0.995
    ema_every: int = 10
    val_ratio: float = 0.05  # episodes held out for a validation loss
    seed: int = 0
    sigma_data: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    clip_actions: bool = False  # actions outside the env's bounds clipped (as fit's --data.clip_actions)
    norm: str = "per_step"  # the U-Net's GroupNorm statistics: per time step (official) or over the window

    def __post_init__(self) -> None:
        if self.preset not in UNET_PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose one of {sorted(UNET_PRESETS)}")
        if self.norm not in NORMS:
            raise UserError(f"unknown --norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        for flag, value, low in (("--steps", self.steps, 1), ("--epochs", self.epochs, 1), ("--window", self.window, 2),
                                 ("--stride", self.stride, 1), ("--batch-size", self.batch_size, 1),
                                 ("--ema-every", self.ema_every, 1), ("--features", self.features, 0),
                                 ("--blocks", self.n_blocks, 0)):
            if value is not None and value < low:
                raise UserError(f"{flag} must be at least {low}, got {value}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.val_ratio < 1:
            raise UserError(f"--val-ratio must be in [0, 1), got {self.val_ratio}")
        unet, budget = UNET_PRESETS[self.preset], TRAIN_PRESETS[self.preset]
        self.name = self.name or self.preset
        self.features = self.features or unet["features"]
        self.n_blocks = self.n_blocks or unet["n_blocks"]
        if self.steps is None and self.epochs is None:
            self.steps, self.epochs = budget["steps"], budget["epochs"]
        if (self.steps is None) == (self.epochs is None):
            raise UserError("give either --steps or --epochs, not both")

    def total_steps(self, n_windows: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * max(1, n_windows // self.batch_size)

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the trained model (a resume or a cache hit must match them);
        `clip_actions` only when on, so models trained before it existed still match."""
        settings = asdict(self)
        if not self.clip_actions:
            del settings["clip_actions"]
        return settings


class TrajectoryModel(nn.Module):
    """Samples whole trajectories [s, a, r, done] and turns them into transitions."""

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, features: int, n_blocks: int,
                 sigma_data: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2, norm: str = "per_step") -> None:
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.channels = obs_dim + act_dim + 2
        self.normalizer = TrajectoryNormalizer(obs_dim, act_dim, max_action)
        self.edm = EDM(TemporalUNet(self.channels, features, n_blocks, norm=norm), sigma_data, p_mean, p_std)

    @classmethod
    def from_config(cls, config: TrajectoryModelConfig, obs_dim: int, act_dim: int, max_action: float) -> TrajectoryModel:
        return cls(obs_dim, act_dim, max_action, config.features, config.n_blocks, config.sigma_data, config.p_mean,
                   config.p_std, config.norm)

    def sample(self, n: int, length: int, settings: SamplerSettings | None = None,
               generator: torch.Generator | None = None, guide: Guide | None = None) -> Tensor:
        """n trajectories of `length` rows in the model's normalised space (n, length, channels)."""
        return self.edm.sample((n, length, self.channels), settings or SamplerSettings(), generator, guide)

    def transitions(self, traj: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(obs, act, rew, next_obs, done) of sampled trajectories, raw units."""
        return self.normalizer.to_transitions(traj)

    def next_actions(self, traj: Tensor) -> Tensor:
        """The action of the row after each transition's (the synthetic a'), raw units, in `transitions`' order."""
        return self.normalizer.unnormalize(traj)[:, 1:, self.obs_dim: self.obs_dim + self.act_dim].reshape(-1, self.act_dim)


def model_dir(dataset: str, name: str, data_dir: str | Path | None = None) -> Path:
    """<data root>/pgd/<dataset slug>/<name>."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-")
    return data_root(data_dir) / "pgd" / slug / name


def train_command(dataset: str, name: str) -> str:
    preset = f"--preset {name}" if name in UNET_PRESETS else f"--name {name} --preset small"
    return f"offbench data pgd train {dataset} {preset}"


def load_trajectory_model(dataset: str, name: str, t: Transitions, device: torch.device | str = "cpu"
                          ) -> tuple[TrajectoryModel, dict[str, Any]]:
    """The cached model `name` of `dataset` and its manifest; errors name the command that makes it."""
    directory = model_dir(dataset, name)
    manifest = read_json(directory / "manifest.json")
    if manifest is None:
        partly = " (training was started but not finished: rerun the same command to resume it)" if (
            directory / "checkpoint.pt").exists() else ""
        raise MissingFileError(
            f"no trained PGD trajectory model {name!r} for dataset {dataset!r} (no {directory / 'manifest.json'}){partly}. "
            f"Train it first: {train_command(dataset, name)}"
        )
    if manifest["data_fingerprint"] != fingerprint(t):
        raise UserError(
            f"the PGD trajectory model in {directory} was trained on other data than dataset {dataset!r} holds now "
            f"(fingerprint {manifest['data_fingerprint']} vs {fingerprint(t)}): retrain it with "
            f"{train_command(dataset, name)} --force"
        )
    try:
        saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        s = saved["shape"]
        model = TrajectoryModel(s["obs_dim"], s["act_dim"], s["max_action"], s["features"], s["n_blocks"],
                                s["sigma_data"], s["p_mean"], s["p_std"], s.get("norm", "window"))
        model.load_state_dict(saved["state_dict"])
    except Exception as e:  # a damaged file: UnpicklingError, RuntimeError, EOFError, KeyError, a missing file...
        raise UserError(f"the PGD trajectory model {directory / 'model.pt'} is unreadable ({first_line(e)}): it is missing, "
                        f"truncated or damaged; retrain it with {train_command(dataset, name)} --force") from e
    if "norm" not in s:
        print(f"note: the PGD trajectory model {directory} predates the official per-step normalisation and uses the "
              f"whole-window one; retrain it with {train_command(dataset, name)} --force for the official model", file=sys.stderr)
    return model.to(device).eval().requires_grad_(False), manifest
