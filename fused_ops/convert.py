"""`convert(model)`: swap torch's BatchNorm layers for fused_ops', fuse a following ReLU/Tanh/SiLU, and
report what changed.

    torch.nn.BatchNorm1d/2d/3d   -> fused_ops.BatchNorm1d/2d/3d
    torch.nn.SyncBatchNorm       -> fused_ops.SyncBatchNorm over the same process group
    with process_group=pg        every BatchNorm (torch's or fused_ops', not a SyncBatchNorm, which keeps
                                 its group) -> fused_ops.SyncBatchNorm over pg

Works like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new modules hold the very same
parameters and buffers (same tensors, so requires_grad, device, dtype and sharing are kept), the same
attributes (num_features, eps, momentum, affine, track_running_stats, bias, and fused_ops' unbiased and
activation) and the same training flag; the model is changed in place and returned.

Only the exact torch classes are converted: a subclass of nn.BatchNorm2d may have its own forward,
which a swap would drop, so it stays as it is, and the report says so.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Literal, overload

import torch.distributed as dist
from torch import nn

from fused_ops.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from fused_ops.distributed.sync_batch_norm import SyncBatchNorm

logger = logging.getLogger("fused_ops")

# An activation module that may follow a BatchNorm inside an nn.Sequential -> fused activation name.
FUSABLE_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.SiLU: "silu"}
_FUSED_FOR_TORCH = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_FUSED = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conversion:
    """One module that convert() replaced."""

    name: str  # its qualified name in the model ("" for the model itself)
    before: str  # e.g. "BatchNorm2d(64)"
    after: str  # e.g. "fused_ops.BatchNorm2d(64, activation='relu')"
    fused: str | None = None  # qualified name of the activation fused in (now nn.Identity), if any


@dataclass(frozen=True)
class Unconverted:
    """A module that convert() left as it was, and why: a BatchNorm, or an activation it did not fuse."""

    name: str
    module: str
    reason: str
    fused_ops: bool = False  # a fused_ops BatchNorm already


@dataclass
class ConversionReport:
    """What one `convert()` call did to a model. `str(report)` is a table for a log or a terminal.

    converted: the modules replaced, in model order (a module used in two places counts twice).
    unconverted: modules left as they were, with the reason: BatchNorm layers (already fused_ops', a
    subclass with its own forward) and activations not fused (their BatchNorm already has one).
    """

    model: str
    converted: list[Conversion] = field(default_factory=list)
    unconverted: list[Unconverted] = field(default_factory=list)

    @property
    def fused_activations(self) -> int:
        return sum(c.fused is not None for c in self.converted)

    @property
    def has_fused_batch_norm(self) -> bool:
        """The model now runs at least one fused_ops BatchNorm (converted now or already there)."""
        return bool(self.converted) or any(u.fused_ops for u in self.unconverted)

    def summary(self) -> str:
        line = (
            f"fused_ops.convert({self.model}): {len(self.converted)} BatchNorm layer(s) converted, "
            f"{self.fused_activations} activation(s) fused"
        )
        return line + (f", {len(self.unconverted)} left as they were" if self.unconverted else "")

    def __str__(self) -> str:
        rows = [(c.name or "(model)", c.before, f"-> {c.after}" + (f"  [fused {c.fused}]" if c.fused else ""))
                for c in self.converted]
        rows += [(u.name or "(model)", u.module, f"kept: {u.reason}") for u in self.unconverted]
        if not rows:
            return self.summary() + "; the model has no BatchNorm layer"
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"  {name:<{widths[0]}}  {before:<{widths[1]}}  {after}" for name, before, after in rows]
        return "\n".join([self.summary(), *lines])


def _describe(module: nn.modules.batchnorm._BatchNorm) -> str:
    """e.g. "nn.BatchNorm2d(64)", "fused_ops.BatchNorm2d(64, activation='relu')"."""
    prefix = "fused_ops." if isinstance(module, _FUSED) else "nn."
    text = f"{prefix}{type(module).__name__}({module.num_features}"
    if getattr(module, "activation", None) is not None:
        text += f", activation={module.activation!r}"
    if isinstance(module, SyncBatchNorm) and module.process_group is not None:
        text += ", process_group=<given>"
    return text + ")"


# ----------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------
def _target(
    module: nn.Module, process_group: dist.ProcessGroup | None
) -> tuple[type, dist.ProcessGroup | None] | None:
    """(fused class, its process group) that `module` becomes, or None for a module that is no BatchNorm
    convert() handles. A SyncBatchNorm, torch's or fused_ops', keeps its own group."""
    kind = type(module)
    if kind in (nn.SyncBatchNorm, SyncBatchNorm):
        return SyncBatchNorm, module.process_group
    if kind in _FUSED_FOR_TORCH or kind in _FUSED:
        if process_group is not None:
            return SyncBatchNorm, process_group
        return _FUSED_FOR_TORCH.get(kind, kind), None
    return None


def _rebuilt(module: nn.modules.batchnorm._BatchNorm, cls: type, activation: str | None, group) -> nn.Module:
    """A `cls` holding module's very parameters, buffers, attributes and training flag, with `activation`."""
    kwargs = {"process_group": group} if cls is SyncBatchNorm else {}
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # placeholders only: every parameter and buffer is replaced by module's below
        bias=module.bias is not None or not module.affine,
        unbiased=getattr(module, "unbiased", False),
        activation=activation,
        **kwargs,
    )
    new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    if hasattr(module, "qconfig"):  # as convert_sync_batchnorm does
        new.qconfig = module.qconfig
    new.train(module.training)
    return new


