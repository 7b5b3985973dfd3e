"""Mutation check of tests/test_golden_dd.py: applies each mutation below to the Decision Diffuser code, runs the
golden test, and restores the file with `git checkout` (run from the repository root on a clean checkout):

    PYTHONPATH=$PWD python tests/data/golden/recording/dd_mutations.py [TEST_FILE ...]

A mutation is caught when the test files (default: tests/test_golden_dd.py) fail. The list and the count are in
tests/data/golden/README.md (part "Decision Diffuser").
"""

from __future__ import annotations

import os
import subprocess
import sys

DD = "algorithms/decision_diffuser.py"
CDF = "offbench/trajectory/cdf.py"
PADDED = "offbench/trajectory/padded.py"
MUTATIONS = [  # (name, file, original text, mutated text)
    ("guidance: conditional and unconditional swapped", DD, "eps_uncond + hp.guidance_w * (eps_cond - eps_uncond)",
     "eps_cond + hp.guidance_w * (eps_uncond - eps_cond)"),
    ("guidance weight ignored (w = 1)", DD, "eps_uncond + hp.guidance_w * (eps_cond", "eps_uncond + 1.0 * (eps_cond"),
    ("null condition: the embedding kept", DD, "torch.cat([torch.ones(n, 1), torch.zeros(n, 1)])",
     "torch.cat([torch.ones(n, 1), torch.ones(n, 1)])"),
    ("x0 not clamped", DD, "self.sqrt_recipm1_abar[i] * eps).clamp(-1.0, 1.0)", "self.sqrt_recipm1_abar[i] * eps)"),
    ("posterior coefficients swapped", DD, "self.post_coef1[i] * x0 + self.post_coef2[i] * x",
     "self.post_coef2[i] * x0 + self.post_coef1[i] * x"),
    ("step noise std not halved", DD, "(0.5 * (torch.randn_like(x) if z is None else z))",
     "(torch.randn_like(x) if z is None else z)"),
    ("x_N not halved", DD, "        x = 0.5 * x0\n", "        x = x0\n"),
    ("noise also at the last step", DD, "        if i > 0:\n            x = x + self.post_std[i]",
     "        if i >= 0:\n            x = x + self.post_std[i]"),
    ("noise of the wrong step", DD, "None if noise is None else noise[N - i]", "None if noise is None else noise[N - i - 1]"),
    ("no inpainting after a step", DD, "        x[:, 0] = s\n        return x\n", "        return x\n"),
    ("training: s0 not inpainted", DD, "x_t = torch.cat([obs[:, :1], x_t[:, 1:]], dim=1)", "x_t = x_t"),
    ("training: forward noising coefficients swapped", DD,
     "self.sqrt_abar[t, None, None] * obs + self.sqrt_1m_abar[t, None, None] * noise",
     "self.sqrt_1m_abar[t, None, None] * obs + self.sqrt_abar[t, None, None] * noise"),
    ("loss: row 0 weighted 1", DD, "diffusion_loss = err[:, 1:].sum() / err.numel()", "diffusion_loss = err.sum() / err.numel()"),
    ("loss: mean over rows 1.. only", DD, "diffusion_loss = err[:, 1:].sum() / err.numel()",
     "diffusion_loss = err[:, 1:].mean()"),
    ("loss: dropout mask not applied", DD, "self.unet(x, t, self.returns_mlp(returns) * keep)",
     "self.unet(x, t, self.returns_mlp(returns))"),
    ("loss: inverse dynamics reads a_{h+1}", DD, "obs[:, 1:]), act[:, :-1])", "obs[:, 1:]), act[:, 1:])"),
    ("loss: no 1/2 on the sum", DD, '{"loss/total": 0.5 * (diffusion_loss + inv_loss)', '{"loss/total": (diffusion_loss + inv_loss)'),
    ("inverse model: (s', s) order", DD, "self.inv_model(torch.cat([s, s_next], dim=-1))", "self.inv_model(torch.cat([s_next, s], dim=-1))"),
    ("act: action from (s1, s2)", DD, "self.net_ema.inverse(x[:, 0], x[:, 1])", "self.net_ema.inverse(x[:, 1], x[:, 2])"),
    ("returns not divided by returns_scale", DD, "[episode, start] / hp.returns_scale)", "[episode, start] / 1.0)"),
    ("windows: actions not normalised", DD, "torch.cat([self.act_normalizer.normalize(torch.as_tensor(ep.act)),",
     "torch.cat([torch.as_tensor(ep.act),"),
    ("cdf: [0, 1] instead of [-1, 1]", CDF, "y = 2 * self._interp(clipped, q, p, dq, dp) - 1", "y = self._interp(clipped, q, p, dq, dp)"),
    ("cdf: inputs not clipped to the data range", CDF,
     "clipped = torch.minimum(torch.maximum(flat, q[:, :1]), q.gather(1, (self.n_knots - 1)[:, None]))", "clipped = flat"),
    ("cdf: inverse not clipped to [p_1, 1]", CDF,
     "u = torch.minimum(torch.maximum(((flat + 1) / 2).double(), p[:, :1]), p.gather(1, (self.n_knots - 1)[:, None]))",
     "u = ((flat + 1) / 2).double()"),
    ("cdf: constant dimensions mapped", CDF, "y = torch.where(self.constant[:, None], flat.double(), y)", "y = y"),
    ("cdf: knot differences in float64", CDF, "knots = self.knots.float()  #", "knots = self.knots.double()  #"),
    ("cdf: cumulative probability of the previous knot", CDF, "p = self.counts.double() / self.n_rows",
     "p = (self.counts.double() - 1) / self.n_rows"),
    ("windows: one start too many", PADDED, "counts = np.minimum(lengths - 1, max_path_length - horizon)",
     "counts = np.minimum(lengths, max_path_length - horizon)"),
    ("termination penalty not applied", PADDED, "rew[np.flatnonzero(terminated), lengths[terminated] - 1] += np.float32(termination_penalty)",
     "pass"),
]


def main() -> int:
    tests = sys.argv[1:] or ["tests/test_golden_dd.py"]
    sources = {f: open(f).read() for f in {m[1] for m in MUTATIONS}}
    caught = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, path, old, new in MUTATIONS:
        assert sources[path].count(old) == 1, (name, sources[path].count(old))
        with open(path, "w") as f:
            f.write(sources[path].replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                               env=env, capture_output=True, text=True)
        finally:
            subprocess.run(["git", "checkout", "--", path], check=True)
        failed = r.returncode != 0
        caught += failed
        lines = r.stdout.strip().splitlines()
        last = next((x for x in lines if x.startswith(("FAILED", "ERROR"))), lines[-1] if lines else r.stderr[-200:])
        print(f"{'CAUGHT' if failed else 'MISSED'}  {name}  ({last})", flush=True)
    print(f"caught {caught} of {len(MUTATIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
