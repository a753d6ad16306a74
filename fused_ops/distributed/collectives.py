"""Collectives for the distributed ops: group queries, moment merging, reductions, DDP set-up.

Everything here runs on PyTorch's own `torch.distributed` (gloo on CPU, NCCL on GPU). A process
group of None means the default group. Without an initialised default group, or with a group of
one rank, `world_size` is 1 and the ops take their single-process path: no collective runs.

Every collective is issued unconditionally by every rank of the group, whatever its batch holds
(zero rows included), so no rank can wait for a peer that skipped one.
"""

from __future__ import annotations

import datetime
import gc
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


def world_size(process_group: dist.ProcessGroup | None = None) -> int:
    """Ranks in `process_group` (None: the default group); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def is_distributed(process_group: dist.ProcessGroup | None = None) -> bool:
    """True when `process_group` (None: the default group) spans more than one rank."""
    return world_size(process_group) > 1


def rank(process_group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in `process_group` (None: the default group); 0 when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(process_group)


def all_gather_stacked(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """tensor: (*S), the same shape on every rank -> (world_size, *S), row r from rank r."""
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size(process_group))]
    dist.all_gather(gathered, tensor, group=process_group)
    return torch.stack(gathered)


def all_reduce_sum(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Elementwise sum over the ranks of `process_group`; returns a new tensor, the input is untouched."""
    reduced = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=process_group)
    return reduced


def all_reduce_max(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Elementwise max over the ranks of `process_group`; returns a new tensor, the input is untouched."""
    reduced = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=process_group)
    return reduced


class Moments(NamedTuple):
    """Per-channel statistics of a batch: count (scalar tensor), mean (C,), M2 = sum((x - mean)^2) (C,)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def local_moments(x: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> Moments:
    """x: (N, C, *) (SyncBatchNorm passes (M, C) or (N, C, L)), reduced over `dims`, every dim but 1, in
    `dtype`. Zero rows give count 0, mean 0, M2 0.

    Two passes (mean, then squared deviations), as single-process BatchNorm computes them.
    """
    count = x.new_full((), x.numel() // x.shape[1], dtype=dtype)  # a fill, not a host-to-device copy
    xf = x.to(dtype)
    mean = xf.sum(dims) / count.clamp(min=1)  # an empty batch has mean 0, not 0/0
    m2 = (xf - mean.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
    return Moments(count, mean, m2)


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> Moments:
    """Count-weighted merge of per-rank moments (Chan et al.): counts (W,), means (W, C), m2s (W, C).

    mean = sum_r n_r mean_r / n;  M2 = sum_r (M2_r + n_r (mean_r - mean)^2);  n = sum_r n_r.
    A rank with n_r = 0 (mean_r = 0, M2_r = 0) contributes nothing. All ranks empty gives mean nan.
    """
    count = counts.sum()
    weights = counts.unsqueeze(1)
    mean = (weights * means).sum(0) / count
    m2 = (m2s + weights * (means - mean).square()).sum(0)
    return Moments(count, mean, m2)


def all_gather_moments(local: Moments, process_group: dist.ProcessGroup | None) -> Moments:
    """Global moments over the ranks of `process_group` with ONE all_gather of (count, mean, M2)."""
    packed = torch.cat([local.count.view(1), local.mean, local.m2])  # (1 + 2C,)
    gathered = all_gather_stacked(packed, process_group)  # (W, 1 + 2C)
    channels = local.mean.shape[0]
    return merge_moments(gathered[:, 0], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :])


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """The contiguous share of `n` items for `rank`: sizes differ by at most one, lower ranks get more.

    The same split as `torch.tensor_split(range(n), world_size)`; use it to split a global batch
    (or the classes of a vocab-parallel layer) so that every rank knows every rank's share.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class DDPInfo(NamedTuple):
    """What `setup_ddp` set up: this process's rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup_ddp(device: str | None = None, timeout_s: float = 300.0) -> DDPInfo:
    """Join the default process group from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and return where this process runs.

    device: "cpu" or "cuda" (None: "cuda" when available). CUDA uses NCCL and the GPU numbered
    LOCAL_RANK on this machine; CPU uses gloo. Raises RuntimeError outside torchrun.
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"setup_ddp: environment variables {missing} are not set; start the program with torchrun, "
            f"e.g. `torchrun --nproc_per_node 2 -m fused_ops train --ddp`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
        backend = "nccl"
    elif device_type == "cpu":
        where = torch.device("cpu")
        backend = "gloo"
    else:
        raise ValueError(f"setup_ddp: device must be 'cpu' or 'cuda', got {device!r}")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DDPInfo(dist.get_rank(), dist.get_world_size(), local_rank, where)


def cleanup_ddp() -> None:
    """Leave the default process group, if one was set up.

    Garbage is collected first: a DistributedDataParallel wrapper sits in reference cycles, and one
    freed only at interpreter exit, after the group was destroyed, let gloo's worker threads outlive
    it; the process then aborted ("terminate called without an active exception", exit -6; 2 runs of
    12 of `train --ddp` on 3 ranks under load, torch 2.11)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
