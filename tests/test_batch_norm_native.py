"""The native CPU BatchNorm (kernels/cpu/batch_norm.cpp), beyond the option grids that
tests/test_batch_norm.py and tests/test_batch_norm_nd.py run on both CPU backends: the ops themselves
(opcheck, their own argument checks), thread counts 1 and 2 on shapes that split into blocks and chunks
(and the same bits on either), every dtype against torch's own error, |mean| >> std, the fused tanh's
accuracy, non-finite values, reused buffers rewritten in full, and the autograd node (what it saves,
version counters, retained graphs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ops
from fused_ops.backend import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="the native kernels cannot be built here")

ACTIVATIONS = {None: lambda t: t, "relu": torch.relu, "tanh": torch.tanh, "silu": F.silu}
F32 = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def native_backend():
    with fused_ops.use_backend("native"):
        yield


def ops():
    from fused_ops.kernels.cpu import batch_norm as kernels

    return kernels


def make_case(shape, dtype=torch.float32, mean=3.0, std=2.0, residual=False, channels_last=False):
    """Fresh leaves for a batch_norm call: x (shape), weight, bias, running stats, residual, dy."""
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    case = {
        "x": x.to(dtype),
        "weight": (torch.rand(c) + 0.5).to(dtype),
        "bias": torch.randn(c).to(dtype),
        "running_mean": torch.randn(c).to(dtype),
        "running_var": (torch.rand(c) + 0.5).to(dtype),
        "residual": torch.randn_like(x).to(dtype) if residual else None,
        "dy": torch.randn_like(x).to(dtype),
    }
    return case


def run(case, backend="native", training=True, activation=None, unbiased=False, dtype=None):
    """y, the gradients of x, weight, bias (and residual), and the running stats after one step."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    leaves = {k: cast(case[k]).detach().clone().requires_grad_() for k in ("x", "weight", "bias")}
    if case["residual"] is not None:
        leaves["residual"] = cast(case["residual"]).detach().clone().requires_grad_()
    stats = [cast(case[k]).clone() for k in ("running_mean", "running_var")]
    with fused_ops.use_backend(backend):
        y = fused_ops.batch_norm(
            leaves["x"],
            *stats,
            leaves["weight"],
            leaves["bias"],
            training,
            0.3,
            activation=activation,
            unbiased=unbiased,
            residual=leaves.get("residual"),
        )
    y.backward(cast(case["dy"]))
    out = {"y": y.detach(), "running_mean": stats[0], "running_var": stats[1]}
    out.update({f"d{k}": v.grad for k, v in leaves.items()})
    return out


def assert_all_close(ours, ref, **tol):
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------------
# The ops.
# ----------------------------------------------------------------------------------------------------
def _opcheck_cases():
    rows = make_case((8, 5), residual=True)
    planes = make_case((3, 4, 6), dtype=torch.float64)
    half = make_case((6, 3), dtype=torch.bfloat16)
    w32, b32 = half["weight"].float(), half["bias"].float()
    grad = {"requires_grad": True}
    counter = torch.tensor(7)
    return {
        "rows, train, tanh, residual, counted": (
            rows["x"].requires_grad_(), rows["weight"].requires_grad_(), rows["bias"], rows["running_mean"],
            rows["running_var"], counter, rows["residual"].requires_grad_(), True, 2,
        ),
        "planes, eval, relu, fp64": (
            planes["x"].requires_grad_(), planes["weight"], planes["bias"], planes["running_mean"],
            planes["running_var"], None, None, False, 1,
        ),
        "planes, unbiased, no stats, silu": (
            torch.randn(2, 3, 5, **grad), None, None, None, None, None, None, True, 3, 0.1, None, 1e-3, True,
        ),
        "bf16 with fp32 params, momentum tensor": (
            half["x"].requires_grad_(), w32.requires_grad_(), b32, torch.zeros(3), torch.ones(3), None, None, True,
            0, 0.0, torch.tensor(0.25),
        ),
        "cumulative average (momentum None), counted": (
            half["x"].requires_grad_(), w32, b32, torch.zeros(3), torch.ones(3), counter, None, True, 0, None,
        ),
        "fp16 rows, silu, residual": (
            torch.randn(5, 4, dtype=torch.float16, **grad), None, None, None, None, None,
            torch.randn(5, 4, dtype=torch.float16, **grad), True, 3,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["batch_norm", "batch_norm_fwd"])
@pytest.mark.parametrize("case", _opcheck_cases().values(), ids=_opcheck_cases().keys())
def test_forward_ops_pass_opcheck(name, case):
    """Schema (the running stats' mutation declared), fake kernel, autograd registration, AOT dispatch."""
    op = getattr(torch.ops.fused_ops, name).default
    torch.library.opcheck(op, case)


@pytest.mark.parametrize("activation", [0, 1, 2, 3], ids=["none", "relu", "tanh", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 5), (3, 4, 6)], ids=str)
def test_backward_op_passes_opcheck(activation, training, shape):
    case = make_case(shape, residual=True)
    x, w, b, r = case["x"], case["weight"], case["bias"], case["residual"]
    y, mean, invstd = ops().batch_norm_fwd(x, w, b, case["running_mean"], case["running_var"], None, r, training,
                                           activation)  # fmt: skip
    for input_grad, residual_grad in ((True, True), (False, False)):
        args = (case["dy"], x, y, r, w, b, mean, invstd, training, False, activation, input_grad, residual_grad)
        torch.library.opcheck(ops().batch_norm_bwd, args)


