"""Vocab-parallel cross-entropy: logits sharded along the class dimension across a process group; and
vocab-parallel linear + cross-entropy (`vocab_parallel_linear_cross_entropy`, at the end), whose head
is sharded the same way.

Shapes: logits_shard (N, C_r), (N, C_r, d1, ..., dK) or (C_r,) on rank r, holding the classes
[offset_r, offset_r + C_r) of C = sum_r C_r; the slices are contiguous, in rank order, and may be
uneven (C_r = 0 included). target (N,), (N, d1, ..., dK) or (): class indices in [0, C), the same on
every rank. weight: None or this rank's slice (C_r,) of the class weights, cut like the logits.
The loss comes back on every rank and equals F.cross_entropy on the full logits; each rank's
gradient is its slice of the full gradient.

Collectives per forward (backward has none):
    all_gather  the shard widths C_r -> each rank's class offset and C, on device (no host sync);
    all_reduce MAX of the row maxima -> m;
    all_reduce SUM of the stacked per-row sum(exp(z - m)), the target logit z_y and weight w_y (only
        the rank owning y contributes them) and, with label smoothing, sum_c w_c z_c and sum_c w_c.

Per row, with q_c = (1 - eps) * w_y * [c = y] + eps / C * w_c (w = 1 without weights):
    loss = sum_c q_c * (lse - z_c)
         = (1 - eps) * w_y * (lse - z_y) + eps / C * (sum_c w_c * lse - sum_c w_c z_c)
    dz_c = (softmax_c * sum(q) - q_c) * scale,  sum(q) = (1 - eps) * w_y + eps / C * sum_c w_c
scale = grad_output, divided by sum of w_y over the non-ignored rows for reduction="mean"; 0 on
ignored rows. These are F.cross_entropy's semantics, label smoothing with weights included.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fused_ops.cross_entropy import _check_args
from fused_ops.distributed.collectives import (
    all_gather_stacked,
    all_reduce_max,
    all_reduce_sum,
    is_distributed,
    rank,
)
from fused_ops.linear_cross_entropy import VocabShard, _apply, default_chunk_size
from fused_ops.linear_cross_entropy import _check_args as _check_linear_args


def _class_offset(width: int, device: torch.device, process_group, distributed: bool):
    """This rank's first class and the total class count C, as 0-dim int64 tensors (one all_gather)."""
    widths = torch.full((1,), width, dtype=torch.int64, device=device)  # a fill, not a host-to-device copy
    if distributed:
        widths = all_gather_stacked(widths, process_group).view(-1)  # (W,): C_r of every rank
    return widths[: rank(process_group) if distributed else 0].sum(), widths.sum()


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """logits_shard (M, C_r), target (M,) int64 -> loss (M,) for "none", else a scalar."""

    @staticmethod
    def forward(
        ctx,
        logits_shard: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        process_group: dist.ProcessGroup | None,
        validate: bool,
    ) -> torch.Tensor:
        distributed = is_distributed(process_group)
        acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
        z = logits_shard.to(acc)
        rows, width = z.shape
        offset, num_classes = _class_offset(width, z.device, process_group, distributed)

        valid = target != ignore_index
        out_of_range = valid & ((target < 0) | (target >= num_classes))
        # As fused_ops.cross_entropy: raise on CPU (free there; every rank raises alike, as the target is
        # replicated) and with validate=True (one host sync); otherwise an out-of-range row gets a nan
        # loss and gradient, with no host sync.
        if (validate or target.device.type == "cpu") and out_of_range.any():
            raise IndexError(
                f"vocab_parallel_cross_entropy: target holds {int(target[out_of_range][0])}, outside "
                f"[0, {int(num_classes)}) and not ignore_index={ignore_index}"
            )
        local_target = target - offset
        owned = valid & (local_target >= 0) & (local_target < width)  # this rank holds z_y
        local_index = torch.where(owned, local_target, 0).unsqueeze(1)  # (M, 1), in range when width > 0

        # log-sum-exp over the group: lse = m + log(sum_c exp(z_c - m)), m the global row maximum.
        row_max = z.amax(1) if width > 0 else z.new_full((rows,), float("-inf"))
        m = all_reduce_max(row_max, process_group) if distributed else row_max
        w = None if weight is None else weight.to(acc)
        # Rows of the SUM collective, (M,) each: sum_c exp(z_c - m), z_y, [w_y], [sum_c w_c z_c, [sum_c w_c]].
        sums = {"sum_exp": torch.exp(z - m.unsqueeze(1)).sum(1)}
        zeros = z.new_zeros(rows)
        sums["z_y"] = torch.where(owned, z.gather(1, local_index).squeeze(1), 0.0) if width > 0 else zeros
        if w is not None:
            sums["w_y"] = torch.where(owned, w[local_index.squeeze(1)], 0.0) if width > 0 else zeros
        if label_smoothing > 0:
            sums["sum_wz"] = (z if w is None else z * w).sum(1)
            if w is not None:
                sums["sum_w"] = w.sum().expand(rows)  # a scalar, repeated per row to share the one collective
        stacked = torch.stack(list(sums.values()))  # (k, M)
        if distributed:
            stacked = all_reduce_sum(stacked, process_group)
        sums = dict(zip(sums, stacked, strict=True))
        lse = m + torch.log(sums["sum_exp"])
        w_y = sums["w_y"] if w is not None else valid.to(acc)

        eps = float(label_smoothing)
        # loss = (1 - eps) * w_y * (lse - z_y) + eps / C * (sum_c w_c * lse - sum_c w_c z_c)
        loss = (1 - eps) * w_y * (lse - sums["z_y"])
        sum_w = None
        if eps > 0:
            sum_w = sums["sum_w"] if w is not None else num_classes.to(acc)
            loss = loss + eps / num_classes.to(acc) * (sum_w * lse - sums["sum_wz"])
        loss = torch.where(valid, loss, 0.0).masked_fill(out_of_range, float("nan"))

        if reduction == "none":
            result = loss
            denominator = None
        elif reduction == "sum":
            result = loss.sum()
            denominator = None
        else:  # mean: divided by the summed target weights of the non-ignored rows (0/0 = nan if none)
            denominator = w_y.sum()
            result = loss.sum() / denominator

        # Saved: the logits shard (the only (M, C_r) tensor), and per row lse, w_y and the target.
        ctx.save_for_backward(logits_shard, target, weight, lse, w_y, offset, num_classes, sum_w, denominator)
        ctx.config = (ignore_index, reduction, eps)
        return result.to(logits_shard.dtype)

    @staticmethod
    @once_differentiable  # double backward raises rather than differentiating the closed form wrongly
    def backward(ctx, grad_output: torch.Tensor):
        logits_shard, target, weight, lse, w_y, offset, num_classes, sum_w, denominator = ctx.saved_tensors
        ignore_index, reduction, eps = ctx.config
        z = logits_shard.to(lse.dtype)
        width = z.shape[1]
        valid = target != ignore_index
        grad = grad_output.to(lse.dtype)
        scale = grad / denominator if reduction == "mean" else grad.expand_as(lse)
        scale = torch.where(valid, scale, 0.0)  # ignored rows get no gradient
        scale = scale.masked_fill(valid & ((target < 0) | (target >= num_classes)), float("nan"))

        # dz_c = (softmax_c * sum(q) - q_c) * scale, q_c = (1 - eps) * w_y * [c = y] + eps / C * w_c
        sum_q = (1 - eps) * w_y
        if eps > 0:
            sum_q = sum_q + eps / num_classes.to(lse.dtype) * sum_w
        dz = torch.exp(z - lse.unsqueeze(1)) * (sum_q * scale).unsqueeze(1)
        if eps > 0:
            w_smooth = 1.0 if weight is None else weight.to(lse.dtype)
            dz = dz - (eps / num_classes.to(lse.dtype) * scale).unsqueeze(1) * w_smooth
        if width > 0:
            local_target = target - offset
            owned = valid & (local_target >= 0) & (local_target < width)
            local_index = torch.where(owned, local_target, 0).unsqueeze(1)
            onehot_term = torch.where(owned, (1 - eps) * w_y * scale, 0.0).unsqueeze(1)
            dz = dz.scatter_add(1, local_index, -onehot_term)
        return dz.to(logits_shard.dtype), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    process_group: dist.ProcessGroup | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """F.cross_entropy over logits sharded along the class dimension (dim 1) across `process_group`.

    logits_shard: (N, C_r), (N, C_r, d1, ..., dK) or (C_r,): this rank's contiguous slice of the classes,
    in rank order; slices may be uneven. target: (N,), (N, d1, ..., dK) or (), int64/int32/uint8 class
    indices in [0, C), replicated on every rank. weight: this rank's (C_r,) slice of the class weights,
    or None.
    process_group: None for the default group; without an initialised group, or with one rank, this is
    plain cross-entropy and runs no collective. Returns the loss on every rank, in logits_shard's dtype:
    (N, d1, ..., dK) for reduction="none", else a scalar. Each rank then receives its slice of the gradient.
    Every rank of the group must call it (and backward) together, with the same target.
    An index target outside [0, C) that is not ignore_index raises IndexError on CPU, and on other
    devices with validate=True (one host sync); otherwise its row's loss and gradient are nan.
    """
    _check_args(
        logits_shard,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        op="vocab_parallel_cross_entropy",
        input_name="logits_shard",
        sharded=True,
    )
    unbatched = logits_shard.ndim == 1
    logits = logits_shard.unsqueeze(0) if unbatched else logits_shard
    # (N, C_r, d1, ..., dK) -> (M, C_r) rows with M = N * d1 * ... * dK; autograd maps the gradient back.
    rows = logits.movedim(1, -1).reshape(target.numel(), logits.shape[1])  # explicit M: C_r may be 0
    loss = VocabParallelCrossEntropyFunction.apply(
        rows,
        target.reshape(-1).long(),
        weight,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        process_group,
        bool(validate),
    )
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss


