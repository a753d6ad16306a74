"""Eager per-call overhead of the fused ops at makemore sizes, against torch's own ops.

    python -m bench.overhead                    # CPU, 1 thread, ~3 s per row (~30 s in all)
    python -m bench.overhead --min-run-time 3   # steadier medians on a busy machine
    python -m bench.overhead --backend torch    # the fused ops on their PyTorch path

The fused ops run on the backend that "auto" picks (on CPU: the native kernels), or on the one
--backend forces.

At these sizes ((32, 27) logits, (32, 200) hidden units) the arithmetic takes a few microseconds, so
the time per call is almost all Python and dispatch: argument checks, the backend choice, the call
into the op and its autograd node (on the PyTorch path: the autograd.Function and each small tensor
op). Rows:
    cross_entropy    fused_ops.cross_entropy vs F.cross_entropy, logits (32, 27) fp32, targets (32,)
    batch_norm       fused_ops.batch_norm vs F.batch_norm, training, x (32, 200) fp32, running stats
    BatchNorm1d      fused_ops.BatchNorm1d(200) vs nn.BatchNorm1d(200), training
    BatchNorm1d+tanh fused_ops.BatchNorm1d(200, activation="tanh") vs nn.BatchNorm1d(200) then tanh
    makemore step    MLP(fused=True) vs MLP(fused=False): forward and loss (fwd), + backward (fwd+bwd)
Modes: "fwd" runs without autograd (inputs do not require grad); "fwd+bwd" runs the forward with
inputs that require grad, then backward from a fixed upstream gradient.
Timing: `torch.utils.benchmark.Timer.blocked_autorange` (the median over blocks of calls), in
`--rounds` alternating fused/torch measurements; the table gives their medians, and the medians of
the per-round overhead and ratio.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.benchmark as torch_benchmark
from torch import nn

import fused_ops
from fused_ops.makemore.model import MLP

BATCH, VOCAB, HIDDEN, BLOCK_SIZE = 32, 27, 200, 3  # makemore: batch 32, 27 characters, 200 hidden units


def _backward(out: torch.Tensor, upstream: torch.Tensor | None, leaves: tuple[torch.Tensor, ...]) -> None:
    for t in leaves:
        t.grad = None
    out.backward(upstream)


def cases(mode: str) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (fused call, torch call), both for `mode` ("fwd" or "fwd+bwd")."""
    grad = mode == "fwd+bwd"
    logits = torch.randn(BATCH, VOCAB, requires_grad=grad)
    target = torch.randint(0, VOCAB, (BATCH,))
    x = torch.randn(BATCH, HIDDEN, requires_grad=grad)
    dy = torch.randn(BATCH, HIDDEN)
    weight = torch.rand(HIDDEN, requires_grad=grad)
    bias = torch.randn(HIDDEN, requires_grad=grad)
    stats = {fused: (torch.zeros(HIDDEN), torch.ones(HIDDEN)) for fused in (True, False)}
    idx = torch.randint(0, VOCAB, (BATCH, BLOCK_SIZE))

    def run(forward: Callable[[], torch.Tensor], upstream, leaves) -> Callable[[], object]:
        if not grad:
            return forward
        return lambda: _backward(forward(), upstream, leaves)

    def ce(fused: bool):
        fn = fused_ops.cross_entropy if fused else F.cross_entropy
        return run(lambda: fn(logits, target), None, (logits,))

    def bn(fused: bool):
        fn = fused_ops.batch_norm if fused else F.batch_norm
        mean, var = stats[fused]
        return run(lambda: fn(x, mean, var, weight, bias, True, 0.1, 1e-5), dy, (x, weight, bias))

    def module(fused: bool, tanh: bool):
        if fused:
            layer = fused_ops.BatchNorm1d(HIDDEN, activation="tanh" if tanh else None)
        else:
            layer = nn.Sequential(nn.BatchNorm1d(HIDDEN), nn.Tanh()) if tanh else nn.BatchNorm1d(HIDDEN)
        params = tuple(layer.parameters()) if grad else ()
        if not grad:
            layer.requires_grad_(False)
        return run(lambda: layer(x), dy, (x, *params))

    def step(fused: bool):
        model = MLP(VOCAB, BLOCK_SIZE, fused=fused, generator=torch.Generator().manual_seed(0))
        if not grad:
            model.requires_grad_(False)
        return run(lambda: model(idx, target)[1], None, tuple(model.parameters()) if grad else ())

    return {
        "cross_entropy": (ce(True), ce(False)),
        "batch_norm": (bn(True), bn(False)),
        "BatchNorm1d": (module(True, False), module(False, False)),
        "BatchNorm1d+tanh": (module(True, True), module(False, True)),
        "makemore step": (step(True), step(False)),
    }


def median_us(fn: Callable[[], object], min_run_time: float) -> float:
    """Median microseconds per call over blocks of calls lasting about min_run_time in all."""
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def compare_us(
    fused: Callable[[], object], reference: Callable[[], object], min_run_time: float, rounds: int
) -> tuple[float, float, float, float]:
    """(fused us, reference us, overhead us, ratio): medians over `rounds` alternating measurements.
    The overhead and ratio are the medians of each round's difference and ratio: on a shared machine
    a burst of load then hits both sides of a pair alike."""
    fused(), reference()  # warm-up (first-call imports and allocations)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(median_us(fused, min_run_time / rounds))
        theirs.append(median_us(reference, min_run_time / rounds))
    pairs = list(zip(ours, theirs, strict=True))
    return (
        statistics.median(ours),
        statistics.median(theirs),
        statistics.median(a - b for a, b in pairs),
        statistics.median(a / b for a, b in pairs),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--min-run-time", type=float, default=1.5, help="seconds per op and side")
    parser.add_argument("--rounds", type=int, default=15, help="alternating measurements per row")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd", "both"), default="both")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "native"), default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    modes = ("fwd", "fwd+bwd") if args.mode == "both" else (args.mode,)
    print(
        f"torch {torch.__version__}, CPU, {args.threads} thread(s), fused_ops backend {args.backend!r}; "
        f"median microseconds per call"
    )
    print(f"{'op':<18} {'mode':<8} {'fused_ops':>10} {'torch':>10} {'overhead':>10} {'ratio':>7}")
    with fused_ops.use_backend(args.backend):
        for mode in modes:
            for name, (fused, reference) in cases(mode).items():
                ours, theirs, overhead, ratio = compare_us(fused, reference, args.min_run_time, args.rounds)
                print(f"{name:<18} {mode:<8} {ours:>10.1f} {theirs:>10.1f} {overhead:>+10.1f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
