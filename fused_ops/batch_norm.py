"""BatchNorm over (N, C, *) with a fused residual add and activation: checks, PyTorch path, Function,
op, modules.

Shapes: input (N, C, *) with any number of trailing dims; weight, bias, running_mean, running_var (C,);
residual like input. Statistics are per channel c over N and the trailing dims: n = N * prod(*) values.

Reads top to bottom: argument checks, the layout (how an (N, C, *) input reaches the backends), the
PyTorch path (the reference every backend is checked against), the autograd Function and the dispatch
(the Triton kernels, the native CPU kernels or the PyTorch path, chosen in one place), the functional
`batch_norm`, the modules `BatchNorm1d/2d/3d`.

The op computes y = act(u), u = gamma * xhat + beta (+ residual), xhat = (x - mean) * invstd. With
g = dy * act'(u), the gradient at u (and the residual's gradient):
    dx     = gamma * invstd / n * (n * g - sum(g) - xhat * sum(g * xhat))     training, biased variance
    dx     = same with the last term times k = n / (n - 1)                    training, unbiased=True
    dx     = g * gamma * invstd_running                                       eval (running stats)
    dgamma = sum(g * xhat),  dbeta = sum(g),  dresidual = g
    act'   = 1 (None), y > 0 (relu), 1 - y^2 (tanh), s * (1 + u * (1 - s)) with s = sigmoid(u) (silu)

Backend interface (the Triton and the native kernels mirror it; so must any other backend). Every backend gets the
input as `_flatten` leaves it, x: (M, C) or (N, C, L) (see "Layout"), and is called with keywords:
    forward(x, weight, bias, running_mean, running_var, residual, *, momentum, eps, training, unbiased,
            activation) -> (y: contiguous, x's shape and dtype; mean, invstd: (C,) in `stat_dtype`)
        updates the running stats in place in training mode
    backward(dy, x, y, residual, weight, bias, mean, invstd, *, training, unbiased, activation,
             residual_grad) -> (dx, dweight, dbias: (C,) in `stat_dtype`, dresidual or None)
        y is the forward's output for relu/tanh and None otherwise; residual is given for silu only
        (to recompute u); dresidual is computed when residual_grad (dy itself without an activation)
"""

from __future__ import annotations

import inspect
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.autograd.function import once_differentiable

from fused_ops.backend import BackendUnavailableError, requested_backend, select

ACTIVATIONS = (None, "relu", "tanh", "silu")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Which activations keep the output y for the backward (relu: y > 0, tanh: 1 - y^2); silu cannot be
# inverted from its output, so its backward recomputes u from x (and the residual) instead.
_SAVES_OUTPUT = ("relu", "tanh")


# ----------------------------------------------------------------------------------------------------
# Argument checks: every misuse raises here, before anything (running stats included) is touched.
# ----------------------------------------------------------------------------------------------------
def _check_channel_tensor(
    name: str, t: object, input: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str
) -> None:
    """A (C,) tensor of a dtype in `allowed` (input's, and float32 beside fp16/bf16 input). That it is a
    tensor on input's device is `_check_args`'s to check, which runs first."""
    num_features = input.shape[1]
    if t.shape != (num_features,):
        raise ValueError(
            f"{op}: {name} must have shape ({num_features},) to match input's C = {num_features}, "
            f"got {tuple(t.shape)}"
        )
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names} for {input.dtype} input, got {t.dtype}")


