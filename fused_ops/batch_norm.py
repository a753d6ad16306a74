"""BatchNorm over (N, C) and (N, C, L) with a fused activation: PyTorch path, autograd Function, op, module.

Shapes: input (N, C) or (N, C, L); weight, bias, running_mean, running_var (C,). Statistics are per
feature c over the N (and L) axis; n = N * L values each.

Reads top to bottom: argument checks, the PyTorch path (the reference every backend is checked
against), the autograd Function (dispatch to the Triton kernels or the PyTorch path), the functional
`batch_norm`, the module `BatchNorm1d`.

The closed forms, with xhat = (x - mean) * invstd and g the gradient reaching the affine output:
    dx     = gamma * invstd / n * (n * g - sum(g) - xhat * sum(g * xhat))     training, biased variance
    dx     = same with the last term times n / (n - 1)                          training, unbiased=True
    dx     = g * gamma * invstd_running                                         eval (running stats)
    dgamma = sum(g * xhat),  dbeta = sum(g)
where g = dy for no activation, dy * (1 - y^2) after tanh and dy * (y > 0) after relu.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fused_ops.backend import BackendUnavailableError, requested_backend, use_triton

ACTIVATIONS = (None, "tanh", "relu")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Argument checks: every misuse raises here, before anything (running stats included) is touched.
# ----------------------------------------------------------------------------------------------------
def _check_channel_tensor(
    name: str, t: object, input: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str
) -> None:
    """A (C,) float tensor on input's device, of a dtype in `allowed` (input's, and float32 beside
    fp16/bf16 input)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    num_features = input.shape[1]
    if t.shape != (num_features,):
        raise ValueError(
            f"{op}: {name} must have shape ({num_features},) to match input's C = {num_features}, "
            f"got {tuple(t.shape)}"
        )
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names} for {input.dtype} input, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")


def _check_args(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | torch.Tensor,
    eps: float,
    unbiased: bool,
    activation: str | None,
    *,
    op: str = "batch_norm",
    whole_batch: bool = True,
    num_features: int | None = None,
) -> None:
    """Raise a clear error naming the bad argument; checks shapes, dtypes and devices, never values.

    The one checker of BatchNorm's arguments, for the functional op, the modules and SyncBatchNorm:
    `op` names the caller in the messages. whole_batch=False is SyncBatchNorm's: input is one rank's
    share of the batch, which may hold one row or none, so "more than one value per channel" cannot be
    judged from it (the group's count is a device tensor, and SyncBatchNorm leaves the running stats
    untouched when it is below 2, without a host sync). num_features: a module's feature count, which
    input's dim 1 must match.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: input must be a floating-point tensor (fp16/bf16/fp32/fp64), got {input.dtype}"
        )
    if input.ndim not in (2, 3):
        raise ValueError(
            f"{op}: input must be 2-D (N, C) or 3-D (N, C, L), got {input.ndim}-D {tuple(input.shape)}"
        )
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(
            f"{op}: the module has num_features={num_features}, but input has {input.shape[1]} features in "
            f"dim 1 (input shape {tuple(input.shape)}); build it as {op}({input.shape[1]}) or fix the input"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be tensors or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(
            f"{op}: running_mean and running_var are required in eval mode (training=False)"
        )
    allowed = (input.dtype, torch.float32) if input.dtype in _HALF_DTYPES else (input.dtype,)
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None:
            _check_channel_tensor(name, t, input, allowed, op)
    if isinstance(momentum, torch.Tensor):
        if momentum.ndim != 0 or not momentum.is_floating_point():
            raise TypeError(
                f"{op}: a momentum tensor must be a 0-dim float tensor, "
                f"got {momentum.ndim}-D {momentum.dtype}"
            )
        if momentum.device != input.device:
            raise ValueError(f"{op}: momentum is on {momentum.device} but input is on {input.device}")
    elif not _is_real(momentum):
        raise TypeError(
            f"{op}: momentum must be a float or a 0-dim float tensor (for a cumulative average pass "
            f"1 / num_batches_tracked), got {type(momentum).__name__}"
        )
    if not _is_real(eps):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"{op}: unbiased must be a bool, got {type(unbiased).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if whole_batch and training and input.numel() // max(input.shape[1], 1) == 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, "
            f"got input size {tuple(input.shape)}"
        )


def _is_real(value: object) -> bool:
    """A real number and not a bool; a float is answered without numbers.Real's slower ABC check."""
    return type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, bool))


