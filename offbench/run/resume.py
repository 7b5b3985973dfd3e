"""Resuming a run with other settings: what changed against the run's config.yaml, and, when the
change is accepted (--accept_changes true), the new optimiser settings applied to the restored ones."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class ApplyNewSettings(pl.Callback):
    """On a resume with accepted changes (--accept_changes true): the optimisers' settings as the new
    arguments configured them (learning rate, betas, weight decay, ...) replace those restored from
    the checkpoint, whose optimiser states (moments, step counts) are kept. A learning-rate scheduler
    keeps its progress: the restored rate is rescaled to the new base rate."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimisers are configured from the new arguments here; the checkpoint's states come after.
        self.fresh = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer, groups in zip(trainer.optimizers, self.fresh):
            for group, fresh in zip(optimizer.param_groups, groups):
                for key, value in fresh.items():
                    if key not in ("lr", "initial_lr"):
                        group[key] = value
                new_base = float(fresh.get("initial_lr", fresh["lr"]))
                old_base = float(group.get("initial_lr", group["lr"]))
                if new_base != old_base:
                    scale = float(group["lr"]) / old_base if old_base else 1.0
                    group["lr"] = new_base * scale
                    if "initial_lr" in group:
                        group["initial_lr"] = new_base
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in config.scheduler.optimizer.param_groups]


# Settings that may change when a run is resumed: where and how it runs, not what it computes.
RESUME_FREE = ("trainer", "ckpt_path", "compile", "accept_changes", "config", "weights_only", "logger", "wandb")


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting of a run's config that differs (RESUME_FREE aside; `updates`
    may grow: that extends the run). A changed algorithm is one line, not one per argument."""
    flat_old = _flatten({k: v for k, v in old.items() if k not in RESUME_FREE})
    flat_new = _flatten({k: v for k, v in new.items() if k not in RESUME_FREE})
    algorithm_changed = flat_old.get("model.class_path") != flat_new.get("model.class_path")
    changes = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        before, after = flat_old.get(key, "(not set)"), flat_new.get(key, "(not set)")
        if before == after or (algorithm_changed and key.startswith("model.init_args.")):
            continue
        if key == "updates" and isinstance(before, int) and isinstance(after, int) and after > before:
            continue
        changes.append(f"{key}: {before} -> {after}")
    return changes


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


