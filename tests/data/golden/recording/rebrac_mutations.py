"""Mutation check of tests/test_golden_rebrac.py: applies each mutation below to algorithms/rebrac.py, runs the
golden test, and restores the file with `git checkout` (run from the repository root on a clean
algorithms/rebrac.py):

    PYTHONPATH=$PWD python tests/data/golden/recording/rebrac_mutations.py [K]

A mutation is caught when the golden test fails (with K, only the tests selected by `pytest -k K`, e.g.
"float32"). The list and the count are in tests/data/golden/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TARGET = Path("algorithms/rebrac.py")
MUTATIONS = [  # (name, original text, mutated text)
    ("actor BC penalty sign", "(h.actor_bc_coef * bc - lmbda * q_pi)", "(-h.actor_bc_coef * bc - lmbda * q_pi)"),
    ("actor BC coefficient dropped", "(h.actor_bc_coef * bc - lmbda * q_pi)", "(bc - lmbda * q_pi)"),
    ("actor reads beta_2", "(h.actor_bc_coef * bc - lmbda * q_pi)", "(h.critic_bc_coef * bc - lmbda * q_pi)"),
    ("actor BC mean over action dims", "bc = (pi - batch.act).pow(2).sum(-1)", "bc = (pi - batch.act).pow(2).mean(-1)"),
    ("critic penalty sign", "- h.critic_bc_coef * penalty", "+ h.critic_bc_coef * penalty"),
    ("critic penalty dropped", "- h.critic_bc_coef * penalty", "- 0.0 * penalty"),
    ("critic penalty against a, not a'_D", "(next_act - batch.next_act)", "(next_act - batch.act)"),
    ("target noise clip removed", ".clamp(-clip, clip)", ""),
    ("target action clip removed", "+ noise).clamp(-h.max_action, h.max_action)", "+ noise)"),
    ("policy noise fixed at 0.2", "eps * h.policy_noise * h.max_action", "eps * 0.2 * h.max_action"),
    ("Q normalisation off", "if h.normalize_q else", "if False else"),
    ("lambda not detached", "q_pi.abs().mean().detach()", "q_pi.abs().mean()"),
    ("lambda from |mean Q|", "q_pi.abs().mean().detach()", "q_pi.mean().abs().detach()"),
    ("actor reads Q_1, not min", "self.critic(batch.obs, pi).min(0).values", "self.critic(batch.obs, pi)[0]"),
    ("target reads Q_1, not min", "next_act).min(0).values", "next_act)[0]"),
    ("target reads the online critic", "self.critic_target(batch.next_obs, next_act)", "self.critic(batch.next_obs, next_act)"),
    ("target action from the online actor", "self.actor_target(batch.next_obs)", "self.actor(batch.next_obs)"),
    ("done mask ignored", "(1.0 - batch.done)", "1.0"),
    ("policy delay: actor on odd updates", "self.step % self.hparams.policy_every == 0", "self.step % self.hparams.policy_every == 1"),
    ("policy delay: actor every update", "self.step % self.hparams.policy_every == 0", "True"),
    ("critic tau doubled", "soft_update(self.critic_target, self.critic, h.tau)", "soft_update(self.critic_target, self.critic, 2 * h.tau)"),
    ("actor tau doubled", "soft_update(self.actor_target, self.actor, h.tau)\n        self.optimize",
     "soft_update(self.actor_target, self.actor, 2 * h.tau)\n        self.optimize"),
    ("actor target after the actor step", 'actor_target_from: Literal["pre_step", "post_step"] = "pre_step"',
     'actor_target_from: Literal["pre_step", "post_step"] = "post_step"'),
    ("critic loss mean over critics", "(q - target).pow(2).mean(1).sum()", "(q - target).pow(2).mean()"),
]


def main() -> int:
    source = TARGET.read_text()
    caught = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, old, new in MUTATIONS:
        assert source.count(old) == 1, (name, source.count(old))
        TARGET.write_text(source.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
                                "tests/test_golden_rebrac.py", *(["-k", sys.argv[1]] if len(sys.argv) > 1 else [])], env=env, capture_output=True, text=True)
        finally:
            subprocess.run(["git", "checkout", "--", str(TARGET)], check=True)
        failed = r.returncode != 0
        caught += failed
        lines = r.stdout.strip().splitlines()
        last = next((x for x in lines if x.startswith(("FAILED", "ERROR"))), lines[-1] if lines else r.stderr[-200:])
        print(f"{'CAUGHT' if failed else 'MISSED'}  {name}  ({last})", flush=True)
    print(f"caught {caught} of {len(MUTATIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
