"""Evaluation: exact episode counts, seeding, no short-episode bias, scores, AntMaze, the callback."""

from __future__ import annotations

import dataclasses
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from offbench.data.catalog import DatasetInfo, resolve
from offbench.envs import action_bounds, flatten_obs, make_env, make_vector_env, observation_dim
from offbench.errors import UserError
from offbench.evaluation import ACTION_TOLERANCE, EvalCallback, evaluate, isolated_rng

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # the v4 envs are "out of date"
    # the tiny fit below has no optimiser, few batches, and a resume into a new directory
    pytest.mark.filterwarnings("ignore:.*(no optimizer|logging interval|dirpath has changed).*"),
]

HOPPER = DatasetInfo("hopper-test", "synthetic", "test", "Hopper-v4", -20.272305, 3234.3, max_episode_steps=100)
PENDULUM = DatasetInfo(
    "pendulum-test", "synthetic", "test", "Pendulum-v1", -2000.0, 0.0, max_episode_steps=20, eval_episodes=2
)
# InvertedPendulum: reward 1 per step, the episode ends when the pole falls.
INVERTED = DatasetInfo("inverted-test", "synthetic", "test", "InvertedPendulum-v5", 0.0, 1000.0, max_episode_steps=60)
ANTMAZE = resolve("D4RL/antmaze/umaze-v1")


def linear_policy(obs: Tensor) -> Tensor:
    """A fixed linear feedback for Hopper, written elementwise so every row is computed the same
    way whatever the batch size (a matmul kernel could round differently for n=1 and n=4)."""
    return (-0.3 * obs[:, 2:5] + 0.1 * obs[:, 8:11] + 0.05).clamp(-1.0, 1.0)


def zeros(act_dim: int):
    return lambda obs: torch.zeros(obs.shape[0], act_dim)


# --- evaluate ----------------------------------------------------------------------------------
def test_exact_episode_count_and_reproducible_across_calls_and_num_envs():
    a = evaluate(linear_policy, HOPPER, episodes=5, num_envs=4, seed=3)
    b = evaluate(linear_policy, HOPPER, episodes=5, num_envs=4, seed=3)
    c = evaluate(linear_policy, HOPPER, episodes=5, num_envs=1, seed=3)
    assert len(a["returns"]) == len(a["lengths"]) == len(a["scores"]) == a["episodes"] == 5
    assert a["returns"] == b["returns"] and a["lengths"] == b["lengths"]
    # per-episode seeding: episode k is the same episode whichever slot or round runs it
    assert a["returns"] == c["returns"] and a["lengths"] == c["lengths"]
    assert len(set(a["returns"])) == 5  # different seeds, different episodes
    assert a["env_steps"] == sum(a["lengths"])
    other = evaluate(linear_policy, HOPPER, episodes=5, num_envs=4, seed=4)
    assert other["returns"][:4] == a["returns"][1:]  # seed 4 + k is seed 3 + (k + 1)


def test_early_ending_episodes_are_not_over_counted():
    # Unpushed, the pole falls after 19 to 35 steps depending on the seed. Pooled in 3 slots, the
    # slots whose pole fell first must not start counted second episodes.
    pooled = evaluate(zeros(1), INVERTED, episodes=7, num_envs=3, seed=0)
    alone = [evaluate(zeros(1), INVERTED, episodes=1, num_envs=1, seed=k) for k in range(7)]
    lengths = [r["lengths"][0] for r in alone]
    assert pooled["lengths"] == lengths and len(set(lengths)) > 3
    assert pooled["returns"] == [r["returns"][0] for r in alone]
    assert pooled["returns"] == [n - 1.0 for n in lengths]  # v5: reward 1 per step, 0 on the fall
    assert max(lengths) < INVERTED.max_episode_steps  # every episode ended early
    # 7 episodes in 3 rounds: policy calls = sum over rounds of the longest episode
    rounds = [lengths[0:3], lengths[3:6], lengths[6:7]]
    assert pooled["vector_steps"] == sum(max(r) for r in rounds)


def test_truncated_episodes_have_the_episode_limit():
    result = evaluate(zeros(1), PENDULUM, episodes=3, num_envs=2, seed=0)
    assert result["lengths"] == [PENDULUM.max_episode_steps] * 3