def test_ops_check_their_arguments():
    """Called directly (not through fused_ops.batch_norm), the ops raise torch's exception types with
    the Python checker's wording, before anything (the running stats) is written."""
    x, rm, rv = torch.randn(6, 4), torch.zeros(4), torch.ones(4)
    bad = {
        "weight must have shape": ({"weight": torch.ones(3)}, ValueError),
        "bias must have dtype": ({"bias": torch.zeros(4, dtype=torch.float64)}, TypeError),
        "residual must have input's shape": ({"residual": torch.randn(6, 5)}, ValueError),
        "residual must have input's dtype": ({"residual": torch.randn(6, 4, dtype=torch.float64)}, TypeError),
        "running_mean and running_var must both": ({"running_var": None}, ValueError),
        "required in eval mode": ({"running_mean": None, "running_var": None, "training": False}, ValueError),
        "activation must be": ({"activation": 7}, ValueError),
        "more than 1 value per channel": ({"input": torch.randn(1, 4)}, ValueError),
        "flattened to": ({"input": torch.randn(2, 4, 3, 3)}, ValueError),
        "floating-point": ({"input": torch.ones(6, 4, dtype=torch.int64)}, TypeError),
        "momentum tensor must be a 0-dim": ({"momentum_tensor": torch.tensor([0.1])}, TypeError),
    }
    for match, (change, exc) in bad.items():
        args = {"input": x, "running_mean": rm, "running_var": rv, "training": True, **change}
        with pytest.raises(exc, match=match):
            ops().batch_norm(**args)
        assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)), match
    _, mean, invstd = ops().batch_norm_fwd(x, None, None, rm, rv, None, None, True, 2)
    with pytest.raises(ValueError, match="needs the forward's output"):
        ops().batch_norm_bwd(x, x, None, None, None, None, mean, invstd, True, False, 2, True, False)


def test_op_counts_batches_and_takes_the_cumulative_average():
    """num_batches_tracked: +1 per training call once the arguments pass (a version bump, as add_), and
    momentum None is then 1 / the new count, as torch's modules; a wrong counter changes nothing."""
    x, rm, rv, counter = torch.randn(10, 3), torch.randn(3), torch.rand(3) + 0.5, torch.tensor(3)
    before = rm.clone(), rv.clone()
    version = counter._version
    ops().batch_norm(x, None, None, rm, rv, counter, None, True, 0, None)
    assert counter.item() == 4 and counter._version == version + 1
    torch.testing.assert_close(rm, 0.75 * before[0] + 0.25 * x.mean(0))
    torch.testing.assert_close(rv, 0.75 * before[1] + 0.25 * x.var(0, unbiased=True))
    ops().batch_norm(x, None, None, rm, rv, counter, None, False, 0, None)  # counted whenever given (the
    # modules give it in training only)
    assert counter.item() == 5
    for bad in (torch.tensor(3.0), torch.tensor([3])):
        after = rm.clone(), rv.clone(), bad.clone()
        with pytest.raises(TypeError, match="num_batches_tracked must be a 0-dim int64"):
            ops().batch_norm(x, None, None, rm, rv, bad, None, True, 0, None)
        assert torch.equal(rm, after[0]) and torch.equal(rv, after[1]) and torch.equal(bad, after[2])


def test_fwd_op_returns_the_statistics_and_updates_the_running_stats():
    case = make_case((10, 3, 4))
    x, rm, rv = case["x"], case["running_mean"].clone(), case["running_var"].clone()
    versions = rm._version, rv._version
    y, mean, invstd = ops().batch_norm_fwd(x, None, None, rm, rv, None, None, True, 0, 0.3)
    torch.testing.assert_close(mean, x.mean((0, 2)))
    torch.testing.assert_close(invstd, (x.var((0, 2), unbiased=False) + 1e-5).rsqrt())
    torch.testing.assert_close(rm, 0.7 * case["running_mean"] + 0.3 * x.mean((0, 2)))
    torch.testing.assert_close(rv, 0.7 * case["running_var"] + 0.3 * x.var((0, 2), unbiased=True))
    assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)  # as an in-place op bumps them
    assert y.is_contiguous() and y.shape == x.shape


