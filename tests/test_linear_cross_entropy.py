"""fused_ops.linear_cross_entropy and LinearCrossEntropyLoss against F.cross_entropy(F.linear(...)).

The PyTorch path (use_backend("torch")) in float64 over the option grid, with chunk sizes that do and
do not divide the rows; gradcheck; low precision against torch's own error; autocast, torch.compile,
repeated backward, memory that does not grow with the rows, bad input; the module against torch 2.13's
nn.LinearCrossEntropyLoss; and the Triton cross-entropy pass through the interpreter. Gradients are
read from .grad after .backward().
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_ops
from bench.profiling import observe
from fused_ops.backend import native_available, triton_interpreter_enabled
from fused_ops.linear_cross_entropy import CHUNK_BYTES, default_chunk_size

# V = 29: odd, so no chunk or block divides it. H = 6. Rows: 13 (prime: chunk sizes 4 and 5 leave a
# remainder, 1 is the smallest chunk, 13 one chunk, 64 more than the rows).
HIDDEN, VOCAB, ROWS = 6, 29, 13
CHUNKS = [1, 4, 13, 64, None]
# (target kind, ignore_index): index targets with ignored rows (ignore_index outside and inside [0, V)),
# int32 and uint8 indices, and class probabilities.
TARGETS = [("int64", -100), ("int64", 2), ("int32", -100), ("uint8", 2), ("prob", -100)]
HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")  # torch >= 2.13


@pytest.fixture(autouse=True)
def torch_backend():
    with fused_ops.use_backend("torch"):
        yield


def make_inputs(batch=(ROWS,), hidden=HIDDEN, vocab=VOCAB, dtype=torch.float64, bias=True):
    """(input (*batch, H), linear_weight (V, H), linear_bias (V,) or None), leaves requiring grad."""
    x = torch.randn(*batch, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5 * 3
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    return tuple(None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b))


def make_target(batch, kind: str, ignore_index: int = -100, vocab: int = VOCAB) -> torch.Tensor:
    """Index targets with about a third of the rows ignore_index, or probabilities (*batch, V)."""
    if kind == "prob":
        return torch.softmax(torch.randn(*batch, vocab, dtype=torch.float64) * 2, dim=-1)
    target = torch.randint(0, vocab, batch)
    target[torch.rand(batch) < 0.33] = ignore_index
    return target.to({"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[kind])


def eager(x, w, target, b=None, **kwargs):
    """The unfused reference: F.linear, then F.cross_entropy on (M, V) rows (fused_ops.cross_entropy when
    an option torch lacks is asked for), reshaped for "none"."""
    logits = F.linear(x, w, b).flatten(0, -2)
    rows = target.flatten(0, -2) if target.is_floating_point() else target.flatten().long()
    if kwargs.get("z_loss") or kwargs.get("softcap") is not None:
        loss = fused_ops.cross_entropy(logits, rows, **kwargs)
    else:
        loss = F.cross_entropy(logits, rows, **kwargs)
    return loss.view(x.shape[:-1]) if kwargs.get("reduction") == "none" else loss


def grads_of(fn, tensors, upstream=None):
    """(loss, [t.grad for t in tensors]) after fn().backward(upstream), from fresh .grad."""
    for t in tensors:
        if t is not None:
            t.grad = None
    loss = fn()
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), [None if t is None else t.grad for t in tensors]


def assert_matches_eager(kwargs, x, w, b, target, chunk_size=None, atol=1e-10, rtol=1e-9):
    upstream = torch.rand(x.shape[:-1], dtype=x.dtype) + 0.5 if kwargs.get("reduction") == "none" else None
    ours, our_grads = grads_of(
        lambda: fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk_size, **kwargs),
        (x, w, b),
        upstream,
    )
    ref, ref_grads = grads_of(lambda: eager(x, w, target, b, **kwargs), (x, w, b), upstream)
    where = f"{kwargs}, chunk_size={chunk_size}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, equal_nan=True, msg=where)
    for name, got, expected in zip(("dX", "dW", "db"), our_grads, ref_grads, strict=True):
        if expected is None:
            assert got is None, (name, where)
            continue
        assert got.dtype == expected.dtype, (name, where)
        torch.testing.assert_close(
            got, expected, atol=atol, rtol=rtol, equal_nan=True, msg=f"{name}: {where}"
        )


# ----------------------------------------------------------------------------------------------------
# float64 over the option grid.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("kind, ignore_index", TARGETS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_eager_over_grid(reduction, kind, ignore_index, chunk_size):
    for use_weight, smoothing, bias in itertools.product([False, True], [0.0, 0.3], [False, True]):
        x, w, b = make_inputs(bias=bias)
        target = make_target((ROWS,), kind, ignore_index)
        weight = torch.rand(VOCAB, dtype=torch.float64) + 0.2 if use_weight else None
        kwargs = {
            "weight": weight,
            "ignore_index": ignore_index,
            "reduction": reduction,
            "label_smoothing": smoothing,
        }
        assert_matches_eager(kwargs, x, w, b, target, chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss, softcap", [(1e-2, None), (0.0, 2.5), (1e-2, 2.5)])
@pytest.mark.parametrize("kind", ["int64", "prob"])
def test_z_loss_and_softcap_match_cross_entropy(reduction, z_loss, softcap, kind):
    """torch has neither option: the reference is fused_ops.cross_entropy of F.linear's logits."""
    x, w, b = make_inputs()
    target = make_target((ROWS,), kind)
    weight = torch.rand(VOCAB, dtype=torch.float64) + 0.2
    kwargs = {
        "weight": weight,
        "reduction": reduction,
        "label_smoothing": 0.1,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    assert_matches_eager(kwargs, x, w, b, target, chunk_size=4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["int64", "prob"])
def test_batch_time_hidden_input(reduction, kind):
    """(B, T, H) input with a (B, T) target, or (B, T, V) probabilities; "none" returns (B, T)."""
    x, w, b = make_inputs(batch=(3, 5))
    target = make_target((3, 5), kind)
    loss = fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction)
    assert loss.shape == ((3, 5) if reduction == "none" else ())
    assert_matches_eager({"reduction": reduction, "label_smoothing": 0.2}, x, w, b, target, chunk_size=4)