def test_normalized_score_by_hand():
    result = evaluate(zeros(1), PENDULUM, episodes=4, num_envs=4, seed=0)
    returns = np.array(result["returns"])
    expected = 100 * (returns - PENDULUM.ref_min) / (PENDULUM.ref_max - PENDULUM.ref_min)
    assert np.allclose(result["scores"], expected)
    assert result["score"] == pytest.approx(expected.mean())
    assert result["score_std"] == pytest.approx(expected.std())
    assert result["return"] == pytest.approx(returns.mean())
    assert result["successes"] is None


def test_asynchronous_envs_give_the_same_episodes():
    sync = evaluate(zeros(1), PENDULUM, episodes=3, num_envs=2, seed=5)
    async_ = evaluate(zeros(1), PENDULUM, episodes=3, num_envs=2, seed=5, asynchronous=True)
    assert sync["returns"] == async_["returns"]


def test_bad_policy_output_fails_clearly():
    with pytest.raises(ValueError, match="expected \\(n, 1\\)"):
        evaluate(zeros(2), PENDULUM, episodes=1, num_envs=1)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(lambda obs: torch.full((obs.shape[0], 1), float("nan")), PENDULUM, episodes=1, num_envs=1)


def constant(value: float):
    return lambda obs: torch.full((obs.shape[0], 1), value)


def test_actions_outside_the_bounds_are_an_error_unless_clipping_is_asked_for():
    # Pendulum's bounds are [-2, 2]: an act() 10x outside them is an author's bug, not clipped silently.
    with pytest.raises(UserError, match=r"^my\.Algo\.act returned actions outside .*-20 in action dimension 0, "
                       r"bounds \[-2, 2\].*--eval\.clip_actions true"):
        evaluate(constant(-20.0), PENDULUM, episodes=1, num_envs=1, name="my.Algo.act")
    # round-off within ACTION_TOLERANCE (1e-5 of the bound) passes and is clipped; beyond it does not
    assert ACTION_TOLERANCE == 1e-5
    inside = evaluate(constant(2.0 * (1 + 0.5e-5)), PENDULUM, episodes=1, num_envs=1)
    assert inside["returns"] == evaluate(constant(2.0), PENDULUM, episodes=1, num_envs=1)["returns"]
    with pytest.raises(UserError, match="2.00004 in action dimension 0"):
        evaluate(constant(2.0 * (1 + 2e-5)), PENDULUM, episodes=1, num_envs=1)
    # clip_actions: a policy defined as clipped gets exactly the clipped actions
    clipped = evaluate(constant(-20.0), PENDULUM, episodes=1, num_envs=1, clip_actions=True)
    assert clipped["returns"] == evaluate(constant(-2.0), PENDULUM, episodes=1, num_envs=1)["returns"]


def test_the_largest_action_outside_the_bounds_is_named():
    def policy(obs: Tensor) -> Tensor:  # Hopper, bounds [-1, 1]: two dimensions out, -7 the larger
        return torch.tensor([[0.5, 3.0, -7.0]]).expand(obs.shape[0], 3)

    with pytest.raises(UserError, match=r"-7 in action dimension 2, bounds \[-1, 1\]"):
        evaluate(policy, HOPPER, episodes=1, num_envs=1)


# --- envs --------------------------------------------------------------------------------------
def test_env_helpers():
    assert observation_dim(HOPPER) == 11
    low, high = action_bounds(HOPPER)
    assert low.tolist() == [-1.0] * 3 and high.tolist() == [1.0] * 3
    env = make_env(PENDULUM, max_episode_steps=7)
    assert env.spec.max_episode_steps == 7
    envs = make_vector_env(PENDULUM, 3)
    assert envs.num_envs == 3
    envs.close()


def test_flatten_obs_order_and_errors():
    obs = {"observation": np.ones((2, 27)), "achieved_goal": np.zeros((2, 2)), "desired_goal": np.full((2, 2), 5.0)}
    flat = flatten_obs(obs, ("achieved_goal", "observation"))
    assert flat.shape == (2, 29) and flat.dtype == np.float32
    assert (flat[:, :2] == 0).all() and (flat[:, 2:] == 1).all()  # achieved_goal first, no desired_goal
    with pytest.raises(ValueError, match="obs_keys"):
        flatten_obs(obs, None)


