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
    install_requires=["torch>=2.6", "ninja"],
    extras_require={
        "triton": ["triton>=3.2; platform_system == 'Linux'"],
        "plot": ["matplotlib>=3.5"],
        # numpy<2.4: triton 3.6's interpreter (how CI runs the kernels) breaks on numpy 2.4's stricter
        # array-to-scalar conversion in runtime-bounded loops (triton-lang/triton#9171, fixed after 3.6).
        "test": ["pytest>=7", "matplotlib>=3.5", "numpy<2.4"],
    },
    entry_points={"console_scripts": ["fused-ops = fused_ops.__main__:main"]},
)
