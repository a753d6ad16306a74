"""Triton BatchNorm: training/eval forward and backward with a fused activation, then their launchers.

Layout: the input is viewed through its strides as x: (N, C, L), an (N, C) input being L = 1.
Statistics are per feature c over N and L: n = N * L values each, accumulated in fp32. Tiles are
[BLOCK_N, BLOCK_C, BLOCK_L]; for (N, C) the tile is [BLOCK_N, BLOCK_C, 1] and reads BLOCK_C
contiguous values of each row, for (N, C, L) it reads BLOCK_L contiguous values.

Two regimes, picked by `launch_settings`:
  on chip  the whole column block [N, BLOCK_C, L] fits in one program's registers.
           training forward: 1 launch (read x once, write y once);
           backward: 1 launch (read x and dy once, write dx once).
  split    larger N: the batch is split into S row ranges.
           forward: partial (mean, M2) per split into an fp32 workspace, a combine that merges the S
           partials in a fixed order (deterministic: no atomics), then the normalising pass;
           backward: partial sum(g), sum(g * xhat), a fixed-order combine, then the dx pass.
Eval forward is elementwise: one launch of the normalising kernel in either regime.

Kernels take fp32 weight, bias and running stats (the launchers convert others and copy running
stats back); x, y, dy and dx are fp32, fp16 or bf16. Closed forms as in `fused_ops.batch_norm`:
    y  = act(gamma * (x - mean) * invstd + beta)
    dx = gamma * invstd * (g - sum(g)/n - xhat * sum(g * xhat) * k/n)   training; k = n/(n-1) if unbiased
    dx = g * gamma * invstd                                             eval
with g = dy * act'(.) read from the saved output y.

torch.compile traces the launchers and sees these kernels as user-defined Triton kernels (see
`fused_ops.kernels.triton.cross_entropy` for why no custom op). Block sizes depend on N only through its
power-of-two bucket (`_next_power_of_2`), so a dynamic batch size recompiles once per bucket.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from fused_ops.kernels.triton.spec import KernelSpec

ACTIVATION_CODES = {None: 0, "tanh": 1, "relu": 2}
_TANH = tl.constexpr(1)
_RELU = tl.constexpr(2)


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(n, c, l, stride_n, stride_c, stride_l):
    """Element offsets of an [n, c, l] tile, widened to int64 before multiplying by the strides."""
    return (n.to(tl.int64)[:, None, None] * stride_n
            + c.to(tl.int64)[None, :, None] * stride_c
            + l.to(tl.int64)[None, None, :] * stride_l)


@triton.jit
def _load_tile(T_ptr, n, c, l, stride_n, stride_c, stride_l, mask):
    """The [n, c, l] tile of T as fp32, 0 where masked."""
    values = tl.load(T_ptr + _tile_offsets(n, c, l, stride_n, stride_c, stride_l), mask=mask, other=0.0)
    return values.to(tl.float32)


@triton.jit
def _store_tile(T_ptr, n, c, l, stride_n, stride_c, stride_l, value, mask):
    offsets = _tile_offsets(n, c, l, stride_n, stride_c, stride_l)
    tl.store(T_ptr + offsets, value.to(T_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_mask(n, c, l, n_end, C, L):
    return (n < n_end)[:, None, None] & (c < C)[None, :, None] & (l < L)[None, None, :]


@triton.jit
def _channel_sum(t):
    """[BLOCK_N, BLOCK_C, BLOCK_L] -> [BLOCK_C]: the sum over N and L."""
    return tl.sum(tl.sum(t, axis=2), axis=0)


@triton.jit
def _pivot(X_ptr, c, C, stride_xc):
    """x[0, c, 0]: statistics are summed over x - pivot, which stays accurate when |mean| >> std."""
    return tl.load(X_ptr + c.to(tl.int64) * stride_xc, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def _per_channel(v):
    """[BLOCK_C] -> [1, BLOCK_C, 1], to broadcast against a tile."""
    return v[None, :, None]


@triton.jit
def _tanh(u):
    # tanh(a) = (1 - e) / (1 + e) with e = exp(-2a), a = |u|; below 0.1 the series
    # a - a^3/3 + 2a^5/15 - 17a^7/315 avoids the cancellation in 1 - e.
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    series = a * (1.0 - a2 * (0.3333333333333333 - a2 * (0.13333333333333333 - a2 * 0.05396825396825397)))
    t = tl.where(a < 0.1, series, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _activate(u, ACTIVATION: tl.constexpr):
    if ACTIVATION == _TANH:
        u = _tanh(u)
    elif ACTIVATION == _RELU:
        u = tl.where(u < 0.0, 0.0, u)  # relu; keeps NaN as torch.relu does
    return u


@triton.jit
def _activation_grad(dy, y, ACTIVATION: tl.constexpr):
    """g = dy * act'(u), from the saved output y = act(u)."""
    if ACTIVATION == _TANH:
        dy = dy * (1.0 - y * y)  # d tanh(u)/du = 1 - tanh(u)^2 = 1 - y^2
    elif ACTIVATION == _RELU:
        dy = tl.where(y > 0.0, dy, 0.0)  # y = max(u, 0)
    return dy


@triton.jit
def _scale_shift(W_ptr, B_ptr, c, C, invstd):
    """Per-feature scale = gamma * invstd and shift = beta (gamma = 1, beta = 0 when absent)."""
    c_mask = c < C
    scale = invstd
    if W_ptr is not None:
        scale = scale * tl.load(W_ptr + c, mask=c_mask, other=0.0)
    shift = tl.zeros_like(invstd)
    if B_ptr is not None:
        shift = tl.load(B_ptr + c, mask=c_mask, other=0.0)
    return scale, shift


