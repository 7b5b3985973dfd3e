"""The faster paths of issue 25 compute what the slower ones did: the exact Mish, fused optimiser steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from offbench.module import fused_adam_step, fused_optimizer
from offbench.nets import CriticEnsemble, Mish, mish, mlp

# Inputs over the whole float32 range: the tails (exp under/overflow in softplus), 0, the switch of
# torch's softplus at 20, and a dense grid where the activation bends.
EDGES = [0.0, -0.0, 1e-30, -1e-30, 3.4e38, -3.4e38, 88.7, -88.7, 20.0, 21.0, -20.0, -21.0, 1e4, -1e4]


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-200.0, 200.0, 400_001, dtype=torch.float64)
    return torch.cat([grid, 5 * torch.randn(100_000, generator=g, dtype=torch.float64), torch.tensor(EDGES, dtype=torch.float64)]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mish_equals_the_builtin_to_round_off(dtype):
    """Values and gradients against torch's built-in computed in float64 (the reference). Measured: our
    float32 values within 3.0e-7 relative (the built-in: 2.3e-7), gradients within 3.8e-7 absolute
    (the built-in: 9.7e-7); float64 within 1e-15. Bounds: about 4 float32 ulps, 5e-7 relative for values
    and 1e-6 absolute for gradients (|mish'| <= 1.1); float64 1e-14. Below x = -88.7 (float64: -709) the
    sigmoid underflows to 0, and mish gives 0 where the built-in gives |x| e^x < 3e-37 (float64: 1e-305):
    an absolute floor of 1e-36 (1e-300)."""
    x = _inputs(dtype).requires_grad_(True)
    y = mish(x)
    y.backward(torch.ones_like(y))
    ref_x = x.detach().double().requires_grad_(True)
    ref = F.mish(ref_x)
    ref.backward(torch.ones_like(ref))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    rel, floor, grad_tol = (5e-7, 1e-36, 1e-6) if dtype == torch.float32 else (1e-14, 1e-300, 1e-14)
    err = (y.double() - ref).abs()
    assert (err <= rel * ref.abs() + floor).all(), f"max relative error {(err / ref.abs().clamp_min(floor)).max():.3g}"
    assert (x.grad.double() - ref_x.grad).abs().max() <= grad_tol
    # the built-in in the same dtype is no closer than our bound (the bound is round-off, not slack)
    assert ((F.mish(x.detach()).double() - ref).abs() <= rel * ref.abs() + floor).all()


def test_mish_without_gradients_and_as_a_module():
    x = _inputs(torch.float32)
    with torch.no_grad():
        assert torch.allclose(mish(x), F.mish(x), rtol=5e-7, atol=1e-36)
    assert torch.equal(Mish()(x), mish(x))
    # no parameters: swapping nn.Mish for it leaves a network's state dict as it was
    a, b = mlp(5, 2, (8,), torch.nn.Mish), mlp(5, 2, (8,), Mish)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 5)
    assert torch.allclose(a(x), b(x), rtol=1e-6, atol=1e-7)


def test_ensemble_layer_norm_unchanged():
    """bias + layer_norm(x) * weight in one addcmul: the same as the two ops, to round-off."""
    critic = CriticEnsemble(7, 3, n=2, hidden=(32, 32), layer_norm=True)
    with torch.no_grad():
        for p in critic.parameters():
            p.normal_()
    x = torch.randn(2, 64, 32)
    ln = critic.net[2]
    expected = F.layer_norm(x, (32,), eps=ln.eps) * ln.weight + ln.bias
    assert torch.allclose(ln(x), expected, rtol=1e-6, atol=1e-6)


OPTIMIZERS = [
    (torch.optim.Adam, {"lr": 1e-3}),
    (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
]


def _net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleList([CriticEnsemble(11, 3, 2, (64, 64)), mlp(11, 3, (64, 64))]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS)
def test_fused_optimizer_step_is_unchanged(cls, kwargs, dtype):
    """Several steps of the default (per-parameter loop) and of the fused kernel from the same parameters
    with the same gradients. Measured after 50 Adam steps: 3e-8 apart in float32 (1-2 ulps of the
    parameters, about 0.1 in size), 2e-16 in float64. Bounds: 10 float32 ulps of 0.5, 1e-6; float64 1e-14."""
    nets = [_net(dtype), _net(dtype)]
    plain = cls(nets[0].parameters(), **kwargs)
    fused = fused_optimizer(cls(nets[1].parameters(), **kwargs))
    assert all(group["fused"] for group in fused.param_groups) and plain.param_groups[0]["fused"] is None
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in nets[0].parameters()]
        for net, opt in zip(nets, (plain, fused)):
            for p, grad in zip(net.parameters(), grads):
                p.grad = grad.clone()
            opt.step()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    diff = max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    assert 0 < diff or cls is torch.optim.SGD  # the fused kernel ran (it rounds differently from the loop)
    assert diff <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:2])
def test_fused_adam_step_equals_the_optimizers_step(cls, kwargs, dtype):
    """fused_adam_step (the kernels without Optimizer.step's Python) against optimizer.step() of the same fused
    optimiser: bit for bit, over steps whose learning rate a scheduler changes, and the same state dict."""
    nets = [_net(dtype), _net(dtype)]
    opts = [fused_optimizer(cls(net.parameters(), **kwargs)) for net in nets]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7) for opt in opts]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in nets[0].parameters()]
        for net in nets:
            for p, grad in zip(net.parameters(), grads):
                p.grad = grad.clone()
        opts[0].step()
        assert fused_adam_step(opts[1]) == (step > 0)  # the first step makes the state: optimizer.step() then
        if step == 0:
            opts[1].step()
        for sched in scheds:
            sched.step()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    a, b = (opt.state_dict() for opt in opts)
    assert a["param_groups"] == b["param_groups"]
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        assert all(torch.equal(a["state"][key][k], b["state"][key][k]) for k in a["state"][key])


def test_fused_adam_step_leaves_other_steps_to_the_optimizer():
    """Where Optimizer.step does more than the two kernels, fused_adam_step does nothing and says so."""
    def stepped(make):
        net = _net(torch.float32)
        opt = make(net)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()  # the state exists
        before = [p.detach().clone() for p in net.parameters()]
        result = fused_adam_step(opt)
        changed = any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
        return result, changed

    assert stepped(lambda net: fused_optimizer(torch.optim.Adam(net.parameters()))) == (True, True)
    assert stepped(lambda net: fused_optimizer(torch.optim.Adam([{"params": list(net.parameters())}, {"params": []}]))) \
        == (True, True)  # an empty group (never switched to fused) has nothing to step
    assert stepped(lambda net: torch.optim.Adam(net.parameters())) == (False, False)  # not fused
    assert stepped(lambda net: fused_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))) == (False, False)
    assert stepped(lambda net: fused_optimizer(torch.optim.Adam(net.parameters(), amsgrad=True))) == (False, False)
    def hooked(net):
        opt = fused_optimizer(torch.optim.Adam(net.parameters()))
        opt.register_step_post_hook(lambda *args: None)
        return opt

    assert stepped(hooked) == (False, False)
    net = _net(torch.float32)  # a parameter without a gradient: Adam skips it, the kernels would not
    opt = fused_optimizer(torch.optim.Adam(net.parameters()))
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    next(net.parameters()).grad = None
    assert not fused_adam_step(opt)


def test_checkpoint_of_an_unfused_optimizer_loads():
    """An optimiser state saved before the switch (param_groups with fused=None) loads into the module's
    optimiser; eager training then switches it (on_train_start calls fused_optimizer after loading), and
    the next step equals the old optimiser's, to round-off."""
    nets = [_net(torch.float32), _net(torch.float32)]
    old = torch.optim.Adam(nets[0].parameters(), lr=1e-3)
    for p in nets[0].parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved = copy.deepcopy(old.state_dict())
    assert saved["param_groups"][0]["fused"] is None
    nets[1].load_state_dict(nets[0].state_dict())
    new = torch.optim.Adam(nets[1].parameters(), lr=1e-3)
    new.load_state_dict(saved)
    fused_optimizer(new)
    assert new.param_groups[0]["fused"] and not new.param_groups[0]["foreach"]
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    old.step()
    new.step()
    assert max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), nets[1].parameters())) <= 1e-6
    assert new.state_dict()["state"][0]["step"].item() == 2.0


