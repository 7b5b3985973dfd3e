"""Data sources, catalog, synthetic data and scores: hand-computed conversions, every promised error,
and each kind of name resolving to data written here (no network: reachability is patched off)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from offbench.data import catalog, sources
from offbench.data.catalog import CATALOG, SHIPPED_DIR, maze_goal_xy, resolve, shipped_names
from offbench.data.commands import main as data_main
from offbench.data.datamodule import OfflineDataModule
from offbench.data.identity import cached_fingerprint, fingerprint
from offbench.data.sources import (
    load_transitions,
    reachable,
    read_d4rl_hdf5,
    read_minari,
    transitions_from_d4rl,
)
from offbench.data.synthetic import RECIPES, write_random_dataset
from offbench.envs import make_env
from offbench.errors import UserError
from offbench.scores import REF_SCORES, normalized_score

ANTMAZE_KEYS = ("achieved_goal", "observation")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test runs offline with its own data folders."""
    monkeypatch.setattr(sources, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setenv("OFFBENCH_D4RL_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("OFFBENCH_DATA_DIR", str(tmp_path / "offbench"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))


def write_d4rl(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return path


def hand_episodes() -> dict[str, np.ndarray]:
    """10 rows: episode 0 = rows 0-2 (terminal at 2), episode 1 = rows 3-5 (timeout at 5), episode 2 =
    row 6 alone (timeout), episode 3 = rows 7-9 (the file ends)."""
    n = 10
    return dict(
        observations=np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32),
        actions=np.arange(n, dtype=np.float32)[:, None] / 10,
        rewards=np.arange(1, n + 1, dtype=np.float32),
        terminals=np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool),
        timeouts=np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 0], dtype=bool),
    )


# --------------------------------------------------------------------------- scores


def test_normalized_score_by_hand():
    assert normalized_score(5.0, 0.0, 10.0) == pytest.approx(50.0)
    lo, hi = REF_SCORES["hopper"]
    assert normalized_score(hi, lo, hi) == pytest.approx(100.0)
    assert normalized_score(lo, lo, hi) == pytest.approx(0.0)
    np.testing.assert_allclose(normalized_score(np.array([0.0, 1.0, 0.5]), *REF_SCORES["antmaze"]), [0, 100, 50])
    with pytest.raises(ValueError, match="undefined"):
        normalized_score(1.0, 2.0, 2.0)


# --------------------------------------------------------------------------- D4RL conversion


