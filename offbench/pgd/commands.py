"""Arguments of `offbench data pgd ...` (kept free of heavy imports: the parser is built for every
`offbench data` call)."""

from __future__ import annotations

import argparse


def add_pgd_parser(sub) -> None:
    """`offbench data pgd train DATASET ...` under the `offbench data` subparsers `sub`."""
    pgd = sub.add_parser("pgd", help="policy-guided diffusion: train a dataset's trajectory model (docs/pgd.md)",
                         description="Policy-guided diffusion (docs/pgd.md): train a dataset's trajectory model, "
                         "report its data against the real simulator's.")
    pgd_sub = pgd.add_subparsers(dest="pgd_command", required=True, help="offbench data pgd COMMAND --help for each")
    add_train_arguments(pgd_sub.add_parser(
        "train", help="train the dataset's PGD trajectory model once and cache it (resumable)",
        description="Trains the EDM trajectory model on the dataset's episode windows and caches it in "
        "<data root>/pgd/<dataset>/<name>/ with a manifest; rerunning an interrupted command resumes it.",
    ))
    add_report_arguments(pgd_sub.add_parser(
        "report", help="dynamics error in the real simulator and target-policy likelihood: real data, PGD at a "
        "sweep of guidance coefficients, an MLP-ensemble world model; writes results/pgd/<dataset>/",
        description="Dynamics error in the real simulator and target-policy likelihood of real data, of PGD's "
        "samples at a sweep of guidance coefficients and of an MLP-ensemble world model's; writes <out>/<dataset>/.",
    ))


def main(args: argparse.Namespace) -> int:
    if args.pgd_command == "report":
        from offbench.pgd.report import report_main

        return report_main(args)
    from offbench.pgd.train import train_main

    return train_main(args)


def add_train_arguments(parser) -> None:
    """Arguments of `offbench data pgd train`."""
    parser.add_argument("dataset", help="catalog name, forge name or D4RL-layout .hdf5 path")
    parser.add_argument("--preset", default="small", choices=["small", "official"],
                        help="small: 32-feature U-Net, 10k steps (minutes on a CPU); official: 1024 features, 10k epochs (GPU)")
    parser.add_argument("--name", default="", help="cache folder name (default: the preset's name)")
    parser.add_argument("--features", type=int, default=0, help="U-Net base width (default: the preset's)")
    parser.add_argument("--blocks", type=int, default=0, help="U-Net blocks (default: the preset's, 3)")
    parser.add_argument("--norm", default="per_step", choices=["per_step", "window"], help="U-Net GroupNorm "
                        "statistics: per time step (the official model's) or over the whole window (models before 2026-12-07)")
    parser.add_argument("--steps", type=int, default=None, help="gradient steps (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs over the windows instead of --steps")
    parser.add_argument("--window", type=int, default=32, help="rows per training window (official 32)")
    parser.add_argument("--stride", type=int, default=8, help="window start stride (official 8)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per gradient step (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="decay of the EMA of the weights (default 0.995)")
    parser.add_argument("--ema-every", type=int, default=10, help="steps between EMA updates (official 10: "
                        "the EMA then averages over about 2,000 steps, so train well beyond that)")
    parser.add_argument("--val-ratio", type=float, default=0.05, help="fraction of episodes held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the batches and the noise (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where it trains: cpu (default) or cuda")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps between resume checkpoints")
    parser.add_argument("--clip-actions", action="store_true", help="clip actions outside the env's bounds to them "
                        "(otherwise refused, as by `offbench fit`; fit the model's data with --data.clip_actions true)")
    parser.add_argument("--force", action="store_true", help="delete this model's files and train again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="the dataset whose trajectory model is reported (as for train)")
    parser.add_argument("--policy-run", required=True, help="an `offbench fit` run directory (its last checkpoint is the target policy)")
    parser.add_argument("--model", default="small", help="the trained trajectory model's name")
    parser.add_argument("--coeffs", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0], help="guidance coefficients")
    parser.add_argument("--trajectories", type=int, default=64, help="trajectories sampled per source (default 64)")
    parser.add_argument("--length", type=int, default=32, help="transitions per trajectory (horizon)")
    parser.add_argument("--sampling-steps", type=int, default=256, help="steps of the EDM sampler (default 256)")
    parser.add_argument("--edm-predictor", action="store_true", help="EDM's Heun predictor (offbench/pgd/edm.py)")
    parser.add_argument("--ensemble-steps", type=int, default=5000, help="training steps of the MLP ensemble")
    parser.add_argument("--out", default="results/pgd", help="folder of the report (default results/pgd; <out>/<dataset>/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and the ensemble (default 0)")
