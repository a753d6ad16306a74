"""The Triton cross-entropy kernels against the PyTorch path and F.cross_entropy.

`interpreter` tests run the kernels through TRITON_INTERPRET=1 on CPU tensors (set by conftest.py when
there is no CUDA), with small shapes: the interpreter costs milliseconds per program. On a CUDA machine
the same tests run the compiled kernels on the GPU. `gpu` tests need CUDA: full shapes, dtypes against
torch's own error, no host syncs, CUDA graphs, and N x C >= 2^31 for the 64-bit offsets.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fused_ops
from fused_ops.backend import BackendUnavailableError, triton_interpreter_enabled
from fused_ops.cross_entropy import cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1"
)

# C values, one per launcher rung and none a multiple of its block: 27 (makemore; 64 rows per program),
# 1000 (4 rows per program), 5000 (a whole row per program), 20001 (two sweeps over 4096-column blocks).
# The first three give their rung several programs, so the multi-program reductions run too; the
# two-sweep rung is slow under the interpreter, so it gets one row (GPU tests cover it at scale).
SHAPES = [(100, 27), (9, 1000), (3, 5000), (1, 20001)]


pytestmark = [
    # The interpreter evaluates masked-out lanes with numpy too (log(0), inf - inf); masks discard them.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    # triton-lang/triton#9171 (see interpreter_runs_loops): a warning with numpy < 2.4, an error after.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def interpreter_runs_loops():
    """Fail clearly where Triton's interpreter cannot run loops with runtime bounds: triton < 3.7 with
    numpy >= 2.4 (triton-lang/triton#9171). The fix is `pip install "numpy<2.4"`."""
    if DEVICE != "cpu" or not triton_interpreter_enabled():
        return
    import triton
    import triton.language as tl

    @triton.jit
    def sum_kernel(X_ptr, Out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, n, BLOCK):
            acc += tl.load(X_ptr + i0 + tl.arange(0, BLOCK), mask=i0 + tl.arange(0, BLOCK) < n, other=0.0)
        tl.store(Out_ptr, tl.sum(acc, axis=0))

    try:
        sum_kernel[(1,)](X_ptr=torch.ones(5), Out_ptr=torch.empty(()), n=5, BLOCK=4)
    except Exception as exc:  # triton.runtime.errors.InterpreterError
        if "0-dimensional" not in str(exc):
            raise
        import numpy

        pytest.fail(
            f"Triton {triton.__version__}'s interpreter cannot run loops with numpy {numpy.__version__} "
            f"(triton-lang/triton#9171); install numpy<2.4"
        )


@pytest.fixture
def triton_backend():
    with fused_ops.use_backend("triton"):
        yield


@pytest.fixture
def kernels():
    from fused_ops.kernels.triton import cross_entropy

    return cross_entropy


def make_inputs(shape, kind, ignore_index=-100, dtype=torch.float32):
    """(logits, target) on DEVICE; index targets ignore every fourth row, starting at row 1."""
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, device=DEVICE) * 3
    if kind == "prob":
        target = torch.softmax(torch.randn(shape, device=DEVICE), dim=0 if len(shape) == 1 else 1).to(dtype)
    else:
        batch = () if len(shape) == 1 else shape[:1] + shape[2:]
        target = torch.randint(0, C, batch, device=DEVICE)
        if target.dim():
            target.view(-1)[1::4] = ignore_index
    return x.to(dtype), target


