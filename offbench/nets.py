"""Networks shared by the algorithms: plain `nn.Module`s, batched where there is an ensemble."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from offbench import seeds

# --------------------------------------------------------------------------- linear layers on the CPU
# PyTorch's CPU wheels run float32 matmuls through MKL's sgemm, which takes a generic code path on
# non-Intel CPUs: measured on one AMD EPYC core (AVX-512), 0.37 ms for a 256 x 256 x 256 product against
# 0.19 ms through oneDNN (which dispatches by instruction set, not vendor; XLA's CPU matmul, which the
# JAX peers use, also takes about 0.2 ms). `linear` sends float32 CPU layers through oneDNN's linear
# primitive, forward and backward; the same products, summed in another order (float32 round-off:
# about 1e-6 relative, tests/test_speed.py). Elsewhere (CUDA, float64, compiled graphs, small layers
# where the call costs more than the product) it is F.linear. Only measured on AMD: on a CPU where MKL is
# the faster (or to rule the path out), OFFBENCH_ONEDNN_LINEAR=0 in the environment keeps every layer on F.linear.
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and os.environ.get("OFFBENCH_ONEDNN_LINEAR", "1") != "0")
ONEDNN_MIN_WIDTH = 32  # both weight dimensions at least this: smaller layers stay on F.linear
SMALL_OUTPUT_LOOP = True  # EnsembleLinear with a small output on the CPU: per-member products (`_small_output_on_cpu`)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias for 2-D x, through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the three products (y, dL/dx = g W, dL/dW = g^T x) through oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # oneDNN takes a slow path on broadcast (stride-0) gradients, e.g. of a sum
        grad_x = _onednn(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_w = _onednn(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class _OneDNNEnsembleLinear(torch.autograd.Function):
    """y_k = x_k W_k + b_k for each member k of (n, B, in) x (n, in, out), the products through oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.stack([_onednn(x[k], weight[k].t(), bias[k, 0]) for k in range(len(weight))])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # oneDNN takes a slow path on broadcast (stride-0) gradients, e.g. of a sum
        n = len(weight)
        grad_x = torch.stack([_onednn(grad[k], weight[k], None) for k in range(n)]) if ctx.needs_input_grad[0] else None
        grad_w = torch.stack([_onednn(x[k].t(), grad[k].t(), None) for k in range(n)]) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _plain_autograd() -> bool:
    """Neither compiling nor inside torch.func transforms (vmap, grad), which the hand-written autograd
    Functions here do not support: there the composite ops run."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _use_onednn(x: Tensor, weight: Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and min(weight.shape) >= ONEDNN_MIN_WIDTH and _plain_autograd())


def _per_copy(fn: Any) -> Any:
    """fn applied copy by copy to stacked (N, ...) tensors (None stays None), the results stacked."""
    def call(*ts: Tensor | None) -> Tensor:
        copies = [[None] * len(ts[0]) if t is None else t.unbind(0) for t in ts]  # unbind: one backward node for all copies
        return torch.stack([fn(*args) for args in zip(*copies)])

    return call


def _seed_batch_on_cpu(x: Tensor) -> bool:
    """Inside a SeedBatch update (offbench/seeds.py) on the CPU: the layers here run copy by copy on the copies'
    stacked tensors, with the kernels of a single-seed run (so each copy gets its single-seed run's numbers; on
    the CPU a batched matmul is no faster than oneDNN's per copy). On a GPU vmap's batched kernels run."""
    return x.device.type == "cpu" and seeds.in_seed_batch()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through oneDNN for float32 on the CPU (see above); x of any leading shape."""
    if _seed_batch_on_cpu(x):
        return seeds.stacked_call(_per_copy(linear), x, weight, bias)
    if not _use_onednn(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (the same parameters and state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters and state dict) that a SeedBatch update on the CPU runs copy by copy,
    so each copy gets its single-seed run's numbers (vmap's batched affine rounds differently)."""

    def forward(self, x: Tensor) -> Tensor:
        if _seed_batch_on_cpu(x):
            norm = lambda x, w, b: F.layer_norm(x, self.normalized_shape, w, b, self.eps)  # noqa: E731
            return seeds.stacked_call(_per_copy(norm), x, self.weight, self.bias)
        return super().forward(x)


# --------------------------------------------------------------------------- activations
class _MishFunction(torch.autograd.Function):
    """mish(x) = x tanh(softplus(x)) in the form of `Mish`, with its derivative worked out by hand:
    mish'(x) = g + x s r^2, r = 2 (1 - s) / (2 - n) (g = n / (2 - n), n = s (2 - s), s = sigmoid(x))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        n = s * (2.0 - s)
        d = 2.0 - n
        g = n / d
        r = torch.rsub(s, 2.0, alpha=2.0) / d  # 2 (1 - s) / d
        # x times s r (at most 1) first: finite for every finite x, never inf * 0
        ctx.save_for_backward(torch.addcmul(g, x * (s * r), r))
        return x * g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (derivative,) = ctx.saved_tensors
        return grad * derivative


def mish(x: Tensor) -> Tensor:
    """Mish (Misra 2019, arXiv:1908.08681), x tanh(softplus(x)), as x n / (2 - n) with n = s (2 - s),
    s = sigmoid(x).

    Exact: with u = 1 / (1 + e^x) = 1 - s, tanh(log(1 + e^x)) = (1 - u^2) / (1 + u^2), and 1 - u^2 = s (2 - s),
    1 + u^2 = 2 - s (2 - s). One sigmoid instead of exp, log1p and tanh, no overflow (s, n in [0, 1]),
    and no cancellation at either end. Equal to torch's built-in mish to float round-off (a few ulps,
    tests/test_speed.py) and 3-5x faster on one CPU core (PyTorch's built-in runs tanh and softplus,
    and a slow backward kernel). With gradients, the derivative is computed in the same pass and saved:
    one multiplication in backward (second derivatives are not offered: nothing in the suite takes them)."""
    if _seed_batch_on_cpu(x):  # (inside vmap a tensor does not show requires_grad: decide per copy)
        return seeds.stacked_call(_per_copy(mish), x)
    if torch.is_grad_enabled() and x.requires_grad and _plain_autograd():
        return _MishFunction.apply(x)
    s = torch.sigmoid(x)
    n = s * (2.0 - s)
    return x * (n / (2.0 - n))


class Mish(nn.Module):
    """nn.Mish computed by the faster exact `mish` (no parameters: checkpoints are the same)."""

    def forward(self, x: Tensor) -> Tensor:
        return mish(x)


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...] = (256, 256), activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of sizes in_dim -> *hidden -> out_dim with `activation` between them."""
    layers: list[nn.Module] = []
    sizes = (in_dim, *hidden)
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [Linear(a, b), activation()]
    layers.append(Linear(sizes[-1], out_dim))
    return nn.Sequential(*layers)


class DeterministicActor(nn.Module):
    """a = max_action * tanh(f(s))."""

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden)
        self.max_action = max_action

    def forward(self, obs: Tensor) -> Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class GaussianActor(nn.Module):
    """A Gaussian policy whose mean is squashed into the action bounds, with a state-independent
    log-std: mean = max_action * tanh(f(s)), std = exp(log_std) (clamped to [-5, 2] in log)."""

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.max_action = max_action

    def forward(self, obs: Tensor) -> torch.distributions.Normal:
        mean = self.max_action * torch.tanh(self.net(obs))
        # validate_args=False: argument checks read tensor values on the host (a sync per call).
        return torch.distributions.Normal(mean, self.log_std.clamp(-5.0, 2.0).exp(), validate_args=False)


class EnsembleLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: (n, B, in) -> (n, B, out) (float32 on the CPU:
    member by member through oneDNN, see `linear`)."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim))
        # nn.Linear's default initialisation, member by member.
        bound = 1.0 / in_dim**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if _seed_batch_on_cpu(x):
            return seeds.stacked_call(_per_copy(self._one), x, self.weight, self.bias)
        return self._one(x, self.weight, self.bias)

    @staticmethod
    def _one(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if _use_onednn(x, weight[0]):  # member by member through oneDNN (see `linear`)
            return _OneDNNEnsembleLinear.apply(x, weight, bias)
        if _small_output_on_cpu(x, weight):  # member by member: MKL's batched matrix-vector products are slow
            return torch.stack([torch.addmm(bias[k], x[k], weight[k]) for k in range(len(weight))])
        return torch.baddbmm(bias, x, weight)


def _small_output_on_cpu(x: Tensor, weight: Tensor) -> bool:
    """An ensemble layer with fewer than ONEDNN_MIN_WIDTH outputs (a critic's last layer) in float32 on the CPU: there
    torch's batched matmul (baddbmm forward, bmm backward) costs 4-8x a loop of per-member products (measured on one
    AMD EPYC core, 2 x (256 x 256 -> 1): 97 us against 22 us forward, 113 against 15 us for the weight gradient)."""
    return (SMALL_OUTPUT_LOOP and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.shape[-1] < ONEDNN_MIN_WIDTH and _plain_autograd())


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with each of `n` members' own scale and shift: (n, B, d) -> (n, B, d)."""

    def __init__(self, n: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, dim))
        self.bias = nn.Parameter(torch.zeros(n, 1, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # bias + normalised * weight in one kernel (addcmul), not two
        return torch.addcmul(self.bias, torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)


class CriticEnsemble(nn.Module):
    """`n` Q-functions Q_k(s, a) as one module: forward(obs, act) -> (n, B).

    Inputs of shape (B, d) are shared by all members; (n, B, d) gives each member its own batch.
    `layer_norm`: a LayerNorm (each member its own, eps 1e-6 as flax's) after every hidden layer's
    activation, as ReBRAC's critics (Tarasov et al. 2023, arXiv:2305.09836); off by default.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, n: int = 2, hidden: tuple[int, ...] = (256, 256),
        activation: type[nn.Module] = nn.ReLU, layer_norm: bool = False,
    ):
        super().__init__()
        self.n = n
        sizes = (obs_dim + act_dim, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [EnsembleLinear(n, a, b), activation()]
            if layer_norm:
                layers.append(EnsembleLayerNorm(n, b))
        layers.append(EnsembleLinear(n, sizes[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        x = torch.cat([obs, act], dim=-1)
        if x.dim() == 2:
            x = x.expand(self.n, *x.shape)
        return self.net(x).squeeze(-1)


class LNResNetBlock(nn.Module):
    """x + Linear(act(Linear(LayerNorm(dropout(x))))), widths dim -> expansion * dim -> dim: the block of
    IDQL's LN-ResNet noise network (Hansen-Estruch et al. 2023, arXiv:2304.10573; official code
    github.com/philippe-eecs/IDQL, jaxrl5/networks/resnet.py). LayerNorm eps 1e-6 as flax's."""

    def __init__(self, dim: int, dropout: float = 0.0, expansion: int = 4, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), LayerNorm(dim, eps=1e-6),
            Linear(dim, expansion * dim), activation(), Linear(expansion * dim, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class LNResNet(nn.Module):
    """Linear(in -> width), one LNResNetBlock per entry of `hidden`, activation, Linear(width -> out)
    (IDQL's MLPResNet). The blocks are residual, so every entry of `hidden` is the same width."""

    def __init__(self, in_dim: int, out_dim: int, hidden: tuple[int, ...] = (256, 256, 256), dropout: float = 0.0,
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if not hidden or len(set(hidden)) != 1:
            raise ValueError(f"LNResNet's blocks are residual: give one width per block, all equal (e.g. (256, 256, 256)), got {hidden}")
        width = hidden[0]
        self.net = nn.Sequential(
            Linear(in_dim, width),
            *(LNResNetBlock(width, dropout, activation=activation) for _ in hidden),
            activation(), Linear(width, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
