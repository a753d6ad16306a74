"""SyncBatchNorm: BatchNorm whose training statistics span every rank of a process group.

Shapes: input (N_r, C, *) on rank r, any number of trailing dims and any memory format (as
fused_ops.batch_norm); N_r may differ between ranks and may be 0. weight, bias, running_mean,
running_var (C,); residual like input. n = sum_r N_r * prod(*) values per channel.

The result equals single-process BatchNorm over the batch concatenated across ranks:
    forward   one all_gather of (count, mean, M2) per rank, merged count-weighted
              (fused_ops.distributed.collectives.merge_moments); then the single-process
              normalise/affine/residual/activation with those statistics, on the backend
              fused_ops.batch_norm picks (its eval-mode pass, the statistics given as running stats).
    backward  one all_reduce of the stacked (sum(g), sum(g * xhat)), g the gradient at the affine output
              (and the residual's gradient): dx = gamma * invstd / n * (n * g - sum(g) - xhat *
              sum(g * xhat) * k), k = n / (n - 1) if unbiased else 1, the sums over all ranks, with
              fused_ops.batch_norm's own helpers. dgamma = sum(g * xhat) and dbeta = sum(g) are this
              rank's share only: DistributedDataParallel all-reduces parameter gradients, as with
              torch.nn.SyncBatchNorm.
Running stats are updated on every rank alike, with the global mean and unbiased variance.
Eval mode, and a group of one rank, take fused_ops.batch_norm's single-process path: no collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from fused_ops.batch_norm import (
    _SAVES_OUTPUT,
    _backend,
    _check_args,
    _flatten,
    _FusedBatchNorm,
    _grad_at_u,
    _grad_sums,
    _layout,
    _reduce_dims,
    _scale_shift,
    _select_backend,
    _to,
    _training_input_grad_,
    _unflatten,
    stat_dtype,
)
from fused_ops.distributed.collectives import (
    all_gather_moments,
    all_reduce_sum,
    is_distributed,
    local_moments,
)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = act(gamma * xhat + beta + residual) with statistics over the group, on flat input
    ((M, C) or (N, C, L), as fused_ops.batch_norm flattens it); closed-form backward."""

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
        unbiased: bool,
        activation: str | None,
        process_group: dist.ProcessGroup | None,
        backend: str,
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
        # Normalising with the global statistics is the single-process eval pass with them as running
        # stats, on the backend fused_ops.batch_norm would pick (the Triton kernel on CUDA).
        forward, _ = _backend(backend)
        y, mean, invstd = forward(
            input,
            weight,
            bias,
            moments.mean,  # as running_mean
            var_unbiased if unbiased else var_biased,  # as running_var: invstd = rsqrt(var + eps)
            residual,
            momentum=0.0,  # unused in eval mode
            eps=eps,
            training=False,  # normalise with the statistics given
            unbiased=unbiased,
            activation=activation,
        )
        # Saved as by fused_ops.batch_norm's Function (x, gamma, the global mean and invstd; y for relu and
        # tanh; beta and the residual for silu), plus the group's count (1 value).
        silu = activation == "silu"
        ctx.save_for_backward(
            input,
            weight,
            bias if silu else None,
            mean,
            invstd,
            count,
            y if activation in _SAVES_OUTPUT else None,
            residual if silu else None,
        )
        ctx.config = (unbiased, activation, process_group)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # double backward raises rather than differentiating the closed form wrongly
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, mean, invstd, count, y, residual = ctx.saved_tensors
        unbiased, activation, process_group = ctx.config
        scale, shift = _scale_shift(invstd, weight, bias)
        g = _grad_at_u(dy, x, y, residual, mean, scale, shift, activation)
        local_g, local_g_xhat, buffer = _grad_sums(g, x, mean, invstd)  # this rank's dbeta, dgamma
        # Every rank joins this one collective, even with zero rows or no input gradient wanted.
        sum_g, sum_g_xhat = all_reduce_sum(torch.stack([local_g, local_g_xhat]), process_group)
        needs_dx, needs_dweight, needs_dbias, _, _, needs_dresidual = ctx.needs_input_grad[:6]
        dx = None
        if needs_dx:
            dx = _training_input_grad_(buffer, x, g, mean, invstd, scale, sum_g, sum_g_xhat, count, unbiased)
            dx = _to(dx, x.dtype)
        dresidual = None
        if needs_dresidual:
            dresidual = dy if activation is None else _to(g, dy.dtype)
        dweight = _to(local_g_xhat, weight.dtype) if needs_dweight else None
        dbias = _to(local_g, ctx.bias_dtype) if needs_dbias else None
        return dx, dweight, dbias, None, None, dresidual, None, None, None, None, None, None


