"""BatchNorm for every model, on the PyTorch path: (N, C, *) input in every memory format, the fused
residual add, every activation, BatchNorm2d/3d and `bias=`, against torch's own ops.

The reference is torch's, unfused: F.batch_norm, then + residual, then the activation, in float64;
gradcheck covers every layout and option. Also: the output's memory format is torch's, bad input
(residual of the wrong shape, dtype or device, unknown activation, 1-D input, wrong dims for a module)
raises naming the argument with nothing changed, fp16/bf16 against torch's own error, N = 0.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_ops
from fused_ops.backend import use_backend

ACTIVATIONS = {None: lambda t: t, "relu": torch.relu, "tanh": torch.tanh, "silu": F.silu}
F64 = {"atol": 1e-10, "rtol": 1e-8}


def _every_other(t: torch.Tensor, dim: int, fmt=torch.contiguous_format) -> torch.Tensor:
    """t's values as a view that takes every other element of `dim` of a twice larger `fmt` tensor."""
    shape = list(t.shape)
    shape[dim] *= 2
    index = [slice(None)] * t.ndim
    index[dim] = slice(None, None, 2)
    view = torch.zeros(shape, dtype=t.dtype).contiguous(memory_format=fmt)[tuple(index)]
    return view.copy_(t)


# Layouts: name -> (shape, memory format applied to a fresh tensor, or a callable making the layout).
# (3, 6, 5, 7): odd H, W and C; (2, 4, 3, 2, 3) a 5-D volume; the strided views reach the backends as
# copies (sliced: the trailing dims do not merge) or as views (H and W swapped in memory, which torch
# answers with a contiguous output).
LAYOUTS = {
    "nchw": ((3, 6, 5, 7), torch.contiguous_format),
    "channels_last": ((3, 6, 5, 7), torch.channels_last),
    "ncdhw": ((2, 4, 3, 2, 3), torch.contiguous_format),
    "channels_last_3d": ((2, 4, 3, 2, 3), torch.channels_last_3d),
    "sliced": ((3, 6, 5, 7), lambda t: _every_other(t, 2)),
    "sliced_channels_last": ((3, 6, 5, 7), lambda t: _every_other(t, 3, torch.channels_last)),
    "sliced_batch": ((3, 6, 5, 7), lambda t: _every_other(t, 0)),
    "hw_transposed": ((3, 6, 5, 7), lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)),
    "2d": ((9, 6), torch.contiguous_format),
    "3d": ((3, 6, 4), torch.contiguous_format),
}


@pytest.fixture(autouse=True, params=["torch", "native"])
def backend(request):
    """Every test on the PyTorch path and on the native CPU kernels (kernels/cpu/batch_norm.cpp)."""
    with use_backend(request.param):
        yield request.param


def make(layout: str, dtype=torch.float64, mean=1.0, std=2.0) -> torch.Tensor:
    shape, fmt = LAYOUTS[layout]
    t = torch.randn(shape, dtype=dtype) * std + mean
    made = fmt(t) if callable(fmt) else t.contiguous(memory_format=fmt)
    torch.testing.assert_close(made, t)  # the same values, only the strides differ
    return made


def params(c: int, dtype=torch.float64):
    weight = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(c, dtype=dtype, requires_grad=True)
    return weight, bias, torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5


