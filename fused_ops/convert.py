"""`convert(model, process_group=None)`: swap torch's BatchNorm1d for the fused one, fusing a following
Tanh/ReLU; with a process group, make every BatchNorm1d a SyncBatchNorm over that group.

Works like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new modules hold the very same
parameters and buffers (same tensors, so requires_grad, device, dtype and sharing are kept) and the
same training flag; the model is changed in place and returned.
"""

from __future__ import annotations

import itertools

import torch.distributed as dist
from torch import nn

from fused_ops.batch_norm import BatchNorm1d
from fused_ops.distributed.sync_batch_norm import SyncBatchNorm

# An activation module that may follow a BatchNorm1d inside an nn.Sequential -> fused activation name.
FUSABLE_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}


def _replacement(
    module: nn.BatchNorm1d, activation: str | None, process_group: dist.ProcessGroup | None
) -> BatchNorm1d:
    """The fused module for `module`, sharing its parameters, buffers and training flag, with `activation`
    applied after it: a SyncBatchNorm over `process_group` when one is given, or over module's own group
    when module already is a SyncBatchNorm; a fused_ops.BatchNorm1d otherwise."""
    if isinstance(module, SyncBatchNorm):
        process_group = module.process_group
    elif process_group is None:
        return _rebuilt(module, BatchNorm1d, activation=activation)
    return _rebuilt(module, SyncBatchNorm, activation=activation, process_group=process_group)


def _rebuilt(module: nn.BatchNorm1d, cls: type[BatchNorm1d], **kwargs) -> BatchNorm1d:
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # placeholders only: every parameter and buffer is replaced by module's below
        unbiased=getattr(module, "unbiased", False),
        **kwargs,
    )
    new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def _fusable_activation(module: nn.Module) -> str | None:
    return FUSABLE_ACTIVATIONS.get(type(module))


def _needs_conversion(module: nn.Module, process_group: dist.ProcessGroup | None) -> bool:
    target = BatchNorm1d if process_group is None else SyncBatchNorm
    return isinstance(module, nn.BatchNorm1d) and not isinstance(module, target)


def _convert_sequential(seq: nn.Sequential, process_group: dist.ProcessGroup | None) -> None:
    """Fuse each BatchNorm1d directly followed by Tanh/ReLU; nn.Identity keeps the activation's index."""
    names = list(seq._modules)
    for name, next_name in itertools.pairwise(names):
        bn, act = seq._modules[name], seq._modules[next_name]
        # A BatchNorm1d that already has an activation is never fused again (its own would be lost).
        fusable = isinstance(bn, nn.BatchNorm1d) and getattr(bn, "activation", None) is None
        if fusable and _fusable_activation(act) is not None:
            seq._modules[name] = _replacement(bn, _fusable_activation(act), process_group)
            seq._modules[next_name] = nn.Identity()


def convert(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every nn.BatchNorm1d in `module` by fused_ops.BatchNorm1d; returns the (converted) model.

    Inside an nn.Sequential, a BatchNorm1d directly followed by nn.Tanh or nn.ReLU becomes one fused
    module with that activation, and nn.Identity takes the activation's place so indexing stays valid.
    A root BatchNorm1d is returned converted, as convert_sync_batchnorm does.

    process_group: None (no synchronisation), or the group whose ranks share BatchNorm statistics:
    every BatchNorm1d, torch's or fused_ops' (its activation kept), becomes a fused_ops.SyncBatchNorm
    over it. Pass `torch.distributed.group.WORLD` for every rank. A SyncBatchNorm already in the model
    keeps its group.
    """
    if _needs_conversion(module, process_group):
        return _replacement(module, getattr(module, "activation", None), process_group)
    if isinstance(module, nn.Sequential):
        _convert_sequential(module, process_group)
    # Every slot, not named_children(): that lists a module used twice only once, leaving its second use
    # unconverted.
    for name, child in list(module._modules.items()):
        if child is not None:
            module.add_module(name, convert(child, process_group))
    return module
