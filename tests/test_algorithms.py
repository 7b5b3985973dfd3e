"""Every algorithm config in configs/algorithms/ trains through the real `offbench fit` path on a
tiny dataset, on CPU: finite losses, a result.json, and the exact number of updates."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from offbench.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs/algorithms").glob("*.yaml"))
# The trajectory planners plan many windows with a U-Net at every env step (seconds per step at the official
# sizes on a CPU): here they run at small sizes, so that their training and evaluation paths take seconds.
SMALL = {
    "diffuser": ["--model.init_args.horizon", "8", "--model.init_args.n_timesteps", "3", "--model.init_args.dim", "8",
                 "--model.init_args.dim_mults", "[1, 4]", "--model.init_args.n_plans", "4"],
    "decision_diffuser": ["--model.init_args.horizon", "8", "--model.init_args.n_timesteps", "3", "--model.init_args.dim", "8",
                          "--model.init_args.dim_mults", "[1, 4]", "--model.init_args.inv_hidden", "16"],
}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_algorithm_trains_through_the_cli(config, tiny_hopper, tmp_path):
    root = tmp_path / config.stem
    main([
        "fit", "--config", str(config), "--data.dataset", str(tiny_hopper),
        "--data.reward_tuning", "none", "--updates", "40", "--data.eval_every", "20", "--data.block_size", "10",
        "--data.batch_size", "32", "--eval.episodes", "1", "--eval.num_envs", "1",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", *SMALL.get(config.stem, []),
    ])
    result = json.loads((root / "result.json").read_text())
    assert result["updates"] == 40
    assert math.isfinite(result["scores"]["last"])
    metrics = pd.read_csv(root / "metrics.csv")
    losses = metrics[metrics["eval/score"].isna()].filter(like="loss/")  # one row per block of updates
    assert losses.size > 0 and np.isfinite(losses.to_numpy()).all()
