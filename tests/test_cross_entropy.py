"""The PyTorch path and the native CPU kernels of fused_ops.cross_entropy against
torch.nn.functional.cross_entropy.

Every test runs twice: under use_backend("torch"), the analytic reference path that the Triton kernels
are later checked against, and under use_backend("native"), the C++ kernels (kernels/cpu). Gradients
are read from .grad after .backward().
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_ops
from fused_ops.cross_entropy import cross_entropy_reference

# Shapes: unbatched (C,), plain (N, C), K-dim (N, C, d1) and (N, C, d1, d2). C = 5 is not a power of two.
SHAPES = [(7,), (6, 5), (4, 5, 3), (3, 5, 2, 2)]
# (target kind, ignore_index): ignore_index 2 lies inside [0, C); torch refuses it for probability targets.
TARGETS = [("int64", -100), ("int64", 2), ("int32", -100), ("int32", 2), ("prob", -100)]


@pytest.fixture(autouse=True, params=["torch", "native"])
def backend(request):
    with fused_ops.use_backend(request.param):
        yield request.param


def num_classes(shape) -> int:
    return shape[0] if len(shape) == 1 else shape[1]


def make_target(shape, kind: str, ignore_index: int = -100, dtype=torch.float32) -> torch.Tensor:
    """Random target for logits of `shape`; index targets get ignore_index in about a third of rows."""
    C = num_classes(shape)
    if kind == "prob":
        return torch.softmax(torch.randn(shape, dtype=torch.float32), dim=0 if len(shape) == 1 else 1).to(
            dtype
        )
    batch = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, C, batch)
    if target.dim():
        target[torch.rand(batch) < 0.33] = ignore_index
    return target.to(torch.int32 if kind == "int32" else torch.int64)


def torch_reference(x, target, **kwargs):
    """F.cross_entropy with torch's accepted target dtype (int32 -> int64)."""
    if not target.is_floating_point():
        target = target.long()
    return F.cross_entropy(x, target, **kwargs)


