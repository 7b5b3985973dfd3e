"""Mutation check and measured differences of tests/test_golden_pgd.py (PGD against the official code, float64).

    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/data/golden/recording/pgd_mutations.py            # both
    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/data/golden/recording/pgd_mutations.py --measure  # differences only

--measure runs the golden tests with `close` replaced by a logger and prints the largest |difference| of every kind
of comparison. The mutation check breaks one piece of the production code at a time (a monkeypatch in a fresh
process), runs tests/test_golden_pgd.py and counts the mutations that make it fail; every one should.
"""

from __future__ import annotations

import math
import subprocess
import sys

import torch
import torch.nn.functional as F


def _patch_time_embedding(swap: bool = False, freq_div: str = "half - 1") -> None:
    from offbench.trajectory.unet import TimeEmbedding

    def forward(self, t):
        dtype = self.dense1.weight.dtype
        div = self.half if freq_div == "half" else self.half - 1
        freqs = torch.exp(torch.arange(self.half, dtype=dtype) * -(math.log(10000.0) / div))
        emb = t.to(dtype)[:, None] * freqs[None]
        emb = torch.cat([emb.cos(), emb.sin()] if swap else [emb.sin(), emb.cos()], dim=-1)
        return self.dense2(F.silu(self.dense1(emb)))

    TimeEmbedding.forward = forward


def _patch_unet_forward(pad_left: bool = False, skip_first: bool = False) -> None:
    from offbench.trajectory.unet import TemporalUNet

    def forward(self, x, t):
        temb = F.silu(self.time(t))[:, :, None]
        h = x.transpose(1, 2)
        skips = []
        for i, b in enumerate(self.enc):
            h = F.relu(b["norm1"](b["conv1"](h) + b["temb"](temb.squeeze(-1))[:, :, None]))
            h = F.relu(b["norm2"](b["conv2"](h)))
            skips.append(h)
            if i < self.n_blocks - 1:
                h = F.max_pool1d(h, 2)
        h = skips[-1]
        for b, z in zip(self.dec, reversed(skips[:-1])):
            h = F.interpolate(h, size=z.shape[-1], mode="nearest-exact")
            h = b["up"](F.pad(h, (1, 0) if pad_left else (0, 1)))
            h = F.relu(b["norm0"](h + b["temb"](temb.squeeze(-1))[:, :, None]))
            h = torch.cat([z, h] if skip_first else [h, z], dim=1)
            h = F.relu(b["norm1"](b["conv1"](h)))
            h = F.relu(b["norm2"](b["conv2"](h)))
        return self.out(h).transpose(1, 2)

    TemporalUNet.forward = forward


def m_norm_window():  # the whole-window statistics as the default
    import offbench.trajectory.unet as u

    u.StepGroupNorm.forward = torch.nn.GroupNorm.forward


def m_norm_eps():  # torch's GroupNorm epsilon 1e-5 instead of flax's 1e-6
    import offbench.trajectory.unet as u

    orig = u.StepGroupNorm.__init__

    def init(self, groups, width, eps=1e-6):
        orig(self, groups, width, eps=1e-5)

    u.StepGroupNorm.__init__ = init


def m_time_sin_cos():
    _patch_time_embedding(swap=True)


def m_time_freqs():
    _patch_time_embedding(freq_div="half")


def m_up_pad_left():
    _patch_unet_forward(pad_left=True)


def m_skip_order():
    _patch_unet_forward(skip_first=True)


