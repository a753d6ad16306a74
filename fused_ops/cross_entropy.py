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
for probability targets, exactly as torch does; "sum" and "none" by 1. Ignored rows get a zero gradient.

One pass: the forward computes the loss and, when input requires grad, this gradient for a unit
upstream gradient (the PyTorch path below with the formula, the Triton kernels in the same sweep over
the logits); the backward only scales it by grad_output, on the device, with no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

from fused_ops.backend import BackendUnavailableError, requested_backend, use_triton

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)  # torch accepts int64 and uint8; int32 as well here
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take


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
    validate: bool,
) -> None:
    """Raise a clear exception naming the bad argument; touch nothing."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"cross_entropy: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: target must be a Tensor, got {type(target).__name__}")
    if input.dtype not in (torch.float64, *KERNEL_DTYPES):
        raise TypeError(
            f"cross_entropy: input must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    if input.dim() == 0:
        raise ValueError(
            "cross_entropy: input must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor"
        )
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if num_classes == 0:
        raise ValueError(f"cross_entropy: input has no classes (C = 0), shape {tuple(input.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(
            f"cross_entropy: label_smoothing must be a float, got {type(label_smoothing).__name__}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"cross_entropy: a probability target (float dtype) must have the input's shape "
                f"{tuple(input.shape)}, got target of shape {tuple(target.shape)}"
            )
        if target.dtype != input.dtype:
            raise TypeError(
                f"cross_entropy: a probability target must have the input's dtype {input.dtype}, "
                f"got {target.dtype}"
            )
        if ignore_index >= 0:  # as torch: probability targets have no class to ignore
            raise ValueError(
                f"cross_entropy: ignore_index={ignore_index} is not supported for probability targets "
                f"(float dtype); leave it at a negative value such as the default -100"
            )
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "cross_entropy: target requires grad, but gradients with respect to probability targets "
                "are not computed; pass target.detach()"
            )
    else:
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(
                f"cross_entropy: target must hold class indices (int64, int32 or uint8) or class "
                f"probabilities (the input's float dtype), got {target.dtype}"
            )
        expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        if input.dim() > 1 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"cross_entropy: batch size mismatch: input has N={input.shape[0]}, "
                f"target has {target.shape[0]}"
            )
        if target.shape != expected:
            raise ValueError(
                f"cross_entropy: for input of shape {tuple(input.shape)} an index target must have shape "
                f"{tuple(expected)}, got {tuple(target.shape)}"
            )
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"cross_entropy: weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"cross_entropy: weight must be a float tensor, got {weight.dtype}")
        if weight.shape != (num_classes,):
            raise ValueError(
                f"cross_entropy: weight must have shape (C,) = ({num_classes},), got {tuple(weight.shape)}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "cross_entropy: weight requires grad, but gradients with respect to weight are not "
                "computed (torch's nll_loss refuses them too); pass weight.detach()"
            )
    for name, tensor in (("target", target), ("weight", weight)):
        if tensor is not None and tensor.device != input.device:
            raise ValueError(
                f"cross_entropy: {name} is on {tensor.device} but input is on {input.device}; "
                f"all tensors must be on the same device"
            )

    # Range check of index targets: free on CPU (torch raises there too); on CUDA it costs a host sync,
    # so it only runs with validate=True; otherwise an out-of-range row gives nan (see cross_entropy).
    if not target.is_floating_point() and (validate or target.device.type == "cpu"):
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bad.any():
            raise IndexError(
                f"cross_entropy: target holds {int(target[bad][0])}, outside [0, {num_classes}) "
                f"and not ignore_index={ignore_index}"
            )


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
        return target.reshape(-1)
    return _as_rows(target, num_classes)


def _from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(M, C) -> input shape `shape` (a view; the inverse of `_as_rows`)."""
    if len(shape) > 2:
        return rows.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return rows.view(shape)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference path.