# ----------------------------------------------------------------------------------------------------
# Shapes that split: blocks (one task each), chunks merged within them, pieces of long rows.
# ----------------------------------------------------------------------------------------------------
# rows (3000, 100): 300,000 values, two blocks of 2,621 rows, chunks of 163 rows merged in each;
# rows (5, 40000): C > the 16,384-value chunk, so chunks of one row; planes (4, 3, 20000): rows longer
# than a chunk, cut into pieces; planes (600, 2, 50): 327 rows per chunk, two chunks per channel;
# channels_last (8, 16, 40, 40): 12,800 rows of 16 channels, the CNN layout.
SPLIT_SHAPES = {
    "rows 3000x100": ((3000, 100), False),
    "rows 5x40000": ((5, 40000), False),
    "planes 4x3x20000": ((4, 3, 20000), False),
    "planes 600x2x50": ((600, 2, 50), False),
    "channels_last 8x16x40x40": ((8, 16, 40, 40), True),
}


@pytest.mark.parametrize("name", list(SPLIT_SHAPES))
@pytest.mark.parametrize("activation", [None, "tanh", "silu"])
def test_matches_the_pytorch_path_with_1_and_2_threads(name, activation, threads):
    shape, channels_last = SPLIT_SHAPES[name]
    case = make_case(shape, residual=activation == "silu", channels_last=channels_last)
    assert_all_close(run(case, activation=activation), run(case, "torch", activation=activation), **F32)


@pytest.mark.parametrize("name", list(SPLIT_SHAPES))
def test_same_bits_whatever_the_thread_count(name):
    """The blocks, chunks and their merge order are fixed by the shape, not by the thread count."""
    shape, channels_last = SPLIT_SHAPES[name]
    case = make_case(shape, residual=True, channels_last=channels_last)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(case, activation="relu", unbiased=True)
        torch.set_num_threads(2)
        two = run(case, activation="relu", unbiased=True)
    finally:
        torch.set_num_threads(before)
    for k in one:
        assert torch.equal(one[k], two[k]), k


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_accurate_when_mean_dwarfs_std(layout):
    """|mean| = 1e4 * std, over several chunks: two passes per chunk and Chan's merge keep the error
    within twice torch's own float32 error."""
    shape = (4000, 8) if layout == "rows" else (40, 8, 500)
    case = make_case(shape, mean=1e4, std=1.0)
    exact = run(case, "torch", dtype=torch.float64)
    theirs = run(case, "torch")
    ours = run(case)
    for k in ("y", "dx", "dweight", "dbias", "running_var"):
        err_ours = (ours[k].double() - exact[k]).abs().max().item()
        err_torch = (theirs[k].double() - exact[k]).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-5, (k, err_ours, err_torch)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)], ids=str
)
@pytest.mark.parametrize("name", ["rows 3000x100", "planes 4x3x20000", "channels_last 8x16x40x40"])
@pytest.mark.parametrize("activation", ["tanh", "silu"])
def test_every_dtype_against_torchs_own_error(dtype, atol, name, activation):
    """err(ours) <= 2 * err(torch) + atol, both against float64, on shapes that split."""
    shape, channels_last = SPLIT_SHAPES[name]
    case = {
        k: None if v is None else v.to(dtype).double()  # values representable in dtype
        for k, v in make_case(shape, residual=True, channels_last=channels_last).items()
    }
    exact = run(case, "torch", activation=activation)
    ours = run(case, activation=activation, dtype=dtype)

    def unfused(x, rm, rv, w, b, residual):  # torch's own ops in dtype, fp32 statistics
        return ACTIVATIONS[activation](F.batch_norm(x, rm, rv, w, b, True, 0.3) + residual)

    leaves = [case[k].to(dtype).requires_grad_() for k in ("x", "weight", "bias", "residual")]
    stats = [case[k].to(dtype) for k in ("running_mean", "running_var")]
    y = unfused(leaves[0], *stats, leaves[1], leaves[2], leaves[3])
    y.backward(case["dy"].to(dtype))
    theirs = {"y": y.detach(), "dx": leaves[0].grad, "dweight": leaves[1].grad, "dbias": leaves[2].grad,
              "dresidual": leaves[3].grad}  # fmt: skip
    assert ours["y"].dtype == dtype
    for k, value in theirs.items():
        scale = exact[k].abs().max().item() + 1
        err_ours = (ours[k].double() - exact[k]).abs().max().item()
        err_torch = (value.double() - exact[k]).abs().max().item()
        assert err_ours <= 2 * err_torch + atol * scale, (k, err_ours, err_torch)


