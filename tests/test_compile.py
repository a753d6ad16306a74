"""torch.compile over the fused ops: whole graphs, eager's losses and gradients, bounded recompilation.

CPU tests run what "auto" picks for CPU tensors: the native kernels for cross-entropy and BatchNorm
(where they build; the PyTorch path otherwise). Inductor compiles C++ with the
system compiler, which takes many seconds on a small machine, so one test uses it (training steps of
the makemore MLP) and the option grids use "aot_eager": dynamo and AOTAutograd trace exactly as they
do for Inductor (graph breaks, guards, functionalisation, the compiled backward), and only the code
generation is skipped. GPU tests (marked gpu) compile the Triton path with Inductor.
Every compile uses fullgraph=True: a graph break is an error, not a silent fallback to eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import fused_ops
from fused_ops.backend import BackendUnavailableError, triton_available
from fused_ops.cross_entropy import checked_targets
from fused_ops.makemore.model import MLP

VOCAB, BLOCK_SIZE = 27, 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, so that its compile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_batch(batch: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, VOCAB, (batch, BLOCK_SIZE), device=device)
    return idx, torch.randint(0, VOCAB, (batch,), device=device)


def twin_models(device: str = "cpu") -> tuple[MLP, MLP]:
    """Two fused makemore MLPs with the same parameters: one to run eagerly, one to compile."""
    model = MLP(VOCAB, BLOCK_SIZE, generator=torch.Generator().manual_seed(1)).to(device)
    return model, copy.deepcopy(model)


def train(model: MLP, forward, batches, lr: float = 0.1) -> list[torch.Tensor]:
    """SGD steps of `forward(idx, targets) -> (logits, loss)` over `batches`; returns the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for idx, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        _, loss = forward(idx, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def assert_same_state(eager: MLP, compiled: MLP, **tolerance) -> None:
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, **tolerance, msg=lambda m, name=name: f"{name}.grad: {m}")


# ----------------------------------------------------------------------------------------------------
# The makemore MLP: Inductor, then dynamic batch sizes.
# ----------------------------------------------------------------------------------------------------
def test_mlp_training_matches_eager_with_inductor():
    """Three SGD steps: losses, gradients, parameters and running stats as eager; one graph."""
    eager, compiled = twin_models()
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(compiled, backend=counter, fullgraph=True)
    batches = [make_batch(32) for _ in range(3)]
    expected = train(eager, eager, batches)
    losses = train(compiled, step, batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected))
    assert not torch.equal(expected[0], expected[-1])  # the steps moved the model
    assert_same_state(eager, compiled)
    assert counter.frame_count == 1


@pytest.mark.parametrize("mark_dynamic", [True, False], ids=["mark_dynamic", "automatic"])
def test_changing_batch_size_does_not_recompile_each_time(mark_dynamic):
    """Batch sizes 32, 17, 50, 9, 23: one graph when the batch dim is marked dynamic; with dynamo's
    automatic dynamic shapes, one recompile (static first, then dynamic) and no more."""
    eager, compiled = twin_models()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled, backend=counter, fullgraph=True)
    for batch in (32, 17, 50, 9, 23):
        idx, targets = make_batch(batch)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(idx, 0)
            torch._dynamo.mark_dynamic(targets, 0)
        expected = train(eager, eager, [(idx, targets)])
        losses = train(compiled, step, [(idx, targets)])
        torch.testing.assert_close(losses, expected)
    assert_same_state(eager, compiled)
    assert counter.frame_count == (1 if mark_dynamic else 2)


def test_eval_and_no_grad_compile():
    """Inference: eval-mode BatchNorm (running stats) and a loss without a gradient."""
    eager, compiled = twin_models()
    train(eager, eager, [make_batch(32)])
    compiled.load_state_dict(eager.state_dict())
    eager.eval()
    compiled.eval()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    idx, targets = make_batch(20)
    with torch.no_grad():
        logits, loss = step(idx, targets)
        ref_logits, ref_loss = eager(idx, targets)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


# ----------------------------------------------------------------------------------------------------
# Option grids (aot_eager).
# ----------------------------------------------------------------------------------------------------
CE_CASES = {  # name: (logits shape, target kind, options)
    "mean": ((6, 5), "index", {}),
    "sum+weight": ((6, 5), "index", {"reduction": "sum", "weight": True}),
    "none+ignore": ((6, 5), "index", {"reduction": "none", "ignore_index": 2}),
    "smoothing+weight+ignore": (
        (6, 5),
        "index",
        {"label_smoothing": 0.1, "weight": True, "ignore_index": 1},
    ),
    "int32 targets": ((6, 5), "int32", {}),
    "kdim": ((4, 5, 3), "index", {"label_smoothing": 0.2}),
    "unbatched": ((5,), "index", {}),
    "probabilities": ((6, 5), "prob", {"label_smoothing": 0.1}),
}