def test_training_runs_fused_optimizers(tmp_path):
    """on_train_start switches the module's optimisers to fused kernels (eager), not in the compiled path."""
    import lightning.pytorch as pl

    from algorithms.td3bc import TD3BC
    from offbench.data.datamodule import OfflineDataModule

    dm = OfflineDataModule("synthetic/hopper-random-v0", batch_size=32, eval_every=4, block_size=4)
    model = TD3BC(obs_dim=11, act_dim=3)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert all(group["fused"] for opt in model._raw_optimizers() for group in opt.param_groups)


def test_perf_previous_paths_swap_and_restore():
    """`offbench perf`'s "plain before #25" column: nn.Mish, unfused optimiser steps and aten matmuls inside,
    restored after."""
    from algorithms.edp import EDP
    from offbench.perf import previous_paths

    model = EDP(obs_dim=5, act_dim=2, hidden=(16, 16, 16))
    model.configure_optimizers()
    for opt in model._raw_optimizers():
        fused_optimizer(opt)
    count = sum(isinstance(m, Mish) for m in model.modules())
    assert count > 0
    from offbench import nets

    onednn = nets._ONEDNN
    with previous_paths(model):
        assert not nets._ONEDNN and not nets.SMALL_OUTPUT_LOOP
        assert not any(isinstance(m, Mish) for m in model.modules())
        assert sum(isinstance(m, torch.nn.Mish) for m in model.modules()) == count
        assert all(g["fused"] is None for opt in model._raw_optimizers() for g in opt.param_groups)
    assert sum(isinstance(m, Mish) for m in model.modules()) == count
    assert all(g["fused"] for opt in model._raw_optimizers() for g in opt.param_groups)
    assert nets._ONEDNN == onednn and nets.SMALL_OUTPUT_LOOP


