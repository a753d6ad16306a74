"""Triton cross-entropy kernels and their launchers.

Shapes: logits (M, C) with unit column stride (any row stride); target (M,) int64 class indices or
(M, C) class probabilities in the logits' dtype; weight (C,) float32; grad (M, C) in the logits' dtype.

The math (see fused_ops/cross_entropy.py): loss_i = -sum_c q_ic * logp_ic with q the weighted, smoothed
target distribution, and d(loss_i)/d(z_ic) = softmax_ic * sum_c q_ic - q_ic, times the reduction scale
(mean: 1 / sum_i w[y_i] over non-ignored rows, 1 / M for probability targets). Statistics, loss and the
gradient are computed in fp32 (the true-class term p_y * sum_q - q_y included) and rounded once.

Two options:
    z_loss   a scalar argument, 0 = off: adds z_loss * lse_i^2 to the loss of each counted row; its
             gradient 2 * z_loss * lse_i * softmax_ic has the softmax factor of the main term, so it
             folds into sum_q (no extra pass). Applied without a branch (z_loss = 0 adds exactly 0 where
             lse is finite; where it is not, the row is nan anyway), which keeps the default kernels'
             registers: behind a runtime `if` it cost them up to 22 a thread.
    softcap  the constexpr SOFTCAP (a runtime switch cost the default kernels up to 75 registers a
             thread, and occupancy with them): the loss sees z = softcap * tanh(x / softcap), applied
             to each block of logits on load (in both sweeps), and the gradient written is
             d/dx = d/dz * (1 - tanh(x / softcap)^2).

Kernels:
    cross_entropy_fwd_kernel    per-row loss and, when asked, the gradient for a unit grad_output;
                                "mean"/"sum" reduce per program in fixed order (one program: final value)
    cross_entropy_denom_kernel  partial sums of w[y_i] for "mean" when the forward has > 1 program
    cross_entropy_finish_kernel fixed-order sum of the forward's per-program partials
    cross_entropy_bwd_kernel    grad *= grad_output in place (per row for "none"); rows where
                                grad_output == 1 are skipped, so loss.backward() moves no bytes

Launch settings come from `forward_settings(C, prob_target)`, a fixed ladder: for C <= 16384 (index
targets; 4096 for probability targets, whose target tile needs registers too) a program holds whole
rows in registers (C <= 32: 64 rows per program, so makemore's (32, 27) is one program, one launch)
and the logits are read once; beyond it a program streams its row in column blocks with an online
softmax (running max and sum), then sweeps the row again to write the gradient (that re-read of a row
just read is meant to hit L2). Everything stays on the device: no host sync, deterministic (no atomics).

Byte model (b = bytes per logit, per call with a gradient):
    forward, C <= 16384:  read M*C*b logits + write M*C*b gradient   (+ M*8 targets, + C*4 weights)
    forward, C  > 16384:  read 2*M*C*b + write M*C*b; the second sweep re-reads a row this program has
                          just read, meant to hit L2 so that DRAM sees ~M*C*b of reads (to be measured
                          on a GPU). Without a gradient and without smoothing there is no second sweep.
    backward:             0 bytes where grad_output == 1, else read + write M*C*b in place
"mean" over several programs adds one read of the M targets (denominator kernel); probability targets
add M*C*b of target reads (twice in the two-sweep regime).

Out-of-range index targets (not ignore_index, outside [0, C)) are clamped for every read and make their
row's loss and gradient nan, and the "mean" denominator nan: no device assert, no host sync.

torch.compile. The launchers are called straight from the autograd Functions in fused_ops, and dynamo
traces them: each `kernel[grid](...)` becomes a user-defined Triton kernel in the graph (a
`triton_kernel_wrapper_mutation` node), which Inductor compiles and schedules with the ops around it.
No torch.library custom op (`triton_op` + `wrap_triton`) is registered, because (1) the autograd
Function already holds the backward, which a custom op would need again via register_autograd; (2)
eager calls would pay the dispatcher's per-call cost, or need a second, op-free eager path; (3)
PyTorch's own guidance prefers plain user-defined kernels unless the op must behave like a built-in
(tensor subclasses, dispatch modes, export). What tracing asks of the launchers: Python on shapes
only (no tensor values), and no tensor passed to two pointer arguments that may both be written
(functionalisation clones each written argument on its own, which would split the alias; hence one
Loss_ptr for the per-row and the reduced loss). Without a gradient, Grad_ptr is the logits, never
written: compiled, that costs a copy of the logits (the mutation analysis sees the store, not that
write_grad is 0 at run time).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from fused_ops.kernels.triton.spec import KernelSpec

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


# ----------------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _target_weight(T_ptr, W_ptr, rows, row_mask, stride_tm, C, ignore_index, HAS_WEIGHT: tl.constexpr):
    """Index targets of `rows` -> (y clamped into [0, C), active: not ignored, w[y_i]: 0 if ignored,
    nan if out of range)."""
    y = tl.load(T_ptr + rows * stride_tm, mask=row_mask, other=ignore_index)
    active = row_mask & (y != ignore_index)
    out_of_range = (y < 0) | (y >= C)
    y = tl.where(active & (y >= 0) & (y < C), y, 0).to(tl.int32)  # clamped into [0, C): reads stay in bounds
    if HAS_WEIGHT:
        w_y = tl.load(W_ptr + y, mask=active, other=0.0)
    else:
        w_y = tl.where(active, 1.0, 0.0)
    w_y = tl.where(active & out_of_range, float("nan"), w_y)  # out-of-range target -> nan row
    return y, active, w_y


@triton.jit
def _class_weights(W_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr):
    """w_c for a block of columns (1 without weights), 0 on masked lanes."""
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=col_mask, other=0.0)
    else:
        w = tl.where(col_mask, 1.0, 0.0)
    return w


@triton.jit
def _soft_cap(x, softcap, mask):
    """softcap * tanh(x / softcap) on `mask`, -inf elsewhere (padding stays -inf, not -softcap).

    tanh from exp, which the interpreter also runs (it has no libdevice):
    tanh(u) = sign(u) * (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1], which never overflows;
    absolute error ~1e-7 * softcap, about the rounding of a logit of that size."""
    u = x / softcap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(mask, softcap * tl.where(u < 0.0, -t, t), float("-inf"))


@triton.jit
def _soft_cap_grad(grad, z, softcap):
    """d(loss)/dx from d(loss)/dz for z = softcap * tanh(x / softcap): dx = dz * (1 - t^2), t = z / softcap,
    written (1 - t)(1 + t), which keeps its precision as |t| -> 1."""
    t = z / softcap
    return grad * ((1.0 - t) * (1.0 + t))


@triton.jit
def _load_logits(x_rows, row_mask, c0, C, softcap, SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [c0, c0 + BLOCK_C) of the rows as fp32 (soft-capped when SOFTCAP), -inf where masked.
    Returns (cols, col_mask, mask, z): (BLOCK_C,), (BLOCK_C,), (BLOCK_N, BLOCK_C), (BLOCK_N, BLOCK_C)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    if SOFTCAP:
        z = _soft_cap(z, softcap, mask)
    return cols, col_mask, mask, z


@triton.jit
def _single_pass_rows(
    x_rows,  # (BLOCK_N,) pointers to the rows' logits
    t_rows,  # (BLOCK_N,) pointers to the rows' probability targets (PROB_TARGET)
    g_rows,  # (BLOCK_N,) pointers to the rows' gradient
    W_ptr,
    y,
    w_y,
    active,
    row_mask,
    C,
    eps,
    scale,
    z_loss,
    softcap,
    write_grad,
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows that fit one BLOCK_C tile: (loss, lse), each (BLOCK_N,), the loss before z-loss, masking and
    scale; stores the gradient when write_grad. The logits are read once."""
    NEG_INF: tl.constexpr = float("-inf")
    cols, col_mask, mask, z = _load_logits(x_rows, row_mask, 0, C, softcap, SOFTCAP, BLOCK_C)
    w = _class_weights(W_ptr, cols, col_mask, HAS_WEIGHT)
    m = tl.max(z, axis=1)
    m = tl.where(m == NEG_INF, 0.0, m)  # all -inf (padding rows): keep exp finite
    lse = m + tl.log(tl.sum(tl.exp(z - m[:, None]), axis=1))  # exp is 0 on masked lanes
    neg_logp = lse[:, None] - z  # -log softmax; masked lanes are inf and always masked below
    if PROB_TARGET:
        t = tl.load(t_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.where(mask, w[None, :] * ((1.0 - eps) * t + eps / C), 0.0)  # q_ic = w_c((1-eps)p_ic + eps/C)
        sum_q = tl.sum(q, axis=1)
        loss = tl.sum(tl.where(mask, q * neg_logp, 0.0), axis=1)  # -sum_c q_ic logp_ic
    else:
        is_y = cols[None, :] == y[:, None]
        nll = tl.sum(tl.where(is_y & mask, neg_logp, 0.0), axis=1)  # -logp_iy
        smooth = tl.sum(tl.where(mask, w[None, :] * neg_logp, 0.0), axis=1)  # -sum_c w_c logp_ic
        smooth = tl.where(eps > 0.0, eps / C * smooth, 0.0)  # torch adds it only for eps > 0
        loss = (1.0 - eps) * w_y * nll + smooth
        sum_q = (1.0 - eps) * w_y + eps / C * tl.sum(w, axis=0)  # sum_c q_ic
        # q_ic = (1 - eps) w[y_i] [c == y_i] + eps/C w_c
        q = eps / C * w[None, :] + tl.where(is_y, ((1.0 - eps) * w_y)[:, None], 0.0)
    if write_grad != 0:
        sum_q += 2.0 * z_loss * lse  # d(z_loss * lse_i^2)/dz_ic = 2 * z_loss * lse_i * softmax_ic
        p = tl.exp(z - lse[:, None])  # softmax (recomputed: fewer live registers than keeping exp(z - m))
        grad = (p * sum_q[:, None] - q) * scale  # dz = (softmax * sum_q - q) * scale
        if SOFTCAP:
            grad = _soft_cap_grad(grad, z, softcap)
        grad = tl.where(active[:, None], grad, 0.0)  # ignored rows: exactly 0
        tl.store(g_rows[:, None] + cols[None, :], grad.to(g_rows.dtype.element_ty), mask=mask)
    return loss, lse


@triton.jit(do_not_specialize=["reduction", "write_grad", "num_denom_partials"])
def cross_entropy_fwd_kernel(
    # pointers
    X_ptr,  # (M, C) logits
    T_ptr,  # (M,) int64 class indices, or (M, C) probabilities (logits' dtype)
    W_ptr,  # (C,) float32 class weights, read only when HAS_WEIGHT
    Grad_ptr,  # (M, C) gradient out (logits' dtype), written only when write_grad
    Loss_ptr,  # loss out (loss dtype): (M,) per row for "none", () for "mean"/"sum" with one program
    Partial_ptr,  # (num_programs,) float32 per-program sums, "mean"/"sum" with several programs
    DenomPartial_ptr,  # (num_denom_partials,) float32 partial sums of w[y_i], index "mean", several programs
    # strides (elements; columns are unit-stride)
    stride_xm,
    stride_tm,
    stride_gm,
    # sizes and scalars
    M,
    C,
    ignore_index,
    label_smoothing,
    inv_rows,  # 1 / M for probability-target "mean", else 1
    z_loss,  # weight of lse_i^2 in the loss; 0: off
    softcap,  # logits z = softcap * tanh(x / softcap), read only when SOFTCAP
    num_denom_partials,
    reduction,  # 0 none, 1 sum, 2 mean
    write_grad,  # 0 or 1
    # constexprs
    HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    SOFTCAP: tl.constexpr,  # softcap set: a specialisation, so the default kernels carry none of it
    SINGLE_PASS: tl.constexpr,  # C <= BLOCK_C: the row tile stays in registers, logits read once
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DENOM_BLOCK: tl.constexpr,  # >= num_denom_partials
):
    """Rows [pid * BLOCK_N, (pid + 1) * BLOCK_N) of (M, C) logits: loss, and the gradient when write_grad."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rows * stride never overflows
    row_mask = rows < M
    x_rows = X_ptr + rows * stride_xm
    g_rows = Grad_ptr + rows * stride_gm
    t_rows = T_ptr + rows * stride_tm
    eps = label_smoothing
    NEG_INF: tl.constexpr = float("-inf")

    if PROB_TARGET:
        active = row_mask
        y = tl.zeros([BLOCK_N], dtype=tl.int32)
        w_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        y, active, w_y = _target_weight(T_ptr, W_ptr, rows, row_mask, stride_tm, C, ignore_index, HAS_WEIGHT)

    # Reduction scale, on the device: mean over targets divides by sum_i w[y_i] (nan when it is 0, as torch).
    scale = inv_rows
    if (not PROB_TARGET) and (reduction == 2):
        if tl.num_programs(0) == 1:
            denom = tl.sum(w_y, axis=0)  # this program holds every row
        else:
            offs = tl.arange(0, DENOM_BLOCK)
            denom = tl.sum(
                tl.load(DenomPartial_ptr + offs, mask=offs < num_denom_partials, other=0.0), axis=0
            )
        scale = tl.where(denom == 0.0, float("nan"), 1.0 / denom)

    if SINGLE_PASS:
        loss, lse = _single_pass_rows(
            x_rows=x_rows,
            t_rows=t_rows,
            g_rows=g_rows,
            W_ptr=W_ptr,
            y=y,
            w_y=w_y,
            active=active,
            row_mask=row_mask,
            C=C,
            eps=eps,
            scale=scale,
            z_loss=z_loss,
            softcap=softcap,
            write_grad=write_grad,
            HAS_WEIGHT=HAS_WEIGHT,
            PROB_TARGET=PROB_TARGET,
            SOFTCAP=SOFTCAP,
            BLOCK_C=BLOCK_C,
        )
    else:
        # Sweep 1: online softmax statistics (running max m, running sum s relative to m).
        m = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_q = tl.zeros([BLOCK_N], dtype=tl.float32)
        z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
        w_total = 0.0
        for c0 in range(0, C, BLOCK_C):
            cols, col_mask, mask, z = _load_logits(x_rows, row_mask, c0, C, softcap, SOFTCAP, BLOCK_C)
            w = _class_weights(W_ptr, cols, col_mask, HAS_WEIGHT)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)  # s = sum exp(z - m)
            m = m_new
            w_total += tl.sum(w, axis=0)
            if PROB_TARGET:
                t = tl.load(t_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                sum_q += tl.sum(tl.where(mask, w[None, :] * ((1.0 - eps) * t + eps / C), 0.0), axis=1)
            else:
                z_y += tl.sum(tl.where((cols[None, :] == y[:, None]) & mask, z, 0.0), axis=1)  # target logit
        lse = tl.where(m == NEG_INF, 0.0, m) + tl.log(s)
        if not PROB_TARGET:
            sum_q = (1.0 - eps) * w_y + eps / C * w_total
        sum_q += 2.0 * z_loss * lse  # d(z_loss * lse_i^2)/dz_ic = 2 * z_loss * lse_i * softmax_ic
        # Sweep 2 (for the gradient, the smoothing term or probability targets): terms that need lse.
        loss = tl.zeros([BLOCK_N], dtype=tl.float32)
        smooth = tl.zeros([BLOCK_N], dtype=tl.float32)
        if PROB_TARGET or (write_grad != 0) or (eps > 0.0):
            for c0 in range(0, C, BLOCK_C):
                cols, col_mask, mask, z = _load_logits(x_rows, row_mask, c0, C, softcap, SOFTCAP, BLOCK_C)
                w = _class_weights(W_ptr, cols, col_mask, HAS_WEIGHT)
                neg_logp = lse[:, None] - z
                if PROB_TARGET:
                    t = tl.load(t_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    q = tl.where(mask, w[None, :] * ((1.0 - eps) * t + eps / C), 0.0)
                    loss += tl.sum(tl.where(mask, q * neg_logp, 0.0), axis=1)
                else:
                    is_y = cols[None, :] == y[:, None]
                    smooth += tl.sum(tl.where(mask, w[None, :] * neg_logp, 0.0), axis=1)
                    q = eps / C * w[None, :] + tl.where(is_y, ((1.0 - eps) * w_y)[:, None], 0.0)
                if write_grad != 0:
                    p = tl.exp(z - lse[:, None])
                    grad = (p * sum_q[:, None] - q) * scale
                    if SOFTCAP:
                        grad = _soft_cap_grad(grad, z, softcap)
                    grad = tl.where(active[:, None], grad, 0.0)
                    tl.store(g_rows[:, None] + cols[None, :], grad.to(Grad_ptr.dtype.element_ty), mask=mask)
        if not PROB_TARGET:
            nll = lse - z_y  # -logp_iy
            loss = (1.0 - eps) * w_y * nll + tl.where(eps > 0.0, eps / C * smooth, 0.0)

    loss += z_loss * lse * lse  # PaLM's z-loss, on counted rows only (masked next)
    loss = tl.where(active, loss, 0.0) * scale
    if reduction == 0:
        tl.store(Loss_ptr + rows, loss.to(Loss_ptr.dtype.element_ty), mask=row_mask)
    else:
        total = tl.sum(loss, axis=0)  # fixed-order tree: deterministic
        if tl.num_programs(0) == 1:
            tl.store(Loss_ptr, total.to(Loss_ptr.dtype.element_ty))
        else:
            tl.store(Partial_ptr + pid, total)


@triton.jit
def cross_entropy_denom_kernel(
    # pointers
    T_ptr,  # (M,) int64 class indices
    W_ptr,  # (C,) float32 class weights, read only when HAS_WEIGHT
    DenomPartial_ptr,  # (num_programs,) float32 out: sum of w[y_i] over this program's rows
    # strides
    stride_tm,
    # sizes and scalars
    M,
    C,
    ignore_index,
    rows_per_program,  # a multiple of BLOCK_N
    # constexprs
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DenomPartial[pid] = sum of w[y_i] over rows [pid * rows_per_program, (pid + 1) * rows_per_program)."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rows_per_program, BLOCK_N):
        rows = pid * rows_per_program + r0 + tl.arange(0, BLOCK_N)
        _, _, w_y = _target_weight(T_ptr, W_ptr, rows, rows < M, stride_tm, C, ignore_index, HAS_WEIGHT)
        acc += w_y
    tl.store(DenomPartial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def cross_entropy_finish_kernel(
    # pointers
    Partial_ptr,  # (num_partials,) float32
    Out_ptr,  # () loss out (loss dtype)
    # sizes
    num_partials,
    # constexprs
    BLOCK: tl.constexpr,
):
    """Out = sum of the (num_partials,) partials, always in the same order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, num_partials, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(Partial_ptr + offs, mask=offs < num_partials, other=0.0)
    tl.store(Out_ptr, tl.sum(acc, axis=0).to(Out_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_bwd_kernel(
    # pointers
    Grad_ptr,  # (M, C) stored gradient, scaled in place
    Scale_ptr,  # grad_output: () with stride_s = 0, or (M,)
    # strides
    stride_gm,
    stride_s,
    # sizes
    M,
    C,
    # constexprs
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Tile (BLOCK_N rows, BLOCK_C columns) of the (M, C) gradient: grad *= grad_output of its row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    scale = tl.load(Scale_ptr + rows * stride_s, mask=row_mask, other=1.0).to(tl.float32)
    todo = row_mask & (scale != 1.0)
    if tl.max(todo.to(tl.int32), axis=0) == 0:
        return  # grad_output == 1 on every row here: the stored gradient is already the answer
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = todo[:, None] & (cols < C)[None, :]
    ptrs = Grad_ptr + rows[:, None] * stride_gm + cols[None, :]
    grad = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (grad * scale[:, None]).to(Grad_ptr.dtype.element_ty), mask=mask)  # dz *= grad_output


# ----------------------------------------------------------------------------------------------------
# Launch settings.
# ----------------------------------------------------------------------------------------------------
class ForwardSettings(NamedTuple):
    max_classes: int | None  # this rung serves C <= max_classes (None: any C)
    BLOCK_N: int
    BLOCK_C: int
    SINGLE_PASS: bool
    num_warps: int


# Many rows per program for small C (tiles of 2048 and 4096), a whole row per program up to 16384
# classes, then two sweeps over 4096-column blocks. Warps are set so that no variant spills registers
# on sm_80 or sm_90 on triton 3.6, 3.7.1 and 3.9 (tests/compile_kernels.py; CI checks 3.6 and 3.9). On
# 3.8.0, three softcap variants of the two-sweep rung (index targets; not a default, not benchmarked)
# spill 8 bytes on sm_90: ptxas 13 moves 8 bytes of packed predicates to the stack at register counts
# it picks itself (64, 80); 4 or 16 warps, or 2048-column blocks, only move the spill to other versions.
# Fixed rungs keep the compiled variants few.
FORWARD_LADDER = (
    ForwardSettings(32, 64, 32, True, 8),
    ForwardSettings(1024, 4, 1024, True, 8),
    ForwardSettings(16384, 1, 16384, True, 16),
    ForwardSettings(None, 1, 4096, False, 8),
)
# Probability targets keep a second tile live (the targets, then q) beside the logits until the
# gradient is written. A whole 16384-class row then needs more than the 128 registers a thread has at
# 16 warps (sm_90 spilled up to 112 bytes, triton 3.9), and at 8 warps ptxas 13 (triton >= 3.7) spills
# 8 bytes of packed predicates in several variants near 80 registers. These rungs use fewer elements
# per thread, or 4 warps for the smallest tile, and compile without spills on triton 3.6 to 3.9.
# Not timed on a GPU yet: probability targets are off the benchmarked (index-target) path.
PROB_FORWARD_LADDER = (
    ForwardSettings(32, 64, 32, True, 4),
    ForwardSettings(1024, 4, 1024, True, 16),
    ForwardSettings(4096, 1, 4096, True, 16),
    ForwardSettings(None, 1, 4096, False, 16),
)
BACKWARD_LADDER = (  # (max_classes, BLOCK_N, BLOCK_C, num_warps)
    (32, 64, 32, 4),
    (None, 4, 1024, 8),
)
MAX_CLASSES = 65535 * 1024  # the backward's grid dimension 1 (cdiv(C, 1024)) is capped at 65535
DENOM_ROWS_PER_PROGRAM = 8192
DENOM_BLOCK_N = 1024
DENOM_BLOCK = 256  # most denominator partials; the forward sums them in one fixed-order block
FINISH_BLOCK = 1024
TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _check_classes(num_classes: int) -> None:
    if not 0 < num_classes <= MAX_CLASSES:
        raise ValueError(f"cross_entropy kernels: need 0 < C <= {MAX_CLASSES}, got C = {num_classes}")


def forward_settings(num_classes: int, prob_target: bool = False) -> ForwardSettings:
    """The first rung of FORWARD_LADDER (PROB_FORWARD_LADDER for probability targets) that holds C
    classes. Deterministic; raises past MAX_CLASSES."""
    _check_classes(num_classes)
    ladder = PROB_FORWARD_LADDER if prob_target else FORWARD_LADDER
    return next(rung for rung in ladder if rung.max_classes is None or num_classes <= rung.max_classes)


def backward_settings(num_classes: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) for the in-place scaling kernel."""
    _check_classes(num_classes)
    return next(rung[1:] for rung in BACKWARD_LADDER if rung[0] is None or num_classes <= rung[0])


# ----------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------
SMALLEST_NORMAL_FP32 = 2.0**-126


def _kernel_scalar(value: float) -> float:
    """A float argument as the kernels see it: fp32, subnormals flushed to 0. Triton types a Python float
    below fp32's smallest normal as fp64 in the interpreter, which then wrote a 0 loss for bf16 logits
    (found by tests/test_fuzz.py with label_smoothing=1e-39); compiled, the value is an fp32 scalar."""
    return 0.0 if abs(value) < SMALLEST_NORMAL_FP32 else float(value)


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad: torch.Tensor | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Loss of (M, C) logits; writes d(loss)/d(logits) for a unit grad_output into `grad` when given.

    logits: (M, C), unit column stride. target: (M,) class indices (int32/uint8 are converted to int64:
    one extra small launch) or (M, C) probabilities in logits.dtype with unit column stride.
    weight: (C,) or None (converted to float32 if needed). z_loss: weight of lse_i^2 per counted row
    (0: off). softcap: None, or > 0 for logits softcap * tanh(logits / softcap). grad: (M, C) with unit
    column stride, may be logits itself (inplace). Returns () for "mean"/"sum", (M,) for "none", in
    loss_dtype: logits.dtype by default, or float32 beside half logits (autocast's dtype for
    cross_entropy).
    Launches: one forward when the rows fit one program; else denominator ("mean" with index targets)
    + forward + finish ("mean"/"sum").
    """
    num_rows, num_classes = logits.shape
    prob = target.is_floating_point()
    settings = forward_settings(num_classes, prob)
    dtype, device = loss_dtype or logits.dtype, logits.device
    code = REDUCTION_CODES[reduction]
    if num_rows == 0:  # as torch: mean of nothing is nan, sum is 0
        if code == 0:
            return torch.empty(0, dtype=dtype, device=device)
        return torch.full((), float("nan") if code == 2 else 0.0, dtype=dtype, device=device)
    if not prob and target.dtype != torch.int64:
        target = target.to(torch.int64)
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()

    num_programs = triton.cdiv(num_rows, settings.BLOCK_N)
    partial = torch.empty(num_programs, dtype=torch.float32, device=device)
    out = torch.empty(num_rows if code == 0 else (), dtype=dtype, device=device)
    denom_partial = partial  # unused unless filled below
    num_denom_partials = 0
    if code == 2 and not prob and num_programs > 1:
        num_denom_partials = min(DENOM_BLOCK, triton.cdiv(num_rows, DENOM_ROWS_PER_PROGRAM))
        rows_per_program = (
            triton.cdiv(triton.cdiv(num_rows, num_denom_partials), DENOM_BLOCK_N) * DENOM_BLOCK_N
        )
        num_denom_partials = triton.cdiv(num_rows, rows_per_program)
        denom_partial = torch.empty(num_denom_partials, dtype=torch.float32, device=device)
        cross_entropy_denom_kernel[(num_denom_partials,)](
            T_ptr=target,
            W_ptr=partial if weight is None else weight,
            DenomPartial_ptr=denom_partial,
            stride_tm=target.stride(0),
            M=num_rows,
            C=num_classes,
            ignore_index=ignore_index,
            rows_per_program=rows_per_program,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=DENOM_BLOCK_N,
        )

    cross_entropy_fwd_kernel[(num_programs,)](
        X_ptr=logits,
        T_ptr=target,
        W_ptr=partial if weight is None else weight,
        Grad_ptr=logits if grad is None else grad,
        Loss_ptr=out,
        Partial_ptr=partial,
        DenomPartial_ptr=denom_partial,
        stride_xm=logits.stride(0),
        stride_tm=target.stride(0),
        stride_gm=logits.stride(0) if grad is None else grad.stride(0),
        M=num_rows,
        C=num_classes,
        ignore_index=ignore_index,
        label_smoothing=_kernel_scalar(label_smoothing),
        inv_rows=1.0 / num_rows if prob and code == 2 else 1.0,
        z_loss=_kernel_scalar(z_loss),
        softcap=1.0 if softcap is None else float(softcap),  # unread without SOFTCAP
        num_denom_partials=num_denom_partials,
        reduction=code,
        write_grad=int(grad is not None),
        HAS_WEIGHT=weight is not None,
        PROB_TARGET=prob,
        SOFTCAP=softcap is not None,
        SINGLE_PASS=settings.SINGLE_PASS,
        BLOCK_N=settings.BLOCK_N,
        BLOCK_C=settings.BLOCK_C,
        DENOM_BLOCK=DENOM_BLOCK,
        num_warps=settings.num_warps,
    )
    if code != 0 and num_programs > 1:
        cross_entropy_finish_kernel[(1,)](
            Partial_ptr=partial,
            Out_ptr=out,
            num_partials=num_programs,
            BLOCK=FINISH_BLOCK,
            num_warps=4,
        )
    return out


def cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad: (M, C) with unit column stride, scaled in place by grad_output: () or (M,)."""
    num_rows, num_classes = grad.shape
    if num_rows == 0:
        return
    block_n, block_c, num_warps = backward_settings(num_classes)
    grid = (triton.cdiv(num_rows, block_n), triton.cdiv(num_classes, block_c))
    cross_entropy_bwd_kernel[grid](
        Grad_ptr=grad,
        Scale_ptr=grad_output,
        stride_gm=grad.stride(0),
        stride_s=grad_output.stride(0) if grad_output.dim() else 0,
        M=num_rows,
        C=num_classes,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------------------
# Specialisations, for tests/compile_kernels.py.
# ----------------------------------------------------------------------------------------------------
def specializations() -> Iterator[KernelSpec]:
    """Every (kernel, dtype, constexpr) combination the launchers above can choose. The loss (and so
    grad_output, the backward's scale) has the logits' dtype, or float32 beside half logits under
    autocast."""
    for dtype in TORCH_TO_TRITON.values():
        loss_dtypes = (dtype,) if dtype == "fp32" else (dtype, "fp32")
        for prob, rung_index, has_weight, softcap, loss in itertools.product(
            (False, True), range(len(FORWARD_LADDER)), (False, True), (False, True), loss_dtypes
        ):
            rung = (PROB_FORWARD_LADDER if prob else FORWARD_LADDER)[rung_index]
            signature = {
                "X_ptr": f"*{dtype}",
                "T_ptr": f"*{dtype}" if prob else "*i64",
                "W_ptr": "*fp32",
                "Grad_ptr": f"*{dtype}",
                "Loss_ptr": f"*{loss}",
                "Partial_ptr": "*fp32",
                "DenomPartial_ptr": "*fp32",
                "stride_xm": "i32",
                "stride_tm": "i32",
                "stride_gm": "i32",
                "M": "i32",
                "C": "i32",
                "ignore_index": "i32",
                "label_smoothing": "fp32",
                "inv_rows": "fp32",
                "z_loss": "fp32",
                "softcap": "fp32",
                "num_denom_partials": "i32",
                "reduction": "i32",
                "write_grad": "i32",
            }
            constexprs = {
                "HAS_WEIGHT": has_weight,
                "PROB_TARGET": prob,
                "SOFTCAP": softcap,
                "SINGLE_PASS": rung.SINGLE_PASS,
                "BLOCK_N": rung.BLOCK_N,
                "BLOCK_C": rung.BLOCK_C,
                "DENOM_BLOCK": DENOM_BLOCK,
            }
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            yield KernelSpec(cross_entropy_fwd_kernel, signature, constexprs, rung.num_warps)
        for (_, block_n, block_c, num_warps), loss in itertools.product(BACKWARD_LADDER, loss_dtypes):
            constexprs = {"BLOCK_N": block_n, "BLOCK_C": block_c}
            signature = {
                "Grad_ptr": f"*{dtype}",
                "Scale_ptr": f"*{loss}",
                "stride_gm": "i32",
                "stride_s": "i32",
                "M": "i32",
                "C": "i32",
                "BLOCK_N": "constexpr",
                "BLOCK_C": "constexpr",
            }
            yield KernelSpec(cross_entropy_bwd_kernel, signature, constexprs, num_warps)
        for loss in loss_dtypes:
            signature = {
                "Partial_ptr": "*fp32",
                "Out_ptr": f"*{loss}",
                "num_partials": "i32",
                "BLOCK": "constexpr",
            }
            yield KernelSpec(cross_entropy_finish_kernel, signature, {"BLOCK": FINISH_BLOCK}, 4, hot=False)
    for has_weight in (False, True):
        constexprs = {"HAS_WEIGHT": has_weight, "BLOCK_N": DENOM_BLOCK_N}
        signature = {
            "T_ptr": "*i64",
            "W_ptr": "*fp32",
            "DenomPartial_ptr": "*fp32",
            "stride_tm": "i32",
            "M": "i32",
            "C": "i32",
            "ignore_index": "i32",
            "rows_per_program": "i32",
            "HAS_WEIGHT": "constexpr",
            "BLOCK_N": "constexpr",
        }
        yield KernelSpec(cross_entropy_denom_kernel, signature, constexprs, 4, hot=False)
