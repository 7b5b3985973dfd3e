"""Record EDP golden values by running the official JAX code (sail-sg/edp @ b019648e3db9f8d035d3bf0897a8643bc5ab2369).

Run in a virtualenv with jax 0.4.30, jaxlib 0.4.30 (CPU), flax 0.8.5, optax 0.2.3, distrax 0.1.5, chex 0.1.86,
ml_collections 1.1.0, tensorflow-probability 0.24.0, numpy 1.26.4 (no torch), from a checkout of the official
repository (`git archive b019648e3db9f8d035d3bf0897a8643bc5ab2369 | tar -x -C EDP`):

    python edp_record.py --official EDP --golden tests/data/golden --out tests/data/golden/edp_extra.npz
    python edp_record.py --official EDP --golden tests/data/golden --out tests/data/golden/edp_x64.npz --x64

Without --x64 (JAX's default float32, as the official code runs) it re-runs every piece of edp.npz from its stored
parameters, inputs and random draws (replayed) and prints the largest difference to the stored values (a check of
this script), then records the new float32 pieces (`act/`, `ema/`, `crr/`) into --out. With --x64
(`jax_enable_x64`) it records every piece, old and new, in float64 into --out: parameters and inputs are the
float32 ones cast (exact), the random draws are the float32 draws of edp.npz / edp_extra.npz cast (replayed),
except the Gumbel uniforms of EAS's `jax.random.categorical`, which are drawn in float64 from the same key and
stored.

Shims (no official line is changed; see tests/data/golden/README.md):
- `jax.tree_multimap` := `jax.tree_util.tree_map` (removed from JAX); DPM-Solver's `x.tile(reps)` :=
  `jnp.tile(x, reps)` (a removed array method).
- `jax.random.normal`, `randint`, `uniform`: replaced by wrappers that return the stored draws in call order
  (shape-checked) or, for a piece recorded here for the first time, call the original and store its output.
  `jax.random.categorical`: the original is called; the uniforms its Gumbel noise is made of (`uniform(key,
  shape, dtype, minval=tiny, maxval=1)`, the same key: the same bits) and the chosen index are stored.
- `diffusion/trainer.py` (for `SamplerPolicy`, the EAS acting code) imports gym, d4rl data loaders, wandb
  utilities and tqdm: those modules are stubs.
- x64 only: the code hard-codes float32 in three places (`diffusion.py`'s `np.array(betas, dtype=np.float32)`
  and `_extract_into_tensor`'s `.astype(np.float32)`, `nets.py`'s sinusoid `jnp.arange(half, dtype=jnp.float32)`;
  `np` there is jax.numpy). In the float64 run the names `np`/`jnp` of those two modules are a proxy of
  jax.numpy whose `float32` is float64, so that the whole computation is float64.
"""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np

EMA_STEPS = {"hold_1000": 999, "hold_1004": 1003, "active_1005": 1004}  # official _total_steps before train()


class Stub:
    """A stand-in for anything a stubbed module exports: callable, any attribute, iterable as nothing."""

    def __call__(self, *a, **k):
        return Stub()

    def __getattr__(self, name):
        return Stub()

    def __iter__(self):
        return iter(())


