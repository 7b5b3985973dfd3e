"""Settings out of range are refused when a module is built (offbench/settings.py), as one user error
that names the setting as a config writes it: every int and float setting of every algorithm (and of the
example examples/awac.py) is tried with 0 and a negative value against the rules below, the boundaries
of the intervals one by one, the cases that fault trials found, and the message through `offbench fit`."""

import importlib.util
import inspect
import math

import pytest
import torch

from algorithms.awr import AWR
from algorithms.bc import BC
from algorithms.cql import CQL
from algorithms.diffcps import DiffCPS
from algorithms.diffusion_ql import DiffusionQL
from algorithms.edp import EDP
from algorithms.idql import IDQL
from algorithms.iql import IQL
from algorithms.qgpo import QGPO, contrastive_energy_loss
from algorithms.rebrac import ReBRAC
from algorithms.sfbc import SfBC
from algorithms.td3bc import TD3BC
from offbench import settings
from offbench.cli import main
from offbench.errors import UserError

from .test_algorithms import REPO


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLASSES = {
    "bc": BC, "td3bc": TD3BC, "awr": AWR, "iql": IQL, "cql": CQL, "rebrac": ReBRAC, "sfbc": SfBC,
    "diffusion_ql": DiffusionQL, "diffcps": DiffCPS, "edp": EDP, "idql": IDQL, "qgpo": QGPO,
    "awac": _example("awac").AWAC,
}
LRS = {"actor_lr", "critic_lr", "value_lr", "behavior_lr", "energy_lr", "lambda_lr"}  # 0 freezes that network
# The settings whose value 0 is valid (the reason is in each algorithm's check); every other int or float
# setting refuses 0. Negative values are refused everywhere except where NEGATIVE_OK says.
ZERO_OK = {
    "bc": LRS,
    "td3bc": LRS | {"gamma", "policy_noise", "noise_clip", "alpha"},
    "awr": LRS | {"momentum", "gamma", "td_lambda", "bound_loss_weight"},
    "iql": LRS | {"gamma", "temperature"},
    "cql": LRS | {"gamma", "cql_alpha", "target_action_gap", "bc_steps"},
    "rebrac": LRS | {"gamma", "policy_noise", "noise_clip", "actor_bc_coef", "critic_bc_coef"},
    "sfbc": LRS | {"behavior_steps", "gamma", "planning_alpha", "eval_alpha"},
    "diffusion_ql": LRS | {"eta", "gamma", "ema_decay", "ema_start"},
    "diffcps": LRS | {"lambda_init", "lambda_clip", "gamma", "ema_decay", "ema_start"},
    "edp": LRS | {"alpha", "awr_temperature", "gamma", "ema_decay", "ema_start"},
    "idql": LRS | {"actor_weight_decay", "gamma", "actor_dropout", "ema_decay"},
    "qgpo": LRS | {"behavior_steps", "gamma", "beta", "beta_q", "guidance_scale"},
    "awac": LRS | {"gamma"},
}
NEGATIVE_OK = {("cql", "target_action_gap")}  # a threshold on the conservative gap: any finite value


def small(cls) -> dict:
    """Small networks, so that building a module takes milliseconds."""
    params = inspect.signature(cls.__init__).parameters
    return {name: (8,) for name in ("hidden", "critic_hidden", "energy_hidden") if name in params}


def build(algo: str, **kwargs):
    cls = CLASSES[algo]
    return cls(**({"obs_dim": 3, "act_dim": 1} | small(cls) | kwargs))


def numeric_settings(cls) -> dict[str, str]:
    """The int and float settings with defaults of an __init__ (also `int | None`): name -> "int" or "float"."""
    found = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        kind = str(p.annotation).replace(" | None", "")
        if p.default is not inspect.Parameter.empty and kind in ("int", "float"):
            found[name] = kind
    return found


