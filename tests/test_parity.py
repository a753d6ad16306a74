"""The parity report: it passes on the real gradients and catches wrong ones."""

import argparse

import pytest
import torch

from fused_ops.makemore import parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_report_passes(dtype):
    loss, blocks = parity.parity_report(dtype)
    assert 3.0 < loss < 3.6  # about -log(1/27) = 3.30 at the notebook's initialisation
    assert len(blocks) == 3
    expected = list(parity.PARAMETERS + parity.BOUNDARIES)
    assert [row.name for row in blocks[0].rows] == expected
    assert [row.name for row in blocks[1].rows] == ["loss", *expected]
    assert [row.name for row in blocks[2].rows] == ["loss", *(n for n in expected if n != "hpreact")]
    for block in blocks:
        assert block.loss == pytest.approx(loss, rel=1e-6)
        for row in block.rows:
            assert row.approx, (block.title, row)
            tolerance = 1e-7 if dtype == torch.float32 else 1e-15
            if row.name == "loss":  # 2 ulp of the loss: the native kernel sums the rows' losses in
                tolerance = 2 * torch.finfo(dtype).eps * loss  # float64, torch in float32 (1 ulp apart)
            assert row.maxdiff < tolerance, (block.title, row)


def test_compare_flags_a_perturbed_tensor():
    reference = torch.randn(32, 64)
    assert parity.compare("x", reference.clone(), reference) == parity.Row("x", True, True, 0.0)
    close = reference * (1 + 1e-7)
    row = parity.compare("x", close, reference)
    assert not row.exact and row.approx
    wrong = reference.clone()
    wrong[3, 5] += 1e-3
    row = parity.compare("x", wrong, reference)
    assert not row.exact and not row.approx and row.maxdiff == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="shape"):
        parity.compare("x", reference[:1], reference)


def test_manual_gradient_with_a_wrong_step_is_caught():
    """A per-feature offset in dhprebn (what the seed's `(-dbndiff).sum()` bug adds), carried into dW1 and
    db1, fails exactly those rows."""
    p, Xb, Yb = parity.notebook_inputs()
    _, reference = parity.autograd_gradients(p, Xb, Yb)
    with torch.no_grad():
        t = parity.notebook_forward(p, Xb, Yb)
    manual = parity.manual_gradients(p, Xb, Yb, t)
    dhprebn = manual["hprebn"] + 1e-4 * torch.randn(1, manual["hprebn"].shape[1])
    wrong = dict(manual, hprebn=dhprebn, W1=t["embcat"].T @ dhprebn, b1=dhprebn.sum(0))
    failing = {row.name for row in parity.compare_all(wrong, reference) if not row.approx}
    assert failing == {"hprebn", "W1", "b1"}


def test_inputs_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    (p1, X1, Y1), (p2, X2, Y2) = parity.notebook_inputs(), parity.notebook_inputs()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(X1, X2) and torch.equal(Y1, Y2) and X1.shape == (32, 3)
    assert all(torch.equal(p1[name], p2[name]) for name in parity.PARAMETERS)
    # the notebook's generator draws, in the notebook's order
    g = torch.Generator().manual_seed(2147483647)
    assert torch.equal(p1["C"], torch.randn((27, 10), generator=g))
    assert p1["W1"].shape == (30, 64) and p1["bngain"].shape == (1, 64)


def test_main_exits_1_when_a_fused_gradient_is_wrong(monkeypatch, capsys):
    real = parity.fused_gradients

    def broken(*args, **kwargs):
        loss, grads = real(*args, **kwargs)
        return loss, dict(grads, W2=grads["W2"] * 1.01)

    monkeypatch.setattr(parity, "fused_gradients", broken)
    assert parity.main(argparse.Namespace(dtype="float32")) == 1
    out = capsys.readouterr().out
    assert "FAIL: 2 of 40 rows" in out and "W2, W2" in out
