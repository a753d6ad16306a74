"""The native CPU cross-entropy (kernels/cpu/cross_entropy.cpp), beyond the option grids that
tests/test_cross_entropy.py and tests/test_cross_entropy_extras.py run on both CPU backends: the ops
themselves (opcheck), thread counts 1 and 2, long rows and every dtype against torch's own error,
ignored rows holding non-finite values, the backward's hand-over of the stored gradient, the reuse of
the gradient's memory, torch.compile, the backend's choice, and the build (cold, cached, failing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fused_ops
from fused_ops.backend import BackendUnavailableError, native_available, native_selected, select

pytestmark = pytest.mark.skipif(not native_available(), reason="the native kernels cannot be built here")


@pytest.fixture(autouse=True)
def native_backend():
    with fused_ops.use_backend("native"):
        yield


def ops():
    from fused_ops.kernels.cpu import cross_entropy as kernels

    return kernels


def loss_and_grad(fn, x, target, upstream=None, **kwargs):
    """(loss, x.grad) of fn(x, target, **kwargs).backward(upstream), on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf, target, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), leaf.grad


def torch_reference(x, target, **kwargs):
    return F.cross_entropy(x, target if target.is_floating_point() else target.long(), **kwargs)


def index_target(rows: int, classes: int, ignore_index: int = -100) -> torch.Tensor:
    target = torch.randint(0, classes, (rows,))
    target[torch.rand(rows) < 0.25] = ignore_index
    return target


