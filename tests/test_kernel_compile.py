"""Every Triton kernel specialisation compiles for sm_80 and sm_90, without register spills in hot kernels.

Runs `tests/compile_kernels.py` in subprocesses with TRITON_INTERPRET removed (the interpreter's
`@triton.jit` functions cannot be compiled), one per architecture, in parallel. Works without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")
ARCHS = (80, 90)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["cross_entropy", "batch_norm"])
def test_kernels_compile_without_spills(module):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if importlib.util.find_spec(f"fused_ops.kernels.triton.{module}") is None:
        pytest.skip(f"fused_ops.kernels.triton.{module} does not exist yet")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    runs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--module", module, "--arch", str(arch)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arch in ARCHS
    ]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for arch, run, output in zip(ARCHS, runs, outputs, strict=True):
        print(output)  # the register / spill table, shown with pytest -s or on failure
        assert run.returncode == 0, f"sm_{arch} compile check failed for {module}:\n{output}"