def stub_module(name: str) -> None:
    mod = types.ModuleType(name)
    mod.__getattr__ = lambda attr: Stub()  # PEP 562
    sys.modules[name] = mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--x64", action="store_true")
    args = ap.parse_args()

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    dtype = np.float64 if args.x64 else np.float32
    jax.tree_multimap = jax.tree_util.tree_map
    for cls in (type(jnp.zeros(1)), jax.core.Tracer):
        cls.tile = lambda x, reps: jnp.tile(x, reps)
    for name in ["gym", "data", "tqdm", "viskit", "viskit.logging", "utilities.replay_buffer", "utilities.sampler",
                 "utilities.utils"]:
        stub_module(name)
    sys.path.insert(0, args.official)
    import diffusion.diffusion as ddiff
    import diffusion.nets as dnets
    from diffusion.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
    from diffusion.dql import DiffusionQL
    from diffusion.nets import Critic, DiffusionPolicy, GaussianPolicy, Value, sinusoidal_embedding
    from diffusion.trainer import SamplerPolicy
    from utilities.jax_utils import init_rng

    if args.x64:
        class F64(types.ModuleType):
            float32 = jnp.float64

            def __getattr__(self, name):
                return getattr(jnp, name)

        ddiff.np = F64("jax.numpy(float32 := float64)")
        dnets.jnp = F64("jax.numpy(float32 := float64)")

    with np.load(f"{args.golden}/edp.npz") as f:
        gold = {k: f[k] for k in f.files if f[k].dtype.kind != "U"}
    extra = {}
    if args.x64:
        with np.load(f"{args.golden}/edp_extra.npz") as f:
            extra = {k: f[k] for k in f.files if f[k].dtype.kind != "U"}
    out: dict[str, np.ndarray] = {}

    def cast(x):
        x = np.asarray(x)
        return jnp.asarray(x.astype(dtype) if x.dtype.kind == "f" else x)

    def params(src: dict, prefix: str):
        flat = {tuple(k[len(prefix) + 1:].split("/")): cast(v) for k, v in src.items() if k.startswith(prefix + "/")}
        assert flat, prefix
        return unflatten_dict(flat)

    def store(prefix: str, tree) -> None:
        if isinstance(tree, dict) or hasattr(tree, "items"):
            for k, v in flatten_dict(dict(tree), sep="/").items():
                out[f"{prefix}/{k}"] = np.asarray(v)
        else:
            out[prefix] = np.asarray(tree)

    # ------------------------------------------------------------------ random draws: replay or record
    originals = {n: getattr(jax.random, n) for n in ("normal", "randint", "uniform", "categorical")}
    state = {"queue": None, "log": []}

    def wrap(name):
        orig = originals[name]

        def fn(key, shape=(), *a, **k):
            if isinstance(key, jax.core.Tracer):
                return orig(key, shape, *a, **k)
            q = state["queue"]
            if q is not None:
                want, value = q.pop(0)
                assert want == name, (want, name)
                if value is None:  # a draw recorded here for the first time: the original, stored
                    value = orig(key, shape, *a, **k)
                    state["log"].append((name, np.asarray(value)))
                    return value
                value = np.asarray(value)
                assert tuple(value.shape) == tuple(shape), (name, value.shape, shape)
                return cast(value) if name != "randint" else jnp.asarray(value.astype(np.int32))
            value = orig(key, shape, *a, **k)
            state["log"].append((name, np.asarray(value)))
            return value

        return fn

    def categorical(key, logits, axis=-1, shape=None):
        idx = originals["categorical"](key, logits, axis=axis, shape=shape)
        dt = jnp.asarray(logits).dtype
        u = originals["uniform"](key, jnp.shape(logits), dt, minval=jnp.finfo(dt).tiny, maxval=1.0)
        state["log"].append(("categorical", (np.asarray(u), np.asarray(idx))))
        return idx

    for n in ("normal", "randint", "uniform"):
        setattr(jax.random, n, wrap(n))
    jax.random.categorical = categorical

    def replay(draws):
        state["queue"], state["log"] = list(draws), []

    def recorded():
        q, log = state["queue"], state["log"]
        assert q is None or not q, f"{len(q)} replayed draws left unused"
        state["queue"] = None
        return log

    # ------------------------------------------------------------------ the official objects
    def make_policy(k: int, sample_method: str = "ddpm"):
        gd = GaussianDiffusion(num_timesteps=k, schedule_name="linear", model_mean_type=ModelMeanType.EPSILON,
                               model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE, min_value=-1.0,
                               max_value=1.0)
        return gd, DiffusionPolicy(diffusion=gd, observation_dim=11, action_dim=3, arch=(32, 32), time_embed_size=16,
                                   sample_method=sample_method)

    def make_agent(loss_type: str, k: int = 30, seed: int = 0):
        _, policy = make_policy(k)
        cfg = DiffusionQL.get_default_config({"num_timesteps": k, "loss_type": loss_type, "alpha": 2.0,
                                              "max_grad_norm": 1.0})
        init_rng(seed)
        return DiffusionQL(cfg, policy, Critic(11, 3, (32, 32)), Value(11, (32, 32)), GaussianPolicy(3))

    def set_state(agent, src: dict, prefix: str, tgt_policy=None, with_vf: bool = False) -> None:
        """Parameters from the npz; the optimiser states stay the fresh ones of `create` (step 0)."""
        ts = agent._train_states
        for key in ("policy", "qf1", "qf2") + (("vf",) if with_vf else ()):
            ts[key] = ts[key].replace(params=params(src, f"{prefix}/{key}"))
        agent._tgt_params = dict(agent._tgt_params)
        agent._tgt_params["policy"] = ts["policy"].params if tgt_policy is None else tgt_policy
        agent._tgt_params["qf1"] = params(src, f"{prefix}/tgt_qf1")
        agent._tgt_params["qf2"] = params(src, f"{prefix}/tgt_qf2")
        if with_vf:
            agent._tgt_params["vf"] = ts["vf"].params

    batch = {k.split("/")[1]: cast(v) for k, v in gold.items() if k.startswith("batch/")}
    check: dict[str, float] = {}

    def compare(name: str, value, ref) -> None:
        ref = np.asarray(ref, np.float64)
        diff = np.abs(np.asarray(value, np.float64) - ref)
        check[name] = float(np.max(diff / np.maximum(np.abs(ref), 1.0), initial=0.0))  # relative above 1

    def store_or_compare(name: str, value) -> None:
        if args.x64:
            out[name] = np.asarray(value)
        else:
            compare(name, value, gold[name])

    def after(prefix: str, agent, names=("policy", "qf1", "qf2"), tgt=("tgt_qf1", "tgt_qf2"), old: str | None = None):
        trees = {n: agent._train_states[n].params for n in names} | {
            n: agent._tgt_params[n.removeprefix("tgt_")] for n in tgt}
        for n, tree in trees.items():
            for k, v in flatten_dict(dict(tree), sep="/").items():
                key = f"{prefix}/{n}/{k}"
                if old is not None and not args.x64:
                    compare(key, v, gold[f"{old}/{n}/{k}"])
                else:
                    out[key] = np.asarray(v)

    with jax.disable_jit():
        # -------------------------------------------------------------- schedules, embedding, networks
        for k in (30, 1000):
            gd, _ = make_policy(k)
            for name in ["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                         "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                         "posterior_mean_coef2", "posterior_log_variance_clipped", "normalized_ts_weights"]:
                store_or_compare(f"schedule/{k}/{name}", getattr(gd, name))
        store_or_compare("embedding/value", sinusoidal_embedding(cast(gold["embedding/t"]), 16))

        agent = make_agent("TD3")
        set_state(agent, gold, "init")
        p = agent._train_states
        obs, act = batch["observations"], batch["actions"]
        store_or_compare("forward/eps", agent.policy.apply(p["policy"].params, obs, act, cast(gold["forward/t"]),
                                                           method=agent.policy.forward))
        store_or_compare("forward/q1", agent.qf.apply(p["qf1"].params, obs, act))
        store_or_compare("forward/q2", agent.qf.apply(p["qf2"].params, obs, act))

        # -------------------------------------------------------------- action approximation, surrogates
        replay([("randint", gold["approx/t"]), ("normal", gold["approx/noise"])])
        params_now = {key: p[key].params for key in agent.model_keys}
        terms, ts, log_p = agent.get_diff_terms(params_now, obs, act, batch["dones"], jax.random.PRNGKey(0))
        recorded()
        store_or_compare("approx/x_t", terms["x_t"])
        store_or_compare("approx/eps_pred", terms["model_output"])
        store_or_compare("approx/a0_hat", terms["pred_astart"])
        store_or_compare("approx/loss", terms["loss"])
        store_or_compare("approx/log_prob_gaussian", terms["action_dist"].log_prob(act))
        assert np.allclose(log_p, terms["action_dist"].log_prob(terms["pred_astart"]))  # fixed_std: at its mean
        store_or_compare("approx/log_prob_elbo", -terms["ts_weights"] * terms["mse"])

        # -------------------------------------------------------------- one TD3 update (step 1)
        td3_draws = ([("normal", x) for x in gold["update/next_chain"]] * 2
                     + [("randint", gold["update/bc_t"]), ("normal", gold["update/bc_noise"]),
                        ("uniform", gold["update/uniform"])])

        def next_action(agent, chain):
            replay([("normal", x) for x in chain])
            a = agent.policy.apply(agent._tgt_params["policy"], jax.random.PRNGKey(1), batch["next_observations"])
            recorded()
            q = jnp.minimum(agent.qf.apply(agent._tgt_params["qf1"], batch["next_observations"], a),
                            agent.qf.apply(agent._tgt_params["qf2"], batch["next_observations"], a))
            return a, batch["rewards"] + (1 - batch["dones"]) * 0.99 * q

        a_next, y = next_action(agent, gold["update/next_chain"])
        store_or_compare("update/next_action", a_next)
        store_or_compare("update/target_q", y)
        replay(td3_draws)
        agent._total_steps = 0
        metrics = agent.train(batch)  # update 1: no policy-target update
        recorded()
        for k, v in metrics.items():
            store_or_compare(f"update/metrics/{k}", v)
        after("after", agent, ("policy", "qf1", "qf2"), ("tgt_qf1", "tgt_qf2", "tgt_policy"), old="after")

        # -------------------------------------------------------------- IQL rule
        iql = make_agent("IQL", seed=1)
        set_state(iql, gold, "init", with_vf=True)
        replay([("randint", gold["iql/bc_t"]), ("normal", gold["iql/bc_noise"])] * 2)
        iql._total_steps = 0
        metrics = iql.train(batch)
        recorded()
        for k, v in metrics.items():
            store_or_compare(f"iql/metrics/{k}", v)
        after("iql/after", iql, ("policy", "qf1", "qf2", "vf"), ("tgt_qf1", "tgt_qf2"), old="iql/after")

        def scaled(tree, factor: float):
            """A critic's parameters with its output layer (the last Dense) multiplied by `factor`."""
            flat = flatten_dict(dict(tree), sep="/")
            last = max({k.split("/")[1] for k in flat}, key=lambda n: int(n.split("_")[1]))
            return unflatten_dict({k: v * factor if k.split("/")[1] == last else v for k, v in flat.items()}, sep="/")

        # -------------------------------------------------------------- new: CRR rule (one update, step 1)
        # The same initial parameters, batch and draws as the TD3 update (a' chain, bc_t, bc_noise), plus the 10
        # samples a ~ N(a0_hat, I) of the value estimate (the policy loss is evaluated twice by
        # value_and_multi_grad with the same key: both draws equal). The four critics' output layers are scaled
        # by 30 (stored under crr/init): the advantages then range over several units, so that the weight clip
        # min(exp(A), 20) binds for some samples and not for others.
        src = extra if args.x64 else {}
        crr = make_agent("CRR")
        set_state(crr, gold, "init")
        for n in ("qf1", "qf2"):
            crr._train_states[n] = crr._train_states[n].replace(params=scaled(crr._train_states[n].params, 30))
            crr._tgt_params[n] = scaled(crr._tgt_params[n], 30)
            store(f"crr/init/{n}", crr._train_states[n].params)
            store(f"crr/init/tgt_{n}", crr._tgt_params[n])
        vf_noise = src.get("crr/vf_noise")
        policy_draws = [("randint", gold["update/bc_t"]), ("normal", gold["update/bc_noise"]), ("normal", vf_noise)]
        replay([("normal", x) for x in gold["update/next_chain"]] * 2 + policy_draws * 2)
        crr._total_steps = 0
        metrics = crr.train(batch)
        log = recorded()
        if not args.x64:
            (_, first), (_, second) = log
            assert first.shape == (10, 8, 3) and np.array_equal(first, second)
            out["crr/vf_noise"] = first
        for k, v in metrics.items():
            out[f"crr/metrics/{k}"] = np.asarray(v)
        after("crr/after", crr, ("policy", "qf1", "qf2"), ("tgt_qf1", "tgt_qf2"))

        # -------------------------------------------------------------- DPM-Solver
        _, dpm_policy = make_policy(1000, "dpm")
        replay([("normal", gold["dpm/x_T"])])
        action = dpm_policy.apply(params(gold, "init/policy"), jax.random.PRNGKey(2), cast(gold["dpm/obs"]))
        recorded()
        store_or_compare("dpm/action", action)

        # -------------------------------------------------------------- new: EAS acting (online critics)
        # The agent after the TD3 update: online policy != EMA policy (held at init), online critics != targets.
        # The output layers of all four critics are scaled by 1000: the Q spread among the candidates (about 1e-2
        # with these weights) then exceeds the Gumbel noise of jax.random.categorical (a few units), so that the
        # choice depends on which critics are read. The parameters used are stored under act/params.
        sampler = SamplerPolicy(agent.policy, agent.qf)

        train_params = dict(agent.train_params)
        train_params["qf1"], train_params["qf2"] = scaled(train_params["qf1"], 1000), scaled(train_params["qf2"], 1000)
        for n, tree in [("policy", train_params["policy"]), ("qf1", train_params["qf1"]), ("qf2", train_params["qf2"]),
                        ("tgt_qf1", scaled(agent._tgt_params["qf1"], 1000)),
                        ("tgt_qf2", scaled(agent._tgt_params["qf2"], 1000)),
                        ("tgt_policy", agent._tgt_params["policy"])]:
            store(f"act/params/{n}", tree)
        n_states, n = 4, 50  # the code's num_samples; one state per call (its jnp.take assumes one row)
        rng = jax.random.PRNGKey(3)
        for s in range(n_states):
            state_s = cast(gold["dpm/obs"][s:s + 1])
            rng, key = jax.random.split(rng)
            if args.x64:
                replay([("normal", x) for x in src[f"act/{s}/chain"]])
            else:
                state["queue"], state["log"] = None, []
            a = sampler.ddpmensemble_act(train_params, key, state_s, False, n)
            log = recorded()
            normals = [v for name, v in log if name == "normal"]
            (u, idx), = [v for name, v in log if name == "categorical"]
            chain = np.stack(normals) if normals else src[f"act/{s}/chain"]
            out[f"act/{s}/state"] = np.asarray(state_s)
            out[f"act/{s}/chain"] = chain.astype(dtype)
            out[f"act/{s}/u"] = u
            out[f"act/{s}/index"] = idx
            out[f"act/{s}/action"] = np.asarray(a)
            # the candidates and their scores, from the same chain (what ddpmensemble_act computed inside)
            replay([("normal", x) for x in chain])
            cand = agent.policy.apply(train_params["policy"], key, state_s, False, n, method=agent.policy.ddpm_sample)
            recorded()
            out[f"act/{s}/candidates"] = np.asarray(cand)
            out[f"act/{s}/q"] = np.asarray(jnp.minimum(agent.qf.apply(train_params["qf1"], state_s, cand),
                                                       agent.qf.apply(train_params["qf2"], state_s, cand)))

        # -------------------------------------------------------------- new: the EMA policy update
        # From init, with the EMA policy (and the target critics) at 0.9 x the online weights, so that the EMA
        # moves visibly; the official step counter is set so that train() runs update 1000, 1004 or 1005.
        tgt_policy = jax.tree_util.tree_map(lambda x: 0.9 * x, params(gold, "init/policy"))
        for name, before in EMA_STEPS.items():
            ema = make_agent("TD3")
            set_state(ema, gold, "init", tgt_policy=tgt_policy)
            if name == "active_1005":
                a_next, y = next_action(ema, gold["update/next_chain"])
                out[f"ema/{name}/next_action"] = np.asarray(a_next)
                out[f"ema/{name}/target_q"] = np.asarray(y)
            replay(td3_draws)
            ema._total_steps = before
            metrics = ema.train(batch)
            recorded()
            assert ema.total_steps == before + 1
            for k, v in metrics.items():
                out[f"ema/{name}/metrics/{k}"] = np.asarray(v)
            after(f"ema/{name}", ema, ("policy", "qf1", "qf2"), ("tgt_qf1", "tgt_qf2", "tgt_policy"))
        store("ema/tgt_policy_before", tgt_policy)

    if not args.x64:
        worst = max(check, key=check.get)
        print(f"re-run of edp.npz: {len(check)} entries, largest difference (absolute, relative above 1) {check[worst]:.3g} ({worst})")
        for k in sorted(check, key=check.get)[-8:]:
            print(f"  {k}: {check[k]:.3g}")
    out["meta/versions"] = np.array(f"jax {jax.__version__}, x64 {bool(args.x64)}")
    np.savez_compressed(args.out, **out)
    print(f"wrote {len(out)} entries to {args.out}")


if __name__ == "__main__":
    main()
