"""Wall time of one call: median and 20th/80th percentiles, and the copy bandwidth they are judged by.

GPU: `triton.testing.do_bench` (CUDA events, L2 flushed before each call, gradients set to None
outside the timed region). A measurement with an untimed per-call setup (the backward-only mode, which
needs a fresh forward graph each time) uses the same recipe in a loop of its own, since do_bench has
no setup hook. CPU: `torch.utils.benchmark.Timer` on the process's torch threads (see `--threads`)
for calls under 0.5 ms, batched to 0.5 ms samples; one `perf_counter` reading per call above that.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.benchmark as torch_benchmark

from bench.ops import Timed

# A CPU sample lasts at least this long (calls are batched within a sample when shorter). Short
# samples keep the median robust on a shared machine: a preempted sample is an outlier, not the norm.
CPU_MIN_SAMPLE_S = 5e-4
# A first CPU call longer than this is taken as the estimate: a second one would not change the plan.
# Shorter ones are timed again: a first call can carry one-time costs far above its own (the native
# kernels' library loads in ~0.2 s), and an estimate that includes them would time a 25 us call one
# call per sample, where timer noise makes the distribution bimodal.
CPU_WARM_ONLY_S = 1.0
# Longest a CPU measurement keeps sampling once it has 3 samples; the large shapes take ~1 s a call.
CPU_MAX_MEASURE_S = 3.0
# The GPU timed window is about `reps` calls, clamped to these bounds in milliseconds.
GPU_MIN_REP_MS, GPU_MAX_REP_MS = 5.0, 400.0
L2_FLUSH_BYTES = 256 * 2**20  # as do_bench: larger than any current GPU's L2


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def measure(
    timed: Timed, device: torch.device, reps: int, grad_to_none: Sequence[torch.Tensor] = ()
) -> Timing:
    """Time `timed.fn` with about `reps` samples; grads of `grad_to_none` are set to None before each call."""

    def reset() -> None:
        for t in grad_to_none:
            t.grad = None

    def prepare() -> None:
        reset()
        if timed.setup is not None:
            timed.setup()

    if device.type == "cuda":
        estimate_ms = _cuda_estimate_ms(timed.fn, prepare)
        rep_ms = min(max(reps * estimate_ms, GPU_MIN_REP_MS), GPU_MAX_REP_MS)
        if timed.setup is None:
            return _do_bench(timed.fn, rep_ms, list(grad_to_none))
        return _cuda_loop(timed.fn, prepare, max(3, min(reps, math.ceil(rep_ms / max(estimate_ms, 1e-3)))))
    return _measure_cpu(timed, reps, prepare)


def _do_bench(fn: Callable[[], object], rep_ms: float, grad_to_none: list[torch.Tensor]) -> Timing:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(
        fn, warmup=max(rep_ms / 4, 1.0), rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return Timing(median, p20, p80)


def _cuda_estimate_ms(fn: Callable[[], object], prepare: Callable[[], None], calls: int = 3) -> float:
    prepare()
    fn()  # warm: compilation, autotuning, allocator
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(calls):
        prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        total += start.elapsed_time(end)
    return total / calls


def _cuda_loop(fn: Callable[[], object], prepare: Callable[[], None], n: int) -> Timing:
    """do_bench's recipe with an untimed `prepare` before each call: flush L2, events around `fn` only."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        prepare()
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True)])


def _measure_cpu(timed: Timed, reps: int, prepare: Callable[[], None]) -> Timing:
    prepare()
    t0 = time.perf_counter()
    timed.fn()  # warm: compilation, first-touch allocation
    estimate_s = time.perf_counter() - t0
    if estimate_s < CPU_WARM_ONLY_S:  # short calls: estimate again, without the first call's costs
        prepare()
        t0 = time.perf_counter()
        timed.fn()
        estimate_s = time.perf_counter() - t0
    samples: list[float] = []
    deadline = time.perf_counter() + CPU_MAX_MEASURE_S
    sample = _cpu_sampler(timed, prepare, estimate_s)
    while len(samples) < reps and (len(samples) < 3 or time.perf_counter() < deadline):
        samples.append(sample())
    return _summary(samples)


def _cpu_sampler(timed: Timed, prepare: Callable[[], None], estimate_s: float) -> Callable[[], float]:
    """A callable returning one sample: seconds per call of `timed.fn`."""
    number = max(1, math.ceil(CPU_MIN_SAMPLE_S / max(estimate_s, 1e-7)))
    if timed.setup is not None or number == 1:
        # One call per sample, with the setup (a backward's fresh forward graph, or freeing the last
        # gradients) outside the clock. Timer.timeit cannot do this: it runs its statement twice as a
        # warm-up after each setup, which would also triple the cost of a one-second call.
        def sample() -> float:
            prepare()
            start = time.perf_counter()
            timed.fn()
            return time.perf_counter() - start

        return sample
    # Tiny calls, batched `number` to a sample; the reset is part of each call, as in a training loop.
    timer = torch_benchmark.Timer(
        stmt="prepare(); fn()",
        globals={"fn": timed.fn, "prepare": prepare},
        num_threads=torch.get_num_threads(),
    )
    return lambda: timer.timeit(number).times[0]


def _summary(samples_s: list[float]) -> Timing:
    if len(samples_s) == 1:
        ms = samples_s[0] * 1e3
        return Timing(ms, ms, ms)
    q = statistics.quantiles(samples_s, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(samples_s) * 1e3, q[1] * 1e3, q[7] * 1e3)


def copy_bandwidth_gbps(device: torch.device, reps: int, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth: dst.copy_(src) moves 2 * nbytes (read src + write dst) per call.

    1 GiB on GPU (well past L2); 256 MiB on CPU (past the last-level cache, and quick on a laptop).
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(Timed(lambda: dst.copy_(src)), device, reps)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9