class SyncBatchNorm(_FusedBatchNorm):
    """`torch.nn.SyncBatchNorm`'s constructor and behaviour on fused ops: BatchNorm whose training
    statistics span every rank of `process_group` (None: the default group).

    input: (N, C, *) in any memory format (channels_last kept), N may differ between ranks and may be
    0. forward(input, residual=None) computes act(BatchNorm(input) + residual). Extra keywords as
    fused_ops.BatchNorm2d: `bias`, `unbiased`, `activation`; state_dict keys as torch's. In training
    mode every rank of the group must call forward, and backward, the same number of times. Eval mode,
    and a group of one rank, run without collectives.

    Not a subclass of torch.nn.SyncBatchNorm, on purpose: DistributedDataParallel refuses that class on
    CPU ("SyncBatchNorm layers only work with GPU modules"), and this one works over gloo too.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        unbiased: bool = False,
        activation: str | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            unbiased=unbiased,
            activation=activation,
        )
        self.process_group = process_group

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # As torch.nn.SyncBatchNorm: statistics are synchronised in training mode only.
        if not self.training or not is_distributed(self.process_group):
            return super().forward(input, residual)
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
            residual,
            op="SyncBatchNorm",
            whole_batch=False,
            num_features=self.num_features,
        )
        # may raise: before any state changes
        backend = _select_backend(input)  # every tensor is on input's device (checked)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: momentum = 1 / num_batches_tracked, on device
                momentum = self.num_batches_tracked.to(stat_dtype(input.dtype)).reciprocal()
        layout = _layout(input)
        y = SyncBatchNormFunction.apply(
            _flatten(input, layout),
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            None if residual is None else _flatten(residual, layout),
            momentum,
            float(self.eps),
            self.unbiased,
            self.activation,
            self.process_group,
            backend,
        )
        return _unflatten(y, layout)


def to_sync_batch_norm(
    module: nn.modules.batchnorm._BatchNorm, process_group: dist.ProcessGroup | None = None
) -> SyncBatchNorm:
    """A SyncBatchNorm holding `module`'s very parameters and buffers (same tensors) and training flag.

    module: any BatchNorm, torch's (BatchNorm1d/2d/3d, SyncBatchNorm) or fused_ops'; its eps, momentum,
    affine, track_running_stats, bias and, for fused_ops', `unbiased` and `activation` carry over.
    process_group: None for the default group.
    """
    sync = SyncBatchNorm(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        process_group=process_group,
        device="meta",  # placeholders only: every parameter and buffer is replaced by module's below
        bias=module.bias is not None or not module.affine,
        unbiased=getattr(module, "unbiased", False),
        activation=getattr(module, "activation", None),
    )
    sync.weight, sync.bias = module.weight, module.bias
    sync.running_mean, sync.running_var = module.running_mean, module.running_var
    sync.num_batches_tracked = module.num_batches_tracked
    sync.train(module.training)
    return sync


def convert_sync_batch_norm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm in `module` (torch's or fused_ops', any dims) but a fused_ops.SyncBatchNorm
    by a SyncBatchNorm over `process_group` (None: the default group) that holds the same parameters and
    buffers; returns the model.

    As torch.nn.SyncBatchNorm.convert_sync_batchnorm: the model is changed in place, and a root
    BatchNorm comes back converted. `fused_ops.convert(model, process_group=...)` does this and fuses
    a following activation, with a report of what it changed.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        return to_sync_batch_norm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batch_norm(child, process_group))
    return module
