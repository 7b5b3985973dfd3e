"""offbench: a PyTorch Lightning benchmark suite for offline reinforcement learning.

Where things are:

    cli.py, grammar.py    the `offbench` command: a dispatcher, and the grammar every command shares
    run/                  where a run is set up: `offbench fit` (LightningCLI), its run directory,
                          checkpoints, resume checks and metrics.csv (wandb_logging.py: W&B beside it)
    data/, forge/, pgd/   where data comes from: catalog, sources, the DataModule; D4RL's recipe on
                          any env; policy-guided synthetic data (batch.py: the data contract)
    module.py, nets.py, diffusion/, trajectory/, sac.py, settings.py
                          what algorithms are built from (algorithms/ holds the algorithms)
    evaluation.py, envs.py, scores.py
                          how a policy is scored
    bench/                grids of runs (local or Ray), resumable
    tables.py, stats.py   where numbers are written: tables, curves, aggregate statistics
    perf.py, gpu_check.py, toy.py
                          measurements: throughput, the CUDA checks, the toy bandit
    errors.py, files.py   one-line user errors; atomic writes, locks
"""

__version__ = "0.1.0"
