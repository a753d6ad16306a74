"""How many kernels one call launches, from `torch.profiler`.

GPU: every operation on the device timeline (kernels, including Triton's, plus memset and memcpy).
CPU: there are no launches; the count is of top-level operator calls instead: aten ops not nested
in another aten op, plus calls of torch.compile'd graphs (whose generated C++ kernels the profiler
does not see). It tells dispatch overhead at small sizes and is not comparable with the GPU count.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.memory import quiet_stderr

COMPILED_GRAPH_PREFIX = "## Call CompiledFxGraph"


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches (GPU) or top-level operator calls (CPU) of one call of `fn`."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with quiet_stderr(), profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(1 for e in events if _is_operator(e.name) and not _inside_operator(e))


def _is_operator(name: str) -> bool:
    return name.startswith("aten::") or name.startswith(COMPILED_GRAPH_PREFIX)


def _inside_operator(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_operator(parent.name):
            return True
        parent = parent.cpu_parent
    return False
