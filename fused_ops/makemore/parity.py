"""The parity report: the seed notebook's gradient check, extended to the fused ops.

One batch of 32 goes through the notebook's MLP (n_embd 10, n_hidden 64, block_size 3), and the
gradient of the loss with respect to every parameter and every tensor at an op boundary is computed
four ways:

    manual    the notebook's backprop, written out step by step (dlogprobs ... dC);
    autograd  plain PyTorch autograd through the notebook's step-by-step forward (the reference);
    fused     fused_ops.cross_entropy and fused_ops.batch_norm(unbiased=True), tanh separate;
    fused+act the same with tanh fused into the BatchNorm (activation="tanh"), as the trained model does.

Each of the last three is compared against autograd, row by row: exact (bitwise equal), approx
(torch.allclose at the dtype's tolerance) and maxdiff (largest absolute difference).

Initialisation is the notebook's: C, W1, b1, W2, b2 and the batch indices come from
`torch.Generator().manual_seed(2147483647)` in the notebook's order, so they equal the notebook's
tensors. The notebook draws bngain and bnbias from the *global* RNG, which makes them depend on
whatever ran before; here they come from their own generator seeded with BN_SEED instead (same
formulas: N(1, 0.1^2) and N(0, 0.1^2)), which leaves the other draws untouched. The values are
drawn in float32 as in the notebook and then cast to the requested dtype.

One fix to the seed: it computes `dbnmeani = (-dbndiff).sum()`, summing over the features as well as
the batch, which makes dhprebn, dembcat, dW1, db1, demb and dC wrong (its printed table stops before
those rows). The mean is per feature, so here it is `(-dbndiff).sum(0, keepdim=True)`.

    python -m fused_ops parity [--dtype float32|float64]      # exits 1 if any row is not approx equal
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fused_ops import batch_norm, cross_entropy
from fused_ops.makemore.data import load_dataset

NOTEBOOK_SEED = 2147483647
BN_SEED = 42  # bngain / bnbias: the notebook uses the global RNG (see the module docstring)
N_EMBD, N_HIDDEN, BATCH_SIZE, EPS = 10, 64, 32, 1e-5
PARAMETERS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
BOUNDARIES = ("emb", "embcat", "hprebn", "hpreact", "h", "logits")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# torch.allclose tolerances: the notebook's defaults for float32; ~1e-9 relative error for float64.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-8}, torch.float64: {"rtol": 1e-9, "atol": 1e-14}}


@dataclass(frozen=True)
class Row:
    name: str
    exact: bool
    approx: bool
    maxdiff: float


@dataclass(frozen=True)
class Block:
    """One way of computing the gradients, compared row by row against autograd."""

    title: str
    loss: float
    rows: list[Row]


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor) -> Row:
    """One report row: is `ours` bitwise equal / allclose to `reference`, and their max abs difference."""
    if ours.shape != reference.shape:
        raise ValueError(
            f"{name}: shape {tuple(ours.shape)} differs from the reference's {tuple(reference.shape)}"
        )
    tolerance = TOLERANCES.get(reference.dtype, TOLERANCES[torch.float32])
    return Row(
        name=name,
        exact=torch.equal(ours, reference),
        approx=torch.allclose(ours, reference, **tolerance),
        maxdiff=(ours - reference).abs().max().item(),
    )


def notebook_inputs(
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The notebook's parameters and its first training batch: (params, Xb (32, 3), Yb (32,))."""
    train = load_dataset().train
    vocab_size, fan_in = 27, N_EMBD * train.X.shape[1]
    g = torch.Generator().manual_seed(NOTEBOOK_SEED)
    params = {
        "C": torch.randn((vocab_size, N_EMBD), generator=g),
        "W1": torch.randn((fan_in, N_HIDDEN), generator=g) * (5 / 3) / fan_in**0.5,
        "b1": torch.randn(N_HIDDEN, generator=g) * 0.1,
        "W2": torch.randn((N_HIDDEN, vocab_size), generator=g) * 0.1,
        "b2": torch.randn(vocab_size, generator=g) * 0.1,
    }
    bn_generator = torch.Generator().manual_seed(BN_SEED)
    params["bngain"] = torch.randn((1, N_HIDDEN), generator=bn_generator) * 0.1 + 1.0
    params["bnbias"] = torch.randn((1, N_HIDDEN), generator=bn_generator) * 0.1
    ix = torch.randint(0, train.X.shape[0], (BATCH_SIZE,), generator=g)
    return {name: p.to(dtype) for name, p in params.items()}, train.X[ix], train.Y[ix]


