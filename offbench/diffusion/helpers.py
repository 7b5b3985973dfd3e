"""Helpers of the diffusion algorithms: the EMA cadence of the official code, row repetition, and the
softmax selection of candidate actions (Gumbel-top-k on the device, no host sync)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay: float = 0.995, start: int = 1000,
               every: int = 5, warmup: Literal["hold", "copy", "copy_on_cadence"] = "hold") -> None:
    """The EMA cadence of the official codes, on update number `step` (a Python int, so no host sync):
    from `start` on, every `every` steps, ema <- decay * ema + (1 - decay) * model (one fused foreach
    lerp). Before `start`: "hold" keeps the EMA at its initial weights (the official Diffusion-QL/DiffCPS
    code), "copy" copies the model's weights at every step, "copy_on_cadence" copies them every `every`
    steps (the Trainer of the official Diffuser and Decision Diffuser code, `step_ema`)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    on_cadence = step % every == 0
    if step < start:
        if warmup == "copy" or (warmup == "copy_on_cadence" and on_cadence):
            torch._foreach_copy_(ema_params, params)
        return
    if on_cadence:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def sample_by_score(scores: Tensor, k: int = 1, u: Tensor | None = None) -> Tensor:
    """Indices (n, k) drawn without replacement from softmax(scores) along the last dim (Gumbel-top-k,
    Kool et al. 2019): k = 1 is torch.multinomial(softmax(scores), 1) in distribution, without its
    underflow failures for peaked scores and without a host sync. `u` (uniforms shaped like scores)
    are the random draws; by default they are drawn on the device."""
    u = (torch.rand_like(scores) if u is None else u).clamp(1e-12, 1.0 - 1e-7)
    return (scores - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def repeat_rows(x: Tensor, n: int) -> Tensor:
    """Each row of x (B, d) n times in a row, (B * n, d): repeat_interleave as an expand and a copy."""
    return x[:, None].expand(-1, n, -1).reshape(-1, x.shape[-1])


def resample(candidates: Tensor, logits: Tensor, k: int = 1, u: Tensor | None = None) -> Tensor:
    """Pick from `candidates` (n, m, d) by drawing k of the m without replacement with probabilities
    softmax(logits) (n, m), and average the k picks: (n, d). k = 1 is plain softmax sampling; `u` as
    in `sample_by_score`."""
    idx = sample_by_score(logits, k, u)
    picked = candidates.gather(1, idx[..., None].expand(-1, -1, candidates.shape[-1]))
    return picked.mean(1)
