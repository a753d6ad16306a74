"""`python -m bench.linear_cross_entropy`: a language-model head's loss, forward + backward (issue 14).

    python -m bench.linear_cross_entropy --device cpu     # (4096, 512, 32000), (8192, 1024, 32000) fp32
    python -m bench.linear_cross_entropy --device cuda    # (8192, 4096, 128256), (16384, 4096, 262144) bf16
    python -m bench.linear_cross_entropy --shapes 1024x256x32000 --providers fused,eager,matmul
    python -m bench.linear_cross_entropy --quick          # a smoke run, seconds

A case is (N, H, V, dtype): hidden states x (N, H) and a head W (V, H), both requiring grad, and N int64
targets in [0, V). One timed call is `loss(x, W, target).backward(ones)` (reduction "mean" unless
--reduction says otherwise), gradients set to None before each. Providers:

    fused          fused_ops.linear_cross_entropy, default chunk size (Triton cross-entropy on CUDA,
                   the PyTorch path on CPU)
    eager          F.cross_entropy(F.linear(x, W), target)
    torch_chunked  F.linear_cross_entropy(x, W, target, options=nn.LinearCrossEntropyOptions())
                   (torch >= 2.13)
    compile        torch.compile of eager
    liger          Liger-Kernel's LigerFusedLinearCrossEntropyLoss, when installed (CUDA only)
    matmul         the design's floor: its three bare matmuls, x @ W.T, then dlogits @ W and
                   dlogits.T @ x (dlogits stands in as the logits buffer), no loss at all

Columns: median wall time (p20-p80) in ms (on CPU the providers take turns call by call, so that a
shared machine's load falls on all of them alike); on CPU also the median thread CPU time
(`time.thread_time`: one torch thread runs forward and backward, so this is the work done, without the
time the thread waited for a core on a shared machine), which the time ratios and TFLOP/s use there; peak memory above what was live before the call (bench/profiling.py)
and that peak less the gradients the call returns (x.grad + W.grad, the "extra" of issue 14); the time
and peak-memory ratios to eager; effective TFLOP/s, 6*N*H*V (three (N, H, V) matmuls of 2*N*H*V flops)
over the median time (CPU time on CPU with one thread); for matmul that is the rate of the bare matmuls measured in the same run, which
the others are read against. Timing and memory as in `python -m bench` (bench/timing.py): do_bench on
GPU, one perf_counter reading per call on CPU, on --threads (default 1 on CPU).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fused_ops
from bench import environment
from bench.ops import DTYPES, Timed, Unavailable, _compiled, fused_backend
from bench.profiling import observe
from bench.timing import measure

PROVIDERS = ("fused", "eager", "torch_chunked", "compile", "liger", "matmul")
SHAPES = {
    "cpu": ((4096, 512, 32000), (8192, 1024, 32000)),
    "cuda": ((8192, 4096, 128256), (16384, 4096, 262144)),
    "quick": ((64, 16, 100),),
}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
DEFAULT_REPS = {"cpu": 3, "cuda": 20}


@dataclass
class Row:
    """One provider on one case. Times in ms, memory in MiB."""

    shape: str  # NxHxV
    dtype: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mib: float | None = None
    extra_mib: float | None = None  # peak less the returned gradients
    cpu_ms: float | None = None  # CPU only: median thread CPU time (time.thread_time), preemption excluded
    tflops: float | None = None
    vs_eager_time: float | None = None  # provider time / eager time (thread CPU time on CPU)
    vs_eager_memory: float | None = None  # provider peak / eager peak
    status: str = "ok"  # ok | unavailable | error
    note: str = ""


@dataclass
class Case:
    n: int
    h: int
    v: int
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.n}x{self.h}x{self.v}"

    @property
    def flops(self) -> int:
        return 6 * self.n * self.h * self.v  # fwd+bwd: three (N, H, V) matmuls of 2*N*H*V flops each


def _loss_fn(provider: str, device: torch.device, reduction: str) -> Callable:
    """(x, W, target) -> the loss, for the loss providers."""

    def eager(x, w, target):
        return F.cross_entropy(F.linear(x, w), target, reduction=reduction)

    if provider == "fused":
        return lambda x, w, target: fused_ops.linear_cross_entropy(x, w, target, reduction=reduction)
    if provider == "eager":
        return eager
    if provider == "compile":
        return _compiled(eager)
    if provider == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable("torch < 2.13 has no F.linear_cross_entropy")
        options = nn.LinearCrossEntropyOptions()
        return lambda x, w, target: F.linear_cross_entropy(x, w, target, reduction=reduction, options=options)
    if provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise Unavailable("not installed (pip install liger-kernel)")
        if device.type != "cuda":
            raise Unavailable("needs CUDA (Liger-Kernel runs Triton kernels only)")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
        return lambda x, w, target: liger(w, x, target)
    raise ValueError(f"unknown provider {provider!r}")


def _inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, H) and W (V, H) requiring grad, in the case's dtype; int64 targets (N,)."""
    dtype = DTYPES[case.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.n, case.h, generator=generator, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(case.v, case.h, generator=generator, device=device) / case.h**0.5).to(dtype)
    target = torch.randint(0, case.v, (case.n,), generator=generator, device=device)
    return x, w.requires_grad_(), target