def notebook_forward(
    p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The notebook's forward, broken into the small steps its manual backprop differentiates."""
    n = Xb.shape[0]
    t: dict[str, torch.Tensor] = {}
    t["emb"] = p["C"][Xb]
    t["embcat"] = t["emb"].view(n, -1)
    t["hprebn"] = t["embcat"] @ p["W1"] + p["b1"]
    t["bnmeani"] = 1 / n * t["hprebn"].sum(0, keepdim=True)
    t["bndiff"] = t["hprebn"] - t["bnmeani"]
    t["bndiff2"] = t["bndiff"] ** 2
    t["bnvar"] = 1 / (n - 1) * t["bndiff2"].sum(0, keepdim=True)  # Bessel's correction, as in the notebook
    t["bnvar_inv"] = (t["bnvar"] + EPS) ** -0.5
    t["bnraw"] = t["bndiff"] * t["bnvar_inv"]
    t["hpreact"] = p["bngain"] * t["bnraw"] + p["bnbias"]
    t["h"] = torch.tanh(t["hpreact"])
    t["logits"] = t["h"] @ p["W2"] + p["b2"]
    t["logit_maxes"] = t["logits"].max(1, keepdim=True).values
    t["norm_logits"] = t["logits"] - t["logit_maxes"]  # subtract the max for numerical stability
    t["counts"] = t["norm_logits"].exp()
    t["counts_sum"] = t["counts"].sum(1, keepdim=True)
    t["counts_sum_inv"] = t["counts_sum"] ** -1
    t["probs"] = t["counts"] * t["counts_sum_inv"]
    t["logprobs"] = t["probs"].log()
    t["loss"] = -t["logprobs"][range(n), Yb].mean()
    return t


def manual_gradients(
    p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, t: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The notebook's backprop by hand, step by step, from the forward intermediates `t`."""
    n = Xb.shape[0]
    logprobs, probs, counts, counts_sum = t["logprobs"], t["probs"], t["counts"], t["counts_sum"]
    counts_sum_inv, logits, h, bnraw = t["counts_sum_inv"], t["logits"], t["h"], t["bnraw"]
    bndiff, bnvar, bnvar_inv, emb, embcat = t["bndiff"], t["bnvar"], t["bnvar_inv"], t["emb"], t["embcat"]
    # cross-entropy: loss = -mean(logprobs[i, Yb[i]])
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[range(n), Yb] = -1.0 / n
    dprobs = (1.0 / probs) * dlogprobs
    dcounts_sum_inv = (dprobs * counts).sum(1, keepdim=True)
    dcounts = dprobs * counts_sum_inv
    dcounts_sum = (-(counts_sum**-2)) * dcounts_sum_inv
    dcounts += torch.ones_like(counts) * dcounts_sum
    dnorm_logits = counts * dcounts
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    dlogits = dnorm_logits.clone()
    dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
    # second linear layer and tanh
    dh = dlogits @ p["W2"].T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1 - h**2) * dh
    # batch norm, unbiased variance
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnraw = dhpreact * p["bngain"]
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbndiff = bnvar_inv * dbnraw
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
    dbnvar = (-0.5 * (bnvar + EPS) ** -1.5) * dbnvar_inv
    dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(dbndiff) * dbnvar
    dbndiff += 2 * bndiff * dbndiff2
    dhprebn = dbndiff.clone()
    dbnmeani = (-dbndiff).sum(0, keepdim=True)  # per feature; the seed's `.sum()` over all dims is a bug
    dhprebn += (1 / n) * torch.ones_like(t["hprebn"]) * dbnmeani
    # first linear layer and the embedding lookup
    dembcat = dhprebn @ p["W1"].T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(emb.shape)
    dC = torch.zeros_like(p["C"])
    dC.index_add_(
        0, Xb.view(-1), demb.view(-1, emb.shape[-1])
    )  # the notebook's loop dC[Xb[t, k]] += demb[t, k]
    return {
        "C": dC, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "bngain": dbngain, "bnbias": dbnbias,
        "emb": demb, "embcat": dembcat, "hprebn": dhprebn, "hpreact": dhpreact, "h": dh, "logits": dlogits,
    }  # fmt: skip


def _leaves(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone().requires_grad_() for name, value in p.items()}


def _gradients(p: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backpropagate t["loss"] and collect .grad of every parameter and every boundary tensor in `t`."""
    for name in BOUNDARIES:
        if name in t:
            t[name].retain_grad()
    t["loss"].backward()
    grads = {name: p[name].grad for name in PARAMETERS}
    grads.update({name: t[name].grad for name in BOUNDARIES if name in t})
    return grads


def autograd_gradients(
    p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradients) by autograd through the notebook's forward."""
    p = _leaves(p)
    t = notebook_forward(p, Xb, Yb)
    return t["loss"].detach(), _gradients(p, t)


def fused_gradients(
    p: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, *, fuse_tanh: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradients) with fused_ops.batch_norm(unbiased=True) and fused_ops.cross_entropy.

    With fuse_tanh, tanh runs inside the BatchNorm op and there is no hpreact tensor to report.
    """
    p = _leaves(p)
    n = Xb.shape[0]
    t: dict[str, torch.Tensor] = {}
    t["emb"] = p["C"][Xb]
    t["embcat"] = t["emb"].view(n, -1)
    t["hprebn"] = t["embcat"] @ p["W1"] + p["b1"]
    bn_args = (t["hprebn"], None, None, p["bngain"].view(-1), p["bnbias"].view(-1))
    if fuse_tanh:
        t["h"] = batch_norm(*bn_args, training=True, eps=EPS, unbiased=True, activation="tanh")
    else:
        t["hpreact"] = batch_norm(*bn_args, training=True, eps=EPS, unbiased=True)
        t["h"] = torch.tanh(t["hpreact"])
    t["logits"] = t["h"] @ p["W2"] + p["b2"]
    t["loss"] = cross_entropy(t["logits"], Yb)
    return t["loss"].detach(), _gradients(p, t)


def compare_all(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[Row]:
    """Rows for every parameter, then every boundary tensor, that `ours` has."""
    return [compare(name, ours[name], reference[name]) for name in PARAMETERS + BOUNDARIES if name in ours]


def parity_report(dtype: torch.dtype = torch.float32) -> tuple[float, list[Block]]:
    """(autograd loss, one Block per way of computing the gradients, each compared against autograd)."""
    p, Xb, Yb = notebook_inputs(dtype)
    loss, reference = autograd_gradients(p, Xb, Yb)
    with torch.no_grad():
        t = notebook_forward(p, Xb, Yb)
    manual = manual_gradients(p, Xb, Yb, t)
    fused_loss, fused = fused_gradients(p, Xb, Yb)
    act_loss, fused_act = fused_gradients(p, Xb, Yb, fuse_tanh=True)
    blocks = [
        Block(
            "manual backprop (the notebook's, step by step) vs autograd",
            t["loss"].item(),
            compare_all(manual, reference),
        ),
        Block(
            "fused ops (fused_ops.cross_entropy, fused_ops.batch_norm unbiased=True, torch.tanh) vs autograd",
            fused_loss.item(),
            [compare("loss", fused_loss, loss), *compare_all(fused, reference)],
        ),
        Block(
            'fused ops with tanh inside the BatchNorm (activation="tanh") vs autograd',
            act_loss.item(),
            [compare("loss", act_loss, loss), *compare_all(fused_act, reference)],
        ),
    ]
    return loss.item(), blocks


def format_row(row: Row) -> str:
    return f"{row.name:8s} | {row.exact!s:5s} | {row.approx!s:6s} | {row.maxdiff:.3e}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="precision (default float32)"
    )


def main(args: argparse.Namespace) -> int:
    """Print the report; 0 when every row is approximately equal, else 1."""
    dtype = DTYPES[args.dtype]
    loss, blocks = parity_report(dtype)
    tolerance = ", ".join(f"{k}={v:g}" for k, v in TOLERANCES[dtype].items())
    print(
        f"Parity report: the seed notebook's MLP (n_embd {N_EMBD}, n_hidden {N_HIDDEN}), one batch of "
        f"{BATCH_SIZE}, {args.dtype}"
    )
    print(f"Rows compare d(loss)/d(name) against autograd's; approx = torch.allclose({tolerance}).")
    print(f"autograd loss {loss:.6f}")
    failures = []
    for block in blocks:
        print(f"\n{block.title}  (loss {block.loss:.6f})")
        print(f"{'name':8s} | exact | approx | maxdiff")
        for row in block.rows:
            print(format_row(row))
            if not row.approx:
                failures.append(row.name)
    total = sum(len(block.rows) for block in blocks)
    if failures:
        print(f"\nFAIL: {len(failures)} of {total} rows are not approximately equal: {', '.join(failures)}")
        return 1
    print(f"\nOK: all {total} rows approximately equal")
    return 0
