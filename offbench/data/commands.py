"""`offbench data ...`: make a synthetic dataset, or show what a dataset name resolves to."""

from __future__ import annotations

import argparse
from dataclasses import fields

import numpy as np

from offbench.data.catalog import CATALOG, resolve
from offbench.data.sources import load_transitions, local_path
from offbench.data.synthetic import write_random_dataset
from offbench.scores import REF_SCORES, normalized_score


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offbench data", description="Datasets: make synthetic ones, inspect any.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="random-policy rollouts in a gymnasium env, as a D4RL-layout HDF5 file")
    synth.add_argument("--env", required=True, help="gymnasium env id, e.g. Hopper-v4")
    synth.add_argument("--out", required=True, help="output .hdf5 path")
    synth.add_argument("--episodes", type=int, default=100)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--max-episode-steps", type=int, default=None, help="default: the env's registered limit")
    synth.add_argument("--minari-id", default=None, help="also write the episodes as this Minari dataset")
    synth.add_argument("--ref-family", choices=sorted(REF_SCORES), default=None, help="store D4RL reference scores")
    synth.add_argument("--ref-min", type=float, default=None)
    synth.add_argument("--ref-max", type=float, default=None)

    info = sub.add_parser("info", help="what a dataset name resolves to, and its statistics if it is on this machine")
    info.add_argument("name", help="catalog name or .hdf5 path; `offbench data info list` lists the catalog")
    info.add_argument("--env-id", default=None)
    info.add_argument("--ref-family", default=None)
    info.add_argument("--ref-min", type=float, default=None)
    info.add_argument("--ref-max", type=float, default=None)
    info.add_argument("--max-episode-steps", type=int, default=None)
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `offbench data`; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "synth":
        return _synth(args)
    return _info(args)


def _synth(args: argparse.Namespace) -> int:
    if args.ref_family is not None and (args.ref_min is not None or args.ref_max is not None):
        raise SystemExit("pass either --ref-family or --ref-min/--ref-max, not both")
    ref_min, ref_max = REF_SCORES[args.ref_family] if args.ref_family else (args.ref_min, args.ref_max)
    steps = write_random_dataset(
        args.env, args.out, args.episodes, args.seed, args.minari_id,
        max_episode_steps=args.max_episode_steps, ref_min=ref_min, ref_max=ref_max,
    )
    print(f"wrote {steps} steps ({args.episodes} episodes of a random policy in {args.env}) to {args.out}")
    if args.minari_id:
        print(f"and Minari dataset {args.minari_id}")
    return 0


def _info(args: argparse.Namespace) -> int:
    if args.name == "list":
        for name, entry in CATALOG.items():
            print(f"{name:42s} {entry.source:9s} {entry.env_id}")
        return 0
    info = resolve(
        args.name, env_id=args.env_id, ref_family=args.ref_family, ref_min=args.ref_min, ref_max=args.ref_max,
        max_episode_steps=args.max_episode_steps,
    )
    for f in fields(info):
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
    print(f"transitions        {len(t)} (obs dim {t.obs_dim}, action dim {t.act_dim}), {int(t.done.sum())} done")
    print(f"episodes           {t.n_episodes}, length mean {len(t) / t.n_episodes:.1f}")
    print(
        f"episode return     mean {returns.mean():.2f}, std {returns.std():.2f}, min {returns.min():.2f}, "
        f"max {returns.max():.2f} (normalized mean {np.mean(scores):.1f})"
    )
    return 0