# ----------------------------------------------------------------------------------------------------
# V of a sharded head, by process group and then by this rank's shard width: a head keeps its shape, so
# the host read of the all-gathered V (a sync on CUDA) happens on the first call only. Weak keys: a
# destroyed group's entries go with it, and a new group (a re-initialised default group included) reads
# V afresh.
_vocab_sizes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_size(process_group: dist.ProcessGroup | None, width: int, num_classes: torch.Tensor) -> int:
    """V = sum_r V_r as a Python int; num_classes is its 0-dim device tensor from `_class_offset`."""
    group = process_group if process_group is not None else dist.group.WORLD
    if group is None:  # no process group at all: one rank, V is this rank's width
        return width
    known = _vocab_sizes.setdefault(group, {})
    if width not in known:
        known[width] = int(num_classes)
    return known[width]


# Linear + cross-entropy over a vocab-sharded head: fused_ops.linear_cross_entropy's chunks, each
# chunk's cross-entropy the Function above.
# ----------------------------------------------------------------------------------------------------
def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    process_group: dist.ProcessGroup | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """`fused_ops.linear_cross_entropy` with the head sharded along the vocabulary across `process_group`.

    input: (*, H) and target: (*) class indices in [0, V), the same on every rank. linear_weight_shard:
    (V_r, H), this rank's contiguous slice of the V rows, in rank order (slices may be uneven, V_r = 0
    included); linear_bias and weight: this rank's (V_r,) slices, or None.
    Returns the loss on every rank (() or (*) for "none"); input's gradient is the full one on every
    rank, and each rank's linear_weight_shard / linear_bias gradient is its slice of the full one.
    Every rank of the group must call it (and backward) together.

    Per chunk of rows, the logits shard (R, V_r) goes through `VocabParallelCrossEntropyFunction`
    (one all_gather, two all_reduce), dW_r += G_r.T @ x_c stays local, and dX = sum_r G_r @ W_r takes
    one all_reduce of (M, H) per call. "mean" with class weights adds one all_reduce of (M,) for its
    denominator. The stored gradients and the recomputing "none" backward are linear_cross_entropy's;
    so is the default chunk size, from the whole V so that every rank runs as many chunks. V is read on
    the host once per process group and shard width (`_vocab_size`), on the first call, a host sync on
    CUDA; later calls have none. Run one call eagerly before capturing a CUDA graph or compiling (as
    NCCL's own set-up needs anyway), or pass chunk_size, which skips it. Index targets only; no z_loss
    or softcap.
    """
    op = "vocab_parallel_linear_cross_entropy"
    _check_linear_args(
        input,
        linear_weight_shard,
        target,
        linear_bias,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        chunk_size,
        op=op,
        sharded=True,
    )
    distributed = is_distributed(process_group)
    width = linear_weight_shard.shape[0]
    offset, num_classes = _class_offset(width, input.device, process_group, distributed)
    if validate or target.device.type == "cpu":  # as vocab_parallel_cross_entropy: free on CPU
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bad.any():
            raise IndexError(
                f"{op}: target holds {int(target[bad][0])}, outside [0, {int(num_classes)}) and not "
                f"ignore_index={ignore_index}"
            )

    def loss_and_grad(logits, target, weight, need_grad, call):
        # d(sum of the chunk's row losses)/d(logits shard), through the Function's own backward
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(need_grad)
            loss = VocabParallelCrossEntropyFunction.apply(
                leaf,
                target.long(),
                weight,
                call.ignore_index,
                "none",
                call.label_smoothing,
                process_group,
                False,
            )
            grad = torch.autograd.grad(loss, leaf, torch.ones_like(loss))[0] if need_grad else None
        return loss.detach(), grad

    def target_weights(target, weight, ignore_index, dtype):
        active = target != ignore_index
        if weight is None:
            return active.to(dtype)
        local = target - offset
        owned = active & (local >= 0) & (local < width)  # this rank holds w[y_i]
        w_y = (
            torch.where(owned, weight.to(dtype).take(local.clamp(0, width - 1)), 0.0)
            if width > 0
            else torch.zeros(target.shape, dtype=dtype, device=target.device)
        )
        return all_reduce_sum(w_y, process_group) if distributed else w_y

    def all_reduce(tensor):
        if distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
        return tensor

    if chunk_size is None:  # from the whole V, so that every rank runs as many chunks
        vocab_size = _vocab_size(process_group, width, num_classes)
        chunk_size = default_chunk_size(input.shape[:-1].numel(), vocab_size, input.dtype, input.device)
    shard = VocabShard(loss_and_grad=loss_and_grad, target_weights=target_weights, all_reduce=all_reduce)
    return _apply(
        input,
        linear_weight_shard,
        target,
        linear_bias,
        weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=0.0,
        softcap=None,
        chunk_size=chunk_size,
        validate=validate,
        loss_dtype=input.dtype,
        shard=shard,
    )
