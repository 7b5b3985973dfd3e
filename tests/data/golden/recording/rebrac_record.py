"""Records tests/data/golden/rebrac.npz by running the official ReBRAC code (read by tests/test_golden_rebrac.py).

Official code: DT6A/ReBRAC, commit 694385b72fcef2ae318e3f0ff41ca36122355343 (2023-05-18, the paper's version: the
last commit before the "Calibration" commit, which clips the critic target from below by Monte-Carlo returns for
fine-tuning). Files used: src/algorithms/rebrac.py (update_critic, update_actor, update_td3,
update_td3_no_targets, CriticTrainState, ActorTrainState), src/networks.py (DetActor, EnsembleCritic),
src/nn.py (pytorch_init, uniform_init), src/utils/common.py (Metrics).

Environment: Python 3.8.18, jax 0.4.13, jaxlib 0.4.13 (CPU), flax 0.6.1, optax 0.1.3, chex 0.1.7, distrax 0.1.2,
tensorflow-probability 0.21.0, numpy 1.23.1, scipy 1.10.1. The repository pins jax 0.4.1 and chex 0.1.5
(requirements.txt); jaxlib 0.4.1 is not installable from PyPI any more, 0.4.13 is the oldest jaxlib there, and
chex 0.1.5 does not import with it (jax.interpreters.xla.DeviceArray is gone), so chex is 0.1.7. Every other
pin is the repository's.

    python3.8 -m venv VENV && VENV/bin/pip install jax==0.4.13 jaxlib==0.4.13 flax==0.6.1 optax==0.1.3 \
        chex==0.1.7 distrax==0.1.2 numpy==1.23.1
    git clone https://github.com/DT6A/ReBRAC CHECKOUT && git -C CHECKOUT checkout 694385b72fcef2ae318e3f0ff41ca36122355343
    VENV/bin/python tests/data/golden/recording/rebrac_record.py CHECKOUT tests/data/golden/rebrac.npz

The script runs itself once per dtype in a subprocess (float32 with x64 off, the official default; float64
with `jax_enable_x64` on) and merges both into one file with the prefixes `float32/` and `float64/`.

Shims (no official line is changed; the official files are imported from CHECKOUT):
- `wandb`, `pyrallis` (`wrap` returns the function), `tqdm.auto` (`trange`) and `gym` (`Env`, used in type
  hints) are stub modules: they serve only `main()` and evaluation, which are not run.
- `src.utils.buffer` is a stub module (`ReplayBuffer = None`): the real one imports d4rl, gym, h5py and
  dm_control for loading datasets; the batches here are given directly.
- `jax.random.normal` and `jax.random.uniform` are pass-through wrappers while an update runs: each calls the
  original and records its concrete output in call order (the updates run under `jax.disable_jit()`, so the
  values are concrete; flax's shape checks of the parameters call the initialisers, which draw `uniform`,
  under `eval_shape`: those values are tracers and are skipped). `update_critic` draws the target-policy noise with `normal`; `update_actor` draws
  `uniform` actions for a logged metric only (`bc_mse_random`).
- float64: the parameters made by the official `init` (flax's Dense and LayerNorm keep float32 parameters
  even with x64 on) are cast to float64 (exact) before the train states are built, and the batch is cast to
  float64 (exact), so every computation and the Adam states are float64; the normal draws are float64.

What is run (the body of the official training loop's `td3_loop_update_step` for updates i = 0, 1, 2 of an
epoch: `delayed_updates[i] = (i % policy_freq == 0)` picks `update_td3` (critic, actor, both targets) for
i = 0 and 2 and `update_td3_no_targets` (critic only) for i = 1), each update on its own batch. Settings:
obs 11, act 3, hidden_dim 32 (the official 256 makes the file too large), actor_n_hiddens = critic_n_hiddens = 3,
critic_ln True, actor_ln False, two critics, Adam lr 1e-3 for both, gamma 0.99, tau 0.005, policy_noise 0.3
(official 0.2: with 0.3 a few of the 72 normal draws pass the noise clip at +-0.5), noise_clip 0.5,
policy_freq 2, normalize_q True, actor_bc_coef 0.1, critic_bc_coef 0.5 (per-task values, chosen unequal and
different from 1 so that the tests can tell them apart). The actor's output kernel (official init uniform in
+-1e-3) was replaced by numpy draws uniform in +-2, so that the actions spread over (-1, 1) and the clip of the
noisy target action at +-1 is active (the script prints how many entries each clip touches). After that, the
target parameters of both the critic and the actor were set to 0.9 x the online ones (the official code
starts them equal), so that the tests can tell which of the two each term reads.

The official updates are also run jitted (as the training loop runs them, inside `jax.jit`) from the same
state and key; the script asserts that they agree with the eager run (float32 within 1e-5, float64 1e-12).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

OBS, ACT, HIDDEN, B = 11, 3, 32, 8
SETTINGS = dict(gamma=0.99, actor_bc_coef=0.1, critic_bc_coef=0.5, tau=0.005, policy_noise=0.3, noise_clip=0.5,
                normalize_q=True)
LR = 1e-3
COMMIT = "694385b72fcef2ae318e3f0ff41ca36122355343"


def stub_modules() -> None:
    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("wandb")
    module("pyrallis", wrap=lambda *a, **k: (lambda f: f))
    module("tqdm")
    module("tqdm.auto", trange=range)
    module("gym", Env=object)
    module("src.utils.buffer", ReplayBuffer=None)


def flat(tree, prefix: str) -> dict:
    import numpy as np
    from flax.traverse_util import flatten_dict

    return {f"{prefix}/" + "/".join(k): np.asarray(v) for k, v in flatten_dict(dict(tree)).items()}


def record(checkout: str, dtype: str, out: str) -> None:
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    stub_modules()
    sys.path.insert(0, checkout)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from src.algorithms import rebrac  # official
    from src.networks import DetActor, EnsembleCritic  # official
    from src.utils.common import Metrics  # official

    cast = (lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), t)) if dtype == "float64" else (lambda t: t)
    # the batches: drawn with numpy, float32, then cast for the float64 run
    rng = np.random.default_rng(0)
    batches = []
    for i in range(3):
        dones = np.zeros(B, np.float32)
        dones[[2, 5] if i != 1 else [0]] = 1.0
        batches.append({
            "states": rng.normal(size=(B, OBS)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(B, ACT)).astype(np.float32),
            "rewards": rng.normal(size=B).astype(np.float32),
            "next_states": rng.normal(size=(B, OBS)).astype(np.float32),
            "next_actions": rng.uniform(-1, 1, size=(B, ACT)).astype(np.float32),
            "dones": dones,
        })
    # as main() builds them (official classes and init), hidden_dim 32
    key = jax.random.PRNGKey(0)
    key, actor_key, critic_key = jax.random.split(key, 3)
    init_state, init_action = jnp.asarray(batches[0]["states"][:1]), jnp.asarray(batches[0]["actions"][:1])
    actor_module = DetActor(action_dim=ACT, hidden_dim=HIDDEN, layernorm=False, n_hiddens=3)
    critic_module = EnsembleCritic(hidden_dim=HIDDEN, num_critics=2, layernorm=True, n_hiddens=3)
    actor_params = actor_module.init(actor_key, init_state)
    # the output layer's kernel uniform in +-2 instead of +-1e-3, so that the actions spread over (-1, 1)
    # and the clip of the noisy target action at +-1 is active
    out_kernel = rng.uniform(-2.0, 2.0, size=(HIDDEN, ACT)).astype(np.float32)
    actor_params = actor_params.copy({"params": actor_params["params"].copy({"Dense_3": {
        "kernel": jnp.asarray(out_kernel), "bias": actor_params["params"]["Dense_3"]["bias"]}})})
    critic_params = critic_module.init(critic_key, init_state, init_action)
    scale = lambda t: jax.tree_util.tree_map(lambda x: 0.9 * x, t)  # noqa: E731
    actor = rebrac.ActorTrainState.create(apply_fn=actor_module.apply, params=cast(actor_params),
                                          target_params=cast(scale(actor_params)), tx=optax.adam(learning_rate=LR))
    critic = rebrac.CriticTrainState.create(apply_fn=critic_module.apply, params=cast(critic_params),
                                            target_params=cast(scale(critic_params)), tx=optax.adam(learning_rate=LR))
    batches = [{k: cast(jnp.asarray(v)) for k, v in b.items()} for b in batches]
    names = ["critic_loss", "q_min", "actor_loss", "bc_mse_policy", "bc_mse_random", "action_mse"]

    data: dict = {}
    for tree, name in [(actor.params, "actor"), (actor.target_params, "actor_target"), (critic.params, "critic"),
                       (critic.target_params, "critic_target")]:
        data.update(flat(tree["params"], f"init/{name}"))

    draws: list = []
    originals = {"normal": jax.random.normal, "uniform": jax.random.uniform}

    def wrapper(name):
        def wrapped(*args, **kwargs):
            x = originals[name](*args, **kwargs)
            if not isinstance(x, jax.core.Tracer):  # flax's parameter shape checks call the initialisers traced
                draws.append((name, np.asarray(x)))
            return x
        return wrapped

    def run(step: int, key, actor, critic, batch):
        # delayed_updates[i] = (i % policy_freq == 0), policy_freq 2: the official training loop's dispatch
        metrics = Metrics.create(names)
        if step % 2 == 0:
            fn = lambda key, actor, critic, batch, metrics: rebrac.update_td3(  # noqa: E731
                key, actor, critic, batch, metrics, **SETTINGS)
        else:
            fn = lambda key, actor, critic, batch, metrics: rebrac.update_td3_no_targets(  # noqa: E731
                key, actor, critic, batch, SETTINGS["gamma"], metrics, SETTINGS["actor_bc_coef"],
                SETTINGS["critic_bc_coef"], SETTINGS["tau"], SETTINGS["policy_noise"], SETTINGS["noise_clip"])
        jitted = jax.jit(fn)(key, actor, critic, batch, metrics)
        jax.random.normal, jax.random.uniform = wrapper("normal"), wrapper("uniform")
        try:
            with jax.disable_jit():
                eager = fn(key, actor, critic, batch, metrics)
        finally:
            jax.random.normal, jax.random.uniform = originals["normal"], originals["uniform"]
        tol = 1e-5 if dtype == "float32" else 1e-12
        diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), jitted[1:3], eager[1:3])
        worst = max(jax.tree_util.tree_leaves(diffs))
        print(f"{dtype} update {step}: jitted vs eager max |diff| over parameters and Adam states {worst:.2e}")
        assert worst < tol, worst
        return eager

    for step in range(3):
        draws.clear()
        batch = batches[step]
        data.update({f"update{step}/batch/{k}": np.asarray(v) for k, v in batch.items()})
        key, sub = jax.random.split(key)
        data_actor_target = actor.target_params
        key_out, actor, critic, metrics = run(step, sub, actor, critic, batch)
        for name, value in metrics.accumulators.items():
            acc, n = value
            if float(n[0]) > 0:
                data[f"update{step}/metrics/{name}"] = np.asarray(acc[0] / n[0])
        kinds = [d[0] for d in draws]
        assert kinds == (["normal", "uniform"] if step % 2 == 0 else ["normal"]), kinds
        data[f"update{step}/draws/target_noise"] = draws[0][1]  # standard normal (B, act), update_critic
        pi_next = actor_module.apply(data_actor_target, batch["next_states"])
        noisy = np.asarray(pi_next) + np.clip(draws[0][1] * SETTINGS["policy_noise"], -0.5, 0.5)
        print(f"update {step}: {int((np.abs(draws[0][1] * SETTINGS['policy_noise']) > 0.5).sum())} noise entries "
              f"clipped at +-0.5, {int((np.abs(noisy) > 1).sum())} of the {noisy.size} noisy target actions at +-1")
        if step % 2 == 0:
            data[f"update{step}/draws/random_actions"] = draws[1][1]  # uniform(-1, 1), update_actor's logging
        for tree, name in [(actor.params, "actor"), (actor.target_params, "actor_target"), (critic.params, "critic"),
                           (critic.target_params, "critic_target")]:
            data.update(flat(tree["params"], f"update{step}/after/{name}"))
    np.savez(out, **data)


def main() -> None:
    import numpy as np

    checkout, out = sys.argv[1], sys.argv[2]
    merged: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float64"):
            part = str(Path(tmp) / f"{dtype}.npz")
            subprocess.run([sys.executable, __file__, "--part", checkout, dtype, part], check=True)
            with np.load(part) as f:
                merged.update({f"{dtype}/{k}": f[k] for k in f.files})
    import flax
    import jax
    import optax

    versions = {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jax.lib.__version__,
                "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
                "repository": "DT6A/ReBRAC", "commit": COMMIT}
    merged["meta/versions"] = np.array(json.dumps(versions))
    merged["meta/settings"] = np.array(json.dumps(dict(SETTINGS, **{"lr": LR, "obs_dim": OBS, "act_dim": ACT,
                                                             "hidden_dim": HIDDEN, "n_hiddens": 3, "batch": B,
                                                             "policy_freq": 2, "target_init": "0.9 x online"})))
    np.savez_compressed(out, **merged)
    print(f"wrote {out}: {len(merged)} entries")


if __name__ == "__main__":
    if sys.argv[1] == "--part":
        record(*sys.argv[2:5])
    else:
        main()