# ----------------------------------------------------------------------------------------------------
# The ops.
# ----------------------------------------------------------------------------------------------------
def _opcheck_cases():
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 1, 3])
    return {
        "defaults": (x, y),
        "all options, none": (x, y, torch.rand(5), -100, 0, 0.1, 0.01, 2.0, None),
        "(N, C, d), ignore_index 2": (torch.randn(3, 5, 4), torch.randint(0, 5, (3, 4)), None, 2, 0),
        "probabilities, mean": (x, torch.softmax(torch.randn(6, 5), 1), torch.rand(5), -100, 1, 0.2),
        "(C,), sum": (torch.randn(7, dtype=torch.float64), torch.tensor(3), None, -100, 2),
        "bfloat16, float32 loss": (
            torch.randn(6, 5, dtype=torch.bfloat16, requires_grad=True), y, None, -100, 1, 0.0, 0.0, None,
            torch.float32,
        ),
        "int32 targets, float16": (torch.randn(4, 9, dtype=torch.float16), y[:4].int(), None, -100, 1),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_fwd"])
@pytest.mark.parametrize("case", _opcheck_cases().values(), ids=_opcheck_cases().keys())
def test_ops_pass_opcheck(name, case):
    """Schema, fake kernel (shapes, dtypes, strides), autograd registration, AOT dispatch."""
    op = getattr(torch.ops.fused_ops, name).default
    torch.library.opcheck(op, case)


@pytest.mark.parametrize(
    "case",
    [
        (torch.randn(6, 5, requires_grad=True), torch.tensor([0, 4, -100, 2, 1, 3])),
        (torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 5, (3, 4))),
        (torch.randn(7, dtype=torch.bfloat16, requires_grad=True), torch.tensor(3)),
        (torch.randn(6, 5, requires_grad=True), torch.softmax(torch.randn(6, 5), 1)),
    ],
    ids=["(N, C) ignored row", "(N, C, d) float64", "(C,) bfloat16", "probabilities"],
)
def test_mean_op_is_the_default_call(case):
    """fused_ops::cross_entropy_mean (what cross_entropy's default-options call runs): opcheck, and the
    same loss and gradient bits as fused_ops::cross_entropy with its defaults."""
    torch.library.opcheck(ops().cross_entropy_mean, case)
    x, target = case
    results = []
    for op in (ops().cross_entropy_mean, ops().cross_entropy):
        leaf = x.detach().requires_grad_()
        loss = op(leaf, target)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_fwd_op_returns_the_unit_gradient_with_input_layout():
    x = torch.randn(3, 5, 4)
    target = torch.randint(0, 5, (3, 4))
    loss, grad = ops().cross_entropy_fwd(x, target, None, -100, 0, 0.1)
    ref, ref_grad = loss_and_grad(torch_reference, x, target, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert grad.shape == x.shape and grad.movedim(1, -1).is_contiguous()  # rows of C, class dim last


def test_ops_check_their_arguments():
    """Called directly (not through fused_ops.cross_entropy), the ops raise torch's exception types
    with the Python checker's messages, before anything is computed."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(IndexError, match="target holds 5"):
        ops().cross_entropy(x, torch.tensor([0, 5, 1, 1]))
    with pytest.raises(ValueError, match="reduction"):
        ops().cross_entropy(x, y, None, -100, 3)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops().cross_entropy(x, y, None, -100, 1, 1.5)
    with pytest.raises(ValueError, match="weight"):
        ops().cross_entropy(x, y, torch.rand(4))
    with pytest.raises(ValueError, match="batch size mismatch"):
        ops().cross_entropy(x, y[:3])
    with pytest.raises(ValueError, match="index target must have shape"):
        ops().cross_entropy(x, y[:, None])
    with pytest.raises(TypeError, match="input must be float16"):
        ops().cross_entropy(x.long(), y)
    with pytest.raises(TypeError, match=r"class indices need an integer dtype \(target.long\(\)\)"):
        ops().cross_entropy(x, y.float())
    with pytest.raises(TypeError, match=r"class indices need an integer dtype"):
        ops().cross_entropy(x[0], torch.tensor(1.0))  # (C,) input: the index shape is ()
    with pytest.raises(ValueError, match="softcap"):
        ops().cross_entropy(x, y, None, -100, 1, 0.0, 0.0, -1.0)


# ----------------------------------------------------------------------------------------------------
# Values and gradients: thread counts, long rows, dtypes.
# ----------------------------------------------------------------------------------------------------
# C = 1: a one-class row; 27: makemore (one 16-lane vector and a tail); 1000: many vectors, 8-lane tail;
# 32001: a row longer than L1, a 1-lane tail. (512, 1000) splits into 16 tasks of 32 rows.
SHAPES = [(64, 1), (300, 27), (512, 1000), (9, 32001)]


def assert_as_close_as_torch(ours, theirs, reference, atol: float) -> None:
    """err(ours) <= 2 * err(torch) + atol, the largest absolute errors against a float64 reference."""
    for a, b in zip(ours, theirs, strict=True):
        err_ours = (a.double() - reference[0]).abs().max().item() if a.numel() else 0.0
        err_torch = (b.double() - reference[0]).abs().max().item() if b.numel() else 0.0
        assert err_ours <= 2 * err_torch + atol, (err_ours, err_torch)
        reference = reference[1:]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_with_1_and_2_threads(shape, threads):
    rows, classes = shape
    x = torch.randn(shape) * 4
    target = index_target(rows, classes)
    weight = torch.rand(classes) + 0.5
    p = torch.softmax(torch.randn(shape), 1)
    for y, kwargs in (
        (target, {}),
        (target, {"weight": weight, "label_smoothing": 0.1, "reduction": "sum"}),
        (target.clamp_min(0), {"reduction": "none", "label_smoothing": 0.2, "ignore_index": 0}),
        (p, {"weight": weight, "label_smoothing": 0.1}),
    ):
        upstream = torch.randn(rows) if kwargs.get("reduction") == "none" else None
        ours = loss_and_grad(fused_ops.cross_entropy, x, y, upstream, **kwargs)
        theirs = loss_and_grad(torch_reference, x, y, upstream, **kwargs)
        ref_kwargs = {**kwargs, "weight": weight.double()} if "weight" in kwargs else kwargs
        reference = loss_and_grad(
            torch_reference, x.double(), y.double() if y.is_floating_point() else y,
            None if upstream is None else upstream.double(), **ref_kwargs,
        )  # fmt: skip
        assert_as_close_as_torch(ours, theirs, reference, atol=1e-6)


# Short rows (C < 1024) take their exps a block of up to 16 rows at a time (exp_block): C just below,
# at and above the vector widths (8 floats on AVX2, 16 on AVX512) and the 1024 switch to the per-row
# pass; 37 rows: two full blocks of 16 and a partial one (C = 1023: blocks of 4 rows, then 1).
@pytest.mark.parametrize("classes", [7, 8, 9, 15, 16, 17, 33, 1023, 1024])
def test_short_row_blocks_match_torch(classes):
    rows = 37
    x = torch.randn(rows, classes) * 4
    target = index_target(rows, classes)
    weight = torch.rand(classes) + 0.5
    p = torch.softmax(torch.randn(rows, classes), 1)
    for y, kwargs in (
        (target, {}),
        (target, {"weight": weight, "label_smoothing": 0.1, "reduction": "none"}),
        (p, {"weight": weight, "label_smoothing": 0.1}),
    ):
        ours = loss_and_grad(fused_ops.cross_entropy, x, y, **kwargs)
        theirs = loss_and_grad(torch_reference, x, y, **kwargs)
        ref_kwargs = {**kwargs, "weight": weight.double()} if "weight" in kwargs else kwargs
        reference = loss_and_grad(
            torch_reference, x.double(), y.double() if y.is_floating_point() else y, **ref_kwargs
        )
        assert_as_close_as_torch(ours, theirs, reference, atol=1e-6)
        with torch.no_grad():  # the loss alone (scratch exps, no gradient rows): the same bits
            assert torch.equal(fused_ops.cross_entropy(x, y, **kwargs), ours[0])


def test_same_bits_whatever_the_thread_count():
    """Each row is computed the same way on any thread, and rows are reduced in row order."""
    x = torch.randn(512, 1000) * 3
    target = index_target(512, 1000)
    results = []
    before = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.1))
    finally:
        torch.set_num_threads(before)
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and torch.equal(ga, gb)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


# (dtype, tol): err(ours) <= 2 * err(torch) + tol, both against float64 math on the same rounded input.
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 4e-3), (torch.float16, 5e-4), (torch.float64, 1e-14)]


@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shape", [(64, 27), (8, 32001)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_dtype_against_torchs_own_error(dtype, tol, shape, reduction):
    rows, classes = shape
    x = (torch.randn(shape) * 4).to(dtype)
    target = index_target(rows, classes)
    weight = torch.rand(classes) + 0.5
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    ref, ref_grad = loss_and_grad(torch_reference, x.double(), target, weight=weight.double(), **kwargs)
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, weight=weight, **kwargs)
    theirs, theirs_grad = loss_and_grad(torch_reference, x, target, weight=weight.to(dtype), **kwargs)
    assert ours.dtype == dtype and ours_grad.dtype == dtype
    for a, b, r in ((ours, theirs, ref), (ours_grad, theirs_grad, ref_grad)):
        err_ours, err_torch = relative_error(a, r), relative_error(b, r)
        assert err_ours <= 2 * err_torch + tol, (err_ours, err_torch)


@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan")], ids=["-inf", "inf", "nan"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_contribute_nothing_whatever_they_hold(fill, smoothing, reduction):
    """An ignored row is never read: its loss is 0 and its gradient row exactly 0, also where torch's
    log_softmax backward turns a whole non-finite row into a nan gradient row."""
    x = torch.randn(5, 7)
    x[1] = fill  # a whole row
    x[3, 2] = fill  # one logit
    target = torch.tensor([0, -100, 6, -100, 2])
    weight = torch.rand(7) + 0.5
    kwargs = {"weight": weight, "label_smoothing": smoothing, "reduction": reduction}
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, **kwargs)
    ref, ref_grad = loss_and_grad(torch_reference, x, target, **kwargs)
    torch.testing.assert_close(ours, ref)
    assert ours.isfinite().all()
    assert ours_grad[[1, 3]].eq(0).all()
    torch.testing.assert_close(ours_grad[[0, 2, 4]], ref_grad[[0, 2, 4]])


def test_non_finite_counted_rows_are_nan_like_torch():
    x = torch.randn(3, 40)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    target = torch.tensor([1, 2, 3])
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, reduction="none")
    ref, ref_grad = loss_and_grad(torch_reference, x, target, reduction="none")
    torch.testing.assert_close(ours, ref, equal_nan=True)
    torch.testing.assert_close(ours_grad, ref_grad, equal_nan=True)


# ----------------------------------------------------------------------------------------------------
# Autograd: one C++ node, the stored gradient handed over, retained graphs, no-grad modes.
# ----------------------------------------------------------------------------------------------------
def test_one_autograd_node_that_saves_only_the_gradient():
    x = torch.randn(8, 27, requires_grad=True)
    loss = fused_ops.cross_entropy(x, torch.randint(0, 27, (8,)))
    assert loss.grad_fn.name() == "CrossEntropyBackward"
    assert loss.grad_fn.next_functions[0][0].variable is x  # straight to x's AccumulateGrad


def test_backward_hands_over_the_stored_gradient_and_retained_graphs_still_work():
    x = torch.randn(8, 27)
    target = torch.randint(0, 27, (8,))
    _, ref_grad = loss_and_grad(torch_reference, x, target)
    leaf = x.clone().requires_grad_(True)
    loss = fused_ops.cross_entropy(leaf, target)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    first.mul_(100.0)  # the caller owns what it gets: the retained graph must not see this
    (second,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(second, ref_grad)
    leaf.grad = None
    fused_ops.cross_entropy(leaf, target).backward()
    torch.testing.assert_close(leaf.grad, ref_grad)
    with pytest.raises(RuntimeError, match="second time|already been freed"):
        loss.backward()


def test_no_grad_and_inference_mode_compute_the_loss_alone():
    x = torch.randn(8, 27, requires_grad=True)
    target = torch.randint(0, 27, (8,))
    expected = F.cross_entropy(x.detach(), target)
    with torch.no_grad():
        no_grad = fused_ops.cross_entropy(x, target)
    with torch.inference_mode():
        inference = fused_ops.cross_entropy(x.detach().clone(), target)
    assert not no_grad.requires_grad and no_grad.grad_fn is None
    torch.testing.assert_close(no_grad, expected)
    torch.testing.assert_close(inference, expected)


def test_gradient_memory_is_reused_and_fully_rewritten():
    """Gradients of 1 MiB and more: the last freed buffer serves the next call of its size, and the
    kernel writes all of it (ignored rows included), whatever the previous call left there."""
    x = torch.randn(64, 8192)  # 2 MiB of float32
    first = torch.randint(0, 8192, (64,))
    second = index_target(64, 8192)
    _, grad = ops().cross_entropy_fwd(x, first)
    address = grad.data_ptr()
    del grad  # back to the allocator, which keeps it
    loss, grad = ops().cross_entropy_fwd(x * 2, second, None, -100, 2, 0.1)
    assert grad.data_ptr() == address
    ref, ref_grad = loss_and_grad(torch_reference, x * 2, second, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    _, other = ops().cross_entropy_fwd(torch.randn(32, 8192), first[:32])
    assert other.data_ptr() != grad.data_ptr()


@pytest.mark.compile
# ----------------------------------------------------------------------------------------------------
# torch.compile: the ops trace (fake kernels), the C++ autograd is traced by AOTAutograd.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{}, {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3}], ids=str
)
def test_compiles_fullgraph_like_eager(kwargs):
    x = torch.randn(8, 27)
    target = torch.randint(0, 27, (8,))

    def step(x, target):
        return fused_ops.cross_entropy(x, target, **kwargs)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for upstream in (None, torch.randn(8) if kwargs else torch.tensor(0.5)):
        ours, ours_grad = loss_and_grad(compiled, x, target, upstream)
        eager, eager_grad = loss_and_grad(step, x, target, upstream)
        torch.testing.assert_close(ours, eager)
        torch.testing.assert_close(ours_grad, eager_grad)
    torch._dynamo.reset()


@pytest.mark.compile
def test_the_makemore_mlp_graph_calls_the_native_op():
    """Under "auto" (what tests/test_compile.py compiles with Inductor), dynamo's graph of a makemore
    forward holds the native ops: cross-entropy's and BatchNorm's."""
    from fused_ops.makemore.model import MLP

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = MLP(27, 3, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=capture, fullgraph=True)
    with fused_ops.use_backend("auto"):
        _, loss = compiled(torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,)))
    loss.backward()
    (graph,) = graphs
    assert "fused_ops.cross_entropy" in graph.code and "fused_ops.batch_norm" in graph.code
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# The backend's choice.
# ----------------------------------------------------------------------------------------------------
def test_auto_picks_native_for_cpu_tensors_of_ops_that_have_it():
    x = torch.randn(2, 3)
    with fused_ops.use_backend("auto"):
        assert select("cross_entropy", x, None) == "native"
        assert select("batch_norm", x) == "native"
        assert select("an_op_without_native_kernels", x) == "torch"


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_the_default_call_runs_the_native_op_only_where_select_picks_native(backend):
    """cross_entropy's default-options call skips `select`; `native_selected` (in backend.py, beside it)
    must agree with it: with "torch" asked for, no fused_ops op runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    x, target = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 4, -100])
    with fused_ops.use_backend(backend):
        assert native_selected("cross_entropy") == (select("cross_entropy", x, target) == "native")
        assert not native_selected("an_op_without_native_kernels")
        with Ops() as seen:
            fused_ops.cross_entropy(x, target)
    native = [name for name in seen.names if name.startswith("fused_ops::")]
    assert native == ([] if backend == "torch" else ["fused_ops::cross_entropy_fwd"])