def _ce_inputs(shape, kind, options):
    classes = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, requires_grad=True)
    if kind == "prob":
        target = torch.softmax(torch.randn(shape), dim=0 if len(shape) == 1 else 1)
    else:
        batch = () if len(shape) == 1 else shape[:1] + shape[2:]
        target = torch.randint(0, classes, batch, dtype=torch.int32 if kind == "int32" else torch.int64)
        if "ignore_index" in options and target.dim():
            target[0] = options["ignore_index"]
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(classes)
    return x, target, options


@pytest.mark.parametrize("case", CE_CASES.values(), ids=CE_CASES.keys())
def test_cross_entropy_compiles_like_eager(case):
    """Loss and gradient (from a random upstream gradient) as eager, which is itself torch's."""
    x, target, options = _ce_inputs(*case)

    def op(logits, target):
        return fused_ops.cross_entropy(logits, target, **options)

    ref = F.cross_entropy(x.detach(), target if target.is_floating_point() else target.long(), **options)
    upstream = torch.randn_like(ref)
    results = []
    for fn in (op, torch.compile(op, backend="aot_eager", fullgraph=True)):
        leaf = x.detach().clone().requires_grad_(True)
        loss = fn(leaf, target)
        loss.backward(upstream)
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[0][0], ref)


BN_CASES = {  # name: (input shape, module options, eval after training)
    "training": ((16, 12), {}, False),
    "tanh": ((16, 12), {"activation": "tanh"}, False),
    "relu, unbiased": ((16, 12), {"activation": "relu", "unbiased": True}, False),
    "momentum None": ((16, 12), {"momentum": None}, False),
    "no affine, no running stats": ((16, 12), {"affine": False, "track_running_stats": False}, False),
    "(N, C, L)": ((6, 12, 5), {}, False),
    "eval": ((16, 12), {"activation": "tanh"}, True),
}


@pytest.mark.parametrize("case", BN_CASES.values(), ids=BN_CASES.keys())
def test_batch_norm_module_compiles_like_eager(case):
    """Two steps: outputs, gradients of input and parameters, running stats and num_batches_tracked."""
    shape, options, eval_mode = case
    eager = fused_ops.BatchNorm1d(shape[1], **options)
    compiled = copy.deepcopy(eager)
    if eval_mode:
        warm_up = torch.randn(shape) * 2 + 1  # moves the running stats away from their initial values
        for module in (eager, compiled):
            module(warm_up)
            module.eval()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x, dy = torch.randn(shape) * 3 + 2, torch.randn(shape)
        outputs = []
        for fn in (eager, step):
            leaf = x.clone().requires_grad_(True)
            y = fn(leaf)
            y.backward(dy)
            outputs.append((y.detach(), leaf.grad))
        torch.testing.assert_close(outputs[1], outputs[0])
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad)


# (N, C, *) modules with the fused residual: (module class, input shape, memory format, options, eval after)
IMAGE, VOLUME = (4, 6, 5, 3), (2, 6, 3, 2, 2)
BN_ND_CASES = {
    "2d channels_last, relu": (
        fused_ops.BatchNorm2d, IMAGE, torch.channels_last, {"activation": "relu"}, False
    ),
    "2d nchw, unbiased, eval": (
        fused_ops.BatchNorm2d, IMAGE, torch.contiguous_format, {"unbiased": True, "activation": "tanh"}, True
    ),
    "3d channels_last_3d, silu, momentum None": (
        fused_ops.BatchNorm3d, VOLUME, torch.channels_last_3d, {"activation": "silu", "momentum": None}, False
    ),
    "sync single process, bias=False": (
        fused_ops.SyncBatchNorm, IMAGE, torch.channels_last, {"bias": False, "activation": "relu"}, False
    ),
}


@pytest.mark.parametrize("case", BN_ND_CASES.values(), ids=BN_ND_CASES.keys())
def test_nd_batch_norm_with_residual_compiles_like_eager(case):
    """forward(input, residual) and backward in one graph: outputs, their memory format, the gradients of
    input, residual and parameters, running stats and num_batches_tracked over two steps."""
    cls, shape, fmt, options, eval_mode = case
    eager = cls(shape[1], **options)
    compiled = copy.deepcopy(eager)
    if eval_mode:
        warm_up = torch.randn(shape) * 2 + 1
        for module in (eager, compiled):
            module(warm_up)
            module.eval()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = (torch.randn(shape) * 3 + 2).contiguous(memory_format=fmt)
        res = torch.randn(shape).contiguous(memory_format=fmt)
        dy = torch.randn(shape)
        outputs = []
        for fn in (eager, step):
            leaf, res_leaf = x.clone().requires_grad_(True), res.clone().requires_grad_(True)
            y = fn(leaf, residual=res_leaf)
            y.backward(dy)
            assert y.is_contiguous(memory_format=fmt)
            outputs.append((y.detach(), leaf.grad, res_leaf.grad))
        torch.testing.assert_close(outputs[1], outputs[0])
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad)