def test_onednn_linear_equals_f_linear_to_round_off():
    """`offbench.nets.linear` (oneDNN for float32 on the CPU), EnsembleLinear's oneDNN path and its per-member path for
    small outputs against F.linear / baddbmm computed in float64: values and the three gradients. Measured: within 4.6e-7 of the largest entry
    (F.linear in float32: 3.4e-7; sums of 96 to 192 products in different orders); bound 2e-6."""
    from offbench import nets

    if not nets._ONEDNN:
        pytest.skip("this torch has no oneDNN")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 96, generator=g, requires_grad=True)
    layer = nets.Linear(96, 48)
    ens = nets.EnsembleLinear(2, 96, 48)
    head = nets.EnsembleLinear(2, 96, 1)  # a critic's last layer: member by member (nets.SMALL_OUTPUT_LOOP)
    xe = torch.randn(2, 64, 96, generator=g, requires_grad=True)
    cases = [
        (lambda: layer(x), lambda: F.linear(x.double(), layer.weight.double(), layer.bias.double()), [x, layer.weight, layer.bias]),
        (lambda: ens(xe), lambda: torch.baddbmm(ens.bias.double(), xe.double(), ens.weight.double()), [xe, ens.weight, ens.bias]),
        (lambda: head(xe), lambda: torch.baddbmm(head.bias.double(), xe.double(), head.weight.double()), [xe, head.weight, head.bias]),
    ]
    for fast, exact, inputs in cases:
        upstream = torch.randn(fast().shape, generator=g)
        y = fast()
        got = torch.autograd.grad(y, inputs, upstream)
        want_y = exact()
        want = torch.autograd.grad(want_y, inputs, upstream.double())
        for a, b in [(y, want_y), *zip(got, want)]:
            assert (a.double() - b).abs().max() <= 2e-6 * b.abs().max()
    # the dispatch: float32 CPU through oneDNN, float64 (the golden tests) and small layers through F.linear
    assert nets._use_onednn(x, layer.weight)
    assert not nets._use_onednn(x.double(), layer.weight.double())
    assert not nets._use_onednn(x, torch.zeros(1, 96))
    assert nets._small_output_on_cpu(xe, head.weight) and not nets._small_output_on_cpu(xe, ens.weight)
    assert not nets._small_output_on_cpu(xe.double(), head.weight.double())


def test_peers_table_from_saved_windows(tmp_path):
    """benchmarks/peers.py's table: medians over the windows, spread, and offbench's ratio to the best peer
    mode (hand-computed), rebuilt from saved windows (no timing here)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("peers", Path(__file__).parents[1] / "benchmarks/peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)

    def windows(*cpu_seconds):
        return [{"updates": 100, "cpu": c, "wall": 2 * c} for c in cpu_seconds]

    saved = {"results": [{"algo": "iql", "batch": 256, "peer": "JAX-CORL at abc1234", "workers": [
        {"label": "offbench eager", "block": 1, "windows": windows(1.0, 0.5, 2.0)},  # medians: 100 upd/CPU-s
        {"label": "JAX-CORL 8/call", "block": 8, "windows": windows(0.8, 0.8, 0.8)},  # 125
        {"label": "JAX-CORL 1/call", "block": 1, "windows": windows(1.0, 1.0, 1.0)},  # 100
    ]}], "failed": []}
    source = tmp_path / "run.json"
    source.write_text(json.dumps(saved))
    out = tmp_path / "peers.md"
    assert peers.main(["--from-json", str(source), "--out", str(out)]) == 0
    table = out.read_text()
    assert "| iql (batch 256) | offbench eager | 1 | 100.0 | 50.0-200.0 | 50.0 | 0.80 |" in table
    assert "| iql (batch 256) | JAX-CORL 8/call | 8 | 125.0 | 125.0-125.0 | 62.5 |  |" in table
    assert "JAX-CORL at abc1234" in table


def test_fast_paths_step_aside_under_torch_func():
    """Inside torch.func transforms (vmap, grad) the composite ops run: the same values and gradients."""
    net = mlp(40, 1, (64,), Mish)
    x = torch.randn(5, 8, 40)
    params = dict(net.named_parameters())

    def loss(p, xb):
        return torch.func.functional_call(net, p, (xb,)).pow(2).mean()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        net.zero_grad()
        loss(params, x[i]).backward()
        for name, p in net.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_the_onednn_layers_can_be_switched_off_from_the_environment():
    import subprocess
    import sys

    code = "import offbench.nets as n; print(n._ONEDNN)"
    env = {**__import__("os").environ, "OFFBENCH_ONEDNN_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