def _check_residual(residual: object, input: torch.Tensor, op: str) -> None:
    """A tensor of input's very shape (no broadcasting), dtype and device."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(
            f"{op}: residual must have input's shape {tuple(input.shape)} (it is added to the normalised "
            f"input, without broadcasting), got {tuple(residual.shape)}"
        )
    if residual.dtype != input.dtype:
        raise TypeError(
            f"{op}: residual must have input's dtype {input.dtype}, got {residual.dtype}; "
            f"convert it with residual.to({input.dtype})"
        )
    if residual.device != input.device:
        raise ValueError(f"{op}: residual is on {residual.device} but input is on {input.device}")


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
    residual: torch.Tensor | None = None,
    *,
    op: str = "batch_norm",
    whole_batch: bool = True,
    num_features: int | None = None,
    input_ndims: tuple[int, ...] | None = None,
    tensors: bool = True,
) -> None:
    """Raise a clear error naming the bad argument; checks shapes, dtypes and devices, never values.

    The one checker of BatchNorm's arguments, for the functional op, the modules and SyncBatchNorm:
    `op` names the caller in the messages. whole_batch=False is SyncBatchNorm's: input is one rank's
    share of the batch, which may hold one row or none, so "more than one value per channel" cannot be
    judged from it (the group's count is a device tensor, and SyncBatchNorm leaves the running stats
    untouched when it is below 2, without a host sync). num_features: a module's feature count, which
    input's dim 1 must match. input_ndims: the dims a module takes (BatchNorm2d: (4,)), None for any >= 2.
    tensors=False leaves out the shapes and dtypes of weight, bias and the running stats
    (`_check_channel_tensors`), which `_batch_norm` checks: the native op checks them itself, before it
    changes anything, and the Python check then words its error (tests/test_batch_norm.py runs every bad
    input on both backends).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: input must be a floating-point tensor (fp16/bf16/fp32/fp64), got {input.dtype}"
        )
    shape = input.shape  # read once: each read builds a torch.Size (these checks run on every call)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{op}: input must be (N, C, *) with a batch and a channel dim, got {ndim}-D "
            f"{tuple(shape)}; for a single sample of C features use input.unsqueeze(0) (and "
            f"training=False: one value per channel has no batch statistics)"
        )
    if input_ndims is not None and ndim not in input_ndims:
        raise ValueError(_wrong_ndim_message(op, input, input_ndims))
    channels = shape[1]
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"{op}: the module has num_features={num_features}, but input has {channels} features in "
            f"dim 1 (input shape {tuple(shape)}); build it as {op}({channels}) or fix the input"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be tensors or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required in eval mode (training=False)")
    cpu = input.is_cpu
    for t in (running_mean, running_var, weight, bias):
        # is_cpu first: no device objects to build in the common case
        if t is not None and not (
            isinstance(t, torch.Tensor) and (cpu and t.is_cpu or t.device == input.device)
        ):
            _raise_channel_tensor_kind(input, running_mean, running_var, weight, bias, op)
    if tensors:
        _check_channel_tensors(input, running_mean, running_var, weight, bias, op)
    if residual is not None:
        _check_residual(residual, input, op)
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
    if eps < 0 or (training and eps == 0):  # torch's rule (2.13): var + eps must stay positive
        raise ValueError(
            f"{op}: eps must be positive in training and non-negative in eval, got {eps} (training={training})"
        )
    if not isinstance(unbiased, bool):
        raise TypeError(f"{op}: unbiased must be a bool, got {type(unbiased).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if whole_batch and training and channels > 0 and input.numel() == channels:  # N * prod(*) == 1
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got input size {tuple(shape)}"
        )


def _raise_channel_tensor_kind(
    input: torch.Tensor,
    running_mean: object,
    running_var: object,
    weight: object,
    bias: object,
    op: str,
) -> None:
    """The error for the first of the (C,) arguments that is not a tensor on input's device."""
    for name, t in _channel_arguments(running_mean, running_var, weight, bias):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")


def _check_channel_tensors(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    op: str = "batch_norm",
) -> None:
    """The shapes and dtypes of `_check_args`'s (C,) tensors."""
    allowed = (input.dtype, torch.float32) if input.dtype in _HALF_DTYPES else (input.dtype,)
    for name, t in _channel_arguments(running_mean, running_var, weight, bias):
        if t is not None:
            _check_channel_tensor(name, t, input, allowed, op)


def _channel_arguments(
    running_mean: object, running_var: object, weight: object, bias: object
) -> tuple[tuple[str, object], ...]:
    """The (C,) arguments with their names, in the order their errors are raised."""
    return (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))


_MODULE_FOR_NDIM = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _wrong_ndim_message(op: str, input: torch.Tensor, input_ndims: tuple[int, ...]) -> str:
    expected = " or ".join(f"{d}-D" for d in input_ndims)
    right = _MODULE_FOR_NDIM.get(input.ndim)
    fix = (
        f"use fused_ops.{right} for {input.ndim}-D input"
        if right is not None
        else "use fused_ops.batch_norm or fused_ops.SyncBatchNorm, which take (N, C, *) input"
    )
    return f"{op}: expected {expected} input, got {input.ndim}-D input of shape {tuple(input.shape)}; {fix}"