def test_non_contiguous_input_and_weight():
    """A strided view of the hidden states and a transposed (tied-embedding style) weight."""
    x, w, _ = make_inputs(batch=(ROWS, 2))
    w_t = w.detach().t().contiguous().requires_grad_()  # (H, V): the head is its transpose
    target = make_target((ROWS,), "int64")
    ours = grads_of(lambda: fused_ops.linear_cross_entropy(x[:, 1], w_t.t(), target, chunk_size=4), (x, w_t))
    ref = grads_of(lambda: eager(x[:, 1], w_t.t(), target), (x, w_t))
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["int64", "prob"])
def test_gradcheck(reduction, kind):
    x, w, b = make_inputs(batch=(7,))
    target = make_target((7,), kind)
    weight = torch.rand(VOCAB, dtype=torch.float64) + 0.2

    def fn(x, w, b):
        return fused_ops.linear_cross_entropy(
            x, w, target, linear_bias=b, weight=weight, reduction=reduction, label_smoothing=0.1,
            z_loss=1e-2, softcap=3.0, chunk_size=3,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, w, b))


# ----------------------------------------------------------------------------------------------------
# Edge cases.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("chunk_size", [4, 64], ids=["chunks", "one_chunk"])
def test_all_ignored_and_empty_batches(reduction, smoothing, chunk_size):
    """torch: "mean" over nothing is nan, with zero gradients; an empty batch likewise. one_chunk: the
    chunk's cross-entropy call reduces itself (regression: an empty batch gave 0, not nan, there)."""
    for rows in (ROWS, 0):
        x, w, b = make_inputs(batch=(rows,))
        target = torch.full((rows,), -100)
        kwargs = {"reduction": reduction, "label_smoothing": smoothing}
        assert_matches_eager(kwargs, x, w, b, target, chunk_size)


@pytest.mark.parametrize("chunk_size", [4, 64], ids=["chunks", "one_chunk"])
def test_zero_weight_classes_give_torch_nan(chunk_size):
    """Every counted row's class has weight 0: "mean" is 0 / 0, nan in the loss and the counted rows."""
    x, w, b = make_inputs()
    target = make_target((ROWS,), "int64")
    weight = torch.rand(VOCAB, dtype=torch.float64) + 0.2
    weight[target[target >= 0]] = 0.0
    assert_matches_eager({"weight": weight}, x, w, b, target, chunk_size=chunk_size)


