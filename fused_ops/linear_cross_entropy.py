"""Fused linear + cross-entropy: a language-model head's loss without its (N, V) logits.

    linear_cross_entropy(input, linear_weight, target, ...)
        == cross_entropy(F.linear(input, linear_weight, linear_bias).flatten(0, -2), target.flatten(), ...)

Shapes: input (*, H), e.g. (N, H) or (B, T, H); linear_weight (V, H); linear_bias (V,); target: class
indices of input's batch shape (*), or class probabilities (*, V); weight: (V,) class weights.
Internally every call works on M = prod(*) rows.

The scheme: the forward computes the gradients (as Liger-Kernel's fused linear cross-entropy does).
The rows go through in chunks of R; for each chunk,

    logits = x_c @ W.T + b                          (R, V)  matmul 1
    loss_c, G = cross-entropy's per-row loss and d(sum loss_c)/d(logits), one pass over the chunk, on
                the backend `cross_entropy` picks (`cross_entropy._rows_loss_and_grad`)
    dX_c = G @ W                                    (R, H)  matmul 2
    dW += G.T @ x_c,  db += sum_r G_r               (V, H)  matmul 3

and the chunk's (R, V) buffers are dropped before the next one, so the extra memory is one chunk's,
independent of M. That G is d(loss)/d(logits) for a unit grad_output with "sum" semantics; the rest of
the gradient is a scale that the backward applies, with no matmul: for a scalar loss (reduction "mean"
or "sum") dX_i *= g * s_i, dW *= g * s, db *= g * s, where g is grad_output and s the reduction's
scale, computed from the targets before the chunks run (mean over index targets: s = 1 / sum_i w[y_i]
over the non-ignored rows, s_i = s there and 0 on ignored rows, nan where that sum is 0 and a row
counts, as torch's 0 / 0; mean over probability targets: 1 / M; sum: 1).

reduction="none" has a grad_output per row, unknown in the forward, and dW = sum_i g_i G_i^T x_i does
not factor out of the sum. Its forward then computes only the losses (matmul 1 and a cross-entropy
pass without gradient) and its backward recomputes each chunk (matmuls 1-3, the rows of G scaled by
g_i): 4 matmuls in all, as many as a recomputing backward needs, against eager's 3 (1.21x eager's CPU
time at (4096, 512, 32000) fp32, torch's chunked path 1.50x: bench/RESULTS.md). A frozen head (only
input requires grad) needs no dW, and dX_i = g_i * (G_i @ W) does factor: then "none" also computes
dX in the forward (2 matmuls).

The first backward scales the stored dX, dW, db in place and hands them to autograd, which adopts them
as .grad without a copy. A later backward through the same graph (retain_graph=True, or gradcheck)
finds them gone and runs the forward's chunk loop again, which gives them bit for bit; under
torch.compile the backward multiplies out of place instead (the compiler plans the buffers).

Precision: G is in the logits' dtype (input's), as eager's dlogits; dX, dW and db accumulate in
float32 for bfloat16/float16 inputs (float64 for float64): on CUDA the half matmuls write float32
(`out_dtype`), on CPU (no fast half GEMM) the matmuls run in float32 on upcast copies. The loss is
accumulated in that dtype and returned in input's dtype (float32 under autocast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.modules.loss import _WeightedLoss

from fused_ops.cross_entropy import (
    HALF_DTYPES,
    INDEX_DTYPES,
    INPUT_DTYPES,
    KERNEL_DTYPES,
    _check_options,
    _check_target_range,
    _rows_loss_and_grad,
    checked_targets,
)
from fused_ops.cross_entropy import (
    _check_args as _check_cross_entropy_args,
)

OP = "linear_cross_entropy"


# ----------------------------------------------------------------------------------------------------
# Argument checking: one helper, run before anything is computed.
# ----------------------------------------------------------------------------------------------------
def _check_args(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    chunk_size: int | None,
    *,
    op: str = OP,
    sharded: bool = False,
) -> None:
    """Raise a clear exception naming the bad argument; touch nothing, read no tensor values.

    The head's arguments are checked here; the cross-entropy ones (target, weight, reduction, ...) by
    cross_entropy's own checker, on a zero-stride stand-in for the (M, V) logits. sharded=True: a rank's
    slice of the vocabulary (V_r = 0 allowed; index targets only), for the vocab-parallel twin.
    """
    for name, tensor in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(tensor).__name__}")
    if input.dtype not in INPUT_DTYPES:
        raise TypeError(f"{op}: input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError(f"{op}: input must have shape (*, H), e.g. (N, H) or (B, T, H); got a 0-dim tensor")
    hidden = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != hidden:
        raise ValueError(
            f"{op}: linear_weight must have shape (V, H) with H = {hidden} (input's last dimension), "
            f"got {tuple(linear_weight.shape)}"
        )
    num_classes = linear_weight.shape[0]
    if num_classes == 0 and not sharded:
        raise ValueError(f"{op}: linear_weight has no rows (V = 0): the head has no classes")
    tensors = [("linear_weight", linear_weight)]
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor):
            raise TypeError(f"{op}: linear_bias must be a Tensor or None, got {type(linear_bias).__name__}")
        if linear_bias.shape != (num_classes,):
            raise ValueError(
                f"{op}: linear_bias must have shape (V,) = ({num_classes},), like linear_weight's rows, "
                f"got {tuple(linear_bias.shape)}"
            )
        tensors.append(("linear_bias", linear_bias))
    for name, tensor in tensors:
        if tensor.dtype != input.dtype:
            raise TypeError(
                f"{op}: {name} must have input's dtype {input.dtype}, got {tensor.dtype} "
                f"(cast it, or run under torch.autocast)"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but input is on {input.device}; "
                f"all tensors must be on the same device"
            )
    batch = input.shape[:-1]
    if target.is_floating_point() and not sharded:
        if target.shape != (*batch, num_classes):
            raise ValueError(
                f"{op}: a probability target (float dtype) must have shape (*, V) = "
                f"{(*batch, num_classes)}, input's batch shape then V; got {tuple(target.shape)}"
            )
    else:
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(
                f"{op}: target must hold class indices (int64, int32 or uint8)"
                f"{'' if sharded else ' or class probabilities (input dtype)'}, got {target.dtype}"
            )
        if target.shape != batch:
            raise ValueError(
                f"{op}: an index target must have input's batch shape {tuple(batch)} (input is "
                f"{tuple(input.shape)} = (*, H)), got {tuple(target.shape)}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{op}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    rows = batch.numel()
    logits = input.new_empty(()).expand(rows, num_classes)  # stands in for the (M, V) logits: no memory
    _check_cross_entropy_args(
        logits,
        target.reshape(rows, num_classes) if target.is_floating_point() else target.reshape(rows),
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        op=op,
        input_name="logits",
        sharded=sharded,
    )


# ----------------------------------------------------------------------------------------------------
# Chunk size.
# ----------------------------------------------------------------------------------------------------
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 512 * 2**20}  # one chunk's logits, by device type (else cuda's)
MIN_CHUNK_ROWS = 64  # below this the matmuls lose efficiency faster than memory shrinks
ROW_ALIGN = 64


def default_chunk_size(num_rows: int, num_classes: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk when chunk_size=None: as many as keep one chunk's (R, V) logits within
    CHUNK_BYTES[device] (32 MiB on CPU, 512 MiB on CUDA), in whole multiples of 64 rows, at least 64,
    and never more than the M rows there are. It depends on V and the dtype, not on M, so the extra
    memory is bounded whatever the batch.

    CPU: 32 MiB is 256 rows of a 32000-word fp32 vocabulary, the fastest of 128-4096 rows at
    (4096, 512, 32000) on a 1-thread run, and leaner than torch's chunked path there (bench/RESULTS.md).
    CUDA (not yet measured): 512 MiB is 2048 rows of 128256 bf16 logits, so that dW's float32
    accumulation (read and write V x H x 4 bytes per chunk) stays well below its matmul's time.
    """
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    bytes_per_row = max(1, num_classes) * dtype.itemsize
    rows = max(MIN_CHUNK_ROWS, budget // bytes_per_row // ROW_ALIGN * ROW_ALIGN)
    return max(1, min(rows, num_rows))


# ----------------------------------------------------------------------------------------------------
# The chunked computation (the PyTorch path for every device; the cross-entropy pass dispatches).
# ----------------------------------------------------------------------------------------------------
class VocabShard(NamedTuple):
    """How the vocab-parallel twin (`fused_ops.distributed.vocab_parallel`) runs the chunks: each rank
    holds rows [offset, offset + V_r) of linear_weight. Set only by that twin."""

    loss_and_grad: Callable  # (logits, target, weight, need_grad, call) -> ((R,) losses, (R, V_r) grad)
    target_weights: Callable  # (target, weight, ignore_index, dtype) -> (M,) w[y_i] (0 if ignored)
    all_reduce: Callable  # (M, H) dX, each rank's sum over its V_r -> the sum over the ranks, in place


class _Call(NamedTuple):
    """What one linear_cross_entropy call asks of the Function, beside its tensors."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    chunk_size: int
    num_classes: int  # V: linear_weight's rows (this rank's V_r with a shard)
    loss_dtype: torch.dtype  # input's dtype, or float32 under autocast
    targets_in_range: bool  # index targets were checked to lie in [0, V) or equal ignore_index
    shard: VocabShard | None  # vocab-parallel: this rank's slice of the head
    rows: int  # M, input's rows

    @property
    def reduced_by_chunk(self) -> bool:
        """One chunk holds every row of a "mean" or "sum" call (no shard): its cross-entropy call then
        reduces the loss and scales the gradient itself (a unit grad_output, the mean's denominator
        included), and the Function skips its own reduction scale (`_reduction_scale`, a dozen small ops
        that dominate small heads such as makemore's (32, 200) x (27, 200))."""
        return self.shard is None and self.reduction != "none" and 0 < self.rows <= self.chunk_size


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast_on_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    """Half tensors on CPU -> float32 for the matmuls (CPU half GEMMs are emulated and slow)."""
    if t is None or t.dtype not in HALF_DTYPES or t.device.type == "cuda":
        return t
    return t.float()


def _mm(
    a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None, dtype: torch.dtype, inplace: bool
) -> torch.Tensor:
    """acc + a @ b (a @ b when acc is None), accumulated and returned in `dtype`; acc is updated in place
    when `inplace`. Half operands (CUDA only here) write float32 straight from the GEMM (`out_dtype`), no
    half round."""
    if acc is None:
        return torch.mm(a, b) if a.dtype == dtype else torch.mm(a, b, out_dtype=dtype)
    if a.dtype == dtype:
        return acc.addmm_(a, b) if inplace else torch.addmm(acc, a, b)
    return torch.addmm(acc, a, b, out_dtype=dtype, out=acc if inplace else None)


def _rows(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    call: _Call,
    *,
    need: tuple[bool, bool, bool],
    row_grad: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop over input (M, H): (loss, dX, dW, db).

    need: which of dX (M, H), dW (V, H), db (V,) to compute (None where not), in the accumulation dtype.
    row_grad None (the forward): G for a unit grad_output, and the loss: (M,) per row for "none", else
    the () sum of the rows, in the accumulation dtype; with `call.reduced_by_chunk`, the () reduced loss
    and the gradients of it (the reduction's scale applied by cross_entropy). row_grad (M,) (a recomputing backward): each
    chunk's G scaled row by row by it before the matmuls; no loss.
    """
    acc = _acc_dtype(input.dtype)
    rows = input.shape[0]
    need_dx, need_dw, need_db = need
    # Eager accumulates dX, dW and db in place. Under torch.compile, out of place: dynamo rejects (torch
    # 2.13) or mistraces (2.11: zero gradients) a Function whose gradients were built by in-place updates
    # (found by CI's torch 2.11 run); Inductor plans the buffers itself.
    inplace = not torch.compiler.is_compiling()
    dx_chunks = []
    weight_mm, bias_mm = _upcast_on_cpu(linear_weight), _upcast_on_cpu(linear_bias)
    dx = input.new_empty(input.shape, dtype=acc) if need_dx and inplace else None
    dw = None
    db = linear_weight.new_zeros(linear_weight.shape[0], dtype=acc) if need_db else None
    need_grad = any(need)
    losses = []
    for start in range(0, rows, call.chunk_size):
        x = _upcast_on_cpu(input[start : start + call.chunk_size])
        t = target[start : start + call.chunk_size]
        # matmul 1: the chunk's logits, (R, V), in input's dtype (float32 for half input on CPU)
        logits = torch.mm(x, weight_mm.t()) if bias_mm is None else torch.addmm(bias_mm, x, weight_mm.t())
        if t.is_floating_point():  # probabilities in the logits' dtype, as the kernels read them
            t = t.to(logits.dtype)
        if call.shard is None:
            loss, grad = _rows_loss_and_grad(
                logits,
                t,
                weight,
                ignore_index=call.ignore_index,
                label_smoothing=call.label_smoothing,
                z_loss=call.z_loss,
                softcap=call.softcap,
                need_grad=need_grad,
                loss_dtype=acc,
                targets_in_range=call.targets_in_range,
                reduction=call.reduction if call.reduced_by_chunk else "none",
            )
        else:
            loss, grad = call.shard.loss_and_grad(logits, t, weight, need_grad, call)
        del logits  # the Triton pass wrote G over it; the PyTorch path made G anew
        if row_grad is None:
            losses.append(loss if call.reduction == "none" or call.reduced_by_chunk else loss.sum())
        else:  # dz *= grad_output of its row
            row_factor = row_grad[start : start + call.chunk_size].unsqueeze(1)
            grad = grad.mul_(row_factor) if inplace else grad * row_factor
        if need_dx:  # matmul 2: dX = G @ W
            dx_chunk = _mm(grad, weight_mm, None, acc, inplace)
            if inplace:
                dx[start : start + call.chunk_size] = dx_chunk
            else:
                dx_chunks.append(dx_chunk)
        if need_dw:  # matmul 3: dW += G.T @ x
            dw = _mm(grad.t(), x, dw, acc, inplace)
        if need_db:  # db += sum over the chunk's rows of G
            db = db.add_(grad.sum(0, dtype=acc)) if inplace else db + grad.sum(0, dtype=acc)
        del grad  # before the next chunk's logits: one chunk of (R, V) buffers alive at a time
    if need_dx and not inplace:
        dx = torch.cat(dx_chunks) if dx_chunks else input.new_empty(input.shape, dtype=acc)
    if need_dw and dw is None:  # no rows: dW = 0
        dw = linear_weight.new_zeros(linear_weight.shape, dtype=acc)
    if call.shard is not None and need_dx:  # dX = sum over the ranks of G_r @ W_r
        dx = call.shard.all_reduce(dx)
    loss = None
    if row_grad is None:
        if call.reduction == "none":
            loss = torch.cat(losses) if losses else input.new_zeros(0, dtype=acc)
        elif call.reduced_by_chunk and losses:
            loss = losses[0]
        else:
            loss = torch.stack(losses).sum() if losses else input.new_zeros((), dtype=acc)
    return loss, dx, dw, db


class _Scale(NamedTuple):
    """The reduction's scale of the unit-"sum" gradients (see the module docstring); None: 1."""

    rows: torch.Tensor | None  # (M,) s_i for dX
    params: torch.Tensor | float | None  # s for dW and db
    denom: torch.Tensor | int | None  # the loss's "mean" denominator


def _reduction_scale(target: torch.Tensor, weight: torch.Tensor | None, call: _Call) -> _Scale:
    """The "mean" denominator and the gradient scales, from the (M,) or (M, V) targets alone; none where
    the one chunk's cross-entropy call reduces itself (`_Call.reduced_by_chunk`)."""
    if call.reduction != "mean" or call.reduced_by_chunk:
        return _Scale(None, None, None)
    rows = target.shape[0]
    if target.is_floating_point():  # torch divides by M; an empty batch has no gradient to scale
        return _Scale(None, 1.0 / rows if rows else 0.0, rows)
    acc = torch.float64 if call.loss_dtype == torch.float64 else torch.float32
    active = target != call.ignore_index
    if call.shard is not None:
        w_y = call.shard.target_weights(target, weight, call.ignore_index, acc)
    else:
        index = target.clamp(0, call.num_classes - 1).long()
        w_y = active.to(acc) if weight is None else torch.where(active, weight.to(acc).take(index), 0.0)
        if not call.targets_in_range:  # an out-of-range target makes the sum nan, as in cross_entropy
            w_y = w_y.masked_fill(active & (index != target), float("nan"))
    denom = w_y.sum()  # sum_i w[y_i] over the non-ignored rows
    if call.label_smoothing > 0:  # as cross_entropy: a zero denominator gives nan with smoothing
        denom = torch.where(denom == 0, float("nan"), denom)
    inverse = torch.where(denom == 0, float("nan"), 1.0 / denom)  # a counted row over a zero sum: nan
    rows_scale = torch.where(active, inverse, 0.0)  # ignored rows: exactly 0
    return _Scale(rows_scale, torch.where(active.any(), inverse, 0.0), denom)


def _finish_loss(loss: torch.Tensor, scale: _Scale, call: _Call) -> torch.Tensor:
    """The summed (or per-row) loss in the accumulation dtype -> the reduced loss in call.loss_dtype."""
    if scale.denom is not None:  # "mean" over several chunks
        loss = loss / scale.denom
    # A new tensor under torch.compile, never an alias of an intermediate: torch 2.11's dynamo returns
    # every intermediate of a Function's forward too, and gave the twin the gradient (the loss got a
    # zero grad_output; found by CI's torch 2.11 run).
    return loss.to(call.loss_dtype, copy=torch.compiler.is_compiling())


def _scaled(
    grad: torch.Tensor, factor: torch.Tensor | float, dtype: torch.dtype, in_place: bool
) -> torch.Tensor:
    """grad * factor in `dtype`: in grad's own memory when allowed and the dtype is already right, else
    written once into a new tensor (a half gradient straight from the float32 accumulator)."""
    if grad.dtype != dtype:
        return torch.mul(grad, factor, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))
    return grad.mul_(factor) if in_place else grad * factor


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = linear_cross_entropy(input, ...) on (M, H) input rows; see the module docstring.

    forward(input, linear_weight, linear_bias, target, weight, call) -> () or (M,) loss. It stores
    dX, dW, db for a unit grad_output (ctx.grads), unless the recomputing scheme serves the call, and
    saves the inputs for a backward that recomputes.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, call: _Call):
        need = tuple(ctx.needs_input_grad[:3])
        stores = call.reduction != "none" or not (need[1] or need[2])  # else: recompute in the backward
        # Autocast off: the tensors have the dtypes chosen already, and addmm's autocast rule would cast
        # the float32 accumulators down.
        with torch.autocast(input.device.type, enabled=False):
            loss, dx, dw, db = _rows(
                input,
                linear_weight,
                linear_bias,
                target,
                weight,
                call,
                need=need if stores else (False, False, False),
                row_grad=None,
            )
        scale = _reduction_scale(target, weight, call)
        ctx.call, ctx.stores = call, stores
        # Every tensor the backward reads goes through save_for_backward: torch 2.11's dynamo traced a
        # backward that read tensors kept as ctx attributes inside the forward graph, with a zero
        # grad_output (zero gradients; found by CI's torch 2.11 run). Plain floats stay attributes.
        params = scale.params if isinstance(scale.params, torch.Tensor) else None
        ctx.param_scale = None if params is not None else scale.params
        # Eager keeps the stored gradients as an attribute, so that the backward hands them to autograd
        # without a copy (a saved tensor stays referenced by the graph until it is freed).
        compiling = torch.compiler.is_compiling()
        ctx.grads = (dx, dw, db) if stores and not compiling else None
        stored = (dx, dw, db) if stores and compiling else (None, None, None)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, scale.rows, params, *stored)
        return _finish_loss(loss, scale, call)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises rather than going wrong
    def backward(ctx, grad_loss):
        call = ctx.call
        input, linear_weight, linear_bias, target, weight, rows_scale, params_scale, *stored = ctx.saved_tensors
        params_scale = ctx.param_scale if params_scale is None else params_scale
        need = ctx.needs_input_grad[:3]
        acc = _acc_dtype(input.dtype)
        g = grad_loss.to(acc)
        # Per-row factor of dX and the factor of dW, db: g * s_i and g * s (module docstring).
        if call.reduction == "none":
            row_factor, param_factor = g, None
        else:
            param_factor = g if params_scale is None else g * params_scale
            row_factor = param_factor if rows_scale is None else g * rows_scale
        compiling = torch.compiler.is_compiling()
        if ctx.stores:
            grads = tuple(stored) if compiling else ctx.grads  # compiled: saved, and never scaled in place
            if grads is None:  # handed to autograd by an earlier backward: the forward's work again
                with torch.autocast(input.device.type, enabled=False):
                    grads = _rows(
                        input, linear_weight, linear_bias, target, weight, call, need=need, row_grad=None
                    )[1:]
            elif not compiling:  # hand the buffers over: autograd adopts them as .grad without a copy
                ctx.grads = None
            dx, dw, db = grads
            if dx is not None:
                factor = row_factor.unsqueeze(1) if row_factor.dim() else row_factor
                dx = _scaled(dx, factor, input.dtype, in_place=not compiling)
            if dw is not None:
                dw = _scaled(dw, param_factor, linear_weight.dtype, in_place=not compiling)
            if db is not None:
                db = _scaled(db, param_factor, linear_bias.dtype, in_place=not compiling)
            return dx, dw, db, None, None, None
        # reduction="none" with dW or db: recompute each chunk, its rows scaled by grad_output
        with torch.autocast(input.device.type, enabled=False):
            _, dx, dw, db = _rows(
                input, linear_weight, linear_bias, target, weight, call, need=need, row_grad=g
            )
        return (
            None if dx is None else dx.to(input.dtype),
            None if dw is None else dw.to(linear_weight.dtype),
            None if db is None else db.to(linear_bias.dtype),
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------------------------------
# Functional API and module.
# ----------------------------------------------------------------------------------------------------
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    validate: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Cross-entropy of a linear layer's logits, without holding the (M, V) logits or their gradient.

    Values and gradients of `fused_ops.cross_entropy(F.linear(input, linear_weight, linear_bias)
    .flatten(0, -2), target.flatten(), ...)`, the loss reshaped to target's batch shape for "none".

    input: (*, H), e.g. (N, H) hidden states or (B, T, H); float16/bfloat16/float32/float64.
    linear_weight: (V, H) in input's dtype (an LM head, or a tied embedding); linear_bias: (V,) or None.
    target: class indices of shape (*) (int64/int32/uint8), or class probabilities (*, V) in input's dtype.
    weight: (V,) class weights or None. reduction, ignore_index, label_smoothing, z_loss, softcap: as in
        `fused_ops.cross_entropy` (z_loss: PaLM's z_loss * lse^2 per counted row; softcap: Gemma 2's
        softcap * tanh(logits / softcap)).
    Returns () for "mean"/"sum", (*) for "none", in input's dtype (float32 under autocast).

    Gradients flow to input, linear_weight and linear_bias, each computed only if it requires grad: a
    frozen head (LoRA, a frozen tied embedding) costs no dW matmul. Half inputs accumulate dX, dW, db in
    float32 and round once.

    chunk_size: rows per chunk, None for `default_chunk_size` (one chunk's logits near 32 MiB on CPU,
        512 MiB on CUDA, at least 64 rows). Memory beyond the inputs, the loss and the gradients is
        about one chunk's logits and their gradient (R x V each), whatever M is.
    validate: check that index targets lie in [0, V) or equal ignore_index (IndexError). Always done on
        CPU; on CUDA it costs a host sync, so by default an out-of-range target makes the loss nan.
    process_group: linear_weight (and linear_bias, weight) hold this rank's contiguous slice of the V
        classes, in rank order; input and target are the same on every rank. Each rank gets the full
        loss and dX, and its slice of dW, db (see `fused_ops.distributed.vocab_parallel`). Index targets
        only; no z_loss or softcap.

    The cross-entropy pass of each chunk runs on the backend `cross_entropy` picks (Triton on CUDA under
    "auto", the PyTorch path elsewhere; `fused_ops.use_backend` applies). The forward computes dX, dW,
    db (3 matmuls in all, as eager); reduction="none" recomputes in the backward (4 matmuls) unless
    only input requires grad. No host sync; works under torch.compile(fullgraph=True), autocast and
    CUDA-graph capture. A second backward through a retained graph recomputes (correct, slower).

    Raises TypeError / ValueError naming the argument for bad shapes, dtypes or options (mismatched H,
    a bias of the wrong size, a target of the wrong dtype or shape), IndexError for out-of-range
    targets (see validate).
    """
    _check_options(z_loss, softcap, op=OP)
    if process_group is not None:
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"{OP}: process_group must be a torch.distributed ProcessGroup or None, "
                f"got {type(process_group).__name__}"
            )
        if z_loss or softcap is not None:
            raise ValueError(
                f"{OP}: z_loss and softcap are not supported with process_group (vocab-parallel); leave "
                f"them at 0.0 and None"
            )
        # The one call from this op up to the multi-process room, made at call time.
        from fused_ops.distributed.vocab_parallel import vocab_parallel_linear_cross_entropy

        return vocab_parallel_linear_cross_entropy(
            input,
            linear_weight,
            target,
            process_group,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
            validate=validate,
        )
    loss_dtype = None
    if (
        isinstance(input, torch.Tensor)
        and input.dtype in KERNEL_DTYPES
        and input.device.type in ("cpu", "cuda")
        and torch.is_autocast_enabled(input.device.type)
    ):  # as F.linear then F.cross_entropy under autocast: half matmuls, a float32 loss
        dtype = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dtype), _to_dtype(linear_weight, dtype)
        linear_bias = _to_dtype(linear_bias, dtype)
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            target = target.to(dtype)
        loss_dtype = torch.float32
    _check_args(
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        chunk_size,
    )
    return _apply(
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        validate=validate,
        loss_dtype=loss_dtype or input.dtype,
        shard=None,
    )


def _to_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _apply(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    *,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    validate: bool,
    loss_dtype: torch.dtype,
    shard: VocabShard | None,
) -> torch.Tensor:
    """Checked arguments -> the loss: rows, range check, then the Function (or its forward alone).
    Also the vocab-parallel twin's entry, with `shard` set and its targets checked."""
    hidden, num_classes = input.shape[-1], linear_weight.shape[0]
    rows = input.reshape(-1, hidden)  # (*, H) -> (M, H): a view when it can be; autograd maps dX back
    prob = target.is_floating_point()
    target_rows = target.reshape(-1, num_classes) if prob else target.reshape(-1)
    targets_in_range = not prob and (validate or target.is_cpu)
    if targets_in_range and shard is None:
        if torch.compiler.is_compiling():
            target_rows = checked_targets(target_rows, num_classes, ignore_index)
        else:
            _check_target_range(target_rows, num_classes, ignore_index, op=OP)
    call = _Call(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        chunk_size=chunk_size or default_chunk_size(rows.shape[0], num_classes, input.dtype, input.device),
        num_classes=num_classes,
        loss_dtype=loss_dtype,
        targets_in_range=targets_in_range,
        shard=shard,
        rows=rows.shape[0],
    )
    grad_enabled = torch.is_grad_enabled()
    needs_grad = grad_enabled and (
        input.requires_grad
        or linear_weight.requires_grad
        or (linear_bias is not None and linear_bias.requires_grad)
    )
    if needs_grad:
        loss = LinearCrossEntropyFunction.apply(rows, linear_weight, linear_bias, target_rows, weight, call)
    else:  # no autograd node to record: the losses alone
        with torch.no_grad(), torch.autocast(input.device.type, enabled=False):
            loss = _rows(
                rows, linear_weight, linear_bias, target_rows, weight, call, need=(False,) * 3, row_grad=None
            )[0]
            loss = _finish_loss(loss, _reduction_scale(target_rows, weight, call), call)
    return loss.view(input.shape[:-1]) if reduction == "none" else loss


class LinearCrossEntropyLoss(_WeightedLoss):
    """Drop-in `torch.nn.LinearCrossEntropyLoss` (torch >= 2.13) running `fused_ops.linear_cross_entropy`.

    The same constructor and state_dict (`linear.weight` (V, H), `linear.bias` (V,), and `weight` when
    class weights are given), plus the keyword-only `z_loss`, `softcap`, `chunk_size`, `validate` and
    `process_group` of `linear_cross_entropy`. forward(input (*, H), target (*) or (*, V)) -> the loss.

    Differences from torch's: out_features (K-dimensional logits) must be () (ValueError otherwise);
    `options` is accepted for compatibility: its batch_chunk_size, when set and chunk_size is None,
    becomes chunk_size, and its other fields (torch's precision policies, chunking heuristics, retain
    -graph switch) have no counterpart: this op always chunks, accumulates in float32 and allows a second
    backward. input may have any batch shape (*, H). With process_group, num_classes is this rank's
    slice width V_r and `weight` this rank's slice of the class weights.

    Data parallel: wrap this module (or a module holding it) with DDP or FSDP2's `fully_shard`, whose
    hooks run around its forward; `fully_shard(loss.linear)` alone would leave linear.weight sharded
    here, since forward reads it without calling `self.linear` (which would build the logits).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        validate: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if tuple(out_features) != ():
            raise ValueError(
                f"LinearCrossEntropyLoss: out_features={tuple(out_features)} (K-dimensional logits) is not "
                f"supported; flatten those dimensions into the batch: input (*, H), target (*)"
            )
        _check_options(z_loss, softcap, op="LinearCrossEntropyLoss")
        if chunk_size is None and options is not None:
            chunk_size = getattr(options, "batch_chunk_size", None)
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = ()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.validate = validate
        self.process_group = process_group

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            validate=self.validate,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        options = "" if not self.z_loss else f", z_loss={self.z_loss}"
        options += "" if self.softcap is None else f", softcap={self.softcap}"
        options += "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        sharded = "" if self.process_group is None else ", vocab-parallel over process_group"
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}{options}{sharded}"
        )
