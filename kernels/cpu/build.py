"""Build and load the native CPU kernels: every `.cpp` file in this folder (with the `.h` files they
share), compiled into one library.

`load()` is called the first time a call runs the "native" backend (never at import). The first load
on a machine compiles the sources with `torch.utils.cpp_extension` and ninja, printing two lines to
stderr: that it builds, and how long the build took. The library is cached in

    $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)/fused_ops_cpu/<key>/

where <key> names what the binary depends on: the Python and torch versions, the CPU capability it
was compiled for, and a hash of the sources, headers and flags. A later process with the same key loads the
cached library in milliseconds, without importing `torch.utils.cpp_extension`; a change to any of
them builds a new one. Deleting the folder forces a rebuild.

Loading the library registers its ops (`TORCH_LIBRARY_FRAGMENT(fused_ops, ...)` in each .cpp); then
each op's module beside its .cpp (`cross_entropy.py` for `cross_entropy.cpp`) registers the fake
kernels of its ops and names them. A new op is a new `<op>.cpp` and `<op>.py` pair (sharing
common.h): nothing here changes.

Vectorisation follows ATen: the sources are compiled for the CPU capability torch itself uses here
(`torch.backends.cpu.get_cpu_capability()`: AVX512, AVX2 or the portable DEFAULT), with ATen's
flags and `CPU_CAPABILITY` macros, so `at::vec::Vectorized` takes the same width as ATen's kernels.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

NAME = "fused_ops_cpu"
SOURCE_DIR = Path(__file__).resolve().parent
# ATen's per-capability flags (cmake/Codegen.cmake) and the macros its vec headers select on.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_loaded = False


class NativeBuildError(RuntimeError):
    """The native kernels could not be built or loaded here: no compiler, or the compiler's error."""


def sources() -> list[Path]:
    """The .cpp files that make up the library, one per op."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def headers() -> list[Path]:
    """The headers the .cpp files share (common.h)."""
    return sorted(SOURCE_DIR.glob("*.h"))


def compiler() -> str | None:
    """The C++ compiler cpp_extension would run ($CXX, else c++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def capability() -> str:
    """The CPU capability to compile for: torch's own here, where this build knows its flags."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in CAPABILITY_FLAGS else "DEFAULT"


def cflags() -> list[str]:
    cap = capability()
    macros = [] if cap == "DEFAULT" else [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return [*COMMON_FLAGS, *CAPABILITY_FLAGS[cap], *macros]


def build_directory() -> Path:
    """Where this build lives: a folder per (Python, torch, capability, sources and flags)."""
    digest = hashlib.sha256()
    for path in sources() + headers():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(cflags()).encode())
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"{python}-torch{torch.__version__}-{capability().lower()}-{digest.hexdigest()[:16]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "torch_extensions",
    )
    return Path(root) / NAME / key


def load() -> None:
    """Build the library if this machine has no cached build, load it, and register the fake kernels.

    Thread-safe and idempotent. Raises NativeBuildError with the reason (no compiler, or the compiler's
    output) when the library cannot be built or loaded.
    """
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        directory = build_directory()
        library = directory / f"{NAME}.so"
        if not (directory / "complete").exists():
            _build(directory)
        try:
            torch.ops.load_library(str(library))
        except OSError as exc:
            raise NativeBuildError(
                f"fused_ops: the native CPU kernels in {library} could not be loaded ({exc}); delete "
                f"{directory} to rebuild them"
            ) from exc
        for path in sources():  # each op's fake kernels, now that its ops exist
            importlib.import_module(f"fused_ops.kernels.cpu.{path.stem}")
        _loaded = True


def _build(directory: Path) -> None:
    if compiler() is None:
        raise NativeBuildError(
            f"fused_ops: no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}; set $CXX or "
            f"install g++ or clang++) to build the native CPU kernels"
        )
    from torch.utils import cpp_extension  # ~0.3 s to import (setuptools): only when a build runs

    directory.mkdir(parents=True, exist_ok=True)
    print(
        f"fused_ops: building the native CPU kernels (once per machine and torch version; cached in "
        f"{directory})",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        # One process builds while any other waits on cpp_extension's lock file in `directory`.
        cpp_extension.load(
            name=NAME,
            sources=[str(path) for path in sources()],
            extra_cflags=cflags(),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # cpp_extension raises RuntimeError with the compiler's output
        raise NativeBuildError(f"fused_ops: building the native CPU kernels failed:\n{exc}") from exc
    (directory / "complete").touch()  # only now may another process load the library without ninja
    print(
        f"fused_ops: built the native CPU kernels in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
