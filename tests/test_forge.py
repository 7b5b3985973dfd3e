"""The dataset forge (offbench/forge/): structure, manifest, catalog names, determinism, resume and
atomic writes on a tiny Pendulum budget (seconds); SAC learning on the real `small` preset is `slow`."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import minari
import numpy as np
import pytest

from offbench import forge as forge_module
from offbench.cli import main as cli_main
from offbench.data.catalog import forge_dir, resolve
from offbench.data.commands import main as data_main
from offbench.data.identity import fingerprint
from offbench.data.sources import load_transitions, read_d4rl_hdf5, read_minari
from offbench.errors import UserError
from offbench.forge import KINDS, choose_expert, choose_medium, expert_candidates, forge, forge_config

REPO = Path(__file__).resolve().parents[1]
BC_CONFIG = str(REPO / "configs/algorithms/bc.yaml")
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")

# 600 env steps of SAC with 32x32 nets, a checkpoint every 200, 50-step episodes, datasets of >= 300
# steps: the whole pipeline in a few seconds. Pendulum episodes only end by the time limit.
TINY = dict(
    sac_steps=600, start_steps=200, checkpoint_every=200, dataset_steps=300, eval_episodes=2, ref_episodes=3,
    select_episodes=2, hidden=(32, 32), batch_size=64, max_episode_steps=50, num_envs=2,
)
TINY_FLAGS = [
    "--sac-steps", "600", "--start-steps", "200", "--checkpoint-every", "200", "--dataset-steps", "300",
    "--eval-episodes", "2", "--ref-episodes", "3", "--select-episodes", "2", "--hidden", "32", "32", "--batch-size", "64",
    "--max-episode-steps", "50", "--num-envs", "2",
]
EPISODE = 50


def tiny_config(**changes):
    return forge_config("Pendulum-v1", "small", **{**TINY, **changes})


def read_hdf5(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Data and Minari roots of this module (the catalog and Minari read them from the environment)."""
    root = tmp_path_factory.mktemp("forge")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFBENCH_DATA_DIR", str(root / "data"))
        mp.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
        yield root


@pytest.fixture(scope="module")
def tiny(roots):
    """The tiny family, forged once through `offbench data forge` into the catalog's folder."""
    assert data_main(["forge", "--env", "Pendulum-v1", *TINY_FLAGS, "--quiet"]) == 0
    out = forge_dir("Pendulum-v1")
    return out, json.loads((out / "manifest.json").read_text())


def test_the_five_datasets_have_the_d4rl_layout_and_whole_episodes(tiny):
    out, manifest = tiny
    refs = manifest["references"]
    for kind in KINDS:
        data, attrs = read_hdf5(out / f"{kind}.hdf5")
        assert set(D4RL_KEYS) <= set(data)
        n = len(data["rewards"])
        assert data["observations"].shape == (n, 3) and data["actions"].shape == (n, 1)
        assert data["observations"].dtype == np.float32 and data["terminals"].dtype == bool
        assert np.abs(data["actions"]).max() <= 2.0  # Pendulum's torque bound
        assert attrs["env_id"] == "Pendulum-v1" and attrs["max_episode_steps"] == EPISODE and attrs["kind"] == kind
        assert (attrs["ref_min"], attrs["ref_max"]) == (refs["ref_min"], refs["ref_max"])
        # whole episodes only: every 50th row is the time limit, nothing terminates
        assert n % EPISODE == 0 and not data["terminals"].any()
        np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]) + 1, np.arange(EPISODE, n + 1, EPISODE))
        stats = manifest["datasets"][kind]
        assert stats["steps"] == n and stats["episodes"] == n // EPISODE
        assert stats["mean_return"] == pytest.approx(data["rewards"].reshape(-1, EPISODE).sum(1).mean(), rel=1e-5)
        # the loader's view: D4RL's rule drops each timeout row
        t = read_d4rl_hdf5(out / f"{kind}.hdf5")
        assert len(t) == n - n // EPISODE and t.n_episodes == n // EPISODE
    for kind in ("random", "medium", "expert"):
        assert manifest["datasets"][kind]["steps"] >= TINY["dataset_steps"]
    # medium-expert is medium, then expert, row for row
    me, m, e = (read_hdf5(out / f"{k}.hdf5")[0] for k in ("medium-expert", "medium", "expert"))
    for key in D4RL_KEYS:
        np.testing.assert_array_equal(me[key], np.concatenate([m[key], e[key]]))
    # medium-replay: the SAC run's complete episodes up to the medium checkpoint, starting with the
    # uniform random warm-up (200 steps)
    replay = read_hdf5(out / "medium-replay.hdf5")[0]
    medium_steps = manifest["medium"]["env_steps"]
    assert len(replay["rewards"]) == medium_steps // EPISODE * EPISODE


