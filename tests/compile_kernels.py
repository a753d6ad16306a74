"""Compile every Triton kernel specialisation a launcher can choose, for real GPUs, on any machine.

Run as a script (`python tests/compile_kernels.py [--arch 80 90] [--module cross_entropy ...]`) with
TRITON_INTERPRET unset: under the interpreter `@triton.jit` yields interpreted functions that cannot
be compiled. `tests/test_kernel_compile.py` runs it in a subprocess.

Each kernels module exposes `specializations()`, yielding `KernelSpec`s: the kernel, its signature
(argument name -> Triton type string, "constexpr" for constexprs), the constexpr values and num_warps,
plus whether the kernel is on the hot path (where a register spill is a defect).

For each spec and arch this prints registers and spill bytes (LOCAL, from cuobjdump's resource usage
of the cubin), and exits 1 when a compile fails or a hot kernel spills.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

MODULES = ("cross_entropy", "batch_norm")


def resource_usage(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, local-memory bytes) of kernel `name` in `cubin`, read with Triton's bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        dump = [tool, "--dump-resource-usage", path]
        out = subprocess.run(dump, capture_output=True, text=True, check=True).stdout
    usage = r"\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)"
    match = re.search(rf"Function {re.escape(name)}:{usage}", out)
    if match is None:
        raise RuntimeError(f"no resource usage for {name} in:\n{out}")
    regs, stack, local = (int(g) for g in match.groups())
    return regs, max(stack, local)


def compile_spec(spec, arch: int) -> tuple[int, int]:
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    return resource_usage(compiled.asm["cubin"], compiled.metadata.name)


def pointer_dtypes(spec) -> str:
    """The distinct element types of a specialisation's pointer arguments, in order: "bf16,i64,fp32"."""
    return ",".join(dict.fromkeys(t[1:] for t in spec.signature.values() if t.startswith("*")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

    failures = 0
    columns = f"{'arch':>5} {'warps':>5} {'regs':>5} {'spill':>6}"
    print(f"{'kernel':<32} {'pointer dtypes':<18} {columns}  constexprs")
    for module_name in args.module:
        module = importlib.import_module(f"fused_ops.kernels.triton.{module_name}")
        for spec in module.specializations():
            for arch in args.arch:
                label = f"{spec.kernel.fn.__name__:<32} {pointer_dtypes(spec):<18}"
                try:
                    regs, spill = compile_spec(spec, arch)
                except Exception as exc:  # noqa: BLE001  (report every failure, then fail the run)
                    failures += 1
                    print(f"{label} sm_{arch:<2} FAILED: {type(exc).__name__}: {exc}")
                    continue
                bad = spill > 0 and spec.hot
                failures += bad
                flag = "  SPILLS IN HOT KERNEL" if bad else ""
                usage = f"{spec.num_warps:>5} {regs:>5} {spill:>6}"
                print(f"{label} sm_{arch:<2} {usage}  {spec.constexprs}{flag}")
    print(f"compile check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