@pytest.mark.parametrize("frozen", ["linear_weight", "input", "bias", "input+bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_only_what_requires_grad_is_computed(frozen, reduction):
    """A frozen head costs no dW matmul: counted from the profiler, with the gradients still right."""
    x, w, b = make_inputs()
    for name, t in (("input", x), ("linear_weight", w), ("bias", b)):
        if name in frozen.split("+"):
            t.requires_grad_(False)
    target = make_target((ROWS,), "int64")
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    assert_matches_eager(kwargs, x, w, b, target, chunk_size=5)
    upstream = torch.rand(ROWS, dtype=x.dtype) if reduction == "none" else None
    with torch.profiler.profile() as prof:
        grads_of(lambda: fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=5, **kwargs),
                 (x, w, b), upstream)  # fmt: skip
    matmuls = sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::addmm_"))
    chunks = 3
    per_chunk = 1 + x.requires_grad + w.requires_grad  # logits, dX, dW
    # "none" with dW or db recomputes the logits in the backward; with dX only it stores dX like "mean"
    recomputes = reduction == "none" and (w.requires_grad or b.requires_grad)
    assert matmuls == chunks * (per_chunk + recomputes), matmuls


def test_no_grad_forward_and_retain_graph():
    """Under no_grad: the loss alone. A second backward through a retained graph recomputes, and gives
    the gradients again (scaled by its own grad_output)."""
    x, w, b = make_inputs()
    target = make_target((ROWS,), "int64")
    with torch.no_grad():
        loss = fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, eager(x, w, target, b).detach())
    loss = fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w, b), torch.tensor(3.0, dtype=x.dtype))
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(c, 3 * a)


def test_double_backward_raises():
    x, w, b = make_inputs()
    loss = fused_ops.linear_cross_entropy(x, w, make_target((ROWS,), "int64"), linear_bias=b)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


# ----------------------------------------------------------------------------------------------------
# Low precision, autocast, torch.compile.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)], ids=str
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_within_torch_error(dtype, atol, reduction):
    """err(ours) <= 2 * err(torch) + atol, both against the float64 reference, for loss, dX, dW, db;
    the gradients come back in the inputs' dtype."""
    x64, w64, b64 = make_inputs(batch=(64,), hidden=32, vocab=1001)
    target = make_target((64,), "int64", vocab=1001)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    upstream = torch.rand(64, dtype=torch.float64) + 0.5 if reduction == "none" else None
    ref, ref_grads = grads_of(lambda: eager(x64, w64, target, b64, **kwargs), (x64, w64, b64), upstream)
    x, w, b = (t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64))
    up = None if upstream is None else upstream.to(dtype)
    ours, our_grads = grads_of(
        lambda: fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=24, **kwargs),
        (x, w, b),
        up,
    )
    theirs, their_grads = grads_of(lambda: eager(x, w, target, b, **kwargs), (x, w, b), up)
    assert ours.dtype == dtype and all(g.dtype == dtype for g in our_grads)
    for name, got, torch_got, expected in zip(
        ("loss", "dX", "dW", "db"), (ours, *our_grads), (theirs, *their_grads), (ref, *ref_grads), strict=True
    ):
        err = (got.double() - expected).abs().max().item()
        torch_err = (torch_got.double() - expected).abs().max().item()
        assert err <= 2 * torch_err + atol, (name, err, torch_err)


def test_autocast_matches_eager_autocast():
    """Under CPU autocast (bfloat16): bfloat16 matmuls, a float32 loss, float32 parameter gradients."""
    x, w, b = (t.detach().float().requires_grad_() for t in make_inputs(batch=(32,), hidden=16, vocab=101))
    target = make_target((32,), "int64", vocab=101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads = grads_of(
            lambda: fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=10), (x, w, b)
        )
        theirs, their_grads = grads_of(lambda: eager(x, w, target, b), (x, w, b))
    ref, ref_grads = grads_of(lambda: eager(x.double(), w.double(), target, b.double()), (x, w, b))
    assert ours.dtype == theirs.dtype == torch.float32
    for got, torch_got, expected in zip(
        (ours, *our_grads), (theirs, *their_grads), (ref, *ref_grads), strict=True
    ):
        assert got.dtype == torch_got.dtype
        err = (got.double() - expected.double()).abs().max().item()
        torch_err = (torch_got.double() - expected.double()).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, (err, torch_err)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_probabilities(dtype, backend):
    """Half input with probabilities in its dtype: on CPU each chunk's probabilities follow its logits to
    float32, as the native kernels require (the PyTorch path promotes them either way; found by the
    mutation pass, issue 11: the other tests run the PyTorch path)."""
    if backend == "native" and not native_available():
        pytest.skip("the native kernels cannot be built here")
    x64, w64, b64 = (t.detach() for t in make_inputs(batch=(16,), hidden=8, vocab=37))
    p64 = make_target((16,), "prob", vocab=37)
    x, w, b, p = (t.to(dtype) for t in (x64, w64, b64, p64))
    with fused_ops.use_backend(backend):
        ours = fused_ops.linear_cross_entropy(x, w, p, linear_bias=b)
    expected, theirs = eager(x64, w64, p64, b64), eager(x, w, p, b)
    assert ours.dtype == dtype
    assert (ours.double() - expected).abs() <= 2 * (theirs.double() - expected).abs() + 1e-2


