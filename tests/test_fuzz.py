"""Differential fuzzing with hypothesis: fused_ops against torch's functional ops, on every backend.

What is compared: `cross_entropy`, `batch_norm` and `BatchNorm1d` (values, gradients, running stats)
against `F.cross_entropy`, `F.batch_norm` and `nn.BatchNorm1d`, on each backend of BACKENDS that can run
here, in float64 (ours against torch, tightly) and in the same dtype (the STYLE rule: against a float64
torch reference, err(ours) <= 2 * err(torch in that dtype) + atol). BatchNorm's float64 truth forms
x - mean first (`bn_reference`): torch's folded affine has an error of its own there, which sets the bar. torch's value is the right one,
non-finite values included (nan where torch gives nan), with one documented difference: an ignored
cross-entropy row gets a gradient of exactly 0 whatever it holds, where torch's is nan when the row
holds nan, +inf or only -inf (README, "Differences from torch").

Adversarial values: +-inf and nan in ignored rows, -inf in masked classes (with and without smoothing),
magnitudes up to 1e4 and the dtype's max, denormals, all-ignored batches, zero class weights,
zero-variance channels, running_var near 0, N from 1 to 3, odd C, non-contiguous inputs.

Runs: CI uses the profile "fuzz-ci" (conftest.py): a fixed seed (derandomize) and a bounded number of
examples. A longer, randomised run:

    python3 -m pytest tests/test_fuzz.py -q --hypothesis-profile=fuzz-long [--hypothesis-seed=N]

Every failure found becomes a named regression test with its minimal input (tests/test_cross_entropy.py,
tests/test_batch_norm.py).

Extending it (one edit each):
- a backend: one `Backend(...)` line in BACKENDS (its name for `fused_ops.use_backend`, the dtypes it
  takes, its size cap, its share of the examples, when it can run);
- an option of an op: one strategy in CE_OPTIONS / BN_OPTIONS / MODULE_OPTIONS, and, where torch's
  functional op lacks it, its term in `ce_oracle` / `bn_oracle` (as softcap, z_loss, unbiased have);
- an activation: one entry of ACTIVATIONS (name -> torch function);
- a shape (e.g. N-D BatchNorm) or memory format: one entry of BN_SHAPES / LAYOUTS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fused_ops
from fused_ops.backend import native_available, triton_available, triton_interpreter_enabled

hypothesis = pytest.importorskip("hypothesis")  # a test dependency (extra "test"), not the package's
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # interpreter: masked lanes
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

HALF = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------
# Backends: one entry each.
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    name: str  # for fused_ops.use_backend
    dtypes: tuple[torch.dtype, ...]  # input dtypes it runs
    max_classes: int  # size caps: the interpreter costs milliseconds per program
    max_length: int  # BatchNorm's L
    share: float  # its examples, as a share of the profile's max_examples
    available: Callable[[], bool] = lambda: True
    bn_max_abs: float = math.inf  # largest |x| drawn for BatchNorm (see BACKENDS)


def _kernels_run_here() -> bool:
    return triton_available() and (torch.cuda.is_available() or triton_interpreter_enabled())


# BatchNorm inputs stay below 1e18 on every backend, so that x^2 fits float32. At the dtype's max the
# statistics overflow, and every backend gives nan or inf where torch's folded form gives 0 (a known
# fault, kept as the strict xfails test_batch_norm_triton.py::test_variance_overflow_at_float32_max and
# test_batch_norm.py::test_statistics_overflow_at_dtype_max). Cross-entropy draws up to the dtype's max.
BACKENDS = [
    Backend("torch", (torch.float64, torch.float32, torch.bfloat16, torch.float16), 40, 5, 1.0, bn_max_abs=1e18),
    Backend("triton", (torch.float32, torch.bfloat16, torch.float16), 40, 3, 0.2, _kernels_run_here, 1e18),
    Backend("native", (torch.float64, torch.float32, torch.bfloat16, torch.float16), 40, 5, 0.5, native_available, 1e18),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# atol per dtype, relative to the largest finite magnitude of the reference (at least 1).
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def backend_params(kind: str):
    """pytest params (backend, dtype): float64, or every low-precision dtype the backend takes."""
    for backend in BACKENDS:
        dtypes = [d for d in backend.dtypes if (d == torch.float64) == (kind == "float64")]
        for dtype in dtypes:
            marks = [] if backend.name == "torch" else [pytest.mark.interpreter]
            skip = pytest.mark.skipif(not backend.available(), reason=f"backend {backend.name} cannot run here")
            yield pytest.param(backend, dtype, marks=[*marks, skip], id=f"{backend.name}-{str(dtype)[6:]}")


def fuzz(backend: Backend, body: Callable) -> None:
    """Run body(data) under hypothesis with the backend's share of the current profile's examples."""
    examples = max(2, round(settings().max_examples * backend.share))

    @settings(max_examples=examples)
    @given(data=st.data())
    def run(data):
        with fused_ops.use_backend(backend.name):
            body(data)

    run()


# ----------------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------------
def specials(dtype: torch.dtype) -> list[float]:
    """Finite extremes: the dtype's max, its smallest denormal, and magnitudes up to 1e4."""
    info = torch.finfo(dtype)
    denormal = info.smallest_normal * info.eps  # the smallest positive subnormal
    return [info.max, -info.max, denormal, -denormal, 0.0, 1e4, -1e4, 88.0, -88.0]