def _patch_denoise(c_noise_div: float = 4.0, sqrt_c_in: bool = True) -> None:
    from offbench.pgd.edm import EDM

    def denoise(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        sd, s = self.sigma_data, sigma[:, None, None]
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / ((s**2 + sd**2).sqrt() if sqrt_c_in else (s**2 + sd**2))
        return c_skip * x + c_out * self.net(c_in * x, sigma.log() / c_noise_div)

    EDM.denoise = denoise


def m_c_noise():
    _patch_denoise(c_noise_div=2.0)


def m_c_in():
    _patch_denoise(sqrt_c_in=False)


def m_loss_weight():  # 1 / sigma^2 instead of (sigma^2 + sd^2) / (sigma sd)^2
    from offbench.pgd.edm import EDM

    def loss_at(self, x0, normal, noise):
        sigma = (self.p_mean + self.p_std * normal).exp()
        err = (self.denoise(x0 + sigma[:, None, None] * noise, sigma) - x0).pow(2)
        return ((1 / sigma**2)[:, None, None] * err).mean()

    EDM.loss_at = loss_at


def _wrap_step(**changes):
    from dataclasses import replace

    from offbench.pgd.edm import EDM

    orig = EDM.step

    def step(self, x, sigma, next_sigma, gamma, normal, settings):
        return orig(self, x, sigma, next_sigma, gamma, normal, replace(settings, **changes))

    EDM.step = step


def m_edm_predictor():  # EDM's Algorithm 2 predictor (from x_hat) instead of the official one (from x)
    _wrap_step(edm_predictor=True)


def m_no_s_noise():
    _wrap_step(s_noise=1.0)


def m_first_order():  # no Heun correction
    _wrap_step(first_order=True)


def m_guidance_cos():  # cos instead of sin in the schedule's bump
    import offbench.pgd.guidance as g

    def schedule(steps, coeff, cos_coeff=0.3, delay=0):
        return [coeff * ((1.0 - i / steps) + cos_coeff * math.cos(math.pi * (i + 1) / steps))
                if delay <= i < steps - 1 else 0.0 for i in range(steps)]

    g.guidance_schedule = schedule


def m_guidance_last_step():  # guidance also on the last step
    import offbench.pgd.guidance as g

    def schedule(steps, coeff, cos_coeff=0.3, delay=0):
        return [coeff * ((1.0 - i / steps) + cos_coeff * math.sin(math.pi * (i + 1) / steps))
                if delay <= i else 0.0 for i in range(steps)]

    g.guidance_schedule = schedule


def m_guidance_no_tanh():  # the gradient taken on pre-tanh actions
    from offbench.trajectory.windows import TrajectoryNormalizer

    def unnormalize_actions(self, x_act):
        s = self.act_slice
        return self.max_action * (x_act * self.std[s] + self.mean[s])

    TrajectoryNormalizer.unnormalize_actions = unnormalize_actions


def m_guidance_eps_order():  # + 1e-8 before the division by the norm
    from offbench.pgd.guidance import PolicyGuidance

    orig = PolicyGuidance.gradient

    def gradient(self, traj):
        normalize, self.normalize = self.normalize, False
        g = orig(self, traj)
        self.normalize = normalize
        if normalize:
            g = (g + 1e-8) / g.flatten(1).norm(dim=1)[:, None, None]
        return g

    PolicyGuidance.gradient = gradient


def m_norm_std_unbiased():
    from offbench.trajectory.windows import TrajectoryNormalizer

    orig = TrajectoryNormalizer.fit

    def fit(self, raw):
        orig(self, raw)
        n = raw.reshape(-1, raw.shape[-1]).shape[0]
        self.std.mul_(math.sqrt(n / (n - 1)))
        return self

    TrajectoryNormalizer.fit = fit


def m_action_clip():
    import offbench.trajectory.windows as w

    w.ACTION_CLIP = 0.99


def m_done_threshold():
    from offbench.trajectory.windows import TrajectoryNormalizer

    orig = TrajectoryNormalizer.unnormalize

    def unnormalize(self, x):
        y = orig(self, x)
        d = self.obs_dim + self.act_dim
        y[..., d + 1:] = ((x * self.std + self.mean)[..., d + 1:] > 0.0).to(y.dtype)
        return y

    TrajectoryNormalizer.unnormalize = unnormalize


MUTATIONS = {k[2:]: v for k, v in dict(globals()).items() if k.startswith("m_")}


def run_one(name: str) -> int:
    import pytest

    MUTATIONS[name]()
    return pytest.main(["-q", "-x", "-p", "no:cacheprovider", "tests/test_golden_pgd.py"])


def measure() -> None:
    import pytest

    import tests.test_golden_pgd as t

    worst: dict[str, float] = {}

    def close(actual, expected, msg=""):
        kind = msg.split(" after step")[0].split(", step")[0].split(" of ")[0]
        diff = float((torch.as_tensor(actual).double() - torch.as_tensor(expected).double()).abs().max())
        worst[kind] = max(worst.get(kind, 0.0), diff)

    t.close = close
    pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_golden_pgd.py"])
    for kind, diff in sorted(worst.items()):
        print(f"{kind:32s} {diff:.2e}")


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        sys.exit(run_one(sys.argv[2]))
    measure()
    if sys.argv[1:2] == ["--measure"]:
        return
    caught = 0
    for name in MUTATIONS:
        rc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True).returncode
        caught += rc != 0
        print(f"{name:24s} {'caught' if rc != 0 else 'NOT CAUGHT'}")
    print(f"{caught} of {len(MUTATIONS)} mutations caught")


if __name__ == "__main__":
    main()
