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


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_algorithm_trains_through_the_cli(config, tiny_hopper, tmp_path):
    root = tmp_path / config.stem
    main([
        "fit", "--config", str(config), "--data.dataset", str(tiny_hopper),
        "--data.reward_tuning", "none", "--updates", "40", "--data.eval_every", "20", "--data.block_size", "10",
        "--data.batch_size", "32", "--eval.episodes", "1", "--eval.num_envs", "1",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ])
    result = json.loads((root / "result.json").read_text())
    assert result["updates"] == 40
    assert math.isfinite(result["scores"]["last"])
    metrics = pd.read_csv(root / "metrics.csv")
    losses = metrics[metrics["eval/score"].isna()].filter(like="loss/")  # one row per block of updates
    assert losses.size > 0 and np.isfinite(losses.to_numpy()).all()
