"""Weights & Biases logging for `offbench fit` and grids: an optional extra (`pip install 'offbench[wandb]'`).

`offbench fit ... --logger wandb` (or `logger: wandb` in a config) adds Lightning's WandbLogger beside
the run directory's metrics.csv (and TensorBoard log); its options are the `wandb` group
(`--wandb.project`, `--wandb.group`, ...). The W&B run lives in the run directory (`<run>/wandb/`), is
named algorithm/dataset/seed, holds the resolved config, continues under the same id when the fit
resumes from its checkpoint, and gets config.yaml, result.json and the final scores at the end.

Offline by default (`--wandb.mode online` or WANDB_MODE=online to stream): a run never waits on the
network, and `wandb sync <run>/wandb/offline-run-*` uploads it later. Online with an unreachable
server (or no login) waits ONLINE_INIT_TIMEOUT seconds, warns and logs offline. See docs/logging.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger

from offbench.errors import UserError

INSTALL = "pip install 'offbench[wandb]'"
MODES = ("offline", "online")
ID_FILE = "wandb-run.json"  # in the run directory: the W&B run id a resumed fit continues
UPLOADED = ("config.yaml", "result.json")
ONLINE_INIT_TIMEOUT = 30.0  # seconds


def require_wandb(what: str) -> None:
    """Stop with one clear message when the wandb package is missing."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"{what} needs the wandb package, which is not installed. Install it with: {INSTALL}")


@dataclass
class WandbOptions:
    """The `wandb` group of `offbench fit` (used with `--logger wandb`).

    Args:
        project: W&B project.
        entity: W&B team or user; None: your default entity.
        group: W&B group; a grid sets it to the grid's name.
        name: run name; None: algorithm/dataset/seed<k>.
        tags: W&B tags.
        mode: offline (the default unless WANDB_MODE says otherwise: nothing waits on the network;
            upload later with `wandb sync`) or online.
    """

    project: str = "offbench"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["offline", "online"] | None = None


def resolve_mode(mode: str | None) -> str:
    """The mode to use: the option, else $WANDB_MODE, else offline."""
    return mode or os.environ.get("WANDB_MODE") or "offline"


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger with the suite's conventions: the run in the run directory, metrics
    against `updates` (Lightning's global_step stays 0 here: the algorithms step their own
    optimisers), the same W&B run on resume, config.yaml, result.json and the scores at the end."""

    def __init__(self, root: str | os.PathLike, options: WandbOptions, name: str, config: dict[str, Any],
                 resumed: bool) -> None:
        import wandb

        self.root = Path(root)
        id_path = self.root / ID_FILE
        saved = json.loads(id_path.read_text()) if resumed and id_path.exists() else None
        run_id = saved["id"] if saved else secrets.token_hex(4)  # W&B run ids: 8 characters of [a-z0-9]
        mode = resolve_mode(options.mode)
        super().__init__(
            name=options.name or name, save_dir=str(self.root), id=run_id, project=options.project,
            entity=options.entity, group=options.group, tags=list(options.tags) or None, config=config,
            mode=mode, job_type="fit",
            # online: give up on an unreachable server after 30 s (then log offline), not W&B's 90 s
            settings=wandb.Settings(init_timeout=ONLINE_INIT_TIMEOUT),
        )
        self._wandb_init.pop("anonymous", None)  # Lightning's default; wandb warns that it has no effect
        self.root.mkdir(parents=True, exist_ok=True)
        id_path.write_text(json.dumps({"id": run_id, "project": options.project, "mode": mode}) + "\n")
        self._finished = False

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            import wandb

            try:
                self._experiment = wandb.init(**self._wandb_init)
            except wandb.errors.Error as e:
                if self._wandb_init.get("mode") != "online":
                    raise
                # Online but the server cannot be reached (or no login): the run goes on, logged offline.
                warnings.warn(
                    f"W&B online mode failed ({type(e).__name__}: {str(e).splitlines()[0]}); logging this run "
                    f"offline instead, upload it later with: wandb sync {self.root / 'wandb'}/offline-run-*",
                    stacklevel=2,
                )
                self._wandb_init["mode"] = "offline"
                wandb.teardown()  # the failed run still holds its id in W&B's service process
                self._experiment = wandb.init(**self._wandb_init)
            self._experiment.define_metric("updates")
            self._experiment.define_metric("*", step_metric="updates", step_sync=True)
        return self._experiment

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self.experiment.log(dict(metrics))  # no trainer/global_step: it is always 0 here

    def finalize(self, status: str) -> None:
        """At the end of a fit: upload config.yaml and result.json, put the scores into the run's
        summary, and close the run (offline: complete on disk, ready for `wandb sync`)."""
        if self._finished or self._experiment is None:
            return
        self._finished = True
        run = self._experiment
        if status == "success":
            for name in UPLOADED:
                source = self.root / name
                if source.exists():
                    target = Path(run.dir) / name
                    shutil.copyfile(source, target)  # a copy: the offline run stays whole if moved
                    run.save(str(target), base_path=run.dir, policy="now")
            result = self.root / "result.json"
            if result.exists():
                scores = json.loads(result.read_text()).get("scores", {})
                run.summary.update({f"score/{k}": v for k, v in scores.items() if v is not None})
        run.finish(exit_code=0 if status == "success" else 1)
