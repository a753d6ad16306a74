"""cross_entropy's z_loss and softcap options: the PyTorch path and the native CPU kernels against an
independent float64 autograd reference, the Triton kernels (interpreter on CPU) against the PyTorch
path, bad arguments, and the defaults leaving every result bit for bit as it was.

The reference: z = softcap * tanh(x / softcap) (or x), F.cross_entropy(z, ...) plus z_loss * lse_i^2
summed over counted rows (non-ignored; every row for probability targets), divided for "mean" by the
main term's denominator (sum_i w[y_i] over non-ignored rows, or M). Autograd differentiates it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ops
from fused_ops.backend import triton_interpreter_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1"
)

pytestmark = [
    # The interpreter evaluates masked-out lanes with numpy too (log(0), inf - inf); masks discard them.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

# (use_weight, label_smoothing, z_loss, softcap): each option alone, then with weights and smoothing.
OPTIONS = [(False, 0.0, 0.1, None), (False, 0.0, 0.0, 2.0), (True, 0.3, 0.05, 1.5), (True, 0.0, 0.2, 4.0)]


def num_classes(shape) -> int:
    return shape[0] if len(shape) == 1 else shape[1]


def make_target(shape, kind: str, ignore_index: int = -100, device: str = "cpu", dtype=torch.float64):
    """Probabilities of the input's shape, or class indices with ignore_index on every third row."""
    C = num_classes(shape)
    if kind == "prob":
        return torch.softmax(torch.randn(shape, device=device), dim=0 if len(shape) == 1 else 1).to(dtype)
    batch = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, C, batch, device=device)
    if target.dim():
        target.view(-1)[1::3] = ignore_index
    return target