# --- AntMaze -----------------------------------------------------------------------------------
def test_antmaze_fixed_start_and_goal_and_29_dims():
    info = ANTMAZE
    assert info.success_scored and observation_dim(info) == 29
    env = make_env(info)
    unwrapped = env.unwrapped
    cells = {
        c: (i, j) for i, row in enumerate(info.env_kwargs["maze_map"]) for j, c in enumerate(row) if c in ("r", "g")
    }
    start_cell, goal_cell = (np.asarray(unwrapped.maze.cell_rowcol_to_xy(np.array(cells[c]))) for c in "rg")
    noise = unwrapped.position_noise_range * unwrapped.maze.maze_size_scaling
    first, _ = env.reset(seed=0)
    again, _ = env.reset(seed=0)
    assert np.array_equal(first["achieved_goal"], again["achieved_goal"])
    assert np.array_equal(first["desired_goal"], again["desired_goal"])
    for seed in range(4):  # other seeds: only the small position noise changes, not the cells
        obs, _ = env.reset(seed=seed)
        assert np.abs(obs["achieved_goal"] - start_cell).max() <= noise
        assert np.abs(obs["desired_goal"] - goal_cell).max() <= noise
    assert flatten_obs(obs, info.obs_keys).shape == (29,)
    env.close()


def test_antmaze_zero_policy_scores_zero():
    info = dataclasses.replace(ANTMAZE, max_episode_steps=30)
    result = evaluate(zeros(8), info, episodes=2, num_envs=2, seed=0)
    assert result["score"] == 0.0 and result["successes"] == [False, False]
    assert result["lengths"] == [30, 30]


def test_antmaze_reaching_the_goal_scores_one(monkeypatch):
    from gymnasium_robotics.envs.maze.maze_v4 import MazeEnv

    # Start the ant exactly on the goal: the first step reaches it.
    monkeypatch.setattr(MazeEnv, "add_xy_position_noise", lambda self, xy: xy)
    monkeypatch.setattr(MazeEnv, "generate_reset_pos", lambda self: self.goal.copy())
    episodic = dataclasses.replace(ANTMAZE, max_episode_steps=10)
    result = evaluate(zeros(8), episodic, episodes=3, num_envs=2, seed=0)
    assert result["successes"] == [True] * 3 and result["score"] == 100.0
    assert result["lengths"] == [1, 1, 1]  # continuing_task=False: the goal ends the episode
    # Continuing task: the episode runs to the limit; success comes from info["success"].
    kwargs = {**episodic.env_kwargs, "continuing_task": True}
    continuing = dataclasses.replace(episodic, env_kwargs=kwargs)
    result = evaluate(zeros(8), continuing, episodes=2, num_envs=2, seed=0)
    assert result["successes"] == [True, True] and result["lengths"] == [10, 10]


# --- RNG isolation -----------------------------------------------------------------------------
def test_evaluation_does_not_touch_the_global_torch_stream():
    def noisy(obs: Tensor) -> Tensor:
        return torch.randn(obs.shape[0], 1).clamp(-2, 2)

    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    with isolated_rng(123):
        first = evaluate(noisy, PENDULUM, episodes=2, num_envs=2, seed=0)
    assert torch.equal(torch.rand(5), expected)
    with isolated_rng(123):
        second = evaluate(noisy, PENDULUM, episodes=2, num_envs=2, seed=0)
    assert first["returns"] == second["returns"]  # a sampling policy is still reproducible


