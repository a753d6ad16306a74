"""Compile every Triton kernel specialisation a launcher can choose, for real GPUs, on any machine.

Run as a script (`python tests/compile_kernels.py [--arch 80 90] [--module cross_entropy ...] [--jobs N]`)
with TRITON_INTERPRET unset: under the interpreter `@triton.jit` yields interpreted functions that
cannot be compiled. CI runs it after the test suite, once per Triton version it tests.

Each kernels module exposes `specializations()`, yielding `KernelSpec`s: the kernel, its signature
(argument name -> Triton type string, "constexpr" for constexprs), the constexpr values and num_warps,
plus whether the kernel is on the hot path (where a register spill is a defect).

For each spec and arch this prints a line as its compile finishes ([done/total], registers and spill
bytes: LOCAL, from cuobjdump's resource usage of the cubin), and exits 1 when a compile fails or a hot
kernel spills. Compiles run in N processes (default: one per CPU); Triton's cache
(~/.triton/cache, or $TRITON_CACHE_DIR) makes a second run take seconds. A cold run of every
specialisation for sm_80 and sm_90 takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
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


@functools.lru_cache(maxsize=None)
def _specs(module_name: str) -> list:
    return list(importlib.import_module(f"fused_ops.kernels.triton.{module_name}").specializations())


def _compile_task(task: tuple[str, int, int]) -> tuple[str, bool]:
    """(module, spec index, arch) -> (its table line, whether it fails the check). Runs in a worker."""
    module_name, index, arch = task
    spec = _specs(module_name)[index]
    label = f"{spec.kernel.fn.__name__:<32} {pointer_dtypes(spec):<18}"
    try:
        regs, spill = compile_spec(spec, arch)
    except Exception as exc:  # noqa: BLE001  (report every failure, then fail the run)
        return f"{label} sm_{arch:<2} FAILED: {type(exc).__name__}: {exc}", True
    bad = spill > 0 and spec.hot
    flag = "  SPILLS IN HOT KERNEL" if bad else ""
    usage = f"{spec.num_warps:>5} {regs:>5} {spill:>6}"
    return f"{label} sm_{arch:<2} {usage}  {spec.constexprs}{flag}", bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton

    tasks = [
        (module_name, index, arch)
        for module_name in args.module
        for index in range(len(_specs(module_name)))
        for arch in args.arch
    ]
    width = len(str(len(tasks)))
    print(f"triton {triton.__version__}: {len(tasks)} compiles in {args.jobs} process(es)", flush=True)
    columns = f"{'arch':>5} {'warps':>5} {'regs':>5} {'spill':>6}"
    print(f"{'':{2 * width + 3}} {'kernel':<32} {'pointer dtypes':<18} {columns}  constexprs", flush=True)
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for done, (line, bad) in enumerate(pool.map(_compile_task, tasks), 1):
            failures += bad
            print(f"[{done:>{width}}/{len(tasks)}] {line}", flush=True)
    print(f"compile check (triton {triton.__version__}): {len(tasks)} compiles, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