def reference(
    x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """The loss written with torch ops only, for autograd to differentiate."""
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(
        z, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    lse = torch.logsumexp(z, dim=0 if x.dim() == 1 else 1)  # the target's batch shape
    if target.is_floating_point():
        counted = torch.ones_like(lse, dtype=torch.bool)
        denom = lse.numel()
    else:
        counted = target != ignore_index
        w_y = counted.to(x.dtype) if weight is None else torch.where(counted, weight[target.clamp(0)], 0.0)
        denom = w_y.sum()
    extra = torch.where(counted, z_loss * lse**2, 0.0)
    if reduction == "none":
        return loss + extra
    return loss + (extra.sum() if reduction == "sum" else extra.sum() / denom)


@pytest.fixture(params=["torch", "native"])
def cpu_backend(request):
    """The CPU tests run on both CPU backends: the PyTorch path and the native kernels."""
    with fused_ops.use_backend(request.param):
        yield request.param


def loss_and_grad(fn, x, target, upstream=None, **kwargs):
    """(loss, x.grad) of fn(x, target, **kwargs).backward(upstream), on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf, target, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------------
# The CPU backends against the float64 autograd reference.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (6, 5), (4, 5, 3)], ids=str)
@pytest.mark.parametrize("kind, ignore_index", [("int64", -100), ("int64", 2), ("prob", -100)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_backends_match_autograd_reference(shape, kind, ignore_index, reduction, cpu_backend):
    for use_weight, smoothing, z_loss, softcap in OPTIONS:
        x = torch.randn(shape, dtype=torch.float64) * 3
        target = make_target(shape, kind, ignore_index)
        weight = torch.rand(num_classes(shape), dtype=torch.float64) + 0.2 if use_weight else None
        kwargs = dict(
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        ref, ref_grad = loss_and_grad(reference, x, target, **kwargs)
        upstream = torch.randn(ref.shape, dtype=torch.float64)
        ref, ref_grad = loss_and_grad(reference, x, target, upstream, **kwargs)
        ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, upstream, **kwargs)
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(ours_grad, ref_grad, atol=1e-12, rtol=1e-10)
        # float32 logits: float32 statistics, same values to float32 precision
        x32, t32 = x.float(), target.float() if kind == "prob" else target
        w32 = None if weight is None else weight.float()
        ours32, grad32 = loss_and_grad(
            fused_ops.cross_entropy, x32, t32, upstream.float(), **{**kwargs, "weight": w32}
        )
        torch.testing.assert_close(ours32, ref.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad32, ref_grad.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(kind, reduction, cpu_backend):
    for shape, use_weight, smoothing, z_loss, softcap in [
        ((5, 4), True, 0.25, 0.1, 2.0),
        ((3, 4, 2), False, 0.0, 0.3, None),
        ((4, 6), False, 0.1, 0.0, 0.7),
    ]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        target = make_target(shape, "int64" if kind == "index" else "prob", ignore_index=1)
        weight = torch.rand(num_classes(shape), dtype=torch.float64) + 0.2 if use_weight else None
        ignore_index = 1 if kind == "index" else -100

        def fn(
            inp, target=target, weight=weight, ignore=ignore_index, eps=smoothing, zl=z_loss, sc=softcap
        ):
            return fused_ops.cross_entropy(
                inp, target, weight, ignore, reduction, eps, z_loss=zl, softcap=sc
            )

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_z_loss_is_lse_squared(cpu_backend):
    """The value itself: sum over non-ignored rows of z_loss * logsumexp^2, "mean" over the count."""
    x = torch.randn(6, 9, dtype=torch.float64)
    target = torch.tensor([0, 8, -100, 3, -100, 4])
    keep = target != -100
    base = fused_ops.cross_entropy(x, target)
    with_z = fused_ops.cross_entropy(x, target, z_loss=0.25)
    expected = 0.25 * (torch.logsumexp(x[keep], 1) ** 2).sum() / keep.sum()
    torch.testing.assert_close(with_z - base, expected, atol=1e-12, rtol=0)


def test_softcap_bounds_the_logits_and_keeps_minus_infinity_finite(cpu_backend):
    """A -inf logit is capped to -softcap (tanh(-inf) = -1), so smoothing stays finite, as the reference."""
    x = torch.randn(3, 6, dtype=torch.float64) * 100
    x[:, 4] = float("-inf")
    target = torch.tensor([0, 5, 2])
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.1, softcap=5.0)
    ref, ref_grad = loss_and_grad(reference, x, target, label_smoothing=0.1, softcap=5.0)
    assert ours.isfinite() and ours_grad.isfinite().all()
    assert ours_grad[:, 4].eq(0).all()  # d tanh / dx = 0 at -inf
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours_grad, ref_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["int64", "prob"])
def test_defaults_are_bitwise_unchanged(kind, cpu_backend):
    """z_loss=0.0 and softcap=None run the same code as not passing them: equal bit for bit."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = (torch.randn(33, 27) * 4).to(dtype)
        target = make_target((33, 27), kind, dtype=dtype)
        weight = torch.rand(27) + 0.2 if kind == "int64" else None
        for reduction in ("mean", "none"):
            kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}
            plain, plain_grad = loss_and_grad(fused_ops.cross_entropy, x, target, **kwargs)
            off, off_grad = loss_and_grad(
                fused_ops.cross_entropy, x, target, **kwargs, z_loss=0.0, softcap=None
            )
            assert torch.equal(plain, off) and torch.equal(plain_grad, off_grad)
            # ... which is torch's cross-entropy, and the options are live: each changes the result
            if dtype != torch.bfloat16:  # torch wants weight in input's dtype
                same = {**kwargs, "weight": None if weight is None else weight.to(dtype)}
                ref, ref_grad = loss_and_grad(F.cross_entropy, x, target, **same)
                torch.testing.assert_close(off, ref) and torch.testing.assert_close(off_grad, ref_grad)
            for option in ({"z_loss": 1e-3}, {"softcap": 30.0}):
                on, on_grad = loss_and_grad(fused_ops.cross_entropy, x, target, **kwargs, **option)
                assert not torch.equal(on, off) and not torch.equal(on_grad, off_grad), option


def test_inplace_backward_with_softcap_overwrites_logits_with_dx(cpu_backend):
    h, W = torch.randn(6, 8), torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    kwargs = {"label_smoothing": 0.1, "z_loss": 0.1, "softcap": 2.0}
    reference(h @ W, target, **kwargs).backward()
    ref_grad, W.grad = W.grad, None
    _, unit_grad = loss_and_grad(reference, (h @ W).detach(), target, **kwargs)
    logits = h @ W
    loss = fused_ops.cross_entropy(logits, target, inplace_backward=True, **kwargs)
    torch.testing.assert_close(logits.detach(), unit_grad)  # d(loss)/dx, through the tanh
    loss.backward()
    torch.testing.assert_close(W.grad, ref_grad)


def test_module_passes_the_options(cpu_backend):
    loss_fn = fused_ops.CrossEntropyLoss(label_smoothing=0.1, z_loss=0.01, softcap=30.0)
    assert "z_loss=0.01" in repr(loss_fn) and "softcap=30.0" in repr(loss_fn)
    assert "z_loss" not in repr(fused_ops.CrossEntropyLoss())
    x, target = torch.randn(6, 5) * 20, torch.tensor([0, 1, 3, 4, 2, -100])
    expected = fused_ops.cross_entropy(x, target, label_smoothing=0.1, z_loss=0.01, softcap=30.0)
    torch.testing.assert_close(loss_fn(x, target), expected, atol=0, rtol=0)


@pytest.mark.compile
def test_torch_compile_traces_the_options(cpu_backend):
    """fullgraph: no graph break from the options; aot_eager traces as Inductor would."""
    x = torch.randn(8, 27, requires_grad=True)
    target = torch.randint(0, 27, (8,))

    def step(x, target):
        return fused_ops.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-3, softcap=3.0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager, eager_grad = loss_and_grad(step, x, target)
    ours, ours_grad = loss_and_grad(compiled, x, target)
    torch.testing.assert_close(ours, eager)
    torch.testing.assert_close(ours_grad, eager_grad)


# ----------------------------------------------------------------------------------------------------
# Bad arguments: a clear exception naming the argument, before anything runs.
# ----------------------------------------------------------------------------------------------------
def _option_id(value) -> str:
    """A test id: {"z_loss": -0.1} -> "z_loss=-0.1". The stand-in process group is named, not printed:
    an object()'s repr holds its address, a new id on every collection, which no runner can select by."""
    if isinstance(value, dict):
        return ",".join(f"{k}={'object()' if k == 'process_group' else repr(v)}" for k, v in value.items())
    return getattr(value, "__name__", str(value))


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"z_loss": -0.1}, ValueError, "z_loss"),
        ({"z_loss": float("nan")}, ValueError, "z_loss"),
        ({"z_loss": float("inf")}, ValueError, "z_loss"),
        ({"z_loss": "0.1"}, TypeError, "z_loss"),
        ({"z_loss": True}, TypeError, "z_loss"),
        ({"z_loss": torch.tensor(0.1)}, TypeError, "z_loss"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softcap": -30.0}, ValueError, "softcap"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
        ({"softcap": "30"}, TypeError, "softcap"),
        ({"softcap": False}, TypeError, "softcap"),
        ({"z_loss": 1e-4, "process_group": object()}, ValueError, "process_group"),
        ({"softcap": 30.0, "process_group": object()}, ValueError, "process_group"),
    ],
    ids=_option_id,
)
def test_bad_options_raise_and_change_nothing(kwargs, error, fragment):
    logits = torch.randn(4, 5, requires_grad=True) * 1.0
    saved = logits.detach().clone()
    with pytest.raises(error, match=fragment):
        fused_ops.cross_entropy(logits, torch.tensor([0, 1, 4, -100]), inplace_backward=True, **kwargs)
    assert torch.equal(logits.detach(), saved)
    module_kwargs = {k: v for k, v in kwargs.items() if k != "process_group"}
    if "process_group" not in kwargs:
        with pytest.raises(error, match=fragment):
            fused_ops.CrossEntropyLoss(**module_kwargs)


