"""Record IDQL golden values by running the official JAX code (philippe-eecs/IDQL @ 7582571ce686c77b4ee0f592dd639ab8151295fa,
the exported learner jaxrl5/agents/ddpm_iql_simple/).

Run in a virtualenv with jax 0.4.30, jaxlib 0.4.30 (CPU), flax 0.8.5, optax 0.2.3, distrax 0.1.5, chex 0.1.86,
ml_collections 1.1.0, tensorflow-probability 0.24.0, numpy 1.26.4 (no torch), from a checkout of the official
repository (`git archive 7582571ce686c77b4ee0f592dd639ab8151295fa | tar -x -C IDQL`):

    python idql_record.py --official IDQL --golden tests/data/golden --check            # float32: re-run idql.npz
    python idql_record.py --official IDQL --golden tests/data/golden --out tests/data/golden/idql_x64.npz --x64

Every piece of idql.npz is re-run from its stored parameters, inputs and random draws (replayed). In float32 (JAX's
default, as the official code runs) the script prints the largest difference to the stored values (a check of this
script); with --x64 (`jax_enable_x64`) it stores the float64 results: parameters and inputs are the float32 ones cast
(exact), the random draws the float32 ones cast.

Shims (no official line is changed; see tests/data/golden/README.md): `gym` is a stub (spaces.Box with `sample()` and
`shape`, `gym.utils.seeding`), used only for type hints and the spaces passed to `create`; the package `__init__`s of
`jaxrl5.agents`, `jaxrl5.agents.ddpm_iql_simple` and `jaxrl5.data` are skipped (empty packages with the right
`__path__`); the learner's module-level `MLPResNet` is `functools.partial(MLPResNet, hidden_dim=32)` (the width 256 is
not an argument of `create`); `jax.random.normal` and `randint` return the stored draws in call order (shape-checked).
The official functions run eagerly under `jax.disable_jit()`; the noise network passed to `ddpm_sampler` is wrapped
to store its inputs and outputs (x entering each step, eps).
"""

from __future__ import annotations