def run(x, target, upstream=None, **kwargs):
    """(loss, x.grad) of fused_ops.cross_entropy on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    loss = fused_ops.cross_entropy(leaf, target, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), leaf.grad


def run_torch(x, target, upstream=None, **kwargs):
    leaf = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(leaf, target.long() if not target.is_floating_point() else target, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------------
# The option grid, float32, against the PyTorch path and F.cross_entropy.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_matches_reference_over_grid(shape, kind, reduction):
    C = shape[1]
    for use_weight, smoothing in [(False, 0.0), (True, 0.3)]:  # plain; every term at once
        x, target = make_inputs(shape, kind)
        weight = torch.rand(C, device=DEVICE) + 0.2 if use_weight else None
        kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}
        upstream = (
            torch.randn(shape[0], device=DEVICE) if reduction == "none" else torch.tensor(1.7, device=DEVICE)
        )
        ours, ours_grad = run(x, target, upstream, **kwargs)
        ref, ref_grad = run_torch(x, target, upstream, **kwargs)
        with fused_ops.use_backend("torch"):
            path, path_grad = run(x, target, upstream, **kwargs)
        for a, b in ((ours, ref), (ours, path)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in ((ours_grad, ref_grad), (ours_grad, path_grad)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_kdim_unbatched_and_ignore_index(ignore_index):
    """(N, C, d1, d2), (C,) and an ignore_index inside [0, C), with weights and smoothing."""
    weight = torch.rand(27, device=DEVICE) + 0.2
    for shape, kind in [((2, 27, 3, 2), "index"), ((2, 27, 3), "prob"), ((27,), "index"), ((27,), "prob")]:
        if kind == "prob" and ignore_index >= 0:
            continue
        x, target = make_inputs(shape, kind, ignore_index)
        for reduction in ("mean", "none"):
            kwargs = {
                "weight": weight,
                "ignore_index": ignore_index,
                "reduction": reduction,
                "label_smoothing": 0.2,
            }
            ours, ours_grad = run(x, target, **kwargs)
            ref, ref_grad = run_torch(x, target, **kwargs)
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours_grad, ref_grad, atol=1e-6, rtol=1e-5)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|: the gradient of a mean is tiny, absolute errors are not."""
    return ((value.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def check_against_torch_error(x, target, tol, **kwargs):
    """err(ours) <= 2 * err(torch) + tol for loss and gradient of low-precision x, relative errors against
    float32 math on the same rounded input."""
    ref, ref_grad = run_torch(x.float(), target.float() if target.is_floating_point() else target, **kwargs)
    ours, ours_grad = run(x, target, **kwargs)
    low_kwargs = {**kwargs, "weight": None if kwargs.get("weight") is None else kwargs["weight"].to(x.dtype)}
    theirs, theirs_grad = run_torch(x, target, **low_kwargs)
    assert ours.dtype == x.dtype and ours_grad.dtype == x.dtype
    for a, b, r in ((ours, theirs, ref), (ours_grad, theirs_grad, ref_grad)):
        err_ours, err_torch = relative_error(a, r), relative_error(b, r)
        assert err_ours <= 2 * err_torch + tol, (err_ours, err_torch)


# (dtype, tol): tol is about half an ulp of the dtype (a result rounded once from float32).
LOW_PRECISION = [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)]


@pytest.mark.parametrize("dtype, tol", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(40, 27), (3, 1000), (1, 20001)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_low_precision_against_torch_error(dtype, tol, shape, reduction):
    x, target = make_inputs(shape, "index", dtype=dtype)
    check_against_torch_error(x, target, tol, reduction=reduction, label_smoothing=0.1)


# ----------------------------------------------------------------------------------------------------
# Edge cases and the no-sync nan path.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_edge_cases_like_torch(reduction):
    cases = []
    x, _ = make_inputs((70, 27), "index")
    cases.append(("all ignored", x, torch.full((70,), -100, device=DEVICE), {}))
    weight = torch.ones(27, device=DEVICE)
    weight[1] = 0.0
    cases.append(("zero denominator", x, torch.tensor([1, -100] * 35, device=DEVICE), {"weight": weight}))
    x_inf = x.clone()
    x_inf[:, 4] = float("-inf")
    cases.append(("-inf logits", x_inf, torch.randint(5, 27, (70,), device=DEVICE), {}))
    cases.append(
        ("empty", torch.randn(0, 27, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE), {})
    )
    for name, x, target, extra in cases:
        for smoothing in (0.0, 0.2):
            kwargs = dict(reduction=reduction, label_smoothing=smoothing, **extra)
            ours, ours_grad = run(x, target, **kwargs)
            ref, ref_grad = run_torch(x, target, **kwargs)
            torch.testing.assert_close(ours, ref, equal_nan=True, msg=name)
            torch.testing.assert_close(ours_grad, ref_grad, equal_nan=True, msg=name)


@pytest.mark.interpreter
@needs_kernels
def test_out_of_range_target_gives_nan_rows(kernels):
    """What CUDA does without validate=True: clamped reads, nan rows, the same as the PyTorch path."""
    x = torch.randn(6, 27, device=DEVICE)
    target = torch.tensor([1, 27, -100, -5, 3, 26], device=DEVICE)
    for reduction in ("none", "mean", "sum"):
        grad = torch.full_like(x, float("nan"))
        loss = kernels.cross_entropy_forward(
            x, target, None, ignore_index=-100, reduction=reduction, label_smoothing=0.0, grad=grad
        )
        ref_loss, ref_grad = cross_entropy_reference(x, target, None, -100, reduction, 0.0, need_grad=True)
        torch.testing.assert_close(loss, ref_loss, equal_nan=True)
        torch.testing.assert_close(grad, ref_grad, equal_nan=True)
        assert grad[1].isnan().all() and grad[3].isnan().all() and grad[2].eq(0).all()
        if reduction != "mean":  # "mean": the denominator is nan too, so every active row is
            assert not grad[0].isnan().any()
        if reduction == "none":
            assert loss[1].isnan() and not loss[0].isnan() and loss[2] == 0


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_bad_input_raises_on_the_triton_path_too():
    x = torch.randn(4, 27, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.cross_entropy(
            x, torch.zeros(4, dtype=torch.long, device=DEVICE), weight=torch.rand(5, device=DEVICE)
        )
    with pytest.raises(IndexError, match="target"):
        fused_ops.cross_entropy(x, torch.tensor([0, 1, 2, 27], device=DEVICE), validate=True)
    with pytest.raises(BackendUnavailableError, match="float64"):
        fused_ops.cross_entropy(x.double(), torch.zeros(4, dtype=torch.long, device=DEVICE))


# ----------------------------------------------------------------------------------------------------
# Kernel properties: every output written, determinism, scaling, launches, settings.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_every_output_is_written(shape, monkeypatch):
    """All buffers come from torch.empty: poisoned with nan, any element left unwritten shows up."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-(2**30))

    x, target = make_inputs(shape, "index")
    expected = [run_torch(x, target, reduction=r, label_smoothing=0.1) for r in ("mean", "none")]
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for reduction, (ref, ref_grad) in zip(("mean", "none"), expected, strict=True):
        ours, ours_grad = run(x, target, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_multi_program_mean_reductions(kernels, monkeypatch):
    """Several denominator partials and a looping finish kernel (constants shrunk to test sizes)."""
    monkeypatch.setattr(kernels, "DENOM_ROWS_PER_PROGRAM", 64)
    monkeypatch.setattr(kernels, "DENOM_BLOCK_N", 32)
    monkeypatch.setattr(kernels, "FINISH_BLOCK", 2)
    x, target = make_inputs((300, 27), "index")  # 5 forward programs, 5 denominator programs
    weight = torch.rand(27, device=DEVICE) + 0.2
    for reduction in ("mean", "sum"):
        ours, ours_grad = run(x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        ref, ref_grad = run_torch(x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(100, 27), (1, 20001)], ids=str)
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_deterministic(shape):
    x, target = make_inputs(shape, "index")
    weight = torch.rand(shape[1], device=DEVICE)
    first = run(x, target, weight=weight, label_smoothing=0.1)
    second = run(x, target, weight=weight, label_smoothing=0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.interpreter
@needs_kernels
def test_backward_kernel_scales_rows_and_skips_ones(kernels):
    grad = torch.randn(70, 1000, device=DEVICE)
    scale = torch.ones(70, device=DEVICE)
    scale[::3] = torch.randn(24, device=DEVICE)
    expected = grad * scale[:, None]
    kernels.cross_entropy_backward(grad, scale)
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)
    untouched = torch.randn(70, 27, device=DEVICE)
    saved = untouched.clone()
    kernels.cross_entropy_backward(untouched, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(untouched, saved)
    kernels.cross_entropy_backward(untouched, torch.tensor(-0.5, device=DEVICE))
    torch.testing.assert_close(untouched, saved * -0.5, atol=0, rtol=0)
    # The skip itself: a row scaled by 1 would be unchanged in value anyway, but a signaling NaN changes
    # bits when multiplied (it comes back quiet). Rows with grad_output == 1 must keep its exact bits;
    # the others (scaled by 2) show that the kernel does quiet it when it touches a row.
    snan = torch.full((8, 27), 0x7F800001, dtype=torch.int32, device=DEVICE).view(torch.float32)
    scale = torch.tensor([1.0, 2.0] * 4, device=DEVICE)
    kernels.cross_entropy_backward(snan, scale)
    bits = snan.view(torch.int32)
    assert (bits[scale == 1] == 0x7F800001).all(), "rows with grad_output == 1 were rewritten"
    assert (bits[scale == 2] != 0x7F800001).all(), "scaled rows kept a signaling NaN: the check cannot see writes"


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_makemore_shape_launches(kernels, monkeypatch):
    """(32, 27): one kernel launch forward, one backward (which moves no bytes at grad_output == 1)."""
    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in (
        "cross_entropy_fwd_kernel",
        "cross_entropy_bwd_kernel",
        "cross_entropy_denom_kernel",
        "cross_entropy_finish_kernel",
    ):
        monkeypatch.setattr(kernels, name, Counting(name, getattr(kernels, name)))
    h, W = torch.randn(32, 64, device=DEVICE), torch.randn(64, 27, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 27, (32,), device=DEVICE)
    loss = fused_ops.cross_entropy(h @ W, target)
    assert launches == ["cross_entropy_fwd_kernel"]
    loss.backward()
    assert launches == ["cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"]


@pytest.mark.interpreter
@needs_kernels
def test_launch_settings(kernels):
    small = kernels.forward_settings(27)
    assert small.BLOCK_N >= 32 and small.BLOCK_C >= 27 and small.SINGLE_PASS  # not one program per row
    for C, prob in itertools.product((1, 27, 1000, 4096, 4097, 16384, 16385, 262144), (False, True)):
        rung = kernels.forward_settings(C, prob)
        assert rung.SINGLE_PASS == (C <= rung.BLOCK_C)
    assert kernels.forward_settings(16384).SINGLE_PASS and not kernels.forward_settings(16384, True).SINGLE_PASS
    with pytest.raises(ValueError, match="C <="):
        kernels.forward_settings(kernels.MAX_CLASSES + 1)


@pytest.mark.parametrize("C", [3000, 5000], ids=["prob_single_pass_4096", "prob_two_sweeps"])
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_probability_target_rungs(kernels, C):
    """The probability-target ladder's own rungs (C = 3000: one 4096-column tile; C = 5000: two sweeps,
    where index targets still take one pass), with the options that made them spill: weight, softcap."""
    rung = kernels.forward_settings(C, prob_target=True)
    assert rung.SINGLE_PASS == (C == 3000)
    x, target = make_inputs((2, C), "prob")
    kwargs = {"weight": torch.rand(C, device=DEVICE) + 0.2, "label_smoothing": 0.1, "softcap": 4.0}
    ours, ours_grad = run(x, target, **kwargs)
    with fused_ops.use_backend("torch"):
        path, path_grad = run(x, target, **kwargs)
    torch.testing.assert_close(ours, path, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grad, path_grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Autograd on the Triton path.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_inplace_backward_overwrites_logits():
    h, W = torch.randn(40, 16, device=DEVICE), torch.randn(16, 27, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 27, (40,), device=DEVICE)
    with fused_ops.use_backend("torch"):
        fused_ops.cross_entropy(h @ W, target, label_smoothing=0.1).backward(torch.tensor(3.0, device=DEVICE))
    ref_grad, W.grad = W.grad, None
    logits = h @ W
    loss = fused_ops.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True)
    unit_grad = cross_entropy_reference(h @ W.detach(), target, None, -100, "mean", 0.1, True)[1]
    torch.testing.assert_close(logits.detach(), unit_grad, atol=1e-6, rtol=1e-5)
    loss.backward(torch.tensor(3.0, device=DEVICE))
    torch.testing.assert_close(W.grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_inplace_backward_kdim_and_non_contiguous_inputs():
    """Strided logits and targets reach the kernels through their strides or a copy; K-dim inplace
    writes the gradient into the internal (M, C) copy and leaves input unchanged."""
    target = torch.stack([torch.randint(0, 27, (30,), device=DEVICE)] * 2, 1)[:, 0]  # stride 2
    cases = [  # (leaf shape, leaf -> logits, target, inplace_backward)
        ((30, 70), lambda leaf: leaf[:, :27] * 1.0, target, False),  # contiguous product
        ((30, 70), lambda leaf: (leaf * 1.0)[:, :27], target, False),  # row stride 70: read in place
        ((30, 30), lambda leaf: (leaf * 1.0)[:27].t(), target, False),  # column stride 30: copied
        ((5, 27, 3), lambda leaf: leaf * 1.0, torch.randint(0, 27, (5, 3), device=DEVICE), True),
    ]
    for shape, make_logits, y, inplace in cases:
        x = torch.randn(shape, device=DEVICE)
        leaf, ref_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        logits = make_logits(leaf)
        saved = logits.detach().clone()
        loss = fused_ops.cross_entropy(
            logits, y, reduction="none", label_smoothing=0.1, inplace_backward=inplace
        )
        loss.backward(torch.ones_like(loss))
        ref = F.cross_entropy(make_logits(ref_leaf), y, reduction="none", label_smoothing=0.1)
        ref.backward(torch.ones_like(ref))
        if inplace:
            assert torch.equal(logits.detach(), saved)
        torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_second_backward_raises():
    x = torch.randn(8, 27, device=DEVICE, requires_grad=True)
    loss = fused_ops.cross_entropy(x, torch.randint(0, 27, (8,), device=DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# ----------------------------------------------------------------------------------------------------
# GPU: full shapes, no syncs, CUDA graphs, 64-bit offsets.
# ----------------------------------------------------------------------------------------------------
# (32, 27) is makemore; C = 1000 fits a 4-row tile; 32000, 50257, 128256 and 262144 are LLM vocabularies
# (two-sweep rung), the last two with rows far longer than a tile.
GPU_SHAPES = [(32, 27), (8192, 1000), (4096, 32000), (4096, 50257), (1024, 128256), (256, 262144)]
GPU_DTYPES = [(torch.float32, 1e-5), *LOW_PRECISION]  # (dtype, tol) as LOW_PRECISION


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, tol", GPU_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.usefixtures("triton_backend")
def test_gpu_against_torch_error(shape, dtype, tol, reduction):
    x, target = make_inputs(shape, "index", dtype=dtype)
    weight = torch.rand(shape[1], device="cuda") + 0.5
    check_against_torch_error(x, target, tol, weight=weight, reduction=reduction, label_smoothing=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 32000), (512, 50257)], ids=str)
@pytest.mark.usefixtures("triton_backend")
def test_gpu_probability_targets(shape):
    x, target = make_inputs(shape, "prob", dtype=torch.bfloat16)
    check_against_torch_error(x, target, LOW_PRECISION[0][1], label_smoothing=0.1)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_no_host_sync_and_cuda_graph():
    x = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 32000, (4096,), device="cuda")
    target[::7] = -100
    fused_ops.cross_entropy(x, target).backward()  # compile outside sync checking
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_ops.cross_entropy(x, target, label_smoothing=0.1).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = x.grad.clone()

    static_x = x.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up on a side stream, as CUDA graph capture requires
            static_x.grad = None
            fused_ops.cross_entropy(static_x, target, label_smoothing=0.1).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = fused_ops.cross_entropy(static_x, target, label_smoothing=0.1)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_x.grad, expected)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_out_of_range_target_is_nan_and_context_survives():
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    target[5] = 5000
    loss = fused_ops.cross_entropy(x, target, reduction="none")
    loss.sum().backward()
    assert loss[5].isnan() and not loss[4].isnan() and x.grad[5].isnan().all()
    with pytest.raises(IndexError, match="target"):
        fused_ops.cross_entropy(x, target, validate=True)
    assert torch.ones(1, device="cuda").add(1).item() == 2  # the context is still usable


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_deterministic():
    x, target = make_inputs((8192, 50257), "index", dtype=torch.bfloat16)
    first = run(x, target, label_smoothing=0.1)
    second = run(x, target, label_smoothing=0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_64bit_offsets():
    """N x C >= 2^31 elements: rows past 2^31 / C are only reachable with 64-bit offsets."""
    rows, classes = 16400, 131072  # 2.15e9 elements
    need = 3 * rows * classes * 2 + (1 << 30)  # bf16 logits, gradient, a possible copy of it, slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, classes, (rows,), device="cuda")
    loss = fused_ops.cross_entropy(x, target, reduction="none")
    loss.backward(torch.ones_like(loss))
    tail = slice(rows - 4, rows)  # past element 2^31
    ref, ref_grad = run_torch(x.detach()[tail].float(), target[tail], reduction="none")
    torch.testing.assert_close(loss[tail].float(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(x.grad[tail].float(), ref_grad, atol=1e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.interpreter
@needs_kernels
def test_subnormal_label_smoothing_and_z_loss(dtype):
    """Found by tests/test_fuzz.py: label_smoothing=1e-39 (an fp32 subnormal) gave a loss of 0 for bf16
    logits under the interpreter. Subnormal scalars act as 0 on the Triton path (fp32 arithmetic)."""
    x = torch.tensor([[1.5391, -0.2930]], device=DEVICE).to(dtype)
    target = torch.tensor([0], device=DEVICE)
    expected = fused_ops.cross_entropy(x, target)
    assert expected.item() > 0.1
    for tiny in (1e-39, 5e-324):
        torch.testing.assert_close(fused_ops.cross_entropy(x, target, label_smoothing=tiny), expected)
        torch.testing.assert_close(fused_ops.cross_entropy(x, target, z_loss=tiny), expected)
