"""The compiled path (OfflineRLModule.enable_compile, `offbench fit --compile true`).

From the same seed and state, compiled updates give the eager updates' losses and parameters within
float tolerance, over enough updates to cross every cadence of the algorithm (policy delay, EMA start
and period, BC warm-up, value/policy phases, a planning round with its critic reset, a moving cosine
learning rate). The graphs stay bounded: once a first pass has met every cadence, a second pass
compiles nothing more (torch._dynamo.config.error_on_recompile, and no new graph). A compiled method
that reads the update counter fails loudly instead of falling back to eager code, and a compiled
`offbench fit` trains, logs and resumes exactly.

Random draws: inductor's own generator differs from eager PyTorch's, so these tests compile with
`fallback_random` (eager's kernels for random ops) to compare the same draws. Adam: a gradient that is
rounding noise (true value 0) gets a full step of +-lr in one run and none in the other, so the
comparison uses eps = 1e-3 in both runs (a normal gradient is far larger), which keeps float32
rounding from being amplified.

Compiling is slow on a CPU (g++ builds every kernel): with a cold inductor cache, on 2 busy cores,
about 20 s each for BC and TD3+BC and 20-100 s for the others (DiffCPS and SfBC the longest), so the
default run compiles BC and TD3+BC (and TD3+BC again through `offbench fit`); the rest are marked
slow (`make test-all`). A warm cache (/tmp/torchinductor_$USER) makes it several times faster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from algorithms.awr import AWR
from algorithms.bc import BC
from algorithms.cql import CQL
from algorithms.diffcps import DiffCPS
from algorithms.diffusion_ql import DiffusionQL
from algorithms.edp import EDP
from algorithms.idql import IDQL
from algorithms.iql import IQL
from algorithms.qgpo import QGPO
from algorithms.rebrac import ReBRAC
from algorithms.sfbc import SfBC
from algorithms.td3bc import TD3BC
from offbench.batch import Batch
from offbench.module import OfflineRLModule, compilable
from tests.test_baselines import random_transitions
from tests.test_fit import interrupted_and_resumed

REPO = Path(__file__).resolve().parents[1]
OBS, ACT, MAX_ACTION = 5, 2, 2.0

# name: (class, settings, updates of the first pass, updates of the second); the first pass meets every
# cadence at least once, the second meets them all again (and sees no new graph).
CASES = {
    "bc": (BC, {"hidden": (16, 16)}, 3, 3),
    "td3bc": (TD3BC, {"hidden": (16, 16)}, 4, 6),  # policy delay 2
    "iql": (IQL, {"hidden": (16, 16), "lr_decay_steps": 100}, 4, 6),  # the actor's lr changes every update
    "cql": (CQL, {"hidden": (16, 16), "num_random": 2, "bc_steps": 3}, 6, 6),  # BC warm-up, then SAC's actor loss
    "cql-lagrange": (CQL, {"hidden": (16, 16), "num_random": 2, "bc_steps": 0, "with_lagrange": True}, 4, 4),
    "awr": (AWR, {"hidden": (16, 16), "critic_steps": 2, "actor_steps": 3}, 6, 10),  # phases, refreshes
    "diffcps": (DiffCPS, {"hidden": (16, 16, 16), "ema_start": 3, "ema_every": 2}, 8, 8),  # policy delay 2, EMA from 3
    "diffusion_ql": (DiffusionQL, {"hidden": (16, 16, 16), "ema_start": 3, "ema_every": 2}, 8, 8),
    # EDP: EMA from the 4th update (counted from 1), every 2; DPM-Solver with 3 calls for the critic's a'
    "edp": (EDP, {"hidden": (16,), "n_timesteps": 25, "dpm_steps": 3, "ema_start": 3, "ema_every": 2,
                  "max_grad_norm": 1.0}, 8, 8),
    "edp-crr": (EDP, {"rule": "crr", "hidden": (16,), "n_timesteps": 25, "dpm_steps": 3, "crr_samples": 2}, 3, 3),
    "edp-iql": (EDP, {"rule": "iql", "hidden": (16,), "n_timesteps": 25, "max_grad_norm": 1.0}, 3, 3),
    # behaviour for 2 updates, critic rounds of 3; round 1 (update 5) plans and resets the critic
    "sfbc": (SfBC, {"behavior_steps": 2, "critic_steps": 3, "planning_iterations": 2, "solver_steps": 3,
                    "n_planning_candidates": 2}, 9, 6),
    "rebrac": (ReBRAC, {"hidden": (16, 16)}, 4, 6),  # policy delay 2 (actor on even updates)
    "idql": (IDQL, {"hidden": (16,), "critic_hidden": (16, 16), "lr_decay_steps": 100}, 4, 6),
    # (IDQL: EMA and the behaviour model's lr change every update; dropout 0.1 draws random numbers)
    # behaviour for 2 updates, then support actions, Q and energy for 3, then the energy alone
    "qgpo": (QGPO, {"behavior_steps": 2, "q_steps": 3, "critic_batch_size": 8, "n_support": 2, "solver_steps": 2,
                    "critic_hidden": (16, 16), "energy_hidden": (16, 16)}, 7, 6),
}
DEFAULT = ("bc", "td3bc")  # the others compile for one to three minutes each on a CPU


def case_params():
    return [pytest.param(name, marks=() if name in DEFAULT else pytest.mark.slow) for name in CASES]


def random_batch(i: int, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(i)
    return Batch(
        torch.randn(n, OBS, generator=g), (torch.rand(n, ACT, generator=g) * 2 - 1) * MAX_ACTION,
        torch.randn(n, generator=g), torch.randn(n, OBS, generator=g), (torch.rand(n, generator=g) < 0.2).float(),
        next_act=(torch.rand(n, ACT, generator=g) * 2 - 1) * MAX_ACTION,  # drawn last: the other fields stay as they were
    )


def build(name: str) -> OfflineRLModule:
    cls, settings, _, _ = CASES[name]
    torch.manual_seed(0)
    module = cls(OBS, ACT, MAX_ACTION, **settings)
    module.configure_optimizers()
    for optimizer in vars(module).values():
        if isinstance(optimizer, torch.optim.Adam):
            for group in optimizer.param_groups:
                group["eps"] = 1e-3  # see the module docstring
    if isinstance(module, AWR):
        module.attach_dataset(random_transitions())
    if isinstance(module, SfBC | QGPO):
        module.set_dataset(random_transitions())
    return module


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def assert_same_updates(eager: OfflineRLModule, compiled: OfflineRLModule, first: int, n: int) -> None:
    for i in range(first, first + n):
        batch = random_batch(i)
        torch.manual_seed(1000 + i)
        expected = eager.run_update(batch)
        torch.manual_seed(1000 + i)
        actual = compiled.run_update(batch)
        assert actual.keys() == expected.keys(), i
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=lambda m, w=f"update {i}, {key}": f"{w}: {m}")
    for (key, value), other in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=lambda m, w=f"{key} after update {first + n}": f"{w}: {m}")


@pytest.mark.parametrize("name", case_params())
def test_compiled_updates_match_eager_and_stop_compiling(name):
    torch._dynamo.reset()
    _, _, first_pass, second_pass = CASES[name]
    eager, compiled = build(name), build(name)
    compiled.enable_compile()
    with torch._inductor.config.patch(fallback_random=True):
        assert_same_updates(eager, compiled, 0, first_pass)
        graphs = unique_graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert_same_updates(eager, compiled, first_pass, second_pass)
    assert unique_graphs() == graphs  # nothing new was compiled in the second pass


class ReadsTheCounter(OfflineRLModule):
    """Breaks the rule of @compilable: its compiled method reads `self.step`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(OBS))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.opt = torch.optim.SGD([self.w], lr=0.1)
        return self.opt

    @compilable
    def update(self, batch: Batch) -> dict[str, Tensor]:
        loss = (batch.obs - self.w).pow(2).mean() * (1 + self.step % 7)
        self.optimize(self.opt, loss)
        return {"loss": loss}


