"""`offbench data ...`: make a synthetic dataset, forge D4RL's five datasets for an env, or show what a
dataset name resolves to."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from offbench.data.catalog import (
    CATALOG,
    FORGE_ENVS,
    FORGE_KINDS,
    LOCOMOTION,
    check_env_id,
    forge_dir,
    forge_name,
    resolve,
    shipped_names,
)
from offbench.data.checks import check_transitions
from offbench.data.identity import checked_fingerprint
from offbench.data.sources import load_transitions, local_path
from offbench.data.synthetic import RECIPES, minari_datasets_root, write_random_dataset
from offbench.envs import action_bounds, observation_dim
from offbench.errors import UserError
from offbench.grammar import Parser, plain_flags
from offbench.pgd.commands import add_pgd_parser
from offbench.pgd.commands import main as pgd_main
from offbench.scores import REF_SCORES, normalized_score


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="offbench data", description="Datasets: make synthetic ones, forge D4RL-style ones, inspect any, "
                    "train a dataset's PGD trajectory model.")
    sub = parser.add_subparsers(dest="command", required=True, help="offbench data COMMAND --help for each")

    synth = sub.add_parser(
        "synth", help="random-policy rollouts in a gymnasium env, as a D4RL-layout HDF5 file",
        description="Random-policy rollouts in a gymnasium env, written as a D4RL-layout HDF5 file (and, with "
        "--minari-id, as a Minari dataset), with the env's reference scores where the suite knows them.",
    )
    synth.add_argument("--env", required=True, help="gymnasium env id, e.g. Hopper-v4")
    synth.add_argument("--out", required=True, help="output .hdf5 path")
    synth.add_argument("--episodes", type=int, default=100, help="episodes of the random policy (default 100)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the env and the policy (default 0)")
    synth.add_argument("--max-episode-steps", type=int, default=None, help="default: the env's registered limit")
    synth.add_argument("--minari-id", default=None, help="also write the episodes as this Minari dataset")
    synth.add_argument("--ref-family", choices=sorted(REF_SCORES), default=None, help="store D4RL reference scores "
                       "(default: the env's references where the suite knows them, see synth_references)")
    synth.add_argument("--ref-min", type=float, default=None, help="the random policy's return (with --ref-max)")
    synth.add_argument("--ref-max", type=float, default=None, help="the expert's return (with --ref-min)")

    forge = sub.add_parser(
        "forge", help="train SAC online and write D4RL's five datasets (random, medium, medium-replay, expert, "
        "medium-expert) in the D4RL HDF5 layout and as Minari datasets",
        description="D4RL's recipe on any gymnasium env with flat Box spaces (offbench/forge/). Settings not "
        "given come from the preset: small (Pendulum-v1, InvertedPendulum-v5: minutes on a CPU) or d4rl (1M SAC "
        "steps and 1M-step datasets, as D4RL: hours). An interrupted run resumes its SAC run when rerun with the "
        "same settings. The output depends on the machine (SAC runs in float32 on the CPU, whose rounding differs "
        "between CPUs, torch builds and thread counts): another machine forges other data under the same names. "
        "manifest.json records the machine and each dataset's fingerprint; the datasets behind the committed "
        "results are shipped as shipped/<env>-<kind>-v0 (`offbench data info list`).",
    )
    forge.add_argument("--env", required=True, help="gymnasium env id, e.g. Pendulum-v1, Hopper-v4")
    forge.add_argument("--out", default=None, help="output folder (default: where the catalog looks, "
                       "$OFFBENCH_DATA_DIR/forge/<env> or ~/.offbench/datasets/forge/<env>)")
    forge.add_argument("--preset", default=None, help="small or d4rl (default: small for Pendulum-v1 and "
                       "InvertedPendulum-v5, else d4rl)")
    forge.add_argument("--seed", type=int, default=None, help="default 0")
    forge.add_argument("--sac-steps", type=int, default=None, help="env steps of the SAC run (one update per step after --start-steps)")
    forge.add_argument("--start-steps", type=int, default=None, help="uniform random actions first, no updates")
    forge.add_argument("--checkpoint-every", type=int, default=None, help="env steps between evaluated checkpoints")
    forge.add_argument("--eval-episodes", type=int, default=None, help="episodes per checkpoint evaluation (default 10)")
    forge.add_argument("--dataset-steps", type=int, default=None, help="steps of the random, medium and expert datasets")
    forge.add_argument("--ref-episodes", type=int, default=None, help="episodes of the reference scores (default 100)")
    forge.add_argument("--expert-candidates", type=int, default=None, help="best-evaluated checkpoints re-evaluated to pick the expert (default 3)")
    forge.add_argument("--select-episodes", type=int, default=None, help="episodes of that re-evaluation (default 30)")
    forge.add_argument("--medium-fraction", type=float, default=None, help="medium's target between random (0) and expert (1); default 1/3")
    forge.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden layer sizes (default 256 256)")
    forge.add_argument("--batch-size", type=int, default=None, help="SAC minibatch (default 256)")
    forge.add_argument("--max-episode-steps", type=int, default=None, help="default: the env's registered limit")
    forge.add_argument("--num-envs", type=int, default=None, help="parallel envs in evaluations and rollouts (default 10)")
    forge.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where SAC trains: cpu (default; deterministic) or cuda")
    forge.add_argument("--minari-namespace", default=None, help="Minari ids <namespace>/<kind>-v0 (default offbench/<env>)")
    forge.add_argument("--force", action="store_true", help="delete this folder's forge files and start again")
    forge.add_argument("--quiet", action="store_true", help="no progress bars")

    add_pgd_parser(sub)

    info = sub.add_parser("info", help="what a dataset name resolves to, and its statistics if it is on this machine",
                          description="What a dataset name resolves to (source, env, references, episode limit) and, "
                          "when its data is on this machine, its statistics and checks. The flags are fit's --data.* "
                          "settings, for files that do not carry them.", renamed={"--env-id": ["--env"]})
    info.add_argument("name", metavar="DATASET", help="catalog name or .hdf5 path; `offbench data info list` lists the catalog")
    info.add_argument("--env", default=None, help="the gymnasium env the data was collected in (fit: --data.env_id)")
    info.add_argument("--ref-family", choices=sorted(REF_SCORES), default=None,
                      help="D4RL's reference scores of this family (fit: --data.ref_family)")
    info.add_argument("--ref-min", type=float, default=None, help="the random policy's return, with --ref-max (fit: --data.ref_min)")
    info.add_argument("--ref-max", type=float, default=None, help="the expert's return, with --ref-min (fit: --data.ref_max)")
    info.add_argument("--max-episode-steps", type=int, default=None,
                      help="episode limit of the evaluation env (default: the env's registered one; fit: --data.max_episode_steps)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `offbench data`; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "synth":
        return _synth(args)
    if args.command == "forge":
        return _forge(args)
    if args.command == "pgd":
        return pgd_main(args)
    return _info(args)


def synth_references(env_id: str) -> tuple[float, float, str] | None:
    """(ref_min, ref_max, where they come from) that `data synth` stores for `env_id` when no flag names
    them, or None. The suite's synthetic recipe of that env first (synthetic/<env>-random-v0 is made by the
    same writer, so both files score alike: for Pendulum-v1 ref_max 0, the reward's bound, not the shipped
    family's expert return), else D4RL's references of the env's family (Hopper-v5 -> hopper)."""
    recipe = next((name for name, r in RECIPES.items() if r.env_id == env_id), None)
    if recipe is not None:
        r = RECIPES[recipe]
        return r.ref_min, r.ref_max, f"those of synthetic/{recipe}" + (f": {r.note}" if r.note else "")
    family = env_id.split("-v")[0].lower()
    if family in LOCOMOTION:
        return (*REF_SCORES[family], f"D4RL's {family} references")
    return None