def test_the_minari_copies_match_the_hdf5_files(tiny, roots):
    out, manifest = tiny
    for kind in KINDS:
        stats = manifest["datasets"][kind]
        assert stats["minari_id"] == f"offbench/pendulum/{kind}-v0"
        dataset = minari.load_dataset(stats["minari_id"])
        assert dataset.total_steps == stats["steps"] and dataset.total_episodes == stats["episodes"]
        refs = manifest["references"]
        assert dataset.storage.metadata["ref_min_score"] == pytest.approx(refs["ref_min"])
        assert dataset.storage.metadata["ref_max_score"] == pytest.approx(refs["ref_max"])
        t, d4rl = read_minari(stats["minari_id"]), read_d4rl_hdf5(out / f"{kind}.hdf5")
        assert len(t) == stats["steps"]  # Minari keeps the final observation: no step is lost
        np.testing.assert_allclose(t.act[:EPISODE - 1], d4rl.act[:EPISODE - 1])
        np.testing.assert_allclose(t.obs[:EPISODE - 1], d4rl.obs[:EPISODE - 1], rtol=1e-6)
        np.testing.assert_allclose(t.episode_returns(), [float(r) for r in _returns(out / f"{kind}.hdf5")], rtol=1e-5)
    assert not Path(f"{roots / 'minari'}.staging").exists()  # nothing staged is left next to the Minari root


def _returns(path: Path) -> np.ndarray:
    return read_hdf5(path)[0]["rewards"].reshape(-1, EPISODE).sum(1)


def test_manifest_says_how_each_dataset_was_made(tiny):
    _, manifest = tiny
    assert manifest["env_id"] == "Pendulum-v1" and manifest["config"]["seed"] == 0
    assert manifest["config"]["preset"] == "small" and manifest["config"]["hidden"] == [32, 32]
    sac = manifest["sac"]
    assert sac["env_steps"] == 600 and sac["updates"] == 400
    assert sac["hyperparameters"]["lr"] == 3e-4 and sac["hyperparameters"]["gamma"] == 0.99
    checkpoints = sac["checkpoints"]
    assert [c["env_steps"] for c in checkpoints] == [200, 400, 600]
    assert [c["updates"] for c in checkpoints] == [0, 200, 400]
    # expert: of the 3 best evaluated checkpoints (all 3 here), the best over 2 more episodes
    candidates = manifest["expert"]["candidates"]
    assert [c["env_steps"] for c in candidates] == [
        c["env_steps"] for c in sorted(checkpoints, key=lambda c: (c["eval_return"], c["env_steps"]), reverse=True)
    ]
    expert = max(candidates, key=lambda c: (c["selection_return"], c["env_steps"]))
    assert manifest["expert"]["env_steps"] == expert["env_steps"]
    refs = manifest["references"]
    target = refs["ref_min"] + (refs["ref_max"] - refs["ref_min"]) / 3
    assert manifest["medium"]["target_return"] == pytest.approx(target)
    others = [c for c in checkpoints if c["env_steps"] != expert["env_steps"]]
    closest = min(others, key=lambda c: abs(c["eval_return"] - target))
    assert manifest["medium"]["env_steps"] == closest["env_steps"]
    assert refs["episodes"] == 3 and "uniform random" in refs["rule"]
    assert "sampled" in manifest["rollouts"] and "collect_data.py" in manifest["rollouts"]
    assert set(manifest["seeds"]) >= {"torch", "env", "numpy", "references", "datasets"}
    assert set(manifest["wall_seconds"]) >= {"sac", "references", "rollouts", "writing"}
    assert set(manifest["datasets"]) == set(KINDS)
    # the bytes depend on the machine: it is recorded, and each dataset's fingerprint with it (cached beside the file)
    assert manifest["machine"]["cpu"] and manifest["machine"]["torch_cpu_capability"] and "depends" in manifest["machine"]["note"]
    out, _ = tiny
    for kind, d in manifest["datasets"].items():
        assert d["fingerprint"] == fingerprint(read_d4rl_hdf5(out / d["hdf5"])), kind
        assert json.loads((out / f"{d['hdf5']}.fingerprint.json").read_text())["fingerprint"] == d["fingerprint"]


