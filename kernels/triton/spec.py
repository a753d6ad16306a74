"""`KernelSpec`: one compilable specialisation of a kernel, as its launcher would choose it.

Each kernels module lists its specialisations with `specializations()`, so that
`tests/compile_kernels.py` can compile all of them for real GPUs on a machine without one.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class KernelSpec(NamedTuple):
    kernel: Any  # a triton JITFunction
    signature: dict[str, str]  # argument name -> Triton type ("*fp32", "i32", "i64", "fp32", "constexpr")
    constexprs: dict[str, Any]  # constexpr argument name -> value
    num_warps: int
    hot: bool = True  # on the per-element path: a register spill here is a defect
