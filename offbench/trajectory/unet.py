"""The denoiser of the PGD trajectory model: a 1-D temporal U-Net over (batch, time, channels).

As the official code (EmptyJackson/policy-guided-diffusion, models/diffusion.py): per encoder block
i a width of features * 2^i, two kernel-3 convolutions with GroupNorm(8) and ReLU, the time
embedding added after the first, and a max-pool halving between blocks; the decoder upsamples by
nearest neighbour to the skip's length, applies a kernel-2 convolution (padded on the right, as
flax's SAME), adds the time embedding, concatenates the skip and applies two kernel-3 convolutions;
a kernel-1 convolution gives the output channels. The time embedding is sinusoidal (features / 8
frequencies) followed by two dense layers with swish between them, and swish before each block's
dense projection. Fully convolutional: any sequence length can be sampled.

Normalisation (`norm`): the official model runs on one unbatched (L, C) sequence at a time (`vmap` over the
loss and over rollouts), and flax's GroupNorm treats the leading axis of an unbatched input as the batch, so it
normalises **each time step separately**: for step l and group g of C/G channels,
    y[l, c] = scale[c] (x[l, c] - mu[l, g]) / sqrt(var[l, g] + 1e-6) + bias[c],
    mu[l, g] = mean_{c in g} x[l, c],  var[l, g] = mean_{c in g} x[l, c]^2 - mu[l, g]^2  (flax's formula).
`per_step` (the default) is that; `window` (torch's nn.GroupNorm on (B, C, L)) takes mu and var over the group's
channels and all L steps of the window, as the official model would on a batched input. Models saved before the
option existed were trained with `window` (offbench/pgd/model.py loads them so, with a note).
tests/test_golden_pgd.py checks both against the official flax model in float64.
Deviation: PyTorch's default initialisation instead of flax's (lecun normal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offbench.errors import UserError

# Sizes: the official defaults (--num_features 1024 --num_blocks 3, about 1.6e8 parameters, for GPUs)
# and a small preset that trains in minutes on a CPU.
NORMS = ("per_step", "window")  # GroupNorm over each time step (official) or over the whole window
UNET_PRESETS: dict[str, dict[str, int]] = {
    "official": {"features": 1024, "n_blocks": 3},
    "small": {"features": 32, "n_blocks": 3},
}


def sinusoidal_embedding(t: Tensor, half: int, dtype: torch.dtype | None = None) -> Tensor:
    """[sin(t f), cos(t f)] (B, 2 half) with frequencies f_k = 10000^(-k / (half - 1)), k = 0..half-1
    (the embedding of both official temporal U-Nets), computed in `dtype` (default: the default dtype)."""
    dtype = dtype or torch.get_default_dtype()
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    emb = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([emb.sin(), emb.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.half = features // 8
        if self.half < 2:
            raise UserError(f"the time embedding needs features >= 16 (--features), got {features}")
        self.dense1 = nn.Linear(2 * self.half, features)
        self.dense2 = nn.Linear(features, features)

    def forward(self, t: Tensor) -> Tensor:
        return self.dense2(F.silu(self.dense1(sinusoidal_embedding(t, self.half, self.dense1.weight.dtype))))


class StepGroupNorm(nn.GroupNorm):
    """GroupNorm of (B, C, L) with the statistics of each time step (the official model's, see the module
    docstring); the same parameters (`weight`, `bias`) as nn.GroupNorm."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, n = x.shape
        h = x.reshape(b, self.num_groups, c // self.num_groups, n)
        mu = h.mean(2, keepdim=True)
        var = (h.square().mean(2, keepdim=True) - mu.square()).clamp_min(0.0)  # flax's E[x^2] - E[x]^2
        h = ((h - mu) * torch.rsqrt(var + self.eps)).reshape(b, c, n)
        return h * self.weight[:, None] + self.bias[:, None]


def _norm(width: int, groups: int, norm: str) -> nn.GroupNorm:
    if width % groups:
        raise UserError(f"U-Net width {width} is not a multiple of the {groups} GroupNorm groups: choose another --features")
    cls = StepGroupNorm if norm == "per_step" else nn.GroupNorm
    return cls(groups, width, eps=1e-6)  # flax's GroupNorm epsilon


class TemporalUNet(nn.Module):
    """forward(x (B, L, C), t (B,)) -> (B, L, C); `norm` "per_step" (official) or "window"."""

    def __init__(self, channels: int, features: int = 1024, n_blocks: int = 3, groups: int = 8,
                 norm: str = "per_step") -> None:
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"unknown U-Net norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.channels, self.features, self.n_blocks, self.norm = channels, features, n_blocks, norm
        widths = [features * 2**i for i in range(n_blocks)]
        self.time = TimeEmbedding(features)
        self.enc = nn.ModuleList()
        for i, w in enumerate(widths):
            self.enc.append(nn.ModuleDict({
                "conv1": nn.Conv1d(channels if i == 0 else widths[i - 1], w, 3, padding=1),
                "temb": nn.Linear(features, w), "norm1": _norm(w, groups, norm),
                "conv2": nn.Conv1d(w, w, 3, padding=1), "norm2": _norm(w, groups, norm),
            }))
        self.dec = nn.ModuleList()
        for i in range(n_blocks - 2, -1, -1):
            w = widths[i]
            self.dec.append(nn.ModuleDict({
                "up": nn.Conv1d(widths[i + 1], w, 2), "temb": nn.Linear(features, w), "norm0": _norm(w, groups, norm),
                "conv1": nn.Conv1d(2 * w, w, 3, padding=1), "norm1": _norm(w, groups, norm),
                "conv2": nn.Conv1d(w, w, 3, padding=1), "norm2": _norm(w, groups, norm),
            }))
        self.out = nn.Conv1d(widths[0], channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = F.silu(self.time(t))[:, :, None]  # (B, features, 1)
        h = x.transpose(1, 2)  # (B, C, L)
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
            h = b["up"](F.pad(h, (0, 1)))
            h = F.relu(b["norm0"](h + b["temb"](temb.squeeze(-1))[:, :, None]))
            h = torch.cat([h, z], dim=1)
            h = F.relu(b["norm1"](b["conv1"](h)))
            h = F.relu(b["norm2"](b["conv2"](h)))
        return self.out(h).transpose(1, 2)