@triton.jit
def _update_running_stats(RunningMean_ptr, RunningVar_ptr, Momentum_ptr, momentum, c, C, mean, var_unbiased):
    """running = (1 - momentum) * running + momentum * batch; momentum from Momentum_ptr when given."""
    if RunningMean_ptr is not None:
        if Momentum_ptr is not None:
            momentum = tl.load(Momentum_ptr).to(tl.float32)
        c_mask = c < C
        running_mean = tl.load(RunningMean_ptr + c, mask=c_mask, other=0.0)
        running_var = tl.load(RunningVar_ptr + c, mask=c_mask, other=0.0)
        tl.store(RunningMean_ptr + c, running_mean * (1.0 - momentum) + mean * momentum, mask=c_mask)
        tl.store(RunningVar_ptr + c, running_var * (1.0 - momentum) + var_unbiased * momentum, mask=c_mask)


@triton.jit
def _dx(g, xhat, scale, sum_g, sum_g_xhat, inv_n, k_over_n, TRAINING: tl.constexpr):
    if TRAINING:
        # dx = gamma*invstd * (g - sum(g)/n - xhat * sum(g*xhat) * k/n)
        mean_g, mean_g_xhat = sum_g * inv_n, sum_g_xhat * k_over_n
        dx = _per_channel(scale) * (g - _per_channel(mean_g) - xhat * _per_channel(mean_g_xhat))
    else:
        dx = g * _per_channel(scale)  # running stats are constants: dx = g * gamma * invstd
    return dx


