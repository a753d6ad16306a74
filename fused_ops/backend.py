"""Which backend runs a call: the one place where that is decided.

Backends:
    "torch"  - the analytic PyTorch path (any device; the reference every other backend is checked against).
    "triton" - the Triton kernels in `fused_ops.kernels.triton`: CUDA tensors, or CPU tensors when
               Triton's interpreter is on (`TRITON_INTERPRET=1` set before triton is imported).
    "native" - the C++ CPU kernels in `fused_ops.kernels.cpu`, for the ops in NATIVE_OPS: CPU tensors.
               Built on the first call that needs them (about 40 s; cached after).
    "auto"   - Triton for CUDA tensors when Triton is importable; native for CPU tensors when the op has
               native kernels and they build here; the PyTorch path otherwise.

The choice comes from `use_backend(name)` when one is active, else from the environment variable
`FUSED_OPS_BACKEND` (default "auto"; read once per process, at the first call). Forcing "triton" or "native" where it cannot run raises
`BackendUnavailableError` (for native, with the compiler's error); there is no silent fallback. Under
"auto", native kernels that cannot be built (no compiler) give one warning, and the PyTorch path runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton", "native")
# The ops with native CPU kernels (kernels/cpu/<op>.cpp).
NATIVE_OPS = ("cross_entropy", "batch_norm")
ENV_VAR = "FUSED_OPS_BACKEND"


class _UseBackendStack(threading.local):
    """Each thread's stack of `use_backend` names, innermost last (an attribute that always exists:
    getattr with a default on a missing thread-local attribute raises and catches, ~0.7 us a call)."""

    def __init__(self) -> None:
        self.stack: list[str] = []


_local = _UseBackendStack()


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
# import) cannot change within a process anyway, nor $FUSED_OPS_BACKEND (read once); switch backends
# with `use_backend`, which is guarded.
def _constant_result(fn):
    """`torch.compiler.assume_constant_result(fn)`, without its import of torch._dynamo, which costs
    ~1.8 s and imports triton (tests/test_imports.py checks that both mark `fn` alike)."""
    fn._dynamo_marked_constant = True  # what that decorator sets, and all that dynamo reads
    return fn


_env_choice: str | None = None  # $FUSED_OPS_BACKEND, once read


@_constant_result
def _env_backend() -> str:
    """$FUSED_OPS_BACKEND, checked; "auto" when unset or empty. Read once per process, at the first
    call that asks: a lookup costs 1-2 us (os.environ raises and catches KeyError for an unset name),
    a tenth of a makemore-sized call. Switch backends at run time with `use_backend`."""
    global _env_choice
    if _env_choice is None:
        _env_choice = _check_name(os.environ.get(ENV_VAR, "").strip().lower() or "auto", ENV_VAR)
    return _env_choice


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else `$FUSED_OPS_BACKEND`, else "auto"."""
    stack = _local.stack
    if stack:
        return stack[-1]
    return _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls with backend `name` ("auto", "torch", "triton" or "native"); nests,
    thread-local."""
    _check_name(name, "backend name")
    stack = _local.stack
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


_native_error: str | None = None  # why the native kernels cannot run here, once load() has failed
_native_loaded = False


@_constant_result
def native_available() -> bool:
    """True when the native CPU kernels are built and loaded. The first call builds them (or loads the
    cached build); a failure is remembered, and `native_error()` says why."""
    global _native_error, _native_loaded
    if not _native_loaded and _native_error is None:
        from fused_ops.kernels.cpu import build  # lazily: the build machinery only when a call needs it

        try:
            build.load()
            _native_loaded = True
        except build.NativeBuildError as exc:
            _native_error = str(exc)
    return _native_loaded


def native_error() -> str | None:
    """Why the native kernels are unavailable (None when they are, or have not been tried)."""
    return _native_error


_warned_native_fallback = False


@_constant_result
def _native_for_auto() -> bool:
    """Native for "auto": available, or one warning (per process) and the PyTorch path."""
    global _warned_native_fallback
    if native_available():
        return True
    if not _warned_native_fallback:
        _warned_native_fallback = True
        warnings.warn(
            f"{_native_error}\nfused_ops runs its PyTorch path on the CPU instead (slower). Set "
            f"FUSED_OPS_BACKEND=torch to choose it explicitly and silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def select(op: str, *tensors: torch.Tensor | None) -> str:
    """The backend that runs `op` on these tensors (None entries are ignored): "torch", "triton" or
    "native". Raises BackendUnavailableError when "triton" or "native" is forced and cannot run here.
    """
    name = requested_backend()
    if name == "torch":
        return "torch"
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
        if only_cuda and triton_available():
            return "triton"
        if only_cpu and op in NATIVE_OPS and _native_for_auto():
            return "native"
        return "torch"
    if name == "native":
        return _forced_native(op, tensors, only_cpu)
    return _forced_triton(op, tensors, only_cuda, only_cpu)


def native_selected(op: str) -> bool:
    """True when `select(op, ...)` on CPU tensors returns "native" without a warning or an error: `op`
    has native kernels, the backend asked for is "auto" or "native", and the kernels are available (the
    first call builds them). For a caller's fast path; `select` remains the decision for every other
    call (it warns under "auto" and raises under "native" when the kernels cannot run)."""
    return op in NATIVE_OPS and requested_backend() in ("auto", "native") and native_available()


def _forced_native(op: str, tensors: tuple[torch.Tensor | None, ...], only_cpu: bool) -> str:
    if op not in NATIVE_OPS:
        raise BackendUnavailableError(
            f"{op}: backend 'native' was forced but {op} has no native CPU kernels yet (they exist for "
            f"{', '.join(NATIVE_OPS)}); use backend 'auto' or 'torch' for it"
        )
    if not only_cpu:
        devices = sorted({t.device.type for t in tensors if t is not None})
        raise BackendUnavailableError(
            f"{op}: backend 'native' was forced but the tensors are on {devices}; the native kernels "
            f"need CPU tensors (use 'triton' or 'auto' on CUDA)"
        )
    if not native_available():
        raise BackendUnavailableError(
            f"{op}: backend 'native' was forced but the native CPU kernels are unavailable:\n{_native_error}"
        )
    return "native"


def _forced_triton(op: str, tensors: tuple[torch.Tensor | None, ...], only_cuda: bool, only_cpu: bool) -> str:
    if not triton_available():
        raise BackendUnavailableError(
            f"{op}: backend 'triton' was forced but triton is not installed; install it with "
            f"`pip install 'fused_ops[triton]'` (from a clone: `pip install -e '.[triton]'`) or use backend "
            f"'torch'/'auto'"
        )
    if only_cuda:
        return "triton"
    if only_cpu and triton_interpreter_enabled():
        if torch.compiler.is_compiling():  # dynamo traces only real (JIT) Triton kernels
            raise BackendUnavailableError(
                f"{op}: backend 'triton' on CPU tensors runs Triton's interpreter, which torch.compile "
                f"cannot trace; use backend 'torch' or 'auto' under torch.compile on CPU"
            )
        return "triton"
    devices = sorted({t.device.type for t in tensors if t is not None})
    raise BackendUnavailableError(
        f"{op}: backend 'triton' was forced but the tensors are on {devices}; the Triton kernels need "
        f"CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
    )
