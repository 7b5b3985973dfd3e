"""Where a run is set up: `offbench fit` (LightningCLI with the suite's conventions) and what a run
keeps on disk. Nothing is imported here (the grid checks import arguments.py without Lightning).

    fit.py          OffbenchCLI and fit_main: total --updates, data sizes linked into the model,
                    evaluation under --eval.*, one run directory per run
    arguments.py    the command line before LightningCLI parses it: the grammar's shorthands,
                    mistyped/renamed settings, options the contract cannot honour, class paths
    run_dir.py      the run directory: naming, lock, never overwritten, partial files removed
    checkpoints.py  last.ckpt/previous.ckpt written atomically, read back with the way out
    resume.py       settings changed on resume, and applying them when accepted
    metrics.py      metrics.csv, safe against a full disk, continued on resume
    screen.py       what the run prints: quiet Lightning notes, final score, parameter summary
"""
