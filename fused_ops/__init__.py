"""fused_ops: fused cross-entropy and BatchNorm for PyTorch.

Triton kernels on CUDA, an analytic PyTorch path everywhere else; both wrapped as
`torch.autograd.Function`s with hand-derived backward passes, and as drop-in modules.
"""
from fused_ops.backend import BackendUnavailableError, use_backend
from fused_ops.batch_norm import BatchNorm1d, batch_norm
from fused_ops.convert import convert
from fused_ops.cross_entropy import CrossEntropyLoss, cross_entropy

__all__ = [
    "BackendUnavailableError",
    "BatchNorm1d",
    "CrossEntropyLoss",
    "batch_norm",
    "convert",
    "cross_entropy",
    "use_backend",
]
__version__ = "0.1.0"
