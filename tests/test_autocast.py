"""The fused ops under torch.autocast, against torch's own ops under the same autocast.

Torch's behaviour, which the fused ops match: autocast lists cross_entropy among its float32 ops
(CPU and CUDA), so the loss is float32 and the gradient keeps the logits' dtype; batch_norm is on
neither list, so it runs in the input's dtype: bf16 in, bf16 out, beside float32 weight, bias and
running stats, with float32 statistics. CPU tests use bfloat16 autocast with the PyTorch path; the
same tests on CUDA (marked gpu) run the Triton kernels.
Low-precision results are judged against a float32 reference: err(ours) <= 2 * err(torch) + atol.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_ops
from fused_ops.makemore.model import MLP

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BF16 = torch.bfloat16


def autocast(device: str):
    return torch.autocast(device, dtype=BF16)


def max_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item()


def assert_within_torch_error(ours, theirs, reference, atol: float) -> None:
    """err(ours) <= 2 * err(torch) + atol, both measured against the float32 reference."""
    ours_err, torch_err = max_err(ours, reference), max_err(theirs, reference)
    assert ours_err <= 2 * torch_err + atol, f"error {ours_err:.3g} vs torch's {torch_err:.3g}"


# ----------------------------------------------------------------------------------------------------
# Cross-entropy: float32 loss, gradient in the logits' dtype.
# ----------------------------------------------------------------------------------------------------
CE_OPTIONS = {
    "plain": {},
    "weight+smoothing+ignore": {"weight": True, "label_smoothing": 0.1, "ignore_index": 2},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16 logits", "fp32 logits"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", CE_OPTIONS.values(), ids=CE_OPTIONS.keys())
def test_cross_entropy_under_autocast_like_torch(device, dtype, reduction, options):
    """(64, 27): makemore's classes. bf16 logits are what an autocast Linear hands the loss."""
    logits = (torch.randn(64, 27, device=device) * 3).to(dtype)
    target = torch.randint(0, 27, (64,), device=device)
    options = dict(options, reduction=reduction)
    if options.pop("weight", False):
        options["weight"] = torch.rand(27, device=device)
    if "ignore_index" in options:
        target[::5] = options["ignore_index"]

    def run(fn, autocast_on: bool, x: torch.Tensor, upstream: torch.Tensor | None = None):
        leaf = x.detach().clone().requires_grad_(True)
        with torch.autocast(device, dtype=BF16, enabled=autocast_on):
            loss = fn(leaf, target, **options)
        loss.backward(torch.ones_like(loss) if upstream is None else upstream)
        return loss.detach(), leaf.grad

    # float32 reference: the same (bf16-valued) logits in float32, without autocast
    exact_loss, exact_grad = run(F.cross_entropy, False, logits.float())
    upstream = torch.randn_like(exact_loss)
    exact_loss, exact_grad = run(F.cross_entropy, False, logits.float(), upstream)
    ours_loss, ours_grad = run(fused_ops.cross_entropy, True, logits, upstream)
    ref_loss, ref_grad = run(F.cross_entropy, True, logits, upstream)

    assert ours_loss.dtype == ref_loss.dtype == torch.float32
    assert ours_grad.dtype == ref_grad.dtype == dtype
    torch.testing.assert_close(ours_loss, exact_loss)  # float32 statistics: float32 accuracy
    assert_within_torch_error(ours_grad, ref_grad, exact_grad, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_kernels_write_a_float32_loss_under_autocast(reduction):
    """The kernels themselves (TRITON_INTERPRET=1 on CPU, compiled on CUDA): bf16 logits in, float32
    loss out of the forward (two programs at (100, 27), so the "mean"/"sum" finish kernel writes it),
    and a float32 grad_output scaling the bf16 gradient in the backward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = (torch.randn(100, 27, device=device) * 3).to(BF16)
    target = torch.randint(0, 27, (100,), device=device)
    target[::7] = -100
    upstream = None
    results = []
    for fn, x, autocast_on in (
        (F.cross_entropy, logits.float(), False),  # float32 reference on the same bf16 values
        (fused_ops.cross_entropy, logits, True),
        (F.cross_entropy, logits, True),
    ):
        leaf = x.detach().clone().requires_grad_(True)
        with torch.autocast(device, dtype=BF16, enabled=autocast_on), fused_ops.use_backend("triton"):
            loss = fn(leaf, target, reduction=reduction, label_smoothing=0.1)
        upstream = torch.rand_like(loss) + 0.5 if upstream is None else upstream
        loss.backward(upstream)
        results.append((loss.detach(), leaf.grad))
    (exact, exact_grad), (ours, ours_grad), (ref, ref_grad) = results
    assert ours.dtype == ref.dtype == torch.float32
    assert ours_grad.dtype == ref_grad.dtype == BF16
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, exact)  # float32 statistics: float32 accuracy
    # The kernel rounds the unit-upstream gradient to bf16 in the forward, and the backward scales that:
    # up to one bf16 ulp (2^-7 at these gradients' magnitude, < 1.5) beyond torch's single rounding.
    assert_within_torch_error(ours_grad, ref_grad, exact_grad, atol=2**-7)


@pytest.mark.parametrize("device", DEVICES)
def test_probability_target_of_another_dtype_under_autocast(device):
    """Outside autocast a probability target must have the logits' dtype; under autocast both are
    cast to float32, as torch's autocast does for cross_entropy."""
    logits = torch.randn(16, 27, device=device).to(BF16)
    probs = torch.softmax(torch.randn(16, 27, device=device), dim=1)  # float32
    with pytest.raises(TypeError, match="dtype"):
        fused_ops.cross_entropy(logits, probs)
    results = []
    for fn in (fused_ops.cross_entropy, F.cross_entropy):
        leaf = logits.detach().clone().requires_grad_(True)
        with autocast(device):
            loss = fn(leaf, probs, label_smoothing=0.05)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (ours, ours_grad), (ref, ref_grad) = results
    assert ours.dtype == ref.dtype == torch.float32
    assert ours_grad.dtype == ref_grad.dtype == BF16
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_grad, ref_grad)


