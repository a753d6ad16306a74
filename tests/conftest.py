"""Test-session set-up shared by every test file.

Without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET=1 must be set before
triton is imported, so it is set here, at collection time. On a GPU machine the real kernels run.
"""
import inspect
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_ops.backend import triton_available

try:  # hypothesis profiles for tests/test_fuzz.py; --hypothesis-profile=NAME on the command line wins
    from hypothesis import HealthCheck, settings
except ImportError:  # test_fuzz.py skips itself without hypothesis
    pass
else:
    _common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    # CI: a fixed seed (derandomize) and a bounded number of examples (a backend runs its share of them).
    settings.register_profile("fuzz-ci", max_examples=60, derandomize=True, database=None, **_common)
    # On demand: many more, randomised examples; failures are kept in .hypothesis/ and replayed first.
    settings.register_profile("fuzz-long", max_examples=3000, **_common)
    settings.load_profile("fuzz-ci")


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


@pytest.fixture
def torch_batch_norm():
    """Factory of torch's BatchNorm modules: make(nn.BatchNorm2d, num_features, bias=False, **kwargs).

    torch < 2.12 has no bias= keyword; there bias=False is built as torch 2.12 builds it: the weight
    kept, bias a None parameter (no state_dict key), so the floor's tests compare against the same thing.
    """

    def make(cls: type, num_features: int, bias: bool = True, **kwargs) -> torch.nn.Module:
        if "bias" in inspect.signature(cls.__init__).parameters:
            return cls(num_features, bias=bias, **kwargs)
        module = cls(num_features, **kwargs)
        if not bias and module.affine:
            module.register_parameter("bias", None)
        return module

    return make


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """Thread counts 1 and 2 for the native kernels' tests: at::parallel_for splits their rows, blocks
    and channels between the threads, and the results must not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
