"""The networks of the trajectory planners: Janner's temporal U-Net and value network.

Planning with Diffusion for Flexible Behavior Synthesis (Janner et al., ICML 2022, arXiv:2205.09991,
section 3 and appendix C), as the official code builds them (jannerm/diffuser @7ea4228,
diffuser/models/temporal.py and helpers.py); Decision Diffuser (Ajay et al., arXiv:2211.15657) uses the
same U-Net with a returns embedding beside the time embedding (anuragajay/decision-diffuser @01ce528,
code/diffuser/models/temporal.py). This is a different architecture from PGD's U-Net (unet.py): kernel 5,
Mish, strided convolutions instead of pooling, residual blocks.

Interface
---------
PlannerUNet(transition_dim, dim=32, dim_mults=(1, 2, 4, 8), attention=False, cond_dim=0)
    forward(x (B, H, D), t (B,) long, cond_emb=None (B, cond_dim)) -> (B, H, D)
    D = transition_dim channels (Diffuser: [action, state]; DD: state). H must be a multiple of
    2^(len(dim_mults) - 1). With cond_dim > 0 the embedding fed to every residual block is
    cat(time_emb (B, dim), cond_emb (B, cond_dim)) (DD: the returns embedding, zeroed for the
    unconditional pass); cond_emb is then required.
PlannerValue(horizon, transition_dim, dim=32, dim_mults=(1, 2, 4, 8))
    forward(x (B, H, D), t (B,) long) -> (B, 1)

Architecture (both):
- time embedding: sinusoidal(dim) -> Linear(dim, 4 dim) -> Mish -> Linear(4 dim, dim);
- Conv1dBlock(i, o): Conv1d(i, o, 5, padding 2) -> GroupNorm(8, o) -> Mish;
- ResBlock(i, o): h = Conv1dBlock(i, o)(x) + Linear(Mish(emb))[:, :, None]; h = Conv1dBlock(o, o)(h);
  out = h + (Conv1d(i, o, 1)(x) if i != o else x);
- widths [D, dim * m for m in dim_mults]; Downsample = Conv1d(c, c, 3, stride 2, padding 1),
  Upsample = ConvTranspose1d(c, c, 4, stride 2, padding 1).
- U-Net: per level 2 ResBlocks, optional attention, Downsample except on the last level; middle
  ResBlock, (attention), ResBlock; per up level (all but the first width, reversed): concatenate the skip,
  2 ResBlocks, (attention), Upsample on every up level; Conv1dBlock(dim, dim) -> Conv1d(dim, D, 1).
- attention (the official halfcheetah setting): x + Conv1d(128, c, 1)(LinearAttention(LayerNorm_c(x)))
  with 4 heads of 32 channels, q scaled by 32^-0.5, k softmaxed over time, no softmax on q; LayerNorm over
  channels (biased variance, eps 1e-5, learnable gain and bias).
- value: per level 2 ResBlocks and a Downsample on every level, then ResBlock(c, c/2), Downsample,
  ResBlock(c/2, c/4), Downsample, flatten, cat(time_emb), Linear -> Mish -> Linear(., 1).
  The flattened size uses the true length after the strided convolutions (ceil halving); the official
  code computes it by floor halving, which agrees wherever the official network runs (H=32 with 4
  levels, H=4 with 3 levels) and fails elsewhere.
Modules are registered in the official order, so the official state dicts map onto these position by
position (tests/test_golden_diffuser.py). Initialisation: PyTorch's defaults, as the official code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from offbench.errors import UserError
from offbench.trajectory.unet import sinusoidal_embedding

KERNEL = 5
GROUPS = 8


class TimeMLP(nn.Module):
    """sinusoidal(dim) -> Linear(dim, 4 dim) -> Mish -> Linear(4 dim, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.net(sinusoidal_embedding(t, self.dim // 2, self.net[0].weight.dtype))


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv1d(kernel 5) -> GroupNorm(8) -> Mish."""
    if c_out % GROUPS:
        raise UserError(f"planner network width {c_out} is not a multiple of {GROUPS} GroupNorm groups: choose another dim")
    return nn.Sequential(nn.Conv1d(c_in, c_out, KERNEL, padding=KERNEL // 2), nn.GroupNorm(GROUPS, c_out), nn.Mish())


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = conv_block(c_in, c_out)
        self.conv2 = conv_block(c_out, c_out)
        self.emb = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv2(self.conv1(x) + self.emb(emb)[:, :, None])
        return h + self.skip(x)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of x (B, C, H): biased variance, eps 1e-5, learnable gain and bias."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, c, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) / (var + 1e-5).sqrt() * self.gain + self.bias


class Attention(nn.Module):
    """x + LinearAttention(ChannelNorm(x)), x (B, C, H)."""

    def __init__(self, c: int, heads: int = 4, head_dim: int = 32) -> None:
        super().__init__()
        self.heads, self.scale = heads, head_dim**-0.5
        self.to_qkv = nn.Conv1d(c, 3 * heads * head_dim, 1, bias=False)
        self.to_out = nn.Conv1d(heads * head_dim, c, 1)
        self.norm = ChannelNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        b, _, n = y.shape
        q, k, v = (z.reshape(b, self.heads, -1, n) for z in self.to_qkv(y).chunk(3, dim=1))
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)  # (B, heads, head_dim, head_dim)
        out = torch.einsum("bhde,bhdn->bhen", context, q * self.scale).reshape(b, -1, n)
        return x + self.to_out(out)


def _widths(transition_dim: int, dim: int, dim_mults: tuple[int, ...]) -> list[tuple[int, int]]:
    if not dim_mults or dim % 2 or dim < 4:
        raise UserError(f"planner networks need an even dim >= 4 and at least one dim_mults entry, got {dim} and {dim_mults}")
    widths = [transition_dim, *(dim * m for m in dim_mults)]
    return list(zip(widths[:-1], widths[1:]))


class PlannerUNet(nn.Module):
    """forward(x (B, H, D), t (B,), cond_emb (B, cond_dim) or None) -> (B, H, D)."""

    def __init__(self, transition_dim: int, dim: int = 32, dim_mults: tuple[int, ...] = (1, 2, 4, 8),
                 attention: bool = False, cond_dim: int = 0) -> None:
        super().__init__()
        in_out = _widths(transition_dim, dim, tuple(dim_mults))
        self.levels, self.cond_dim = len(in_out), cond_dim
        embed = dim + cond_dim
        self.time_mlp = TimeMLP(dim)

        def attn(c: int) -> nn.Module:
            return Attention(c) if attention else nn.Identity()

        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()  # registered before the middle, as the official
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([ResBlock(c_in, c_out, embed), ResBlock(c_out, c_out, embed), attn(c_out),
                                             nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, 2, 1)]))
        mid = in_out[-1][1]
        self.mid1, self.mid_attn, self.mid2 = ResBlock(mid, mid, embed), attn(mid), ResBlock(mid, mid, embed)
        for c_in, c_out in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([ResBlock(2 * c_out, c_in, embed), ResBlock(c_in, c_in, embed), attn(c_in),
                                           nn.ConvTranspose1d(c_in, c_in, 4, 2, 1)]))
        self.final = nn.Sequential(conv_block(dim, dim), nn.Conv1d(dim, transition_dim, 1))

    def forward(self, x: Tensor, t: Tensor, cond_emb: Tensor | None = None) -> Tensor:
        if x.shape[1] % 2 ** (self.levels - 1):
            raise UserError(f"the planner U-Net needs a horizon that is a multiple of {2 ** (self.levels - 1)} "
                            f"(2^(levels - 1)), got {x.shape[1]}: change horizon or dim_mults")
        emb = self.time_mlp(t)
        if self.cond_dim:
            if cond_emb is None:
                raise ValueError("PlannerUNet was built with cond_dim > 0: forward needs cond_emb (B, cond_dim)")
            emb = torch.cat([emb, cond_emb], dim=-1)
        h = x.transpose(1, 2)  # (B, D, H)
        skips = []
        for res1, res2, attn, down in self.downs:
            h = attn(res2(res1(h, emb), emb))
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for res1, res2, attn, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(attn(res2(res1(h, emb), emb)))
        return self.final(h).transpose(1, 2)


class PlannerValue(nn.Module):
    """forward(x (B, H, D), t (B,)) -> (B, 1): the value of a noised trajectory at diffusion step t."""

    def __init__(self, horizon: int, transition_dim: int, dim: int = 32, dim_mults: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        in_out = _widths(transition_dim, dim, tuple(dim_mults))
        self.horizon = horizon
        self.time_mlp = TimeMLP(dim)
        self.blocks = nn.ModuleList(
            nn.ModuleList([ResBlock(c_in, c_out, dim), ResBlock(c_out, c_out, dim), nn.Conv1d(c_out, c_out, 3, 2, 1)])
            for c_in, c_out in in_out)
        mid = in_out[-1][1]
        self.mid1, self.mid_down1 = ResBlock(mid, mid // 2, dim), nn.Conv1d(mid // 2, mid // 2, 3, 2, 1)
        self.mid2, self.mid_down2 = ResBlock(mid // 2, mid // 4, dim), nn.Conv1d(mid // 4, mid // 4, 3, 2, 1)
        length = horizon
        for _ in range(len(in_out) + 2):
            length = (length + 1) // 2  # Conv1d(kernel 3, stride 2, padding 1)
        fc = mid // 4 * length
        self.head = nn.Sequential(nn.Linear(fc + dim, fc // 2), nn.Mish(), nn.Linear(fc // 2, 1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.shape[1] != self.horizon:
            raise ValueError(f"PlannerValue was built for horizon {self.horizon}, got trajectories of {x.shape[1]} steps")
        emb = self.time_mlp(t)
        h = x.transpose(1, 2)
        for res1, res2, down in self.blocks:
            h = down(res2(res1(h, emb), emb))
        h = self.mid_down2(self.mid2(self.mid_down1(self.mid1(h, emb)), emb))
        return self.head(torch.cat([h.flatten(1), emb], dim=-1))