def test_a_compiled_method_reading_the_counter_fails_loudly():
    torch._dynamo.reset()
    module = ReadsTheCounter()
    module.configure_optimizers()
    module.enable_compile()
    with torch._dynamo.config.patch(recompile_limit=2), pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        for i in range(5):
            module.run_update(random_batch(i))


def test_enable_compile_refuses_float64_scalar_parameters():
    module = CQL(OBS, ACT, MAX_ACTION, hidden=(16, 16)).double()
    module.configure_optimizers()
    with pytest.raises(ValueError, match="log_alpha"):
        module.enable_compile()


def test_compiled_fit_trains_logs_and_resumes_exactly(tiny_hopper, tmp_path):
    """TD3+BC through `offbench fit --compile true`, with inductor's own random numbers (no fallback):
    an interrupted and resumed run ends with the uninterrupted run's weights, bit for bit."""

    def args(root, *extra):
        return [
            "fit", "--config", str(REPO / "configs/algorithms/td3bc.yaml"), "--data.dataset", str(tiny_hopper),
            "--updates", "40", "--data.eval_every", "20", "--data.block_size", "10", "--data.batch_size", "32",
            "--model.init_args.hidden", "[32, 32]", "--eval.episodes", "1", "--eval.num_envs", "1", "--compile", "true",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra,
        ]

    torch._dynamo.reset()
    full, resumed = interrupted_and_resumed(args, tmp_path)
    assert json.loads((tmp_path / "full/result.json").read_text())["updates"] == 40
    assert "loss/actor" in (tmp_path / "full/metrics.csv").read_text()  # the policy delay's second graph ran
    group = full["optimizer_states"][0]["param_groups"][0]
    assert torch.is_tensor(group["lr"])  # the compiled path's tensor learning rate went into the checkpoint
