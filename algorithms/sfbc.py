"""SfBC: Selecting from Behavior Candidates (Chen, Lu, Ying, Su & Zhu, "Offline Reinforcement Learning
via High-Fidelity Generative Behavior Modeling", ICLR 2023, arXiv:2209.14548; official code
github.com/ChenDRAG/SfBC: train_behavior.py, train_critic.py, dataset/dataset.py, diffusion_SDE/).

The policy is never trained: pi(a|s) ~ mu(a|s) exp(alpha Q(s, a)) is realised by sampling M actions
from a diffusion behaviour model mu and resampling them with weights exp(alpha Q). Three stages, run
one after the other on the update counter:

1. behaviour (`behavior_steps` updates): a VP-SDE score model of the data's actions,
   min E_{t, z, (s,a)} || eps_theta(alpha_t a + sigma_t z, t, s) - z ||^2, sampled with DPM-Solver
   (`solver_steps` = 15 model evaluations: the "T = 15" of the DiffCPS paper's Table 2).
2. implicit in-sample planning (`planning_iterations` = K rounds of `critic_steps` updates): Q is fitted
   by regression on returns R along the dataset's own trajectories, min E (Q(s_t, a_t) - R_t)^2, with
       round 0:  R_t = r_t + gamma (1 - end_t) R_{t+1}                    (Monte-Carlo returns)
       round k:  R_t = r_t + gamma (1 - d_t) max(R_{t+1}, V(s_{t+1}))    (paper; V alone where the
                 episode was cut by a timeout),  V(s) = sum_m softmax(alpha_V Q(s, a_m)) Q(s, a_m)
                 over N behaviour candidates a_m ~ mu(.|s), Q of round k - 1;
   the critic is reset to its initial weights (and Adam's state cleared) before each new round.
3. acting: M candidates, k of them drawn without replacement with probabilities softmax(alpha Q),
   their mean is the action.

Settings (official code): behaviour net "ScoreNet" (below), Adam 1e-4, batch 4096, 600 epochs of 4M
samples (about 586k updates; here 600k); critic 2 x 256 SiLU ("MlpQnet"; 512-256-256 on antmaze-large),
Adam 1e-3, batch 4096, one round = 100 epochs of 1M samples (2M on AntMaze): about 24.4k (48.8k)
updates, here 25k (50k); K = 2; returns z-scored (std floored at 0.1) for the regression; gamma 0.99;
N = 16 candidates with alpha_V = 20 for V; evaluation M = 32, alpha = 100, k = 4 on locomotion and 1
on AntMaze; no reward tuning, no observation normalisation.

Deviations and choices:
- the planning recursion follows the paper (`planning="paper"`). The code computes
  R_t = max(r_t + gamma (1 - end_t) R_{t+1}, V(s_t)): a max with the current state's value that also
  bootstraps 0 at timeouts; `planning="code"` gives that.
- DPM-Solver: the code's singlestep "DPM-Solver-fast" of order 3 on a time-uniform grid 1 -> 1e-3, as
  here (`solver_order` 1 or 2 also offered); samples are clipped to the action bounds (the code leaves
  them unclipped); V's candidates are drawn afresh each round (the code caches one draw).
- the final round is `critic_steps` long (the code's last round is one epoch shorter); updates after
  the schedule keep fitting the last round's targets.
- the critic stage looks the planned returns up by the batch's row indices (`batch.idx`). The
  dataset's rows are read in `setup` (which Lightning runs
  before restoring a checkpoint, so the `returns` buffer already has its size). The code's AntMaze
  data fixes (dropping episodes shorter than 5 steps, relabelling antmaze-medium-play-v2) are not
  applied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from offbench import settings as check
from offbench.batch import Batch, Transitions
from offbench.diffusion import ScoreDiffusion, repeat_rows, resample
from offbench.module import OfflineRLModule, compilable
from offbench.nets import CriticEnsemble


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, emb_dim: int = 128):
        super().__init__()
        self.dense1 = nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU())
        self.dense2 = nn.Sequential(nn.Linear(out_dim, out_dim), nn.SiLU())
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_dim))
        self.skip = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.dense2(self.dense1(x) + self.time(emb)) + self.skip(x)


class ScoreNet(nn.Module):
    """SfBC's behaviour network: Gaussian Fourier time features (fixed, scale 30) and a state embedding
    mixed into a 128-d code that conditions a U-shaped stack of residual blocks 512-256-128-128-256-512."""

    def __init__(self, obs_dim: int, act_dim: int, embed_dim: int = 32):
        super().__init__()
        self.register_buffer("fourier", torch.randn(embed_dim // 2) * 30.0)
        self.t_embed = nn.Linear(embed_dim, embed_dim)
        self.cond = nn.Sequential(nn.Linear(obs_dim, 32), nn.SiLU())
        self.mix = nn.Sequential(nn.Linear(32 + embed_dim, 128), nn.SiLU(), nn.Linear(128, 128))
        self.down = nn.ModuleList([ResidualBlock(act_dim, 512), ResidualBlock(512, 256), ResidualBlock(256, 128)])
        self.middle = ResidualBlock(128, 128)
        self.up = nn.ModuleList([ResidualBlock(256, 256), ResidualBlock(512, 512)])
        self.last = nn.Linear(1024, act_dim)

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        proj = t[:, None] * self.fourier[None, :] * 2 * math.pi
        emb = self.mix(torch.cat([self.cond(s), self.t_embed(torch.cat([proj.sin(), proj.cos()], -1))], -1))
        d1 = self.down[0](x, emb)
        d2 = self.down[1](d1, emb)
        d3 = self.down[2](d2, emb)
        u2 = self.up[0](torch.cat([d3, self.middle(d3, emb)], -1), emb)
        u1 = self.up[1](torch.cat([d2, u2], -1), emb)
        return self.last(torch.cat([d1, u1], -1))


def plan_returns(rew: Tensor, not_done: Tensor, has_next: Tensor, gamma: float, value: Tensor | None = None,
                 rule: Literal["paper", "code"] = "paper") -> Tensor:
    """Returns R (E, L) along padded episodes (E, L), backwards in time; `has_next[e, j]`: row j + 1 is
    the next step of the same episode. Without `value`: Monte-Carlo returns (0 after an episode's last
    row). "paper": R_j = r_j + gamma (1 - d_j) max(R_{j+1}, V_j), `value` = V(s_{j+1}) (V alone where
    no next row exists). "code": R_j = max(r_j + gamma has_next_j R_{j+1}, V_j), `value` = V(s_j)."""
    R = torch.zeros_like(rew)
    nxt = torch.zeros_like(rew[:, 0])
    for j in reversed(range(rew.shape[1])):
        if rule == "paper":
            v = torch.zeros_like(nxt) if value is None else value[:, j]
            cont = torch.where(has_next[:, j], nxt if value is None else torch.maximum(nxt, v), v)
            R[:, j] = rew[:, j] + gamma * not_done[:, j] * cont
        else:
            R[:, j] = rew[:, j] + gamma * has_next[:, j] * nxt
            if value is not None:
                R[:, j] = torch.maximum(R[:, j], value[:, j])
        nxt = R[:, j]
    return R


class SfBC(OfflineRLModule):
    needs_dataset_rows = True  # reads planned returns per dataset row by Batch.idx
    unbatchable = ("its planning rounds replace every row's planned return (a plain tensor attribute, one for all "
                   "copies) and clear the critic optimiser's state")  # seeds as one computation: offbench/seeds.py

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        max_action: float = 1.0,
        behavior_steps: int = 600_000,
        critic_steps: int = 25_000,
        planning_iterations: int = 2,
        behavior_lr: float = 1e-4,
        critic_lr: float = 1e-3,
        critic_hidden: tuple[int, ...] = (256, 256),
        gamma: float = 0.99,
        solver_steps: int = 15,
        solver_order: int = 3,
        n_planning_candidates: int = 16,
        planning_alpha: float = 20.0,
        planning: Literal["paper", "code"] = "paper",
        n_eval_candidates: int = 32,
        eval_alpha: float = 100.0,
        n_select: int = 4,
        normalize_returns: bool = True,
        reset_critic: bool = True,
        planning_chunk: int = 4096,
    ) -> None:
        """SfBC: behaviour candidates resampled by Q (equations, settings: algorithms/sfbc.py).

        Args:
            obs_dim: observation size; `offbench fit` takes it from the data.
            act_dim: action size; `offbench fit` takes it from the data.
            max_action: action bound, actions lie in [-max_action, max_action]; `offbench fit` takes it from the data.
            behavior_steps: updates of stage 1, the behaviour model (official about 586k; 0: no behaviour
                stage, e.g. a model loaded).
            critic_steps: updates per planning round of the critic (official about 24.4k, 48.8k on AntMaze).
            planning_iterations: K, the number of planning rounds (official 2; 1: Monte-Carlo returns only).
            behavior_lr: Adam learning rate of the behaviour model (official 1e-4).
            critic_lr: Adam learning rate of the critic Q (official 1e-3).
            critic_hidden: hidden widths of the critic Q (SiLU MLP; official 2 x 256, 512-256-256 on antmaze-large).
            gamma: discount gamma of the returns R_t (official 0.99).
            solver_steps: DPM-Solver model evaluations per behaviour sample (official 15).
            solver_order: DPM-Solver order, 1, 2 or 3 (official 3).
            n_planning_candidates: N behaviour candidates a_m per state for V (official 16).
            planning_alpha: alpha_V of V's softmax weights (official 20; 0: V is the candidates' mean Q).
            planning: the return recursion of rounds k >= 1: "paper", max(R_{t+1}, V(s_{t+1})), or "code",
                max(r_t + gamma R_{t+1}, V(s_t)).
            n_eval_candidates: M behaviour candidates per state at evaluation (official 32).
            eval_alpha: alpha of the evaluation's probabilities softmax(alpha Q) (official 100; 0: uniform choice).
            n_select: k candidates drawn without replacement whose mean is the action (official 4 on locomotion,
                1 on AntMaze).
            normalize_returns: z-score the returns for the critic's regression, std floored at 0.1 (official true).
            reset_critic: reset the critic to its initial weights (and clear Adam's state) before each new round;
                false: the next round starts from the last round's critic.
            planning_chunk: states per chunk when V is computed over the dataset (bounds memory).
        """
        check.env_sizes(obs_dim, act_dim, max_action)
        check.integer("behavior_steps", behavior_steps, low=0, note=" (0: no behaviour stage, e.g. a model loaded)")
        check.integer("critic_steps", critic_steps)
        check.integer("planning_iterations", planning_iterations, note=" (1: Monte-Carlo returns only)")
        check.learning_rate("behavior_lr", behavior_lr)
        check.learning_rate("critic_lr", critic_lr)
        check.widths("critic_hidden", critic_hidden)
        check.interval("gamma", gamma, "[0, 1)")
        check.integer("solver_steps", solver_steps)
        check.one_of("solver_order", solver_order, (1, 2, 3))
        check.integer("n_planning_candidates", n_planning_candidates)
        check.non_negative("planning_alpha", planning_alpha, " (0: V is the candidates' mean Q)")
        check.integer("n_eval_candidates", n_eval_candidates)
        check.non_negative("eval_alpha", eval_alpha, " (0: a uniform choice among the behaviour candidates)")
        check.integer("n_select", n_select, high=n_eval_candidates, note=" (at most n_eval_candidates)")
        check.integer("planning_chunk", planning_chunk)
        super().__init__()
        self.save_hyperparameters()
        self.behavior = ScoreDiffusion(ScoreNet(obs_dim, act_dim), act_dim, max_action)
        self.critic = CriticEnsemble(obs_dim, act_dim, n=1, hidden=tuple(critic_hidden), activation=nn.SiLU)
        self.critic_init = copy.deepcopy(self.critic).requires_grad_(False)  # the weights each round restarts from
        self.register_buffer("returns", torch.zeros(0))  # R_t of every dataset row, sized by set_dataset
        self.register_buffer("ret_mean", torch.zeros(()))
        self.register_buffer("ret_std", torch.ones(()))

    # --- the dataset's trajectories -----------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.set_dataset(dm.transitions, dm.normalize_obs)

    def set_dataset(self, t: Transitions, normalize: Callable[[Tensor], Tensor] = lambda x: x) -> None:
        """Keep the rows (observations normalised as the DataModule does), pad them into episodes
        (E, L) for the planning recursion and set the round-0 (Monte-Carlo) returns."""
        def put(x: np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.as_tensor(x, dtype=dtype, device=self.returns.device)

        starts = np.flatnonzero(np.r_[True, np.diff(t.episode) != 0])
        lengths = np.diff(np.r_[starts, len(t)])
        pos = np.full((len(starts), lengths.max()), len(t), dtype=np.int64)  # index len(t): padding
        for e, (s0, n) in enumerate(zip(starts, lengths)):
            pos[e, :n] = np.arange(s0, s0 + n)
        succ = np.r_[(t.episode[1:] == t.episode[:-1]) & (t.step[1:] == t.step[:-1] + 1), False]
        for name, value in {
            "obs": normalize(put(t.obs)), "act": put(t.act), "next_obs": normalize(put(t.next_obs)),
            "rew": put(t.rew), "not_done": 1.0 - put(t.done), "has_next": put(succ, torch.bool), "pos": put(pos, torch.long),
            "flat": put(np.flatnonzero(pos < len(t)), torch.long),  # rows' places in the padded (E, L) layout
        }.items():
            self.register_buffer(f"data_{name}", value, persistent=False)
        self.returns = self._set_stats(self._plan(None))

    def _pad(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(1)])[self.data_pos]

    def _plan(self, value: Tensor | None) -> Tensor:
        """Flat returns (N,) of the recursion, `value` (N,) in return units or None (round 0)."""
        R = plan_returns(self._pad(self.data_rew), self._pad(self.data_not_done), self._pad(self.data_has_next),
                         self.hparams.gamma, None if value is None else self._pad(value), self.hparams.planning)
        return R.view(-1)[self.data_flat]  # a gather, not a boolean mask: no host sync

    def _set_stats(self, returns: Tensor) -> Tensor:
        if self.hparams.normalize_returns:
            self.ret_mean = returns.mean()
            self.ret_std = returns.std(correction=0).clamp_min(0.1)
        return returns

    @torch.no_grad()
    def state_value(self, states: Tensor) -> Tensor:
        """V(s) = sum_m softmax(alpha_V Q(s, a_m)) Q(s, a_m) over behaviour candidates, in return units."""
        hp, values = self.hparams, []
        for chunk in states.split(hp.planning_chunk):
            s = repeat_rows(chunk, hp.n_planning_candidates)
            q = self.critic(s, self.behavior.sample(s, hp.solver_steps, hp.solver_order)).view(len(chunk), -1)
            values.append((torch.softmax(hp.planning_alpha * q, -1) * q).sum(-1))
        return torch.cat(values) * self.ret_std + self.ret_mean

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "returns" in state_dict:  # the returns buffer takes the checkpoint's dataset size
            self.returns = torch.empty_like(state_dict[prefix + "returns"], device=self.returns.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.behavior_opt = torch.optim.Adam(self.behavior.parameters(), lr=self.hparams.behavior_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr)
        return [self.behavior_opt, self.critic_opt]

    def update(self, batch: Batch) -> dict[str, Tensor]:
        hp = self.hparams
        # 1. behaviour model: denoising score matching on the batch
        if self.step < hp.behavior_steps:
            return self.behavior_update(batch)
        # 2. at the start of rounds 1..K-1: plan new returns with the last round's critic, reset it
        round_, offset = divmod(self.step - hp.behavior_steps, hp.critic_steps)
        if offset == 0 and 0 < round_ < hp.planning_iterations:
            on_next = hp.planning == "paper"
            value = self.state_value(self.data_next_obs if on_next else self.data_obs)
            self.returns = self._set_stats(self._plan(value))
            if hp.reset_critic:
                with torch.no_grad():
                    torch._foreach_copy_(list(self.critic.parameters()), list(self.critic_init.parameters()))
                self.critic_opt.state.clear()
        # 3. critic: regression on the (normalised) returns of rows drawn on the device
        return self.critic_update(batch)

    @compilable
    def behavior_update(self, batch: Batch) -> dict[str, Tensor]:
        """One step of the behaviour model on the batch."""
        loss = self.behavior.loss(batch.obs, batch.act)
        self.optimize(self.behavior_opt, loss)
        return {"loss/behavior": loss}

    @compilable
    def critic_update(self, batch: Batch) -> dict[str, Tensor]:
        """One step of the critic on the current round's returns."""
        if batch.idx is None:  # a batch made by hand: draw rows here, as the DataModule's sampler does
            idx = torch.randint(len(self.returns), (batch.obs.shape[0],), device=self.returns.device)
            obs, act = self.data_obs[idx], self.data_act[idx]
        else:
            idx, obs, act = batch.idx, batch.obs, batch.act
        target = (self.returns[idx] - self.ret_mean) / self.ret_std
        q = self.critic(obs, act).squeeze(0)
        loss = (q - target).pow(2).mean()
        self.optimize(self.critic_opt, loss)
        return {"loss/critic": loss, "q/mean": q.mean()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """The mean of `n_select` of M behaviour candidates drawn with probabilities softmax(alpha Q)."""
        hp, n = self.hparams, self.hparams.n_eval_candidates
        obs_rep = repeat_rows(obs, n)
        actions = self.behavior.sample(obs_rep, hp.solver_steps, hp.solver_order)
        q = self.critic(obs_rep, actions).view(obs.shape[0], n)
        return resample(actions.view(obs.shape[0], n, -1), hp.eval_alpha * q, hp.n_select)
