"""Record PGD golden values (tests/data/golden/pgd_x64.npz) by running the official JAX code in float64.

Official code: EmptyJackson/policy-guided-diffusion @ 9da606ca16389c626fab7cef2a07ca82d74fd14f (models/diffusion.py,
diffusion/edm.py, util/data.py, environments/dataset.py). It pins flax 0.6.11 and jax 0.4.16 (docker/requirements.txt);
jaxlib 0.4.16 has no wheel for this Python, so the recording ran with the nearest that installs: Python 3.11,
jax 0.4.18, jaxlib 0.4.18 (CPU), flax 0.6.11, optax 0.1.5, numpy 1.26.4 (no distrax, no torch). From a checkout of the
official repository (`git archive 9da606ca16389c626fab7cef2a07ca82d74fd14f | tar -x -C pgd`, minus media/):

    python pgd_record.py --official pgd --out tests/data/golden/pgd_x64.npz

JAX runs with `jax_enable_x64`; every input (parameters, data, random draws) is drawn by NumPy (seed 0) in float64.
Shims (no official line is changed; tests/data/golden/README.md, section PGD): the package `util` is built from the
official util/data.py and util/jax.py only (its __init__ also imports wandb logging and gym evaluation); `gym`, `d4rl`
and `distrax` are stubs (type hints, the dataset loader's imports, and the Normal of deterministic-policy guidance,
which these recordings do not use); in diffusion/edm.py the module global `jax` is a proxy in which
`jax.random.normal` returns the stored draws in call order (shape-checked), `jax.lax.scan` is a Python loop that also
keeps the carry after each step, and `jax.grad` also keeps the gradient it returns (the guidance term); in the loss,
`jax.random.normal` is the real one, wrapped to keep its outputs (jax.debug.callback, called per sequence under vmap);
environments/dataset.py's `_load_dataset` returns fixed windows.

Pieces (sizes and meanings in the README): `unet/` the U-Net's forward on fixed weights (every bias and GroupNorm
scale randomised), per sequence as the official code calls it (vmap: flax's GroupNorm on an unbatched (L, C) input
normalises each time step) and on a batch of one (the whole window); `edm/` the preconditioning functions, the loss
of `edm.train_step` and its gradient (SGD with learning rate 1: gradient = old - new parameters); `sample/`,
`guide_a/`, `guide_b/` the sampler `edm.sample_trajectory` with 6 steps, unguided and with two guidance settings;
`norm/` the dataset normalisation of `load_dataset`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    import flax
    import jax.numpy as jnp
    import optax
    from flax.training.train_state import TrainState
    from flax.traverse_util import flatten_dict, unflatten_dict

    # ------------------------------------------------------------------ import shims
    sys.path.insert(0, args.official)
    gym = types.ModuleType("gym")
    gym.spaces = types.SimpleNamespace(Dict=dict, Box=object)
    sys.modules["gym"] = gym
    sys.modules["d4rl"] = types.ModuleType("d4rl")
    distrax = types.ModuleType("distrax")

    def _no_normal(*a, **k):
        raise RuntimeError("distrax.Normal is a stub: deterministic guidance is not recorded")

    distrax.Normal = _no_normal
    sys.modules["distrax"] = distrax
    util = types.ModuleType("util")
    util.__path__ = [f"{args.official}/util"]
    sys.modules["util"] = util
    for sub in ("data", "jax"):
        m = importlib.import_module(f"util.{sub}")
        for k, v in vars(m).items():
            if not k.startswith("_"):
                setattr(util, k, v)
    util.__all__ = [k for k in vars(util) if not k.startswith("_")]
    unet_mod = importlib.import_module("models.diffusion")
    edm = importlib.import_module("diffusion.edm")
    dataset_mod = importlib.import_module("environments.dataset")

    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {
        "meta/official": np.array("EmptyJackson/policy-guided-diffusion@9da606ca16389c626fab7cef2a07ca82d74fd14f"),
        "meta/versions": np.array(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
                                  f"numpy {np.__version__}, x64"),
    }
    obs_dim, act_dim, features, n_blocks = 3, 1, 32, 3  # the `small` preset's U-Net
    channels = obs_dim + act_dim + 2
    out |= {"meta/obs_dim": np.array(obs_dim), "meta/act_dim": np.array(act_dim), "meta/features": np.array(features),
            "meta/n_blocks": np.array(n_blocks)}

    # ------------------------------------------------------------------ unet
    net = unet_mod.UNet(features, n_blocks)
    params = net.init(jax.random.PRNGKey(0), jnp.ones((2, 64, channels)), jnp.ones((1,)))
    flat = flatten_dict(flax.core.unfreeze(params), sep="/")
    for k, v in flat.items():  # init's biases are 0 and GroupNorm scales 1: randomise them so a mix-up shows
        if k.endswith("/bias"):
            flat[k] = jnp.asarray(0.2 * rng.standard_normal(v.shape))
        elif k.endswith("/scale"):
            flat[k] = jnp.asarray(1.0 + 0.2 * rng.standard_normal(v.shape))
        else:
            flat[k] = jnp.asarray(np.asarray(v, np.float64))
    params = flax.core.freeze(unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}))
    out |= {f"unet/params/{k}": np.asarray(v) for k, v in flat.items()}
    B, L = 2, 13
    x = rng.standard_normal((B, L, channels))
    t = np.array([np.log(0.3) / 4, np.log(17.0) / 4])
    out["unet/x"], out["unet/t"] = x, t
    out["unet/y_per_step"] = np.asarray(jax.vmap(lambda xi, ti: net.apply(params, xi, ti))(jnp.asarray(x), jnp.asarray(t)))
    out["unet/y_window"] = np.stack([np.asarray(net.apply(params, jnp.asarray(x[b:b + 1]), jnp.asarray(t[b:b + 1])))[0]
                                     for b in range(B)])

    # ------------------------------------------------------------------ edm: preconditioning, loss, gradient
    sig = np.array([0.002, 0.05, 0.3, 1.0, 2.5, 80.0])
    out["edm/sigma"] = sig
    for name in ("c_skip", "c_out", "c_in"):
        out[f"edm/{name}"] = np.asarray(getattr(edm, name)(jnp.asarray(sig), 1.0))
    out["edm/c_noise"] = np.asarray(edm.c_noise(jnp.asarray(sig)))
    hypers = edm.DenoiserHyperparams()
    x0 = rng.standard_normal((3, 8, channels))
    out["edm/x0"] = x0
    draws: list[np.ndarray] = []
    real_normal = jax.random.normal

    def keep_normal(key, shape=(), dtype=jnp.float64):
        v = real_normal(key, shape, dtype)
        jax.debug.callback(lambda a: draws.append(np.asarray(a)), v)
        return v

    state = TrainState.create(apply_fn=net.apply, params=params, tx=optax.sgd(1.0))
    edm.jax = types.SimpleNamespace(**{k: getattr(jax, k) for k in ("numpy", "lax", "grad", "vmap", "value_and_grad")},
                                    random=types.SimpleNamespace(split=jax.random.split, normal=keep_normal))
    new_state, loss = edm.train_step(jax.random.PRNGKey(1), jnp.asarray(x0), state, hypers)
    edm.jax = jax
    sigma_normals = np.array([d for d in draws if d.shape == ()])
    noises = np.stack([d for d in draws if d.shape != ()])
    assert sigma_normals.shape == (3,) and noises.shape == x0.shape, (sigma_normals.shape, noises.shape)
    out["edm/sigma_normal"], out["edm/noise"], out["edm/loss"] = sigma_normals, noises, np.asarray(loss)
    grad = jax.tree_util.tree_map(lambda a, b: a - b, state.params, new_state.params)
    out |= {f"edm/grad/{k}": np.asarray(v) for k, v in flatten_dict(flax.core.unfreeze(grad), sep="/").items()}

    # ------------------------------------------------------------------ sampler (unguided and guided)
    stats_vals = {"obs": (rng.standard_normal(obs_dim), 0.5 + rng.random(obs_dim)),
                  "action": (0.3 * rng.standard_normal(act_dim), 0.5 + rng.random(act_dim)),
                  "reward": (rng.standard_normal(1), 0.5 + rng.random(1)), "done": (np.array([0.05]), np.array([0.2]))}
    norm_stats = {k: {"mean": jnp.asarray(m), "std": jnp.asarray(s)} for k, (m, s) in stats_vals.items()}
    for k, (m, s) in stats_vals.items():
        out[f"sample/stats/{k}/mean"], out[f"sample/stats/{k}/std"] = m, s
    policy_w, policy_b, policy_log_std = rng.standard_normal((obs_dim, act_dim)), rng.standard_normal(act_dim), -0.4
    out["policy/w"], out["policy/b"], out["policy/log_std"] = policy_w, policy_b, np.array(policy_log_std)

    class Gaussian:  # the fixed policy of the guidance pieces: N(0.8 tanh(obs W + b), exp(log_std)^2)
        def __init__(self, obs):
            self.mean = 0.8 * jnp.tanh(obs @ policy_w + policy_b)

        def log_prob(self, a):
            s = jnp.exp(policy_log_std)
            return -0.5 * ((a - self.mean) / s) ** 2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi)

    steps, length = 6, 9
    hypers = edm.DenoiserHyperparams(diffusion_timesteps=steps)
    denoiser = types.SimpleNamespace(apply_fn=net.apply, params=params)
    settings = {"sample": dict(policy_guidance_coeff=0.0),
                "guide_a": dict(policy_guidance_coeff=0.7, policy_guidance_cosine_coeff=0.3,
                                normalize_action_guidance=False, denoised_guidance=False),
                "guide_b": dict(policy_guidance_coeff=0.5, policy_guidance_cosine_coeff=0.3, policy_guidance_delay_steps=1,
                                normalize_action_guidance=True, denoised_guidance=True)}
    for piece, kw in settings.items():
        for traj in range(2):
            stored = [rng.standard_normal((length, channels)) for _ in range(steps + 1)]
            queue, carries, grads = list(stored), [], []

            def stored_normal(key, shape=(), dtype=jnp.float64, queue=queue):
                v = queue.pop(0)
                assert tuple(shape) == v.shape, (shape, v.shape)
                return jnp.asarray(v)

            def loop_scan(f, init, xs, carries=carries):
                carry, n = init, len(xs[0])
                for i in range(n):
                    carry, _ = f(carry, tuple(x[i] for x in xs))
                    carries.append(np.asarray(carry[1]))
                return carry, None

            def keep_grad(fn, grads=grads):
                def g(*a):
                    v = jax.grad(fn)(*a)
                    grads.append(np.asarray(v))
                    return v
                return g

            edm.jax = types.SimpleNamespace(numpy=jax.numpy, grad=keep_grad,
                                            lax=types.SimpleNamespace(scan=loop_scan),
                                            random=types.SimpleNamespace(split=jax.random.split, normal=stored_normal))
            rollout = edm.sample_trajectory(
                jax.random.PRNGKey(2), denoiser, length, obs_dim, act_dim, norm_stats, hypers,
                agent_apply_fn=lambda p, obs: Gaussian(obs), agent_params={"unused": 0}, **kw)
            edm.jax = jax
            assert not queue and len(carries) == steps
            p = f"{piece}/{traj}"
            out[f"{p}/draws"] = np.stack(stored)  # [initial noise (times sigma_max by the sampler), eps of each step]
            out[f"{p}/states"] = np.stack(carries)  # the trajectory after each step (model space)
            for k in ("obs", "action", "reward", "done", "next_obs"):
                out[f"{p}/rollout/{k}"] = np.asarray(getattr(rollout, k))
            if grads:
                out[f"{p}/grad"] = np.stack(grads)  # d sum log pi / d action channels, before normalisation, each step
    out["sample/steps"] = np.array(steps)

    # ------------------------------------------------------------------ normalisation of windows
    W, Lw = 5, 7
    raw = {"obs": 2.0 + 3.0 * rng.standard_normal((W, Lw, obs_dim)),
           "action": np.clip(1.1 * np.tanh(rng.standard_normal((W, Lw, act_dim))), -1, 1),
           "reward": rng.standard_normal((W, Lw, 1)) - 1.0, "done": np.zeros((W, Lw, 1))}
    raw["action"][0, :3, 0] = [1.0, -1.0, 0.9995]  # beyond the 0.999 clip
    raw["done"][2, -1, 0] = 1.0  # a window ending on a terminal row
    raw["obs"][:, :, 2] = 0.5  # a constant channel (exact in binary, so its std is exactly 0): std 1
    raw["next_obs"] = raw["obs"] + 0.1
    out |= {f"norm/raw/{k}": v for k, v in raw.items()}
    windows = util.Transition(obs=jnp.asarray(raw["obs"]), action=jnp.asarray(raw["action"]),
                              reward=jnp.asarray(raw["reward"]), done=jnp.asarray(raw["done"]),
                              next_obs=jnp.asarray(raw["next_obs"]), value=None, log_prob=None, info=None)
    dataset_mod._load_dataset = lambda a, val_split=0.0: (windows, None)
    trajs, _, stats, dims = dataset_mod.load_dataset(types.SimpleNamespace(), normalize=True, val_split=0.0)
    assert dims == (obs_dim, act_dim)
    out["norm/normalized"] = np.asarray(util.stack_transitions(trajs))
    for k, s in stats.items():
        out[f"norm/stats/{k}/mean"], out[f"norm/stats/{k}/std"] = np.asarray(s["mean"]), np.asarray(s["std"])

    for k, v in out.items():  # the official construct_rollout casts done to float32 (0 or 1, exact)
        assert v.dtype != np.float32 or k.endswith("rollout/done"), k
    np.savez_compressed(args.out, **out)
    print(f"wrote {len(out)} arrays to {args.out}")


if __name__ == "__main__":
    main()