def test_autocast_rounds_the_operands_to_its_dtype():
    """Under CPU autocast the matmuls take bfloat16 operands, as torch's do: the loss is float64 math on
    the rounded operands, to float32's precision. Ignoring CPU autocast computes in float32, more
    accurate than torch, which the error bound above cannot see (mutation pass, issue 11)."""
    x, w, b = torch.randn(32, 16), torch.randn(101, 16), torch.randn(101)
    target = make_target((32,), "int64", vocab=101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_ops.linear_cross_entropy(x, w, target, linear_bias=b)
    rounded = [t.bfloat16().double() for t in (x, w, b)]  # rounding these moves the loss by ~3e-3
    expected = F.cross_entropy(F.linear(rounded[0], rounded[1], rounded[2]), target)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.compile
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grads_by", ["backward", "autograd.grad"])
def test_compile_fullgraph_matches_eager(reduction, grads_by):
    """aot_eager traces as Inductor does (dynamo, AOTAutograd, the compiled backward); fullgraph: a graph
    break is an error. The range check becomes the fused_ops::check_targets op.

    Regressions: torch 2.11's compile gave all-zero gradients (the loss returned as an alias of an
    intermediate took a zero grad_output), and torch 2.13's dynamo rejected the in-place accumulators
    under autograd.grad (an intermediate aliasing an output)."""
    torch._dynamo.reset()
    x, w, b = make_inputs()
    target = make_target((ROWS,), "int64")

    def fn(x, w, b):
        return fused_ops.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=4
        )

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    upstream = torch.rand(ROWS, dtype=x.dtype) + 0.5 if reduction == "none" else None
    if grads_by == "backward":
        ours = grads_of(lambda: compiled(x, w, b), (x, w, b), upstream)[1]
        ref = grads_of(lambda: fn(x, w, b), (x, w, b), upstream)[1]
    else:
        ours, ref = (
            torch.autograd.grad(f(x, w, b), (x, w, b), upstream if reduction == "none" else None)
            for f in (compiled, fn)
        )
    assert all(g.abs().sum() > 0 for g in ref)
    torch.testing.assert_close(ours, ref)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# Memory.
# ----------------------------------------------------------------------------------------------------
def test_default_chunk_size_depends_on_vocabulary_not_rows():
    cpu = torch.device("cpu")
    assert default_chunk_size(8192, 32000, torch.float32, cpu) == 256  # 32 MiB of fp32 logits
    assert default_chunk_size(10**6, 32000, torch.float32, cpu) == 256
    assert default_chunk_size(100, 32000, torch.float32, cpu) == 100  # never more than the rows
    assert default_chunk_size(8192, 10**7, torch.float32, cpu) == 64  # at least 64 rows
    assert default_chunk_size(10**6, 128256, torch.bfloat16, torch.device("cuda")) == 2048
    assert default_chunk_size(10**6, 128256, torch.bfloat16, torch.device("meta")) == 2048  # else cuda's
    assert CHUNK_BYTES["cpu"] < CHUNK_BYTES["cuda"]