def _synth(args: argparse.Namespace) -> int:
    if args.ref_family is not None and (args.ref_min is not None or args.ref_max is not None):
        raise UserError("pass either --ref-family or --ref-min/--ref-max, not both")
    if (args.ref_min is None) != (args.ref_max is None):
        raise UserError("pass both --ref-min and --ref-max (the random and the expert return), or neither")
    check_env_id(args.env, "--env")
    ref_min, ref_max = REF_SCORES[args.ref_family] if args.ref_family else (args.ref_min, args.ref_max)
    known = synth_references(args.env) if ref_min is None else None
    if known is not None:
        ref_min, ref_max, source = known
    steps = write_random_dataset(
        args.env, args.out, args.episodes, args.seed, args.minari_id,
        max_episode_steps=args.max_episode_steps, ref_min=ref_min, ref_max=ref_max,
    )
    print(f"wrote {steps} steps ({args.episodes} episodes of a random policy in {args.env}) to {args.out}")
    if known is not None:
        print(f"reference scores: ref_min {ref_min:g}, ref_max {ref_max:g} ({source})")
    elif ref_min is None:
        print(f"warning: no reference scores are known for {args.env}, so none were stored and the file cannot be "
              "scored as it is: write it again with --ref-min R_RANDOM --ref-max R_EXPERT (the returns of a random "
              "and an expert policy), or pass --data.ref_min/--data.ref_max to offbench fit", file=sys.stderr)
    if args.minari_id:
        print(f"and Minari dataset {args.minari_id}")
    return 0