def _call(
    provider: str, x, w, target, device: torch.device, reduction: str
) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """The timed callable of `provider` and the tensors whose .grad it writes (reset before each call)."""
    if provider == "matmul":

        @torch.no_grad()
        def call() -> None:
            dlogits = x @ w.t()  # (N, V): the logits, standing in for their gradient
            _ = dlogits @ w  # dX (N, H)
            _ = dlogits.t() @ x  # dW (V, H)

        return call, []
    loss_fn = _loss_fn(provider, device, reduction)
    backend = fused_backend(device) if provider == "fused" else "auto"
    grad_output = torch.ones(x.shape[0] if reduction == "none" else (), device=device, dtype=x.dtype)

    def call() -> None:
        with fused_ops.use_backend(backend):
            loss_fn(x, w, target).backward(grad_output)

    return call, [x, w]


def run_case(
    case: Case, providers: list[str], device: torch.device, reps: int, reduction: str = "mean"
) -> list[Row]:
    """Every provider on one case, on the same inputs. Each is called once to warm up (compilation,
    first-touch allocation) and once under the profiler for its peak memory; then the timed calls. On
    CPU the providers take turns, one call each per round (starting one later each round), so that the
    load of a shared machine falls on all of them alike; on GPU each gets its own `measure` (do_bench)."""
    x, w, target = _inputs(case, device)
    rows = {p: Row(case.label, case.dtype, p) for p in providers}
    calls = {}
    for provider in providers:
        row = rows[provider]
        try:
            call, grads = _call(provider, x, w, target, device, reduction)

            def prepare(grads=grads) -> None:
                for t in grads:
                    t.grad = None

            prepare()
            call()
            peak, _ = observe(call, device, prepare)
        except Unavailable as e:
            row.status, row.note = "unavailable", str(e)
            continue
        except Exception as e:  # noqa: BLE001  (recorded in the row; the run goes on)
            first_line = (str(e).strip().splitlines() or [""])[0]
            row.status, row.note = "error", f"{type(e).__name__}: {first_line}"[:300]
            continue
        if peak is not None:
            row.peak_mib = peak / 2**20
            if grads:  # less x.grad and W.grad, which the call returns
                row.extra_mib = (peak - sum(t.numel() * t.element_size() for t in grads)) / 2**20
        calls[provider] = (call, prepare, grads)
    samples = {p: [] for p in calls}
    cpu_samples = {p: [] for p in calls}
    if device.type == "cuda":
        for provider, (call, _, grads) in calls.items():
            timing = measure(Timed(call), device, reps, grads)
            samples[provider] = [timing.p20_ms, timing.median_ms, timing.p80_ms]
            torch.cuda.empty_cache()
    else:
        order = list(calls)
        for rep in range(reps):
            for provider in order[rep % len(order) :] + order[: rep % len(order)]:
                call, prepare, _ = calls[provider]
                prepare()
                start, start_cpu = time.perf_counter(), time.thread_time()
                call()  # one torch thread: the backward runs on this thread too
                cpu_samples[provider].append((time.thread_time() - start_cpu) * 1e3)
                samples[provider].append((time.perf_counter() - start) * 1e3)
    for provider, times in samples.items():
        row = rows[provider]
        quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
        row.median_ms, row.p20_ms, row.p80_ms = statistics.median(times), quantiles[1], quantiles[7]
        if cpu_samples[provider] and torch.get_num_threads() == 1:  # else other threads do part of the work
            row.cpu_ms = statistics.median(cpu_samples[provider])
        row.tflops = case.flops / ((row.cpu_ms or row.median_ms) * 1e-3) / 1e12
    return [rows[p] for p in providers]