def loss_and_grad(fn, x, target, upstream=None, **kwargs):
    """(loss, x.grad) of fn(x, target, **kwargs).backward(upstream), on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf, target, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------------
# Values and gradients over the option grid, float32, tight tolerance.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind, ignore_index", TARGETS, ids=lambda value: str(value))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_over_grid(shape, kind, ignore_index, reduction):
    C = num_classes(shape)
    for use_weight, smoothing in itertools.product([False, True], [0.0, 0.3]):
        x = torch.randn(shape) * 3
        target = make_target(shape, kind, ignore_index)
        weight = torch.rand(C) + 0.2 if use_weight else None
        kwargs = {
            "weight": weight,
            "ignore_index": ignore_index,
            "reduction": reduction,
            "label_smoothing": smoothing,
        }
        out_shape = torch_reference(x, target, **kwargs).shape
        upstream = torch.randn(out_shape)  # grad_output != 1: the backward must scale (per row for "none")
        ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, upstream, **kwargs)
        ref, ref_grad = loss_and_grad(torch_reference, x, target, upstream, **kwargs)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(ours_grad, ref_grad, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(kind, reduction):
    for shape, use_weight, smoothing in [
        ((5, 4), True, 0.25),
        ((3, 4, 2), False, 0.0),
        ((2, 4, 3), True, 0.5),
    ]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        target = make_target(
            shape, "int64" if kind == "index" else "prob", ignore_index=1, dtype=torch.float64
        )
        weight = torch.rand(num_classes(shape), dtype=torch.float64) + 0.2 if use_weight else None
        ignore_index = 1 if kind == "index" else -100

        def fn(inp, target=target, weight=weight, ignore_index=ignore_index, smoothing=smoothing):
            return fused_ops.cross_entropy(inp, target, weight, ignore_index, reduction, smoothing)

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_mean_denominators_with_weights_and_smoothing():
    """torch divides both the nll and the smoothing term by sum_i w[y_i] over non-ignored rows."""
    x = torch.randn(8, 6, dtype=torch.float64)
    target = torch.tensor([0, 5, -100, 2, 2, -100, 4, 1])
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    ours = fused_ops.cross_entropy(x, target, weight, label_smoothing=0.4)
    logp = torch.log_softmax(x, 1)
    keep = target != -100
    row = 0.6 * weight[target[keep]] * -logp[keep, target[keep]] + 0.4 / 6 * -(logp[keep] * weight).sum(1)
    torch.testing.assert_close(ours, row.sum() / weight[target[keep]].sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        ours, F.cross_entropy(x, target, weight, label_smoothing=0.4), atol=1e-12, rtol=0
    )


def test_probability_targets_mean_divides_by_rows():
    x = torch.randn(3, 4, 5, dtype=torch.float64)  # M = 3 * 5 rows
    p = torch.rand(3, 4, 5, dtype=torch.float64)  # need not sum to 1
    weight = torch.rand(4, dtype=torch.float64)
    ours = fused_ops.cross_entropy(x, p, weight, label_smoothing=0.2)
    q = weight[None, :, None] * (0.8 * p + 0.2 / 4)
    expected = -(q * torch.log_softmax(x, 1)).sum() / 15
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Edge cases: N = 0, all ignored, zero denominators, -inf logits.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (2, 5, 0), (0, 5, 3)], ids=str)
@pytest.mark.parametrize("kind", ["int64", "prob"])
def test_empty_batch_like_torch(reduction, shape, kind):
    x = torch.randn(shape)
    target = make_target(shape, kind)
    for smoothing in (0.0, 0.1):
        ours, ours_grad = loss_and_grad(
            fused_ops.cross_entropy, x, target, reduction=reduction, label_smoothing=smoothing
        )
        ref, ref_grad = loss_and_grad(
            torch_reference, x, target, reduction=reduction, label_smoothing=smoothing
        )
        assert ours.shape == ref.shape and ours_grad.shape == ref_grad.shape
        torch.testing.assert_close(ours, ref, equal_nan=True)  # mean: nan; sum: 0; none: empty


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_ignored_like_torch(reduction, use_weight, smoothing):
    x = torch.randn(4, 5)
    target = torch.full((4,), -100)
    weight = torch.rand(5) if use_weight else None
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, **kwargs)
    ref, ref_grad = loss_and_grad(torch_reference, x, target, **kwargs)
    torch.testing.assert_close(ours, ref, equal_nan=True)  # mean: nan
    assert torch.equal(ours_grad, ref_grad)  # zeros, not nan
    if reduction == "mean":
        assert ours.isnan()


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_zero_weight_denominator_like_torch(smoothing):
    """Non-ignored rows whose classes all weigh 0: torch's loss and those rows' gradients are nan."""
    x = torch.randn(4, 5)
    target = torch.tensor([1, 1, -100, 1])
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    ours, ours_grad = loss_and_grad(
        fused_ops.cross_entropy, x, target, weight=weight, label_smoothing=smoothing
    )
    ref, ref_grad = loss_and_grad(torch_reference, x, target, weight=weight, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    torch.testing.assert_close(ours_grad, ref_grad, equal_nan=True)
    assert ours_grad[2].eq(0).all() and ours_grad[0].isnan().all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_negative_infinite_logits_like_torch(smoothing):
    """A masked-out vocabulary entry (-inf logit) is finite at eps = 0 and inf with smoothing, as torch."""
    x = torch.randn(3, 6)
    x[:, 4] = float("-inf")
    target = torch.tensor([0, 5, 2])
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=smoothing)
    ref, ref_grad = loss_and_grad(torch_reference, x, target, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    torch.testing.assert_close(ours_grad, ref_grad, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_reference_returns_the_logits_dtype(dtype, kind):
    """The reference's statistics are float32, its loss and gradient the logits' dtype, as documented: a
    float32 gradient would double what the PyTorch path stores for backward (mutation pass, issue 11)."""
    x = torch.randn(4, 5).to(dtype)
    target = torch.tensor([0, 1, 4, 2]) if kind == "index" else torch.softmax(torch.randn(4, 5), 1).to(dtype)
    loss, grad = cross_entropy_reference(x, target, None, -100, "mean", 0.0, need_grad=True)
    assert (loss.dtype, grad.dtype) == (dtype, dtype)


def test_out_of_range_target_is_nan_on_the_no_sync_path():
    """What CUDA gets without validate=True: the row is nan, nothing reads out of bounds."""
    x = torch.randn(4, 5)
    target = torch.tensor([1, 7, -100, -3])
    for reduction in ("none", "sum", "mean"):
        loss, grad = cross_entropy_reference(x, target, None, -100, reduction, 0.0, need_grad=True)
        assert loss.isnan().any()
        assert grad[1].isnan().all() and grad[3].isnan().all() and grad[2].eq(0).all()
        if reduction == "none":
            assert not loss[0].isnan() and loss[2] == 0


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, and nothing changed.
# ----------------------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 4, -100])
    return [
        ("target out of range", {"input": x, "target": torch.tensor([0, 5, 1, 1])}, IndexError, "target"),
        ("negative target", {"input": x, "target": torch.tensor([0, -1, 1, 1])}, IndexError, "target"),
        (
            "float target of index shape",
            {"input": x, "target": y.float()},
            TypeError,
            r"class indices need an integer dtype \(target.long\(\)\)",
        ),
        ("bool target", {"input": x, "target": torch.ones(4, dtype=torch.bool)}, TypeError, "target"),
        ("int16 target", {"input": x, "target": y.to(torch.int16)}, TypeError, "target"),
        (
            "prob target dtype",
            {"input": x, "target": torch.rand(4, 5, dtype=torch.float64)},
            TypeError,
            "target",
        ),
        (  # not the index shape either: the shape error, not the dtype one (issue 11's mutation pass)
            "prob target shape",
            {"input": x, "target": torch.rand(4, 3)},
            ValueError,
            "must have the input's shape",
        ),
        (  # float64 input is never autocast's: no float32 copies that would hide the mismatch (issue 11)
            "prob target dtype, float64 input",
            {"input": x.double(), "target": torch.rand(4, 5)},
            TypeError,
            "target",
        ),
        (
            "prob target ignore",
            {"input": x, "target": torch.rand(4, 5), "ignore_index": 1},
            ValueError,
            "ignore_index",
        ),
        ("batch mismatch", {"input": x, "target": y[:3]}, ValueError, "batch size"),
        (
            "target shape K-dim",
            {"input": torch.randn(4, 5, 3), "target": torch.zeros(4, 2, dtype=torch.long)},
            ValueError,
            "target",
        ),
        (
            "target 2-D for 2-D input",
            {"input": x, "target": torch.zeros(4, 1, dtype=torch.long)},
            ValueError,
            "target",
        ),
        ("integer input", {"input": torch.randint(0, 3, (4, 5)), "target": y}, TypeError, "input"),
        (
            "complex input",
            {"input": torch.randn(4, 5, dtype=torch.complex64), "target": y},
            TypeError,
            "input",
        ),
        ("0-dim input", {"input": torch.tensor(1.0), "target": torch.tensor(0)}, ValueError, "input"),
        ("no classes", {"input": torch.randn(4, 0), "target": y}, ValueError, "C = 0"),
        ("weight length", {"input": x, "target": y, "weight": torch.rand(4)}, ValueError, "weight"),
        ("weight 2-D", {"input": x, "target": y, "weight": torch.rand(1, 5)}, ValueError, "weight"),
        (
            "integer weight",
            {"input": x, "target": y, "weight": torch.ones(5, dtype=torch.long)},
            TypeError,
            "weight",
        ),
        ("smoothing > 1", {"input": x, "target": y, "label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ("smoothing < 0", {"input": x, "target": y, "label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ("unknown reduction", {"input": x, "target": y, "reduction": "avg"}, ValueError, "reduction"),
        ("float ignore_index", {"input": x, "target": y, "ignore_index": 1.0}, TypeError, "ignore_index"),
        (
            "float default ignore_index",
            {"input": x, "target": y, "ignore_index": -100.0},
            TypeError,
            "ignore_index",
        ),
        (
            "tensor ignore_index",
            {"input": x, "target": y, "ignore_index": torch.tensor(-100)},
            TypeError,
            "ignore_index",
        ),
        (
            "bool label_smoothing",
            {"input": x, "target": y, "label_smoothing": False},
            TypeError,
            "label_smoothing",
        ),
        ("bool z_loss", {"input": x, "target": y, "z_loss": False}, TypeError, "z_loss"),
        ("list input", {"input": x.tolist(), "target": y}, TypeError, "input must be a Tensor"),
        ("list target", {"input": x, "target": y.tolist()}, TypeError, "target must be a Tensor"),
        ("target on meta", {"input": x, "target": y.to("meta")}, ValueError, "target"),
        (
            "weight on meta",
            {"input": x, "target": y, "weight": torch.rand(5, device="meta")},
            ValueError,
            "weight",
        ),
    ]


@pytest.mark.parametrize("inplace_backward", [False, True], ids=["default options", "inplace_backward"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_bad_input_raises_and_changes_nothing(case, inplace_backward):
    """With the other options at their defaults too: the call that cross_entropy runs as one op call."""
    _, kwargs, error, fragment = case
    kwargs = dict(kwargs)
    x = kwargs["input"]
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = kwargs["input"] = x.detach().clone().requires_grad_(True) * 1.0  # non-leaf: inplace allowed
    before = {
        name: t.detach().clone()
        for name, t in kwargs.items()
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    }
    with pytest.raises(error, match=fragment):
        fused_ops.cross_entropy(**kwargs, inplace_backward=inplace_backward)
    for name, saved in before.items():
        assert torch.equal(kwargs[name].detach(), saved), f"{name} was changed"


def test_validate_reports_out_of_range_target():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError, match="target holds 9"):
        fused_ops.cross_entropy(x, torch.tensor([0, 9, -100]), validate=True)
    fused_ops.cross_entropy(x, torch.tensor([0, 3, -100]), validate=True)  # in range: no error


def test_grad_requiring_weight_or_target_is_refused():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="weight requires grad"):
        fused_ops.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.rand(4, requires_grad=True))
    with pytest.raises(ValueError, match="target requires grad"):
        fused_ops.cross_entropy(x, torch.rand(3, 4, requires_grad=True))
    # a float target of the index shape: its dtype is the fault, not its requires_grad
    with pytest.raises(TypeError, match="class indices need an integer dtype"):
        fused_ops.cross_entropy(x, torch.tensor([0.0, 1.0, 2.0], requires_grad=True))


# ----------------------------------------------------------------------------------------------------
# Autograd behaviour: inplace_backward, double and second backward.
# ----------------------------------------------------------------------------------------------------
def _mlp_logits(h, W):
    return h @ W  # mm saves h and W, not its output: overwriting the logits is safe


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_overwrites_logits_with_the_gradient(reduction):
    h, W = torch.randn(6, 8), torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    upstream = torch.randn(6) if reduction == "none" else torch.tensor(1.7)
    ref = F.cross_entropy(_mlp_logits(h, W), target, reduction=reduction, label_smoothing=0.1)
    ref.backward(upstream)
    ref_grad, W.grad = W.grad, None

    logits = _mlp_logits(h, W)
    _, unit_grad = loss_and_grad(torch_reference, logits, target, reduction=reduction, label_smoothing=0.1)
    version = logits._version
    loss = fused_ops.cross_entropy(
        logits, target, reduction=reduction, label_smoothing=0.1, inplace_backward=True
    )
    assert logits._version > version  # marked dirty: autograd knows
    torch.testing.assert_close(logits.detach(), unit_grad)  # the logits' memory now holds d(loss)/d(logits)
    torch.testing.assert_close(loss, ref.detach())
    loss.backward(upstream)
    torch.testing.assert_close(W.grad, ref_grad)


def test_inplace_backward_through_a_reshaping_view():
    h, W = torch.randn(2, 3, 8), torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    F.cross_entropy((h @ W).view(-1, 5), target).backward()
    ref_grad, W.grad = W.grad, None
    logits = h @ W  # (2, 3, 5)
    fused_ops.cross_entropy(logits.view(-1, 5), target, inplace_backward=True).backward()
    torch.testing.assert_close(W.grad, ref_grad)


def test_inplace_backward_refuses_unsafe_overwrites():
    target = torch.tensor([0, 1, 2])
    leaf = torch.randn(3, 5, requires_grad=True)
    saved = leaf.detach().clone()
    with pytest.raises(ValueError, match="leaf"):
        fused_ops.cross_entropy(leaf, target, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf"):
        fused_ops.cross_entropy(leaf.view(3, 5), target, inplace_backward=True)
    assert torch.equal(leaf.detach(), saved)
    wide = leaf * 1.0
    with pytest.raises(ValueError, match="view of part"):
        fused_ops.cross_entropy(wide[:, :4], target, inplace_backward=True)
    with pytest.raises(ValueError, match="view of part"):
        fused_ops.cross_entropy(torch.cat([wide, wide])[:3], target, inplace_backward=True)


def test_inplace_backward_when_autograd_still_needs_the_logits():
    """tanh saves its output; overwriting it must make autograd raise, not give a wrong gradient."""
    x = torch.randn(4, 5, requires_grad=True)
    logits = torch.tanh(x)
    loss = fused_ops.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_overwritten_logits_cannot_be_differentiated():
    x = torch.randn(4, 5, requires_grad=True)
    logits = x * 2.0
    loss = fused_ops.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="overwrote input"):
        (loss + logits.sum()).backward()


def test_inplace_backward_kdim_leaves_input_unchanged():
    x = torch.randn(3, 5, 4, requires_grad=True)
    logits = x * 1.0
    saved = logits.detach().clone()
    target = torch.randint(0, 5, (3, 4))
    fused_ops.cross_entropy(logits, target, inplace_backward=True).backward()
    assert torch.equal(logits.detach(), saved)  # the internal (M, C) copy took the gradient
    ref = x.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, target).backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_inplace_backward_without_grad_changes_nothing():
    x = torch.randn(4, 5)
    saved = x.clone()
    fused_ops.cross_entropy(x, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with torch.no_grad():
        y = torch.randn(4, 5, requires_grad=True) * 1.0
        y_saved = y.clone()
        fused_ops.cross_entropy(y, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    assert torch.equal(x, saved) and torch.equal(y, y_saved)


def test_double_backward_raises():
    x = torch.randn(4, 5, requires_grad=True)
    loss = fused_ops.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_second_backward_gives_the_same_gradient(inplace):
    """The PyTorch path scales out of place, so retain_graph=True works (and gradcheck relies on it);
    the Triton path raises instead (tests/test_cross_entropy_triton.py)."""
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    loss = fused_ops.cross_entropy(x * 1.0, target, reduction="none", inplace_backward=inplace)
    upstream = torch.randn(4)
    loss.backward(upstream, retain_graph=True)
    first = x.grad.clone()
    loss.backward(upstream)
    torch.testing.assert_close(x.grad, 2 * first)
    ref = x.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, target, reduction="none").backward(upstream)
    torch.testing.assert_close(first, ref.grad)


def test_no_gradient_is_computed_without_requires_grad():
    x = torch.randn(4, 5)
    loss = fused_ops.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x, torch.tensor([0, 1, 2, 3])))


# ----------------------------------------------------------------------------------------------------
# Layouts and dtypes.
# ----------------------------------------------------------------------------------------------------
def _non_contiguous_cases():
    base = torch.randn(12, 10)
    return [
        ("transposed", base[:5, :6].t()),  # (6, 5), column stride 10
        ("strided rows", base[::2, :5]),  # row stride 20
        ("strided columns", base[:6, ::2]),  # column stride 2
        ("expanded", torch.randn(1, 5).expand(6, 5)),  # row stride 0
        ("kdim permuted", torch.randn(6, 3, 5).permute(0, 2, 1)),  # (6, 5, 3) non-contiguous
    ]


@pytest.mark.parametrize("case", _non_contiguous_cases(), ids=lambda case: case[0])
@pytest.mark.parametrize("kind", ["int64", "prob"])
def test_non_contiguous_inputs(case, kind):
    _, x = case
    target = make_target(tuple(x.shape), kind)
    if kind == "prob":
        target = target.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous too
    else:
        target = torch.stack([target, target], -1)[..., 0]  # non-contiguous index target
    for reduction in ("mean", "none"):
        ours, ours_grad = loss_and_grad(
            fused_ops.cross_entropy, x, target, reduction=reduction, label_smoothing=0.1
        )
        ref, ref_grad = loss_and_grad(torch_reference, x, target, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(ours_grad, ref_grad)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|: the gradient of a mean is tiny, absolute errors are not."""
    return ((value.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


# (dtype, tol) for err(ours) <= 2 * err(torch) + tol, relative errors against float32 math on the same
# rounded input; tol is about half an ulp of the dtype (a result rounded once from float32).
LOW_PRECISION = [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)]


@pytest.mark.parametrize("dtype, tol", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_cpu_against_torch_error(dtype, tol, reduction):
    x = (torch.randn(64, 27) * 4).to(dtype)
    target = make_target((64, 27), "int64")
    weight = torch.rand(27) + 0.5
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    ref, ref_grad = loss_and_grad(torch_reference, x.float(), target, weight=weight, **kwargs)
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, weight=weight, **kwargs)
    theirs, theirs_grad = loss_and_grad(torch_reference, x, target, weight=weight.to(dtype), **kwargs)
    assert ours.dtype == dtype and ours_grad.dtype == dtype
    for a, b, r in ((ours, theirs, ref), (ours_grad, theirs_grad, ref_grad)):
        err_ours, err_torch = relative_error(a, r), relative_error(b, r)
        assert err_ours <= 2 * err_torch + tol, (err_ours, err_torch)


def test_float64_keeps_float64_precision():
    x = torch.randn(5, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (5,))
    ours, ours_grad = loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.2)
    ref, ref_grad = loss_and_grad(torch_reference, x, target, label_smoothing=0.2)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(ours_grad, ref_grad, atol=1e-14, rtol=0)