def test_forcing_native_where_it_cannot_run_raises():
    with pytest.raises(BackendUnavailableError, match="an_op has no native CPU kernels"):
        select("an_op", torch.randn(4, 3))
    with pytest.raises(BackendUnavailableError, match="need CPU tensors"):
        fused_ops.batch_norm(torch.randn(4, 3, device="meta"), None, None, training=True)
    with pytest.raises(BackendUnavailableError, match="need CPU tensors"):
        fused_ops.cross_entropy(
            torch.randn(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
        )


# ----------------------------------------------------------------------------------------------------
# The build, in fresh processes with their own extension cache.
# ----------------------------------------------------------------------------------------------------
CALL = textwrap.dedent(
    """
    import warnings, torch, fused_ops
    warnings.simplefilter("always")
    x, y = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    {setup}
    with fused_ops.use_backend("{backend}"):
        loss = fused_ops.cross_entropy(x, y)
    loss.backward()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, y))
    print("loss ok")
    """
)


def run_python(code: str, cache, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_cold_build_prints_its_duration_then_loads_from_the_cache(tmp_path):
    cold = run_python(CALL.format(setup="", backend="native"), tmp_path)
    assert cold.returncode == 0, cold.stderr
    assert "fused_ops: building the native CPU kernels" in cold.stderr
    assert "fused_ops: built the native CPU kernels in " in cold.stderr
    cached = run_python(CALL.format(setup="", backend="native"), tmp_path)
    assert cached.returncode == 0, cached.stderr
    assert "building" not in cached.stderr and "loss ok" in cached.stdout
    assert list(tmp_path.rglob("complete"))  # the marker a finished build leaves


@pytest.mark.slow
def test_without_a_compiler_auto_warns_once_and_forcing_raises(tmp_path):
    no_compiler = {"CXX": str(tmp_path / "no-such-compiler")}
    auto = run_python(CALL.format(setup="", backend="auto") * 2, tmp_path, **no_compiler)
    assert auto.returncode == 0, auto.stderr
    assert auto.stderr.count("no C++ compiler found") == 1 and auto.stdout.count("loss ok") == 2
    forced = run_python(CALL.format(setup="", backend="native"), tmp_path, **no_compiler)
    assert forced.returncode != 0
    assert "BackendUnavailableError" in forced.stderr and "no C++ compiler found" in forced.stderr


@pytest.mark.slow
def test_a_compiler_error_is_raised_when_native_is_forced(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "broken.cpp").write_text("int main() { return undeclared_name; }\n")
    setup = f"import fused_ops.kernels.cpu.build as build; build.SOURCE_DIR = __import__('pathlib').Path({str(sources)!r})"
    forced = run_python(CALL.format(setup=setup, backend="native"), tmp_path / "cache")
    assert forced.returncode != 0
    assert "BackendUnavailableError" in forced.stderr and "undeclared_name" in forced.stderr
