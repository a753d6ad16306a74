"""`convert(model)`: swap torch's BatchNorm1d for the fused one, fusing a following Tanh/ReLU.

Works like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new modules hold the very same
parameters and buffers (same tensors, so requires_grad, device, dtype and sharing are kept) and the
same training flag; the model is changed in place and returned.
"""

from __future__ import annotations

import itertools

from torch import nn

from fused_ops.batch_norm import BatchNorm1d

# An activation module that may follow a BatchNorm1d inside an nn.Sequential -> fused activation name.
FUSABLE_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}


def _fused_batch_norm(module: nn.BatchNorm1d, activation: str | None) -> BatchNorm1d:
    """A fused BatchNorm1d sharing `module`'s parameters and buffers, with `activation` applied after it."""
    fused = BatchNorm1d(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # placeholders only: every parameter and buffer is replaced by module's below
        unbiased=getattr(module, "unbiased", False),
        activation=activation,
    )
    fused.weight, fused.bias = module.weight, module.bias
    fused.running_mean, fused.running_var = module.running_mean, module.running_var
    fused.num_batches_tracked = module.num_batches_tracked
    fused.train(module.training)
    return fused


def _fusable_activation(module: nn.Module) -> str | None:
    return FUSABLE_ACTIVATIONS.get(type(module))


def _needs_conversion(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm1d) and not isinstance(module, BatchNorm1d)


def _convert_sequential(seq: nn.Sequential) -> None:
    """Fuse each BatchNorm1d directly followed by Tanh/ReLU; nn.Identity keeps the activation's index."""
    names = list(seq._modules)
    for name, next_name in itertools.pairwise(names):
        bn, act = seq._modules[name], seq._modules[next_name]
        fusable = _needs_conversion(bn) or (isinstance(bn, BatchNorm1d) and bn.activation is None)
        if fusable and _fusable_activation(act) is not None:
            seq._modules[name] = _fused_batch_norm(bn, _fusable_activation(act))
            seq._modules[next_name] = nn.Identity()


def convert(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d in `module` by fused_ops.BatchNorm1d; returns the (converted) model.

    Inside an nn.Sequential, a BatchNorm1d directly followed by nn.Tanh or nn.ReLU becomes one fused
    module with that activation, and nn.Identity takes the activation's place so indexing stays valid.
    A root BatchNorm1d is returned converted, as convert_sync_batchnorm does.
    """
    if _needs_conversion(module):
        return _fused_batch_norm(module, activation=None)
    if isinstance(module, nn.Sequential):
        _convert_sequential(module)
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module