def test_medium_and_expert_rules_by_hand():
    checkpoints = [{"env_steps": s, "eval_return": r} for s, r in ((1, -900.0), (2, -500.0), (3, -150.0), (4, -150.0))]
    top = expert_candidates(checkpoints, 3)
    assert [c["env_steps"] for c in top] == [4, 3, 2]  # ties: the later first
    assert choose_expert(top, [-200.0, -180.0, -190.0])["env_steps"] == 3  # re-evaluated returns decide
    assert choose_expert(top, [-180.0, -180.0, -190.0])["env_steps"] == 4  # ties: the later
    # target -700: -900 and -500 are equally close; ties go to the earlier checkpoint
    assert choose_medium(checkpoints, 4, -700.0)["env_steps"] == 1
    assert choose_medium(checkpoints, 4, -200.0)["env_steps"] == 3  # any checkpoint but the expert's
    assert choose_medium(checkpoints, 3, -200.0)["env_steps"] == 4


def test_catalog_names_resolve_to_the_forged_files(tiny, capsys):
    out, manifest = tiny
    info = resolve("forge/pendulum-medium-replay-v0")
    assert info.env_id == "Pendulum-v1" and info.max_episode_steps == EPISODE
    assert (info.ref_min, info.ref_max) == (manifest["references"]["ref_min"], manifest["references"]["ref_max"])
    assert Path(info.location) == out / "medium-replay.hdf5" and "forge" in info.note
    assert len(load_transitions(resolve("forge/pendulum-medium-expert-v0"))) > 0
    assert data_main(["info", "forge/pendulum-expert-v0"]) == 0
    text = capsys.readouterr().out
    assert "env_id             Pendulum-v1" in text and f"local data         {out / 'expert.hdf5'}" in text
    assert data_main(["info", "list"]) == 0
    listing = capsys.readouterr().out
    assert "forge/pendulum-medium-replay-v0" in listing and "(forged)" in listing and "(not forged)" in listing


def test_a_missing_family_names_the_command_that_makes_it(roots, capsys):
    with pytest.raises(FileNotFoundError) as e:
        resolve("forge/invertedpendulum-expert-v0")
    expected = f"offbench data forge --env InvertedPendulum-v5 --preset small --out {roots / 'data/forge/invertedpendulum'}"
    assert expected in str(e.value) and "minutes" in str(e.value)
    assert cli_main(["data", "info", "forge/invertedpendulum-expert-v0"]) == 2
    err = capsys.readouterr().err
    assert "offbench: error: forge/invertedpendulum-expert-v0 has not been forged" in err and expected in err
    with pytest.raises(FileNotFoundError, match="--env Hopper-v4 --preset d4rl"):
        resolve("forge/hopper-medium-v0")
    with pytest.raises(ValueError, match="not a forge name"):
        resolve("forge/pendulum-mediocre-v0")


def test_same_seed_same_data_and_another_seed_other_data(tiny, tmp_path):
    out, manifest = tiny
    again = forge(tiny_config(), tmp_path / "again", minari_namespace="test/again", progress=False)
    assert again["sac"]["checkpoints"] == manifest["sac"]["checkpoints"]
    assert again["references"] == manifest["references"]
    for kind in KINDS:
        a, b = read_hdf5(out / f"{kind}.hdf5")[0], read_hdf5(tmp_path / "again" / f"{kind}.hdf5")[0]
        for key in D4RL_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind}/{key}")
    assert [again["datasets"][k]["fingerprint"] for k in KINDS] == [manifest["datasets"][k]["fingerprint"] for k in KINDS]
    other = forge(tiny_config(seed=1, sac_steps=400), tmp_path / "other", minari_namespace="test/other", progress=False)
    assert other["references"]["ref_min"] != manifest["references"]["ref_min"]
    assert not np.array_equal(read_hdf5(out / "random.hdf5")[0]["actions"], read_hdf5(tmp_path / "other/random.hdf5")[0]["actions"])


