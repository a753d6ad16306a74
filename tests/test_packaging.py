"""`pip install .` gives a working package: the data file and fused_ops.kernels in, no top-level kernels."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# what a build does not read: VCS and caches, outputs of earlier builds, tests and benchmarks
SKIP = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.whl", "bench", "tests")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """A wheel built from a copy of the source tree (building in place would write build/ into the
    checkout)."""
    source = tmp_path_factory.mktemp("source") / "fused_ops"
    shutil.copytree(REPO, source, ignore=SKIP)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(out)],
        cwd=source, check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("fused_ops-*.whl")
    return path


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fused_ops/kernels/__init__.py" in names
    assert "fused_ops/makemore/names.txt" in names
    assert "fused_ops/__main__.py" in names
    assert "fused_ops/kernels/triton/cross_entropy.py" in names
    native_sources = {"fused_ops/kernels/cpu/cross_entropy.cpp", "fused_ops/kernels/cpu/common.h"}
    assert native_sources <= names  # compiled on first use
    assert "fused_ops/distributed/sync_batch_norm.py" in names
    licenses = [name for name in names if name.endswith("/LICENSE") and ".dist-info/" in name]
    assert licenses, f"no LICENSE in the wheel's metadata: {sorted(names)}"
    assert b"MIT License" in zipfile.ZipFile(wheel).read(licenses[0])
    assert not any(name.startswith("kernels/") for name in names), "kernels must not be a top-level package"
    top_level = [name for name in names if name.endswith("top_level.txt")]
    assert [zipfile.ZipFile(wheel).read(name).decode().split() for name in top_level] == [["fused_ops"]]
    (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
    assert "fused-ops = fused_ops.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_imports_and_loads_its_data(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    code = (
        "import fused_ops, fused_ops.kernels, fused_ops.makemore.data\n"
        "print(fused_ops.__file__)\nprint(fused_ops.kernels.__file__)\n"
        "from fused_ops.makemore import data\n"
        "print(len(data.load_words()), len(data.load_dataset().train))\n"
        "import torch\n"
        "with fused_ops.use_backend('native'):\n"  # the native kernels, from the installed sources
        "    fused_ops.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))\n"
        "import fused_ops.kernels.cpu.build as build\n"
        "print(build.SOURCE_DIR)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    package_file, kernels_file, counts, native_sources = result.stdout.splitlines()
    assert pathlib.Path(package_file).is_relative_to(target), "imported the checkout, not the installed wheel"
    assert pathlib.Path(kernels_file).is_relative_to(target / "fused_ops" / "kernels")
    assert counts == "32033 182625"
    assert pathlib.Path(native_sources) == target / "fused_ops" / "kernels" / "cpu"