@st.composite
def values(draw, shape: tuple[int, ...], dtype: torch.dtype, special=True, max_abs=math.inf) -> torch.Tensor:
    """A tensor of `shape`: seeded normal values at a drawn scale, with finite extremes (up to max_abs)
    placed in it."""
    numel = math.prod(shape)
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1.0, 3.0, 1e2, 1e4]))
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if special and numel:
        for index, value in draw(
            st.lists(
                st.tuples(st.integers(0, numel - 1), st.sampled_from([v for v in specials(dtype) if abs(v) <= max_abs])),
                max_size=3,
            )
        ):
            x[index] = value
    return x.to(dtype).view(shape)


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as x, in memory where dim 0 is not the outermost (a transposed copy), or strided."""
    if x.dim() < 2:
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """4-D x in channels_last memory (NHWC); other x as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


LAYOUTS = {"contiguous": lambda x: x, "non_contiguous": non_contiguous, "channels_last": channels_last}


# ----------------------------------------------------------------------------------------------------
# Comparison.
# ----------------------------------------------------------------------------------------------------
def _same_special(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.isnan() & b.isnan()) | (a.isinf() & (a == b))


def assert_matches(name: str, ours, truth, torch_same, dtype: torch.dtype, scale: float = 1.0) -> None:
    """ours (dtype) against truth (float64 torch) and torch_same (torch in dtype, or None for float64).

    Non-finite: where ours is not finite it must be the same inf or nan as truth (rounded to dtype) or
    as torch in dtype; where truth is not finite ours must be too, unless torch in dtype is finite or
    truth is an overflow to inf that ours (within 1e3 of the dtype's max, same sign) avoided.
    Finite: err(ours) <= 2 * err(torch in dtype) + atol * max(1, |truth|, scale), errors against truth.
    """
    if ours is None or truth is None:
        assert ours is None and truth is None, f"{name}: ours {ours is None}, torch's {truth is None}"
        return
    ours, truth = ours.detach().double(), truth.detach().double()
    same = truth if torch_same is None else torch_same.detach().double()
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} vs torch's {tuple(truth.shape)}"
    rounded = truth.to(dtype).double()
    bad = ~ours.isfinite() & ~(_same_special(ours, rounded) | _same_special(ours, same))
    # Finite where torch is not: a fault, unless torch overflowed in an intermediate and ours did not: both
    # huge and of the same sign (found by fuzz-long: smoothing at float64's max, torch's sum overflows).
    huge = rounded.isinf() & (ours.sign() == rounded.sign()) & (ours.abs() >= 1e-3 * torch.finfo(dtype).max)
    bad |= ours.isfinite() & ~rounded.isfinite() & ~same.isfinite() & ~huge
    assert not bad.any(), (
        f"{name}: non-finite mismatch at {bad.nonzero()[:4].tolist()}: ours {ours[bad][:4].tolist()}, "
        f"torch {rounded[bad][:4].tolist()} (float64), {same[bad][:4].tolist()} ({dtype})"
    )
    finite = ours.isfinite() & truth.isfinite() & same.isfinite()
    if not finite.any():
        return
    big = max(1.0, scale, truth[finite].abs().max().item())
    err_ours = (ours - truth)[finite].abs().max().item()
    err_torch = 0.0 if torch_same is None else (same - truth)[finite].abs().max().item()
    limit = 2 * err_torch + ATOL[dtype] * big
    assert err_ours <= limit, f"{name}: error {err_ours:.3g} > {limit:.3g} (torch's own {err_torch:.3g}, {dtype})"