def add_ratios(rows: list[Row]) -> None:
    """Fill each row's ratios to the eager row of its case (same shape and dtype)."""
    eager = {(r.shape, r.dtype): r for r in rows if r.provider == "eager" and r.status == "ok"}
    for r in rows:
        base = eager.get((r.shape, r.dtype))
        if base is None or r.status != "ok":
            continue
        r.vs_eager_time = r.cpu_ms / base.cpu_ms if r.cpu_ms and base.cpu_ms else r.median_ms / base.median_ms
        if r.peak_mib is not None and base.peak_mib:
            r.vs_eager_memory = r.peak_mib / base.peak_mib


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    """A Markdown table, one line per row."""
    header = [
        "shape NxHxV", "dtype", "provider", "median ms", "p20-p80 ms", "CPU ms", "peak MiB",
        "peak - grads MiB", "time / eager", "peak / eager", "TFLOP/s", "note",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        spread = "" if r.p20_ms is None else f"{r.p20_ms:.1f}-{r.p80_ms:.1f}"
        cells = [
            r.shape, r.dtype, r.provider, _num(r.median_ms, ".1f"), spread, _num(r.cpu_ms, ".1f"),
            _num(r.peak_mib, ".0f"), _num(r.extra_mib, ".0f"), _num(r.vs_eager_time, ".2f"), _num(r.vs_eager_memory, ".3f"),
            _num(r.tflops, ".3f"), r.note if r.status == "ok" else f"{r.status}: {r.note}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    shapes = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        try:
            n, h, v = (int(p) for p in token.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--shapes: {token!r} is not NxHxV, e.g. 4096x512x32000"
            ) from None
        shapes.append((n, h, v))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.linear_cross_entropy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--shapes", type=_parse_shapes, default=None, help="comma list of NxHxV")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda"
    )
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help=f"comma list of {','.join(PROVIDERS)}"
    )
    parser.add_argument("--reduction", choices=("mean", "sum", "none"), default="mean", help="default: mean")
    parser.add_argument("--reps", type=int, default=None, help="timed samples (default: 3 cpu, 20 cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 2 reps: a smoke run")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/out"), help="CSV and table (default bench/out)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        print(f"--providers: {unknown} not in {PROVIDERS}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        shapes = args.shapes or SHAPES["quick" if args.quick else device.type]
        dtype = args.dtype or DEFAULT_DTYPE[device.type]
        reps = args.reps or (2 if args.quick else DEFAULT_REPS[device.type])
        env = environment.capture(
            device, " ".join(["python -m bench.linear_cross_entropy", *(argv or sys.argv[1:])])
        )
        print("\n".join(env.header_lines()[:3]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        rows = []
        for n, h, v in shapes:
            case = Case(n, h, v, dtype)
            rows += run_case(case, providers, device, reps, args.reduction)
            for r in rows[-len(providers) :]:
                print(f"[{time.perf_counter() - started:.0f} s] {case.label} {dtype} {r.provider}: {r.status} "
                      f"{_num(r.median_ms, '.1f')} ms {_num(r.peak_mib, '.0f')} MiB {r.note}", file=sys.stderr,
                      flush=True)  # fmt: skip
            add_ratios(rows)
            _write(args.out, device, env, rows)  # after every case: a run stopped early keeps its rows
        print(format_table(rows))
    finally:
        torch.set_num_threads(threads)
    return 1 if any(r.status == "error" for r in rows) else 0


def _write(out: Path, device: torch.device, env: environment.Environment, rows: list[Row]) -> None:
    """The rows so far as CSV and as a Markdown table under the run's device, versions, date and load."""
    with open(out / f"linear_cross_entropy_{device.type}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    header = env.header_lines()[:3]
    load_end = environment.load_average()
    if env.load_start is not None and load_end is not None:
        header.append(f"load average (1 min): {env.load_start[0]:.2f} at the start, {load_end[0]:.2f} now")
    table = format_table(rows)
    (out / f"linear_cross_entropy_{device.type}.md").write_text(
        "\n".join(f"- {line}" for line in header) + "\n\n" + table + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
