"""Packaging for fused_ops.

`kernels/` (device code) is installed as the subpackage `fused_ops.kernels`, never as a
top-level `kernels` module: that import name belongs to an unrelated PyPI package.
"""
from pathlib import Path

from setuptools import setup

setup(
    name="fused_ops",
    version="0.1.0",
    description="Fused cross-entropy and BatchNorm for PyTorch: Triton kernels, analytic PyTorch path",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=[
        "fused_ops",
        "fused_ops.distributed",
        "fused_ops.makemore",
        "fused_ops.kernels",
        "fused_ops.kernels.triton",
        "fused_ops.kernels.cpu",
    ],
    package_dir={"fused_ops": "fused_ops", "fused_ops.kernels": "kernels"},
    # The native CPU kernels ship as C++ sources, compiled on first use (torch.utils.cpp_extension + ninja).
    package_data={"fused_ops.makemore": ["names.txt"], "fused_ops.kernels.cpu": ["*.cpp", "*.h"]},
    install_requires=[
        # torch: the range CI tests at both ends (.ci/run). 2.11: the floor, what the lent GPU machine runs
        # (with triton 3.6); CI runs the whole suite on it in a second virtual environment. Below it is
        # untested. <2.14: 2.13 is the newest CI installs (the README's pin, the CPU build); 2.14 is untested.
        "torch>=2.11,<2.14",
        # numpy: fused_ops never imports it, but `import torch` warns "Failed to initialize NumPy" without
        # it, and the CPU wheel of torch does not require it. Any version that torch accepts.
        "numpy",
        # ninja: torch.utils.cpp_extension builds the native CPU kernels with it on first use (it runs the
        # `ninja` binary only, through no API of the package). Both CI environments install the newest.
        "ninja",
    ],
    extras_require={
        # triton: 3.6 is the floor (what torch 2.11's CUDA wheel pins; the GPU machine's); 3.9 the newest
        # release. CI runs the interpreter tests and the kernel compile check on both (torch 2.13's CUDA
        # wheel pins 3.7.1, inside the range, also spill-free; 3.8.0 spills 8 bytes in three softcap
        # variants on sm_90, see kernels/triton/cross_entropy.py).
        "triton": ["triton>=3.6,<3.10; platform_system == 'Linux'"],
        "plot": ["matplotlib>=3.5"],
        # numpy<2.4: triton 3.6's interpreter (how CI runs the kernels) breaks on numpy 2.4's stricter
        # array-to-scalar conversion in runtime-bounded loops (triton-lang/triton#9171, fixed after 3.6).
        # hypothesis: the differential fuzzing suite (tests/test_fuzz.py).
        "test": ["pytest>=7", "matplotlib>=3.5", "numpy<2.4", "hypothesis"],
    },
    entry_points={"console_scripts": ["fused-ops = fused_ops.__main__:main"]},
)
