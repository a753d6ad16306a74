"""Test-session set-up shared by every test file.

Without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET=1 must be set before
triton is imported, so it is set here, at collection time. On a GPU machine the real kernels run.
"""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_ops.backend import triton_available


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same seeds: fresh random inputs, reproducible failures."""
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("interpreter") and not triton_available():
            item.add_marker(pytest.mark.skip(reason="triton is not installed"))
