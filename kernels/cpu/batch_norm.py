"""The native BatchNorm ops (kernels in batch_norm.cpp beside this file): their fake kernels, the op
handles, and the backend interface of fused_ops/batch_norm.py (`batch_norm_forward`,
`batch_norm_backward`) on top of them.

Imported by `build.load()` once the library that defines the ops is loaded, never before.

x is the input as fused_ops/batch_norm.py's `_flatten` leaves it: (M, C) rows, channels innermost, or
(N, C, L); residual like x; weight, bias, running_mean, running_var (C,) or None. activation is a code
(ACTIVATIONS). Statistics are float32, float64 for float64 input.

    batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training,
               activation, momentum, momentum_tensor, eps, unbiased) -> y
        differentiable (its autograd is registered in C++); updates the running stats in place in
        training; momentum_tensor (a 0-dim tensor), when given, replaces momentum. num_batches_tracked
        (a module's int64 counter), when given, is incremented once the arguments are checked, and
        momentum None is then the cumulative average 1 / num_batches_tracked (0 without a counter).
    batch_norm_fwd(same arguments) -> (y, mean, invstd)
        the statistics too (in eval: running_mean and rsqrt(running_var + eps)); not differentiable.
    batch_norm_bwd(grad_output, x, output, residual, weight, bias, mean, invstd, training, unbiased,
                   activation, input_grad, residual_grad) -> (dx, dweight, dbias, dresidual)
        output: the forward's y (needed for relu and tanh); residual: needed for silu; dx has x's
        shape when input_grad, else (0,); dresidual = dy * act'(u) when residual_grad, else (0,);
        dweight, dbias in the statistics' dtype.

y, dx and dresidual are contiguous in x's shape. The fake kernels give what the CPU kernels return
(shapes, dtypes, strides) for torch.compile and `torch.library.opcheck`; they read no values.
"""

from __future__ import annotations

import torch

ACTIVATIONS = {None: 0, "relu": 1, "tanh": 2, "silu": 3}


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fused_ops::batch_norm")
def _batch_norm_fake(
    input, weight=None, bias=None, running_mean=None, running_var=None, num_batches_tracked=None,
    residual=None, training=False, activation=0, momentum=0.1, momentum_tensor=None, eps=1e-5, unbiased=False,
):  # fmt: skip
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_ops::batch_norm_fwd")
def _batch_norm_fwd_fake(
    input, weight=None, bias=None, running_mean=None, running_var=None, num_batches_tracked=None,
    residual=None, training=False, activation=0, momentum=0.1, momentum_tensor=None, eps=1e-5, unbiased=False,
):  # fmt: skip
    channels = input.new_empty((input.shape[1],), dtype=_stat_dtype(input))
    return input.new_empty(input.shape), channels, torch.empty_like(channels)


@torch.library.register_fake("fused_ops::batch_norm_bwd")
def _batch_norm_bwd_fake(
    grad_output, input, output, residual, weight, bias, mean, invstd, training, unbiased, activation,
    input_grad, residual_grad,
):  # fmt: skip
    channels = input.new_empty((input.shape[1],), dtype=_stat_dtype(input))
    dx = input.new_empty(input.shape if input_grad else (0,))
    dresidual = input.new_empty(input.shape if residual_grad else (0,))
    return dx, channels, torch.empty_like(channels), dresidual


batch_norm = torch.ops.fused_ops.batch_norm.default
batch_norm_fwd = torch.ops.fused_ops.batch_norm_fwd.default
batch_norm_bwd = torch.ops.fused_ops.batch_norm_bwd.default


# ----------------------------------------------------------------------------------------------------
# The backend interface (fused_ops/batch_norm.py's module docstring), for the paths that run the forward
# and the backward separately: SyncBatchNorm's normalisation and fused_ops.batch_norm's Function.
# ----------------------------------------------------------------------------------------------------
def batch_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    momentum: float | torch.Tensor,
    eps: float,
    training: bool,
    unbiased: bool,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (M, C) or (N, C, L) -> (y contiguous like x, mean (C,), invstd (C,)); updates the
    running stats in place in training. Same contract as `fused_ops.batch_norm.forward_torch`."""
    tensor = isinstance(momentum, torch.Tensor)
    return batch_norm_fwd(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        None,
        residual,
        training,
        ACTIVATIONS[activation],
        0.0 if tensor else float(momentum),
        momentum if tensor else None,
        float(eps),
        unbiased,
    )


def batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    training: bool,
    unbiased: bool,
    activation: str | None,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (dx like x, dgamma (C,), dbeta (C,), dresidual like x or None). Same contract as
    `fused_ops.batch_norm.backward_torch`: without an activation dresidual is dy itself."""
    code = ACTIVATIONS[activation]
    dx, dweight, dbias, dresidual = batch_norm_bwd(
        dy, x, y, residual, weight, bias, mean, invstd, training, unbiased, code, True, residual_grad and code != 0
    )
    if not residual_grad:
        return dx, dweight, dbias, None
    return dx, dweight, dbias, dy if code == 0 else dresidual
