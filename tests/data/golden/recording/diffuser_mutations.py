"""Mutation check of Diffuser's golden test (tests/test_golden_diffuser.py) and unit tests (tests/test_diffuser.py).

Each mutation is one small change to algorithms/diffuser.py or its pieces (offbench/trajectory/planner_nets.py,
padded.py, unet.py's shared time embedding). For each: patch the file, run the test file(s) that should catch it
(pytest -x -q), record whether they fail (caught), and restore the file with `git checkout -- FILE`.
Run from the repository root with a clean work tree:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tests/data/golden/recording/diffuser_mutations.py
The list and the result are in tests/data/golden/README.md (section Diffuser).
"""

from __future__ import annotations

import subprocess
import sys

ALG, NETS, PAD, UNET = ("algorithms/diffuser.py", "offbench/trajectory/planner_nets.py", "offbench/trajectory/padded.py",
                        "offbench/trajectory/unet.py")
GOLD, UNIT = "tests/test_golden_diffuser.py", "tests/test_diffuser.py::test_ema_follows_the_official_cadence"

# (description, file, old, new, tests)
MUTATIONS = [
    ("first action's weight 1 instead of action_weight", ALG, "weights[0, :act_dim] = action_weight", "weights[0, :act_dim] = 1.0", [GOLD]),
    ("the imposed s_0 counted in the loss", ALG, "weights[0, act_dim:] = 0.0", "weights[0, act_dim:] = 1.0", [GOLD]),
    ("loss discount ignored", ALG, "** torch.arange(horizon, dtype=torch.float64)", "** torch.zeros(horizon, dtype=torch.float64)", [GOLD]),
    ("no inpainting of the noised window", ALG, "return self.impose(x, x0[:, 0, self.hparams.act_dim:]), i", "return x, i", [GOLD]),
    ("forward noising: coefficients swapped", ALG, "self.sqrt_abar[i, None, None] * x0 + self.sqrt_one_minus_abar[i, None, None] * noise",
     "self.sqrt_one_minus_abar[i, None, None] * x0 + self.sqrt_abar[i, None, None] * noise", [GOLD]),
    ("guidance gradient scaled by the std, not the variance", ALG, "grad = self.post_var[i] * grad", "grad = self.post_std[i] * grad", [GOLD]),
    ("t_stopgrad off by one", ALG, "if i < hp.t_stopgrad:", "if i <= hp.t_stopgrad:", [GOLD]),
    ("one guide step instead of n_guide_steps", ALG, "for _ in range(hp.n_guide_steps):", "for _ in range(1):", [GOLD]),
    ("no inpainting after a guide step", ALG, "x = self.impose(x + hp.guide_scale * grad, s0)", "x = x + hp.guide_scale * grad", [GOLD]),
    ("guidance sign", ALG, "x + hp.guide_scale * grad", "x - hp.guide_scale * grad", [GOLD]),
    ("posterior coefficients swapped", ALG, "self.post_coef_x0[i] * self.model_ema(x, t) + self.post_coef_xt[i] * x",
     "self.post_coef_xt[i] * self.model_ema(x, t) + self.post_coef_x0[i] * x", [GOLD]),
    ("noise added at the last step", ALG, "            if i > 0:\n", "            if i >= 0:\n", [GOLD]),
    ("noise of the wrong step", ALG, "draws.noise[hp.n_timesteps - 1 - i]", "draws.noise[hp.n_timesteps - 2 - i]", [GOLD]),
    ("plans ranked by the lowest value", ALG, "best = values.argmax(dim=1)", "best = values.argmin(dim=1)", [GOLD]),
    ("action not unnormalised", ALG, "action = first * self.norm_std[:a] + self.norm_mean[:a]", "action = first", [GOLD]),
    ("EMA decay 0.99", ALG, "1.0 - hp.ema_decay)", "1.0 - 0.99)", [UNIT]),
    ("EMA copies at every update before ema_start", ALG, "        if self.step % hp.ema_every:\n            return\n",
     "        if self.step % hp.ema_every and self.step >= hp.ema_start:\n            return\n", [UNIT]),
    ("GroupNorm with 4 groups", NETS, "GROUPS = 8", "GROUPS = 4", [GOLD]),
    ("time embedding added after the second convolution", NETS, "h = self.conv2(self.conv1(x) + self.emb(emb)[:, :, None])",
     "h = self.conv2(self.conv1(x)) + self.emb(emb)[:, :, None]", [GOLD]),
    ("attention: q not scaled", NETS, "q * self.scale", "q", [GOLD]),
    ("channel LayerNorm with unbiased variance", NETS, "torch.var_mean(x, dim=1, correction=0, keepdim=True)",
     "torch.var_mean(x, dim=1, correction=1, keepdim=True)", [GOLD]),
    ("value head without the time embedding", NETS, "torch.cat([h.flatten(1), emb], dim=-1)", "torch.cat([h.flatten(1), 0 * emb], dim=-1)", [GOLD]),
    ("time embedding [cos, sin]", UNET, "torch.cat([emb.sin(), emb.cos()], dim=-1)", "torch.cat([emb.cos(), emb.sin()], dim=-1)", [GOLD]),
    ("normaliser std with ddof 1", PAD, "valid.mean(0), valid.std(0)", "valid.mean(0), valid.std(0, ddof=1)", [GOLD]),
    ("windows stop at the episode's end (no padding)", PAD, "np.minimum(lengths - 1, max_path_length - horizon)",
     "np.minimum(lengths - horizon, max_path_length - horizon)", [GOLD]),
    ("no terminal penalty", PAD, "+= np.float32(termination_penalty)", "+= np.float32(0.0)", [GOLD]),
    ("value target truncated at the window", PAD, "acc = rew[:, s] + discount * acc", "acc = rew[:, s] + discount * acc * (s % 4 != 3)", [GOLD]),
]


def main() -> int:
    caught = 0
    for k, (what, path, old, new, tests) in enumerate(MUTATIONS, 1):
        text = open(path).read()
        if text.count(old) != 1:
            print(f"{k:2d} {what}: the text to change occurs {text.count(old)} times in {path}", flush=True)
            return 2
        open(path, "w").write(text.replace(old, new))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                 capture_output=True, text=True)
        finally:
            subprocess.run(["git", "checkout", "--", path], check=True)
        hit = run.returncode != 0
        caught += hit
        print(f"{k:2d} {'caught' if hit else 'MISSED'}: {what} ({path})", flush=True)
    print(f"{caught} of {len(MUTATIONS)} caught")
    return 0 if caught == len(MUTATIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