# ----------------------------------------------------------------------------------------------------
# The activations' arithmetic, and values where it must not matter.
# ----------------------------------------------------------------------------------------------------
def test_fused_tanh_is_within_2_ulp():
    """tanh of float32 (a formula with exp and a Taylor series near 0, kernels/cpu/batch_norm.cpp's
    tanh_float) against float64, on values from 1e-30 to 20 of both signs: within 2 ulp (torch's own
    tanh is within 1). In eval with running_mean 0, running_var 1 - eps and no affine, u is x itself."""
    magnitudes = torch.cat([torch.logspace(-30, 1.3, 20000, dtype=torch.float64), torch.rand(20000) * 10])
    x = torch.cat([magnitudes, -magnitudes]).float()[:, None]
    rm, rv = torch.zeros(1), torch.full((1,), 1 - 1e-5)
    y = fused_ops.batch_norm(x, rm, rv, activation="tanh")
    exact = torch.tanh(x.double())
    ulp = (torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))) - exact.float().abs()).double()
    assert ((y.double() - exact).abs() / ulp).max().item() <= 2.0
    assert torch.equal(y.sign(), x.sign())  # odd, and 0 only at 0


def test_non_finite_values_reach_their_channel_as_in_torch():
    """A nan or inf in a channel makes that channel's batch statistics (and output) nan, as torch's;
    the other channels are unaffected. relu and tanh keep nan as nan; tanh(+-inf) in eval is +-1."""
    x = torch.randn(6, 4)
    x[2, 1], x[4, 3] = float("nan"), float("inf")
    for activation in (None, "relu", "tanh", "silu"):
        ours = fused_ops.batch_norm(x, None, None, training=True, activation=activation)
        with fused_ops.use_backend("torch"):
            ref = fused_ops.batch_norm(x, None, None, training=True, activation=activation)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        assert ours[:, [1, 3]].isnan().all() and ours[:, [0, 2]].isfinite().all()
    x = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.5]])
    y = fused_ops.batch_norm(x, torch.zeros(4), torch.ones(4), activation="tanh")
    torch.testing.assert_close(y, torch.tanh(x / (1 + 1e-5) ** 0.5), equal_nan=True)


def test_reused_buffers_are_rewritten_in_full():
    """Outputs of 1 MiB and more come from buffers that the previous step freed (common.h's
    ReusingAllocator, which keeps a few): every element must be written again, y and dx alike."""
    for channels_last in (False, True):
        for _ in range(2):  # the second step gets the first step's freed buffers
            case = make_case((16, 8, 48, 48), residual=True, channels_last=channels_last)
            assert_all_close(run(case, activation="silu"), run(case, "torch", activation="silu"), **F32)


# ----------------------------------------------------------------------------------------------------
# The autograd node.
# ----------------------------------------------------------------------------------------------------
def test_one_node_that_saves_what_the_function_saves():
    x = torch.randn(8, 5, requires_grad=True)
    w, b = torch.ones(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    y = fused_ops.batch_norm(x, None, None, w, b, training=True, activation="tanh")
    assert y.grad_fn.name() == "BatchNormBackward"
    assert {type(e[0]).__name__ for e in y.grad_fn.next_functions if e[0] is not None} == {"AccumulateGrad"}
    y.mul_(2)  # the saved output changed under the node: the backward must refuse it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_residual_gradient_and_partial_requires_grad():
    """dresidual is dy itself without an activation, g with one; only the inputs that require grad get
    one (x without grad: weight's alone)."""
    x, r, dy = torch.randn(8, 5), torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    w = torch.rand(5, requires_grad=True)
    fused_ops.batch_norm(x, None, None, w, None, training=True, residual=r).backward(dy)
    assert torch.equal(r.grad, dy)
    with fused_ops.use_backend("torch"):
        w_ref, r_ref = w.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
        fused_ops.batch_norm(x, None, None, w_ref, None, True, residual=r_ref, activation="silu").backward(dy)
    w.grad = r.grad = None
    fused_ops.batch_norm(x, None, None, w, None, training=True, residual=r, activation="silu").backward(dy)
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch.testing.assert_close(r.grad, r_ref.grad)


def test_retained_graph_backward_twice_and_fp32_params_of_half_input():
    x = torch.randn(8, 5, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(5, requires_grad=True)  # float32 beside bfloat16 input: its gradient stays float32
    y = fused_ops.batch_norm(x, None, None, w, None, training=True, activation="relu")
    y.sum().backward(retain_graph=True)
    first = x.grad.clone(), w.grad.clone()
    y.sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, 2 * first[0])
    torch.testing.assert_close(w.grad, 2 * first[1])


def test_no_grad_and_inference_mode_record_nothing():
    m = fused_ops.BatchNorm2d(3, activation="relu")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert m(x).grad_fn is None
    with torch.inference_mode():
        y = m(x)
    assert y.grad_fn is None and m.num_batches_tracked.item() == 2
