"""Peak memory of one call, above what was live before it (inputs, parameters, saved graph).

GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes allocated
before the call.

CPU: torch's profiler with `profile_memory=True` records every CPU tensor allocation and free made
during the call, each with the allocator's running total of the bytes allocated while profiling; the
peak of that running total is the same quantity as on the GPU: tensor bytes, not the allocator's or
the OS's slack. (A subprocess's peak RSS would also count the interpreter, torch's libraries and
glibc's caching, and would need a fresh process per measurement.) Tensors freed inside the call that
were allocated before it are not in that total (the profiler does not know their size), so a call
that frees old gradients first, like a training step's zero_grad, reads a little high.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak extra bytes allocated while `fn` runs once; None when the profiler gives no allocation events."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _peak_from_allocations(prof)


def _peak_from_allocations(prof: profile) -> int | None:
    try:  # the per-allocation records live in the profiler's event tree (no public accessor)
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, ImportError):
        return None
    allocations = []
    stack = list(roots)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not allocations:
        return None
    allocations.sort()
    _, first_size, first_total = allocations[0]
    start = first_total - first_size  # bytes counted before the first event (0 in practice)
    return max(0, max(total for _, _, total in allocations) - start)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 around a profiler session.

    The profiler's C++ side logs a line at every start and stop and warns about blocks allocated
    before it started; over a sweep that buries the progress bar. Python exceptions still propagate.
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
