"""The forge's settings: `ForgeConfig`, the presets (`small`, `d4rl`) and `forge_config`, the family's
kinds and file names, and the seeds derived from the config's seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from offbench.errors import UserError

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
MANIFEST = "manifest.json"
FORMAT = "offbench-forge-v1"


@dataclass(frozen=True)


class ForgeConfig:
    """Everything that decides a forged family; saved in the manifest and the SAC state."""

    env_id: str
    preset: str
    sac_steps: int  # env steps of the SAC run (= updates + start_steps)
    start_steps: int  # uniform random actions first, no updates (they fill the buffer)
    checkpoint_every: int  # env steps between saved, evaluated actors
    dataset_steps: int  # random / medium / expert: whole episodes until at least this many steps
    eval_episodes: int = 10  # per checkpoint
    ref_episodes: int = 100  # for ref_min / ref_max
    expert_candidates: int = 3  # checkpoints with the highest evaluated returns, re-evaluated to pick the expert
    select_episodes: int = 30  # episodes of that re-evaluation
    seed: int = 0
    medium_fraction: float = 1.0 / 3.0
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    max_episode_steps: int | None = None  # None: the env's registered limit
    num_envs: int = 10  # parallel envs in evaluations and rollouts (part of the seeding protocol)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in (
            "sac_steps", "checkpoint_every", "dataset_steps", "eval_episodes", "ref_episodes", "expert_candidates",
            "select_episodes", "batch_size", "num_envs",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.start_steps < self.sac_steps:
            raise UserError(f"--start-steps must be in [0, --sac-steps {self.sac_steps}), got {self.start_steps}")
        if self.sac_steps < 2 * self.checkpoint_every:
            raise UserError(
                f"--sac-steps {self.sac_steps} gives fewer than 2 checkpoints every {self.checkpoint_every} steps "
                "(--checkpoint-every): medium and expert need different checkpoints"
            )
        if not 0.0 < self.medium_fraction < 1.0:
            raise UserError(f"--medium-fraction must be in (0, 1), got {self.medium_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


# preset -> env id -> settings; "*" is the row for envs without their own. Measured costs: README.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Minutes on a 2-core CPU. Datasets of >= 20k steps (100 Pendulum episodes; InvertedPendulum's
    # episodes run from a few steps (random) to 1000 (balanced)).
    "small": {
        # seed 0 reaches about -150 (the swing-up solved) after 4.5k env steps, -112 at 8k
        "Pendulum-v1": dict(sac_steps=8_000, start_steps=1_000, checkpoint_every=250, dataset_steps=20_000),
        # seed 0's sampled policy balances for all 1000 steps from 15k env steps on (186 at 10k)
        "InvertedPendulum-v5": dict(sac_steps=16_000, start_steps=1_000, checkpoint_every=500, dataset_steps=20_000),
        "*": dict(sac_steps=20_000, start_steps=1_000, checkpoint_every=1_000, dataset_steps=20_000),
    },
    # D4RL's sizes: 1M SAC env steps (10k random warm-up steps, as SAC's MuJoCo runs), 1M steps per
    # rollout dataset, a checkpoint every 10k steps. Hours: run once (a GPU helps: --device cuda).
    "d4rl": {
        "*": dict(sac_steps=1_000_000, start_steps=10_000, checkpoint_every=10_000, dataset_steps=1_000_000),
    },
}
DEFAULT_PRESET = {"Pendulum-v1": "small", "InvertedPendulum-v5": "small"}


def forge_config(env_id: str, preset: str | None = None, **overrides: Any) -> ForgeConfig:
    """The settings of `preset` for `env_id` (default: `small` for Pendulum-v1 and InvertedPendulum-v5,
    else `d4rl`), with `overrides` (ForgeConfig fields; None values are ignored) on top."""
    preset = preset or DEFAULT_PRESET.get(env_id, "d4rl")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    rows = PRESETS[preset]
    settings = dict(rows.get(env_id, rows["*"]))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if "hidden" in settings:
        settings["hidden"] = tuple(settings["hidden"])
    return ForgeConfig(env_id=env_id, preset=preset, **settings)


def eval_seed(config: ForgeConfig) -> int:
    """Seed of the checkpoint evaluations (episode k is reset with it + k)."""
    return 10_000 + config.seed


def selection_seed(config: ForgeConfig) -> int:
    """Seed of the expert candidates' re-evaluations (episode k is reset with it + k)."""
    return 30_000 + config.seed


def reference_seed(config: ForgeConfig) -> int:
    """Seed of the reference evaluations of the random and expert policies (episode k is reset with it + k)."""
    return 20_000 + config.seed


def dataset_seeds(config: ForgeConfig) -> dict[str, list[int]]:
    """The numpy seeds of the rollout datasets (episode reset seeds, then the rollout's torch seed)."""
    return {"random": [config.seed, 3], "medium": [config.seed, 4], "expert": [config.seed, 5]}