# --- the callback in a real fit ----------------------------------------------------------------
class TinyModule(pl.LightningModule):
    """A fixed random policy with the offbench contract: manual optimisation, `updates`, `act`."""

    def __init__(self, noise: float = 0.5, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.step = 0
        self.w = torch.nn.Parameter(torch.zeros(3, 1))
        self.train_draws: list[float] = []
        self.act_modes: list[bool] = []

    def training_step(self, n_updates: int, batch_idx: int) -> None:
        assert self.training  # the callback restored training mode after evaluating
        self.train_draws.append(float(torch.rand(())))  # training's own randomness
        self.updates += n_updates
        self.step += n_updates

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        self.act_modes.append(self.training)
        noise = self.hparams.noise * torch.randn(obs.shape[0], 1)  # samples from the global RNG
        return (obs @ self.w + noise).clamp(-2.0, 2.0) * self.hparams.scale

    def configure_optimizers(self):
        return None


class TinyData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.info = PENDULUM

    def normalize_obs(self, obs: Tensor) -> Tensor:
        return obs

    def train_dataloader(self):
        return [3, 3]  # two blocks of 3 updates per epoch, as OfflineDataModule does


def _fit(root, max_epochs: int, callbacks: list, ckpt_path: str | None = None, scale: float = 1.0) -> TinyModule:
    pl.seed_everything(7)
    module = TinyModule(scale=scale)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        default_root_dir=root,
        logger=CSVLogger(root, name="", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=TinyData(), ckpt_path=ckpt_path)
    return module


def test_callback_in_a_fit_writes_result_and_resumes(tmp_path):
    callback = EvalCallback(num_envs=2, final_mean_k=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    module = _fit(tmp_path, 3, [callback, checkpoint])

    assert [h["updates"] for h in callback.history] == [6, 12, 18]
    assert module.act_modes and not any(module.act_modes)  # act ran in eval mode
    # Same eval seed at every evaluation and a fixed policy: the same score each time, even
    # though act samples noise from torch's global RNG.
    assert len({h["score"] for h in callback.history}) == 1
    assert callback.last == callback.best == callback.final_mean == callback.history[-1]["score"]

    result = json.loads((tmp_path / "result.json").read_text())
    for key in [
        "dataset",
        "env_id",
        "algorithm",
        "hyperparameters",
        "seed",
        "updates",
        "scores",
        "history",
        "protocol",
        "wall_seconds",
        "versions",
    ]:
        assert key in result, key
    assert result["dataset"] == PENDULUM.name and result["env_id"] == "Pendulum-v1"
    assert result["algorithm"] == f"{__name__}.TinyModule"
    assert result["hyperparameters"] == {"noise": 0.5, "scale": 1.0}
    assert result["seed"] == 7 and result["updates"] == 18
    assert result["scores"]["final_mean_k"] == 2 and result["scores"]["last"] == callback.last
    assert result["protocol"]["episodes_per_evaluation"] == 2
    assert result["protocol"]["eval_interval_updates"] == 6
    assert set(result["versions"]) >= {"python", "torch", "lightning", "gymnasium", "mujoco", "offbench"}
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temp file
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval/score", "eval/return", "eval/score_std", "eval/seconds"} <= set(metrics)

    # state_dict round trip, and a real resume from the last checkpoint keeps the history
    restored = EvalCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history and restored.train_seconds == callback.train_seconds
    resumed = EvalCallback(num_envs=2, final_mean_k=2)
    _fit(tmp_path / "resumed", 4, [resumed], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["updates"] for h in resumed.history] == [6, 12, 18, 24]
    assert resumed.history[:3] == callback.history


def test_a_fit_whose_act_leaves_the_bounds_stops_at_its_first_evaluation(tmp_path):
    # TinyModule's actions reach +-2 (Pendulum's bounds); scaled 10x they reach +-20
    with pytest.raises(UserError, match=rf"^{__name__}\.TinyModule\.act returned actions outside .* bounds \[-2, 2\]"):
        _fit(tmp_path / "a", 2, [callback := EvalCallback(num_envs=2)], scale=10.0)
    assert callback.history == []  # the first evaluation
    clipped = EvalCallback(num_envs=2, clip_actions=True)
    _fit(tmp_path / "b", 1, [clipped], scale=10.0)
    assert len(clipped.history) == 1


def test_evaluation_does_not_change_training_randomness(tmp_path):
    with_eval = _fit(tmp_path / "a", 2, [EvalCallback(num_envs=2)])
    without = _fit(tmp_path / "b", 2, [])
    assert with_eval.train_draws == without.train_draws