def _is_real(value: object) -> bool:
    """A real number and not a bool; a float is answered without numbers.Real's slower ABC check."""
    return type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def _check_activation(activation: object, unbiased: object, op: str) -> None:
    """The modules' extra constructor keywords."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"{op}: unbiased must be a bool, got {type(unbiased).__name__}")


# ----------------------------------------------------------------------------------------------------
# Layout: what the backends see. (N, C) and (N, C, L) input reaches them as it is. An input with more
# dims is flattened, as a view whenever its strides allow: channels_last / channels_last_3d input (and
# a strided input whose strides torch reads as that format, e.g. a slice of one) to (M, C) =
# (N * prod(*), C) rows, channels innermost; any other layout to (N, C, L), L = prod(*) (a copy when the
# trailing dims do not merge, e.g. a slice). The output is contiguous in that flat shape, so y comes back
# channels_last for channels_last input and contiguous otherwise, as torch's own BatchNorm.
# ----------------------------------------------------------------------------------------------------
class Layout(NamedTuple):
    """How an (N, C, *) input with more than 3 dims is flattened for the backends."""

    shape: torch.Size  # the input's shape
    channels_last: bool  # (M, C) rows; else (N, C, L)


def _layout(input: torch.Tensor) -> Layout | None:
    """None for 2-D and 3-D input, which the backends take as it is."""
    if input.ndim <= 3:
        return None
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.ndim)
    # An empty tensor is contiguous in every format: its strides tell which one it was made in.
    contiguous = input.is_contiguous() and (input.numel() > 0 or input.stride(1) != 1)
    channels_last = fmt is not None and not contiguous and input.is_contiguous(memory_format=fmt)
    if fmt is not None and not contiguous and not channels_last:
        # strided (e.g. a slice of a channels_last tensor): the format torch's own BatchNorm gives its
        # output, from the order of the strides (C innermost: channels_last), which the rows then take
        channels_last = suggest_memory_format(input) == fmt
    return Layout(input.shape, channels_last)


def _flatten(t: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """t (input's shape) as the backends see it: (M, C) rows or (N, C, L); a view when t's strides allow."""
    if layout is None:
        return t
    batch, num_features, *spatial = layout.shape
    length = 1
    for size in spatial:  # a loop, not math.prod: sizes may be symbolic under torch.compile
        length = length * size
    if layout.channels_last:
        return t.movedim(1, -1).reshape(batch * length, num_features)
    return t.reshape(batch, num_features, length)


def _unflatten(t: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """The inverse of `_flatten`: a contiguous flat t back to input's shape (channels_last for rows)."""
    if layout is None:
        return t
    if layout.channels_last:
        n, c, *spatial = layout.shape
        return t.reshape(n, *spatial, c).movedim(-1, 1)
    return t.reshape(layout.shape)


# ----------------------------------------------------------------------------------------------------
# PyTorch path. Large inputs on CPU pay as much for a fresh N x C buffer (page faults) as for a pass
# over it, so each direction allocates one such buffer (two for silu's backward) and works in place.
# fp16/bf16 x reaches the statistics' dtype by a converting copy into that buffer (`_centered`): an op
# that mixes it with fp32 (x - mean) takes ATen's dynamic-cast path on CPU, ~30x slower.
# ----------------------------------------------------------------------------------------------------
def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics (mean, invstd) are fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a call into torch when it already is (each call costs ~1 us)."""
    return t if t.dtype == dtype else t.to(dtype)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> a view that broadcasts against an (M, C) or (N, C, L) tensor."""
    return t if ndim == 2 else t.view(1, -1, 1)


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    return (0,) if ndim == 2 else (0, 2)


def _count(x: torch.Tensor) -> int:
    """n: values per channel."""
    return x.numel() // max(x.shape[1], 1)


def _centered(x: torch.Tensor, mean: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x - mean per channel in mean's dtype (the statistics'), into `out` or a new N x C buffer."""
    mean = _channel_view(mean, x.ndim)
    if x.dtype == mean.dtype:
        return torch.sub(x, mean) if out is None else torch.sub(x, mean, out=out)
    out = torch.empty_like(x, dtype=mean.dtype) if out is None else out
    return out.copy_(x).sub_(mean)


def _scaled(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """x * scale + shift per channel in scale's dtype, into `out` (x's shape) or a new buffer."""
    if x.dtype != scale.dtype:  # fp16/bf16: a converting copy, then in place (see `_centered`)
        out = x.to(scale.dtype) if out is None else out.copy_(x)
        return _affine_(out, scale, shift)
    if x.ndim == 2:
        return torch.addcmul(shift, x, scale) if out is None else torch.addcmul(shift, x, scale, out=out)
    scale_view = _channel_view(scale, x.ndim)
    out = torch.mul(x, scale_view) if out is None else torch.mul(x, scale_view, out=out)
    return out.add_(_channel_view(shift, x.ndim))


def _affine_(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """t = t * scale + shift in place, scale and shift (C,). One addcmul over (M, C); over (N, C, L),
    where addcmul's broadcast along the inner dim is several times slower on CPU, a mul_ and an add_."""
    if t.ndim == 2 and shift is not None:
        return torch.addcmul(shift, t, scale, out=t)
    t = t.mul_(_channel_view(scale, t.ndim))
    return t if shift is None else t.add_(_channel_view(shift, t.ndim))


def _activate(u: torch.Tensor, activation: str | None) -> torch.Tensor:
    """activation(u) out of place."""
    if activation == "relu":
        return u.relu()
    if activation == "tanh":
        return u.tanh()
    if activation == "silu":
        return F.silu(u)
    return u


def _activate_(u: torch.Tensor, activation: str | None) -> torch.Tensor:
    """activation(u) in place."""
    if activation == "relu":
        return u.relu_()
    if activation == "tanh":
        return u.tanh_()
    if activation == "silu":
        return F.silu(u, inplace=True)
    return u