import argparse
import functools
import sys
import types

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--out")
    ap.add_argument("--x64", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    dtype = np.float64 if args.x64 else np.float32

    # ------------------------------------------------------------------ import shims
    root = f"{args.official}/jaxrl5"
    gym = types.ModuleType("gym")

    class Box:
        def __init__(self, low, high, shape):
            self.low, self.high, self.shape = low, high, shape

        def sample(self):
            return np.zeros(self.shape, np.float32)

    gym.spaces = types.SimpleNamespace(Box=Box, Space=Box, Dict=dict)
    gym.Space = Box
    gym.utils = types.ModuleType("gym.utils")
    gym.utils.seeding = types.ModuleType("gym.utils.seeding")
    sys.modules.update({"gym": gym, "gym.spaces": gym.spaces, "gym.utils": gym.utils,
                        "gym.utils.seeding": gym.utils.seeding})
    sys.path.insert(0, args.official)
    for name, path in [("jaxrl5.agents", "agents"), ("jaxrl5.agents.ddpm_iql_simple", "agents/ddpm_iql_simple"),
                       ("jaxrl5.data", "data")]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [f"{root}/{path}"]
        sys.modules[name] = pkg
    import jaxrl5.agents.ddpm_iql_simple.ddpm_iql_learner as learner
    from jaxrl5.networks import MLPResNet, ddpm_sampler

    learner.MLPResNet = functools.partial(MLPResNet, hidden_dim=32)

    with np.load(f"{args.golden}/idql.npz") as f:
        gold = {k: f[k] for k in f.files if f[k].dtype.kind != "U"}
    out: dict[str, np.ndarray] = {}
    check: dict[str, float] = {}

    def cast(x):
        x = np.asarray(x)
        return jnp.asarray(x.astype(dtype) if x.dtype.kind == "f" else x)

    def params(prefix: str):
        flat = {tuple(k[len(prefix) + 1:].split("/")): cast(v) for k, v in gold.items() if k.startswith(prefix + "/")}
        assert flat, prefix
        return unflatten_dict(flat)

    def result(name: str, value) -> None:
        value = np.asarray(value)
        if args.x64:
            out[name] = value
        else:
            ref = np.asarray(gold[name], np.float64)
            diff = np.abs(value.astype(np.float64) - ref)
            check[name] = float(np.max(diff / np.maximum(np.abs(ref), 1.0), initial=0.0))

    # ------------------------------------------------------------------ replayed draws
    originals = {n: getattr(jax.random, n) for n in ("normal", "randint")}
    queue: list = []

    def wrap(name):
        def fn(key, shape=(), *a, **k):
            if isinstance(key, jax.core.Tracer) or not queue:
                return originals[name](key, shape, *a, **k)
            want, value = queue.pop(0)
            assert want == name and tuple(np.shape(value)) == tuple(shape), (want, name, np.shape(value), shape)
            return cast(value) if name == "normal" else jnp.asarray(np.asarray(value).astype(np.int32))
        return fn

    jax.random.normal, jax.random.randint = wrap("normal"), wrap("randint")

    def replay(draws):
        assert not queue
        queue.extend(draws)

    def done():
        assert not queue, f"{len(queue)} replayed draws unused"

    # ------------------------------------------------------------------ the official agent
    Box_ = gym.spaces.Box
    agent = learner.DDPMIQLLearner.create(
        seed=0, observation_space=Box_(-1, 1, (11,)), action_space=Box_(-1, 1, (3,)), critic_hidden_dims=(32, 32),
        critic_hyperparam=0.7, actor_num_blocks=2, actor_dropout_rate=None, time_dim=16, T=5, N=16,
        beta_schedule="vp", decay_steps=int(3e6))

    def with_params(agent, stage: str, actor_ema: str | None = None):
        return agent.replace(
            score_model=agent.score_model.replace(params=params(f"{stage}/actor")),
            target_score_model=agent.target_score_model.replace(params=params(f"{stage}/{actor_ema or 'actor'}")),
            critic=agent.critic.replace(params=params(f"{stage}/critic")),
            target_critic=agent.target_critic.replace(params=params(f"{stage}/critic_target")),
            value=agent.value.replace(params=params(f"{stage}/value")))

    batch = {k.split("/")[1]: cast(v) for k, v in gold.items() if k.startswith("batch/")}

    with jax.disable_jit():
        for schedule in ("vp", "cosine"):
            sched = learner.DDPMIQLLearner.create(
                seed=0, observation_space=Box_(-1, 1, (11,)), action_space=Box_(-1, 1, (3,)),
                critic_hidden_dims=(32, 32), actor_num_blocks=2, time_dim=16, T=5, N=16, beta_schedule=schedule)
            for name in ("betas", "alphas", "alpha_hats"):
                result(f"schedule/{schedule}/{name}", getattr(sched, name))
        for tau in ("0.7", "0.9"):
            result(f"expectile/loss_{tau}", learner.expectile_loss(cast(gold["expectile/diff"]), float(tau)))

        agent = with_params(agent, "init")
        obs, act = batch["observations"], batch["actions"]
        result("forward/eps", agent.score_model.apply_fn({"params": agent.score_model.params}, obs, act,
                                                         cast(gold["forward/t"])[:, None], training=False))
        result("forward/q", agent.critic.apply_fn({"params": agent.critic.params}, obs, act))
        result("forward/v", agent.value.apply_fn({"params": agent.value.params}, obs))

        # one update: the official update (update_actor, update_v, update_q), eagerly
        replay([("randint", gold["update/actor/t"]), ("normal", gold["update/actor/noise"])])
        new, info = agent.update(batch)
        done()
        for k in ("actor_loss", "value_loss", "v", "critic_loss", "q"):
            result(f"update/info/{k}", info[k])
        next_v = new.value.apply_fn({"params": new.value.params}, batch["next_observations"])
        result("update/critic/next_v", next_v)
        result("update/critic/target_q", batch["rewards"] + new.discount * batch["masks"] * next_v)
        for name, ts in [("actor", new.score_model), ("actor_ema", new.target_score_model), ("critic", new.critic),
                         ("critic_target", new.target_critic), ("value", new.value)]:
            for k, v in flatten_dict(dict(ts.params), sep="/").items():
                result(f"after/{name}/{k}", v)

        # reverse chains (clip_sampler True and False) from the initial actor
        def chain(ag, obs, noise, clip: bool, prefix: str | None):
            calls = []

            def apply_fn(variables, s, x, t, training=False):
                eps = ag.score_model.apply_fn(variables, s, x, t, training=training)
                calls.append((np.asarray(x), np.asarray(eps), int(t[0, 0])))
                return eps

            replay([("normal", z) for z in noise])
            action, _ = ddpm_sampler(apply_fn, ag.target_score_model.params, ag.T, jax.random.PRNGKey(0), ag.act_dim,
                                     obs, ag.alphas, ag.alpha_hats, ag.betas, ag.ddpm_temperature, ag.M, clip)
            done()
            if prefix is not None:
                assert [c[2] for c in calls] == list(gold[f"{prefix}/t"])
                result(f"{prefix}/x_in", np.stack([c[0] for c in calls]))
                result(f"{prefix}/eps", np.stack([c[1] for c in calls]))
                result(f"{prefix}/action", action)
            return action

        for clip in ("clip", "noclip"):
            chain(agent, cast(gold["sample/obs"]), gold[f"sample/{clip}/noise"], clip == "clip", f"sample/{clip}")

        # the greedy choice of the agent after the update (EMA actor, target critics)
        # (x64: the agent after its own float64 update, whose parameters the float64 tests load)
        evaluated = new if args.x64 else with_params(agent, "after", "actor_ema")
        state = cast(gold["eval/state"])
        rep = jnp.expand_dims(state, 0).repeat(evaluated.N, axis=0)
        cand = chain(evaluated, rep, gold["eval/noise"], True, None)
        result("eval/candidates", cand)
        q = learner.compute_q(evaluated.target_critic.apply_fn, evaluated.target_critic.params, rep, cand)
        result("eval/q", q)
        replay([("normal", z) for z in gold["eval/noise"]])
        action, _ = evaluated.eval_actions(state)
        done()
        result("eval/action", action)
        assert int(jnp.argmax(q)) == int(gold["eval/index"])
        out["eval/index"] = np.asarray(int(jnp.argmax(q)), np.int32)

    if args.check or not args.x64:
        worst = max(check, key=check.get)
        print(f"re-run of idql.npz: {len(check)} entries, largest difference (absolute, relative above 1) "
              f"{check[worst]:.3g} ({worst})")
        for k in sorted(check, key=check.get)[-6:]:
            print(f"  {k}: {check[k]:.3g}")
    if args.out:
        out["meta/versions"] = np.array(f"jax {jax.__version__}, x64 {bool(args.x64)}")
        np.savez_compressed(args.out, **out)
        print(f"wrote {len(out)} entries to {args.out}")


if __name__ == "__main__":
    main()