# ----------------------------------------------------------------------------------------------------
def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and d(loss)/d(logits) for a unit upstream gradient, in plain PyTorch.

    logits: (M, C) float; target: (M,) class indices or (M, C) class probabilities; weight: (C,) or None.
    Returns loss: () for "mean"/"sum", (M,) for "none", in logits.dtype; grad: (M, C) in logits.dtype,
    or None when not need_grad. Statistics are computed in float32 (float64 for float64 logits).
    A target outside [0, C) that is not ignore_index makes its row nan (its index is clamped for the
    gather, so CUDA never sees an out-of-bounds read); no host sync anywhere.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows, num_classes = logits.shape
    eps = label_smoothing
    logp = torch.log_softmax(logits.to(acc), dim=1)
    w = None if weight is None else weight.to(acc)

    if target.is_floating_point():
        q = target.to(acc) * (1.0 - eps) + eps / num_classes  # q_ic = w_c * ((1 - eps) * p_ic + eps / C)
        if w is not None:
            q = q * w
        row_loss = -(q * logp).sum(1)  # loss_i = -sum_c q_ic * logp_ic
        active = None  # every row counts
        denom = torch.full((), float(rows), dtype=acc, device=logits.device) if reduction == "mean" else None
    else:
        active = target != ignore_index
        in_range = (target >= 0) & (target < num_classes)
        y = torch.where(active & in_range, target, 0).long()  # clamped: safe gather for any target
        w_y = active.to(acc) if w is None else torch.where(active, w[y], 0.0)
        w_y = torch.where(active & ~in_range, float("nan"), w_y)  # out-of-range target -> nan row
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        row_loss = (1.0 - eps) * w_y * nll
        if eps > 0:  # torch adds the smoothing term only then (so -inf logits stay finite at eps = 0)
            smooth = -(logp.sum(1) if w is None else (logp * w).sum(1))  # -sum_c w_c * logp_ic
            row_loss = row_loss + torch.where(active, eps / num_classes * smooth, 0.0)
        denom = w_y.sum() if reduction == "mean" else None  # sum of w[y_i] over non-ignored rows
    if denom is not None:  # torch: a zero denominator gives nan (its nll term is 0 / 0), never inf
        denom = torch.where(denom == 0, float("nan"), denom)

    if reduction == "none":
        loss = row_loss
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss.sum() / denom  # all-ignored or N = 0: nan, as torch

    grad = None
    if need_grad:
        if target.is_floating_point():
            qsum = q.sum(1, keepdim=True)
        else:
            q = (eps / num_classes) * (torch.ones_like(logp) if w is None else w.expand_as(logp))
            q = q * active[:, None]
            q = q.scatter_add(1, y[:, None], ((1.0 - eps) * w_y)[:, None])  # + (1 - eps) * w[y_i] at c = y_i
            qsum = q.sum(1, keepdim=True)
        grad = logp.exp() * qsum - q  # d(loss_i)/d(z_ic) = softmax_ic * sum_c q_ic - q_ic
        if denom is not None:
            grad = grad / denom
        if active is not None:  # ignored rows: exactly 0, also when denom = 0 (torch does the same)
            grad = torch.where(active[:, None], grad, 0.0)
        grad = grad.to(logits.dtype)
    return loss.to(logits.dtype), grad