# ----------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the PyTorch path.
# ----------------------------------------------------------------------------------------------------
# C = 27 with 100 rows: two programs of 64 rows, so the multi-program "mean" (denominator and finish
# kernels) runs; 1000 with 9 rows: the 4-row rung, a partial last program; 20001: two sweeps over
# 4096-column blocks (one row: the interpreter is slow). No C is a multiple of its block.
KERNEL_SHAPES = [(100, 27), (9, 1000), (1, 20001)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.interpreter
@needs_kernels
def test_kernels_match_torch_path(shape, kind):
    C = shape[1]
    x = torch.randn(shape, device=DEVICE) * 4
    target = make_target(shape, "prob" if kind == "prob" else "int64", device=DEVICE, dtype=torch.float32)
    weight = torch.rand(C, device=DEVICE) + 0.2
    cases = [("mean", None, 0.0, 1e-2, 3.0), ("none", weight, 0.2, 0.1, 1.5), ("sum", None, 0.0, 0.0, 2.0)]
    for reduction, w, smoothing, z_loss, softcap in cases:
        kwargs = dict(
            weight=w, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap
        )
        upstream = torch.randn(shape[0], device=DEVICE) if reduction == "none" else None
        with fused_ops.use_backend("triton"):
            ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, upstream, **kwargs)
        with fused_ops.use_backend("torch"):
            path, path_grad = loss_and_grad(fused_ops.cross_entropy, x, target, upstream, **kwargs)
        torch.testing.assert_close(ours, path, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_grad, path_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.interpreter
@needs_kernels
def test_kernels_kdim_ignore_index_and_inplace():
    """(N, C, d) with an ignore_index inside [0, C), and inplace_backward writing dx into the logits."""
    x = torch.randn(3, 27, 4, device=DEVICE) * 4
    target = make_target((3, 27, 4), "int64", ignore_index=5, device=DEVICE)
    kwargs = {"ignore_index": 5, "label_smoothing": 0.1, "z_loss": 0.05, "softcap": 2.5}
    with fused_ops.use_backend("triton"):
        ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, **kwargs)
    ref, ref_grad = loss_and_grad(reference, x.double(), target, **kwargs)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad.float(), atol=1e-6, rtol=1e-5)

    rows, y = x.movedim(1, -1).reshape(-1, 27), target.reshape(-1)
    logits = rows.clone().requires_grad_(True) * 1.0
    with fused_ops.use_backend("triton"):
        fused_ops.cross_entropy(logits, y, inplace_backward=True, **kwargs)
    _, unit_grad = loss_and_grad(reference, rows.double(), y, **kwargs)
    torch.testing.assert_close(logits.detach(), unit_grad.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(100, 27), (1, 20001)], ids=str)
@pytest.mark.interpreter
@needs_kernels
def test_kernels_defaults_are_bitwise_unchanged(shape):
    x = torch.randn(shape, device=DEVICE) * 4
    target = make_target(shape, "int64", device=DEVICE)
    with fused_ops.use_backend("triton"):
        plain, plain_grad = loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.1)
        off, off_grad = loss_and_grad(
            fused_ops.cross_entropy, x, target, label_smoothing=0.1, z_loss=0.0, softcap=None
        )
        on = [loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.1, **option)
              for option in ({"z_loss": 1e-3}, {"softcap": 30.0})]  # fmt: skip
    assert torch.equal(plain, off) and torch.equal(plain_grad, off_grad)
    ref, ref_grad = loss_and_grad(F.cross_entropy, x, target, label_smoothing=0.1)
    torch.testing.assert_close(off, ref) and torch.testing.assert_close(off_grad, ref_grad)
    for loss, grad in on:  # the options are live in the kernels: each changes the result
        assert not torch.equal(loss, off) and not torch.equal(grad, off_grad)