def reference(x, running_mean, running_var, weight, bias, training, activation=None, residual=None, **kw):
    """torch's ops, unfused: F.batch_norm, + residual, the activation."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, **kw)
    return ACTIVATIONS[activation](y if residual is None else y + residual)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_matches_unfused_torch_float64(layout, activation, training, with_residual):
    """Output (values and memory format), every gradient (the residual's too) and the running stats."""
    x = make(layout).requires_grad_()
    weight, bias, running_mean, running_var = params(x.shape[1])
    residual = make(layout).requires_grad_() if with_residual else None
    leaves = [t for t in (x, weight, bias, residual) if t is not None]
    ours_stats, ref_stats = (
        (running_mean.clone(), running_var.clone()),
        (running_mean.clone(), running_var.clone()),
    )
    y = fused_ops.batch_norm(
        x, *ours_stats, weight, bias, training, 0.3, activation=activation, residual=residual
    )
    y_ref = reference(x, *ref_stats, weight, bias, training, activation, residual, momentum=0.3)
    dy = make(layout)
    torch.testing.assert_close(y, y_ref, **F64)
    assert y.stride() == y_ref.stride(), "the output's memory format differs from torch's"
    for got, exp in zip(
        torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy), strict=True
    ):
        torch.testing.assert_close(got, exp, **F64)
    for got, exp in zip(ours_stats, ref_stats, strict=True):
        torch.testing.assert_close(got, exp, **F64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_3d", "sliced"])
@pytest.mark.parametrize(
    "training,unbiased", [(True, False), (True, True), (False, False)], ids=["train", "unbiased", "eval"]
)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_gradcheck(layout, training, unbiased, activation):
    """float64 gradcheck of x, gamma, beta and the residual (relu: inputs kept away from its kink)."""
    x = make(layout).requires_grad_()
    weight, bias, running_mean, running_var = params(x.shape[1])
    residual = make(layout).requires_grad_()

    def fn(x, weight, bias, residual):  # fresh running stats each call: training updates them in place
        return fused_ops.batch_norm(
            x,
            running_mean.clone(),
            running_var.clone(),
            weight,
            bias,
            training,
            unbiased=unbiased,
            activation=activation,
            residual=residual,
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias, residual))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_residual_without_grad_and_no_grad_path(activation):
    """A residual that needs no gradient, and the no-autograd path (inference), give torch's output."""
    x = make("channels_last")
    weight, bias, _, _ = params(x.shape[1])
    residual = make("nchw")  # another layout than x: the op lays it out like x
    for grad in (False, True):
        leaf = x.clone().requires_grad_(grad)
        y = fused_ops.batch_norm(
            leaf, None, None, weight.detach(), bias.detach(), True, activation=activation, residual=residual
        )
        torch.testing.assert_close(
            y, reference(x, None, None, weight, bias, True, activation, residual), **F64
        )
        if grad:
            (dx,) = torch.autograd.grad(y.sum(), leaf)
            (dx_ref,) = torch.autograd.grad(
                reference(leaf, None, None, weight, bias, True, activation, residual).sum(), leaf
            )
            torch.testing.assert_close(dx, dx_ref, **F64)