def _convert_module(
    module: nn.Module,
    name: str,
    process_group: dist.ProcessGroup | None,
    report: ConversionReport,
    activation: tuple[str, str] | None = None,
) -> nn.Module:
    """`module` converted (itself when nothing changes), with `activation` = (name of the fused
    activation, its module's qualified name) fused in. Records what it did in `report`."""
    target = _target(module, process_group)
    if target is None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            report.unconverted.append(Unconverted(name, type(module).__name__, _why_not(module)))
        return module
    cls, group = target
    fused_activation = getattr(module, "activation", None)
    if activation is not None:
        fused_activation = activation[0]
    unchanged = type(module) is cls and getattr(module, "process_group", None) is group and activation is None
    if unchanged:
        report.unconverted.append(Unconverted(name, _describe(module), "already fused_ops'", fused_ops=True))
        return module
    new = _rebuilt(module, cls, fused_activation, group)
    fused = None if activation is None else activation[1]
    report.converted.append(Conversion(name, _describe(module), _describe(new), fused))
    return new


def _why_not(module: nn.modules.batchnorm._BatchNorm) -> str:
    kind = type(module)
    if any(issubclass(kind, base) for base in (*_FUSED_FOR_TORCH, nn.SyncBatchNorm)):
        return (
            f"a subclass of torch's {kind.__mro__[1].__name__} may have its own forward, which a swap "
            f"would drop; replace it by hand if it behaves as torch's"
        )
    return f"{kind.__name__} has no fused_ops counterpart"


def _fusable(module: nn.Module, process_group: dist.ProcessGroup | None) -> bool:
    """A BatchNorm that convert() handles and that has no activation yet (one is never replaced)."""
    return _target(module, process_group) is not None and getattr(module, "activation", None) is None


def _convert(module: nn.Module, name: str, process_group, report: ConversionReport) -> nn.Module:
    converted = _convert_module(module, name, process_group, report)
    if converted is not module:
        return converted
    slots = list(module._modules.items())
    fused_into: dict[str, tuple[str, str]] = {}  # BatchNorm slot -> (activation, activation slot)
    skip: set[str] = set()
    if isinstance(module, nn.Sequential):  # BatchNorm directly followed by ReLU/Tanh/SiLU: fuse them
        for (bn_slot, bn), (act_slot, act) in itertools.pairwise(slots):
            activation = FUSABLE_ACTIVATIONS.get(type(act))
            if activation is None or bn_slot in skip:
                continue
            if _fusable(bn, process_group):
                fused_into[bn_slot] = (activation, _qualified(name, act_slot))
                skip.add(act_slot)
            elif _target(bn, process_group) is not None:
                report.unconverted.append(
                    Unconverted(
                        _qualified(name, act_slot),
                        f"nn.{type(act).__name__}",
                        f"not fused: the BatchNorm before it already has activation={bn.activation!r}, "
                        f"which is never replaced",
                    )
                )
    # Every slot, not named_children(): that lists a module used twice only once, leaving its second use
    # unconverted. A BatchNorm used twice becomes two modules sharing every parameter and buffer.
    for slot, child in slots:
        if child is None:
            continue
        qualified = _qualified(name, slot)
        if slot in fused_into:
            new = _convert_module(child, qualified, process_group, report, fused_into[slot])
        elif slot in skip:
            new = nn.Identity()  # keeps the Sequential's indices
        else:
            new = _convert(child, qualified, process_group, report)
        if new is not child:
            module._modules[slot] = new
    return module


def _qualified(parent: str, slot: str) -> str:
    return f"{parent}.{slot}" if parent else slot


@overload
def convert(
    module: nn.Module, process_group: dist.ProcessGroup | None = ..., *, return_report: Literal[False] = ...
) -> nn.Module: ...
@overload
def convert(
    module: nn.Module, process_group: dist.ProcessGroup | None = ..., *, return_report: Literal[True]
) -> tuple[nn.Module, ConversionReport]: ...
def convert(module, process_group=None, *, return_report=False):
    """Replace torch's BatchNorm layers in `module` by fused_ops' and fuse a following activation; returns
    the (converted) model, or (model, ConversionReport) with return_report=True.

    torch.nn.BatchNorm1d/2d/3d become fused_ops.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm becomes
    fused_ops.SyncBatchNorm over its own process group. Inside an nn.Sequential, a BatchNorm directly
    followed by nn.ReLU, nn.Tanh or nn.SiLU becomes one module with that activation, and nn.Identity
    takes the activation's place so indexing stays valid. A BatchNorm that already has an activation
    keeps it (a following activation stays separate). A root BatchNorm is returned converted, as
    convert_sync_batchnorm does.

    A residual add is in the user's own forward, so convert() cannot fuse it: call the block's last
    BatchNorm as `self.bn2(out, residual=identity)` with activation="relu" (README, "convert").

    process_group: None (no synchronisation), or the group whose ranks share BatchNorm statistics:
    every BatchNorm, torch's or fused_ops' (its activation kept), becomes a fused_ops.SyncBatchNorm over
    it. Pass `torch.distributed.group.WORLD` for every rank. A SyncBatchNorm keeps its own group.

    What changed is logged at INFO on the "fused_ops" logger (`str(report)`: one line per module); a
    model left without any fused_ops BatchNorm also raises a UserWarning, since the conversion then
    does nothing for it.
    """
    report = ConversionReport(type(module).__name__)
    converted = _convert(module, "", process_group, report)
    logger.info("%s", report)
    if not report.has_fused_batch_norm:
        warnings.warn(
            f"{report.summary()}: {type(module).__name__} has no BatchNorm layer that fused_ops converts "
            f"(torch.nn.BatchNorm1d/2d/3d or SyncBatchNorm), so it is unchanged"
            + "".join(f"; {u.name or '(model)'} ({u.module}): {u.reason}" for u in report.unconverted),
            UserWarning,
            stacklevel=2,
        )
    return (converted, report) if return_report else converted