# ----------------------------------------------------------------------------------------------------
# On chip: one program owns whole columns
# ----------------------------------------------------------------------------------------------------
@triton.jit
def batch_norm_fwd_kernel(
    # pointers
    X_ptr, Y_ptr,  # (N, C, L)
    W_ptr, B_ptr,  # (C,) fp32 or None
    Mean_ptr, Invstd_ptr,  # (C,) fp32 outputs, saved for backward
    RunningMean_ptr, RunningVar_ptr,  # (C,) fp32 updated in place, or None
    Momentum_ptr,  # () momentum on device, or None to use `momentum`
    # strides
    stride_xn, stride_xc, stride_xl,
    stride_yn, stride_yc, stride_yl,
    # sizes and scalars
    N, C, L,
    momentum, eps,
    inv_n,  # 1 / (N * L)
    var_scale,  # n / (n - 1) to normalise with the unbiased variance, else 1
    running_var_scale,  # n / (n - 1): running_var tracks the unbiased variance
    # constexprs
    ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Training forward, [N, BLOCK_C, L] on chip. Grid: (cdiv(C, BLOCK_C),); BLOCK_N >= N, BLOCK_L >= L."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    l = tl.arange(0, BLOCK_L)
    mask = _tile_mask(n, c, l, N, C, L)
    x = _load_tile(X_ptr, n, c, l, stride_xn, stride_xc, stride_xl, mask)
    pivot = _pivot(X_ptr, c, C, stride_xc)
    xs = tl.where(mask, x - _per_channel(pivot), 0.0)  # shifted: x - x[0, c, 0]
    mean_shifted = _channel_sum(xs) * inv_n
    xc = tl.where(mask, xs - _per_channel(mean_shifted), 0.0)  # x - mean, 0 on padding
    var = _channel_sum(xc * xc) * inv_n  # biased variance, second pass over registers
    mean = pivot + mean_shifted
    invstd = tl.rsqrt(var * var_scale + eps)
    tl.store(Mean_ptr + c, mean, mask=c < C)
    tl.store(Invstd_ptr + c, invstd, mask=c < C)
    var_unbiased = var * running_var_scale
    _update_running_stats(RunningMean_ptr, RunningVar_ptr, Momentum_ptr, momentum, c, C, mean, var_unbiased)
    scale, shift = _scale_shift(W_ptr, B_ptr, c, C, invstd)
    y = _activate(xc * _per_channel(scale) + _per_channel(shift), ACTIVATION)
    _store_tile(Y_ptr, n, c, l, stride_yn, stride_yc, stride_yl, y, mask)


@triton.jit
def batch_norm_bwd_kernel(
    # pointers
    DY_ptr, X_ptr,  # (N, C, L)
    Y_ptr,  # (N, C, L) saved output, read for the activation's derivative; None without activation
    W_ptr,  # (C,) fp32 or None
    Mean_ptr, Invstd_ptr,  # (C,) fp32 saved by the forward
    DX_ptr,  # (N, C, L) output
    SumG_ptr, SumGXhat_ptr,  # (C,) fp32 outputs: sum(g) = dbeta, sum(g * xhat) = dgamma
    # strides
    stride_dyn, stride_dyc, stride_dyl,
    stride_xn, stride_xc, stride_xl,
    stride_yn, stride_yc, stride_yl,
    stride_dxn, stride_dxc, stride_dxl,
    # sizes and scalars
    N, C, L,
    inv_n,  # 1 / (N * L)
    k_over_n,  # k / n with k = n / (n - 1) for unbiased=True, else 1
    # constexprs
    TRAINING: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Backward, [N, BLOCK_C, L] on chip. Grid: (cdiv(C, BLOCK_C),); BLOCK_N >= N, BLOCK_L >= L."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    l = tl.arange(0, BLOCK_L)
    mask = _tile_mask(n, c, l, N, C, L)
    dy = _load_tile(DY_ptr, n, c, l, stride_dyn, stride_dyc, stride_dyl, mask)
    y = 0.0
    if Y_ptr is not None:
        y = _load_tile(Y_ptr, n, c, l, stride_yn, stride_yc, stride_yl, mask)
    g = _activation_grad(dy, y, ACTIVATION)  # 0 on padding
    x = _load_tile(X_ptr, n, c, l, stride_xn, stride_xc, stride_xl, mask)
    mean = tl.load(Mean_ptr + c, mask=c < C, other=0.0)
    invstd = tl.load(Invstd_ptr + c, mask=c < C, other=0.0)
    xhat = (x - _per_channel(mean)) * _per_channel(invstd)
    sum_g = _channel_sum(g)
    sum_g_xhat = _channel_sum(g * xhat)
    tl.store(SumG_ptr + c, sum_g, mask=c < C)
    tl.store(SumGXhat_ptr + c, sum_g_xhat, mask=c < C)
    scale, _ = _scale_shift(W_ptr, None, c, C, invstd)
    dx = _dx(g, xhat, scale, sum_g, sum_g_xhat, inv_n, k_over_n, TRAINING)
    _store_tile(DX_ptr, n, c, l, stride_dxn, stride_dxc, stride_dxl, dx, mask)


# ----------------------------------------------------------------------------------------------------
# Split N: partial statistics per row range, a fixed-order combine, then an elementwise pass
# ----------------------------------------------------------------------------------------------------
@triton.jit
def batch_norm_fwd_partial_kernel(
    # pointers
    X_ptr,  # (N, C, L)
    Partial_ptr,  # (2, S, C) fp32 output: mean of x - x[0, c, 0] and M2 = sum((x - mean)^2) of each split
    # strides
    stride_xn, stride_xc, stride_xl,
    # sizes
    N, C, L, rows_per_split,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Mean and M2 of rows [s * rows_per_split, (s + 1) * rows_per_split). Grid: (S, cdiv(C, BLOCK_C))."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_start = split.to(tl.int64) * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    pivot = _pivot(X_ptr, c, C, stride_xc)
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)  # of x - pivot
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        for l0 in range(0, L, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            mask = _tile_mask(n, c, l, n_end, C, L)
            x = _load_tile(X_ptr, n, c, l, stride_xn, stride_xc, stride_xl, mask)
            xs = tl.where(mask, x - _per_channel(pivot), 0.0)
            tile_count = (tl.minimum(n_end - n0, BLOCK_N) * tl.minimum(L - l0, BLOCK_L)).to(tl.float32)
            tile_mean = _channel_sum(xs) / tile_count
            xc = tl.where(mask, xs - _per_channel(tile_mean), 0.0)
            tile_m2 = _channel_sum(xc * xc)
            # Chan et al.: merge (count, mean, M2) with the tile's
            total = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / total)
            m2 += tile_m2 + delta * delta * (count * tile_count / total)
            count = total
    offsets = split.to(tl.int64) * C + c
    num_splits = tl.num_programs(0)
    tl.store(Partial_ptr + offsets, mean, mask=c < C)
    tl.store(Partial_ptr + num_splits.to(tl.int64) * C + offsets, m2, mask=c < C)


@triton.jit
def batch_norm_fwd_combine_kernel(
    # pointers
    Partial_ptr,  # (2, S, C) fp32 from batch_norm_fwd_partial_kernel
    X_ptr,  # (N, C, L): read for the pivot x[0, c, 0] only
    Mean_ptr, Invstd_ptr,  # (C,) fp32 outputs
    ShiftedMean_ptr,  # (C,) fp32 output: mean - x[0, c, 0], for the apply kernel
    RunningMean_ptr, RunningVar_ptr,  # (C,) fp32 updated in place, or None
    Momentum_ptr,  # () momentum on device, or None to use `momentum`
    # strides
    stride_xc,
    # sizes and scalars
    N, C, L, num_splits, rows_per_split,
    momentum, eps, inv_n, var_scale, running_var_scale,  # as in batch_norm_fwd_kernel
    # constexprs
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge each feature's S partials in split order: mean, invstd, running stats.

    Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < num_splits)[:, None] & (c < C)[None, :]
        rows = tl.minimum(rows_per_split, N - s.to(tl.int64) * rows_per_split)
        counts = tl.where(s < num_splits, rows * L, 0).to(tl.float32)
        offsets = s.to(tl.int64)[:, None] * C + c[None, :]
        part_mean = tl.load(Partial_ptr + offsets, mask=mask, other=0.0)
        part_m2 = tl.load(Partial_ptr + num_splits.to(tl.int64) * C + offsets, mask=mask, other=0.0)
        # a block of partials: mean = sum(n_s * mean_s) / sum(n_s), M2 = sum(M2_s + n_s * (mean_s - mean)^2)
        block_count = tl.sum(counts, axis=0)
        block_mean = tl.sum(counts[:, None] * part_mean, axis=0) / block_count
        delta_s = tl.where(mask, part_mean - block_mean[None, :], 0.0)
        block_m2 = tl.sum(part_m2 + counts[:, None] * delta_s * delta_s, axis=0)
        # Chan et al.: merge into the running (count, mean, M2)
        total = count + block_count
        delta = block_mean - mean
        mean += delta * (block_count / total)
        m2 += block_m2 + delta * delta * (count * block_count / total)
        count = total
    var = m2 * inv_n
    invstd = tl.rsqrt(var * var_scale + eps)
    tl.store(ShiftedMean_ptr + c, mean, mask=c < C)
    mean += _pivot(X_ptr, c, C, stride_xc)
    tl.store(Mean_ptr + c, mean, mask=c < C)
    tl.store(Invstd_ptr + c, invstd, mask=c < C)
    var_unbiased = var * running_var_scale
    _update_running_stats(RunningMean_ptr, RunningVar_ptr, Momentum_ptr, momentum, c, C, mean, var_unbiased)


@triton.jit
def batch_norm_fwd_apply_kernel(
    # pointers
    X_ptr, Y_ptr,  # (N, C, L)
    W_ptr, B_ptr,  # (C,) fp32 or None
    Mean_ptr, Invstd_ptr,  # (C,) fp32: invstd read in training; both written (by block row 0) in eval
    ShiftedMean_ptr,  # (C,) fp32 mean - x[0, c, 0] in training, or None
    RunningMean_ptr, RunningVar_ptr,  # (C,) fp32 read in eval, or None
    # strides
    stride_xn, stride_xc, stride_xl,
    stride_yn, stride_yc, stride_yl,
    # sizes and scalars
    N, C, L, eps,
    # constexprs
    USE_RUNNING_STATS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """y = act(gamma * (x - mean) * invstd + beta) on rows [pid_n * BLOCK_N, ...).

    Grid: (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C)).

    Training (split regime): invstd and the shifted mean come from the combine kernel, and
    x - mean = (x - x[0, c, 0]) - shifted mean stays accurate when |mean| >> std. Eval
    (USE_RUNNING_STATS): mean = running_mean, invstd = 1 / sqrt(running_var + eps), saved for the
    backward by block row 0.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if USE_RUNNING_STATS:
        pivot = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.load(RunningMean_ptr + c, mask=c_mask, other=0.0)
        invstd = tl.rsqrt(tl.load(RunningVar_ptr + c, mask=c_mask, other=1.0) + eps)
        if pid_n == 0:  # a scalar branch, not `mask=c_mask & (pid_n == 0)`: triton 3.9's interpreter
            tl.store(Mean_ptr + c, mean, mask=c_mask)  # rejects a tensor mask and-ed with a scalar bool
            tl.store(Invstd_ptr + c, invstd, mask=c_mask)
    else:
        pivot = _pivot(X_ptr, c, C, stride_xc)
        mean = tl.load(ShiftedMean_ptr + c, mask=c_mask, other=0.0)
        invstd = tl.load(Invstd_ptr + c, mask=c_mask, other=0.0)
    scale, shift = _scale_shift(W_ptr, B_ptr, c, C, invstd)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        mask = _tile_mask(n, c, l, N, C, L)
        x = _load_tile(X_ptr, n, c, l, stride_xn, stride_xc, stride_xl, mask)
        xc = x - _per_channel(pivot) - _per_channel(mean)
        u = xc * _per_channel(scale) + _per_channel(shift)
        y = _activate(u, ACTIVATION)
        _store_tile(Y_ptr, n, c, l, stride_yn, stride_yc, stride_yl, y, mask)


@triton.jit
def batch_norm_bwd_partial_kernel(
    # pointers
    DY_ptr, X_ptr,  # (N, C, L)
    Y_ptr,  # (N, C, L) saved output with an activation, else None
    Mean_ptr, Invstd_ptr,  # (C,) fp32 saved by the forward
    Partial_ptr,  # (2, S, C) fp32 output: sum(g) and sum(g * xhat) of each split
    # strides
    stride_dyn, stride_dyc, stride_dyl,
    stride_xn, stride_xc, stride_xl,
    stride_yn, stride_yc, stride_yl,
    # sizes
    N, C, L, rows_per_split,
    # constexprs
    ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """sum(g) and sum(g * xhat) over rows [s * rows_per_split, ...). Grid: (S, cdiv(C, BLOCK_C))."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_start = split.to(tl.int64) * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    mean = tl.load(Mean_ptr + c, mask=c < C, other=0.0)
    invstd = tl.load(Invstd_ptr + c, mask=c < C, other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        for l0 in range(0, L, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            mask = _tile_mask(n, c, l, n_end, C, L)
            dy = _load_tile(DY_ptr, n, c, l, stride_dyn, stride_dyc, stride_dyl, mask)
            y = 0.0
            if Y_ptr is not None:
                y = _load_tile(Y_ptr, n, c, l, stride_yn, stride_yc, stride_yl, mask)
            g = _activation_grad(dy, y, ACTIVATION)
            x = _load_tile(X_ptr, n, c, l, stride_xn, stride_xc, stride_xl, mask)
            xhat = (x - _per_channel(mean)) * _per_channel(invstd)
            sum_g += _channel_sum(g)
            sum_g_xhat += _channel_sum(g * xhat)
    offsets = split.to(tl.int64) * C + c
    num_splits = tl.num_programs(0)
    tl.store(Partial_ptr + offsets, sum_g, mask=c < C)
    tl.store(Partial_ptr + num_splits.to(tl.int64) * C + offsets, sum_g_xhat, mask=c < C)


@triton.jit
def batch_norm_bwd_combine_kernel(
    # pointers
    Partial_ptr,  # (2, S, C) fp32 from batch_norm_bwd_partial_kernel
    SumG_ptr, SumGXhat_ptr,  # (C,) fp32 outputs: dbeta, dgamma
    # sizes
    C, num_splits,
    # constexprs
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the S partials of each feature in split order (deterministic). Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < num_splits)[:, None] & (c < C)[None, :]
        offsets = s.to(tl.int64)[:, None] * C + c[None, :]
        second = num_splits.to(tl.int64) * C  # offset of sum(g * xhat)
        sum_g += tl.sum(tl.load(Partial_ptr + offsets, mask=mask, other=0.0), axis=0)
        sum_g_xhat += tl.sum(tl.load(Partial_ptr + second + offsets, mask=mask, other=0.0), axis=0)
    tl.store(SumG_ptr + c, sum_g, mask=c < C)
    tl.store(SumGXhat_ptr + c, sum_g_xhat, mask=c < C)


@triton.jit
def batch_norm_bwd_apply_kernel(
    # pointers
    DY_ptr, X_ptr,  # (N, C, L)
    Y_ptr,  # (N, C, L) saved output with an activation, else None
    W_ptr,  # (C,) fp32 or None
    Mean_ptr, Invstd_ptr, SumG_ptr, SumGXhat_ptr,  # (C,) fp32
    DX_ptr,  # (N, C, L) output
    # strides
    stride_dyn, stride_dyc, stride_dyl,
    stride_xn, stride_xc, stride_xl,
    stride_yn, stride_yc, stride_yl,
    stride_dxn, stride_dxc, stride_dxl,
    # sizes and scalars
    N, C, L, inv_n, k_over_n,  # as in batch_norm_bwd_kernel
    # constexprs
    TRAINING: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dx in closed form on rows [pid_n * BLOCK_N, ...). Grid: (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C))."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(Mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(Invstd_ptr + c, mask=c_mask, other=0.0)
    sum_g = tl.load(SumG_ptr + c, mask=c_mask, other=0.0)
    sum_g_xhat = tl.load(SumGXhat_ptr + c, mask=c_mask, other=0.0)
    scale, _ = _scale_shift(W_ptr, None, c, C, invstd)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        mask = _tile_mask(n, c, l, N, C, L)
        dy = _load_tile(DY_ptr, n, c, l, stride_dyn, stride_dyc, stride_dyl, mask)
        y = 0.0
        if Y_ptr is not None:
            y = _load_tile(Y_ptr, n, c, l, stride_yn, stride_yc, stride_yl, mask)
        g = _activation_grad(dy, y, ACTIVATION)
        x = _load_tile(X_ptr, n, c, l, stride_xn, stride_xc, stride_xl, mask)
        xhat = (x - _per_channel(mean)) * _per_channel(invstd)
        dx = _dx(g, xhat, scale, sum_g, sum_g_xhat, inv_n, k_over_n, TRAINING)
        _store_tile(DX_ptr, n, c, l, stride_dxn, stride_dxc, stride_dxl, dx, mask)


# ----------------------------------------------------------------------------------------------------
# Launch settings
# ----------------------------------------------------------------------------------------------------
MAX_TILE = 8192  # elements of one on-chip tile: 16 per thread at 16 warps (x, dy and y of the backward fit)
SPLIT_TILE = 4096  # elements of one split-regime tile: 8 per thread at 16 warps
ELEMENTS_PER_THREAD = 8  # per tensor, until 16 warps; more than that spills in the backward (sm_80, fp16)
MAX_WARPS = 16
MAX_BLOCK_C = 128  # wider column blocks leave too few programs for small N
SPLIT_BLOCK_C = 64  # 256 contiguous bytes of an fp32 (N, C) row per tile row
MIN_BLOCK_C = 8  # an (N, C) tile row covers at least 32 bytes (one sector) of fp32
TILES_PER_SPLIT = 4  # tiles each split-regime partial program reduces
COMBINE_BLOCK_S, COMBINE_BLOCK_C = 32, 64
MAX_GRID_DIM1 = 65535  # CUDA's limit on grid dimension y


class Tile(NamedTuple):
    block_n: int
    block_c: int
    block_l: int
    num_warps: int


class LaunchSettings(NamedTuple):
    """on_chip: `tile` holds whole columns (BLOCK_N >= N, BLOCK_L >= L). Otherwise the split regime:
    `tile` is the elementwise tile, and partial programs reduce `rows_per_split` rows each."""

    on_chip: bool
    tile: Tile
    rows_per_split: int
    num_splits: int


def _num_warps(tile_elements: int) -> int:
    return max(1, min(MAX_WARPS, tile_elements // (32 * ELEMENTS_PER_THREAD)))


def _next_power_of_2(n: int, cap: int) -> int:
    """min(the smallest power of two >= n, cap), cap a power of two.

    A loop of comparisons rather than bit tricks: under torch.compile with a dynamic batch size each
    comparison becomes a guard on n, so block sizes (constexprs) stay plain ints, and one compiled
    graph serves a whole bucket of sizes (16 < N <= 32, ...): at most log2(cap) + 1 compilations.
    """
    p = 1
    while p < n and p < cap:
        p *= 2
    return p


def launch_settings(N: int, C: int, L: int, max_tile: int = MAX_TILE) -> LaunchSettings:
    """Deterministic launch settings for an (N, C, L) input ((N, C) is L = 1).

    On chip when a column block of at least MIN_BLOCK_C features ((N, C)) or one feature ((N, C, L))
    fits in `max_tile` elements: BLOCK_N = next_pow2(N), BLOCK_L = next_pow2(L), and BLOCK_C as wide
    as the tile allows, up to MAX_BLOCK_C. Otherwise split: tiles of at most min(SPLIT_TILE, max_tile)
    elements filled along L first (contiguous in (N, C, L)), then C up to SPLIT_BLOCK_C (contiguous in
    (N, C)), then N; each partial program reduces TILES_PER_SPLIT tiles' worth of rows.
    `max_tile` is a parameter so tests can force the split regime on small inputs.
    """
    if max_tile < MIN_BLOCK_C or max_tile & (max_tile - 1):
        raise ValueError(f"max_tile must be a power of two >= {MIN_BLOCK_C}, got {max_tile}")
    # Capped at 2 * max_tile: past max_tile the on-chip test fails, and the split regime caps it lower.
    block_n, block_l = _next_power_of_2(N, 2 * max_tile), _next_power_of_2(L, 2 * max_tile)
    min_block_c = MIN_BLOCK_C if L == 1 else 1
    if block_n * block_l * min_block_c <= max_tile:
        block_c = min(_next_power_of_2(C, MAX_BLOCK_C), max_tile // (block_n * block_l))
        tile = Tile(block_n, block_c, block_l, _num_warps(block_n * block_c * block_l))
        return _checked(LaunchSettings(True, tile, N, 1), C)
    split_tile = min(SPLIT_TILE, max_tile)
    block_l = min(block_l, split_tile)
    block_c = min(_next_power_of_2(C, SPLIT_BLOCK_C), split_tile // block_l)
    block_n = min(block_n, split_tile // (block_l * block_c))
    tile = Tile(block_n, block_c, block_l, _num_warps(block_n * block_c * block_l))
    tiles_per_row = triton.cdiv(L, block_l)
    rows_per_split = block_n * max(1, TILES_PER_SPLIT // tiles_per_row)
    return _checked(LaunchSettings(False, tile, rows_per_split, triton.cdiv(N, rows_per_split)), C)


def _checked(settings: LaunchSettings, C: int) -> LaunchSettings:
    tile = settings.tile
    if tile.block_n * tile.block_c * tile.block_l > MAX_TILE:
        raise ValueError(f"batch_norm: tile {tile[:3]} exceeds the cap of {MAX_TILE} elements")
    if triton.cdiv(C, tile.block_c) > MAX_GRID_DIM1:
        raise ValueError(
            f"batch_norm: C = {C} needs more than {MAX_GRID_DIM1} column blocks of {tile.block_c}; "
            f"the Triton kernels support C <= {MAX_GRID_DIM1 * tile.block_c}"
        )
    return settings


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1) view; (N, C, L) unchanged."""
    return t if t.ndim == 3 else t.unsqueeze(2)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


def _strides(prefix: str, t: torch.Tensor) -> dict[str, int]:
    """Keyword arguments stride_<prefix>n, _c, _l of a 3-D view."""
    return {f"stride_{prefix}{axis}": t.stride(dim) for dim, axis in enumerate("ncl")}


def batch_norm_forward(
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
    *,
    max_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C) or (N, C, L) -> (y like x, mean (C,) fp32, invstd (C,) fp32); updates running stats in place.

    Same contract as `fused_ops.batch_norm.forward_torch` (arguments already checked there).
    max_tile: see `launch_settings` (default MAX_TILE); a small value forces the split regime.
    """
    N, C = x.shape[0], x.shape[1]
    L = x.shape[2] if x.ndim == 3 else 1
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(C, dtype=torch.float32, device=x.device)
    invstd = torch.empty(C, dtype=torch.float32, device=x.device)
    count = N * L
    if x.numel() == 0:  # as PyTorch: empty output, running stats untouched
        return y, mean.zero_(), invstd.zero_()
    x3, y3 = _as_3d(x), _as_3d(y)
    weight, bias = _fp32(weight), _fp32(bias)
    running_mean32, running_var32 = _fp32(running_mean), _fp32(running_var)
    settings = launch_settings(N, C, L, MAX_TILE if max_tile is None else max_tile)
    tile = settings.tile
    blocks = {"BLOCK_N": tile.block_n, "BLOCK_C": tile.block_c, "BLOCK_L": tile.block_l}
    code = ACTIVATION_CODES[activation]

    if not training:
        grid = (triton.cdiv(N, tile.block_n), triton.cdiv(C, tile.block_c))
        batch_norm_fwd_apply_kernel[grid](
            X_ptr=x3, Y_ptr=y3, W_ptr=weight, B_ptr=bias, Mean_ptr=mean, Invstd_ptr=invstd,
            ShiftedMean_ptr=None, RunningMean_ptr=running_mean32, RunningVar_ptr=running_var32,
            **_strides("x", x3), **_strides("y", y3), N=N, C=C, L=L, eps=eps,
            USE_RUNNING_STATS=True, ACTIVATION=code, **blocks, num_warps=tile.num_warps,
        )
        return y, mean, invstd

    if running_mean is not None and isinstance(momentum, torch.Tensor):  # read on device: no host sync
        momentum_ptr, momentum_value = momentum, 0.0
    else:  # a float, or unused without running stats
        momentum_ptr, momentum_value = None, 0.0 if running_mean is None else float(momentum)
    stats = {
        "Mean_ptr": mean,
        "Invstd_ptr": invstd,
        "RunningMean_ptr": running_mean32,
        "RunningVar_ptr": running_var32,
        "Momentum_ptr": momentum_ptr,
        "momentum": momentum_value,
        "eps": eps,
        "inv_n": 1.0 / count,
        "var_scale": count / (count - 1) if unbiased else 1.0,
        "running_var_scale": count / (count - 1),
    }
    if settings.on_chip:
        batch_norm_fwd_kernel[(triton.cdiv(C, tile.block_c),)](
            X_ptr=x3, Y_ptr=y3, W_ptr=weight, B_ptr=bias, **stats,
            **_strides("x", x3), **_strides("y", y3), N=N, C=C, L=L,
            ACTIVATION=code, **blocks, num_warps=tile.num_warps,
        )
    else:
        partial = torch.empty((2, settings.num_splits, C), dtype=torch.float32, device=x.device)
        shifted_mean = torch.empty(C, dtype=torch.float32, device=x.device)
        batch_norm_fwd_partial_kernel[(settings.num_splits, triton.cdiv(C, tile.block_c))](
            X_ptr=x3, Partial_ptr=partial, **_strides("x", x3),
            N=N, C=C, L=L, rows_per_split=settings.rows_per_split, **blocks, num_warps=tile.num_warps,
        )
        batch_norm_fwd_combine_kernel[(triton.cdiv(C, COMBINE_BLOCK_C),)](
            Partial_ptr=partial, X_ptr=x3, ShiftedMean_ptr=shifted_mean, **stats, stride_xc=x3.stride(1),
            N=N, C=C, L=L, num_splits=settings.num_splits, rows_per_split=settings.rows_per_split,
            BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=COMBINE_BLOCK_C, num_warps=4,
        )
        batch_norm_fwd_apply_kernel[(triton.cdiv(N, tile.block_n), triton.cdiv(C, tile.block_c))](
            X_ptr=x3, Y_ptr=y3, W_ptr=weight, B_ptr=bias, Mean_ptr=mean, Invstd_ptr=invstd,
            ShiftedMean_ptr=shifted_mean, RunningMean_ptr=None, RunningVar_ptr=None,
            **_strides("x", x3), **_strides("y", y3), N=N, C=C, L=L, eps=eps,
            USE_RUNNING_STATS=False, ACTIVATION=code, **blocks, num_warps=tile.num_warps,
        )
    if running_mean is not None and running_mean32 is not running_mean:  # non-fp32 running stats
        running_mean.copy_(running_mean32)
        running_var.copy_(running_var32)
    return y, mean, invstd


def batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    unbiased: bool,
    activation: str | None,
    *,
    max_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x (and y with an activation): (N, C) or (N, C, L) -> (dx like x, dgamma, dbeta: (C,) fp32).

    Same contract as `fused_ops.batch_norm.backward_torch`; mean and invstd are the forward's.
    max_tile: as in `batch_norm_forward`.
    """
    N, C = x.shape[0], x.shape[1]
    L = x.shape[2] if x.ndim == 3 else 1
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sum_g = torch.empty(C, dtype=torch.float32, device=x.device)
    sum_g_xhat = torch.empty(C, dtype=torch.float32, device=x.device)
    count = N * L
    if x.numel() == 0:  # empty batch: empty dx, zero dgamma and dbeta (as PyTorch)
        return dx, sum_g_xhat.zero_(), sum_g.zero_()
    x3, dy3, dx3 = _as_3d(x), _as_3d(dy), _as_3d(dx)
    y3 = _as_3d(y) if activation is not None else None
    y_strides = _strides("y", y3) if y3 is not None else {"stride_yn": 0, "stride_yc": 0, "stride_yl": 0}
    weight = _fp32(weight)
    settings = launch_settings(N, C, L, MAX_TILE if max_tile is None else max_tile)
    tile = settings.tile
    blocks = {"BLOCK_N": tile.block_n, "BLOCK_C": tile.block_c, "BLOCK_L": tile.block_l}
    code = ACTIVATION_CODES[activation]
    coefficients = {"inv_n": 1.0 / count, "k_over_n": (1.0 / (count - 1) if unbiased else 1.0 / count)}

    if settings.on_chip:
        batch_norm_bwd_kernel[(triton.cdiv(C, tile.block_c),)](
            DY_ptr=dy3, X_ptr=x3, Y_ptr=y3, W_ptr=weight, Mean_ptr=mean, Invstd_ptr=invstd,
            DX_ptr=dx3, SumG_ptr=sum_g, SumGXhat_ptr=sum_g_xhat,
            **_strides("dy", dy3), **_strides("x", x3), **y_strides, **_strides("dx", dx3),
            N=N, C=C, L=L, **coefficients,
            TRAINING=training, ACTIVATION=code, **blocks, num_warps=tile.num_warps,
        )
        return dx, sum_g_xhat, sum_g
    partial = torch.empty((2, settings.num_splits, C), dtype=torch.float32, device=x.device)
    batch_norm_bwd_partial_kernel[(settings.num_splits, triton.cdiv(C, tile.block_c))](
        DY_ptr=dy3, X_ptr=x3, Y_ptr=y3, Mean_ptr=mean, Invstd_ptr=invstd, Partial_ptr=partial,
        **_strides("dy", dy3), **_strides("x", x3), **y_strides,
        N=N, C=C, L=L, rows_per_split=settings.rows_per_split,
        ACTIVATION=code, **blocks, num_warps=tile.num_warps,
    )
    batch_norm_bwd_combine_kernel[(triton.cdiv(C, COMBINE_BLOCK_C),)](
        Partial_ptr=partial, SumG_ptr=sum_g, SumGXhat_ptr=sum_g_xhat, C=C, num_splits=settings.num_splits,
        BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=COMBINE_BLOCK_C, num_warps=4,
    )
    batch_norm_bwd_apply_kernel[(triton.cdiv(N, tile.block_n), triton.cdiv(C, tile.block_c))](
        DY_ptr=dy3, X_ptr=x3, Y_ptr=y3, W_ptr=weight, Mean_ptr=mean, Invstd_ptr=invstd,
        SumG_ptr=sum_g, SumGXhat_ptr=sum_g_xhat, DX_ptr=dx3,
        **_strides("dy", dy3), **_strides("x", x3), **y_strides, **_strides("dx", dx3),
        N=N, C=C, L=L, **coefficients,
        TRAINING=training, ACTIVATION=code, **blocks, num_warps=tile.num_warps,
    )
    return dx, sum_g_xhat, sum_g


# ----------------------------------------------------------------------------------------------------
# Specialisations for the compile check (tests/compile_kernels.py)
# ----------------------------------------------------------------------------------------------------
_IO_TENSORS = ("X_ptr", "Y_ptr", "DY_ptr", "DX_ptr")
_INT_ARGS = ("N", "C", "L", "rows_per_split", "num_splits")
_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _spec(kernel, dtype: torch.dtype, num_warps: int, three_d: bool = False, hot: bool = True, **constexprs):
    """A KernelSpec for contiguous input as the launcher passes it: unit strides (and L = 1 for (N, C))
    are constexpr 1, as Triton specialises them; x/y/dy/dx are `dtype`, other pointers fp32."""
    names = kernel.arg_names
    unit = {name: 1 for name in names if name.startswith("stride_") and name.endswith("l")}
    if not three_d:
        unit.update({name: 1 for name in names if name.startswith("stride_") and name.endswith("c")})
        unit.update({"L": 1} if "L" in names else {})
    constexprs = {**unit, **constexprs}

    def arg_type(name: str) -> str:
        if name in _IO_TENSORS:
            return f"*{_TYPE_NAMES[dtype]}"
        if name.endswith("_ptr"):
            return "*fp32"
        return "i32" if name.startswith("stride_") or name in _INT_ARGS else "fp32"

    signature = {name: "constexpr" if name in constexprs else arg_type(name) for name in names}
    return KernelSpec(kernel, signature, constexprs, num_warps, hot)


def specializations() -> Iterator[KernelSpec]:
    """A cover of what the launchers choose, at the largest tile of each regime (most registers).

    Each kernel: every dtype with the heaviest flags (tanh, affine, running stats with a device
    momentum), then in fp32 each other flag value (relu / none, no affine, no running stats, eval)
    and an (N, C, L) layout. Block shapes: on chip the tallest ([1024, 8, 1]) and widest
    ([64, 128, 1]) 8192-element tiles at 16 warps plus an (N, C, L) tile; split tiles of 4096
    elements at 16 warps, as `launch_settings` picks them.
    """
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tall, wide = {"BLOCK_N": 1024, "BLOCK_C": 8, "BLOCK_L": 1}, {"BLOCK_N": 64, "BLOCK_C": 128, "BLOCK_L": 1}
    cube = {"BLOCK_N": 16, "BLOCK_C": 8, "BLOCK_L": 64}  # on chip (16, C, 64)
    split = {"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_L": 1}
    split_3d = {"BLOCK_N": 1, "BLOCK_C": 1, "BLOCK_L": 4096}
    tanh, relu, none = ACTIVATION_CODES["tanh"], ACTIVATION_CODES["relu"], ACTIVATION_CODES[None]
    no_affine = {"W_ptr": None, "B_ptr": None}
    no_running = {"RunningMean_ptr": None, "RunningVar_ptr": None, "Momentum_ptr": None}
    f32 = torch.float32

    for dtype in dtypes:
        yield _spec(batch_norm_fwd_kernel, dtype, 16, ACTIVATION=tanh, **tall)
    yield _spec(batch_norm_fwd_kernel, f32, 16, ACTIVATION=relu, **wide, **no_affine, **no_running)
    yield _spec(batch_norm_fwd_kernel, f32, 16, ACTIVATION=none, Momentum_ptr=None, **wide)
    yield _spec(batch_norm_fwd_kernel, f32, 16, three_d=True, ACTIVATION=tanh, **cube)

    for dtype in dtypes:
        yield _spec(batch_norm_bwd_kernel, dtype, 16, TRAINING=True, ACTIVATION=tanh, **tall)
    yield _spec(batch_norm_bwd_kernel, f32, 16, TRAINING=False, ACTIVATION=relu, **wide)
    yield _spec(batch_norm_bwd_kernel, f32, 16, TRAINING=True, ACTIVATION=none, Y_ptr=None, W_ptr=None,
                **wide)
    yield _spec(batch_norm_bwd_kernel, f32, 16, three_d=True, TRAINING=True, ACTIVATION=tanh, **cube)

    for dtype in dtypes:
        yield _spec(batch_norm_fwd_partial_kernel, dtype, 16, **split)
    yield _spec(batch_norm_fwd_partial_kernel, f32, 16, three_d=True, **split_3d)

    combine = {"BLOCK_S": COMBINE_BLOCK_S, "BLOCK_C": COMBINE_BLOCK_C}
    for dtype in dtypes:  # x is read for its first row only
        yield _spec(batch_norm_fwd_combine_kernel, dtype, 4, hot=False, **combine)
    yield _spec(batch_norm_fwd_combine_kernel, f32, 4, hot=False, **combine, **no_running)

    for dtype in dtypes:
        yield _spec(batch_norm_fwd_apply_kernel, dtype, 16, USE_RUNNING_STATS=False, ACTIVATION=tanh,
                    RunningMean_ptr=None, RunningVar_ptr=None, **split)
        yield _spec(batch_norm_fwd_apply_kernel, dtype, 16, USE_RUNNING_STATS=True, ACTIVATION=none,
                    ShiftedMean_ptr=None, **split)
    yield _spec(batch_norm_fwd_apply_kernel, f32, 16, USE_RUNNING_STATS=True, ACTIVATION=relu,
                ShiftedMean_ptr=None, **split, **no_affine)
    yield _spec(batch_norm_fwd_apply_kernel, f32, 16, three_d=True, USE_RUNNING_STATS=True, ACTIVATION=tanh,
                ShiftedMean_ptr=None, **split_3d)

    for dtype in dtypes:
        yield _spec(batch_norm_bwd_partial_kernel, dtype, 16, ACTIVATION=tanh, **split)
    yield _spec(batch_norm_bwd_partial_kernel, f32, 16, ACTIVATION=none, Y_ptr=None, **split)
    yield _spec(batch_norm_bwd_partial_kernel, f32, 16, three_d=True, ACTIVATION=relu, **split_3d)

    yield _spec(batch_norm_bwd_combine_kernel, f32, 4, hot=False, **combine)

    for dtype in dtypes:
        yield _spec(batch_norm_bwd_apply_kernel, dtype, 16, TRAINING=True, ACTIVATION=tanh, **split)
    yield _spec(batch_norm_bwd_apply_kernel, f32, 16, TRAINING=False, ACTIVATION=none, Y_ptr=None, **split)
    yield _spec(batch_norm_bwd_apply_kernel, f32, 16, TRAINING=True, ACTIVATION=relu, W_ptr=None, **split)
    yield _spec(batch_norm_bwd_apply_kernel, f32, 16, three_d=True, TRAINING=False, ACTIVATION=tanh,
                **split_3d)
