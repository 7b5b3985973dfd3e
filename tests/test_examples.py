"""The out-of-tree example (examples/awac.py) used as a user uses it: through the real CLI from its own
folder, fit, resume to a longer budget, a two-cell grid beside BC, and the table."""

import json

import yaml

from offbench import bench
from offbench.cli import main

from .test_algorithms import REPO

EXAMPLES = REPO / "examples"
SMALL = ["--data.eval_every", "20", "--data.block_size", "10", "--data.batch_size", "32", "--eval.episodes", "1",
         "--eval.num_envs", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_example_algorithm_fits_resumes_and_runs_in_a_grid(tiny_hopper, tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES)  # as the example's docstring says: run from its folder
    run = tmp_path / "run"
    fit = ["fit", "--config", "awac.yaml", "--data.dataset", str(tiny_hopper), "--trainer.default_root_dir", str(run), *SMALL]
    main([*fit, "--updates", "40"])
    assert json.loads((run / "result.json").read_text())["updates"] == 40
    main([*fit, "--updates", "60", "--ckpt_path", "last"])  # resume with a longer budget
    result = json.loads((run / "result.json").read_text())
    assert result["algorithm"] == "awac.AWAC" and result["updates"] == 60
    assert [h["updates"] for h in result["history"]] == [20, 40, 60]

    grid = yaml.safe_load((EXAMPLES / "grid.yaml").read_text())
    assert [a["name"] for a in grid["algorithms"]] == ["awac", "bc"]
    grid |= {"output": str(tmp_path / "grid"), "datasets": [str(tiny_hopper)], "updates": 20, "eval_every": 10,
             "eval_episodes": 1, "block_size": 10, "args": ["--data.batch_size", "32", "--eval.num_envs", "1"]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench.main([str(tmp_path / "grid.yaml"), "--workers", "2"]) == 0
    assert main(["table", str(tmp_path / "grid")]) in (0, None)
    table = (tmp_path / "grid" / "table.md").read_text()
    assert "awac" in table and "bc" in table

