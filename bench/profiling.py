"""One call under observation: its peak memory and its kernel launches.

Peak memory: bytes allocated during the call above what was live before it (inputs, parameters, a
saved graph). GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the
bytes allocated before. CPU: torch's profiler with `profile_memory=True` records every CPU tensor
allocation and free made during the call, each with the running total of bytes allocated while
profiling; the peak of that total is the same quantity as on the GPU: tensor bytes, without the
allocator's or the OS's slack. (A subprocess's peak RSS would also count the interpreter, torch's
libraries and glibc's caching, and need a fresh process per measurement.) Tensors allocated before the
call and freed inside it are not in that total (the profiler does not know their size), so a call
that frees old gradients first, as a training step's zero_grad does, reads a little high.

Launches, from `torch.profiler`. GPU: every operation on the device timeline (kernels, Triton's
included, memsets and copies). CPU: there are no launches; the count is of top-level operator calls
instead (aten ops not nested in another aten op, plus calls of torch.compile'd graphs, whose generated
C++ kernels the profiler does not see). It shows dispatch overhead at small sizes, and is not
comparable with the GPU count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

COMPILED_GRAPH_PREFIX = "## Call CompiledFxGraph"


def observe(
    fn: Callable[[], object], device: torch.device, prepare: Callable[[], None]
) -> tuple[int | None, int]:
    """(peak extra bytes or None, launches) of one call of `fn`; `prepare` runs untimed before each call."""
    if device.type == "cuda":
        prepare()
        peak = _cuda_peak_bytes(fn)
        prepare()
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        # Device-timeline events, less the GPU copies of record_function ranges ("gpu_user_annotation").
        device_ops = [
            e
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        return peak, len(device_ops)
    prepare()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    launches = sum(1 for e in events if _is_operator(e.name) and not _inside_operator(e))
    return _cpu_peak_bytes(prof), launches


def _cuda_peak_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _cpu_peak_bytes(prof: profile) -> int | None:
    """Peak of the running total over the profiled CPU allocations; None when there are no records."""
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
        return 0
    allocations.sort()
    _, first_size, first_total = allocations[0]
    start = first_total - first_size  # bytes counted before the first record (0 in practice)
    return max(0, max(total for _, _, total in allocations) - start)


def _is_operator(name: str) -> bool:
    return name.startswith(("aten::", "fused_ops::", COMPILED_GRAPH_PREFIX))  # fused_ops::: the native ops


def _inside_operator(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_operator(parent.name):
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 around a profiler session.

    The profiler's C++ side may log a line at every start and stop, and warns about blocks allocated
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
