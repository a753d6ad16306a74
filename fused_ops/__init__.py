"""fused_ops: fused cross-entropy and BatchNorm for PyTorch.

Triton kernels on CUDA, an analytic PyTorch path everywhere else; both wrapped as
`torch.autograd.Function`s with hand-derived backward passes, and as drop-in modules.

This module only re-exports the public API. Importing it loads the ops and nothing else: no triton
(loaded when a Triton kernel is about to run), no makemore application, tqdm or matplotlib.
"""

from fused_ops.backend import BackendUnavailableError, use_backend
from fused_ops.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from fused_ops.convert import ConversionReport, convert
from fused_ops.cross_entropy import CrossEntropyLoss, cross_entropy
from fused_ops.distributed import SyncBatchNorm, vocab_parallel_cross_entropy
from fused_ops.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy

__all__ = [
    "BackendUnavailableError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ConversionReport",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "cross_entropy",
    "linear_cross_entropy",
    "use_backend",
    "vocab_parallel_cross_entropy",
]
__version__ = "0.1.0"