def _pre_activation(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """u = (x - mean) * scale + shift (+ residual), a new tensor in the statistics' dtype."""
    u = _affine_(_centered(x, mean), scale, shift)
    return u if residual is None else u.add_(residual)


def _activation_grad(
    dy: torch.Tensor, y: torch.Tensor | None, u: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """g = dy * act'(u), in dy's dtype (the statistics'): from the saved output y for relu and tanh,
    from the recomputed u for silu (whose buffer it reuses). Without an activation, dy itself."""
    if activation == "relu":  # y = max(u, 0): du = dy where y > 0, else 0 (torch.where: 25x slower on CPU)
        return torch.ops.aten.threshold_backward(dy, _to(y, dy.dtype), 0)
    if activation == "tanh":  # d tanh(u)/du = 1 - tanh(u)^2: dy - dy * y * y, written over y * y
        y_sq = _to(y, dy.dtype).square()
        return torch.addcmul(dy, dy, y_sq, value=-1, out=y_sq)
    if activation == "silu":  # d (u * s)/du = s * (1 + u * (1 - s)), s = sigmoid(u)
        s = torch.sigmoid(u)
        return u.addcmul_(u, s, value=-1).add_(1).mul_(s).mul_(dy)  # u -> u (1 - s) -> ... -> g
    return dy


def _grad_at_u(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """g = dy * act'(u) in the statistics' dtype: the gradient at the affine output, and the residual's."""
    u = _pre_activation(x, residual, mean, scale, shift) if activation == "silu" else None
    return _activation_grad(_to(dy, mean.dtype), y, u, activation)


def _grad_sums(
    g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum(g) = dbeta, sum(g * xhat) = dgamma, an N x C buffer for dx), the sums over this batch.

    sum(g * xhat) = invstd * sum(g * (x - mean)): the product is formed in the buffer that then takes dx.
    """
    dims = _reduce_dims(x.ndim)
    buffer = _centered(x, mean)
    sum_g_xhat = buffer.mul_(g).sum(dims).mul_(invstd)
    return g.sum(dims), sum_g_xhat, buffer


def _training_input_grad_(
    buffer: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    scale: torch.Tensor,
    sum_g: torch.Tensor,
    sum_g_xhat: torch.Tensor,
    count: int | torch.Tensor,
    unbiased: bool,
) -> torch.Tensor:
    """Training dx, built in place in `buffer` (x's shape, the statistics' dtype).

    dx = gamma*invstd * (g - sum(g)/n - xhat * sum(g*xhat) * k/n), k = n/(n-1) with unbiased=True;
    with xhat = (x - mean) * invstd: scale * ((x - mean) * coef + g) - scale * sum(g)/n, where
    coef = -invstd * sum(g*xhat) * k/n. n (`count`) may be a device tensor (SyncBatchNorm's group count).
    """
    k_over_n = 1.0 / (count - 1) if unbiased else 1.0 / count
    coef = sum_g_xhat * invstd * -k_over_n
    dx = _affine_(_centered(x, mean, out=buffer), coef, None).add_(g)
    return _affine_(dx, scale, sum_g * scale * (-1.0 / count))


def _update_running(running: torch.Tensor, batch: torch.Tensor, momentum: float | torch.Tensor) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, computed in batch's dtype.

    Written as torch writes it, not as lerp: lerp(running, inf, 1) is nan (inf - inf), torch's is inf
    (a variance that overflows; found by tests/test_fuzz.py)."""
    stats = running if running.dtype == batch.dtype else running.to(batch.dtype)  # fp16/bf16: round once
    stats.mul_(1 - momentum).add_(batch * momentum)
    if stats is not running:
        running.copy_(stats)


def _scale_shift(
    invstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-channel scale = gamma * invstd and shift = beta, in invstd's dtype."""
    scale = invstd if weight is None else invstd * weight
    return scale, None if bias is None else _to(bias, invstd.dtype)


def forward_torch(
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
    """x: (M, C) or (N, C, L), residual like x or None -> (y like x, mean (C,), invstd (C,)), the
    statistics in `stat_dtype`. The backend interface's forward (module docstring).

    Training normalises with the batch statistics and, when running stats are given, updates them in
    place with the unbiased variance: running = (1 - momentum) * running + momentum * batch.
    Eval normalises with the running stats folded into one scale and shift per channel,
    y = act(x * gamma * invstd + (beta - mean * gamma * invstd) + residual), as torch's CPU kernel does
    (one pass over x). Training applies them to x - mean instead, y = act((x - mean) * gamma * invstd +
    beta + residual): folding would round x * gamma * invstd, which for |mean| >> std is far larger
    than y (found by tests/test_fuzz.py: a zero-variance channel at 1e4 lost 0.3 in float32).

    Training takes the batch variance in two passes, the mean and then the mean square of x - mean
    (accurate when |mean| >> std), squaring x - mean in place in the output's buffer, which then
    receives x - mean again and y over it: one N x C allocation in all. fp16/bf16 input is converted
    once into that buffer (a conversion costs as much as a fresh buffer's page faults).
    """
    stat = stat_dtype(x.dtype)
    num_features, count = x.shape[1], _count(x)
    if count == 0:  # as PyTorch: empty output, zero statistics, running stats untouched
        mean = torch.zeros(num_features, dtype=stat, device=x.device)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), mean, torch.zeros_like(mean)
    out = centered = None
    if not training:
        mean = _to(running_mean, stat)
        invstd = torch.rsqrt(_to(running_var, stat) + eps)
    else:
        dims = _reduce_dims(x.ndim)
        if x.dtype == stat:
            mean = x.mean(dims)
            out = _centered(x, mean)  # x - mean: the N x C buffer
            var = out.square_().mean(dims)  # biased: sum((x - mean)^2) / n, squared in place
            # x - mean again, into the buffer that takes y: the affine then never rounds x * gamma * invstd,
            # which for |mean| >> std holds far more than y (a zero-variance channel gives beta exactly)
            centered = _centered(x, mean, out=out)
        else:  # fp16/bf16: converted once into the buffer, which stays x - mean for an unfolded affine
            centered = x.to(stat)
            mean = centered.mean(dims)
            var = torch.mul(centered.sub_(_channel_view(mean, x.ndim)), centered).mean(dims)
        var_unbiased = var * (count / (count - 1)) if unbiased or running_mean is not None else None
        invstd = torch.rsqrt((var_unbiased if unbiased else var) + eps)
        if running_mean is not None:
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var_unbiased, momentum)
    scale, shift = _scale_shift(invstd, weight, bias)
    if torch.compiler.is_compiling():
        # Out of place under torch.compile: torch 2.11's compile returns a zero input gradient from a
        # Function whose output was written in place over one of its intermediates (found by CI's torch
        # 2.11 run). Inductor plans the buffers itself anyway; eager keeps the in-place saving below.
        u = (_to(x, stat) - _channel_view(mean, x.ndim)) * _channel_view(scale, x.ndim)
        if shift is not None:
            u = u + _channel_view(shift, x.ndim)
        if residual is not None:
            u = u + residual
        return _to(_activate(u, activation), x.dtype), mean, invstd
    if centered is not None:
        out = _affine_(centered, scale, shift)  # y = (x - mean) * scale + beta
    else:
        folded = shift - mean * scale if shift is not None else -mean * scale
        out = _scaled(x, scale, folded, out)  # y = x * scale + (beta - mean * scale)
    if residual is not None:
        out = out.add_(residual)
    out = _activate_(out, activation)
    return _to(out, x.dtype), mean, invstd


def backward_torch(
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
    """dy, x: (M, C) or (N, C, L) -> (dx like x, dgamma (C,), dbeta (C,), dresidual like x or None).
    The backend interface's backward (module docstring).

    y: the forward's output for relu/tanh (else None); residual: for silu (else None). dgamma and dbeta
    come back in the statistics dtype; the caller casts them to weight/bias's dtype. dresidual (when
    residual_grad) is g in x's dtype, dy itself without an activation. xhat is never formed: invstd
    and gamma meet only (C,) vectors, and dx is built in place in one N x C buffer, x - mean.
    """
    count = _count(x)
    if count == 0:  # empty batch: empty dx, zero dgamma and dbeta (as PyTorch)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dresidual = torch.empty_like(dx) if residual_grad else None
        return dx, torch.zeros_like(mean), torch.zeros_like(mean), dresidual
    scale, shift = _scale_shift(invstd, weight, bias)
    g = _grad_at_u(dy, x, y, residual, mean, scale, shift, activation)
    dresidual = None
    if residual_grad:
        dresidual = dy if activation is None else _to(g, dy.dtype)
    sum_g, sum_g_xhat, buffer = _grad_sums(g, x, mean, invstd)
    if training:
        dx = _training_input_grad_(buffer, x, g, mean, invstd, scale, sum_g, sum_g_xhat, count, unbiased)
    else:  # running stats are constants: dx = g * gamma * invstd_running
        dx = torch.mul(g, _channel_view(scale, x.ndim), out=buffer)
    return _to(dx, x.dtype), sum_g_xhat, sum_g, dresidual


# ----------------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------------
def _kernels():
    from fused_ops.kernels.triton import batch_norm as kernels  # lazily: only when Triton is chosen

    return kernels


_native_ops = None  # fused_ops.kernels.cpu.batch_norm, once a call has run the native backend


def _native_kernels():
    global _native_ops
    if _native_ops is None:
        from fused_ops.kernels.cpu import batch_norm as kernels  # loaded by backend.select already

        _native_ops = kernels
    return _native_ops


def _backend(backend: str):
    """(forward, backward) of the chosen backend ("triton", "native" or "torch"): the one place that maps
    the dispatch decision to code."""
    if backend == "triton":
        kernels = _kernels()
        return kernels.batch_norm_forward, kernels.batch_norm_backward
    if backend == "native":
        kernels = _native_kernels()
        return kernels.batch_norm_forward, kernels.batch_norm_backward
    return forward_torch, backward_torch


class BatchNormFunction(torch.autograd.Function):
    """y = act(gamma * xhat + beta + residual) on flat input; backward as in the module docstring."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        residual: torch.Tensor | None,
        momentum: float | torch.Tensor,
        eps: float,
        training: bool,
        unbiased: bool,
        activation: str | None,
        backend: str,
    ) -> torch.Tensor:
        forward, _ = _backend(backend)
        y, mean, invstd = forward(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            residual,
            momentum=momentum,
            eps=eps,
            training=training,
            unbiased=unbiased,
            activation=activation,
        )
        # Saved: x (for xhat), gamma, the statistics' mean and invstd (C values each, fp32; fp64 for fp64
        # input; the running stats' in eval mode); for relu and tanh the output y, for their derivative;
        # for silu beta and the residual, to recompute u = gamma * xhat + beta + residual.
        silu = activation == "silu"
        ctx.save_for_backward(
            input,
            weight,
            bias if silu else None,
            mean,
            invstd,
            y if activation in _SAVES_OUTPUT else None,
            residual if silu else None,
        )
        ctx.config = (training, unbiased, activation, backend)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # double backward raises "trying to differentiate twice a function ..."
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, mean, invstd, y, residual = ctx.saved_tensors
        training, unbiased, activation, backend = ctx.config
        needs_dx, needs_dweight, needs_dbias, _, _, needs_dresidual = ctx.needs_input_grad[:6]
        _, backward = _backend(backend)
        dx, dweight, dbias, dresidual = backward(
            dy,
            x,
            y,
            residual,
            weight,
            bias,
            mean,
            invstd,
            training=training,
            unbiased=unbiased,
            activation=activation,
            residual_grad=needs_dresidual,
        )
        dx = dx if needs_dx else None
        dweight = _to(dweight, weight.dtype) if needs_dweight else None
        dbias = _to(dbias, ctx.bias_dtype) if needs_dbias else None
        return dx, dweight, dbias, None, None, dresidual, None, None, None, None, None, None


def _select_backend(input: torch.Tensor) -> str:
    """The dispatch decision: "triton", "native" or "torch" (fused_ops.backend.select), after
    `_check_args`, which has checked that every tensor of the call is on input's device. The Triton
    kernels take fp16/bf16/fp32 input: float64 stays on the PyTorch path under "auto" and is an error
    when "triton" is forced. The native kernels take every float dtype. Raises before any state changes."""
    backend = select("batch_norm", input)
    if backend != "triton" or input.dtype != torch.float64:
        return backend
    if requested_backend() == "triton":
        raise BackendUnavailableError(
            "batch_norm: the Triton kernels take fp16/bf16/fp32 input, got float64; "
            "use backend 'torch' or 'auto'"
        )
    return "torch"


def _batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | torch.Tensor | None,
    eps: float,
    unbiased: bool,
    activation: str | None,
    residual: torch.Tensor | None,
    backend: str,
    num_batches_tracked: torch.Tensor | None = None,
    op: str = "batch_norm",
) -> torch.Tensor:
    """`batch_norm` after `_check_args(..., tensors=False)` and the backend choice (`_select_backend`):
    checks the (C,) tensors, flattens the input and runs the native op (its autograd in C++), or applies
    the Function, or, when no gradient is needed, runs the forward alone (the same output and running-stat
    update, without the cost of recording an autograd node).

    num_batches_tracked: a module's counter, to add 1 to (the native op does it, after its own checks);
    momentum None then means the cumulative average, 1 / num_batches_tracked once counted. op: the
    caller's name, for the messages.
    """
    layout = _layout(input)
    x = _flatten(input, layout)
    residual_flat = None if residual is None else _flatten(residual, layout)
    if backend == "native":
        if num_batches_tracked is not None and not _native_counter(num_batches_tracked):
            # A counter the op does not take (float, int32 or (1,), e.g. loaded with assign=True): counted
            # here, as the other backends count, once the (C,) tensors are known to pass.
            _check_channel_tensors(input, running_mean, running_var, weight, bias, op)
            momentum = _count_batch(num_batches_tracked, momentum, input.dtype)
            num_batches_tracked = None
        try:
            y = _native_batch_norm(
                x,
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
                residual_flat,
                training,
                momentum,
                eps,
                unbiased,
                activation,
            )
        except (TypeError, ValueError):
            # The op checked the (C,) tensors before changing anything; when one of them is the fault,
            # it is raised in the words of the other backends, with the caller's name.
            try:
                _check_channel_tensors(input, running_mean, running_var, weight, bias, op)
            except (TypeError, ValueError) as error:
                raise error from None
            raise
        return _unflatten(y, layout)
    _check_channel_tensors(input, running_mean, running_var, weight, bias, op)
    if num_batches_tracked is not None:
        momentum = _count_batch(num_batches_tracked, momentum, input.dtype)
    if momentum is None:  # no running stats to update
        momentum = 0.0
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ):
        y = BatchNormFunction.apply(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            residual_flat,
            momentum,
            float(eps),
            training,
            unbiased,
            activation,
            backend,
        )
    else:
        forward, _ = _backend(backend)
        with torch.no_grad():  # as inside Function.forward: the ops skip autograd's bookkeeping
            y = forward(
                x,
                weight,
                bias,
                running_mean,
                running_var,
                residual_flat,
                momentum=momentum,
                eps=float(eps),
                training=training,
                unbiased=unbiased,
                activation=activation,
            )[0]
    return _unflatten(y, layout)


def _native_counter(num_batches_tracked: torch.Tensor) -> bool:
    """A counter the native op counts itself: torch's own, a 0-dim int64 CPU tensor."""
    return (
        num_batches_tracked.dtype == torch.int64
        and num_batches_tracked.ndim == 0
        and num_batches_tracked.is_cpu
    )


def _count_batch(
    num_batches_tracked: torch.Tensor, momentum: float | torch.Tensor | None, dtype: torch.dtype
) -> float | torch.Tensor | None:
    """num_batches_tracked += 1, as torch's modules count; returns the momentum to use: for None the
    cumulative average 1 / num_batches_tracked, as a 0-dim tensor on the counter's device (no host sync)."""
    num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    return num_batches_tracked.to(stat_dtype(dtype)).reciprocal().reshape(())


def _native_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    momentum: float | torch.Tensor | None,
    eps: float,
    unbiased: bool,
    activation: str | None,
) -> torch.Tensor:
    """fused_ops::batch_norm, the native op, on flat x: y, and one autograd node (in C++) when a gradient
    is needed. The call passes the arguments only up to the last that differs from the op's defaults
    (momentum 0.1, eps 1e-5, biased): the boxed call converts each one it gets."""
    kernels = _native_kernels()
    code = kernels.ACTIVATIONS[activation]
    head = (x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, code)
    if isinstance(momentum, torch.Tensor):
        return kernels.batch_norm(*head, 0.0, momentum, float(eps), unbiased)
    momentum = None if momentum is None else float(momentum)  # None: the op's cumulative average
    if unbiased or eps != 1e-5:
        return kernels.batch_norm(*head, momentum, None, float(eps), unbiased)
    if momentum != 0.1:
        return kernels.batch_norm(*head, momentum)
    return kernels.batch_norm(*head)


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
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """BatchNorm as `torch.nn.functional.batch_norm`, with a fused residual add and activation.

    Computes act(batch_norm(input) + residual) in one pass and returns a tensor like input.

    input: (N, C, *), any number of trailing dims (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), in
    any memory format; the output is channels_last (channels_last_3d) for such input and contiguous
    otherwise, as torch's. running_mean, running_var, weight, bias: (C,) or None. residual: None or a
    tensor of input's shape, dtype and device (the ResNet block's identity), whose gradient the backward
    returns. fp16/bf16 input keeps fp32 statistics; weight, bias and running stats may be fp32 beside it.

    training=True normalises with the batch mean and biased variance (the n-1 variance with
    unbiased=True, as the backprop-ninja notebook does) and, when running stats are given, updates them
    in place with the unbiased variance. training=False uses the running stats. `momentum` may be a
    0-dim tensor (e.g. 1 / num_batches_tracked for a cumulative average) so that it stays on device.

    activation: None, "relu", "tanh" or "silu", applied after the add, its derivative folded into the
    backward. What each keeps for the backward, besides x and the (C,) statistics:
        relu  the output y (dy where y > 0): y is what the next layer reads, and keeps, anyway
        tanh  the output y (dy * (1 - y^2)): no pre-activation tensor is stored
        silu  nothing more: silu is not invertible from its output, so the backward recomputes
              u = gamma * xhat + beta (+ residual) from x (and keeps a reference to the residual),
              rather than storing u, which would cost a write in the forward and an N x C buffer
        None  nothing more; the residual's gradient is dy itself.

    Raises TypeError/ValueError naming the argument on bad input (e.g. 1-D input, a residual of another
    shape, dtype or device, an unknown activation, eps <= 0 in training or < 0 in eval, as torch 2.13),
    before any running stat changes. Under
    torch.autocast it runs in input's dtype, as torch's batch_norm does (it is on none of autocast's
    lists): bf16 in, bf16 out, float32 statistics.
    """
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, activation)
    _check_args(*args, residual, tensors=False)
    backend = _select_backend(input)  # every tensor is on input's device (checked)
    return _batch_norm(*args, residual, backend)


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------
# torch >= 2.12 takes BatchNorm(..., bias=False): an affine weight without a bias. Before that, the
# modules here emulate it with torch's own mechanics (bias registered as None).
_TORCH_TAKES_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


def _own_tensors(
    module: nn.Module,
) -> tuple[
    torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
]:
    """(weight, bias, running_mean, running_var, num_batches_tracked) of a BatchNorm module.

    Read from its parameter and buffer dicts, which is where `module.weight` finds them: an attribute
    read first fails the regular lookup (building an AttributeError) and then calls nn.Module.__getattr__,
    ~0.7 us apiece, a tenth of a makemore-sized call. torch registers all five, None when unused; a name
    missing from its dict (a parametrization replaces it with a property) sends every read to the
    attributes."""
    parameters, buffers = module._parameters, module._buffers
    try:
        return (
            parameters["weight"],
            parameters["bias"],
            buffers["running_mean"],
            buffers["running_var"],
            buffers["num_batches_tracked"],
        )
    except KeyError:
        return module.weight, module.bias, module.running_mean, module.running_var, module.num_batches_tracked


class _FusedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The constructor and forward that BatchNorm1d/2d/3d and SyncBatchNorm share: torch's constructor
    (with `bias=` on every supported torch) plus `unbiased` and `activation`; forward(input, residual)."""

    _input_ndims: tuple[int, ...] | None = None  # what forward takes; None: any (N, C, *)

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
        bias: bool = True,
        unbiased: bool = False,
        activation: str | None = None,
    ) -> None:
        name = type(self).__name__
        _check_activation(activation, unbiased, name)
        if not isinstance(bias, bool):
            raise TypeError(f"{name}: bias must be a bool, got {type(bias).__name__}")
        args = (num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if _TORCH_TAKES_BIAS:
            super().__init__(*args, bias=bias)
        else:
            super().__init__(*args)
            if affine and not bias:  # as torch >= 2.12 does: no parameter, no state_dict key
                self.register_parameter("bias", None)
        self.unbiased = unbiased
        self.activation = activation

    def reset_parameters(self) -> None:
        """torch's (>= 2.12): a bias of None is left alone."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self._input_ndims is not None and input.ndim not in self._input_ndims:
            raise ValueError(_wrong_ndim_message(type(self).__name__, input, self._input_ndims))

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(BatchNorm(input) + residual); residual None or a tensor of input's shape and dtype."""
        weight, bias, running_mean, running_var, num_batches_tracked = _own_tensors(self)
        # Same rules as torch's _BatchNorm.forward: batch statistics in training, or in eval when no
        # running stats are kept; running stats updated (and batches counted) only in training with
        # track_running_stats.
        training = self.training or (running_mean is None and running_var is None)
        counting = self.training and self.track_running_stats
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        op = type(self).__name__
        _check_args(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            self.unbiased,
            self.activation,
            residual,
            op=op,
            num_features=self.num_features,
            input_ndims=self._input_ndims,
            tensors=False,
        )
        backend = _select_backend(input)  # every tensor is on input's device (checked)
        return _batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            self.momentum,
            self.eps,
            self.unbiased,
            self.activation,
            residual,
            backend,
            num_batches_tracked if counting else None,
            op,
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if not _TORCH_TAKES_BIAS and self.affine and self.bias is None:
            extra += ", bias=False"
        if self.unbiased:
            extra += ", unbiased=True"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        return extra


class BatchNorm1d(_FusedBatchNorm, nn.BatchNorm1d):
    """Drop-in `torch.nn.BatchNorm1d` (same arguments, state_dict and train/eval behaviour) on fused ops.

    input: (N, C) or (N, C, L); forward(input, residual=None) computes act(BatchNorm(input) + residual).
    Extra keywords: `unbiased=True` normalises with the n-1 variance; `activation="relu"|"tanh"|"silu"`
    applies the activation in the same pass; `bias=False` (torch >= 2.12's keyword, on every torch
    here) keeps the weight without a bias. momentum=None (cumulative average) computes
    1 / num_batches_tracked on device, with no host sync. See `fused_ops.batch_norm`.
    """

    _input_ndims = (2, 3)


class BatchNorm2d(_FusedBatchNorm, nn.BatchNorm2d):
    """Drop-in `torch.nn.BatchNorm2d` on fused ops: input (N, C, H, W), contiguous or channels_last (the
    output keeps it). forward(input, residual=None) computes act(BatchNorm(input) + residual): a ResNet
    block's `out = self.bn2(out, residual=identity)` with activation="relu" is its bn2, add and relu in
    one op. Extra keywords as `BatchNorm1d`."""

    _input_ndims = (4,)


class BatchNorm3d(_FusedBatchNorm, nn.BatchNorm3d):
    """Drop-in `torch.nn.BatchNorm3d` on fused ops: input (N, C, D, H, W), contiguous or channels_last_3d.
    forward(input, residual=None) and extra keywords as `BatchNorm2d`."""

    _input_ndims = (5,)
