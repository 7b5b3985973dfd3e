"""Training the PGD trajectory model once per dataset, resumably: `offbench data pgd train DATASET`.

As the official code (EmptyJackson/policy-guided-diffusion, train_diffusion.py, diffusion/diffusion.py):
batches of 32 windows, each epoch a fresh permutation with the remainder dropped; Adam with the
learning rate warming up linearly from 0.1 lr over the first 10% of steps, then cosine decay to 0
(optax.warmup_cosine_decay_schedule); an EMA of the weights (decay 0.995) updated every 10 steps,
and the EMA weights are what is saved. 5% of the episodes are held out for a validation loss.
A checkpoint (model, EMA, optimiser, data order, RNG) is written atomically every
`checkpoint_every` steps; rerunning the same command continues from it. The data first pass the
checks of `offbench fit` (offbench/data/checks.py), with the same way out for actions outside the
env's bounds (`--clip-actions`, as fit's `--data.clip_actions true`).
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

import numpy as np
import torch

from offbench.data.catalog import resolve
from offbench.data.datamodule import checked
from offbench.data.identity import fingerprint
from offbench.data.sources import load_transitions
from offbench.envs import action_bounds, observation_dim
from offbench.errors import UserError, first_line
from offbench.files import read_json, write_json_atomic
from offbench.forge import _Progress, _save_atomic
from offbench.pgd.model import TrajectoryModel, TrajectoryModelConfig, model_dir
from offbench.trajectory.windows import window_starts, windows


def learning_rate(step: int, total: int, lr: float, warmup: float) -> float:
    """optax.warmup_cosine_decay_schedule(0.1 lr, lr, warmup * total, total) at `step` (0-based)."""
    n_warm = int(total * warmup)
    if step < n_warm:
        return 0.1 * lr + (lr - 0.1 * lr) * step / n_warm
    frac = min(1.0, (step - n_warm) / max(1, total - n_warm))
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def split_windows(t, config: TrajectoryModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Start rows of the training and validation windows (validation: val_ratio of the episodes)."""
    starts = window_starts(t, config.window, config.stride, name=f"dataset {config.dataset!r}")
    n_val = int(config.val_ratio * t.n_episodes)
    val_eps = np.random.default_rng(config.seed).choice(t.n_episodes, n_val, replace=False)
    is_val = np.isin(t.episode[starts], val_eps)
    if is_val.all():
        is_val[:] = False  # too few episodes to hold any out: no validation loss
    return starts[~is_val], starts[is_val]


