"""Which backend runs a call: the one place where that is decided.

Backends:
    "torch"  - the analytic PyTorch path (any device; the reference every other backend is checked against).
    "triton" - the Triton kernels in `fused_ops.kernels`: CUDA tensors, or CPU tensors when Triton's
               interpreter is on (`TRITON_INTERPRET=1` set before triton is imported).
    "auto"   - Triton for CUDA tensors when Triton is importable, the PyTorch path otherwise.

The choice comes from `use_backend(name)` when one is active, else from the environment variable
`FUSED_OPS_BACKEND` (default "auto"). Forcing "triton" where it cannot run raises
`BackendUnavailableError`; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FUSED_OPS_BACKEND"

_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A backend was forced (env var or `use_backend`) where it cannot run."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# torch.compile: dynamo traces the dispatch below like any Python code. The `use_backend` stack is a
# threading.local, which dynamo reads and guards on (entering another backend recompiles). The three
# process settings that follow are marked `_constant_result`: dynamo calls them once while it traces
# and bakes the answer into the graph instead of tracing os.environ and importlib (which older dynamo
# versions cannot trace or guard). Triton's presence and TRITON_INTERPRET (read by triton at its
# import) cannot change within a process anyway; $FUSED_OPS_BACKEND is read when a model is compiled,
# so set it before compiling, or switch with `use_backend`, which is guarded.
def _constant_result(fn):
    """`torch.compiler.assume_constant_result(fn)`, without its import of torch._dynamo, which costs
    ~1.8 s and imports triton (tests/test_imports.py checks that both mark `fn` alike)."""
    fn._dynamo_marked_constant = True  # what that decorator sets, and all that dynamo reads
    return fn


@_constant_result
def _env_backend() -> str:
    """$FUSED_OPS_BACKEND, checked; "auto" when unset or empty."""
    return _check_name(os.environ.get(ENV_VAR, "").strip().lower() or "auto", ENV_VAR)


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else `$FUSED_OPS_BACKEND`, else "auto"."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls with backend `name` ("auto", "torch" or "triton"); nests, thread-local."""
    _check_name(name, "backend name")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


_triton_available: bool | None = None  # cached: importing triton is slow, and its presence is fixed


@_constant_result
def triton_available() -> bool:
    """True when `triton` is installed and imports."""
    global _triton_available
    if _triton_available is None:
        _triton_available = importlib.util.find_spec("triton") is not None and _imports_triton()
    return _triton_available


def _imports_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install counts as absent)
        return False
    return True


@_constant_result
def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(op: str, *tensors: torch.Tensor | None) -> bool:
    """Decide whether `op` runs its Triton kernels for these tensors (None entries are ignored).

    Raises BackendUnavailableError when "triton" is forced and cannot run here.
    """
    name = requested_backend()
    if name == "torch":
        return False
    cuda = cpu = other = False
    for t in tensors:  # a plain loop: cheaper per call than building a set of device types
        if t is None:
            continue
        if t.is_cuda:
            cuda = True
        elif t.is_cpu:
            cpu = True
        else:
            other = True
    only_cuda, only_cpu = cuda and not (cpu or other), cpu and not (cuda or other)
    if name == "auto":
        return only_cuda and triton_available()
    if not triton_available():
        raise BackendUnavailableError(
            f"{op}: backend 'triton' was forced but triton is not installed; "
            f"install it with `pip install fused_ops[triton]` or use backend 'torch'/'auto'"
        )
    if only_cuda:
        return True
    if only_cpu and triton_interpreter_enabled():
        if torch.compiler.is_compiling():  # dynamo traces only real (JIT) Triton kernels
            raise BackendUnavailableError(
                f"{op}: backend 'triton' on CPU tensors runs Triton's interpreter, which torch.compile "
                f"cannot trace; use backend 'torch' or 'auto' under torch.compile on CPU"
            )
        return True
    devices = sorted({t.device.type for t in tensors if t is not None})
    raise BackendUnavailableError(
        f"{op}: backend 'triton' was forced but the tensors are on {devices}; the Triton kernels need "
        f"CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
    )