def _extra_peak_bytes(rows: int, chunk_size: int, reduction: str) -> int:
    """Peak bytes of one forward+backward beyond the gradients of input and linear_weight it returns."""
    hidden, vocab = 16, 4000
    x = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    target = torch.randint(0, vocab, (rows,))
    upstream = torch.ones(rows) if reduction == "none" else None

    def step():
        loss = fused_ops.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=chunk_size)
        loss.backward(upstream)

    peak, _ = observe(
        step, torch.device("cpu"), prepare=lambda: (setattr(x, "grad", None), setattr(w, "grad", None))
    )
    return peak - (x.numel() + w.numel()) * 4


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extra_memory_is_one_chunk_whatever_the_rows(reduction):
    """Beyond the gradients, the peak is a few (R, V) chunk buffers: the same for 4x the rows, and far
    below one (M, V) logits tensor."""
    chunk_bytes = 64 * 4000 * 4
    small, large = _extra_peak_bytes(256, 64, reduction), _extra_peak_bytes(1024, 64, reduction)
    assert large <= small + 1024 * 64, (small, large)  # + (M,)-sized vectors
    assert large <= 3 * chunk_bytes + 1024 * 16 * 4, large  # << 1024 x 4000 x 4 = 16 MB of logits


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ----------------------------------------------------------------------------------------------------
def _bad_cases():
    x, w, b = (t.detach() for t in make_inputs())
    t = make_target((ROWS,), "int64")
    return [
        ({"input": x[:, :4]}, ValueError, "linear_weight must have shape \\(V, H\\) with H = 4"),
        ({"linear_weight": w[:, None]}, ValueError, "linear_weight must have shape"),
        ({"linear_weight": w.float()}, TypeError, "linear_weight must have input's dtype"),
        ({"linear_bias": b[:5]}, ValueError, "linear_bias must have shape \\(V,\\) = \\(29,\\)"),
        ({"linear_bias": b.float()}, TypeError, "linear_bias must have input's dtype"),
        ({"target": t.double()}, ValueError, "a probability target .* must have shape \\(\\*, V\\)"),
        (
            {"target": t.float()[:, None].expand(ROWS, VOCAB)},
            TypeError,
            "probability target must have the input's dtype",
        ),
        ({"target": t[:5]}, ValueError, "an index target must have input's batch shape \\(13,\\)"),
        ({"target": t.to(torch.int16)}, TypeError, "target must hold class indices"),
        ({"target": torch.full((ROWS,), VOCAB)}, IndexError, "target holds 29, outside \\[0, 29\\)"),
        ({"target": torch.full((ROWS,), -1)}, IndexError, "target holds -1"),
        ({"weight": torch.ones(5, dtype=x.dtype)}, ValueError, "weight must have shape \\(C,\\) = \\(29,\\)"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in \\[0, 1\\]"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or an int >= 1"),
        ({"z_loss": -1.0}, ValueError, "z_loss must be a finite float >= 0"),
        ({"softcap": 0.0}, ValueError, "softcap must be a finite float > 0"),
        ({"input": x.int()}, TypeError, "input must be float16, bfloat16, float32 or float64"),
        ({"input": "x"}, TypeError, "input must be a Tensor"),
    ]


@pytest.mark.parametrize(
    "override, error, match",
    _bad_cases(),
    # ids from the argument and the error, not the values: a tensor's repr is no test id
    ids=[f"{next(iter(o))}-{e.__name__}-{i}" for i, (o, e, _) in enumerate(_bad_cases())],
)
def test_bad_input_raises_naming_the_argument(override, error, match):
    x, w, b = (t.detach() for t in make_inputs())
    args = {"input": x, "linear_weight": w, "target": make_target((ROWS,), "int64"), "linear_bias": b}
    args.update(override)
    positional = [args.pop(name) for name in ("input", "linear_weight", "target")]
    with pytest.raises(error, match=f"linear_cross_entropy: .*{match}"):
        fused_ops.linear_cross_entropy(*positional, **args)


# ----------------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------------
needs_torch_linear_ce = pytest.mark.skipif(
    not HAS_LINEAR_CE, reason="torch < 2.13 has no F.linear_cross_entropy / nn.LinearCrossEntropyLoss"
)


@needs_torch_linear_ce
@pytest.mark.filterwarnings("error::UserWarning")  # torch's chunked path must not fall back to its reference
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_is_a_drop_in_for_torch(bias, reduction):
    """Same constructor and state_dict as nn.LinearCrossEntropyLoss; same loss and gradients as torch's
    reference and chunked paths (no label smoothing: torch's chunked path falls back without a warning
    only then)."""
    weight = torch.rand(VOCAB, dtype=torch.float64) + 0.2
    kwargs = {"bias": bias, "reduction": reduction, "weight": weight, "dtype": torch.float64}
    theirs = nn.LinearCrossEntropyLoss(HIDDEN, VOCAB, **kwargs)
    ours = fused_ops.LinearCrossEntropyLoss(HIDDEN, VOCAB, **kwargs, chunk_size=4)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(ROWS, HIDDEN, dtype=torch.float64, requires_grad=True)
    target = make_target((ROWS,), "int64")
    upstream = torch.rand(ROWS, dtype=x.dtype) if reduction == "none" else None
    params = (x, ours.linear.weight, ours.linear.bias)
    got = grads_of(lambda: ours(x, target), params, upstream)
    chunked = nn.LinearCrossEntropyLoss(HIDDEN, VOCAB, **kwargs, options=nn.LinearCrossEntropyOptions())
    chunked.load_state_dict(theirs.state_dict())
    for reference in (theirs, chunked):
        params = (x, reference.linear.weight, reference.linear.bias)
        expected = grads_of(lambda module=reference: module(x, target), params, upstream)
        torch.testing.assert_close(got, expected)