def test_uint8_target_like_torch():
    x = torch.randn(4, 5)
    target = torch.tensor([0, 4, 2, 1], dtype=torch.uint8)
    torch.testing.assert_close(fused_ops.cross_entropy(x, target), F.cross_entropy(x, target))


def test_deterministic():
    x = torch.randn(33, 27)
    target = make_target((33, 27), "int64")
    a, ga = loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.1)
    b, gb = loss_and_grad(fused_ops.cross_entropy, x, target, label_smoothing=0.1)
    assert torch.equal(a, b) and torch.equal(ga, gb)


# ----------------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_weight", [False, True])
def test_module_state_dict_matches_torch(use_weight):
    weight = torch.rand(5) if use_weight else None
    ours = fused_ops.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1)
    theirs = nn.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1)
    assert isinstance(ours, nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if use_weight:
        new = torch.rand(5)
        ours.load_state_dict(nn.CrossEntropyLoss(weight=new).state_dict())
        assert torch.equal(ours.weight, new)
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(theirs.weight, new)
    x, target = torch.randn(6, 5), torch.tensor([0, 1, 3, 4, 2, 3])
    torch.testing.assert_close(ours(x, target), theirs(x, target))


def test_module_options_and_legacy_arguments():
    loss_fn = fused_ops.CrossEntropyLoss(reduction="none", inplace_backward=True, validate=True)
    assert loss_fn.inplace_backward and loss_fn.validate and "inplace_backward=True" in repr(loss_fn)
    with pytest.warns(UserWarning, match="size_average"):  # torch's deprecation warning, as for its own
        legacy = fused_ops.CrossEntropyLoss(size_average=False)  # torch maps it to reduction="sum"
    assert legacy.reduction == "sum"
    h, W = torch.randn(4, 6), torch.randn(6, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    loss = loss_fn(h @ W, target)
    assert loss.shape == (4,)
    loss.sum().backward()
    ref_W = W.detach().clone().requires_grad_(True)
    F.cross_entropy(h @ ref_W, target, reduction="sum").backward()
    torch.testing.assert_close(W.grad, ref_W.grad)
    with pytest.raises(IndexError, match="target"):
        loss_fn(torch.randn(4, 5), torch.tensor([0, 1, 2, 9]))


# ----------------------------------------------------------------------------------------------------
# Issue 11: non-finite values in ignored rows (found by hand; the fuzz suite, tests/test_fuzz.py, covers
# the kind). An ignored row contributes exactly nothing, whatever it holds.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(
    "fill",
    ["-inf_at_clamped_index", "all_-inf", "+inf", "nan"],
)
def test_ignored_row_with_non_finite_logits_adds_nothing(fill, smoothing):
    x = torch.randn(3, 5)
    if fill == "-inf_at_clamped_index":  # ignore_index -100 is clamped to class 0 for the gather
        x[1, 0] = float("-inf")
    else:
        x[1] = float({"all_-inf": "-inf", "+inf": "inf", "nan": "nan"}[fill])
    target = torch.tensor([2, -100, 4])
    for reduction in ("mean", "sum", "none"):
        kwargs = {"reduction": reduction, "label_smoothing": smoothing}
        ours = fused_ops.cross_entropy(x.clone().requires_grad_(), target, **kwargs)
        torch.testing.assert_close(ours.detach(), F.cross_entropy(x, target, **kwargs))
        assert torch.isfinite(ours).all()
    leaf = x.clone().requires_grad_()
    fused_ops.cross_entropy(leaf, target, label_smoothing=smoothing, z_loss=1e-3, softcap=5.0).backward()
    assert torch.equal(leaf.grad[1], torch.zeros(5))  # torch's own gradient there is nan (but for -inf at 0)
    assert torch.isfinite(leaf.grad).all()


def test_ignore_index_inside_the_classes_with_minus_inf_at_the_last_class():
    x = torch.randn(4, 5)
    x[:, 4] = float("-inf")  # a masked class, which is also ignore_index
    target = torch.tensor([0, 4, 2, 4])
    for reduction in ("mean", "sum", "none"):
        ours = fused_ops.cross_entropy(x, target, ignore_index=4, reduction=reduction)
        torch.testing.assert_close(ours, F.cross_entropy(x, target, ignore_index=4, reduction=reduction))
