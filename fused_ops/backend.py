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
import functools
import importlib.util
import os
import threading
from typing import Iterator

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


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else `$FUSED_OPS_BACKEND`, else "auto"."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


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


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when `triton` is installed and imports."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


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
    devices = {t.device.type for t in tensors if t is not None}
    on_cuda = devices == {"cuda"}
    if name == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise BackendUnavailableError(
            f"{op}: backend 'triton' was forced but triton is not installed; "
            f"install it with `pip install fused_ops[triton]` or use backend 'torch'/'auto'"
        )
    if on_cuda:
        return True
    if devices <= {"cpu"} and triton_interpreter_enabled():
        return True
    raise BackendUnavailableError(
        f"{op}: backend 'triton' was forced but the tensors are on {sorted(devices)}; the Triton kernels need "
        f"CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
    )
