"""The multi-process ops, over `torch.distributed`: SyncBatchNorm, vocab-parallel cross-entropy and
the collectives they share.

    collectives.py      group queries, moment merging, sums and maxima over a group, torchrun set-up
    sync_batch_norm.py  SyncBatchNorm: batch_norm with statistics over every rank of a group
    vocab_parallel.py   cross-entropy over logits sharded along the classes, and linear + cross-entropy
                        over a head sharded along the vocabulary

Each op sits above its single-process twin in `fused_ops/` and reuses that op's argument checker and
math; nothing in the single-process ops imports from here, except `cross_entropy(process_group=...)`
and `linear_cross_entropy(process_group=...)`, which call their vocab-parallel twins at call time.
"""

from fused_ops.distributed.collectives import (
    DDPInfo,
    all_reduce_sum,
    cleanup_ddp,
    is_distributed,
    rank,
    setup_ddp,
    shard_slice,
    world_size,
)
from fused_ops.distributed.sync_batch_norm import SyncBatchNorm, convert_sync_batch_norm
from fused_ops.distributed.vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

__all__ = [
    "DDPInfo",
    "SyncBatchNorm",
    "all_reduce_sum",
    "cleanup_ddp",
    "convert_sync_batch_norm",
    "is_distributed",
    "rank",
    "setup_ddp",
    "shard_slice",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "world_size",
]
