"""The per-dimension empirical-CDF normaliser of Decision Diffuser (Ajay et al. 2023, "Is Conditional
Generative Modeling all you need for Decision-Making?", arXiv:2211.15657; official code
anuragajay/decision-diffuser @01ce528c, code/diffuser/datasets/normalization.py, `CDFNormalizer`).

Each dimension d of the fitting data (float32) gets its sorted distinct values q_1 < ... < q_K and
cumulative probabilities p_k = #{x <= q_k} / n. Then

    normalize(x)   = 2 F(clip(x, q_1, q_K)) - 1         in [-1, 1]
    unnormalize(y) = F^-1(clip((y + 1) / 2, p_1, p_K))

with F the piecewise-linear interpolation through (q_k, p_k) and F^-1 the one through (p_k, q_k), as
scipy.interpolate.interp1d(kind="linear") evaluates it: the segment is found by a left-sided search
clipped to [1, K - 1], and y = slope * (x - x_lo) + y_lo. A dimension whose data is constant passes
through unchanged in both directions (the official behaviour, not an identity onto [-1, 1]).

As the official code: the knots q_k are float32 (the data is cast before fitting) and differences of two
knots are formed in float32 (scipy keeps the knots' dtype), the rest in float64; the result has the
input's dtype. No scipy at runtime: torch.searchsorted on knots padded per dimension, so the maps run on
the training device, batched.

The knots are not saved with a checkpoint (persistent=False): a D4RL dataset has up to one knot per row
and dimension (about 2M x 17), so they are rebuilt from the dataset, deterministically, when training
starts (`fit`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class CDFNormalizer(nn.Module):
    """normalize / unnormalize tensors (..., dim) through the empirical CDF of each dimension."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # knots (dim, K) float32, padded with each row's last knot; counts[d, k] = #{x <= q_k}
        self.register_buffer("knots", torch.zeros(dim, 2), persistent=False)
        self.register_buffer("counts", torch.ones(dim, 2, dtype=torch.long), persistent=False)
        self.register_buffer("n_knots", torch.full((dim,), 2, dtype=torch.long), persistent=False)
        self.register_buffer("constant", torch.ones(dim, dtype=torch.bool), persistent=False)
        self.n_rows = 1
        self.fitted = False

    @torch.no_grad()
    def fit(self, x: np.ndarray) -> CDFNormalizer:
        """Knots of every dimension of the data x (n, dim), cast to float32 as the official code."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        rows = [np.unique(x[:, d], return_counts=True) for d in range(self.dim)]
        width = max(2, max(len(q) for q, _ in rows))
        knots = np.empty((self.dim, width), np.float32)
        counts = np.empty((self.dim, width), np.int64)
        for d, (q, c) in enumerate(rows):
            knots[d, : len(q)], knots[d, len(q) :] = q, q[-1]
            cum = np.cumsum(c)
            counts[d, : len(q)], counts[d, len(q) :] = cum, cum[-1]
        device = self.knots.device
        self.knots = torch.as_tensor(knots, device=device)
        self.counts = torch.as_tensor(counts, device=device)
        self.n_knots = torch.as_tensor([len(q) for q, _ in rows], device=device)
        self.constant = self.n_knots == 1
        self.n_rows = len(x)
        self.fitted = True
        return self

    def _check(self, x: Tensor) -> None:
        if not self.fitted:
            raise RuntimeError("CDFNormalizer: call fit(data) first (the knots are rebuilt from the dataset, not loaded)")
        if x.shape[-1] != self.dim:
            raise ValueError(f"CDFNormalizer of {self.dim} dimensions got a tensor of shape {tuple(x.shape)}")

    def _interp(self, x: Tensor, xs: Tensor, ys: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
        """interp1d(xs, ys) at x (dim, m), per row, in float64; x - x_lo in the dtype of x and xs (as the
        official code's NumPy promotion); dx, dy: the knot differences (dim, K - 1) in float64."""
        hi = torch.searchsorted(xs, x.contiguous(), side="left")
        hi = torch.minimum(hi.clamp(min=1), (self.n_knots - 1).clamp(min=1)[:, None])
        lo = hi - 1
        slope = dy.gather(1, lo) / dx.gather(1, lo)
        return slope * (x - xs.gather(1, lo)).double() + ys.gather(1, lo).double()

    def _tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """(p (dim, K) float64, dq (dim, K-1): float32 differences of the knots, in float64, dp)."""
        knots = self.knots.float()  # exact: the knots are float32 values (also after a module.double())
        p = self.counts.double() / self.n_rows
        return p, (knots[:, 1:] - knots[:, :-1]).double(), p[:, 1:] - p[:, :-1]

    def normalize(self, x: Tensor) -> Tensor:
        """2 F(clip(x)) - 1; the clip and x - q_lo in x's dtype (at least float32), as NumPy does it."""
        self._check(x)
        p, dq, dp = self._tables()
        work = torch.promote_types(x.dtype, torch.float32)
        flat = x.reshape(-1, self.dim).T.to(work)  # (dim, m)
        q = self.knots.to(work)
        clipped = torch.minimum(torch.maximum(flat, q[:, :1]), q.gather(1, (self.n_knots - 1)[:, None]))
        y = 2 * self._interp(clipped, q, p, dq, dp) - 1
        y = torch.where(self.constant[:, None], flat.double(), y)
        return y.T.reshape(x.shape).to(x.dtype)

    def unnormalize(self, y: Tensor) -> Tensor:
        """F^-1(clip((y + 1) / 2)), (y + 1) / 2 in y's dtype, the rest in float64."""
        self._check(y)
        p, dq, dp = self._tables()
        flat = y.reshape(-1, self.dim).T
        u = torch.minimum(torch.maximum(((flat + 1) / 2).double(), p[:, :1]), p.gather(1, (self.n_knots - 1)[:, None]))
        x = self._interp(u, p, self.knots.double(), dp, dq)
        x = torch.where(self.constant[:, None], flat.double(), x)
        return x.T.reshape(y.shape).to(y.dtype)