def test_unbiased_with_residual_and_silu_against_formula():
    """unbiased=True normalises with the n-1 variance: checked against the formula itself."""
    x = make("channels_last")
    res = make("channels_last")
    dims = (0, 2, 3)
    var = x.var(dims, correction=1, keepdim=True)
    expected = F.silu((x - x.mean(dims, keepdim=True)) / torch.sqrt(var + 1e-5) + res)
    y = fused_ops.batch_norm(x, None, None, training=True, unbiased=True, activation="silu", residual=res)
    torch.testing.assert_close(y, expected, **F64)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4, 2, 2, 2)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_empty_input_like_torch(shape, training, channels_last):
    """Empty output (in the input's memory format: an empty tensor is contiguous in every format, its
    strides tell which), zero parameter gradients, running stats untouched."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if channels_last else None
    x = torch.randn(shape).contiguous(memory_format=fmt or torch.contiguous_format).requires_grad_()
    weight, bias, running_mean, running_var = params(4, torch.float32)
    res = torch.randn(shape, requires_grad=True)
    stats = (running_mean.clone(), running_var.clone())
    y = fused_ops.batch_norm(x, *stats, weight, bias, training, activation="relu", residual=res)
    y_ref = reference(x, running_mean.clone(), running_var.clone(), weight, bias, training, "relu", res)
    assert y.shape == y_ref.shape == shape
    torch_layout = F.batch_norm(x, running_mean.clone(), running_var.clone(), training=training).stride()
    assert (y.stride(1) == 1) == (torch_layout[1] == 1)  # channels innermost exactly when torch's are
    grads = torch.autograd.grad(y.sum(), (x, weight, bias, res))
    grads_ref = torch.autograd.grad(y_ref.sum(), (x, weight, bias, res))
    for got, exp in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, exp)
    torch.testing.assert_close(stats, (running_mean, running_var))  # untouched


# ----------------------------------------------------------------------------------------------------
# fp16/bf16: fp32 statistics; error no worse than twice torch's own in the same dtype
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_against_torch_error(dtype, atol, layout, training):
    x32 = make(layout, torch.float32).to(dtype).float()  # values representable in dtype
    res32 = make(layout, torch.float32).to(dtype).float()
    dy32 = make(layout, torch.float32).to(dtype).float()
    weight, bias, running_mean, running_var = (t.detach().float() for t in params(x32.shape[1]))

    def run(fn, dtype_x):
        leaves = [t.to(dtype_x).clone().requires_grad_() for t in (x32, res32)] + [
            weight.clone().requires_grad_(),
            bias.clone().requires_grad_(),
        ]
        stats = (running_mean.clone(), running_var.clone())
        y = fn(leaves[0], *stats, leaves[2], leaves[3], training, "relu", leaves[1])
        y.backward(dy32.to(dtype_x))
        return [y.detach(), *(t.grad for t in leaves), *stats]

    def ours(x, rm, rv, w, b, training, activation, residual):
        return fused_ops.batch_norm(x, rm, rv, w, b, training, activation=activation, residual=residual)

    exact = run(reference, torch.float32)
    got = run(ours, dtype)
    theirs = run(reference, dtype)  # torch: half x and residual, fp32 params and stats, as ours
    assert got[0].dtype == dtype and got[0].stride() == theirs[0].stride()
    for ours_t, torch_t, exact_t in zip(got, theirs, exact, strict=True):
        scale = exact_t.abs().max().item() + 1
        err_ours = (ours_t.float() - exact_t).abs().max().item()
        err_torch = (torch_t.float() - exact_t).abs().max().item()
        assert err_ours <= 2 * err_torch + atol * scale, (err_ours, err_torch)


# ----------------------------------------------------------------------------------------------------
# Modules: BatchNorm2d/3d, bias=, forward(input, residual)
# ----------------------------------------------------------------------------------------------------
MODULES = {  # fused class, torch class, input shape
    "2d": (fused_ops.BatchNorm2d, nn.BatchNorm2d, (4, 6, 3, 5)),
    "3d": (fused_ops.BatchNorm3d, nn.BatchNorm3d, (2, 6, 3, 2, 3)),
    "1d": (fused_ops.BatchNorm1d, nn.BatchNorm1d, (8, 6)),
}


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}, {"bias": False}],
    ids=["default", "cumulative", "no_affine", "no_tracking", "no_bias"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_module_steps_match_torch(kind, kwargs, channels_last, torch_batch_norm):
    """Training steps then eval: outputs, gradients, state_dict (same keys), and the memory format."""
    cls, torch_cls, shape = MODULES[kind]
    ours, ref = cls(6, activation="relu", **kwargs), torch_batch_norm(torch_cls, 6, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format)
    for step, training in enumerate((True, True, False)):
        ours.train(training), ref.train(training)
        x = torch.randn(shape) * (step + 1) + step
        res = torch.randn(shape)
        if channels_last:
            x, res = x.contiguous(memory_format=fmt), res.contiguous(memory_format=fmt)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1, residual=res), torch.relu(ref(x2) + res)
        dy = torch.randn(shape)
        y1.backward(dy), y2.backward(dy)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)
        assert y1.stride() == y2.stride()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("torch_takes_bias", [True, False], ids=["torch_bias_keyword", "emulated"])
def test_bias_false_like_torch(monkeypatch, torch_takes_bias, torch_batch_norm):
    """bias=False: weight, no bias, no state_dict key, repr says so; on torch < 2.12 (no such keyword)
    the modules build it themselves, checked here by forcing that path."""
    op_module = sys.modules["fused_ops.batch_norm"]  # the module; fused_ops.batch_norm is the function
    monkeypatch.setattr(op_module, "_TORCH_TAKES_BIAS", torch_takes_bias and op_module._TORCH_TAKES_BIAS)
    for cls in (fused_ops.BatchNorm1d, fused_ops.BatchNorm2d, fused_ops.BatchNorm3d, fused_ops.SyncBatchNorm):
        m = cls(5, bias=False)
        assert m.weight is not None and m.bias is None
        assert list(m.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
        assert "bias=False" in repr(m)
        m.reset_parameters()  # torch < 2.12's would zero a None bias
        no_affine = cls(5, affine=False, bias=False)
        assert no_affine.weight is None and no_affine.bias is None
    m = fused_ops.BatchNorm2d(5, bias=False)
    ref = torch_batch_norm(nn.BatchNorm2d, 5, bias=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 5, 2, 3, requires_grad=True)
    y = m(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref(x))
    assert m.weight.grad is not None
    with pytest.raises(TypeError, match="bias must be a bool"):
        fused_ops.BatchNorm2d(5, bias=None)


def test_module_repr_and_subclassing():
    m = fused_ops.BatchNorm2d(8, activation="silu", unbiased=True)
    assert isinstance(m, nn.BatchNorm2d) and "activation='silu'" in repr(m) and "unbiased=True" in repr(m)
    assert isinstance(fused_ops.BatchNorm3d(2), nn.BatchNorm3d)


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and nothing changed
# ----------------------------------------------------------------------------------------------------
BAD_RESIDUALS = {
    "residual shape": (
        torch.randn(4, 6, 3, 4),
        ValueError,
        r"residual must have input's shape \(4, 6, 3, 5\)",
    ),
    "residual broadcast": (torch.randn(1, 6, 1, 1), ValueError, "without broadcasting"),
    "residual dtype": (
        torch.randn(4, 6, 3, 5, dtype=torch.float64),
        TypeError,
        "residual must have input's dtype",
    ),
    "residual device": (torch.randn(4, 6, 3, 5, device="meta"), ValueError, "residual is on meta"),
    "residual type": ([1.0], TypeError, "residual must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_RESIDUALS))
def test_bad_residual_raises_and_changes_nothing(case):
    residual, exc, match = BAD_RESIDUALS[case]
    for module in (fused_ops.BatchNorm2d(6, momentum=None), fused_ops.SyncBatchNorm(6)):
        module(torch.randn(4, 6, 3, 5))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises(exc, match=match):
            module(torch.randn(4, 6, 3, 5), residual=residual)
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k
    rm, rv = torch.zeros(6), torch.ones(6)
    with pytest.raises(exc, match=match):
        fused_ops.batch_norm(torch.randn(4, 6, 3, 5), rm, rv, training=True, residual=residual)
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))


@pytest.mark.parametrize(
    "cls,bad,match",
    [
        (
            fused_ops.BatchNorm1d,
            torch.randn(4, 6, 3, 5),
            r"BatchNorm1d: expected 2-D or 3-D .* use fused_ops.BatchNorm2d",
        ),
        (
            fused_ops.BatchNorm2d,
            torch.randn(4, 6, 5),
            r"BatchNorm2d: expected 4-D .* use fused_ops.BatchNorm1d",
        ),
        (
            fused_ops.BatchNorm3d,
            torch.randn(4, 6, 3, 5),
            r"BatchNorm3d: expected 5-D .* use fused_ops.BatchNorm2d",
        ),
        (fused_ops.BatchNorm2d, torch.randn(2, 6, 1, 2, 3, 2), r"use fused_ops.batch_norm or"),
        (fused_ops.SyncBatchNorm, torch.randn(6), r"1-D \(6,\)"),
        (fused_ops.BatchNorm2d, torch.randn(4, 5, 3, 5), "num_features=6"),
    ],
    ids=["1d_gets_4d", "2d_gets_3d", "3d_gets_4d", "2d_gets_6d", "sync_gets_1d", "wrong_c"],
)
def test_module_bad_input_keeps_state(cls, bad, match):
    m = cls(6, momentum=None)
    good = {fused_ops.BatchNorm1d: (8, 6), fused_ops.BatchNorm3d: (2, 6, 2, 2, 2)}.get(cls, (4, 6, 3, 5))
    m(torch.randn(good))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        m(bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.num_batches_tracked.item() == 1


def test_functional_bad_input():
    x = torch.randn(4, 6, 3, 5)
    with pytest.raises(ValueError, match=r"input must be \(N, C, \*\) .* got 1-D"):
        fused_ops.batch_norm(torch.randn(6), None, None, training=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_ops.batch_norm(x, None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_ops.BatchNorm2d(6, activation="gelu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused_ops.batch_norm(torch.randn(1, 6, 1, 1), None, None, training=True)
