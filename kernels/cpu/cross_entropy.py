"""The native cross-entropy ops (kernels in cross_entropy.cpp beside this file): their fake kernels, and
the op handles that fused_ops/cross_entropy.py calls.

Imported by `build.load()` once the library that defines the ops is loaded, never before.

    cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                  loss_dtype) -> loss
        differentiable (its autograd is registered in C++); reduction is at::Reduction's code
        (0 none, 1 mean, 2 sum); the loss has loss_dtype (default input's dtype): () for "mean" and
        "sum", the target's batch shape for "none".
    cross_entropy_mean(input, target) -> loss
        cross_entropy with every option at its default (the common call, with two arguments for the
        boxed call to convert instead of nine); differentiable the same way.
    cross_entropy_fwd(same arguments as cross_entropy) -> (loss, grad)
        also d(loss)/d(input) for grad_output = 1, with input's shape and dtype; its memory is M
        contiguous rows of C (for (N, C, d...) input: (N, d..., C) memory, seen as (N, C, d...)).

The fake kernels give what the CPU kernels return (shapes, dtypes, strides) for torch.compile and
`torch.library.opcheck`; they read no values.
"""

from __future__ import annotations

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction


def _loss_like(input: torch.Tensor, reduction: int, loss_dtype: torch.dtype | None) -> torch.Tensor:
    shape = () if reduction != 0 or input.dim() == 1 else (input.shape[0], *input.shape[2:])
    return input.new_empty(shape, dtype=loss_dtype or input.dtype)


def _grad_like(input: torch.Tensor) -> torch.Tensor:
    if input.dim() <= 2:
        return input.new_empty(input.shape)
    return input.new_empty((input.shape[0], *input.shape[2:], input.shape[1])).movedim(-1, 1)


@torch.library.register_fake("fused_ops::cross_entropy")
def _cross_entropy_fake(
    input, target, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0, z_loss=0.0,
    softcap=None, loss_dtype=None,
):  # fmt: skip
    return _loss_like(input, reduction, loss_dtype)


@torch.library.register_fake("fused_ops::cross_entropy_fwd")
def _cross_entropy_fwd_fake(
    input, target, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0, z_loss=0.0,
    softcap=None, loss_dtype=None,
):  # fmt: skip
    return _loss_like(input, reduction, loss_dtype), _grad_like(input)


@torch.library.register_fake("fused_ops::cross_entropy_mean")
def _cross_entropy_mean_fake(input, target):
    return _loss_like(input, REDUCTIONS["mean"], None)


cross_entropy = torch.ops.fused_ops.cross_entropy.default
cross_entropy_mean = torch.ops.fused_ops.cross_entropy_mean.default
cross_entropy_fwd = torch.ops.fused_ops.cross_entropy_fwd.default
