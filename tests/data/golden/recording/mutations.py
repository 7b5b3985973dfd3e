"""Mutation check of the PyTorch golden tests (tests/test_golden.py, tests/test_golden_qgpo.py).

Each mutation is one small change to the algorithms (a sign, a coefficient, a clip, online vs target,
a cadence, an EMA setting). For each: patch the file, run the golden test file(s) that cover it
(pytest -x -q), record whether they fail (caught), and restore the file with `git checkout -- FILE`.
Run from the repository root with a clean work tree:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tests/data/golden/recording/mutations.py [--only N ...]
The list and the result are in tests/data/golden/README.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

DQL, CPS, QGPO = "algorithms/diffusion_ql.py", "algorithms/diffcps.py", "algorithms/qgpo.py"
POL, HELP, SCHED = "offbench/diffusion/policies.py", "offbench/diffusion/helpers.py", "offbench/diffusion/schedules.py"
T_DQL, T_QGPO = "tests/test_golden.py", "tests/test_golden_qgpo.py"

# (description, file, old, new, tests)
MUTATIONS = [
    ("TD target ignores done", DQL, "hp.gamma * (1.0 - batch.done) * q_next", "hp.gamma * q_next", [T_DQL]),
    ("TD target: max over the twin heads", DQL, "q_next.view(2, -1, n).amax(-1).amin(0)", "q_next.view(2, -1, n).amax(-1).amax(0)", [T_DQL]),
    ("max-Q backup: mean over the n actions", DQL, "q_next.view(2, -1, n).amax(-1)", "q_next.view(2, -1, n).mean(-1)", [T_DQL]),
    ("critic loss: mean over heads instead of sum", DQL, "(q - y).pow(2).mean(1).sum()", "(q - y).pow(2).mean()", [T_DQL]),
    ("TD target's a' from the online actor", DQL, "        return self.actor_ema\n", "        return self.actor\n", [T_DQL]),
    ("TD target reads the online critic", DQL, "q_next = self.critic_target(next_obs,", "q_next = self.critic(next_obs,", [T_DQL]),
    ("Q term sign", DQL, "return -q_new.index_select(0, i).mean()", "return q_new.index_select(0, i).mean()", [T_DQL]),
    ("Q term normaliser not detached", DQL, ".abs().mean().detach()", ".abs().mean()", [T_DQL]),
    ("Q term normaliser: the same head", DQL, "q_den.index_select(0, 1 - i)", "q_den.index_select(0, i)", [T_DQL]),
    ("Diffusion-QL: bc weight 0.9", DQL, "actor_loss = bc_loss + hp.eta * q_loss", "actor_loss = 0.9 * bc_loss + hp.eta * q_loss", [T_DQL]),
    ("act reads the online critic", DQL, "q = self.critic_target(obs_rep, actions).amin(0)", "q = self.critic(obs_rep, actions).amin(0)", [T_DQL]),
    ("act: max over the heads", DQL, "q = self.critic_target(obs_rep, actions).amin(0)", "q = self.critic_target(obs_rep, actions).amax(0)", [T_DQL]),
    ("Polyak tau doubled", DQL, "soft_update(self.critic_target, self.critic, hp.tau)", "soft_update(self.critic_target, self.critic, 2 * hp.tau)", [T_DQL]),
    ("EMA decay 0.99", DQL, "hp.ema_decay, hp.ema_start", "0.99, hp.ema_start", [T_DQL]),
    ("EMA cadence off by one", HELP, "if step % every == 0:", "if step % every == 1:", [T_DQL]),
    ("EMA starts one update late", HELP, "if step < start:", "if step <= start:", [T_DQL]),
    ("DiffCPS: dual step sign", CPS, "self.lagrange * (hp.kappa - l_c.detach())", "self.lagrange * (l_c.detach() - hp.kappa)", [T_DQL]),
    ("DiffCPS: policy cadence off by one", CPS, "if self.step % self.hparams.policy_every == 0:", "if self.step % self.hparams.policy_every == 1:", [T_DQL]),
    ("DiffCPS: L_c summed over action dims", CPS, 'hp.act_dim if hp.lc_reduction == "sum" else 1', "hp.act_dim", [T_DQL]),
    ("reverse step: posterior coefficients swapped", POL, "self.post_coef_x0[i] * x0 + self.post_coef_xt[i] * x", "self.post_coef_x0[i] * x + self.post_coef_xt[i] * x0", [T_DQL]),
    ("reverse step: no x0 clip", POL, "x0 = x0.clamp(-self.max_action, self.max_action)", "x0 = x0", [T_DQL]),
    ("reverse chain: noise of the wrong step", POL, "noise is None else noise[k + 1]", "noise is None else noise[k]", [T_DQL]),
    ("time embedding: [cos, sin]", POL, "torch.cat([x.sin(), x.cos()], dim=-1)", "torch.cat([x.cos(), x.sin()], dim=-1)", [T_DQL]),
    ("denoising loss: sum over action dims", POL, "err.mean(-1) if per_sample else err.mean()", "err.mean(-1) if per_sample else err.sum(-1).mean()", [T_DQL]),
    ("forward noising: sqrt(abar) and sqrt(1 - abar) swapped", POL,
     "self.sqrt_abar[i, None] * a0 + self.sqrt_one_minus_abar[i, None] * noise",
     "self.sqrt_one_minus_abar[i, None] * a0 + self.sqrt_abar[i, None] * noise", [T_DQL]),
    ("QGPO: guidance sign", QGPO, "return eps - self.scale * self.sigma(t)[:, None] * grad", "return eps + self.scale * self.sigma(t)[:, None] * grad", [T_QGPO]),
    ("QGPO: energy loss on -f", QGPO, "torch.log_softmax(f, -1)", "torch.log_softmax(-f, -1)", [T_QGPO]),
    ("QGPO: energy labels from the online critic", QGPO, "q = self.critic_target(obs, act).amin(0).view(n, m)", "q = self.critic(obs, act).amin(0).view(n, m)", [T_QGPO]),
    ("QGPO: next Q max over heads", QGPO, "next_act.reshape(-1, hp.act_dim)).amin(0)", "next_act.reshape(-1, hp.act_dim)).amax(0)", [T_QGPO]),
    ("QGPO: CEP time without the 1e-3 shift", QGPO, "t = (u * (1.0 - 1e-3) + 1e-3).repeat_interleave(m)", "t = u.repeat_interleave(m)", [T_QGPO]),
    ("QGPO: TD target ignores done", QGPO, "hp.gamma * (1.0 - self.data_done[idx])", "hp.gamma", [T_QGPO]),
    ("VP SDE: log alpha's t^2 coefficient -0.5", SCHED, "return -0.25 * t**2 * (self.beta_1 - self.beta_0)",
     "return -0.5 * t**2 * (self.beta_1 - self.beta_0)", [T_QGPO]),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", type=int, nargs="*")
    p.add_argument("--old", metavar="COMMIT", help="run the golden test files as they were at COMMIT (for comparison)")
    p.add_argument("-k", dest="select", help="pytest -k expression, e.g. 'not float64' (the float32 tests alone)")
    args = p.parse_args()
    if subprocess.run(["git", "diff", "--quiet", "--", "algorithms", "offbench"]).returncode:
        sys.exit("algorithms/ or offbench/ has uncommitted changes: commit or stash them first")
    if args.old:  # the test files of an older commit, put back with git checkout at the end
        if subprocess.run(["git", "diff", "--quiet", "--", T_DQL, T_QGPO]).returncode:
            sys.exit("the golden test files have uncommitted changes: commit them first")
        for path in (T_DQL, T_QGPO):
            old = subprocess.run(["git", "show", f"{args.old}:{path}"], capture_output=True, text=True, check=True).stdout
            with open(path, "w") as f:
                f.write(old)
    try:
        run(args)
    finally:
        if args.old:
            subprocess.run(["git", "checkout", "--", T_DQL, T_QGPO], check=True)


def run(args) -> None:
    caught = 0
    chosen = [(k, m) for k, m in enumerate(MUTATIONS, 1) if not args.only or k in args.only]
    for k, (what, path, old, new, tests) in chosen:
        text = open(path).read()
        assert text.count(old) == 1, (k, what, text.count(old))
        try:
            with open(path, "w") as f:
                f.write(text.replace(old, new))
            select = ["-k", args.select] if args.select else []
            res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *select, *tests],
                                 capture_output=True, text=True)
        finally:
            subprocess.run(["git", "checkout", "--", path], check=True)
        hit = res.returncode != 0
        caught += hit
        failed = next((ln for ln in res.stdout.splitlines() if ln.startswith("FAILED")), "")
        print(f"{k:2d} {'caught' if hit else 'MISSED'}  {what}  {failed[:150]}", flush=True)
    print(f"caught {caught} of {len(chosen)}")


if __name__ == "__main__":
    main()
