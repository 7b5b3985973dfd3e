"""Mutation check of tests/test_golden_jax.py: apply each small change below to the algorithm code, run the test
file, record whether it fails, and restore the file with `git checkout` (the working tree must be clean for the
mutated files). From the repository root, in the project's environment:

    PYTHONPATH=$PWD python tests/data/golden/recording/edp_idql_mutations.py

Each entry: (name, file, exact old text, new text); the old text must occur exactly once.
"""

from __future__ import annotations

import subprocess
import sys
import time

MUTATIONS = [
    # EDP (algorithms/edp.py)
    ("edp act reads the target critics", "algorithms/edp.py",
     "q = self.critic(obs_rep, actions).amin(0)", "q = self.critic_target(obs_rep, actions).amin(0)"),
    ("edp act samples the EMA policy", "algorithms/edp.py",
     "actions = self.actor.sample(obs_rep)", "actions = self.actor_ema.sample(obs_rep)"),
    ("edp act max over the critics", "algorithms/edp.py",
     "q = self.critic(obs_rep, actions).amin(0)", "q = self.critic(obs_rep, actions).amax(0)"),
    ("edp EMA decay 0.9", "algorithms/edp.py",
     "self.step + 1, hp.ema_decay,", "self.step + 1, 0.9,"),
    ("edp EMA every update", "algorithms/edp.py",
     "hp.ema_start + 1, hp.ema_every)", "hp.ema_start + 1, 1)"),
    ("edp EMA starts one update early", "algorithms/edp.py",
     "hp.ema_start + 1, hp.ema_every)", "hp.ema_start, hp.ema_every)"),
    ("edp guide sign", "algorithms/edp.py",
     "guide_loss = -lam * q_j.mean()", "guide_loss = lam * q_j.mean()"),
    ("edp lambda without abs", "algorithms/edp.py",
     "lam = hp.alpha / q_j.abs().mean().detach()", "lam = hp.alpha / q_j.mean().detach()"),
    ("edp guide head swapped", "algorithms/edp.py",
     "q_j = q.index_select(0, j)", "q_j = q.index_select(0, 1 - j)"),
    ("edp TD target from the online critics", "algorithms/edp.py",
     "q_next = self.critic_target(next_obs, self.actor_ema.sample(next_obs, noise=next_chain))",
     "q_next = self.critic(next_obs, self.actor_ema.sample(next_obs, noise=next_chain))"),
    ("edp TD target from the online policy", "algorithms/edp.py",
     "q_next = self.critic_target(next_obs, self.actor_ema.sample(next_obs, noise=next_chain))",
     "q_next = self.critic_target(next_obs, self.actor.sample(next_obs, noise=next_chain))"),
    ("edp TD target max over heads", "algorithms/edp.py",
     "q_next = q_next.view(2, -1, n).amax(-1).amin(0)", "q_next = q_next.view(2, -1, n).amax(-1).amax(0)"),
    ("edp TD target done mask inverted", "algorithms/edp.py",
     "y = batch.rew + hp.gamma * (1.0 - batch.done) * q_next", "y = batch.rew + hp.gamma * batch.done * q_next"),
    ("edp Polyak rate 2 tau", "algorithms/edp.py",
     "soft_update(self.critic_target, self.critic, hp.tau)", "soft_update(self.critic_target, self.critic, 2 * hp.tau)"),
    ("edp critics clipped jointly", "algorithms/edp.py",
     "scale = (self.hparams.max_grad_norm / norms).clamp(max=1.0)",
     "scale = (self.hparams.max_grad_norm / norms.norm()).clamp(max=1.0)"),
    ("edp iql V from the online critics", "algorithms/edp.py",
     "q_target = self.critic_target(batch.obs, batch.act).amin(0)", "q_target = self.critic(batch.obs, batch.act).amin(0)"),
    ("edp iql advantage sign", "algorithms/edp.py",
     "weights = awr_weights(q_target - v,", "weights = awr_weights(v - q_target,"),
    ("edp iql TD target V(s)", "algorithms/edp.py",
     "y = batch.rew + hp.gamma * (1.0 - batch.done) * self.value(batch.next_obs).squeeze(-1)",
     "y = batch.rew + hp.gamma * (1.0 - batch.done) * self.value(batch.obs).squeeze(-1)"),
    ("edp crr weight clip 2", "algorithms/edp.py",
     "weights = crr_weights(q_data - v, hp.crr_beta, hp.crr_weight_clip, hp.crr_weight)",
     "weights = crr_weights(q_data - v, hp.crr_beta, 2.0, hp.crr_weight)"),
    # shared diffusion code (offbench/diffusion)
    ("a0_hat not clipped", "offbench/diffusion/policies.py",
     "return DenoisingTerms(i, noise, eps_pred, a0_hat.clamp(-self.max_action, self.max_action))",
     "return DenoisingTerms(i, noise, eps_pred, a0_hat)"),
    ("noise at the last reverse step", "offbench/diffusion/policies.py",
     "std[0] = 0.0  # the last", "std[0] = std[1]  # the last"),
    # IDQL (algorithms/idql.py)
    ("idql greedy choice reads the online critic", "algorithms/idql.py",
     "q = self.critic_target(obs_rep, actions.flatten(0, 1))", "q = self.critic(obs_rep, actions.flatten(0, 1))"),
    ("idql EMA decay 0.99", "algorithms/idql.py",
     "update_ema(self.actor_ema, self.actor, self.step, self.hparams.ema_decay,",
     "update_ema(self.actor_ema, self.actor, self.step, 0.99,"),
    ("idql value expectile 1 - tau", "algorithms/idql.py",
     "value_loss = expectile_loss(q_target - self.v(batch.obs), h.expectile)",
     "value_loss = expectile_loss(q_target - self.v(batch.obs), 1 - h.expectile)"),
    ("idql TD target V(s)", "algorithms/idql.py",
     "target = batch.rew + h.gamma * (1.0 - batch.done) * self.v(batch.next_obs)",
     "target = batch.rew + h.gamma * (1.0 - batch.done) * self.v(batch.obs)"),
    ("idql behaviour loss mean over dims", "algorithms/idql.py",
     "noise=draws.bc_noise, i=draws.bc_i) * h.act_dim", "noise=draws.bc_noise, i=draws.bc_i)"),
    ("idql no clip after each reverse step", "algorithms/idql.py",
     "x = model.reverse_step(x, i, obs, z).clamp(-bound, bound)", "x = model.reverse_step(x, i, obs, z)"),
    ("idql value from the online critic", "algorithms/idql.py",
     "q_target = self.critic_target(batch.obs, batch.act).min(0).values",
     "q_target = self.critic(batch.obs, batch.act).min(0).values"),
    ("idql resample weights swapped", "algorithms/idql.py",
     "return torch.where(q - v > 0, expectile, 1.0 - expectile)", "return torch.where(q - v > 0, 1.0 - expectile, expectile)"),
]


def main() -> None:
    files = sorted({m[1] for m in MUTATIONS})
    if subprocess.run(["git", "diff", "--quiet", "--", *files]).returncode:
        sys.exit(f"commit or stash the changes to {files} first")
    caught = 0
    for name, path, old, new in MUTATIONS:
        with open(path) as f:
            text = f.read()
        assert text.count(old) == 1, (name, text.count(old))
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        try:
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                "tests/test_golden_jax.py"], capture_output=True, text=True)
            failed = r.returncode != 0
            first = next((ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")), "")
        finally:
            subprocess.run(["git", "checkout", "--", path], check=True)
        caught += failed
        print(f"{'CAUGHT ' if failed else 'MISSED '} {name} ({time.time() - t0:.0f} s) {first[:110]}", flush=True)
    assert not subprocess.run(["git", "diff", "--quiet", "--", *files]).returncode
    print(f"caught {caught} of {len(MUTATIONS)}")


if __name__ == "__main__":
    main()