def _forge(args: argparse.Namespace) -> int:
    from offbench.forge import forge, forge_config

    check_env_id(args.env, "--env")
    config = forge_config(
        args.env, args.preset, seed=args.seed, sac_steps=args.sac_steps, start_steps=args.start_steps,
        checkpoint_every=args.checkpoint_every, eval_episodes=args.eval_episodes, dataset_steps=args.dataset_steps,
        ref_episodes=args.ref_episodes, expert_candidates=args.expert_candidates, select_episodes=args.select_episodes,
        medium_fraction=args.medium_fraction, hidden=args.hidden,
        batch_size=args.batch_size, max_episode_steps=args.max_episode_steps, num_envs=args.num_envs, device=args.device,
    )
    out = args.out or str(forge_dir(args.env))
    manifest = forge(config, out, minari_namespace=args.minari_namespace, force=args.force, progress=not args.quiet)
    refs = manifest["references"]
    print(f"forged {args.env} in {out} (preset {config.preset}, seed {config.seed}; manifest.json says how)")
    print(
        f"references over {refs['episodes']} episodes: random {refs['ref_min']:.2f}, expert {refs['ref_max']:.2f}; "
        f"medium = checkpoint at {manifest['medium']['env_steps']} env steps, expert = {manifest['expert']['env_steps']}"
    )
    print(f"{'dataset':14s} {'steps':>9s} {'episodes':>9s} {'mean return':>12s} {'normalized':>10s}  name")
    for kind, d in manifest["datasets"].items():
        print(
            f"{kind:14s} {d['steps']:9d} {d['episodes']:9d} {d['mean_return']:12.2f} {d['normalized_mean']:10.1f}  "
            f"{d['name'] or Path(out) / d['hdf5']} | Minari {d['minari_id']}"
        )
    minari_root = next(iter(manifest["datasets"].values())).get("minari_root")
    if minari_root and Path(minari_root).resolve() != minari_datasets_root().resolve():
        print(f"the Minari copies are in {minari_root} (read them with MINARI_DATASETS_PATH={minari_root})")
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}")
    return 0


def _info(args: argparse.Namespace) -> int:
    if args.name == "list":
        for name, entry in CATALOG.items():
            print(f"{name:42s} {entry.source:9s} {entry.env_id}")
        for name in shipped_names():
            shipped = resolve(name)
            print(f"{name:42s} {'shipped':9s} {shipped.env_id} (fingerprint {shipped.fingerprint})")
        for entry in FORGE_ENVS.values():
            made = "forged" if (forge_dir(entry.env_id) / "manifest.json").is_file() else "not forged"
            for kind in FORGE_KINDS:
                print(f"{forge_name(entry.env_id, kind):42s} {'forge':9s} {entry.env_id} ({made})")
        return 0
    try:
        return _info_of(args)
    except UserError as e:  # the data checks name fit's flags: here they are this command's
        e.args = (plain_flags(str(e)),)
        raise


def _info_of(args: argparse.Namespace) -> int:
    info = resolve(  # a forged family that is not there yet: a MissingFileError saying how to make it
        args.name, env_id=args.env, ref_family=args.ref_family, ref_min=args.ref_min, ref_max=args.ref_max,
        max_episode_steps=args.max_episode_steps, env_id_flag="--env",
    )
    for f in fields(info):
        if f.name != "fingerprint":  # printed below, computed from the data
            print(f"{f.name:18s} {getattr(info, f.name)}")
    path = local_path(info)
    if path is None:
        print("local data         not on this machine")
        return 0
    print(f"local data         {path}")
    try:
        t = load_transitions(info)
    except NotImplementedError as e:
        print(f"loading            not supported: {e}")
        return 0
    returns = t.episode_returns()
    scores = normalized_score(returns, info.ref_min, info.ref_max)
    pinned = " (pinned by the catalog: matches)" if info.fingerprint else ""
    print(f"fingerprint        {checked_fingerprint(t, info)}{pinned} (recorded in every result.json trained on it)")
    print(f"transitions        {len(t)} (obs dim {t.obs_dim}, action dim {t.act_dim}), {int(t.done.sum())} done")
    low, high = action_bounds(info)
    check = check_transitions(t, str(path), info.env_id, observation_dim(info), low, high)
    print(f"env action range   {_range(low, high)}")
    print(f"data action range  {_range(check.data_min, check.data_max)}")
    for problem in check.problems:
        print(f"check              error: {problem}")
    for warning in check.warnings:
        print(f"check              warning: {warning}")
    if not check.problems and not check.warnings:
        print("check              ok (sizes match the env, actions within its bounds, no extreme values)")
    print(f"episodes           {t.n_episodes}, length mean {len(t) / t.n_episodes:.1f}")
    print(
        f"episode return     mean {returns.mean():.2f}, std {returns.std():.2f}, min {returns.min():.2f}, "
        f"max {returns.max():.2f} (normalized mean {np.mean(scores):.1f})"
    )
    return 0


def _range(low: np.ndarray, high: np.ndarray) -> str:
    """Per-feature ranges, shortened when every feature has the same one."""
    if np.all(low == low[0]) and np.all(high == high[0]):
        return f"[{low[0]:.4g}, {high[0]:.4g}]" + (f" in each of {len(low)} dims" if len(low) > 1 else "")
    return " ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in zip(low, high))
