"""Fused cross-entropy: the PyTorch reference path, the autograd Function, `cross_entropy()` and
`CrossEntropyLoss`.

Shapes: input (C,), (N, C) or (N, C, d1, ..., dK); index target (), (N,) or (N, d1, ..., dK);
probability target the shape of input. Internally every call works on M rows of C logits.

The math (the makemore notebook's `dlogits = (softmax - onehot) / n`, generalised). Write the loss of
row i as loss_i = -sum_c q_ic * logp_ic, with q the weighted, smoothed target distribution:
    index target y_i:    q_ic = (1 - eps) * w[y_i] * [c == y_i] + eps / C * w[c]   (0 for ignored rows)
    probability target:  q_ic = w[c] * ((1 - eps) * p_ic + eps / C)
Since logp_ic = z_ic - logsumexp(z_i), d(loss_i)/d(z_ic) = softmax_ic * sum_c q_ic - q_ic. The reduction
scales it: "mean" divides by sum_i w[y_i] over non-ignored rows (the count without weights), or by M
for probability targets, exactly as torch does; "sum" and "none" by 1. An ignored row adds exactly nothing,
whatever it holds (inf, nan): loss 0 and gradient 0 (torch's gradient there is nan when the row holds nan,
+inf or only -inf; its loss is 0, as here).

Two options, both off by default. z_loss (PaLM's auxiliary loss; Liger-Kernel's lse_square_scale) adds
z_loss * lse_i^2 to the loss of every counted row (non-ignored, or every row for probability targets),
lse_i = logsumexp_c(z_ic); its gradient 2 * z_loss * lse_i * softmax_ic folds into the first term:
    d(loss_i)/d(z_ic) = softmax_ic * (sum_c q_ic + 2 * z_loss * lse_i) - q_ic,
and the reduction scales it as the main term ("mean" over index targets: by 1 / sum_i w[y_i], the same
denominator, though the z-loss term itself is not weighted by w[y_i]). softcap (Gemma 2) computes all of
the above on z = softcap * tanh(x / softcap) and chains the gradient: dx = dz * (1 - tanh(x / softcap)^2).

One pass: the forward computes the loss and, when input requires grad, this gradient for a unit
upstream gradient (the PyTorch path below with the formula, the Triton kernels in the same sweep over
the logits); the backward only scales it by grad_output, on the device, with no host sync.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from fused_ops.backend import BackendUnavailableError, native_selected, requested_backend, select

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)  # torch accepts int64 and uint8; int32 as well here
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take
INPUT_DTYPES = (torch.float64, *KERNEL_DTYPES)
HALF_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------
# Argument checking: one helper, run before anything is computed or written.
# ----------------------------------------------------------------------------------------------------
def _check_args(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    *,
    op: str = "cross_entropy",
    input_name: str = "input",
    sharded: bool = False,
    tensors: bool = True,
) -> None:
    """Raise a clear exception naming the bad argument; touch nothing. Reads no tensor values (the
    range of index targets is `_check_target_range`'s job).

    The one checker of cross-entropy's arguments, also for its vocab-parallel twin: `op` and
    `input_name` name the caller and its logits argument in the messages; sharded=True checks a rank's
    slice of the classes (C_r = 0 allowed, weight the rank's (C_r,) slice, index targets only).
    tensors=False leaves out the dtypes and shapes of the tensors, for the native op, which checks
    them itself with the same messages (tests/test_cross_entropy.py runs every bad input on both).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: {input_name} must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a Tensor, got {type(target).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a Tensor or None, got {type(weight).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{op}: label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if tensors:
        _check_tensors(input, target, weight, ignore_index, op, input_name, sharded)
    if target.requires_grad and target.is_floating_point() and torch.is_grad_enabled():
        # a float target that is no probability target at all (e.g. of the index shape) is the fault to name
        _check_tensors(input, target, weight, ignore_index, op, input_name, sharded)
        raise ValueError(
            f"{op}: target requires grad, but gradients with respect to probability targets "
            f"are not computed; pass target.detach()"
        )
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: weight requires grad, but gradients with respect to weight are not "
            f"computed (torch's nll_loss refuses them too); pass weight.detach()"
        )
    if input.is_cpu and target.is_cpu and (weight is None or weight.is_cpu):
        return  # the common case, without building device objects (~1 us a call)
    device = input.device
    for name, tensor in (("target", target), ("weight", weight)):
        if tensor is not None and tensor.device != device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but {input_name} is on {device}; "
                f"all tensors must be on the same device"
            )


def _check_tensors(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    op: str,
    input_name: str,
    sharded: bool,
) -> None:
    """The dtypes and shapes of `_check_args`'s tensors."""
    if input.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{op}: {input_name} must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    ndim = input.dim()
    classes = "C_r" if sharded else "C"
    if ndim == 0:
        raise ValueError(
            f"{op}: {input_name} must have shape ({classes},), (N, {classes}) or (N, {classes}, d1, ...), "
            f"got a 0-dim tensor"
        )
    num_classes = input.shape[0] if ndim == 1 else input.shape[1]
    if num_classes == 0 and not sharded:
        raise ValueError(f"{op}: input has no classes (C = 0), shape {tuple(input.shape)}")

    if target.is_floating_point() and not sharded:
        index_shape = input.shape[:1] + input.shape[2:] if ndim > 1 else torch.Size([])
        if target.shape != input.shape and target.shape == index_shape:
            raise TypeError(
                f"{op}: target has dtype {target.dtype} and shape {tuple(target.shape)}, the shape of class "
                f"indices: class indices need an integer dtype (target.long()); a float target is read as "
                f"class probabilities, of the input's shape {tuple(input.shape)}"
            )
        if target.shape != input.shape:
            raise ValueError(
                f"{op}: a probability target (float dtype) must have the input's shape "
                f"{tuple(input.shape)}, got target of shape {tuple(target.shape)}"
            )
        if target.dtype != input.dtype:
            raise TypeError(
                f"{op}: a probability target must have the input's dtype {input.dtype}, got {target.dtype}"
            )
        if ignore_index >= 0:  # as torch: probability targets have no class to ignore
            raise ValueError(
                f"{op}: ignore_index={ignore_index} is not supported for probability targets "
                f"(float dtype); leave it at a negative value such as the default -100"
            )
    else:
        if target.dtype not in INDEX_DTYPES:
            probabilities = "" if sharded else " or class probabilities (the input's float dtype)"
            unsupported = "; sharded logits take no class-probability targets" if sharded else ""
            raise TypeError(
                f"{op}: target must hold class indices (int64, int32 or uint8){probabilities}, "
                f"got {target.dtype}{unsupported}"
            )
        if not (ndim == 2 and target.dim() == 1 and target.shape[0] == input.shape[0]):
            _check_index_target_shape(input, target, op, input_name)  # (N, C) with (N,) is fine as it is
    if weight is not None:
        if not weight.is_floating_point():
            raise TypeError(f"{op}: weight must be a float tensor, got {weight.dtype}")
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            what = "this rank's slice of the class weights, shape (C_r,)" if sharded else "shape (C,)"
            raise ValueError(
                f"{op}: weight must have {what} = ({num_classes},), like {input_name}'s class dimension, "
                f"got {tuple(weight.shape)}"
            )


def _check_options(z_loss: float, softcap: float | None, op: str = "cross_entropy") -> None:
    """TypeError / ValueError naming z_loss or softcap unless z_loss is a finite real >= 0 and softcap is
    None or a finite real > 0. `op` names the caller in the messages."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"{op}: z_loss must be a float, got {type(z_loss).__name__}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{op}: softcap must be a float or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{op}: softcap must be a finite float > 0 or None, got {softcap}")


def _check_index_target_shape(
    input: torch.Tensor, target: torch.Tensor, op: str = "cross_entropy", input_name: str = "input"
) -> None:
    """An index target has input's shape without the class dim: (), (N,) or (N, d1, ..., dK)."""
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if input.dim() > 1 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"{op}: batch size mismatch: {input_name} has N={input.shape[0]}, target has {target.shape[0]}"
        )
    if target.shape != expected:
        raise ValueError(
            f"{op}: for {input_name} of shape {tuple(input.shape)} an index target must have shape "
            f"{tuple(expected)}, got {tuple(target.shape)}"
        )


def _check_target_range(
    target: torch.Tensor, num_classes: int, ignore_index: int, op: str = "cross_entropy"
) -> None:
    """IndexError unless every index target lies in [0, C) or equals ignore_index.

    Reads target values on the host: free on CPU (torch checks there too), a host sync on CUDA, where
    it runs only with validate=True. One min/max pass decides the common case; the exact test, which
    lets ignore_index through, runs only when some target lies outside [0, C). `op` names the caller.
    """
    if target.numel() == 0:
        return
    low, high = torch.aminmax(target)
    if low.item() >= 0 and high.item() < num_classes:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise IndexError(
            f"{op}: target holds {int(target[bad][0])}, outside [0, {num_classes}) "
            f"and not ignore_index={ignore_index}"
        )


# Under torch.compile the range check is this custom op: dynamo cannot trace `if bad.any(): raise`
# (a data-dependent branch), and an op returning nothing would be dropped from the graph as dead code,
# so the op returns a copy of the targets, which the loss then reads. Eager calls skip the op (and its
# dispatch cost) and run `_check_target_range` directly.
@torch.library.custom_op("fused_ops::check_targets", mutates_args=())
def checked_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """target: index targets, any shape -> a copy of target, after `_check_target_range`."""
    _check_target_range(target, num_classes, ignore_index)
    return target.clone()


@checked_targets.register_fake
def _checked_targets_fake(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return torch.empty_like(target)


# ----------------------------------------------------------------------------------------------------
# Row views: every call works on (M, C) logits with unit column stride.
# ----------------------------------------------------------------------------------------------------
def _rows_alias(x: torch.Tensor) -> bool:
    """True when the (M, C) rows of `x` are a view of its memory with unit column stride and
    non-overlapping rows, so a kernel can read and overwrite them in place. (N, C, d...) never is."""
    if x.dim() > 2:
        return False
    if x.dim() == 1:
        return x.shape[0] <= 1 or x.stride(0) == 1
    rows, classes = x.shape
    return (classes <= 1 or x.stride(1) == 1) and (rows <= 1 or x.stride(0) >= classes)


def _as_rows(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """x: (C,), (N, C) or (N, C, d...) -> (M, C) with unit column stride: a view when `_rows_alias(x)`,
    else a private copy ((N, C, d...) inputs are always copied: class dim moved last)."""
    if x.dim() > 2:
        return x.movedim(1, -1).clone(memory_format=torch.contiguous_format).view(-1, num_classes)
    rows = x.unsqueeze(0) if x.dim() == 1 else x
    return rows if _rows_alias(x) else rows.contiguous()


def _target_rows(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Index target -> (M,); probability target (input's shape) -> (M, C) with unit column stride."""
    if not target.is_floating_point():
        return target if target.dim() == 1 else target.reshape(-1)
    return _as_rows(target, num_classes)


def _from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(M, C) -> input shape `shape` (a view; the inverse of `_as_rows`)."""
    if len(shape) > 2:
        return rows.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return rows if rows.shape == shape else rows.view(shape)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference path.
# ----------------------------------------------------------------------------------------------------
def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a call into torch when it already is (the common case costs ~1 us each)."""
    return t if t.dtype == dtype else t.to(dtype)


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_grad: bool,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    loss_dtype: torch.dtype | None = None,
    targets_in_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and d(loss)/d(logits) for a unit upstream gradient, in plain PyTorch.

    logits: (M, C) float; target: (M,) class indices or (M, C) class probabilities; weight: (C,) or None.
    z_loss: weight of lse_i^2 per counted row (0: off); softcap: None, or > 0 for the loss to see
    softcap * tanh(logits / softcap) (see the module docstring).
    Returns loss: () for "mean"/"sum", (M,) for "none", in loss_dtype (default logits.dtype); grad:
    (M, C) in logits.dtype, or None when not need_grad. Statistics are computed in float32 (float64
    for float64 logits). A target outside [0, C) that is not ignore_index makes its row nan (its index
    is clamped for the gather, so CUDA never sees an out-of-bounds read); targets_in_range=True skips
    that marking where `_check_target_range` has passed. No host sync anywhere.

    At makemore sizes every tensor op costs microseconds of dispatch whatever its size, so the
    formulas below are arranged to use few of them: scales are folded into (M,) vectors before they
    touch an (M, C) tensor, and work that an option does not need is skipped.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows, num_classes = logits.shape
    eps = label_smoothing
    z, tanh = logits, None
    if softcap is not None:  # z = softcap * tanh(x / softcap), in acc
        tanh = _to(logits, acc).div(softcap).tanh_()
        z = tanh * softcap
    logp = torch.log_softmax(z, dim=1, dtype=acc)  # half logits: cast inside the op, no extra copy
    w = None if weight is None else _to(weight, acc)
    lse = torch.logsumexp(_to(z, acc), dim=1, keepdim=True) if z_loss else None  # (M, 1), for z-loss

    if target.is_floating_point():
        q = _to(target, acc)  # q_ic = w_c * ((1 - eps) * p_ic + eps / C)
        if eps > 0:
            q = q * (1.0 - eps) + eps / num_classes
        if w is not None:
            q = q * w
        row_loss = (q * logp).sum(1).neg_()  # loss_i = -sum_c q_ic * logp_ic
        if z_loss:  # + z_loss * lse_i^2 on every row
            row_loss = row_loss + z_loss * lse.view(-1).square()
        loss = _reduce(row_loss, reduction, rows)  # "mean" divides by M (0 / 0 = nan for M = 0, as torch)
        grad = None
        if need_grad:
            q_sum = q.sum(1, keepdim=True)
            if z_loss:  # d(z_loss * lse_i^2)/dz_ic = 2 * z_loss * lse_i * softmax_ic
                q_sum = q_sum + 2.0 * z_loss * lse
            grad = logp.exp_().mul_(q_sum).sub_(q)  # softmax_ic * sum_c q_ic - q_ic
            if reduction == "mean" and rows > 0:
                grad = grad.div_(rows)
            grad = _soft_cap_grad(grad, tanh)
        return _to(loss, loss_dtype or logits.dtype), None if grad is None else _to(grad, logits.dtype)

    # Index targets: per-row values are (M, 1) columns, which broadcast against the (M, C) rows.
    target = target.view(-1, 1)
    active = target != ignore_index
    y = target.clamp(0, num_classes - 1)  # a safe gather index for any target
    if y.dtype != torch.int64:
        y = y.long()
    w_y = active.to(acc) if w is None else torch.where(active, w.take(y), 0.0)  # w[y_i], 0 if ignored
    if not targets_in_range:
        w_y = w_y.masked_fill(active & (y != target), float("nan"))  # out-of-range target -> nan row
    # w[y_i] * logp_iy; an ignored row gives exactly 0 whatever it holds (0 * -inf would be nan)
    row_loss = torch.where(active, logp.gather(1, y), 0.0).mul_(w_y)
    row_loss = row_loss.neg_() if eps == 0 else row_loss.mul_(eps - 1.0)  # * -(1 - eps)
    if eps > 0:  # torch adds the smoothing term only then (so -inf logits stay finite at eps = 0)
        smooth = (logp if w is None else logp * w).sum(1, keepdim=True)  # sum_c w_c * logp_ic
        row_loss = row_loss - torch.where(active, smooth, 0.0) * (eps / num_classes)
    if z_loss:  # + z_loss * lse_i^2 on non-ignored rows
        row_loss = row_loss + torch.where(active, z_loss * lse.square(), 0.0)
    denom = None
    if reduction == "mean":  # torch divides by sum_i w[y_i] over non-ignored rows
        denom = w_y.sum()
        if eps > 0:  # a zero denominator gives nan, as torch's nll term 0 / 0 does (without smoothing the
            denom = torch.where(denom == 0, float("nan"), denom)  # numerator is 0 there: 0 / 0 already)
    loss = _reduce(row_loss.view(-1) if reduction == "none" else row_loss, reduction, denom)
    if not need_grad:
        return _to(loss, loss_dtype or logits.dtype), None

    # d(loss_i)/d(z_ic) = (softmax_ic * sum_c q_ic - q_ic) * s_i, where s_i is the reduction scale
    # (1 / denom, or 1), 0 for an ignored row (exactly 0, also when denom = 0, as torch), and
    # q_ic = (1 - eps) * w[y_i] * [c == y_i] + eps / C * w_c for the others.
    if denom is None:  # s_i = 1: w_y is already 0 on ignored rows
        row_scale = active.to(acc) if eps > 0 else None
        q_y = w_y
    else:
        row_scale = torch.where(active, denom.reciprocal(), 0.0)
        q_y = w_y * row_scale
    q_sum = q_y  # s_i * sum_c q_ic
    if eps > 0:
        q_y = q_y * (1.0 - eps)
        class_total = float(num_classes) if w is None else w.sum()  # sum_c w_c
        q_sum = q_y + row_scale * class_total * (eps / num_classes)
    if z_loss:  # + s_i * 2 * z_loss * lse_i: d(z_loss * lse_i^2)/dz_ic = 2 * z_loss * lse_i * softmax_ic
        lse_term = 2.0 * z_loss * lse if denom is None else 2.0 * z_loss * lse / denom
        q_sum = q_sum + torch.where(active, lse_term, 0.0)  # exactly 0 on ignored rows
    grad = logp.exp_().mul_(q_sum)  # softmax_ic * s_i * sum_c q_ic
    grad = grad.scatter_add_(1, y, q_y.neg())  # - s_i * (1 - eps) * w[y_i] at c = y_i
    if eps > 0:  # - s_i * eps / C * w_c everywhere
        grad = grad.sub_((row_scale if w is None else row_scale * w) * (eps / num_classes))
    grad = _soft_cap_grad(grad, tanh)
    grad = grad.masked_fill_(~active, 0.0)  # ignored rows: exactly 0, also where they hold inf or nan
    return _to(loss, loss_dtype or logits.dtype), _to(grad, logits.dtype)


def _soft_cap_grad(grad: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
    """grad: (M, C) d(loss)/dz -> d(loss)/dx for z = softcap * tanh(x / softcap), given tanh(x / softcap)
    (None: no softcap, grad unchanged). dx = dz * (1 - tanh^2); ignored rows stay exactly 0."""
    if tanh is None:
        return grad
    return grad.mul_(tanh.square_().neg_().add_(1.0))


def _reduce(row_loss: torch.Tensor, reduction: str, denom: torch.Tensor | int | None) -> torch.Tensor:
    """(M,) row losses -> (M,) for "none", their sum, or their sum / denom for "mean"."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total if reduction == "sum" else total / denom


# ----------------------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------------------
def _select_backend(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> str:
    """The dispatch decision: "triton", "native" or "torch" (fused_ops.backend.select). float64
    (gradcheck) runs the PyTorch path under "auto" on CUDA; forcing "triton" for it raises, as forcing
    triton anywhere it cannot run does. The native kernels take every input dtype."""
    backend = select("cross_entropy", input, target, weight)
    if backend != "triton" or input.dtype in KERNEL_DTYPES:
        return backend
    if requested_backend() == "triton":
        raise BackendUnavailableError(
            f"cross_entropy: backend 'triton' was forced but the kernels take {KERNEL_DTYPES}, not "
            f"{input.dtype}; use backend 'torch' or 'auto' for {input.dtype}"
        )
    return "torch"


class _Call(NamedTuple):
    """What one cross_entropy call asks of the Function, beside its tensors."""

    shape: torch.Size  # the logits' shape (input may be the base of a reshaping view, see _overwritable)
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float  # weight of lse_i^2 (0: off)
    softcap: float | None  # logits softcap * tanh(x / softcap) (None: off)
    need_grad: bool  # input requires grad: the forward also computes the gradient
    inplace: bool  # inplace_backward
    backend: str  # "triton", "native" or "torch" (`_select_backend`)
    loss_dtype: torch.dtype  # input's dtype, or float32 under autocast
    targets_in_range: bool  # index targets were checked to lie in [0, C) or equal ignore_index


def _kernels():
    from fused_ops.kernels.triton import cross_entropy as kernels  # lazily: only when Triton is chosen

    return kernels


_native_ops = None  # fused_ops.kernels.cpu.cross_entropy, once a call has run the native backend


def _native_kernels():
    global _native_ops
    if _native_ops is None:
        from fused_ops.kernels.cpu import cross_entropy as kernels  # loaded by backend.select already

        _native_ops = kernels
    return _native_ops


def _native_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    loss_dtype: torch.dtype | None,
) -> torch.Tensor:
    """fused_ops::cross_entropy, the native op (fused_ops::cross_entropy_mean for a call with every
    option at its default). The call passes only the arguments that differ from the op's defaults: the
    boxed call converts each one it gets (~0.4 us apiece, a tenth of a makemore-sized call)."""
    if (
        weight is None
        and ignore_index == -100
        and reduction == "mean"
        and not label_smoothing
        and not z_loss
        and softcap is None
        and loss_dtype is None
    ):
        return _native_mean_loss(input, target)
    kernels = _native_kernels()
    try:
        return kernels.cross_entropy(
            input,
            target,
            weight,
            ignore_index,
            kernels.REDUCTIONS[reduction],
            float(label_smoothing),
            float(z_loss),
            None if softcap is None else float(softcap),
            loss_dtype,
        )
    except (TypeError, ValueError):
        _reword_tensor_error(input, target, weight, ignore_index)
        raise


def _native_mean_loss(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fused_ops::cross_entropy_mean: every option at its default."""
    try:
        return _native_kernels().cross_entropy_mean(input, target)
    except (TypeError, ValueError):
        _reword_tensor_error(input, target, None, -100)
        raise


def _reword_tensor_error(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
) -> None:
    """After the native op refused its tensors (it checks them before it computes anything): the fault
    in `_check_tensors`' words (the other backends'), as the only traceback; returns when that check
    finds none."""
    try:
        _check_tensors(input, target, weight, ignore_index, "cross_entropy", "input", False)
    except (TypeError, ValueError) as error:
        raise error from None


def _forward(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, call: _Call
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The forward of `CrossEntropyFunction`, also run alone when no gradient is needed.

    input: the logits, or the base of a reshaping view of shape `call.shape` (see `_overwritable`).
    Returns the loss (() or the target's batch shape), the (M, C) gradient for a unit grad_output
    (None unless call.need_grad) and whether that gradient overwrote input's memory.
    """
    shape = call.shape
    logits = input if input.shape == shape else input.view(shape)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    rows = _as_rows(logits, num_classes)
    target_rows = _target_rows(target, num_classes)
    overwrite = call.need_grad and call.inplace and _rows_alias(logits)  # gradient into input's memory

    if call.backend == "triton":
        grad = None
        if call.need_grad:  # inplace: into rows, which is input's memory or our private (M, C) copy
            grad = rows if call.inplace else torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        loss = _kernels().cross_entropy_forward(
            rows,
            target_rows,
            weight,
            ignore_index=call.ignore_index,
            reduction=call.reduction,
            label_smoothing=call.label_smoothing,
            z_loss=call.z_loss,
            softcap=call.softcap,
            grad=grad,
            loss_dtype=call.loss_dtype,
        )
    elif call.backend == "native":  # one pass over each row in C++: the loss, and the gradient when asked
        kernels = _native_kernels()
        args = (
            rows,
            target_rows,
            weight,
            call.ignore_index,
            kernels.REDUCTIONS[call.reduction],
            call.label_smoothing,
            call.z_loss,
            call.softcap,
            call.loss_dtype,
        )
        if call.need_grad:
            loss, grad = kernels.cross_entropy_fwd(*args)
            if overwrite:
                grad = rows.copy_(grad)
        else:
            loss, grad = kernels.cross_entropy(*args), None
    else:
        loss, grad = cross_entropy_reference(
            rows,
            target_rows,
            weight,
            call.ignore_index,
            call.reduction,
            call.label_smoothing,
            call.need_grad,
            z_loss=call.z_loss,
            softcap=call.softcap,
            loss_dtype=call.loss_dtype,
            targets_in_range=call.targets_in_range,
        )
        if overwrite:
            grad = rows.copy_(grad)
    if call.reduction == "none":
        loss = loss.view(shape[:1] + shape[2:] if len(shape) > 1 else ())  # the target's batch shape
    return loss, grad, overwrite


def _rows_loss_and_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_grad: bool,
    loss_dtype: torch.dtype,
    targets_in_range: bool,
    reduction: str = "none",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of rows for an op that feeds cross-entropy piece by piece (`linear_cross_entropy`).

    logits: (M, C), unit column stride, a buffer the caller owns; target: (M,) or (M, C); arguments
    already checked. Returns the (M,) per-row losses (reduction "none") in loss_dtype and, when
    need_grad, d(sum_i loss_i)/d(logits) (M, C) in logits' dtype: a unit grad_output, no mean scale.
    reduction "mean" or "sum" (a chunk that holds every row): the () reduced loss and its gradient,
    the mean's denominator applied, as `cross_entropy` gives them.
    Runs on the backend `cross_entropy` picks for these tensors, through the same `_forward`. Where
    the backend writes the gradient in place at no cost (Triton), it overwrites logits; the PyTorch
    path and the native kernels return a new tensor (copying it back would cost a pass).
    """
    backend = _select_backend(logits, target, weight)
    call = _Call(
        shape=logits.shape,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        need_grad=need_grad,
        inplace=backend == "triton",
        backend=backend,
        loss_dtype=loss_dtype,
        targets_in_range=targets_in_range,
    )
    loss, grad, _ = _forward(logits, target, weight, call)
    return loss, grad


class CrossEntropyFunction(torch.autograd.Function):
    """loss = cross_entropy(input, ...); its backward scales the gradient stored by the forward.

    forward(input, target, weight, call): `input` is the logits, or, when inplace overwrites a
    reshaping view, that view's base; `call.shape` is the logits' shape. Returns the loss, plus input
    when the gradient overwrote it (marked dirty).

    Backward: the PyTorch path returns stored * grad_output (a new tensor; repeated backward works, as
    gradcheck needs). The eager Triton path scales the stored gradient in place (no N x C allocation; a
    no-op where grad_output == 1), so a second backward through a retained graph raises instead.

    torch.compile: dynamo traces forward and backward. On the Triton path it sees the launchers'
    `kernel[grid](...)` calls as user-defined Triton kernels, which Inductor compiles into its graph
    along with the surrounding ops (see `fused_ops.kernels.triton.cross_entropy` for why no custom op). The
    backward then multiplies out of place, which Inductor fuses with what follows, instead of
    scaling a saved tensor in place (a mutation that functionalization would turn into a copy anyway).
    """

    @staticmethod
    def forward(ctx, input, target, weight, call: _Call):
        ctx.set_materialize_grads(False)
        loss, grad, overwrite = _forward(input, target, weight, call)
        ctx.call, ctx.overwrite, ctx.consumed = call, overwrite, False
        if overwrite:
            # Saved: input, whose memory now holds the (M, C) gradient; autograd's version counter then
            # catches any later write to it.
            ctx.mark_dirty(input)
            ctx.save_for_backward(input)
            return loss, input
        # Saved: only the (M, C) gradient for a unit grad_output (never the logits).
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *grad_overwritten):
        if torch.is_grad_enabled():  # create_graph=True: the stored gradient is not itself differentiable
            raise RuntimeError(
                "cross_entropy: double backward (create_graph=True through cross_entropy) is not supported"
            )
        if any(g is not None for g in grad_overwritten):
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) overwrote input with its gradient; the overwritten "
                "input cannot be used in further differentiable computation"
            )
        if grad_loss is None:
            return None, None, None, None
        (saved,) = ctx.saved_tensors
        call = ctx.call
        grad_rows = saved
        if ctx.overwrite:  # saved is input (or its base): view its memory as the (M, C) rows again
            logits = saved if saved.shape == call.shape else saved.view(call.shape)
            grad_rows = _as_rows(logits, call.shape[0] if len(call.shape) == 1 else call.shape[1])
        scale = grad_loss.reshape(-1) if call.reduction == "none" else grad_loss  # (M,) or ()

        if call.backend == "triton" and not torch.compiler.is_compiling():
            if ctx.consumed:
                raise RuntimeError(
                    "cross_entropy: a second backward through the same graph (retain_graph=True) is not "
                    "supported on the Triton path: the first one scaled the stored gradient in place"
                )
            ctx.consumed = True
            _kernels().cross_entropy_backward(grad_rows, scale)  # in place; rows with scale == 1 skipped
            if ctx.overwrite:
                return saved, None, None, None
        else:  # the product is float32 for an (M,) float32 grad_output beside half logits (autocast)
            grad_rows = _to(grad_rows * (scale.unsqueeze(1) if scale.dim() else scale), grad_rows.dtype)
        grad_input = _from_rows(grad_rows, call.shape)
        return (grad_input.view(saved.shape) if ctx.overwrite else grad_input), None, None, None


# ----------------------------------------------------------------------------------------------------
# Functional API and module.
# ----------------------------------------------------------------------------------------------------
def _overwritable(input: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory inplace_backward overwrites: input, or the base of input when input is a
    view covering all of it (e.g. logits.view(-1, V)). Autograd forbids a multi-output Function from
    modifying a view in place, so the Function gets the base. Raises where overwriting is unsafe."""
    owner = input
    if input._is_view():
        base = input._base
        if not (
            base.is_contiguous()
            and input.is_contiguous()
            and base.numel() == input.numel()
            and base.data_ptr() == input.data_ptr()
        ):
            raise ValueError(
                "cross_entropy(inplace_backward=True): input is a view of part of another tensor; "
                "overwriting it would change that tensor too. Pass a whole tensor (or a reshape of one), "
                "or use inplace_backward=False"
            )
        owner = base
    if owner.is_leaf:
        raise ValueError(
            "cross_entropy(inplace_backward=True) would overwrite input, a leaf tensor that requires grad "
            "(autograd needs its values); use inplace_backward=False"
        )
    return owner


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    validate: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Cross-entropy between logits and targets: the values and gradients of `F.cross_entropy`.

    input: (C,), (N, C) or (N, C, d1, ..., dK) logits, float16/bfloat16/float32/float64.
    target: class indices of shape (), (N,) or (N, d1, ..., dK), int64/int32/uint8; or class
        probabilities with the shape and dtype of input.
    weight: (C,) class weights (any float dtype), or None.
    Returns a scalar for reduction "mean"/"sum", the target's batch shape for "none", in input.dtype
    (float32 under autocast).

    The forward also computes d(loss)/d(input) when input requires grad, and the backward only scales
    it by grad_output. (N, C, d1, ..., dK) inputs are first copied to (M, C) rows, class dim last.

    z_loss: PaLM's auxiliary z-loss (Liger-Kernel's `lse_square_scale`): adds z_loss * lse_i^2 to the
        loss of each row, lse_i = logsumexp over the classes of row i's (soft-capped) logits. Ignored rows
        add nothing; probability targets count every row. The reduction treats it as the main term:
        "mean" divides by the same denominator (sum_i w[y_i] over non-ignored rows with class weights,
        their count without; M for probability targets). 0.0 (the default): off, and the same results
        as without it, bit for bit.
    softcap: logit soft-capping (Gemma 2): the loss sees softcap * tanh(input / softcap), and the
        gradient is taken with respect to input, through the tanh. A float > 0, or None (the default):
        off. With inplace_backward the gradient w.r.t. input still overwrites input.
    Backend: `fused_ops.use_backend` / $FUSED_OPS_BACKEND; "auto" runs the Triton kernels on CUDA for
    float32/bfloat16/float16 and the PyTorch path otherwise (float64 included). The Triton backward
    scales the stored gradient in place, so a second backward through a retained graph raises there.

    inplace_backward: write that gradient into input's memory instead of a new N x C buffer. input is
        then overwritten (marked dirty for autograd) and must not be used afterwards; it must not be a
        leaf or a view of part of another tensor (ValueError). For (N, C, d...) or non-unit-stride
        inputs the gradient overwrites the internal (M, C) copy and input is left unchanged.
    validate: check that index targets lie in [0, C) or equal ignore_index, raising IndexError.
        On CPU this check always runs (as in torch). On CUDA it needs a host sync, so by default it is
        skipped and an out-of-range target makes its row's loss and gradient nan (and the "mean"/"sum"
        result nan); the kernels clamp the index, so the CUDA context is never corrupted.

    Under torch.autocast (CPU or CUDA) the loss is float32, as torch's: autocast lists cross_entropy
    among its float32 ops. Half logits are not copied to float32 for it: the statistics are float32
    anyway, so only the loss is written in float32 (the gradient keeps the logits' dtype, as torch's
    does). A probability target whose dtype differs from input's is cast with input to float32, as
    autocast does. Under torch.compile: the CPU range check of the targets runs as the custom op
    `fused_ops::check_targets`, and inplace_backward raises (RuntimeError).

    process_group: a torch.distributed group over which input (and weight) are sharded along the class
        dimension, each rank holding a contiguous slice of the classes in rank order, with target
        replicated: vocab-parallel cross-entropy (`fused_ops.vocab_parallel_cross_entropy`; index
        targets only, no inplace_backward). The loss comes back on every rank; each rank's gradient is
        its slice of the full one. None (the default): input holds every class.

    Differences from torch: int32 targets are accepted; weight may have any float dtype; probability
    targets must have input's dtype (outside autocast); gradients flow only to input (not to weight or
    target); C = 0 is refused; double backward (create_graph=True) raises RuntimeError.
    """
    if (
        weight is None
        and type(ignore_index) is int
        and ignore_index == -100
        and reduction == "mean"
        and type(label_smoothing) is float
        and label_smoothing == 0.0
        and type(z_loss) is float
        and z_loss == 0.0
        and softcap is None
        and not inplace_backward
        and process_group is None
        and _native_takes_as_it_is(input, target)
    ):
        # The common call, at the cost of one op call: every option at its default (nothing for
        # `_check_args` or `_check_options` to refuse), and the native op checks the tensors itself.
        return _native_mean_loss(input, target)
    _check_options(z_loss, softcap)
    if process_group is not None:
        if z_loss or softcap is not None:
            raise ValueError(
                "cross_entropy: z_loss and softcap are not supported with process_group (vocab-parallel); "
                "leave them at 0.0 and None"
            )
        return _vocab_parallel(
            input,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            inplace_backward,
            validate,
            process_group,
        )
    autocast = _autocast_float32(input, target)
    if autocast and target.dtype in KERNEL_DTYPES and target.dtype != input.dtype:
        input, target = input.float(), target.float()
    _check_args(input, target, weight, ignore_index, reduction, label_smoothing, tensors=False)
    backend = _select_backend(input, target, weight)
    need_grad = input.requires_grad and torch.is_grad_enabled()
    if backend == "native" and not (need_grad and inplace_backward):
        # The native op checks its tensors' dtypes and shapes itself; its autograd node, its target range
        # check and its backward are in C++.
        loss_dtype = torch.float32 if autocast and input.dtype in HALF_DTYPES else None
        return _native_loss(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, loss_dtype
        )
    _check_tensors(input, target, weight, ignore_index, "cross_entropy", "input", False)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    targets_in_range = not target.is_floating_point() and (validate or target.is_cpu)
    if targets_in_range:
        if torch.compiler.is_compiling():
            target = checked_targets(target, num_classes, ignore_index)
        else:
            _check_target_range(target, num_classes, ignore_index)
    owner = input
    if need_grad and inplace_backward:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) is eager-only: under torch.compile the overwrite "
                "would become a copy (functionalization), saving no memory; use inplace_backward=False, "
                "the compiler plans the gradient's buffer itself"
            )
        if _rows_alias(input):
            owner = _overwritable(input)
    call = _Call(
        shape=input.shape,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        need_grad=need_grad,
        inplace=bool(inplace_backward),
        backend=backend,
        loss_dtype=torch.float32 if autocast and input.dtype in HALF_DTYPES else input.dtype,
        targets_in_range=targets_in_range,
    )
    if not need_grad:  # no autograd node to record: the forward alone, as the Function runs it
        with torch.no_grad():
            return _forward(input, target, weight, call)[0]
    out = CrossEntropyFunction.apply(owner, target, weight, call)
    return out[0] if isinstance(out, tuple) else out


def _vocab_parallel(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    inplace_backward: bool,
    validate: bool,
    process_group: dist.ProcessGroup,
) -> torch.Tensor:
    """cross_entropy(..., process_group=pg): logits and weight sharded along the classes; see
    `fused_ops.vocab_parallel_cross_entropy`."""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"cross_entropy: process_group must be a torch.distributed ProcessGroup or None, "
            f"got {type(process_group).__name__}"
        )
    if inplace_backward:
        raise ValueError(
            "cross_entropy: inplace_backward=True is not supported with process_group (vocab-parallel "
            "logits keep their memory); pass inplace_backward=False"
        )
    # The one call from an op up to the multi-process room, imported here: that room imports this file.
    from fused_ops.distributed.vocab_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(
        logits_shard,
        target,
        process_group,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        validate=validate,
    )


def _native_takes_as_it_is(input: object, target: object) -> bool:
    """True when the native op would run on input and target as they are: CPU tensors for which
    `select` picks the native backend (`native_selected`), no autocast to apply, and no probability
    target requiring grad (which `_check_args` refuses)."""
    return (
        isinstance(input, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and input.is_cpu
        and target.is_cpu
        and not target.requires_grad
        and native_selected("cross_entropy")
        and not torch.is_autocast_enabled("cpu")
    )


def _autocast_float32(input: object, target: object) -> bool:
    """True when autocast is on for input's device (CPU or CUDA) and would run cross_entropy (one of
    its float32 ops) on float32 copies of fp16/bf16/fp32 input and target."""
    if not (
        isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and input.dtype in KERNEL_DTYPES
    ):
        return False
    if input.is_cpu:  # is_cpu / is_cuda: no device object to build
        return torch.is_autocast_enabled("cpu")
    return input.is_cuda and torch.is_autocast_enabled("cuda")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in `nn.CrossEntropyLoss` running `fused_ops.cross_entropy`.

    Same constructor arguments and state_dict keys as torch's, plus the keyword-only `z_loss`,
    `softcap`, `inplace_backward`, `validate` and `process_group` of `cross_entropy` (with a process
    group, `weight` is this rank's slice of the class weights). input: (C,), (N, C) or
    (N, C, d1, ..., dK); see `cross_entropy`.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        validate: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        _check_options(z_loss, softcap)
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.validate = validate
        self.process_group = process_group

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            validate=self.validate,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        options = "" if not self.z_loss else f", z_loss={self.z_loss}"
        options += "" if self.softcap is None else f", softcap={self.softcap}"
        sharded = "" if self.process_group is None else ", vocab-parallel over process_group"
        return (
            f"reduction={self.reduction!r}{options}, inplace_backward={self.inplace_backward}, "
            f"validate={self.validate}{sharded}"
        )
