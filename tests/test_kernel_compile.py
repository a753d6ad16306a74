"""The compile check's list of specialisations covers every launch the launchers can make.

The compile check itself, `python3 tests/compile_kernels.py` (every specialisation for sm_80 and sm_90,
with registers and spills), runs outside pytest, as its own step in CI and in the README's test
command: a cold run takes minutes, and as a script it prints a line per compile as it goes.
"""

from __future__ import annotations

import itertools

import pytest

from fused_ops.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# One C on each side of every rung boundary of both ladders, and past the last.
CLASS_COUNTS = (1, 32, 33, 1024, 1025, 4096, 4097, 16384, 16385, 100_000)


def test_cross_entropy_specializations_cover_every_forward_launch():
    from fused_ops.kernels.triton import cross_entropy as kernels

    compiled = {
        (
            spec.signature["X_ptr"],
            spec.constexprs["PROB_TARGET"],
            spec.constexprs["HAS_WEIGHT"],
            spec.constexprs["SOFTCAP"],
            spec.constexprs["BLOCK_N"],
            spec.constexprs["BLOCK_C"],
            spec.constexprs["SINGLE_PASS"],
            spec.num_warps,
        )
        for spec in kernels.specializations()
        if spec.kernel is kernels.cross_entropy_fwd_kernel
    }
    for C, dtype, prob, weight, softcap in itertools.product(
        CLASS_COUNTS, ("*fp32", "*bf16", "*fp16"), (False, True), (False, True), (False, True)
    ):
        rung = kernels.forward_settings(C, prob)
        launch = (dtype, prob, weight, softcap, rung.BLOCK_N, rung.BLOCK_C, rung.SINGLE_PASS, rung.num_warps)
        assert launch in compiled, f"C={C}: the launcher's choice {launch} is not compile-checked"