# ----------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------
def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics (mean, invstd) are fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a call into torch when it already is (each call costs ~1 us)."""
    return t if t.dtype == dtype else t.to(dtype)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> a view that broadcasts against the input: (C,) itself for (N, C), (1, C, 1) for (N, C, L)."""
    return t if ndim == 2 else t.view(1, -1, 1)


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    return (0,) if ndim == 2 else (0, 2)


def _activation_grad(dy: torch.Tensor, y: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """Gradient at the activation's input, from the saved output y."""
    if activation == "tanh":  # d tanh(u)/du = 1 - tanh(u)^2: dy - dy * y * y, written over y * y
        y_sq = _to(y, dy.dtype).square()  # in dy's (statistics) dtype, also beside fp16/bf16 y
        return torch.addcmul(dy, dy, y_sq, value=-1, out=y_sq)
    if activation == "relu":
        return dy * (y > 0)  # y = max(u, 0): du = dy where y > 0
    return dy


def _update_running(running: torch.Tensor, batch: torch.Tensor, momentum: float | torch.Tensor) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, computed in batch's dtype.

    Written as torch writes it, not as lerp: lerp(running, inf, 1) is nan (inf - inf), torch's is inf
    (a variance that overflows; found by tests/test_fuzz.py)."""
    stats = running if running.dtype == batch.dtype else running.to(batch.dtype)  # fp16/bf16: round once
    stats.mul_(1 - momentum).add_(batch * momentum)
    if stats is not running:
        running.copy_(stats)


def forward_torch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float | torch.Tensor,
    eps: float,
    training: bool,
    unbiased: bool,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C) or (N, C, L) -> (y like x, mean (C,), invstd (C,)); mean/invstd in `stat_dtype`.

    Training normalises with the batch statistics and, when running stats are given, updates them in
    place with the unbiased variance: running = (1 - momentum) * running + momentum * batch.
    Eval normalises with the running stats.

    The batch variance takes two passes, the mean and then the mean square of x - mean: accurate when
    |mean| >> std, and on CPU far cheaper than torch.var_mean (~80 us at (32, 200), and slower than
    these passes at (4096, 1024) too). The output is written over x - mean, a temporary of our own,
    so that a large input costs no further N x C allocation.
    """
    stat = stat_dtype(x.dtype)
    ndim, num_features = x.ndim, x.shape[1]
    count = x.numel() // max(num_features, 1)  # n = N * L values per feature
    if count == 0:  # as PyTorch: empty output, zero statistics, running stats untouched
        mean = torch.zeros(num_features, dtype=stat, device=x.device)
        return torch.empty_like(x), mean, torch.zeros_like(mean)
    xs = _to(x, stat)
    if not training:
        mean = _to(running_mean, stat)
        invstd = torch.rsqrt(_to(running_var, stat) + eps)
        centered = xs - _channel_view(mean, ndim)
    else:
        dims = _reduce_dims(ndim)
        mean = xs.mean(dims)
        centered = xs - _channel_view(mean, ndim)
        var = (centered * centered).mean(dims)  # biased: sum((x - mean)^2) / n
        var_unbiased = var * (count / (count - 1)) if unbiased or running_mean is not None else None
        invstd = torch.rsqrt((var_unbiased if unbiased else var) + eps)
        if running_mean is not None:
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var_unbiased, momentum)
    scale = _channel_view(invstd if weight is None else invstd * _to(weight, stat), ndim)
    # Eager: y is written in place over `centered`, our own temporary. Under torch.compile, out of place:
    # torch 2.11's compile returns a zero input gradient from a Function whose output was written in
    # place over an intermediate (found by CI's torch 2.11 run); Inductor plans the buffers itself anyway.
    inplace = not torch.compiler.is_compiling()
    if bias is None:  # y = gamma * xhat (+ beta)
        out = centered.mul_(scale) if inplace else centered * scale
    else:
        bias_view = _channel_view(_to(bias, stat), ndim)
        out = torch.addcmul(bias_view, centered, scale, out=centered if inplace else None)
    if activation == "tanh":
        out = out.tanh_() if inplace else out.tanh()
    elif activation == "relu":
        out = out.relu_() if inplace else out.relu()
    return _to(out, x.dtype), mean, invstd