def train_trajectory_model(config: TrajectoryModelConfig, device: str = "cpu", checkpoint_every: int = 1000,
                           force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or find already trained) the model of `config`; returns its manifest."""
    if checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be at least 1 step, got {checkpoint_every}")
    info = resolve(config.dataset)
    t = load_transitions(info)
    low, high = action_bounds(info)
    # the same checks as `offbench fit` (so the model is trained on the data fit will train on)
    t = checked(t, info, observation_dim(info), low, high, config.clip_actions,
                clip_flag="--clip-actions (and --data.clip_actions true to fit)")
    max_action = float(np.max(np.abs(np.concatenate([low, high]))))
    directory = model_dir(info.name, config.name)  # where PGDDataModule looks (its DatasetInfo's name)
    settings = config.result_settings()
    if force:
        for f in ("manifest.json", "model.pt", "checkpoint.pt"):
            (directory / f).unlink(missing_ok=True)
    manifest = read_json(directory / "manifest.json")
    if manifest is not None:
        if manifest["config"] != settings or manifest["data_fingerprint"] != fingerprint(t):
            raise UserError(
                f"{directory} already holds a PGD trajectory model trained with other settings or data; "
                "add --force to replace it, or --name to keep both"
            )
        return manifest

    _remove_stale_temporaries(directory)
    train_starts, val_starts = split_windows(t, config)
    total = config.total_steps(len(train_starts))
    if len(train_starts) < config.batch_size:
        raise UserError(f"{len(train_starts)} training windows, fewer than a batch of {config.batch_size}: "
                         "lower --batch-size or --window")
    torch.manual_seed(config.seed)
    model = TrajectoryModel.from_config(config, t.obs_dim, t.act_dim, max_action).to(device)
    raw = torch.as_tensor(windows(t, train_starts, config.window), device=device)
    model.normalizer.fit(raw)
    data = model.normalizer.normalize(raw)
    ema = copy.deepcopy(model.edm).requires_grad_(False)
    opt = torch.optim.Adam(model.edm.parameters(), lr=config.lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    state: dict[str, Any] = {"step": 0, "perm": None, "pos": 0, "losses": [], "seconds": 0.0}

    checkpoint = directory / "checkpoint.pt"
    with _Progress(progress) as bar:
        if checkpoint.exists():
            saved = _load_checkpoint(checkpoint, device)
            if saved["config"] != settings:
                raise UserError(f"{checkpoint} (an unfinished training) was written with other settings: rerun with "
                                "the same settings to continue it, add --force to start again, or --name to keep both")
            model.load_state_dict(saved["model"])
            ema.load_state_dict(saved["ema"])
            opt.load_state_dict(saved["opt"])
            generator.set_state(saved["generator"].to("cpu") if device == "cpu" else saved["generator"])
            state = saved["state"]
            bar.log(f"resuming the PGD trajectory model at step {state['step']} of {total} from {checkpoint}")
        task = bar.task("PGD model", total, state["step"])
        start, window_loss, window_n = time.perf_counter(), 0.0, 0
        while state["step"] < total:
            if state["perm"] is None or state["pos"] + config.batch_size > len(state["perm"]):
                perm = torch.randperm(len(data), generator=generator, device=device)
                state["perm"], state["pos"] = perm[len(data) % config.batch_size:], 0
            idx = state["perm"][state["pos"]: state["pos"] + config.batch_size]
            state["pos"] += config.batch_size
            for group in opt.param_groups:
                group["lr"] = learning_rate(state["step"], total, config.lr, config.warmup)
            loss = model.edm.loss(data[idx], generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            if state["step"] % config.ema_every == 0:  # the official step count after apply_gradients
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(model.edm.parameters()), 1.0 - config.ema_decay)
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            if state["step"] % checkpoint_every == 0 or state["step"] == total:
                state["losses"].append({"step": state["step"], "loss": window_loss / window_n})
                state["seconds"] += time.perf_counter() - start
                start, window_loss, window_n = time.perf_counter(), 0.0, 0
                directory.mkdir(parents=True, exist_ok=True)
                _save({"config": settings, "model": model.state_dict(), "ema": ema.state_dict(),
                              "opt": opt.state_dict(), "generator": generator.get_state(), "state": state}, checkpoint)
                bar.update(task, state["step"], f"loss {state['losses'][-1]['loss']:.4f}")

    val_loss = _validation_loss(ema, model, t, val_starts, config, device)
    model.edm.load_state_dict(ema.state_dict())  # the EMA weights are the model, as the official checkpoint
    shape = {"obs_dim": t.obs_dim, "act_dim": t.act_dim, "max_action": max_action, "features": config.features,
             "n_blocks": config.n_blocks, "sigma_data": config.sigma_data, "p_mean": config.p_mean, "p_std": config.p_std,
             "norm": config.norm}
    _save({"shape": shape, "state_dict": model.cpu().state_dict()}, directory / "model.pt")
    manifest = {
        "config": settings, "dataset": info.name, "data_fingerprint": fingerprint(t),
        "transitions": len(t), "episodes": t.n_episodes, "train_windows": len(train_starts),
        "val_windows": len(val_starts), "parameters": sum(p.numel() for p in model.edm.parameters()),
        "steps": total, "train_loss": state["losses"], "val_loss": val_loss,
        "train_seconds": round(state["seconds"], 1), "device": device, "torch": torch.__version__,
        "shape": shape,
    }
    write_json_atomic(directory / "manifest.json", manifest)
    checkpoint.unlink(missing_ok=True)
    return manifest


def _save(obj: Any, path) -> None:
    """`_save_atomic` (which removes its temporary file when it fails), a failed write as one line."""
    try:
        _save_atomic(obj, path)
    except (OSError, RuntimeError) as e:  # a full disk shows as either, depending on where torch.save fails
        raise UserError(f"writing {path} failed ({getattr(e, 'strerror', None) or e}): free space or make "
                        f"{path.parent} writable, then rerun the same command (it resumes from the last checkpoint)"
                        ) from e


def _remove_stale_temporaries(directory) -> None:
    """Temporary files of writes killed before they could clean up (`<file>.tmp<pid>` of a process that is gone)."""
    for tmp in directory.glob("*.tmp*") if directory.is_dir() else ():
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # someone else's live process


def _load_checkpoint(path, device: str) -> dict[str, Any]:
    """The resume state at `path` (written by this module: trusted), or a UserError naming it and the fix."""
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
        for key in ("config", "model", "ema", "opt", "generator", "state"):
            saved[key]  # noqa: B018 - a file without them is not a resume checkpoint
        return saved
    except Exception as e:  # a damaged file: UnpicklingError, RuntimeError, EOFError, KeyError, TypeError...
        raise UserError(f"the resume checkpoint {path} is unreadable ({first_line(e)}): it is truncated or damaged; delete it "
                        "and rerun the same command (training starts again from step 0)") from e


@torch.no_grad()
def _validation_loss(ema, model: TrajectoryModel, t, val_starts: np.ndarray, config: TrajectoryModelConfig,
                     device: str) -> float | None:
    """The EMA model's EDM loss on the held-out episodes' windows (fixed noise), or None without any."""
    if len(val_starts) == 0:
        return None
    data = model.normalizer.normalize(torch.as_tensor(windows(t, val_starts, config.window), device=device))
    generator = torch.Generator(device=device)
    generator.manual_seed(12345)
    losses = [ema.loss(data[i: i + 256], generator).item() * len(data[i: i + 256]) for i in range(0, len(data), 256)]
    return sum(losses) / len(data)


def train_main(args) -> int:
    config = TrajectoryModelConfig(
        dataset=args.dataset, preset=args.preset, name=args.name, features=args.features, n_blocks=args.blocks,
        window=args.window, stride=args.stride, batch_size=args.batch_size, lr=args.lr,
        steps=args.steps, epochs=args.epochs, ema_decay=args.ema_decay, ema_every=args.ema_every,
        val_ratio=args.val_ratio, seed=args.seed, clip_actions=args.clip_actions, norm=args.norm,
    )
    manifest = train_trajectory_model(config, device=args.device, checkpoint_every=args.checkpoint_every,
                                      force=args.force, progress=not args.quiet)
    directory = model_dir(resolve(config.dataset).name, config.name)
    last = manifest["train_loss"][-1]["loss"] if manifest["train_loss"] else float("nan")
    val = manifest["val_loss"]
    print(f"PGD trajectory model {config.name!r} of {config.dataset}: {manifest['parameters']} parameters, "
          f"{manifest['steps']} steps on {manifest['train_windows']} windows; last train loss {last:.4f}"
          + (f", validation loss {val:.4f}" if val is not None else "") + f"; in {directory}")
    return 0