def refuses(algo: str, name: str, value, **others) -> str:
    with pytest.raises(UserError) as info:
        build(algo, **{name: value}, **others)
    message = str(info.value)
    assert message.startswith(f"model.init_args.{name} must be "), message
    assert message.endswith(f", got {value}") and "\n" not in message, message
    return message


CASES = [(algo, name, kind) for algo, cls in CLASSES.items() for name, kind in numeric_settings(cls).items()]


def test_every_algorithm_has_numeric_settings_and_the_tables_name_only_real_ones():
    assert len(CASES) > 150
    for algo, names in ZERO_OK.items():
        assert names - LRS <= set(numeric_settings(CLASSES[algo])), algo
    for algo in CLASSES:
        build(algo)  # the defaults are valid


@pytest.mark.parametrize(("algo", "name", "kind"), CASES, ids=[f"{a}-{n}" for a, n, _ in CASES])
def test_zero_and_a_negative_value_are_refused_or_build_as_the_rules_say(algo, name, kind):
    zero, negative = (0, -1) if kind == "int" else (0.0, -0.5)
    if name in ZERO_OK[algo]:
        build(algo, **{name: zero})
    else:
        refuses(algo, name, zero)
    if (algo, name) in NEGATIVE_OK:
        build(algo, **{name: negative})
    else:
        refuses(algo, name, negative)


GAMMA = [algo for algo, cls in CLASSES.items() if "gamma" in numeric_settings(cls)]
TAU = [algo for algo, cls in CLASSES.items() if "tau" in numeric_settings(cls)]


@pytest.mark.parametrize("algo", GAMMA)
def test_gamma_is_in_0_1_and_tau_in_0_1_closed(algo):
    assert "in [0, 1)" in refuses(algo, "gamma", 1.0)
    build(algo, gamma=0.999)
    if algo in TAU:
        build(algo, tau=1.0)  # the target copies the network
        assert "in (0, 1]" in refuses(algo, "tau", 1.5)


@pytest.mark.parametrize(("algo", "name", "bad", "good"), [
    ("iql", "expectile", 1.0, 0.5),
    ("edp", "expectile", 1.0, 0.9),
    ("idql", "expectile", 1.0, 0.9),
    ("awr", "td_lambda", 1.01, 1.0),  # 1: Monte-Carlo returns
    ("awr", "momentum", 1.0, 0.99),
    ("diffusion_ql", "ema_decay", 1.0, 0.999),  # 1 would freeze the EMA at its initial weights
    ("idql", "actor_dropout", 1.0, 0.5),
    ("qgpo", "n_support", 1, 2),  # one support action: nothing to contrast (test below)
    ("idql", "time_dim", 127, 2),  # cos and sin halves
    ("edp", "n_timesteps", 20, 21),  # linear_scaled: the last beta 20 / K must stay below 1
    ("idql", "n_timesteps", 0, 1),  # vp: any K >= 1
    ("sfbc", "n_select", 33, 32),  # at most n_eval_candidates (32)
    ("sfbc", "solver_order", 4, 1),
    ("qgpo", "solver_order", 0, 3),
    ("bc", "actor_lr", math.nan, 1e-3),
    ("iql", "weight_clip", math.nan, math.inf),  # inf: no clipping
    ("bc", "hidden", [256, 0], ()),  # no hidden layer: a linear policy
    ("diffusion_ql", "max_grad_norm", 0.0, None),  # null: no clipping
    ("iql", "lr_decay_steps", 0, None),  # 0 would silently mean "the run's length" (`or`)
    ("diffcps", "lambda_max", 0.2, 0.3),  # >= lambda_clip 0.3 (given below)
])
def test_boundaries(algo, name, bad, good):
    others = {"lambda_clip": 0.3} if algo == "diffcps" else {}
    refuses(algo, name, bad, **others)
    build(algo, **{name: good}, **others)