def test_d4rl_conversion_by_hand():
    t = transitions_from_d4rl(**hand_episodes())
    kept = [0, 1, 2, 3, 4, 7, 8]  # row 5, 6 (timeouts) and 9 (last row) are dropped
    np.testing.assert_array_equal(t.obs[:, 0], kept)
    np.testing.assert_array_equal(t.next_obs[:, 0], [1, 2, 3, 4, 5, 8, 9])
    np.testing.assert_array_equal(t.act[:, 0], np.array(kept, dtype=np.float32) / 10)
    np.testing.assert_array_equal(t.rew, [1, 2, 3, 4, 5, 8, 9])
    np.testing.assert_array_equal(t.done, [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(t.episode, [0, 0, 0, 1, 1, 2, 2])  # the all-dropped episode leaves no id gap
    np.testing.assert_array_equal(t.step, [0, 1, 2, 0, 1, 0, 1])
    # returns of the kept transitions: the dropped timeout row's reward (6) is not in episode 1's
    np.testing.assert_array_equal(t.episode_return, [6, 6, 6, 9, 9, 17, 17])
    np.testing.assert_array_equal(t.episode_returns(), [6, 9, 17])
    assert t.obs.dtype == np.float32 and t.done.dtype == np.float32 and t.episode.dtype == np.int64


def test_d4rl_row_both_terminal_and_timeout_is_dropped_and_last_terminal_row_too():
    d = hand_episodes()
    d["terminals"][5] = True  # terminal and timeout on the same row: D4RL skips it
    d["terminals"][9] = True  # the last row has no next row, terminal or not
    t = transitions_from_d4rl(**d)
    np.testing.assert_array_equal(t.obs[:, 0], [0, 1, 2, 3, 4, 7, 8])
    assert t.done.sum() == 1


def test_read_d4rl_hdf5_matches_conversion(tmp_path):
    path = write_d4rl(tmp_path / "x.hdf5", **hand_episodes())
    t = read_d4rl_hdf5(path)
    np.testing.assert_array_equal(t.next_obs, transitions_from_d4rl(**hand_episodes()).next_obs)
    assert t.n_episodes == 3


def corrupt(case: str) -> dict[str, np.ndarray]:
    d = hand_episodes()
    if case == "missing-key":
        del d["timeouts"]
    elif case == "lengths":
        d["rewards"] = d["rewards"][:-1]
    elif case == "nan-obs":
        d["observations"][2:4, 0] = np.nan
    elif case == "inf-act":
        d["actions"][7, 0] = np.inf
    elif case == "nan-rew":
        d["rewards"][0] = np.nan
    elif case == "ndim-rew":
        d["rewards"] = d["rewards"][:, None]
    elif case == "ndim-obs":
        d["observations"] = d["observations"][:, 0]
    return d


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-key", r"missing key\(s\) \['timeouts'\]; the file has \['actions', 'observations'"),
        ("lengths", r"different numbers of rows .*'rewards': 9"),
        ("nan-obs", r"'observations' has NaN or inf in 2 row"),
        ("inf-act", r"'actions' has NaN or inf in 1 row\(s\) \(first at row 7\)"),
        ("nan-rew", r"'rewards' has NaN or inf in 1 row"),
        ("ndim-rew", r"'rewards' has shape \(10, 1\), expected \(N,\)"),
        ("ndim-obs", r"'observations' has shape \(10,\), expected \(N, dim\)"),
    ],
)
def test_read_d4rl_hdf5_rejects_bad_files(tmp_path, case, message):
    path = write_d4rl(tmp_path / "bad.hdf5", **corrupt(case))
    with pytest.raises(ValueError, match=message):
        read_d4rl_hdf5(path)


# --------------------------------------------------------------------------- catalog and resolve


def test_catalog_has_the_paper_datasets():
    for env in ("halfcheetah", "hopper", "walker2d"):
        for kind in ("medium", "medium-replay", "medium-expert"):
            info = CATALOG[f"{env}-{kind}-v2"]
            assert info.source == "d4rl" and info.env_id.endswith("-v4") and info.max_episode_steps == 1000
            assert (info.ref_min, info.ref_max) == REF_SCORES[env] and info.eval_episodes == 10
        assert "not comparable" in CATALOG[f"mujoco/{env}/medium-v0"].note
    assert CATALOG["hopper-medium-replay-v2"].location == "hopper_medium_replay-v2.hdf5"
    for task in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        old, new = CATALOG[f"antmaze-{task}-v0"], CATALOG[f"D4RL/antmaze/{task}-v1"]
        assert old.location.startswith("Ant_maze_") and new.location == f"D4RL/antmaze/{task}-v1"
        assert new.eval_episodes == 100 and new.success_scored and new.obs_keys == ANTMAZE_KEYS
        assert new.max_episode_steps == (700 if task.startswith("umaze") else 1000)
        assert new.env_kwargs["continuing_task"] is False


def test_antmaze_eval_maps_keep_the_data_walls_and_fix_start_and_goal():
    """The eval map is the map the env was collected in, with one 'r' and one 'g' cell; two resets
    start in the 'r' cell and aim at the 'g' cell (up to gymnasium-robotics' +-1 position noise)."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    for name in ("D4RL/antmaze/umaze-v1", "D4RL/antmaze/medium-play-v1", "D4RL/antmaze/large-diverse-v1"):
        info = resolve(name)
        eval_map = info.env_kwargs["maze_map"]
        registered = gym.spec(info.env_id).kwargs["maze_map"]
        walls = [[1 if c == 1 else 0 for c in row] for row in eval_map]
        assert walls == [[1 if c == 1 else 0 for c in row] for row in registered]
        cells = {c: (i, j) for i, row in enumerate(eval_map) for j, c in enumerate(row) if c in ("r", "g")}
        assert len([c for row in eval_map for c in row if c in ("r", "g")]) == 2
        env = gym.make(info.env_id, max_episode_steps=info.max_episode_steps, **info.env_kwargs)
        maze = env.unwrapped.maze
        for seed in (0, 1):
            obs, _ = env.reset(seed=seed)
            assert np.linalg.norm(obs["achieved_goal"] - maze.cell_rowcol_to_xy(np.array(cells["r"]))) < 1.5
            assert np.linalg.norm(obs["desired_goal"] - maze.cell_rowcol_to_xy(np.array(cells["g"]))) < 1.5
        assert np.concatenate([obs[k] for k in info.obs_keys]).shape == (29,)
        env.close()


def test_unknown_name_suggests_close_names_and_file_paths():
    with pytest.raises(ValueError, match=r"unknown dataset 'hoper-medium-v2'\. Did you mean hopper-medium-v2") as e:
        resolve("hoper-medium-v2")
    assert ".hdf5" in str(e.value) and "--data.env_id" in str(e.value)


def test_resolve_overrides_and_argument_errors():
    info = resolve("hopper-medium-v2", env_id="Hopper-v5", max_episode_steps=500)
    assert (info.env_id, info.max_episode_steps, info.location) == ("Hopper-v5", 500, "hopper_medium-v2.hdf5")
    assert (resolve("hopper-medium-v2", ref_min=0, ref_max=1).ref_min, 1) == (0.0, 1)
    with pytest.raises(ValueError, match="not both"):
        resolve("hopper-medium-v2", ref_family="hopper", ref_min=0.0)
    with pytest.raises(ValueError, match="both --data.ref_min and --data.ref_max"):
        resolve("hopper-medium-v2", ref_min=0.0)
    with pytest.raises(ValueError, match="unknown ref_family 'hoper'"):
        resolve("hopper-medium-v2", ref_family="hoper")


def test_hdf5_path_needs_env_and_refs_from_arguments_or_attributes(tmp_path):
    bare = write_d4rl(tmp_path / "bare.hdf5", **hand_episodes())
    expected = r"does not say the evaluation env and reference scores.*--data.env_id Hopper-v4 --data.ref_family hopper"
    with pytest.raises(ValueError, match=expected):
        resolve(str(bare))
    with pytest.raises(ValueError, match="does not say reference scores"):
        resolve(str(bare), env_id="Hopper-v4")
    info = resolve(str(bare), env_id="Hopper-v4", ref_family="hopper")
    assert (info.source, info.max_episode_steps, info.ref_max) == ("hdf5", 1000, REF_SCORES["hopper"][1])
    assert len(load_transitions(info)) == 7

    made = tmp_path / "made.hdf5"
    write_random_dataset("Pendulum-v1", made, episodes=2, seed=0, max_episode_steps=20, ref_min=-100.0, ref_max=0.0)
    info = resolve(str(made))  # everything from the attributes the writer stored
    assert (info.env_id, info.ref_min, info.ref_max, info.max_episode_steps) == ("Pendulum-v1", -100.0, 0.0, 20)
    assert resolve(str(made), env_id="Pendulum-v1", ref_family="hopper").ref_min == REF_SCORES["hopper"][0]
    with pytest.raises(FileNotFoundError, match="no HDF5 file"):
        resolve(str(tmp_path / "absent.hdf5"))


# --------------------------------------------------------------------------- D4RL names


def test_missing_d4rl_file_offline_says_what_to_put_where(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        load_transitions(resolve("hopper-medium-replay-v2"))
    assert time.perf_counter() - start < 1.0
    msg = str(e.value)
    assert "hopper_medium_replay-v2.hdf5" in msg and str(tmp_path / "d4rl") in msg
    assert "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5" in msg


def test_real_reachability_check_is_quick():
    start = time.perf_counter()
    reachable("http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5", timeout=2.0)
    reachable("http://10.255.255.1/never-answers", timeout=0.5)  # unroutable: the timeout bounds the wait
    assert time.perf_counter() - start < 3.0


def test_d4rl_file_is_downloaded_atomically_when_the_host_answers(tmp_path, monkeypatch):
    """A local HTTP server stands in for D4RL's host: the file lands in the D4RL folder, no .part left."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    write_d4rl(served / "hopper_medium-v2.hdf5", **hand_episodes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(sources, "reachable", reachable)  # the real check, against the local server
        monkeypatch.setattr(sources, "D4RL_LOCOMOTION_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        t = load_transitions(resolve("hopper-medium-v2"))
    finally:
        server.shutdown()
    assert len(t) == 7
    assert sorted(p.name for p in (tmp_path / "d4rl").iterdir()) == ["hopper_medium-v2.hdf5"]


def test_d4rl_name_loads_a_file_placed_where_the_real_one_goes(tmp_path, monkeypatch):
    write_random_dataset("Hopper-v4", tmp_path / "d4rl" / "hopper_medium-v2.hdf5", episodes=3, seed=0)
    t = load_transitions(resolve("hopper-medium-v2"))  # found through $OFFBENCH_D4RL_DIR
    assert t.obs_dim == 11 and t.act_dim == 3 and t.n_episodes == 3

    monkeypatch.delenv("OFFBENCH_D4RL_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the d4rl package's cache: ~/.d4rl/datasets
    write_random_dataset("Walker2d-v4", tmp_path / "home/.d4rl/datasets/walker2d_medium_expert-v2.hdf5", 2, seed=1)
    assert load_transitions(resolve("walker2d-medium-expert-v2")).obs_dim == 17


def test_original_d4rl_antmaze_files_point_to_minari():
    with pytest.raises(NotImplementedError, match=r"D4RL/antmaze/medium-play-v1"):
        load_transitions(resolve("antmaze-medium-play-v0"))


# --------------------------------------------------------------------------- Minari


def test_missing_minari_dataset_offline(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        load_transitions(resolve("mujoco/hopper/medium-v0"))
    assert time.perf_counter() - start < 1.0
    msg = str(e.value)
    assert str(tmp_path / "minari" / "mujoco/hopper/medium-v0") in msg and 'minari[hf]' in msg


def test_minari_id_loads_a_dataset_written_here_and_keeps_truncated_steps(tmp_path):
    # the catalog's Minari id, filled with 3 random Hopper-v5 episodes
    write_random_dataset("Hopper-v5", tmp_path / "h.hdf5", episodes=3, seed=0, minari_id="mujoco/hopper/medium-v0")
    t = load_transitions(resolve("mujoco/hopper/medium-v0"))
    d4rl = read_d4rl_hdf5(tmp_path / "h.hdf5")
    assert t.obs_dim == 11 and t.n_episodes == 3
    assert len(t) == len(d4rl) + 1  # D4RL's layout loses only the file's last row (these episodes terminate)
    np.testing.assert_array_equal(t.obs[: len(d4rl)], d4rl.obs)

    # truncated episodes: Minari keeps all T steps, the D4RL layout drops each timeout row
    write_random_dataset(
        "Pendulum-v1", tmp_path / "p.hdf5", 2, seed=0, minari_id="test/pendulum/random-v0", max_episode_steps=20
    )
    t, d4rl = read_minari("test/pendulum/random-v0"), read_d4rl_hdf5(tmp_path / "p.hdf5")
    assert (len(t), len(d4rl)) == (40, 38)
    np.testing.assert_array_equal(t.step[:20], np.arange(20))
    np.testing.assert_allclose(t.obs[:19], d4rl.obs[:19])
    np.testing.assert_allclose(t.next_obs[:19], d4rl.next_obs[:19])
    assert t.done.sum() == 0 and t.n_episodes == 2
    np.testing.assert_allclose(t.episode_returns(), [t.rew[:20].sum(), t.rew[20:].sum()], rtol=1e-6)


UMAZE_GOAL = np.array([-4.0, 4.0])  # centre of the umaze evaluation map's 'g' cell


def antmaze_episode(ep_id: int, t: int, goal_steps: list[int], own_goal_steps: list[int]):
    """A hand-made AntMaze episode of T steps: T+1 dict observations, far from the evaluation goal
    except after the steps in `goal_steps` (within 0.3 of it); Minari's own reward/success is 1
    after `own_goal_steps`, as when an episode had a goal of its own."""
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(ep_id)
    xy = np.full((t + 1, 2), 5.0) + rng.normal(size=(t + 1, 2)) * 0.1
    xy[np.asarray(goal_steps, dtype=int) + 1] = UMAZE_GOAL + 0.2
    success = np.zeros(t + 1, dtype=bool)
    success[np.asarray(own_goal_steps, dtype=int) + 1] = True
    return EpisodeBuffer(
        id=ep_id,
        observations={"achieved_goal": xy, "desired_goal": np.ones((t + 1, 2)), "observation": rng.normal(size=(t + 1, 27))},
        actions=rng.uniform(-1, 1, size=(t, 8)).astype(np.float32),
        rewards=success[1:].astype(np.float64),
        terminations=np.zeros(t, dtype=bool),
        truncations=np.r_[np.zeros(t - 1, dtype=bool), True],
        infos={"success": success},
    )


def test_maze_goal_is_the_centre_of_the_g_cell():
    assert maze_goal_xy(resolve("D4RL/antmaze/umaze-v1").env_kwargs["maze_map"]) == tuple(UMAZE_GOAL)
    # gymnasium-robotics places the goal within +-1 (noise 0.25 * cell size) of that centre
    env = make_env(resolve("D4RL/antmaze/medium-play-v1"))
    goals = np.array([env.reset(seed=s)[0]["desired_goal"] for s in range(5)])
    assert np.abs(goals - maze_goal_xy(resolve("D4RL/antmaze/medium-play-v1").env_kwargs["maze_map"])).max() <= 1.0


def test_minari_antmaze_flattens_to_29_dims_and_relabels_to_the_evaluation_goal():
    import gymnasium_robotics
    import minari

    gym.register_envs(gymnasium_robotics)
    minari.create_dataset_from_buffers(
        "D4RL/antmaze/umaze-v1",
        buffer=[antmaze_episode(0, 6, goal_steps=[3, 4], own_goal_steps=[1]), antmaze_episode(1, 4, [], [2])],
        env="AntMaze_UMaze-v4", eval_env="AntMaze_UMaze-v4", algorithm_name="hand", author="test",
        author_email="test@localhost", code_permalink="tests/test_data.py", description="hand-made",
    )
    t = load_transitions(resolve("D4RL/antmaze/umaze-v1"))
    ep0 = minari.load_dataset("D4RL/antmaze/umaze-v1")[0]
    assert t.obs.shape == (10, 29)
    first = np.r_[ep0.observations["achieved_goal"][0], ep0.observations["observation"][0]]
    np.testing.assert_allclose(t.obs[0], first)
    np.testing.assert_allclose(t.next_obs[5, :2], ep0.observations["achieved_goal"][6])
    # reward and done where the next position is within 0.5 of the evaluation goal, as D4RL's AntMaze
    # terminals; Minari's own per-episode rewards (after steps 1 and 2) are replaced; a new episode after each done
    np.testing.assert_array_equal(t.done, [0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(t.rew, t.done)
    np.testing.assert_array_equal(t.episode, [0, 0, 0, 0, 1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(t.step, [0, 1, 2, 3, 0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(t.episode_returns(), [1, 1, 0, 0])
    # without relabelling: Minari's terminations (all False) and its own rewards
    plain = read_minari("D4RL/antmaze/umaze-v1", ANTMAZE_KEYS)
    assert plain.done.sum() == 0 and plain.n_episodes == 2
    np.testing.assert_array_equal(plain.rew, [0, 1, 0, 0, 0, 0, 0, 0, 1, 0])
    keys = r"\['achieved_goal', 'desired_goal', 'observation'\]"
    with pytest.raises(ValueError, match=rf"dict observations with keys {keys}: pass obs_keys"):
        read_minari("D4RL/antmaze/umaze-v1")
    with pytest.raises(ValueError, match="obs_keys starting with 'achieved_goal'"):
        read_minari("D4RL/antmaze/umaze-v1", ("observation", "achieved_goal"), goal_xy=(0.0, 0.0))


def test_random_antmaze_minari_dataset_from_the_writer(tmp_path):
    """The writer handles dict observations: flat in HDF5, dicts plus info['success'] in Minari."""
    import minari

    info = resolve("D4RL/antmaze/umaze-v1")
    steps = write_random_dataset(
        info.env_id, tmp_path / "am.hdf5", 2, seed=0, minari_id="test/antmaze/random-v0",
        max_episode_steps=10, obs_keys=ANTMAZE_KEYS, env_kwargs=info.env_kwargs,
    )
    ep = minari.load_dataset("test/antmaze/random-v0")[0]
    assert steps == 20 and ep.infos["success"].shape == (11,)
    assert read_minari("test/antmaze/random-v0", ANTMAZE_KEYS, goal_xy=(-4.0, 4.0)).obs.shape == (20, 29)
    assert read_d4rl_hdf5(tmp_path / "am.hdf5").obs.shape == (18, 29)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_name_is_generated_once_on_demand(tmp_path, capsys):
    info = resolve("synthetic/pendulum-random-v0")
    assert sources.local_path(info) is None
    first = load_transitions(info)
    assert "generated synthetic/pendulum-random-v0" in capsys.readouterr().err
    assert (tmp_path / "offbench/synthetic/pendulum-random-v0.hdf5").is_file()
    second = load_transitions(info)
    assert capsys.readouterr().err == ""  # read from disk, not generated again
    np.testing.assert_array_equal(first.obs, second.obs)
    assert first.n_episodes == 50 and len(first) == 50 * 199
    # the recipe's ref_min is the random policy's mean return: the data scores near 0
    assert abs(np.mean(normalized_score(first.episode_returns(), info.ref_min, info.ref_max))) < 10


def test_random_dataset_is_deterministic_given_the_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_random_dataset("InvertedPendulum-v5", tmp_path / f"{name}.hdf5", 5, seed=seed)
    a, b, c = (read_d4rl_hdf5(tmp_path / f"{n}.hdf5") for n in "abc")
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.act, b.act)
    assert len(a) != len(c) or not np.array_equal(a.act, c.act)


# --------------------------------------------------------------------------- commands


def test_data_commands(tmp_path, capsys):
    out = tmp_path / "p.hdf5"
    synth = ["synth", "--env", "Pendulum-v1", "--out", str(out), "--episodes", "2", "--max-episode-steps", "10"]
    assert data_main([*synth, "--ref-min", "-100", "--ref-max", "0"]) == 0
    assert data_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote 20 steps" in text and "env_id             Pendulum-v1" in text
    assert "transitions        18 (obs dim 3, action dim 1)" in text and "episodes           2" in text
    assert data_main(["info", "hopper-medium-v2"]) == 0
    assert "not on this machine" in capsys.readouterr().out
    assert data_main(["info", "list"]) == 0
    assert "D4RL/antmaze/large-diverse-v1" in capsys.readouterr().out


def test_data_synth_stores_the_envs_references_or_warns_that_it_cannot(tmp_path, capsys):
    def synth(env: str, *flags: str) -> Path:
        out = tmp_path / f"{env}.hdf5"
        assert data_main(["synth", "--env", env, "--out", str(out), "--episodes", "1", "--max-episode-steps", "3",
                          *flags]) == 0
        return out

    # Pendulum: the synthetic recipe's references (the same writer makes synthetic/pendulum-random-v0)
    info = resolve(str(synth("Pendulum-v1")))
    assert (info.ref_min, info.ref_max) == (RECIPES["pendulum-random-v0"].ref_min, 0.0) == (-1233.66, 0.0)
    out, err = capsys.readouterr()
    assert "reference scores: ref_min -1233.66, ref_max 0 (those of synthetic/pendulum-random-v0" in out and not err
    # another version of a D4RL env: its family's references
    info = resolve(str(synth("Hopper-v5")))
    assert (info.ref_min, info.ref_max) == REF_SCORES["hopper"]
    assert "(D4RL's hopper references)" in capsys.readouterr().out
    # flags win over the known references
    info = resolve(str(synth("Pendulum-v1", "--ref-min", "-100", "--ref-max", "-5")))
    assert (info.ref_min, info.ref_max) == (-100.0, -5.0)
    assert "reference scores" not in capsys.readouterr().out
    # an env the suite has no references for: a warning naming the flags, and the file needs them to be scored
    path = synth("MountainCarContinuous-v0")
    err = capsys.readouterr().err
    assert "warning: no reference scores are known for MountainCarContinuous-v0" in err
    assert "--ref-min R_RANDOM --ref-max R_EXPERT" in err
    with pytest.raises(UserError, match="does not say reference scores"):
        resolve(str(path))


# --------------------------------------------------------------------------- dataset identity and shipped data
def test_fingerprint_changes_with_any_value_or_episode_boundary_and_is_cached_per_file(tmp_path):
    path = tmp_path / "p.hdf5"
    write_random_dataset("Pendulum-v1", path, episodes=3, seed=0, max_episode_steps=20, ref_min=-100.0, ref_max=0.0)
    t = read_d4rl_hdf5(path)
    value = fingerprint(t)
    assert len(value) == 16 and value == fingerprint(read_d4rl_hdf5(path))
    for field in ("obs", "act", "rew", "next_obs"):
        changed = read_d4rl_hdf5(path)
        getattr(changed, field).flat[5] += 1e-3
        assert fingerprint(changed) != value, field
    changed = read_d4rl_hdf5(path)
    changed.episode[20:] += 1  # the same rows cut into other episodes
    assert fingerprint(changed) != value
    # cached beside the file while it is unchanged; a rewritten file is hashed again
    assert cached_fingerprint(t, path) == value
    cache = path.with_name(path.name + ".fingerprint.json")
    assert cache.is_file()
    write_random_dataset("Pendulum-v1", path, episodes=3, seed=1, max_episode_steps=20, ref_min=-100.0, ref_max=0.0)
    other = read_d4rl_hdf5(path)
    assert cached_fingerprint(other, path) == fingerprint(other) != value


def test_shipped_datasets_load_with_their_pinned_fingerprints(capsys):
    names = shipped_names()
    assert {"shipped/pendulum-medium-replay-v0", "shipped/pendulum-medium-v0"} <= set(names)
    for name in names:
        info = resolve(name)
        assert info.fingerprint and info.env_id == "Pendulum-v1" and info.ref_min < info.ref_max
        assert fingerprint(load_transitions(info)) == info.fingerprint, name
    assert data_main(["info", "shipped/pendulum-medium-replay-v0"]) == 0
    text = capsys.readouterr().out
    assert f"fingerprint        {resolve('shipped/pendulum-medium-replay-v0').fingerprint} (pinned" in text
    assert data_main(["info", "list"]) == 0
    assert "shipped/pendulum-medium-v0" in capsys.readouterr().out


def test_a_changed_shipped_file_is_refused_with_the_way_out(tmp_path, monkeypatch):
    copy = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, copy)
    monkeypatch.setattr(catalog, "SHIPPED_DIR", copy)
    info = resolve("shipped/pendulum-medium-replay-v0")
    with h5py.File(info.location, "r+") as f:
        f["rewards"][3] += 1.0
    with pytest.raises(UserError, match=r"pinned to [0-9a-f]{16}: the file was changed or damaged; restore it"):
        OfflineDataModule("shipped/pendulum-medium-replay-v0")
    with pytest.raises(UserError, match="unknown shipped dataset 'shipped/hopper-medium-v0'"):
        resolve("shipped/hopper-medium-v0")