# ----------------------------------------------------------------------------------------------------
# BatchNorm: runs in the input's dtype, float32 statistics and running stats.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "tanh"])
def test_batch_norm_under_autocast_like_torch(device, activation):
    """(64, 200) bf16 input, |mean| > std, into modules with float32 parameters and running stats."""
    x = (torch.randn(64, 200, device=device) * 2 + 3).to(BF16)
    dy = torch.randn(64, 200, device=device).to(BF16)
    ours = fused_ops.BatchNorm1d(200, activation=activation).to(device)
    theirs = nn.BatchNorm1d(200).to(device)
    exact = copy.deepcopy(theirs)  # float32 reference, without autocast
    with torch.no_grad():
        for module in (ours, theirs, exact):
            module.weight.copy_(torch.rand(200) + 0.5)
            module.bias.copy_(torch.randn(200))
    act = torch.tanh if activation == "tanh" else (lambda t: t)

    def run(module, fn, x_in, dy_in, autocast_on: bool):
        leaf = x_in.detach().clone().requires_grad_(True)
        with torch.autocast(device, dtype=BF16, enabled=autocast_on):
            y = fn(leaf)
        y.backward(dy_in)
        return y.detach(), leaf.grad, module.weight.grad, module.bias.grad

    y, dx, dw, db = run(ours, ours, x, dy, True)
    y_ref, dx_ref, dw_ref, db_ref = run(theirs, lambda t: act(theirs(t)), x, dy, True)
    y_ex, dx_ex, dw_ex, db_ex = run(exact, lambda t: act(exact(t)), x.float(), dy.float(), False)

    assert y.dtype == y_ref.dtype == BF16 and dx.dtype == dx_ref.dtype == BF16
    assert dw.dtype == db.dtype == ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    # float32 statistics: the running stats are those of the bf16 values computed in float32
    torch.testing.assert_close(ours.running_mean, exact.running_mean)
    torch.testing.assert_close(ours.running_var, exact.running_var)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)  # and as torch's under autocast
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    for value, torch_value, reference in (
        (y, y_ref, y_ex),
        (dx, dx_ref, dx_ex),
        (dw, dw_ref, dw_ex),
        (db, db_ref, db_ex),
    ):
        assert_within_torch_error(value, torch_value, reference, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# The makemore MLP under autocast: eager, and compiled.
# ----------------------------------------------------------------------------------------------------
def _mlp_step(model: MLP, forward, idx, targets, device):
    model.zero_grad(set_to_none=True)
    with autocast(device):
        logits, loss = forward(idx, targets)
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_under_autocast_like_torch_modules(device):
    """Fused and unfused MLPs with the same parameters: same dtypes, loss and gradients within
    twice the unfused model's own error against a float32 run."""
    fused = MLP(fused=True, generator=torch.Generator().manual_seed(3)).to(device)
    unfused = MLP(fused=False).to(device)
    unfused.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 27, (64, 3), device=device)
    targets = torch.randint(0, 27, (64,), device=device)
    exact = copy.deepcopy(unfused)
    exact.zero_grad()
    _, exact_loss = exact(idx, targets)
    exact_loss.backward()

    logits, loss, grads = _mlp_step(fused, fused, idx, targets, device)
    ref_logits, ref_loss, ref_grads = _mlp_step(unfused, unfused, idx, targets, device)
    assert logits.dtype == ref_logits.dtype == BF16
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert_within_torch_error(loss, ref_loss, exact_loss.detach(), atol=1e-3)
    for grad, ref_grad, param in zip(grads, ref_grads, exact.parameters(), strict=True):
        assert grad.dtype == ref_grad.dtype == torch.float32
        assert_within_torch_error(grad, ref_grad, param.grad, atol=1e-4)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_mlp_under_autocast_matches_eager(device):
    """torch.compile (fullgraph) traces the autocast-dependent loss dtype: same results as eager."""
    model = MLP(generator=torch.Generator().manual_seed(4)).to(device)
    twin = copy.deepcopy(model)
    backend = "aot_eager" if device == "cpu" else "inductor"
    compiled = torch.compile(twin, backend=backend, fullgraph=True)
    idx = torch.randint(0, 27, (32, 3), device=device)
    targets = torch.randint(0, 27, (32,), device=device)
    logits, loss, grads = _mlp_step(model, model, idx, targets, device)
    c_logits, c_loss, c_grads = _mlp_step(twin, compiled, idx, targets, device)
    assert c_loss.dtype == loss.dtype == torch.float32
    tolerance = {"atol": 1e-2, "rtol": 1e-2}  # Inductor may fuse bf16 ops differently
    torch.testing.assert_close(c_logits, logits, **tolerance)
    torch.testing.assert_close(c_loss, loss, **tolerance)
    torch.testing.assert_close(c_grads, grads, **tolerance)