def test_module_options_and_repr():
    loss = fused_ops.LinearCrossEntropyLoss(HIDDEN, VOCAB, bias=True, z_loss=1e-3, softcap=30.0, chunk_size=8)
    assert loss.ignore_index is None and loss.out_features == ()  # torch's default; -100 when called
    assert "z_loss=0.001" in repr(loss) and "softcap=30.0" in repr(loss) and "chunk_size=8" in repr(loss)
    x = torch.randn(2, 3, HIDDEN)
    target = torch.randint(0, VOCAB, (2, 3))
    target[0, 0] = -100
    expected = eager(x, loss.linear.weight, target, loss.linear.bias, z_loss=1e-3, softcap=30.0)
    torch.testing.assert_close(loss(x, target), expected)
    with pytest.raises(ValueError, match="out_features=\\(4,\\)"):
        fused_ops.LinearCrossEntropyLoss(HIDDEN, VOCAB, out_features=(4,))
    with pytest.raises(ValueError, match="LinearCrossEntropyLoss: z_loss"):
        fused_ops.LinearCrossEntropyLoss(HIDDEN, VOCAB, z_loss=-1.0)


def test_module_passes_every_option_to_the_functional(monkeypatch):
    """The module is the functional with its options: a forward that dropped one (chunk_size, whose
    result differs only in rounding) went unnoticed by the numerical tests (mutation pass, issue 11)."""
    op_module = sys.modules["fused_ops.linear_cross_entropy"]  # fused_ops.linear_cross_entropy: the function
    calls = []
    monkeypatch.setattr(op_module, "linear_cross_entropy", lambda *args, **kwargs: calls.append(kwargs))
    options = {"reduction": "sum", "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0}
    options |= {"chunk_size": 8, "validate": True}
    loss = fused_ops.LinearCrossEntropyLoss(HIDDEN, VOCAB, weight=torch.rand(VOCAB), **options)
    loss(torch.randn(2, HIDDEN), torch.tensor([0, 1]))
    (kwargs,) = calls
    assert kwargs.pop("weight") is loss.weight
    assert kwargs == {"linear_bias": None, "process_group": None, **options}


@needs_torch_linear_ce
def test_module_takes_torch_options_chunk_size():
    loss = fused_ops.LinearCrossEntropyLoss(
        HIDDEN, VOCAB, options=nn.LinearCrossEntropyOptions(batch_chunk_size=5, chunking_method=None)
    )
    assert loss.chunk_size == 5


# ----------------------------------------------------------------------------------------------------
# The Triton cross-entropy pass, through the interpreter on CPU (the real kernels on a GPU).
# ----------------------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.interpreter
@pytest.mark.skipif(
    DEVICE == "cpu" and not triton_interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1"
)
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize(
    "reduction, kind, options",
    [
        ("mean", "int64", {"label_smoothing": 0.1}),
        ("sum", "prob", {}),
        ("none", "int64", {"z_loss": 1e-2, "softcap": 4.0}),  # recomputes in the backward
    ],
)
def test_triton_pass_matches_torch_path(reduction, kind, options):
    """Each chunk's cross-entropy on the Triton kernels, writing G over the chunk's logits, against the
    PyTorch path: fp32, V = 27 (one program per chunk), 3 chunks of 3 rows for 7."""
    x, w, b = (t.detach().float().to(DEVICE).requires_grad_() for t in make_inputs(batch=(7,), vocab=27))
    target = make_target((7,), kind, vocab=27).to(DEVICE)
    target = target.float() if kind == "prob" else target
    upstream = torch.rand(7, device=DEVICE) + 0.5 if reduction == "none" else None
    kwargs = {
        "reduction": reduction,
        "chunk_size": 3,
        "weight": torch.rand(27, device=DEVICE) + 0.2,
        **options,
    }
    results = {}
    for backend in ("triton", "torch"):
        with fused_ops.use_backend(backend):
            results[backend] = grads_of(
                lambda: fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs),
                (x, w, b),
                upstream,
            )
    torch.testing.assert_close(results["triton"], results["torch"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# GPU: the real kernels, half-precision matmuls with float32 accumulation, no host sync, CUDA graphs,
# Inductor, memory. Skipped without CUDA (marked gpu).
# ----------------------------------------------------------------------------------------------------
def _gpu_case(n=2048, h=256, v=32003, dtype=torch.bfloat16):
    """CUDA inputs; V = 32003 is odd (no block divides it) and above the single-pass kernel's 16384."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=generator) / h**0.5 * 4).to(dtype).requires_grad_()
    b = torch.randn(v, device="cuda", generator=generator).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda", generator=generator)
    target[::7] = -100
    return x, w, b, target


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float32, 1e-4)], ids=str
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_within_torch_error(dtype, atol, reduction):
    """Triton cross-entropy between cuBLAS matmuls; err(ours) <= 2 * err(eager) + atol against float64."""
    x, w, b, target = _gpu_case(dtype=dtype)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    upstream = torch.rand(x.shape[0], device="cuda") + 0.5 if reduction == "none" else None
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = grads_of(lambda: eager(x64, w64, target, b64, **kwargs), (x64, w64, b64), upstream)
    up = None if upstream is None else upstream.to(dtype)
    with fused_ops.use_backend("auto"):
        ours = grads_of(
            lambda: fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=768, **kwargs),
            (x, w, b),
            up,
        )
    theirs = grads_of(lambda: eager(x, w, target, b, **kwargs), (x, w, b), up)
    for got, torch_got, expected in zip(
        (ours[0], *ours[1]), (theirs[0], *theirs[1]), (ref[0], *ref[1]), strict=True
    ):
        assert got.dtype == torch_got.dtype
        err = (got.double() - expected).abs().max().item()
        torch_err = (torch_got.double() - expected).abs().max().item()
        assert err <= 2 * torch_err + atol, (err, torch_err)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph_replay():
    """Forward and backward issue no host sync, and capture in a CUDA graph that replays on new data."""
    x, w, b, target = _gpu_case()

    def step():
        x.grad = w.grad = b.grad = None
        loss = fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=512)
        loss.backward()
        return loss

    step()  # compile the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = w.grad = b.grad = None
    with torch.cuda.graph(graph):
        static_loss = fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=512)
        static_loss.backward()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        target.copy_(torch.randint_like(target, 0, w.shape[0]))
    graph.replay()
    replayed_loss, replayed_dx = static_loss.clone(), x.grad.clone()  # before eager resets .grad
    expected, expected_grads = grads_of(lambda: eager(x, w, target, b), (x, w, b))
    torch.testing.assert_close(replayed_loss, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(replayed_dx, expected_grads[0], atol=2e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_compile_inductor_matches_eager():
    """torch.compile(fullgraph=True) with Inductor: the Triton launches traced into the graph."""
    torch._dynamo.reset()
    x, w, b, target = _gpu_case(dtype=torch.float32)

    def fn(x, w, b):
        return fused_ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=512, z_loss=1e-4)

    compiled = torch.compile(fn, fullgraph=True)
    ours = grads_of(lambda: compiled(x, w, b), (x, w, b))
    ref = grads_of(lambda: fn(x, w, b), (x, w, b))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_peak_memory_is_one_chunk_plus_accumulators():
    """Beyond the returned gradients: one chunk's logits (the Triton pass writes G over them), the float32
    dX and dW accumulators, and allocator slack; far below eager's (N, V) buffers."""
    n, h, v, chunk = 8192, 1024, 32000, 1024
    x, w, _, target = _gpu_case(n, h, v)

    def call(fn):
        x.grad = w.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - (x.numel() + w.numel()) * 2

    ours = call(lambda: fused_ops.linear_cross_entropy(x, w, target, chunk_size=chunk))
    theirs = call(lambda: eager(x, w, target))
    bound = chunk * v * 2 * 2 + (n * h + v * h) * 4 + 64 * 2**20
    assert ours <= bound, (ours, bound)
    assert ours * 4 <= theirs, (ours, theirs)