# ----------------------------------------------------------------------------------------------------
# What compile changes: the target check as a custom op, inplace_backward, the backend guard.
# ----------------------------------------------------------------------------------------------------
def test_out_of_range_target_raises_in_compiled_code():
    """The CPU range check is the custom op fused_ops::check_targets in the graph: same IndexError."""
    compiled = torch.compile(fused_ops.cross_entropy, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 5)
    target = torch.tensor([0, 4, -100, 2])
    torch.testing.assert_close(compiled(x, target), fused_ops.cross_entropy(x, target))
    with pytest.raises(IndexError, match="target holds 7"):
        compiled(x, torch.tensor([0, 7, -100, 2]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_check_targets_op_passes_opcheck(dtype):
    target = torch.tensor([0, 4, 1, 3, 3], dtype=dtype)
    torch.library.opcheck(checked_targets, (target, 5, -100))
    torch.testing.assert_close(checked_targets(target, 5, -100), target)
    with pytest.raises(IndexError, match="target holds 5"):
        checked_targets(torch.tensor([0, 5], dtype=dtype), 5, -100)


def test_inplace_backward_is_refused_under_compile():
    """The overwrite saves memory only in eager mode; compiled, it raises instead of copying quietly."""

    def loss_fn(h, w, target):
        return fused_ops.cross_entropy(h @ w, target, inplace_backward=True)

    h, w, target = torch.randn(4, 3), torch.randn(3, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with pytest.raises(Exception, match="eager-only") as info:
        torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(h, w, target)
    assert "eager-only" in _messages(info.value)


def test_use_backend_is_guarded():
    """Entering another backend recompiles rather than reusing a graph traced for the first one."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused_ops.cross_entropy, backend=counter, fullgraph=True)
    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with fused_ops.use_backend("torch"):
        compiled(x, target)
        compiled(x, target)
    assert counter.frame_count == 1
    with fused_ops.use_backend("auto"):
        compiled(x, target)
    assert counter.frame_count == 2


@pytest.mark.interpreter
def test_forced_triton_interpreter_is_refused_under_compile():
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine forced triton runs real kernels on CUDA tensors")
    compiled = torch.compile(fused_ops.cross_entropy, backend="aot_eager", fullgraph=True)
    with fused_ops.use_backend("triton"), pytest.raises(Exception) as info:
        compiled(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert isinstance(info.value, BackendUnavailableError) or "cannot trace" in _messages(info.value)


def _messages(exc: BaseException | None) -> str:
    """The text of an exception and of those it was raised from (dynamo wraps errors raised while tracing)."""
    text = []
    while exc is not None:
        text.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------------
# GPU: the Triton path under Inductor.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_dynamo_sees_the_triton_kernels():
    """The graph holds the user-defined Triton kernels (no graph break, no opaque op)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    model = MLP(VOCAB, BLOCK_SIZE).cuda()
    idx, targets = make_batch(32, "cuda")
    _, loss = torch.compile(model, backend=recording_backend, fullgraph=True)(idx, targets)
    loss.backward()
    code = "\n".join(graphs)
    # BatchNorm forward and backward, cross-entropy forward (its backward is a multiply, see
    # CrossEntropyFunction): one launch each at makemore's sizes.
    assert code.count("triton_kernel_wrapper") >= 3, code


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_training_matches_eager_on_cuda(dtype):
    """Triton kernels compiled into Inductor's graph: three SGD steps as eager, one graph."""
    if not triton_available():
        pytest.skip("triton is not installed")
    eager, compiled = twin_models("cuda")
    eager.to(dtype)
    compiled.to(dtype)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(compiled, backend=counter, fullgraph=True)
    batches = [make_batch(64, "cuda") for _ in range(3)]
    expected = train(eager, eager, batches)
    losses = train(compiled, step, batches)
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), **tolerance)
    state_tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else tolerance
    assert_same_state(eager, compiled, **state_tolerance)
    assert counter.frame_count == 1


@pytest.mark.gpu
def test_batch_sizes_recompile_per_power_of_two_bucket_on_cuda():
    """The Triton BatchNorm's block sizes depend on the batch size's power-of-two bucket, so a dynamic
    batch compiles once per bucket: 40, 50 and 64 share (32, 64]; 100 and 128 share (64, 128]."""
    if not triton_available():
        pytest.skip("triton is not installed")
    eager, compiled = twin_models("cuda")
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(compiled, backend=counter, fullgraph=True)
    for batch in (40, 50, 64, 100, 128):
        idx, targets = make_batch(batch, "cuda")
        torch._dynamo.mark_dynamic(idx, 0)
        torch._dynamo.mark_dynamic(targets, 0)
        expected = train(eager, eager, [(idx, targets)])
        torch.testing.assert_close(train(compiled, step, [(idx, targets)]), expected)
    assert counter.frame_count <= 2