# ----------------------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------------------
def _runs_triton(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """The dispatch decision. float64 (gradcheck) runs the PyTorch path under "auto"; forcing
    "triton" for it raises, as forcing triton anywhere it cannot run does."""
    if not use_triton("cross_entropy", input, target, weight):
        return False
    if input.dtype in KERNEL_DTYPES:
        return True
    if requested_backend() == "triton":
        raise BackendUnavailableError(
            f"cross_entropy: backend 'triton' was forced but the kernels take {KERNEL_DTYPES}, not "
            f"{input.dtype}; use backend 'torch' or 'auto' for {input.dtype}"
        )
    return False


class CrossEntropyFunction(torch.autograd.Function):
    """loss = cross_entropy(input, ...); its backward scales the gradient stored by the forward.

    forward(input, target, weight, ignore_index, reduction, label_smoothing, need_grad, inplace, shape):
    `input` is the logits, or, when inplace overwrites a reshaping view, that view's base; `shape` is
    the logits' shape. Returns the loss, plus input when the gradient overwrote it (marked dirty).

    Backward: the PyTorch path returns stored * grad_output (a new tensor; repeated backward works, as
    gradcheck needs). The Triton path scales the stored gradient in place (no N x C allocation; a no-op
    where grad_output == 1), so a second backward through a retained graph raises instead.
    """

    @staticmethod
    def forward(
        ctx, input, target, weight, ignore_index, reduction, label_smoothing, need_grad, inplace, shape
    ):
        ctx.set_materialize_grads(False)
        ctx.triton = _runs_triton(input, target, weight)
        logits = input if input.shape == shape else input.view(shape)
        num_classes = shape[0] if len(shape) == 1 else shape[1]
        rows = _as_rows(logits, num_classes)
        target_rows = _target_rows(target, num_classes)
        ctx.overwrite = need_grad and inplace and _rows_alias(logits)  # gradient lands in input's memory

        if ctx.triton:
            from fused_ops.kernels import cross_entropy as kernels

            grad = None
            if need_grad:  # inplace: into rows, which is input's memory or our private (M, C) copy
                grad = rows if inplace else torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
            loss = kernels.cross_entropy_forward(
                rows,
                target_rows,
                weight,
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=label_smoothing,
                grad=grad,
            )
        else:
            loss, grad = cross_entropy_reference(
                rows, target_rows, weight, ignore_index, reduction, label_smoothing, need_grad
            )
            if ctx.overwrite:
                grad = rows.copy_(grad)

        ctx.shape, ctx.reduction, ctx.consumed = shape, reduction, False
        if reduction == "none":
            loss = loss.view(shape[:1] + shape[2:] if len(shape) > 1 else ())  # the target's batch shape
        if ctx.overwrite:
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
            return (None,) * 9
        (saved,) = ctx.saved_tensors
        grad_rows = saved
        if ctx.overwrite:  # saved is input (or its base): view its memory as the (M, C) rows again
            logits = saved if saved.shape == ctx.shape else saved.view(ctx.shape)
            grad_rows = _as_rows(logits, ctx.shape[0] if len(ctx.shape) == 1 else ctx.shape[1])
        scale = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss  # (M,) or ()

        if ctx.triton:
            from fused_ops.kernels import cross_entropy as kernels

            if ctx.consumed:
                raise RuntimeError(
                    "cross_entropy: a second backward through the same graph (retain_graph=True) is not "
                    "supported on the Triton path: the first one scaled the stored gradient in place"
                )
            ctx.consumed = True
            kernels.cross_entropy_backward(grad_rows, scale)  # in place; rows with scale == 1 are skipped
        else:
            grad_rows = grad_rows * (scale[:, None] if scale.dim() else scale)
        if ctx.overwrite and ctx.triton:
            return (saved,) + (None,) * 8
        grad_input = _from_rows(grad_rows, ctx.shape)
        return (grad_input.view(saved.shape) if ctx.overwrite else grad_input,) + (None,) * 8


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
    inplace_backward: bool = False,
    validate: bool = False,
) -> torch.Tensor:
    """Cross-entropy between logits and targets: the values and gradients of `F.cross_entropy`.

    input: (C,), (N, C) or (N, C, d1, ..., dK) logits, float16/bfloat16/float32/float64.
    target: class indices of shape (), (N,) or (N, d1, ..., dK), int64/int32/uint8; or class
        probabilities with the shape and dtype of input.
    weight: (C,) class weights (any float dtype), or None.
    Returns a scalar for reduction "mean"/"sum", the target's batch shape for "none", in input.dtype.

    The forward also computes d(loss)/d(input) when input requires grad, and the backward only scales
    it by grad_output. (N, C, d1, ..., dK) inputs are first copied to (M, C) rows, class dim last.
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

    Differences from torch: int32 targets are accepted; weight may have any float dtype; probability
    targets must have input's dtype; gradients flow only to input (not to weight or target); C = 0 is
    refused; double backward (create_graph=True) raises RuntimeError.
    """
    _check_args(input, target, weight, ignore_index, reduction, label_smoothing, validate)
    need_grad = input.requires_grad and torch.is_grad_enabled()
    owner = input
    if need_grad and inplace_backward and _rows_alias(input):
        owner = _overwritable(input)
    out = CrossEntropyFunction.apply(
        owner,
        target,
        weight,
        ignore_index,
        reduction,
        float(label_smoothing),
        need_grad,
        bool(inplace_backward),
        input.shape,
    )
    return out[0] if isinstance(out, tuple) else out


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in `nn.CrossEntropyLoss` running `fused_ops.cross_entropy`.

    Same constructor arguments and state_dict keys as torch's, plus the keyword-only `inplace_backward`
    and `validate` of `cross_entropy`. input: (C,), (N, C) or (N, C, d1, ..., dK); see `cross_entropy`.
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
        inplace_backward: bool = False,
        validate: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward
        self.validate = validate

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            inplace_backward=self.inplace_backward,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, inplace_backward={self.inplace_backward}, "
            f"validate={self.validate}"
        )
