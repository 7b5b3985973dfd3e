"""Side-by-side training speed of offbench and the JAX implementations researchers compare it with.

Each implementation runs in a persistent process of its own (offbench in this project's environment, a peer
in its JAX environment, importing the peer's code from the checkout you give), on one thread. The
measurement runs in windows of `--window` updates, alternated over the implementations of a pair in the
order A B B A A B ... (forward, then backward: drift of the machine's load hits every implementation alike).
Compilation (jit, torch.compile) and warm-up updates run before the first window and are not timed. The
rate of a window is updates per CPU second of the worker process (all of its threads: JAX's runtime
threads count), the measure that survives a machine shared with other jobs; wall-clock rates are reported
beside it. The table gives each implementation's median over its windows and the spread (min-max).

Pairs (same network sizes and batch on both sides; obs 17, act 6, a random dataset of 100k rows drawn
with replacement inside each implementation, as each trains):

  iql      offbench algorithms.iql.IQL (2x256, batch 256)   vs nissymori/JAX-CORL algos/iql.py (update_n_times)
  td3bc    offbench algorithms.td3bc.TD3BC (2x256, 256)      vs nissymori/JAX-CORL algos/td3bc.py (update_n_times)
  rebrac   offbench algorithms.rebrac.ReBRAC (3x256, LN critics, batch 1024)
                                                             vs DT6A/ReBRAC src/algorithms/rebrac.py (update_td3 /
                                                                update_td3_no_targets in lax.fori_loop, as its main)
  idql     offbench algorithms.idql.IDQL (LN-ResNet 3x256, dropout 0.1, batch 512)
                                                             vs philippe-eecs/IDQL jaxrl5/agents/ddpm_iql_simple
                                                                (DDPMIQLLearner.update, one jitted update per call)
  edp      offbench algorithms.edp.EDP at the code's setting (K = 100, DDPM chain for a', clip 9; its default is the
           paper's K = 1000 with DPM-Solver)                 vs sail-sg/edp diffusion/dql.py (DiffusionQL.train, as
                                                                its trainer builds it, one jitted step per call)

Differences in the peers' own settings, kept as the peers run them: JAX-CORL's IQL value network and its
TD3+BC critics have a LayerNorm (offbench's IQL and TD3+BC, as the papers, do not); JAX-CORL's TD3+BC,
like its loop, updates the actor on every `policy_freq`-th update *of a jitted call*, so it is run with 2
or more updates per call (1 would update the actor on every update); so is ReBRAC (its `delayed_updates`
mask restarts with every jitted call).

Modes: offbench `eager` (the default training path) and `compiled` (`enable_compile()`, what
`offbench fit --compile true` runs); a peer at `--peer-block` updates per jitted call (JAX-CORL's default
is 8; ReBRAC's main runs 1000 per call, its epoch) and at its smallest block.

How to run (offbench's venv for this script; the peers' checkouts and JAX environments are yours):

    git clone https://github.com/nissymori/JAX-CORL JAXCORL        # measured at d747dd8
    git clone https://github.com/DT6A/ReBRAC REBRAC && git -C REBRAC checkout 694385b
    git clone https://github.com/philippe-eecs/IDQL IDQL && git -C IDQL checkout 7582571   # jax, flax, optax, distrax,
    git clone https://github.com/sail-sg/edp EDP && git -C EDP checkout b019648             # ml_collections, tfp (IDQL, EDP)
    # JAX-CORL: jax, flax, optax, distrax, omegaconf, pydantic; ReBRAC: see its requirements (jax 0.4.13, flax 0.6.1)
    OMP_NUM_THREADS=1 python benchmarks/peers.py \\
        --peer iql JAXCORL /path/to/jax-venv/bin/python --peer td3bc JAXCORL /path/to/jax-venv/bin/python \\
        --peer rebrac REBRAC /path/to/rebrac-venv/bin/python --windows 6 --out results/perf/peers.md
    OMP_NUM_THREADS=1 python benchmarks/peers.py --peer idql IDQL /path/to/jax-venv/bin/python --out /tmp/idql.md
    OMP_NUM_THREADS=1 python benchmarks/peers.py --peer edp EDP /path/to/jax-venv/bin/python --modes eager \
        --window 40 --out /tmp/edp.md      # (compiling EDP's 100-step chain takes minutes on a CPU)
    python benchmarks/peers.py --from-json results/perf/peers.json /tmp/idql.json /tmp/edp.json --out results/perf/peers.md

`--peer-pythonpath DIR` adds DIR to the peers' PYTHONPATH (packages installed with pip --target).
Writes a markdown table (and the raw windows as JSON beside it). No peer code is copied into the project:
the workers import it from the checkout; stub modules stand in for what only their training scripts'
`main` needs (wandb, gym, d4rl, tqdm, pyrallis, the D4RL replay buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

OBS, ACT, ROWS, SEED = 17, 6, 100_000, 0
REPO = Path(__file__).resolve().parents[1]
ALGOS = {"iql": 256, "td3bc": 256, "rebrac": 1024, "idql": 512, "edp": 256}  # batch sizes (the papers' and the peers')
PEER_NAMES = {"iql": "JAX-CORL", "td3bc": "JAX-CORL", "rebrac": "DT6A/ReBRAC", "idql": "philippe-eecs/IDQL",
              "edp": "sail-sg/edp"}
# offbench settings for a pair where a peer's defaults differ from offbench's config: EDP's code runs K = 100 with the
# DDPM chain for a' (its paper: K = 1000, DPM-Solver; offbench's default), gradient norms clipped at 9 (hps.py's gn)
OFFBENCH_ARGS = {"edp": {"n_timesteps": 100, "sampler": "ddpm", "max_grad_norm": 9.0}}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
              "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


# ------------------------------------------------------------------ the workers (one process each)
def dataset_arrays():
    """The random dataset both sides train on (numpy, float32)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return {
        "obs": rng.normal(size=(ROWS, OBS)).astype(np.float32),
        "act": rng.uniform(-1, 1, size=(ROWS, ACT)).astype(np.float32),
        "rew": rng.normal(size=ROWS).astype(np.float32),
        "next_obs": rng.normal(size=(ROWS, OBS)).astype(np.float32),
        "next_act": rng.uniform(-1, 1, size=(ROWS, ACT)).astype(np.float32),
        "done": (rng.uniform(size=ROWS) < 0.01).astype(np.float32),
    }


