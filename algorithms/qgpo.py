"""QGPO: Q-Guided Policy Optimization (Lu, Chen, Chen, Su, Li & Zhu, "Contrastive Energy Prediction for
Exact Energy-Guided Diffusion Sampling in Offline Reinforcement Learning", ICML 2023, arXiv:2304.12824;
official code github.com/ChenDRAG/CEP-energy-guided-diffusion, folder Offline_RL_2D: train_behavior.py,
train_critic.py, diffusion_SDE/model.py, dataset/dataset.py).

The policy pi(a|s) ~ mu(a|s) exp(beta Q(s, a)) is sampled by guiding a diffusion behaviour model mu with
the gradient of an intermediate energy f_phi(a_t, t, s) that contrastive energy prediction (CEP) trains
to equal log E_{mu(a_0|a_t,s)} exp(beta Q(s, a_0)). Stages on one update counter:

1. behaviour (`behavior_steps` updates): SfBC's VP-SDE score model (alpha_t = exp(-t^2 (b1 - b0)/4
   - t b0/2), b0 = 0.1, b1 = 20), min E_{t ~ U(1e-3, 1), z, (s,a)} || eps_theta(alpha_t a + sigma_t z, t, s) - z ||^2.
2. support actions, once, when the behaviour stage ends: M behaviour samples a^1..a^M for every dataset
   state s and M more for every next state s' (DPM-Solver++, 15 steps, no guidance).
3. critic and energy, each update on the same rows:
   Q (the first `q_steps` updates of this stage): in-support softmax Q-learning,
       y = r + gamma (1 - d) sum_j softmax_j(beta_Q Q'(s', a'_j)) Q'(s', a'_j),   Q' = min of the target twins,
       loss = mean over the twins of (Q_k(s, a) - y)^2, then target <- target + 0.005 (Q - target);
   f_phi (every update): one t ~ U(1e-3, 1) per state, shared by its M candidates, a_t^i = alpha_t a^i + sigma_t z^i,
       p_i = softmax_i(beta Q'(s, a^i)),   loss = - E_s sum_i p_i log softmax_i f_phi(a_t^i, t, s).
4. acting: DPM-Solver++ on the guided noise model
       eps_guided(a_t, t, s) = eps_theta(a_t, t, s) - scale * sigma_t * grad_a f_phi(a_t, t, s)
   (the official code hands the solver -sigma_t (score + scale grad f), score = -eps_theta / sigma_t);
   one sample per state.

Settings (official code): behaviour net SfBC's "ScoreNet" (algorithms/sfbc.py), Adam 1e-4, batch 4096,
600 epochs x 1000 = 600k updates; Q: twin 3 x 256 ReLU MLPs; f_phi: Gaussian Fourier time features (32,
scale 30) -> Linear(32, 32), concatenated with [a_t, s] -> 4 x 256 SiLU -> 1; Adam 3e-4 for both, batch
256, 100 epochs x 10,000 = 1M updates of f_phi, Q only in the first 50 epochs (500k); gamma 0.99, Polyak
0.005; beta (`--alpha`) 3; beta_Q (`--q_alpha`) 1, as the README's reproduce command passes (the code's
default is beta_Q = beta); M = 16 on locomotion, 32 on AntMaze; 15 solver steps of order 2 in data-prediction
form (DPM-Solver++); rewards r * 1000 / (max - min episode return) on locomotion, r - 1 on AntMaze; raw
observations.

Guidance scale: the official code evaluates every scale of {0, 1, 2, 3, 5, 8, 10} (locomotion) or
{1, 1.5, 2, 2.5, 3, 4} (AntMaze) at every evaluation; the scale behind each paper number is not
published. Here it is one setting, `guidance_scale`, default 1.0 (the code's `QGPO_Critic.guidance_scale`
between its sweeps); configs/tasks/qgpo/ holds per-task values from a third party, labelled as such.
The official sweep is available only as the explicitly labelled extra callback `ScaleSweep` (below),
which evaluates each scale separately and writes scale_sweep.json; it never replaces result.json's scores.

Verified against the official code: tests/test_golden_qgpo.py loads weights into this module that were also
run through the official code, feeds in the official run's recorded random draws (`QGPODraws`, `act(noise=)`) and
compares the behaviour loss and one behaviour update, the guided noise handed to the solver, the samples of
`act` and of the support actions at the default settings, first-order samples, and one critic iteration
(in-support softmax Q step, Polyak step, CEP step) in float32 and float64 (tests/data/golden/README.md, part
"QGPO").

Deviations and choices:
- solver (`solver_form`): "data" (default), the official code's: singlestep DPM-Solver++ in data-prediction
  form (Lu et al. 2022b, arXiv:2211.01095; the code's `DPM_Solver(predict_x0=True)`) of order 2 with 15 steps
  on the time-uniform grid 1 -> 1e-3, split into 7 second-order steps and 1 first-order step, intermediate
  times t(lambda_s + r1 h), and the code's split of an even number of steps, [2] * (K - 2) + [1, 1]
  (K = steps / 2 + 1). The golden test shows `act` and the support actions equal to the official samples to
  round-off. "noise": the suite's previous behaviour, DPM-Solver in noise-prediction form (Lu et al. 2022,
  arXiv:2206.00927), the generic "DPM-Solver" the paper names, with upstream DPM-Solver's even split
  [2] * (steps / 2); same grid and first-order steps, different second-order ones (15-18 % apart on the golden
  test's untrained models; not measured on trained ones). Both forms serve the support actions and acting.
  Samples (support actions and actions) are clipped to the action bounds (the code leaves them unclipped).
- noise parametrisation: the behaviour net predicts the noise eps. The official one outputs h with
  score = h / sigma_t and is trained so that h = -eps: the same model, with its last layer negated. The code's
  sigma_t = sqrt(1 - exp(2 log alpha_t)) loses digits in float32 near t = 1e-3. Here expm1 is used (the same
  value in exact arithmetic).
- batch sizes: the DataModule's batch (4096) feeds the behaviour stage; the critic stage uses the first
  `critic_batch_size` (256) of its rows, which are uniform draws as well (the code's DataLoader shuffles
  every epoch, i.e. draws without replacement within an epoch).
- the support actions are not checkpointed (2 x N x M x act_dim floats: 1.5 GB on halfcheetah-medium-
  expert): they are drawn from a stored seed in a forked RNG, so a resumed run redraws exactly the same
  ones with the (frozen) behaviour model; the training RNG sees only the seed's one draw.
- the energy model's Fourier features are a buffer (the code keeps them as a parameter without grad).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from algorithms.sfbc import ScoreNet
from offbench import settings as check
from offbench.batch import Batch, Transitions
from offbench.diffusion import ScoreDiffusion, SolverForm, repeat_rows
from offbench.diffusion.solvers import check_form
from offbench.evaluation import EvalCallback
from offbench.files import write_json_atomic
from offbench.module import OfflineRLModule, compilable, soft_update
from offbench.nets import CriticEnsemble, mlp


class EnergyNet(nn.Module):
    """f_phi(a_t, t, s): the official "GuidanceQt", an MLP on [a_t, time features, s]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256, 256, 256), embed_dim: int = 32):
        super().__init__()
        self.register_buffer("fourier", torch.randn(embed_dim // 2) * 30.0)
        self.t_embed = nn.Linear(embed_dim, embed_dim)
        self.net = mlp(act_dim + embed_dim + obs_dim, 1, tuple(hidden), nn.SiLU)

    def forward(self, a: Tensor, t: Tensor, s: Tensor) -> Tensor:
        proj = t[:, None] * self.fourier[None, :] * 2 * math.pi
        emb = self.t_embed(torch.cat([proj.sin(), proj.cos()], -1))
        return self.net(torch.cat([a, emb, s], -1)).squeeze(-1)


class GuidedNoise(nn.Module):
    """eps_guided(x, t, s) = eps(x, t, s) - scale * sigma_t * grad_x f(x, t, s): the noise model that
    samples mu(a|s) exp(scale * f) when passed to the solver (scale 0: eps itself, no gradient)."""

    def __init__(self, eps_model: nn.Module, energy: nn.Module, sigma: Callable[[Tensor], Tensor], scale: float):
        super().__init__()
        self.eps_model, self.energy, self.sigma, self.scale = eps_model, energy, sigma, scale

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        eps = self.eps_model(x, t, s)
        if self.scale == 0:
            return eps
        with torch.enable_grad():  # the solver runs under no_grad
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy(x, t, s).sum(), x)
        return eps - self.scale * self.sigma(t)[:, None] * grad


def softmax_value(q: Tensor, beta: float) -> Tensor:
    """sum_j softmax_j(beta q_j) q_j over the last dim: the in-support soft value of candidates' Qs."""
    return (torch.softmax(beta * q, -1) * q).sum(-1)


def contrastive_energy_loss(f: Tensor, q: Tensor, beta: float) -> Tensor:
    """CEP: - mean over states of sum_i softmax_i(beta q_i) log softmax_i(f_i), for (B, M) energies f of
    the noised candidates and (B, M) Q-values q of the clean ones."""
    return -(torch.softmax(beta * q, -1) * torch.log_softmax(f, -1)).sum(-1).mean()


class QGPODraws(NamedTuple):
    """The random draws of one update, in the order the official code consumes them. Training leaves
    them None (drawn on the device); tests pass the official run's recorded draws."""

    behavior_u: Tensor | None = None  # (B,) uniforms of the behaviour loss's times t = u (1 - 1e-3) + 1e-3
    behavior_noise: Tensor | None = None  # (B, act_dim) its noise z
    energy_u: Tensor | None = None  # (critic_batch_size,) uniforms of CEP's times, one per state
    energy_noise: Tensor | None = None  # (critic_batch_size * n_support, act_dim) its noise, state-major


NO_DRAWS = QGPODraws()  # training: every draw made on the device


class QGPO(OfflineRLModule):
    needs_dataset_rows = True  # reads support actions per dataset row by Batch.idx
    unbatchable = ("its support-action stage reads the stored seed on the host (int(tensor)) and draws in a forked "
                   "RNG, which vmap cannot run")  # seeds as one computation: offbench/seeds.py

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        behavior_steps: int = 600_000,
        q_steps: int = 500_000,
        behavior_lr: float = 1e-4,
        critic_lr: float = 3e-4,
        energy_lr: float = 3e-4,
        critic_batch_size: int = 256,
        critic_hidden: tuple[int, ...] = (256, 256, 256),
        energy_hidden: tuple[int, ...] = (256, 256, 256, 256),
        gamma: float = 0.99,
        tau: float = 0.005,
        beta: float = 3.0,
        beta_q: float = 1.0,
        n_support: int = 16,
        guidance_scale: float = 1.0,
        solver_steps: int = 15,
        solver_order: int = 2,
        solver_form: SolverForm = "data",
        support_chunk: int = 4096,
    ) -> None:
        """QGPO: diffusion sampling guided by an energy (CEP) (equations, settings: algorithms/qgpo.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            behavior_steps: updates of stage 1, the behaviour model (official 600k; 0: no behaviour stage, e.g. a
                model loaded).
            q_steps: the first updates of the critic stage that also train Q (official 500k; f_phi trains on
                every update of the stage).
            behavior_lr: Adam learning rate of the behaviour model (official 1e-4).
            critic_lr: Adam learning rate of the twin Qs (official 3e-4).
            energy_lr: Adam learning rate of the energy model f_phi (official 3e-4).
            critic_batch_size: rows of each critic-stage update, the first of the batch (official 256).
            critic_hidden: hidden widths of the twin Qs (ReLU MLPs; official 3 x 256).
            energy_hidden: hidden widths of the energy model f_phi (SiLU MLP; official 4 x 256).
            gamma: discount gamma of the Q target y (official 0.99).
            tau: Polyak rate of the Q targets (official 0.005).
            beta: beta in pi ~ mu exp(beta Q) and CEP's labels softmax(beta Q') (official `--alpha` 3; 0: uniform
                labels, the unguided behaviour policy).
            beta_q: beta_Q of the in-support softmax Q-learning target (official 1 as the README's command
                passes; the code's default is beta_Q = beta).
            n_support: M support actions per dataset state and next state (official 16 on locomotion, 32 on
                AntMaze; at least 2).
            guidance_scale: scale of grad_a f_phi in the guided noise (1.0: the code's value between its sweeps;
                0: the behaviour model unguided).
            solver_steps: DPM-Solver steps of the support actions and of acting (official 15).
            solver_order: DPM-Solver order, 1, 2 or 3 (official 2).
            solver_form: "data": DPM-Solver++ in data-prediction form (official code); "noise": DPM-Solver in
                noise-prediction form.
            support_chunk: states per chunk when the support actions are drawn (bounds memory).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.integer("behavior_steps", behavior_steps, low=0, note=" (0: no behaviour stage, e.g. a model loaded)")
        check.integer("q_steps", q_steps)  # 0 would train f_phi on an untrained Q
        check.learning_rate("behavior_lr", behavior_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.learning_rate("energy_lr", energy_lr)
        check.integer("critic_batch_size", critic_batch_size)
        check.widths("critic_hidden", critic_hidden)
        check.widths("energy_hidden", energy_hidden)
        check.interval("gamma", gamma, "[0, 1)")
        check.interval("tau", tau, "(0, 1]")
        # beta, beta_q multiply Q inside softmaxes (inverse temperatures): 0 gives uniform weights
        check.non_negative("beta", beta, " (0: uniform labels, the unguided behaviour policy)")
        check.non_negative("beta_q", beta_q, " (0: the support actions' mean Q)")
        # CEP contrasts the support actions of a state: with one, log softmax is 0 and f_phi learns nothing
        check.integer("n_support", n_support, low=2, note=" (contrastive energy prediction compares support actions)")
        check.non_negative("guidance_scale", guidance_scale, " (0: the behaviour model unguided)")
        check.integer("solver_steps", solver_steps)
        check.one_of("solver_order", solver_order, (1, 2, 3))
        check.integer("support_chunk", support_chunk)
        super().__init__()
        check_form(solver_form)  # data (DPM-Solver++, the official code's) or noise (DPM-Solver)
        self.save_hyperparameters()
        self.behavior = ScoreDiffusion(ScoreNet(obs_dim, act_dim), act_dim, max_action, t_eps=1e-3)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=2, hidden=tuple(critic_hidden))
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.energy = EnergyNet(obs_dim, act_dim, tuple(energy_hidden))
        self.register_buffer("support_seed", torch.tensor(-1, dtype=torch.long))  # -1: not drawn yet
        empty = torch.zeros(0, n_support, act_dim)
        self.register_buffer("support", empty, persistent=False)  # (N, M, act_dim) behaviour samples at s
        self.register_buffer("support_next", empty.clone(), persistent=False)  # ... at s'

    # --- the dataset's rows ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        total = (self.trainer.max_epochs or 0) * dm.eval_every  # the run's updates (offbench fit's --updates)
        if total > self.hparams.behavior_steps and dm.batch_size < self.hparams.critic_batch_size:
            raise ValueError(
                f"QGPO: critic_batch_size {self.hparams.critic_batch_size} is larger than the batch size {dm.batch_size}; "
                "the critic stage uses the first critic_batch_size rows of each batch. Set --data.batch_size to at least "
                "that, or lower --model.init_args.critic_batch_size."
            )
        self.set_dataset(dm.transitions, dm.normalize_obs)

    def set_dataset(self, t: Transitions, normalize: Callable[[Tensor], Tensor] = lambda x: x) -> None:
        """Keep the rows on the module's device (observations normalised as the DataModule does): the
        critic stage reads a row's support actions and the row itself by its index."""
        def put(x: np.ndarray) -> Tensor:
            return torch.as_tensor(x, dtype=torch.float32, device=self.support.device)

        for name, value in {"obs": normalize(put(t.obs)), "act": put(t.act), "rew": put(t.rew),
                            "next_obs": normalize(put(t.next_obs)), "done": put(t.done)}.items():
            self.register_buffer(f"data_{name}", value, persistent=False)

    @torch.no_grad()
    def draw_support(self) -> None:
        """M behaviour samples for every dataset state and next state, in chunks of `support_chunk`
        states, from the stored seed in a forked RNG (drawn now from the training RNG if not yet set)."""
        hp = self.hparams
        if int(self.support_seed) < 0:
            self.support_seed.fill_(int(torch.randint(0, 2**62, ())))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.support_seed))
            for name, states in (("support", self.data_obs), ("support_next", self.data_next_obs)):
                chunks = [self.behavior.sample(repeat_rows(c, hp.n_support), hp.solver_steps, hp.solver_order,
                                               form=hp.solver_form) for c in states.split(hp.support_chunk)]
                setattr(self, name, torch.cat(chunks).view(len(states), hp.n_support, hp.act_dim))

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        self.behavior_opt = torch.optim.Adam(self.behavior.parameters(), lr=hp.behavior_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=hp.critic_lr)
        self.energy_opt = torch.optim.Adam(self.energy.parameters(), lr=hp.energy_lr)
        return [self.behavior_opt, self.critic_opt, self.energy_opt]

    def update(self, batch: Batch, draws: QGPODraws = NO_DRAWS) -> dict[str, Tensor]:
        hp = self.hparams
        # 1. behaviour model: denoising score matching on the whole batch
        if self.step < hp.behavior_steps:
            return self.behavior_update(batch, draws.behavior_u, draws.behavior_noise)
        # 2. support actions: once when the stage starts (and again, identical, after a resume)
        if len(self.support) == 0:
            if not hasattr(self, "data_obs"):
                raise RuntimeError("QGPO needs the dataset's rows before its critic stage: call set_dataset (setup does)")
            self.draw_support()
        idx = self.critic_rows(batch)
        # 3. Q by in-support softmax Q-learning (first q_steps updates of the stage), then f_phi by CEP
        metrics = self.critic_update(idx) if self.step - hp.behavior_steps < hp.q_steps else {}
        return {**metrics, **self.energy_update(idx, draws.energy_u, draws.energy_noise)}

    def critic_rows(self, batch: Batch) -> Tensor:
        """Row indices of the critic stage: the first critic_batch_size rows of the batch, or rows drawn
        here, as the DataModule's sampler draws them, for a batch made by hand (no `idx`)."""
        n = self.hparams.critic_batch_size
        if batch.idx is None:
            return torch.randint(len(self.data_obs), (n,), device=self.data_obs.device)
        if len(batch.idx) < n:
            raise ValueError(f"QGPO: critic_batch_size {n} is larger than the batch ({len(batch.idx)} rows); "
                             "raise --data.batch_size or lower --model.init_args.critic_batch_size")
        return batch.idx[:n]

    @compilable
    def behavior_update(self, batch: Batch, u: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
        """One step of the behaviour model on the batch (`u`, `noise`: the loss's draws, see QGPODraws)."""
        loss = self.behavior.loss(batch.obs, batch.act, u, noise)
        self.optimize(self.behavior_opt, loss)
        return {"loss/behavior": loss}

    @compilable
    def critic_update(self, idx: Tensor) -> dict[str, Tensor]:
        """In-support softmax Q-learning on rows idx, then the targets' Polyak step."""
        hp = self.hparams
        with torch.no_grad():
            next_act = self.support_next[idx]  # (B, M, act_dim)
            next_q = self.critic_target(repeat_rows(self.data_next_obs[idx], hp.n_support),
                                        next_act.reshape(-1, hp.act_dim)).amin(0).view(len(idx), hp.n_support)
            y = self.data_rew[idx] + hp.gamma * (1.0 - self.data_done[idx]) * softmax_value(next_q, hp.beta_q)
        q = self.critic(self.data_obs[idx], self.data_act[idx])  # (2, B)
        loss = (q - y).pow(2).mean()  # the twins' MSEs, averaged
        self.optimize(self.critic_opt, loss)
        soft_update(self.critic_target, self.critic, hp.tau)
        return {"loss/critic": loss, "q/mean": q.mean()}

    @compilable
    def energy_update(self, idx: Tensor, u: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Contrastive energy prediction on the support actions of rows idx, labelled by the target Q
        (`u`, `noise`: the draws, see QGPODraws)."""
        hp = self.hparams
        n, m = len(idx), hp.n_support
        obs, act = repeat_rows(self.data_obs[idx], m), self.support[idx].reshape(-1, hp.act_dim)
        with torch.no_grad():
            q = self.critic_target(obs, act).amin(0).view(n, m)
        if u is None:
            u = torch.rand(n, device=idx.device)
        t = (u * (1.0 - 1e-3) + 1e-3).repeat_interleave(m)  # one t per state
        z = torch.randn_like(act) if noise is None else noise
        a_t = self.behavior.log_alpha(t).exp()[:, None] * act + self.behavior.sigma(t)[:, None] * z
        loss = contrastive_energy_loss(self.energy(a_t, t, obs).view(n, m), q, hp.beta)
        self.optimize(self.energy_opt, loss)
        return {"loss/energy": loss}

    # --- acting ---------------------------------------------------------------------------------
    def guided(self, scale: float) -> ScoreDiffusion:
        """The behaviour model's solver around the guided noise model (shares every weight)."""
        b = self.behavior
        return ScoreDiffusion(GuidedNoise(b.model, self.energy, b.sigma, scale), b.act_dim, b.max_action,
                              b.beta_0, b.beta_1, b.t_end, b.t_eps)

    @torch.no_grad()
    def act(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """One sample of mu(a|s) exp(scale f) per state: the solver (`solver_form`) on eps_guided (`noise`
        (n, act_dim): the solver's initial draw; by default drawn on the device)."""
        hp = self.hparams
        return self.guided(hp.guidance_scale).sample(obs, hp.solver_steps, hp.solver_order, noise=noise,
                                                     form=hp.solver_form)


class ScaleSweep(EvalCallback):
    """OPTIONAL, NOT the default protocol: the official code's evaluation, which evaluates every guidance
    scale in `scales` at each evaluation. Add it with
        --trainer.callbacks+=algorithms.qgpo.ScaleSweep --trainer.callbacks.init_args.scales [0,1,2,3,5,8,10]
    Each scale is evaluated on the same episodes as the main evaluation (same seeds); scores are logged as
    `sweep/score_s<scale>` and written to scale_sweep.json per scale (last, best, final_mean). Picking the
    best scale afterwards is model selection on the evaluation episodes: an optimistic number, reported
    apart from result.json, whose scores stay those of the configured `guidance_scale`."""

    def __init__(self, scales: list[float], episodes: int | None = None, num_envs: int = 10, final_mean_k: int = 5,
                 seed: int = 10_000) -> None:
        super().__init__(episodes, num_envs, final_mean_k=final_mean_k, seed=seed)
        if not scales:
            raise ValueError("ScaleSweep needs at least one scale, e.g. --trainer.callbacks.init_args.scales [0,1,2,3]")
        self.scales = [float(s) for s in scales]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, QGPO):
            raise TypeError(f"ScaleSweep evaluates QGPO's guidance scales; the module is {type(pl_module).__name__}")
        configured = pl_module.hparams.guidance_scale
        entry: dict[str, Any] = {"updates": int(pl_module.updates)}
        try:
            for scale in self.scales:
                pl_module.hparams.guidance_scale = scale
                entry[str(scale)] = self.run_evaluation(trainer, pl_module)["score"]
                pl_module.log(f"sweep/score_s{scale:g}", entry[str(scale)], on_step=False, on_epoch=True)
        finally:
            pl_module.hparams.guidance_scale = configured
        self.history.append(entry)

    def write_result(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        if not self.history:
            return None
        k = min(self.final_mean_k, len(self.history))
        per_scale = {}
        for scale in self.scales:
            scores = [h[str(scale)] for h in self.history]
            per_scale[str(scale)] = {"last": scores[-1], "best": max(scores), "final_mean": sum(scores[-k:]) / k}
        body = {
            "note": "OPTIONAL guidance-scale sweep (the official QGPO evaluation), NOT the suite's protocol: choosing "
            "the best scale on these scores is model selection on the evaluation episodes (optimistic).",
            "configured_guidance_scale": pl_module.hparams.guidance_scale,
            "scales": per_scale,
            "history": self.history,
        }
        return str(write_json_atomic(f"{trainer.default_root_dir}/scale_sweep.json", body))
