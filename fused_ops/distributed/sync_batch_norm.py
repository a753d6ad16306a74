"""SyncBatchNorm: BatchNorm1d whose training statistics span every rank of a process group.

Shapes: input (N_r, C) or (N_r, C, L) on rank r, N_r may differ between ranks and may be 0;
weight, bias, running_mean, running_var (C,). n = sum_r N_r * L values per channel.

The result equals single-process BatchNorm over the batch concatenated across ranks:
    forward   one all_gather of (count, mean, M2) per rank, merged count-weighted
              (fused_ops.distributed.collectives.merge_moments); then the single-process
              normalise/affine/activation.
    backward  one all_reduce of the stacked (sum(g), sum(g * xhat)), g the gradient at the affine output:
              dx = gamma * invstd / n * (n * g - sum(g) - xhat * sum(g * xhat) * k), k = n / (n - 1) if
              unbiased else 1, the sums over all ranks. dgamma = sum(g * xhat) and dbeta = sum(g) are this
              rank's share only: DistributedDataParallel all-reduces parameter gradients, as with
              torch.nn.SyncBatchNorm.
Running stats are updated on every rank alike, with the global mean and unbiased variance.
Eval mode, and a group of one rank, take fused_ops.BatchNorm1d's single-process path: no collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from fused_ops.backend import use_triton
from fused_ops.batch_norm import (
    ACTIVATIONS,
    BatchNorm1d,
    _activation_grad,
    _channel_view,
    _check_args,
    _reduce_dims,
    forward_torch,
    stat_dtype,
)
from fused_ops.distributed.collectives import (
    all_gather_moments,
    all_reduce_sum,
    is_distributed,
    local_moments,
)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = activation(gamma * xhat + beta) with statistics over the group; closed-form backward."""

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
        unbiased: bool,
        activation: str | None,
        process_group: dist.ProcessGroup | None,
        triton: bool,
    ) -> torch.Tensor:
        stat = stat_dtype(input.dtype)
        moments = all_gather_moments(local_moments(input, _reduce_dims(input.ndim), stat), process_group)
        count = moments.count
        var_biased = moments.m2 / count
        var_unbiased = moments.m2 / (count - 1)
        if running_mean is not None:
            # As single-process BatchNorm, with the unbiased variance. A group-wide batch with fewer than
            # two values (where single-process BatchNorm raises or skips) leaves the stats untouched:
            # the count is a device tensor, so it is checked without a host sync.
            update = count > 1
            new_mean = running_mean.to(stat) * (1 - momentum) + moments.mean * momentum
            new_var = running_var.to(stat) * (1 - momentum) + var_unbiased * momentum
            running_mean.copy_(torch.where(update, new_mean, running_mean.to(stat)))
            running_var.copy_(torch.where(update, new_var, running_var.to(stat)))
        # Normalising with the global statistics is single-process eval mode with them as running stats,
        # on the backend fused_ops.batch_norm would pick (the Triton kernel on CUDA).
        if triton:
            from fused_ops.kernels.triton import batch_norm as kernels

            forward = kernels.batch_norm_forward
        else:
            forward = forward_torch
        y, mean, invstd = forward(
            input,
            weight,
            bias,
            moments.mean,  # as running_mean
            var_unbiased if unbiased else var_biased,  # as running_var: invstd = rsqrt(var + eps)
            0.0,  # momentum, unused in eval mode
            eps,
            False,  # training=False: normalise with the statistics given
            unbiased,
            activation,
        )
        # Saved: x (for xhat), gamma, the global mean, invstd and count (C, C and 1 values, fp32; fp64 for
        # fp64 input) and, with an activation, the output y for its derivative.
        ctx.save_for_backward(input, weight, mean, invstd, count, y if activation is not None else None)
        ctx.config = (unbiased, activation, process_group)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable  # double backward raises rather than differentiating the closed form wrongly
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, invstd, count, y = ctx.saved_tensors
        unbiased, activation, process_group = ctx.config
        dims = _reduce_dims(x.ndim)
        g = _activation_grad(dy.to(mean.dtype), y, activation)
        xhat = (x.to(mean.dtype) - _channel_view(mean, x.ndim)) * _channel_view(invstd, x.ndim)
        local_sums = torch.stack([g.sum(dims), (g * xhat).sum(dims)])  # (2, C): this rank's dbeta, dgamma
        # Every rank joins this one collective, even with zero rows or no input gradient wanted.
        sum_g, sum_g_xhat = all_reduce_sum(local_sums, process_group)
        k = count / (count - 1) if unbiased else 1.0
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        # dx = gamma*invstd * (g - sum(g)/n - xhat * sum(g*xhat) * k/n), sums over the whole group
        dx = _channel_view(scale, x.ndim) * (
            g - _channel_view(sum_g / count, x.ndim) - xhat * _channel_view(sum_g_xhat * (k / count), x.ndim)
        )
        dx = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
        dweight = local_sums[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = local_sums[0].to(weight.dtype if weight is not None else x.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


class SyncBatchNorm(BatchNorm1d):
    """fused_ops.BatchNorm1d with training statistics over every rank of `process_group`.

    input: (N, C) or (N, C, L), N may differ between ranks and may be 0. Same arguments, state_dict
    keys and extra keywords (`unbiased`, `activation`) as fused_ops.BatchNorm1d, plus `process_group`
    (None: the default group). In training mode every rank of the group must call forward, and
    backward, the same number of times. Eval mode, and a group of one rank, run without collectives.
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
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            unbiased=unbiased,
            activation=activation,
        )
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # As torch.nn.SyncBatchNorm: statistics are synchronised in training mode only.
        if not self.training or not is_distributed(self.process_group):
            return super().forward(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        _check_args(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
            self.unbiased,
            self.activation,
            op="SyncBatchNorm",
            whole_batch=False,
            num_features=self.num_features,
        )
        triton = use_triton(
            "batch_norm", input, self.weight, self.bias
        )  # may raise: before any state changes
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: momentum = 1 / num_batches_tracked, on device
                momentum = self.num_batches_tracked.to(stat_dtype(input.dtype)).reciprocal()
        return SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            momentum,
            float(self.eps),
            self.unbiased,
            self.activation,
            self.process_group,
            triton,
        )


def to_sync_batch_norm(
    module: nn.BatchNorm1d, process_group: dist.ProcessGroup | None = None
) -> SyncBatchNorm:
    """A SyncBatchNorm holding `module`'s very parameters and buffers (same tensors) and training flag.

    module: torch's nn.BatchNorm1d or fused_ops.BatchNorm1d; its `unbiased` and `activation`, if any,
    carry over. process_group: None for the default group.
    """
    activation = getattr(module, "activation", None)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"to_sync_batch_norm: module.activation must be one of {ACTIVATIONS}, got {activation!r}"
        )
    sync = SyncBatchNorm(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # placeholders only: every parameter and buffer is replaced by module's below
        unbiased=getattr(module, "unbiased", False),
        activation=activation,
        process_group=process_group,
    )
    sync.weight, sync.bias = module.weight, module.bias
    sync.running_mean, sync.running_var = module.running_mean, module.running_var
    sync.num_batches_tracked = module.num_batches_tracked
    sync.train(module.training)
    return sync


def convert_sync_batch_norm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm1d in `module` (torch's or fused_ops') by a SyncBatchNorm over `process_group`
    (None: the default group) that holds the same parameters and buffers; returns the model.

    As torch.nn.SyncBatchNorm.convert_sync_batchnorm: the model is changed in place, and a root
    BatchNorm1d comes back converted. Run fused_ops.convert first to fuse a following Tanh/ReLU.
    """
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm):
        return to_sync_batch_norm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batch_norm(child, process_group))
    return module