def offbench_worker(algo: str, mode: str):
    """run(n) for offbench's module of `algo`: `update` through `run_update` (what training runs per update),
    batches drawn as OfflineDataModule.sample draws them (randint on the device, then indexing)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from offbench.batch import Batch
    from offbench.module import fused_optimizer

    cls = {"iql": "algorithms.iql.IQL", "td3bc": "algorithms.td3bc.TD3BC", "rebrac": "algorithms.rebrac.ReBRAC",
           "idql": "algorithms.idql.IDQL", "edp": "algorithms.edp.EDP"}[algo]
    module_name, class_name = cls.rsplit(".", 1)
    module_cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    torch.manual_seed(SEED)
    model = module_cls(obs_dim=OBS, act_dim=ACT, max_action=1.0, **OFFBENCH_ARGS.get(algo, {}))
    model.configure_optimizers()
    if mode == "eager":  # as training's on_train_start
        for optimizer in model._raw_optimizers():
            fused_optimizer(optimizer)
    elif mode == "compiled":
        model.enable_compile()
    else:
        raise ValueError(mode)
    data = {k: torch.from_numpy(v) for k, v in dataset_arrays().items()}
    generator = torch.Generator().manual_seed(SEED)
    batch_size = ALGOS[algo]

    def sample() -> Batch:
        idx = torch.randint(ROWS, (batch_size,), generator=generator)
        return Batch(data["obs"][idx], data["act"][idx], data["rew"][idx], data["next_obs"][idx], data["done"][idx],
                     idx=idx, next_act=data["next_act"][idx])

    def run(n: int) -> None:
        for _ in range(n):
            model.run_update(sample())

    return run, 1


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def jax_corl_worker(algo: str, checkout: str, block: int):
    """run(n) for JAX-CORL's `update_n_times` (jitted, `block` updates per call, sampling inside, as its main)."""
    import jax
    import jax.numpy as jnp

    for name in ("d4rl", "wandb", "tqdm"):
        _stub(name)
    _stub("gym", Env=object)
    sys.argv = [sys.argv[0]]  # the module reads its config from the command line (OmegaConf.from_cli)
    sys.path.insert(0, str(Path(checkout) / "algos"))
    peer = __import__(algo)  # algos/iql.py or algos/td3bc.py of the checkout
    arrays = dataset_arrays()
    fields = {"observations": "obs", "actions": "act", "rewards": "rew", "next_observations": "next_obs",
              "dones": "done", "dones_float": "done"}  # the fields of the peer's Transition (they differ by file)
    data = peer.Transition(**{f: jnp.asarray(arrays[fields[f]]) for f in peer.Transition._fields})
    config = peer.config.model_copy(update={"n_jitted_updates": block})
    rng = jax.random.PRNGKey(SEED)
    if algo == "iql":
        state = peer.create_iql_train_state(rng, data.observations[0], data.actions[0], config)
        agent = peer.IQL()
    else:
        state = peer.create_td3bc_train_state(rng, data.observations[0], data.actions[0], config)
        agent = peer.TD3BC()
    update = jax.jit(agent.update_n_times, static_argnums=(3,))
    carry = {"state": state, "rng": rng}

    def run(n: int) -> None:
        state, rng = carry["state"], carry["rng"]
        for _ in range(n // block):
            rng, key = jax.random.split(rng)
            state, _ = update(state, data, key, config)
        jax.block_until_ready(state)
        carry.update(state=state, rng=rng)

    return run, block


def rebrac_worker(checkout: str, block: int):
    """run(n) for DT6A/ReBRAC: its main's loop body (update_td3 on delayed updates, else update_td3_no_targets,
    chosen by lax.cond, batches from ReplayBuffer.sample_batch) in a jitted lax.fori_loop of `block` updates."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import optax

    _stub("wandb")
    _stub("pyrallis", wrap=lambda *a, **k: (lambda f: f))
    _stub("tqdm")
    _stub("tqdm.auto", trange=range)
    _stub("gym", Env=object)
    _stub("d4rl")
    _stub("h5py")
    sys.path.insert(0, checkout)
    _stub("src.utils.vd4rl_utils", ExtendedTimeStep=None, step_type_lookup=None)
    from src.algorithms import rebrac  # official
    from src.networks import DetActor, EnsembleCritic  # official
    from src.utils.buffer import ReplayBuffer  # official
    from src.utils.common import Metrics  # official

    c = rebrac.Config()
    arrays = dataset_arrays()
    buffer = ReplayBuffer()
    buffer.data = {"states": jnp.asarray(arrays["obs"]), "actions": jnp.asarray(arrays["act"]),
                   "rewards": jnp.asarray(arrays["rew"]), "next_states": jnp.asarray(arrays["next_obs"]),
                   "next_actions": jnp.asarray(arrays["next_act"]), "dones": jnp.asarray(arrays["done"])}
    key = jax.random.PRNGKey(SEED)
    key, actor_key, critic_key = jax.random.split(key, 3)
    init_state, init_action = buffer.data["states"][:1], buffer.data["actions"][:1]
    actor_module = DetActor(action_dim=ACT, hidden_dim=c.hidden_dim, layernorm=c.actor_ln, n_hiddens=c.actor_n_hiddens)
    critic_module = EnsembleCritic(hidden_dim=c.hidden_dim, num_critics=2, layernorm=c.critic_ln, n_hiddens=c.critic_n_hiddens)
    actor = rebrac.ActorTrainState.create(apply_fn=actor_module.apply, params=actor_module.init(actor_key, init_state),
                                          target_params=actor_module.init(actor_key, init_state),
                                          tx=optax.adam(learning_rate=c.actor_learning_rate))
    critic = rebrac.CriticTrainState.create(apply_fn=critic_module.apply, params=critic_module.init(critic_key, init_state, init_action),
                                            target_params=critic_module.init(critic_key, init_state, init_action),
                                            tx=optax.adam(learning_rate=c.critic_learning_rate))
    kwargs = dict(gamma=c.gamma, actor_bc_coef=c.actor_bc_coef, critic_bc_coef=c.critic_bc_coef, tau=c.tau,
                  policy_noise=c.policy_noise, noise_clip=c.noise_clip)
    full, no_targets = partial(rebrac.update_td3, normalize_q=c.normalize_q, **kwargs), partial(rebrac.update_td3_no_targets, **kwargs)
    delayed = jnp.equal(jnp.arange(block) % c.policy_freq, 0).astype(int)
    size = ROWS

    def body(i, carry):  # the loop body of the official main (td3_loop_update_step)
        key, batch_key = jax.random.split(carry["key"])
        indices = jax.random.randint(batch_key, shape=(c.batch_size,), minval=0, maxval=size)  # ReplayBuffer.sample_batch
        batch = jax.tree_util.tree_map(lambda arr: arr[indices], carry["data"])
        args = dict(key=key, actor=carry["actor"], critic=carry["critic"], batch=batch, metrics=carry["metrics"])
        key, actor, critic, metrics = jax.lax.cond(delayed[i], partial(full, **args), partial(no_targets, **args))
        return {**carry, "key": key, "actor": actor, "critic": critic, "metrics": metrics}

    names = ["critic_loss", "q_min", "actor_loss", "batch_entropy", "bc_mse_policy", "bc_mse_random", "action_mse"]

    @jax.jit
    def epoch(carry):
        return jax.lax.fori_loop(0, block, body, {**carry, "metrics": Metrics.create(names)})

    carry = {"key": key, "actor": actor, "critic": critic, "data": buffer.data, "metrics": Metrics.create(names)}
    holder = {"carry": carry}

    def run(n: int) -> None:
        carry = holder["carry"]
        for _ in range(n // block):
            carry = epoch(carry)
        jax.block_until_ready(carry["actor"].params)
        holder["carry"] = carry

    return run, block


def idql_worker(checkout: str) -> tuple:
    """run(n) for philippe-eecs/IDQL's DDPMIQLLearner (jaxrl5/agents/ddpm_iql_simple, its defaults and the D4RL
    launcher's actor dropout 0.1): its jitted `update` once per update, on a batch drawn on the host each time, as
    its offline training loop does (jaxrl5's Dataset.sample)."""
    import jax
    import numpy as np

    class Box:  # gym.spaces.Box, as far as `create` reads it
        def __init__(self, low, high, shape):
            self.low, self.high, self.shape = low, high, shape

        def sample(self):
            return np.zeros(self.shape, np.float32)

    gym = _stub("gym", Space=Box)
    gym.spaces = _stub("gym.spaces", Box=Box, Space=Box, Dict=dict)
    gym.utils = _stub("gym.utils")
    gym.utils.seeding = _stub("gym.utils.seeding")
    sys.path.insert(0, checkout)
    for name, path in [("jaxrl5.agents", "agents"), ("jaxrl5.agents.ddpm_iql_simple", "agents/ddpm_iql_simple"),
                       ("jaxrl5.data", "data")]:  # package __init__s that import what the learner does not need
        _stub(name).__path__ = [str(Path(checkout) / "jaxrl5" / path)]
    import jaxrl5.agents.ddpm_iql_simple.ddpm_iql_learner as learner  # official

    agent = learner.DDPMIQLLearner.create(seed=SEED, observation_space=Box(-1, 1, (OBS,)),
                                          action_space=Box(-1, 1, (ACT,)), actor_dropout_rate=0.1)
    arrays = dataset_arrays()
    data = {"observations": arrays["obs"], "actions": arrays["act"], "rewards": arrays["rew"],
            "next_observations": arrays["next_obs"], "masks": 1.0 - arrays["done"]}
    rng = np.random.default_rng(SEED)
    holder = {"agent": agent}

    def run(n: int) -> None:
        agent = holder["agent"]
        for _ in range(n):
            idx = rng.integers(ROWS, size=ALGOS["idql"])
            agent, _ = agent.update({k: v[idx] for k, v in data.items()})
        jax.block_until_ready(agent.score_model.params)
        holder["agent"] = agent

    return run, 1


def edp_worker(checkout: str) -> tuple:
    """run(n) for sail-sg/edp's DiffusionQL agent (diffusion/dql.py) as its trainer (diffusion/trainer.py) builds it
    with the code's defaults: TD3 rule, K = 100 linear schedule, the DDPM chain for a' (sample_method ddpm), 3 x 256 Mish
    networks, gradient norms clipped at 9; `agent.train(batch)` (its jitted step) once per update, on a batch drawn on
    the host each time (utilities/replay_buffer.subsample_batch)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    class Anything(types.ModuleType):  # stands in for the trainer's logging and data modules
        def __getattr__(self, name):
            return lambda *a, **k: None

    jax.tree_multimap = jax.tree_util.tree_map  # removed from JAX; the code still calls it
    for cls in (type(jnp.zeros(1)), jax.core.Tracer):
        cls.tile = lambda x, reps: jnp.tile(x, reps)  # a removed array method the DPM-Solver code calls
    for name in ["gym", "data", "tqdm", "viskit", "viskit.logging", "utilities.replay_buffer", "utilities.sampler",
                 "utilities.utils"]:
        sys.modules[name] = Anything(name)
    sys.path.insert(0, checkout)
    from diffusion.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType  # official
    from diffusion.dql import DiffusionQL  # official
    from diffusion.nets import Critic, DiffusionPolicy, GaussianPolicy, Value  # official
    from utilities.jax_utils import init_rng  # official

    init_rng(SEED)
    gd = GaussianDiffusion(num_timesteps=100, schedule_name="linear", model_mean_type=ModelMeanType.EPSILON,
                           model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE, min_value=-1.0, max_value=1.0)
    policy = DiffusionPolicy(diffusion=gd, observation_dim=OBS, action_dim=ACT, arch=(256, 256, 256), time_embed_size=16,
                             sample_method="ddpm")
    cfg = DiffusionQL.get_default_config({"max_grad_norm": 9.0})
    agent = DiffusionQL(cfg, policy, Critic(OBS, ACT, (256, 256, 256)), Value(OBS, (256, 256, 256)), GaussianPolicy(ACT))
    arrays = dataset_arrays()
    data = {"observations": arrays["obs"], "actions": arrays["act"], "rewards": arrays["rew"],
            "next_observations": arrays["next_obs"], "dones": arrays["done"]}
    rng = np.random.default_rng(SEED)

    def run(n: int) -> None:
        for _ in range(n):
            idx = rng.integers(ROWS, size=ALGOS["edp"])
            agent.train({k: v[idx] for k, v in data.items()})
        jax.block_until_ready(agent.train_states["policy"].params)

    return run, 1


def worker_main(argv: list[str]) -> None:
    """`peers.py worker offbench ALGO MODE` or `peers.py worker peer ALGO CHECKOUT BLOCK`: set up, warm up,
    then answer `run N` lines on stdin with one JSON line {"cpu": s, "wall": s}."""
    side, algo = argv[0], argv[1]
    if side == "offbench":
        run, block = offbench_worker(algo, argv[2])
    elif algo == "rebrac":
        run, block = rebrac_worker(argv[2], int(argv[3]))
    elif algo == "idql":
        run, block = idql_worker(argv[2])
    elif algo == "edp":
        run, block = edp_worker(argv[2])
    else:
        run, block = jax_corl_worker(algo, argv[2], int(argv[3]))
    start = time.perf_counter()
    run(max(block, 2) * max(1, 20 // block))  # compilation and warm-up, not timed
    run(max(block, 2) * max(1, 20 // block))
    print(json.dumps({"ready": True, "block": block, "warmup_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        cpu, wall = time.process_time(), time.perf_counter()
        run(n)
        print(json.dumps({"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}), flush=True)


# ------------------------------------------------------------------ the driver
class Worker:
    def __init__(self, label: str, cmd: list[str], env: dict[str, str]):
        self.label, self.windows = label, []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.info: dict = {}

    def ready(self) -> None:
        """Wait for the worker's set-up and warm-up (the workers of a pair compile side by side)."""
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.label}: the worker stopped (its error is above)")
            if line.startswith("{"):
                return json.loads(line)

    def window(self, n: int) -> None:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        result = self._read()
        self.windows.append({"updates": n, **result})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def rates(windows: list[dict], key: str) -> list[float]:
    return [w["updates"] / w[key] for w in windows]


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-json", nargs="+", type=Path, default=[],
                        help="rebuild the table from the raw windows of earlier runs (their .json files) instead of measuring")
    parser.add_argument("--peer", nargs=3, action="append", metavar=("ALGO", "CHECKOUT", "PYTHON"), default=[],
                        help=f"a pair: ALGO in {sorted(ALGOS)}, the peer's checkout, the python of its JAX environment")
    parser.add_argument("--peer-pythonpath", action="append", default=[], help="extra PYTHONPATH entries for the peers")
    parser.add_argument("--peer-block", type=int, default=0, help="updates per jitted call (0: JAX-CORL's 8, ReBRAC 100)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], help="offbench modes to run")
    parser.add_argument("--windows", type=int, default=6, help="timed windows per implementation")
    parser.add_argument("--window", type=int, default=0, help="updates per window (0: 200, ReBRAC 100)")
    parser.add_argument("--out", type=Path, default=REPO / "results/perf/peers.md")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = [json.loads(path.read_text()) for path in args.from_json]
        args.windows = max(len(w["windows"]) for run in saved for r in run["results"] for w in r["workers"])
        write(args, [r for run in saved for r in run["results"]], [line for run in saved for line in run["failed"]])
        return 0
    if not args.peer:
        parser.error("name at least one pair with --peer ALGO CHECKOUT PYTHON (or rebuild a table with --from-json)")
    unknown = [algo for algo, *_ in args.peer if algo not in ALGOS]
    if unknown:
        parser.error(f"--peer: unknown ALGO {unknown}; choose from {sorted(ALGOS)}")
    env = {**os.environ, **ONE_THREAD}
    peer_env = {**env, "PYTHONPATH": os.pathsep.join(args.peer_pythonpath)}
    me = [sys.executable, str(Path(__file__).resolve()), "worker"]
    results: list[dict] = []
    failed: list[str] = []
    for algo, checkout, python in args.peer:
        window = args.window or (100 if algo == "rebrac" else 200)
        block = args.peer_block or {"rebrac": 100, "idql": 1, "edp": 1}.get(algo, 8)  # IDQL's, EDP's loops: one per call
        smallest = 1 if algo in ("iql", "idql", "edp") else 2  # TD3+BC's and ReBRAC's loops count their policy delay within a call
        blocks = [block] + ([smallest] if smallest != block else [])
        workers = [Worker(f"offbench {mode}", me + ["offbench", algo, mode], env) for mode in args.modes]
        peer_cmd = [python, str(Path(__file__).resolve()), "worker", "peer", algo, str(Path(checkout).resolve())]
        workers += [Worker(f"{PEER_NAMES[algo]} {b}/call", peer_cmd + [str(b)], peer_env) for b in blocks]
        try:
            for w in workers:
                w.ready()
            for i in range(args.windows):
                order = workers if i % 2 == 0 else workers[::-1]
                for w in order:
                    w.window(window - window % w.info["block"])
                print(f"{algo}: window {i + 1}/{args.windows}: "
                      + ", ".join(f"{w.label} {rates(w.windows, 'cpu')[-1]:.1f}" for w in workers), flush=True)
        except RuntimeError as error:  # one pair's failure is reported; the other pairs still run
            failed.append(f"{algo}: {error}")
            print(f"{algo}: {error}", file=sys.stderr, flush=True)
            continue
        finally:
            for w in workers:
                w.close()
        results.append({"algo": algo, "batch": ALGOS[algo], "peer": f"{PEER_NAMES[algo]} at {commit_of(checkout)}",
                        "workers": [{"label": w.label, "block": w.info["block"], "windows": w.windows} for w in workers]})
    write(args, results, failed)
    return 1 if failed else 0


def commit_of(checkout: str) -> str:
    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown commit"


def write(args: argparse.Namespace, results: list[dict], failed: list[str]) -> None:
    import torch

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = models[0] if models else cpu
    lines = [
        "# offbench against the JAX peers, per CPU core",
        "",
        f"Written by `benchmarks/peers.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {cpu}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, one thread per implementation, each a persistent process; "
        f"{args.windows} windows per implementation, alternated A B B A A B; compilation and warm-up not timed. "
        "Rates are updates per CPU second of the worker (all its threads); wall-clock rates beside them. "
        + (f"Table rebuilt from the saved windows ({', '.join(p.name for p in args.from_json)}); the machine's load is in the notes."
         if args.from_json else f"Load average while writing: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}."),
        "",
        "| algorithm | implementation | upd/call | upd/CPU-s median | spread (min-max) | upd/wall-s median | ratio offbench / best peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peers = [w for w in r["workers"] if not w["label"].startswith("offbench")]
        best = max(statistics.median(rates(w["windows"], "cpu")) for w in peers)
        for w in r["workers"]:
            cpu, wall = rates(w["windows"], "cpu"), rates(w["windows"], "wall")
            ratio = f"{statistics.median(cpu) / best:.2f}" if w["label"].startswith("offbench") else ""
            lines.append(f"| {r['algo']} (batch {r['batch']}) | {w['label']} | {w['block']} | {statistics.median(cpu):.1f} "
                         f"| {min(cpu):.1f}-{max(cpu):.1f} | {statistics.median(wall):.1f} | {ratio} |")
    lines += [f"- failed: {line}" for line in failed]
    lines += ["", "Peers: " + "; ".join(sorted({r["peer"] for r in results})) + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(lines) + "\n"
    notes = args.out.with_suffix(".notes.md")
    if notes.exists():  # what the numbers mean, written by hand, kept beside the table
        body += "\n" + notes.read_text()
    args.out.write_text(body)
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "failed": failed}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
