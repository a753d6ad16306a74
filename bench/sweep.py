"""The sweep: which (case, provider) jobs run, in which order, and the rows they produce.

Every planned measurement yields exactly one `Row`, measured or not: a provider that cannot run says
why ("not installed", "needs CUDA"), a case too large for free memory is skipped with the numbers, a
failure is recorded with its exception, and a sweep past its time budget marks what it left out.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import fused_ops
from bench import cnn, ops
from bench.ops import BN_SHAPES, CE_SHAPES, DTYPES, MAKEMORE_SIZES, MODES, OPS, PROVIDERS, Case
from bench.profiling import observe
from bench.timing import measure

# Shape presets. "cpu" finishes in a few minutes on two cores: at most 4M elements, since the fused
# PyTorch path and eager take seconds per call at the GPU grid's 10^8-10^9. "quick" is the CI smoke run's.
PRESETS = {
    "full": {
        "ce": CE_SHAPES, "bn": BN_SHAPES, "bn_tanh": BN_SHAPES, "makemore": tuple(MAKEMORE_SIZES),
        **cnn.SHAPES["full"],
    },
    "cpu": {
        "ce": ((32, 27), (4096, 27), (32, 1024), (4096, 1024), (32, 32000)),
        "bn": ((32, 64), (32, 200), (4096, 1024)),
        "bn_tanh": ((32, 64), (32, 200), (4096, 1024)),
        "makemore": tuple(MAKEMORE_SIZES),
        **cnn.SHAPES["cpu"],
    },
    "quick": {
        "ce": ((32, 27), (16, 1000)),
        "bn": ((32, 64),),
        "bn_tanh": ((32, 64),),
        "makemore": ("notebook",),
        **cnn.SHAPES["quick"],
    },
}
# torch.compile costs seconds per case on a GPU and tens of seconds on a CPU, so by default it runs
# on these cases only (`--compile-shapes all` lifts that). GPU: the shapes with performance targets
# (issue 3: N >= 4096, C >= 32000), makemore's (32, 27), every BatchNorm shape and both makemore sizes.
COMPILE_DEFAULT = {
    "cuda": {
        "ce": ((32, 27),) + tuple((n, c) for n in (4096, 16384) for c in (32000, 50257, 128256)),
        "bn": BN_SHAPES,
        "bn_tanh": BN_SHAPES,
        "makemore": tuple(MAKEMORE_SIZES),
        **cnn.COMPILE_DEFAULT["cuda"],
        "dtypes": ("fp32", "bf16"),
    },
    # CPU: makemore's shapes and the largest of the CPU preset, in fp32.
    "cpu": {
        "ce": ((32, 27), (4096, 1024)),
        "bn": ((32, 200), (4096, 1024)),
        "bn_tanh": ((32, 200), (4096, 1024)),
        "makemore": ("notebook",),
        **cnn.COMPILE_DEFAULT["cpu"],
        "dtypes": ("fp32",),
    },
}
MEMORY_HEADROOM = 0.8  # a case may use at most this share of the free memory


@dataclass
class Row:
    """One measurement (or the reason there is none). Times in ms, memory in MiB."""

    device: str
    op: str
    mode: str
    provider: str
    dtype: str
    shape: str
    numel: int
    bytes: int | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    peak_mem_mib: float | None = None
    launches: int | None = None
    status: str = "ok"  # ok | unavailable | skipped | error
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """One provider on one case, measured in each of `modes`; `skip` says why it is not run at all."""

    case: Case
    provider: str
    modes: tuple[str, ...]
    skip: str | None = None


@dataclass
class Settings:
    """What the sweep measures and how; the CLI's options, resolved."""

    device: torch.device
    ops: tuple[str, ...] = OPS
    modes: tuple[str, ...] = MODES
    providers: tuple[str, ...] = PROVIDERS
    dtypes: tuple[str, ...] = tuple(DTYPES)
    shapes: str = "auto"  # a preset name, "auto" (full on CUDA, cpu on CPU) or "NxC,...,notebook,..."
    compile_shapes: str = "default"  # default | all
    reps: int = 15
    time_budget_s: float | None = None
    progress: bool = True


def parse_shapes(spec: str, device: torch.device) -> dict[str, tuple]:
    """A preset name, or a comma list of NxC (cross-entropy and BatchNorm), NxCxHxW (the CNN BatchNorm
    cases, both layouts) and makemore size names."""
    if spec == "auto":
        spec = "full" if device.type == "cuda" else "cpu"
    if spec in PRESETS:
        return PRESETS[spec]
    pairs, sizes, images = [], [], []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token in MAKEMORE_SIZES:
            sizes.append(token)
            continue
        image = cnn.parse_token(token)
        if image is not None:
            images += [image, image._replace(layout="nhwc")]
            continue
        try:
            n, c = (int(v) for v in token.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"--shapes: {token!r} is neither NxC (e.g. 4096x32000), NxCxHxW, a makemore size "
                f"{tuple(MAKEMORE_SIZES)} "
                f"nor a preset {tuple(PRESETS)}"
            ) from None
        if n < 2 or c < 1:
            raise ValueError(f"--shapes: {token!r} needs N >= 2 (BatchNorm training) and C >= 1")
        pairs.append((n, c))
    pairs_t = tuple(pairs)
    images_t = tuple(images)
    return {
        "ce": pairs_t, "bn": pairs_t, "bn_tanh": pairs_t, "makemore": tuple(sizes),
        "bn2d": images_t, "bn2d_add_relu": images_t, "resnet_block": images_t,
    }