def test_interrupted_forge_resumes_to_the_same_family(tiny, tmp_path, monkeypatch):
    """Stopped right after the first saved SAC state (the episode end at the 200-step checkpoint),
    then rerun: no dataset exists in between, and the result equals the uninterrupted family."""
    out, manifest = tiny
    save = forge_module.sac._save_train_state

    def save_then_stop(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(forge_module.sac, "_save_train_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        forge(tiny_config(), tmp_path / "run", minari_namespace="test/resumed", progress=False)
    monkeypatch.setattr(forge_module.sac, "_save_train_state", save)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["sac"]  # no manifest, no datasets
    first_checkpoint = tmp_path / "run/sac/checkpoints/step_00000200.pt"
    written = first_checkpoint.stat().st_mtime_ns
    resumed = forge(tiny_config(), tmp_path / "run", minari_namespace="test/resumed", progress=False)
    assert first_checkpoint.stat().st_mtime_ns == written  # resumed after it, not restarted
    assert resumed["sac"]["checkpoints"] == manifest["sac"]["checkpoints"]
    for kind in KINDS:
        a, b = read_hdf5(out / f"{kind}.hdf5")[0], read_hdf5(tmp_path / "run" / f"{kind}.hdf5")[0]
        for key in D4RL_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind}/{key}")


def test_interrupted_writing_leaves_no_half_written_dataset(tiny, roots, tmp_path, monkeypatch):
    """A crash while the third dataset is written: the family has no manifest (the mark of a complete
    family), the files written so far are whole, nothing is left half-written under a final name, and
    a rerun (the SAC run is finished: only the rollouts and writing are redone) completes the family."""
    out, manifest = tiny
    write = forge_module.writing.write_minari_dataset
    calls = []

    def write_two_then_fail(minari_id, *args, **kwargs):
        calls.append(minari_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(minari_id, *args, **kwargs)

    monkeypatch.setattr(forge_module.writing, "write_minari_dataset", write_two_then_fail)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        forge(tiny_config(), run, minari_namespace="test/crash", progress=False)
    monkeypatch.setattr(forge_module.writing, "write_minari_dataset", write)
    assert not (run / "manifest.json").exists()
    assert sorted(p.name for p in run.iterdir()) == [
        "medium-replay.hdf5", "medium.hdf5", "medium.hdf5.fingerprint.json", "minari", "random.hdf5",
        "random.hdf5.fingerprint.json", "sac",  # a written dataset's fingerprint is cached beside it
    ]
    assert sorted(p.name for p in (run / "minari/test/crash").iterdir()) == ["medium-v0", "random-v0"]
    assert not Path(f"{run / 'minari'}.staging").exists()
    again = forge(tiny_config(), run, minari_namespace="test/crash", progress=False)
    for kind in KINDS:
        assert {k: v for k, v in again["datasets"][kind].items() if k not in ("name", "minari_id", "minari_root")} == {
            k: v for k, v in manifest["datasets"][kind].items() if k not in ("name", "minari_id", "minari_root")
        }


def test_a_forge_into_a_folder_keeps_its_minari_copies_there_and_the_default_forge_still_works(tmp_path, monkeypatch):
    """`offbench data forge --out DIR`, then `make benchmark` (whose runner forges the catalog's family):
    the folder's Minari copies stay in DIR/minari, so the default forge is not blocked. Copies that an
    earlier offbench put in the global Minari folder are taken over when their forge is complete with
    the same settings, and refused (named) otherwise."""
    import shutil

    from offbench.bench.runner import _prepare_datasets

    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    mine = tmp_path / "mine"
    assert data_main(["forge", "--env", "Pendulum-v1", "--out", str(mine), *TINY_FLAGS, "--quiet"]) == 0
    assert sorted(p.name for p in (mine / "minari/offbench/pendulum").iterdir()) == sorted(f"{k}-v0" for k in KINDS)
    assert not (tmp_path / "minari").exists()  # nothing in the user's Minari folder
    monkeypatch.setattr(forge_module, "forge_config", lambda env_id, preset=None, **kw: tiny_config())
    _prepare_datasets(["forge/pendulum-medium-v0"])  # what `make benchmark` does first
    assert (forge_dir("Pendulum-v1") / "manifest.json").is_file()
    default = json.loads((forge_dir("Pendulum-v1") / "manifest.json").read_text())
    assert minari.load_dataset("offbench/pendulum/medium-v0").total_steps == default["datasets"]["medium"]["steps"]

    # The layout an earlier offbench left: the folder's copies in the global Minari folder.
    legacy = tmp_path / "legacy-minari"
    shutil.copytree(mine / "minari", legacy)
    ids = [f"offbench/pendulum/{kind}-v0" for kind in KINDS]
    default_owner = f"forge folder {forge_dir('Pendulum-v1').resolve()}"
    forge_module.writing._check_minari_ids(ids, default_owner, legacy, tiny_config())  # same settings: taken over
    with pytest.raises(UserError, match=f"written by the forge folder {mine.resolve()}, made with other settings"):
        forge_module.writing._check_minari_ids(ids, default_owner, legacy, tiny_config(seed=7))


def test_rerun_keeps_a_finished_family_and_other_settings_need_force(tiny, capsys):
    out, manifest = tiny
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert data_main(["forge", "--env", "Pendulum-v1", *TINY_FLAGS, "--quiet"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    text = capsys.readouterr().out
    assert "forge/pendulum-medium-v0" in text and "medium-expert" in text
    with pytest.raises(UserError, match="--force"):
        data_main(["forge", "--env", "Pendulum-v1", *TINY_FLAGS, "--seed", "3", "--quiet"])


def test_a_forged_dataset_trains_bc_through_offbench_fit(tiny, tmp_path):
    _, manifest = tiny
    root = tmp_path / "run"
    cli_main([
        "fit", "--config", BC_CONFIG, "--data.dataset", "forge/pendulum-medium-expert-v0", "--updates", "200",
        "--data.eval_every", "100", "--data.block_size", "50", "--data.batch_size", "64", "--eval.episodes", "2",
        "--eval.num_envs", "2", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ])
    result = json.loads((root / "result.json").read_text())
    assert result["dataset"] == "forge/pendulum-medium-expert-v0" and result["updates"] == 200
    h = result["history"][-1]
    refs = manifest["references"]
    assert h["score"] == pytest.approx(100 * (h["return"] - refs["ref_min"]) / (refs["ref_max"] - refs["ref_min"]))


# --------------------------------------------------------------------------- slow: the real small preset


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["Pendulum-v1", "InvertedPendulum-v5"])
def test_sac_learns_the_small_preset(env_id, tmp_path, monkeypatch):
    """The `small` preset (about 2 and 5 minutes on a free CPU core): the expert beats the random policy by
    a wide margin (at least half of the way from random to the best possible return: Pendulum's best is
    about -150, InvertedPendulum's 1000), and the datasets are ordered random < medium < expert."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    manifest = forge(forge_config(env_id), tmp_path / "out", progress=False)
    refs = manifest["references"]
    best = {"Pendulum-v1": -150.0, "InvertedPendulum-v5": 1000.0}[env_id]
    assert refs["ref_max"] - refs["ref_min"] >= 0.5 * (best - refs["ref_min"]), refs
    means = {kind: manifest["datasets"][kind]["mean_return"] for kind in KINDS}
    assert means["random"] < means["medium"] < means["expert"], means
    assert means["medium"] < means["medium-expert"] < means["expert"]
    assert not manifest["warnings"]


@pytest.mark.slow
def test_bc_on_forged_expert_data_beats_bc_on_random_data(tmp_path, monkeypatch):
    """The forged family separates data quality: BC on Pendulum's expert data scores far above BC on its
    random data (normalized with the forge's references)."""
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    forge(forge_config("Pendulum-v1"), progress=False)
    scores = {}
    for kind in ("random", "expert"):
        root = tmp_path / kind
        cli_main([
            "fit", "--config", BC_CONFIG, "--data.dataset", f"forge/pendulum-{kind}-v0", "--updates", "3000",
            "--data.eval_every", "1000", "--eval.episodes", "10", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        ])
        scores[kind] = json.loads((root / "result.json").read_text())["scores"]["last"]
    assert scores["expert"] > 60 and scores["random"] < 30, scores