def grad_of(fn, inputs: dict, seed: int, wrt=("input",), dtype: torch.dtype | None = None):
    """(output, {name: grad}) of fn(**inputs), the tensors named in `wrt` as fresh leaves, backward with a
    seeded random upstream gradient. dtype: cast every float tensor to it first (float64: the truth)."""
    leaves = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype or value.dtype).clone()
            value.requires_grad_(name in wrt)
        leaves[name] = value
    out = fn(**leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(upstream.to(out.dtype).to(out.device))
    grads = {name: leaves[name].grad for name in wrt if isinstance(leaves[name], torch.Tensor)}
    return out.detach(), grads


# ----------------------------------------------------------------------------------------------------
# Cross-entropy.
# ----------------------------------------------------------------------------------------------------
CE_OPTIONS = {
    "target": st.sampled_from(["index", "prob"]),
    "layout": st.sampled_from(["(N, C)", "(C,)", "(N, C, d)"]),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    # Subnormal label_smoothing (< 1.2e-38) acts as 0 on the Triton path (test_subnormal_label_smoothing...):
    # torch's smoothing term of that size only shows as nan beside -inf logits; not drawn.
    "label_smoothing": st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(1e-6, 1.0),
    "weight": st.sampled_from([None, "positive", "with_zeros"]),
    "ignore_index": st.sampled_from(["default", "last_class"]),  # -100, or C - 1 (a real class)
    "z_loss": st.sampled_from([0.0, 0.0, 1e-4, 0.1]),
    "softcap": st.sampled_from([None, None, 0.5, 30.0]),
    "memory": st.sampled_from(list(LAYOUTS)),
}
NON_FINITE = [float("inf"), float("-inf"), float("nan")]


def ce_oracle(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """torch's cross-entropy, with our two options written out: softcap feeds softcap * tanh(x / softcap)
    to F.cross_entropy; z_loss adds z_loss * lse^2 per counted row, reduced like the main term."""
    z = input if softcap is None else softcap * torch.tanh(input / softcap)
    loss = F.cross_entropy(z, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)  # fmt: skip
    if not z_loss:
        return loss
    class_dim = 0 if input.dim() == 1 else 1
    lse = torch.logsumexp(z, dim=class_dim)
    counted = torch.ones_like(lse, dtype=torch.bool) if target.is_floating_point() else target != ignore_index
    # (sqrt(z_loss) * lse)^2, not z_loss * lse^2: the same value, and its gradient 2 * z_loss * lse does
    # not overflow through lse^2 at the dtype's max (which the fuzzing found, in this oracle).
    term = torch.where(counted, (math.sqrt(z_loss) * lse).square(), 0.0)
    if reduction == "none":
        return loss + term
    if reduction == "sum":
        return loss + term.sum()
    if target.is_floating_point():
        denom = lse.numel()
    else:
        w_y = torch.ones_like(lse) if weight is None else weight[target.clamp(0, input.shape[class_dim] - 1)]
        denom = torch.where(counted, w_y, 0.0).sum()
    return loss + term.sum() / denom


@st.composite
def ce_case(draw, backend: Backend, dtype: torch.dtype) -> dict:
    o = {name: draw(strategy) for name, strategy in CE_OPTIONS.items()}
    C = draw(st.integers(1, backend.max_classes) | st.sampled_from([1, 2, 3, 5, 27, 33]).filter(
        lambda c: c <= backend.max_classes))  # fmt: skip
    N = draw(st.integers(1, 3))
    shape = {"(N, C)": (N, C), "(C,)": (C,), "(N, C, d)": (N, C, draw(st.integers(1, 2)))}[o["layout"]]
    batch = shape[:1] + shape[2:] if len(shape) > 1 else ()
    rows = math.prod(batch)
    # With z_loss, extremes stay at 1e4: at the dtype's max, z_loss * lse^2 overflows and the oracle's
    # own logsumexp rounds (max + log 2 == max, so its softmax sums to 2): the long profile found both.
    x = draw(values((rows, C), dtype, max_abs=1e4 if o["z_loss"] else math.inf))  # (M, C), shaped below
    ignore_index = -100 if o["ignore_index"] == "default" or o["target"] == "prob" else C - 1
    if o["target"] == "index":
        labels = draw(st.lists(st.integers(0, C - 1) | st.just(ignore_index), min_size=rows, max_size=rows))
        target = torch.tensor(labels, dtype=torch.int64)
        ignored = (target == ignore_index).nonzero().view(-1).tolist()
        for row in ignored:  # +-inf and nan in ignored rows: anywhere, or the whole row
            if draw(st.booleans()):
                x[row] = draw(st.sampled_from(NON_FINITE))
            for col in draw(st.lists(st.integers(0, C - 1), max_size=2)):
                x[row, col] = draw(st.sampled_from(NON_FINITE))
    else:
        p = torch.softmax(draw(values((rows, C), torch.float64, special=False)), dim=1)
        if draw(st.booleans()):  # one-hot rows: zeros in the target
            p = F.one_hot(p.argmax(1), C).double()
        target = p.to(dtype)
    for col in draw(st.lists(st.integers(0, C - 1), max_size=2, unique=True)):  # masked classes: -inf
        x[:, col] = float("-inf")
    weight = None
    if o["weight"] is not None:
        weight = torch.rand(C, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) + 0.1
        if o["weight"] == "with_zeros":
            weight[draw(st.integers(0, C - 1))] = 0.0
        weight = weight.to(dtype)
    if len(shape) == 3:  # (M, C) rows -> (N, C, d)
        x = x.view(shape[0], shape[2], C).movedim(-1, 1)
        target = target.view(batch) if o["target"] == "index" else target.view(shape[0], shape[2], C).movedim(-1, 1)
    elif len(shape) == 1:
        x, target = x[0], target[0]
    return {
        "input": LAYOUTS[o["memory"]](x.contiguous()),
        "target": target.contiguous(),
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": o["reduction"],
        "label_smoothing": o["label_smoothing"],
        "z_loss": o["z_loss"],
        "softcap": o["softcap"],
    }


def _ce_ignored_mask(case: dict) -> torch.Tensor | None:
    """(M,) rows that are ignored, or None for probability targets."""
    target = case["target"]
    if target.is_floating_point():
        return None
    return (target == case["ignore_index"]).reshape(-1)


def _rows(grad: torch.Tensor) -> torch.Tensor:
    """(C,), (N, C), (N, C, d) -> (M, C), class dim last."""
    if grad.dim() == 1:
        return grad.unsqueeze(0)
    return grad.movedim(1, -1).reshape(-1, grad.shape[1])


def check_cross_entropy(case: dict, dtype: torch.dtype, seed: int) -> None:
    on_device = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    loss, grads = grad_of(fused_ops.cross_entropy, on_device, seed)
    truth, truth_grads = grad_of(ce_oracle, case, seed, dtype=torch.float64)
    same, same_grads = (None, {"input": None}) if dtype == torch.float64 else grad_of(ce_oracle, case, seed)
    ours_grad, truth_grad = _rows(grads["input"].cpu()), _rows(truth_grads["input"])
    same_grad = None if same_grads["input"] is None else _rows(same_grads["input"])
    ignored = _ce_ignored_mask(case)
    if ignored is not None and ignored.any():  # the one difference from torch: exactly 0, always
        assert torch.equal(ours_grad[ignored], torch.zeros_like(ours_grad[ignored])), "ignored rows' gradient"
        ours_grad, truth_grad = ours_grad[~ignored], truth_grad[~ignored]
        same_grad = None if same_grad is None else same_grad[~ignored]
    assert_matches("loss", loss.cpu(), truth, same, dtype)
    assert_matches("grad", ours_grad, truth_grad, same_grad, dtype)


def _ce_body(backend: Backend, dtype: torch.dtype):
    return lambda data: check_cross_entropy(data.draw(ce_case(backend, dtype)), dtype, data.draw(st.integers(0, 99)))


@pytest.mark.parametrize(("backend", "dtype"), list(backend_params("float64")))
def test_cross_entropy_float64(backend, dtype):
    fuzz(backend, _ce_body(backend, dtype))


@pytest.mark.parametrize(("backend", "dtype"), list(backend_params("low")))
def test_cross_entropy_same_dtype(backend, dtype):
    fuzz(backend, _ce_body(backend, dtype))


# ----------------------------------------------------------------------------------------------------
# BatchNorm: batch_norm (functional) and BatchNorm1d (module).
# ----------------------------------------------------------------------------------------------------
ACTIVATIONS = {None: lambda t: t, "tanh": torch.tanh, "relu": torch.relu, "silu": F.silu}
BN_SHAPES = {"(N, C)": 2, "(N, C, L)": 3, "(N, C, H, W)": 4}  # name -> input dims
BN_OPTIONS = {
    "shape": st.sampled_from(list(BN_SHAPES)),
    "training": st.booleans(),
    "running_stats": st.booleans(),
    "affine": st.sampled_from([None, "random", "with_zeros"]),
    "momentum": st.sampled_from([0.1, 0.0, 1.0]) | st.floats(0.0, 1.0),
    "eps": st.sampled_from([1e-5, 1e-3, 0.5]),
    "unbiased": st.booleans(),
    "activation": st.sampled_from(list(ACTIVATIONS)),
    "running_var": st.sampled_from(["random", "near_zero", "zero"]),  # eval divides by sqrt(var + eps)
    "zero_variance_channel": st.booleans(),
    "shift": st.sampled_from([0.0, 0.0, 1e2, 1e4]),  # |mean| >> std
    "memory": st.sampled_from(list(LAYOUTS)),
    "residual": st.booleans(),  # act(BatchNorm(x) + residual)
}


def bn_oracle(
    input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, activation, residual
):
    """F.batch_norm, then the activation. unbiased=True normalises with var * n / (n - 1), the same as
    F.batch_norm with eps * (n - 1) / n and weight * sqrt((n - 1) / n)."""
    if unbiased and training:
        n = input.numel() // input.shape[1]
        ratio = (n - 1) / n
        eps = eps * ratio
        gain = math.sqrt(ratio)
        if weight is None:
            param = torch.float32 if input.dtype in HALF else input.dtype
            weight = torch.full((input.shape[1],), gain, dtype=param)
        else:
            weight = weight * gain
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return ACTIVATIONS[activation](y if residual is None else y + residual)


def bn_reference(
    input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, activation, residual
):
    """The float64 truth: F.batch_norm's semantics (its running-stat update included) with x - mean formed
    before anything multiplies it. torch folds the statistics into one scale and shift, y = x * gamma *
    invstd + (beta - mean * gamma * invstd), which for |mean| >> std rounds a product far larger than y:
    in float64 too that is torch's own error (1.3e-10 for a zero-variance channel at 1e4), and torch in
    the test's dtype (float64 included) is judged against this truth like ours."""
    dims = [0, *range(2, input.ndim)]
    view = [1, -1] + [1] * (input.ndim - 2)
    if training or running_mean is None:
        mean, var = input.mean(dims), input.var(dims, correction=1 if unbiased else 0)
    else:
        mean, var = running_mean.clone(), running_var.clone()
    F.batch_norm(input.detach(), running_mean, running_var, None, None, training, momentum, eps)
    y = (input - mean.view(view)) * torch.rsqrt(var + eps).view(view)
    y = y if weight is None else y * weight.view(view)
    y = y if bias is None else y + bias.view(view)
    return ACTIVATIONS[activation](y if residual is None else y + residual)


@st.composite
def bn_case(draw, backend: Backend, dtype: torch.dtype) -> dict:
    o = {name: draw(strategy) for name, strategy in BN_OPTIONS.items()}
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    shape = (N, C, draw(st.integers(1, backend.max_length)), draw(st.integers(1, 2)))[: BN_SHAPES[o["shape"]]]
    x = draw(values(shape, dtype, max_abs=backend.bn_max_abs)).double() + o["shift"]
    if o["zero_variance_channel"]:
        x[:, draw(st.integers(0, C - 1))] = draw(st.sampled_from([0.0, 1.0, 1e4]))
    param = torch.float32 if dtype in HALF else dtype
    gen = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    weight = bias = None
    if o["affine"] is not None:
        weight, bias = torch.randn(C, generator=gen) + 1, torch.randn(C, generator=gen)
        if o["affine"] == "with_zeros":
            weight[draw(st.integers(0, C - 1))] = 0.0
        weight, bias = weight.to(param), bias.to(param)
    running_mean = running_var = None
    if o["running_stats"]:
        running_mean = torch.randn(C, generator=gen).to(param)
        running_var = {
            "random": torch.rand(C, generator=gen) + 0.5,
            "near_zero": torch.rand(C, generator=gen) * 1e-6,
            "zero": torch.zeros(C),
        }[o["running_var"]].to(param)
    return {
        "input": LAYOUTS[o["memory"]](x.to(dtype)),
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
        "training": o["training"] or running_mean is None,  # eval needs running stats
        "momentum": o["momentum"],
        "eps": o["eps"],
        "unbiased": o["unbiased"],
        "activation": o["activation"],
        "residual": LAYOUTS[o["memory"]](torch.randn(shape, generator=gen).to(dtype)) if o["residual"] else None,
    }


def _fresh_stats(case: dict, dtype: torch.dtype | None = None, device: str = "cpu") -> dict:
    """The case with its own copies of the running stats (both sides update them in place)."""
    out = dict(case)
    for name in ("running_mean", "running_var"):
        if case[name] is not None:
            out[name] = case[name].clone().to(device=device, dtype=dtype or case[name].dtype)
    return out


def check_batch_norm(case: dict, dtype: torch.dtype, seed: int) -> None:
    wrt = ("input", "weight", "bias", "residual")
    one_value = case["training"] and case["input"].numel() == case["input"].shape[1]
    ours_case = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in _fresh_stats(case, device=DEVICE).items()}
    if one_value:  # torch raises (one value per channel in training); so must we, changing nothing
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm(**{k: v for k, v in case.items() if k not in ("unbiased", "activation", "residual")})
        before = {k: ours_case[k].clone() for k in ("running_mean", "running_var") if ours_case[k] is not None}
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fused_ops.batch_norm(**ours_case)
        for k, v in before.items():
            assert torch.equal(ours_case[k], v), f"{k} changed by a call that raised"
        return
    y, grads = grad_of(fused_ops.batch_norm, ours_case, seed, wrt)
    truth_case = _fresh_stats(case, torch.float64)
    truth, truth_grads = grad_of(bn_reference, truth_case, seed, wrt, dtype=torch.float64)
    same_case = _fresh_stats(case)
    same, same_grads = grad_of(bn_oracle, same_case, seed, wrt)  # torch in the test's dtype, float64 too
    assert_matches("y", y.cpu(), truth, same, dtype)
    for name in wrt:
        ours_grad = None if grads.get(name) is None else grads[name].cpu()
        assert_matches(f"d{name}", ours_grad, truth_grads.get(name), same_grads.get(name), dtype)
    for name in ("running_mean", "running_var"):
        if case[name] is not None:  # fp32 stats for half input: judged in float32 against torch's error
            stat_dtype = case[name].dtype
            assert_matches(name, ours_case[name].cpu(), truth_case[name], same_case[name], stat_dtype)


def _bn_body(backend: Backend, dtype: torch.dtype):
    return lambda data: check_batch_norm(data.draw(bn_case(backend, dtype)), dtype, data.draw(st.integers(0, 99)))


@pytest.mark.parametrize(("backend", "dtype"), list(backend_params("float64")))
def test_batch_norm_float64(backend, dtype):
    fuzz(backend, _bn_body(backend, dtype))


@pytest.mark.parametrize(("backend", "dtype"), list(backend_params("low")))
def test_batch_norm_same_dtype(backend, dtype):
    fuzz(backend, _bn_body(backend, dtype))


MODULE_OPTIONS = {
    "affine": st.booleans(),
    "track_running_stats": st.booleans(),
    "momentum": st.sampled_from([0.1, None, 1.0]) | st.floats(0.0, 1.0),
    "eps": st.sampled_from([1e-5, 1e-3, 0.5]),
    "activation": st.sampled_from(list(ACTIVATIONS)),
    "shape": st.sampled_from(list(BN_SHAPES)),
}


def check_module(data, dtype: torch.dtype, max_abs: float) -> None:
    """fused_ops.BatchNorm1d against nn.BatchNorm1d (+ activation) over two training steps, then eval:
    outputs, input and parameter gradients, and every buffer (num_batches_tracked included). The truth
    is torch's module in float64; below float64, torch's module in the same dtype sets the error bar."""
    o = {name: data.draw(strategy) for name, strategy in MODULE_OPTIONS.items()}
    C = data.draw(st.integers(1, 7))
    kwargs = {k: o[k] for k in ("affine", "track_running_stats", "momentum", "eps")}
    truth = torch.nn.BatchNorm1d(C, **kwargs).double()
    if o["affine"]:
        with torch.no_grad():
            truth.weight.uniform_(0.5, 1.5), truth.bias.uniform_(-1, 1)
    ours = fused_ops.BatchNorm1d(C, activation=o["activation"], **kwargs).to(DEVICE, dtype)
    ours.load_state_dict(truth.state_dict())
    same = None if dtype == torch.float64 else torch.nn.BatchNorm1d(C, **kwargs).to(dtype)
    if same is not None:
        same.load_state_dict(truth.state_dict())
    act = ACTIVATIONS[o["activation"]]
    for step, training in enumerate((True, True, False)):
        for module in (ours, truth, same):
            if module is not None:
                module.train(training)
        N = data.draw(st.integers(2, 3))
        shape = (N, C) if BN_SHAPES[o["shape"]] == 2 else (N, C, data.draw(st.integers(1, 3)))
        x = data.draw(values(shape, dtype, max_abs=max_abs)) + data.draw(st.sampled_from([0.0, 1e2]))
        y, grads = grad_of(lambda input: ours(input), {"input": x.to(DEVICE)}, step)
        ref, ref_grads = grad_of(lambda input: act(truth(input)), {"input": x}, step, dtype=torch.float64)
        same_y, same_grads = (None, {"input": None}) if same is None else grad_of(lambda input: act(same(input)), {"input": x}, step)
        assert_matches(f"step {step}: y", y.cpu(), ref, same_y, dtype)
        assert_matches(f"step {step}: dx", grads["input"].cpu(), ref_grads["input"], same_grads["input"], dtype)
        for name, p in truth.named_parameters():
            same_grad = None if same is None else getattr(same, name).grad
            assert_matches(f"step {step}: d{name}", getattr(ours, name).grad.cpu(), p.grad, same_grad, dtype)
            for module in (ours, truth, same):
                if module is not None:
                    getattr(module, name).grad = None
        for name, buf in truth.named_buffers():
            mine = getattr(ours, name).cpu()
            if buf.is_floating_point():
                same_buf = None if same is None else getattr(same, name)
                assert_matches(f"step {step}: {name}", mine, buf, same_buf, dtype)
            else:
                assert torch.equal(mine, buf), f"step {step}: {name} {mine} vs torch's {buf}"


@pytest.mark.parametrize("backend", [pytest.param(b, id=b.name) for b in BACKENDS])
def test_batch_norm1d_module(backend):
    if not backend.available():
        pytest.skip(f"backend {backend.name} cannot run here")
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    fuzz(backend, lambda data: check_module(data, dtype, backend.bn_max_abs))