@pytest.mark.parametrize(("algo", "setting", "message"), [
    ("edp", {"n_timesteps": -5}, "model.init_args.n_timesteps must be an integer >= 21 with beta_schedule linear_scaled "
                                 "(its last beta is 20 / n_timesteps), got -5"),
    ("edp", {"n_timesteps": -5, "beta_schedule": "vp"}, "model.init_args.n_timesteps must be a positive integer (>= 1), got -5"),
    ("edp", {"n_eval_candidates": 0}, "model.init_args.n_eval_candidates must be a positive integer (>= 1), got 0"),
    ("idql", {"n_candidates": 0}, "model.init_args.n_candidates must be a positive integer (>= 1), got 0"),
    ("edp", {"dpm_steps": 0}, "model.init_args.dpm_steps must be a positive integer (>= 1), got 0"),
    ("qgpo", {"solver_steps": 0}, "model.init_args.solver_steps must be a positive integer (>= 1), got 0"),
    ("idql", {"n_timesteps": 0}, "model.init_args.n_timesteps must be a positive integer (>= 1), got 0"),
    ("idql", {"n_timesteps": -1}, "model.init_args.n_timesteps must be a positive integer (>= 1), got -1"),
    ("rebrac", {"policy_every": 0}, "model.init_args.policy_every must be a positive integer (>= 1), got 0"),
    ("qgpo", {"n_support": 0}, "model.init_args.n_support must be an integer >= 2 (contrastive energy prediction "
                               "compares support actions), got 0"),
])
def test_the_settings_that_fault_trials_found_are_refused_when_the_module_is_built(algo, setting, message):
    with pytest.raises(UserError) as info:
        build(algo, **setting)
    assert str(info.value) == message


def test_qgpo_needs_two_support_actions_to_train_its_energy():
    # CEP's loss over M support actions is -sum_i softmax(beta q)_i log softmax(f)_i: with M = 1, log softmax is 0,
    # so the loss and its gradient are 0 whatever f and q (the energy model would never train: n_support >= 2).
    f = torch.randn(5, 1, requires_grad=True)
    loss = contrastive_energy_loss(f, torch.randn(5, 1), beta=3.0)
    (grad,) = torch.autograd.grad(loss, f)
    assert loss.item() == 0.0 and not grad.any()
    f2 = torch.randn(5, 2, requires_grad=True)
    (grad2,) = torch.autograd.grad(contrastive_energy_loss(f2, torch.randn(5, 2), beta=3.0), f2)
    assert grad2.abs().sum() > 0


def test_helpers_messages():
    with pytest.raises(UserError, match=r"^model.init_args.x must be in \(0, 1\], got 0$"):
        settings.interval("x", 0, "(0, 1]")
    with pytest.raises(UserError, match=r"^model.init_args.x must be 1, 2 or 3, got True$"):
        settings.one_of("x", True, (1, 2, 3))
    with pytest.raises(UserError, match=r"^model.init_args.x must be a positive integer \(>= 1\), got 2.0$"):
        settings.integer("x", 2.0)
    with pytest.raises(UserError, match=r"or null \(no clipping\), got -1$"):
        settings.positive("x", -1, or_null="no clipping")
    settings.positive("x", None, or_null="no clipping")
    settings.integer("x", 3, low=1, high=3)


def test_offbench_fit_reports_a_setting_out_of_range_as_one_line_with_status_2(tmp_path, capsys):
    root = tmp_path / "run"
    status = main(["fit", "--config", str(REPO / "configs/algorithms/edp.yaml"), "--data.dataset",
                   "shipped/pendulum-medium-replay-v0", "--model.init_args.n_timesteps", "-5", "--updates", "10",
                   "--data.eval_every", "10", "--trainer.default_root_dir", str(root)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("offbench: error:")]
    assert lines == ["offbench: error: model.init_args.n_timesteps must be an integer >= 21 with beta_schedule "
                     "linear_scaled (its last beta is 20 / n_timesteps), got -5"], err
    assert not (root / "checkpoints").exists() and not (root / "metrics.csv").exists()