def backward_torch(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    unbiased: bool,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x (and y when activation is set): (N, C) or (N, C, L) -> (dx like x, dgamma (C,), dbeta (C,)).

    dgamma and dbeta come back in the statistics dtype; the caller casts them to weight/bias's dtype.
    xhat is never formed: the closed form is rearranged so that invstd and gamma meet only (C,) vectors,
    and dx is written over the temporary g * (x - mean), with no further N x C allocation.
    """
    stat = mean.dtype
    ndim = x.ndim
    dims = _reduce_dims(ndim)
    count = x.numel() // max(x.shape[1], 1)
    if count == 0:  # empty batch: empty dx, zero dgamma and dbeta (as PyTorch)
        return torch.empty_like(x), torch.zeros_like(mean), torch.zeros_like(mean)
    g = _activation_grad(_to(dy, stat), y, activation)
    centered = _to(x, stat) - _channel_view(mean, ndim)
    sum_g = g.sum(dims)  # = dbeta
    g_centered = g * centered
    sum_g_xhat = g_centered.sum(dims).mul_(invstd)  # = dgamma: sum(g * xhat) = invstd * sum(g * (x - mean))
    scale = invstd if weight is None else invstd * _to(weight, stat)
    if training:
        # dx = gamma*invstd/n * (n*g - sum(g) - xhat*sum(g*xhat)*k), k = n/(n-1) with unbiased=True;
        # with scale = gamma*invstd and xhat = (x - mean)*invstd, two passes over N x C:
        # dx = g*scale - sum(g)*scale/n - (x - mean) * (k/n) * sum(g*xhat)*invstd*scale
        k = count / (count - 1) if unbiased else 1.0
        shift = (sum_g * scale).mul_(-1.0 / count)
        dx = torch.addcmul(_channel_view(shift, ndim), g, _channel_view(scale, ndim), out=g_centered)
        dx = dx.addcmul_(centered, _channel_view(sum_g_xhat * invstd * scale, ndim), value=-k / count)
    else:
        # running stats are constants: dx = g * gamma * invstd_running
        dx = torch.mul(g, _channel_view(scale, ndim), out=g_centered)
    return _to(dx, x.dtype), sum_g_xhat, sum_g


# ----------------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------------
def _kernels():
    from fused_ops.kernels.triton import batch_norm as kernels  # lazily: only when Triton is chosen

    return kernels


class BatchNormFunction(torch.autograd.Function):
    """y = activation(gamma * xhat + beta); backward is the closed form in the module docstring."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float | torch.Tensor,
        eps: float,
        training: bool,
        unbiased: bool,
        activation: str | None,
        triton: bool,
    ) -> torch.Tensor:
        forward = _kernels().batch_norm_forward if triton else forward_torch
        y, mean, invstd = forward(
            input, weight, bias, running_mean, running_var, momentum, eps, training, unbiased, activation
        )
        # Saved: x (for xhat), gamma, the statistics' mean and invstd (C values each, fp32; fp64 for fp64
        # input; the running stats' in eval mode) and, with an activation, the output y for its derivative.
        ctx.save_for_backward(input, weight, mean, invstd, y if activation is not None else None)
        ctx.config = (training, unbiased, activation, triton)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # double backward raises "trying to differentiate twice a function ..."
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, invstd, y = ctx.saved_tensors
        training, unbiased, activation, triton = ctx.config
        backward = _kernels().batch_norm_backward if triton else backward_torch
        dx, dweight, dbias = backward(dy, x, y, weight, mean, invstd, training, unbiased, activation)
        needs_dx, needs_dweight, needs_dbias = ctx.needs_input_grad[:3]
        dx = dx if needs_dx else None
        dweight = _to(dweight, weight.dtype) if needs_dweight else None
        dbias = _to(dbias, ctx.bias_dtype) if needs_dbias else None
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def _use_triton_kernels(input: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """The dispatch decision, `use_triton`. The kernels take fp16/bf16/fp32 input: float64 stays on the
    PyTorch path under "auto" and is an error when "triton" is forced."""
    triton = use_triton("batch_norm", input, *tensors)
    if not triton or input.dtype != torch.float64:
        return triton
    if requested_backend() == "triton":
        raise BackendUnavailableError(
            "batch_norm: the Triton kernels take fp16/bf16/fp32 input, got float64; "
            "use backend 'torch' or 'auto'"
        )
    return False


def _batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | torch.Tensor,
    eps: float,
    unbiased: bool,
    activation: str | None,
) -> torch.Tensor:
    """`batch_norm` after `_check_args`: picks the backend once and applies the Function, or, when no
    gradient is needed, runs the forward alone (the same output and running-stat update, without the
    cost of recording an autograd node)."""
    momentum_tensor = momentum if isinstance(momentum, torch.Tensor) else None
    triton = _use_triton_kernels(input, running_mean, running_var, weight, bias, momentum_tensor)
    args = (
        input,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        float(eps),
        training,
        unbiased,
        activation,
    )
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return BatchNormFunction.apply(*args, triton)
    with torch.no_grad():  # as inside Function.forward: the ops skip autograd's bookkeeping
        return (_kernels().batch_norm_forward if triton else forward_torch)(*args)[0]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | torch.Tensor = 0.1,
    eps: float = 1e-5,
    *,
    unbiased: bool = False,
    activation: str | None = None,
) -> torch.Tensor:
    """BatchNorm as `torch.nn.functional.batch_norm`, plus an unbiased-variance mode and a fused activation.

    input: (N, C) or (N, C, L); running_mean, running_var, weight, bias: (C,) or None. Returns y like input.

    training=True normalises with the batch mean and biased variance (the N-1 variance with
    unbiased=True, as the backprop-ninja notebook does) and, when running stats are given, updates them
    in place with the unbiased variance. training=False uses the running stats. `momentum` may be a
    0-dim tensor (e.g. 1 / num_batches_tracked for a cumulative average) so that it stays on device.
    activation: None, "tanh" or "relu", applied after the affine in the same kernel.
    fp16/bf16 input keeps fp32 statistics; weight, bias and running stats may be fp32 beside it.
    Under torch.autocast it runs in input's dtype, as torch's batch_norm does (it is on none of
    autocast's lists): bf16 in, bf16 out, float32 statistics.
    """
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, activation)
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, activation
    )


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------
class BatchNorm1d(nn.BatchNorm1d):
    """Drop-in `torch.nn.BatchNorm1d` (same arguments, state_dict and train/eval behaviour) on fused ops.

    input: (N, C) or (N, C, L). Extra keywords: `unbiased=True` normalises with the N-1 variance;
    `activation="tanh"|"relu"` applies the activation in the same kernel. momentum=None (cumulative
    average) computes 1 / num_batches_tracked on device, with no host sync.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        unbiased: bool = False,
        activation: str | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"BatchNorm1d: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(unbiased, bool):
            raise TypeError(f"BatchNorm1d: unbiased must be a bool, got {type(unbiased).__name__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.unbiased = unbiased
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Same rules as torch's _BatchNorm.forward: batch statistics in training, or in eval when no
        # running stats are kept; running stats updated only in training with track_running_stats.
        training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        momentum = 0.0 if self.momentum is None else self.momentum
        _check_args(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.unbiased,
            self.activation,
            op=type(self).__name__,
            num_features=self.num_features,
        )
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: momentum = 1 / num_batches_tracked, on device
                dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
                momentum = self.num_batches_tracked.to(dtype).reciprocal()
        return _batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.unbiased,
            self.activation,
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.unbiased:
            extra += ", unbiased=True"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        return extra