def plan(settings: Settings) -> list[Job]:
    """The jobs of a sweep, cheapest-to-skip last: providers in `ops.PROVIDERS` order, then op, case."""
    shapes = parse_shapes(settings.shapes, settings.device)
    free = free_memory_bytes(settings.device)
    jobs = []
    for provider in ops.PROVIDERS:
        if provider not in settings.providers:
            continue
        for op in settings.ops:
            if provider not in ops.OP_PROVIDERS[op]:
                continue
            modes = tuple(m for m in ops.OP_MODES[op] if m in settings.modes)
            if not modes:
                continue
            dtypes = ("fp32",) if op == "makemore" else settings.dtypes  # the makemore step is fp32
            for shape in shapes[op]:
                for dtype in dtypes:
                    case = Case(op, shape, dtype)
                    jobs.append(Job(case, provider, modes, _skip_reason(case, provider, settings, free)))
    return jobs


def _skip_reason(case: Case, provider: str, settings: Settings, free: int) -> str | None:
    needed = ops.memory_needed(case)
    if needed > MEMORY_HEADROOM * free:
        return (
            f"needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {settings.device.type}: "
            f"too large for this machine"
        )
    if provider == "compile" and settings.compile_shapes != "all":
        scope = COMPILE_DEFAULT[settings.device.type]
        if case.shape not in scope[case.op] or case.dtype not in scope["dtypes"]:
            return (
                f"torch.compile runs on a few shapes by default on {settings.device.type}: --compile-shapes"
            )
    return None


def free_memory_bytes(device: torch.device) -> int:
    """Free device memory (CUDA) or MemAvailable (CPU, Linux; all physical memory elsewhere)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run(
    jobs: list[Job], settings: Settings, copy_gbps: float, on_row: Callable[[Row], None] = lambda row: None
) -> list[Row]:
    """Run the jobs in order; one Row per (job, mode), handed to `on_row` as soon as it exists."""
    rows: list[Row] = []
    total = sum(len(job.modes) for job in jobs)
    start = time.perf_counter()
    broken: str | None = None  # set after a CUDA error: the context is unusable from then on
    done = 0
    for job in jobs:
        budget = settings.time_budget_s
        over_budget = budget is not None and time.perf_counter() - start > budget
        if job.skip or over_budget or broken:
            reason = job.skip or broken or f"time budget of {budget:.0f} s used up"
            new_rows = [_row(job, mode, settings.device, status="skipped", note=reason) for mode in job.modes]
        else:
            new_rows = _run_job(job, settings, copy_gbps)
            broken = next((r.note for r in new_rows if _cuda_context_lost(r)), None)
            if broken:
                broken = f"CUDA context lost earlier ({broken[:80]})"
        for row in new_rows:
            rows.append(row)
            on_row(row)
        done += len(job.modes)
        if settings.progress:  # one line per job: readable in a terminal and in a CI log alike
            case = job.case
            print(
                f"[{done}/{total} measurements, {time.perf_counter() - start:.0f} s] {case.op} {case.label} "
                f"{case.dtype} {job.provider}: {', '.join(sorted({r.status for r in new_rows}))}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def _cuda_context_lost(row: Row) -> bool:
    return (
        row.status == "error"
        and row.device == "cuda"
        and (
            "CUDA error" in row.note or "illegal memory access" in row.note or "AcceleratorError" in row.note
        )
    )


def _row(job: Job, mode: str, device: torch.device, **fields) -> Row:
    return Row(
        device=device.type,
        op=job.case.op,
        mode=mode,
        provider=job.provider,
        dtype=job.case.dtype,
        shape=job.case.label,
        numel=job.case.numel,
        bytes=ops.bytes_moved(job.case, mode),
        **fields,
    )


def _describe(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"[:300]


def _run_job(job: Job, settings: Settings, copy_gbps: float) -> list[Row]:
    device = settings.device
    try:
        runner = ops.build(job.case, job.provider, device)
    except ops.Unavailable as e:
        return [_row(job, mode, device, status="unavailable", note=str(e)) for mode in job.modes]
    except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
        return [_row(job, mode, device, status="error", note=_describe(e)) for mode in job.modes]
    rows = []
    try:
        with fused_ops.use_backend(runner.backend or "auto"):
            for mode in job.modes:
                rows.append(_measure_mode(job, mode, runner, settings, copy_gbps))
    finally:
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure_mode(job: Job, mode: str, runner: ops.Runner, settings: Settings, copy_gbps: float) -> Row:
    device = settings.device
    try:
        timed = ops.mode_fn(runner, mode)
        timing = measure(timed, device, settings.reps, runner.grad_to_none)
        peak, launches = observe(timed.fn, device, prepare=lambda: _prepare(runner, timed))
        runner.reset()
    except torch.cuda.OutOfMemoryError as e:
        return _row(job, mode, device, status="skipped", note=f"out of memory: {_describe(e)}")
    except Exception as e:  # noqa: BLE001  (recorded in the row; the sweep goes on)
        return _row(job, mode, device, status="error", note=_describe(e))
    nbytes = ops.bytes_moved(job.case, mode)
    gbps = None if nbytes is None else nbytes / (timing.median_ms * 1e-3) / 1e9
    return _row(
        job,
        mode,
        device,
        note=ops.byte_model(job.case, mode),
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        gbps=gbps,
        pct_copy_bw=None if gbps is None else 100 * gbps / copy_gbps,
        peak_mem_mib=None if peak is None else peak / 2**20,
        launches=launches,
    )


def _prepare(runner: ops.Runner, timed: ops.Timed) -> None:
    runner.reset()
    if timed.setup is not None:
        timed.setup()
