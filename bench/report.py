"""Output: the stdout table, the CSV, the PNG plots, and the device's section of RESULTS.md."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from pathlib import Path

from bench import cnn, ops
from bench.environment import Environment
from bench.sweep import Row

FIELDS = [f.name for f in dataclasses.fields(Row)]


# ----------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------
def fmt_time(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1000:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.2f} s"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """The stdout table: one line per row, grouped by op."""
    header = [
        "op",
        "mode",
        "dtype",
        "shape",
        "provider",
        "median",
        "p20-p80",
        "GB/s",
        "%copy",
        "peak MiB",
        "launches",
        "note",
    ]
    lines = []
    for row in rows:
        spread = "-" if row.p20_ms is None else f"{fmt_time(row.p20_ms)}-{fmt_time(row.p80_ms)}"
        note = row.note
        lines.append(
            [
                row.op,
                row.mode,
                row.dtype,
                row.shape,
                row.provider,
                fmt_time(row.median_ms),
                spread,
                _fmt(row.gbps, ".1f"),
                _fmt(row.pct_copy_bw, ".0f"),
                _fmt(row.peak_mem_mib, ".2f"),
                _fmt(row.launches, "d"),
                (note if row.status == "ok" else f"[{row.status}] " + note)[:90] if note else "",
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join(out)


def write_csv(rows: list[Row], path: Path, append: bool = False) -> None:
    """All fields of every row; `append` adds to a file written by an earlier call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not append or not path.exists()
    with open(path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------
def save_plots(rows: list[Row], directory: Path) -> list[Path] | None:
    """One PNG per (op, dtype): time and % of copy bandwidth against size, a line per provider and mode.

    The makemore step gets a bar chart of time per provider and size. Returns the files written, or
    None when matplotlib (the "plot" extra) is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r.status == "ok"]
    written = []
    for op in ops.OPS:
        for dtype in ops.DTYPES:
            selected = [r for r in ok if r.op == op and r.dtype == dtype]
            if not selected:
                continue
            path = directory / f"{op}_{dtype}.png"
            fig = (
                _makemore_figure(plt, selected)
                if op == "makemore"
                else _sweep_figure(plt, op, dtype, selected)
            )
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def _sweep_figure(plt, op: str, dtype: str, rows: list[Row]):
    modes = [m for m in ops.OP_MODES[op] if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(2, len(modes), figsize=(5.2 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        in_mode = [r for r in rows if r.mode == mode]
        sizes = sorted({(r.numel, r.shape) for r in in_mode})
        # a line per provider, and per layout where the shape names one ("256x64x56x56 nhwc")
        layouts = sorted({r.shape.partition(" ")[2] for r in in_mode})
        for provider, layout in ((p, lay) for p in ops.PROVIDERS for lay in layouts):
            chosen = [r for r in in_mode if r.provider == provider and r.shape.partition(" ")[2] == layout]
            series = sorted(((r.numel, r) for r in chosen), key=lambda point: point[0])
            if not series:
                continue
            x = [n for n, _ in series]
            label = f"{provider} {layout}".strip()
            axes[0][col].plot(x, [r.median_ms for _, r in series], marker="o", label=label)
            axes[1][col].plot(x, [r.pct_copy_bw for _, r in series], marker="o", label=label)
        axes[0][col].set_title(f"{ops.OP_TITLES[op]}, {mode}, {dtype} ({rows[0].device})")
        axes[0][col].set_ylabel("median time (ms)")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("% of copy bandwidth")
        axes[1][col].set_ylim(bottom=0)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_xticks([n for n, _ in sizes])
            ax.set_xticklabels([s for _, s in sizes], rotation=60, fontsize=7)
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[1][col].set_xlabel("shape (x axis: elements, log)")
    fig.tight_layout()
    return fig


def _makemore_figure(plt, rows: list[Row]):
    sizes = [s for s in ops.MAKEMORE_SIZES.values() if any(r.shape == s.label for r in rows)]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        selected = [r for r in rows if r.shape == size.label]
        ax.bar([r.provider for r in selected], [r.median_ms for r in selected])
        ax.set_title(f"makemore step, {size.name} ({rows[0].device})\n{size.label}", fontsize=9)
        ax.set_ylabel("median time (ms)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Ratios and targets
# ----------------------------------------------------------------------------------------------------
def _ok_times(rows: list[Row]) -> dict[tuple, float]:
    return {(r.op, r.mode, r.dtype, r.shape, r.provider): r.median_ms for r in rows if r.status == "ok"}


def speedups(
    rows: list[Row],
    op: str,
    mode: str,
    dtype: str | None,
    baseline: str,
    subject: str = "fused",
    shapes: set[str] | None = None,
) -> list[float]:
    """baseline time / subject time for each shape measured by both (> 1: subject is faster)."""
    times = _ok_times(rows)
    ratios = []
    for (r_op, r_mode, r_dtype, shape, provider), t in times.items():
        if (r_op, r_mode, provider) != (op, mode, subject) or (dtype and r_dtype != dtype):
            continue
        if shapes is not None and shape not in shapes:
            continue
        base = times.get((op, mode, r_dtype, shape, baseline))
        if base is not None:
            ratios.append(base / t)
    return ratios


def _ratio_text(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    if len(ratios) == 1:
        return f"{geomean:.2f}x"
    return f"{geomean:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)})"


def _shapes_where(rows: list[Row], op: str, predicate) -> set[str]:
    out = set()
    for r in rows:
        if r.op == op and r.op != "makemore":
            n, c = (int(v) for v in r.shape.split("x"))
            if predicate(n, c):
                out.add(r.shape)
    return out


def _pct_range(rows: list[Row], op: str, mode: str, shapes: set[str], provider: str = "fused") -> list[float]:
    return [
        r.pct_copy_bw
        for r in rows
        if r.status == "ok"
        and r.op == op
        and r.mode == mode
        and r.provider == provider
        and r.shape in shapes
        and r.pct_copy_bw is not None
    ]


def _launches(rows: list[Row], op: str, mode: str, shape: str, provider: str = "fused") -> list[int]:
    return [
        r.launches
        for r in rows
        if r.status == "ok"
        and r.op == op
        and r.mode == mode
        and r.shape == shape
        and r.provider == provider
        and r.launches is not None
    ]


def target_lines(rows: list[Row], device: str) -> list[str]:
    """The performance targets of issues 3 and 4, each with what this run measured."""
    gpu = device == "cuda"

    def verdict(ok: bool) -> str:
        if not gpu:
            return "GPU target; CPU figure for reference"
        return "met" if ok else "NOT met"

    def pct(values: list[float], threshold: float) -> str:
        if not values:
            return "no measurement"
        return f"{min(values):.0f}-{max(values):.0f}% of copy bandwidth ({verdict(min(values) >= threshold)})"

    def faster(ratios: list[float], threshold: float = 1.0) -> str:
        if not ratios:
            return "no measurement"
        return f"{_ratio_text(ratios)} ({verdict(min(ratios) >= threshold)})"

    def launch_count(values: list[int], limit: int) -> str:
        if not values:
            return "no measurement"
        what = "launches" if gpu else "top-level ops (CPU)"
        return f"{max(values)} {what} ({verdict(max(values) <= limit)})"

    ce_big = _shapes_where(rows, "ce", lambda n, c: 4096 <= n <= 16384 and c >= 32000)
    bn_big = _shapes_where(rows, "bn", lambda n, c: n >= 4096 and c >= 256)
    bn_all = _shapes_where(rows, "bn", lambda n, c: True)
    ce_launches_fwd = launch_count(_launches(rows, "ce", "fwd", "32x27"), 1)
    ce_launches_bwd = launch_count(_launches(rows, "ce", "bwd", "32x27"), 1)
    bn_launches_fwd = launch_count(_launches(rows, "bn", "fwd", "32x200"), 1)
    bn_launches_bwd = launch_count(_launches(rows, "bn", "bwd", "32x200"), 1)
    tanh_vs_eager = faster(speedups(rows, "bn_tanh", "fwd+bwd", None, "eager"), 1.3)
    tanh_vs_unfused = faster(speedups(rows, "bn_tanh", "fwd+bwd", None, "unfused"), 1.3)
    lines = [
        "cross-entropy fwd+bwd at N 4096-16384, C >= 32000, >= 90% of copy bandwidth (2-pass): "
        + pct(_pct_range(rows, "ce", "fwd+bwd", ce_big), 90)
    ]
    for baseline in ("eager", "compile", "liger"):
        ratios = speedups(rows, "ce", "fwd+bwd", None, baseline, shapes=ce_big)
        lines.append(f"cross-entropy fwd+bwd faster than {baseline} on those shapes: {faster(ratios)}")
    lines += [
        (
            f"cross-entropy at (32, 27): one launch forward: {ce_launches_fwd}; "
            f"at most one backward: {ce_launches_bwd}"
        ),
        "BatchNorm fwd at N >= 4096, C >= 256, >= 85% of copy bandwidth (2-pass): "
        + pct(_pct_range(rows, "bn", "fwd", bn_big), 85),
        "BatchNorm bwd on those shapes >= 85% (3-pass): " + pct(_pct_range(rows, "bn", "bwd", bn_big), 85),
        "BatchNorm fwd+bwd >= 1.5x eager on (N, C) shapes: "
        + faster(speedups(rows, "bn", "fwd+bwd", None, "eager", shapes=bn_all), 1.5),
        (
            f"BatchNorm + tanh fused fwd+bwd >= 1.3x the unfused pair (eager BatchNorm1d + tanh): "
            f"{tanh_vs_eager}; against fused_ops.batch_norm + torch.tanh: {tanh_vs_unfused}"
        ),
        f"BatchNorm at (32, 200): one launch forward: {bn_launches_fwd}; one backward: {bn_launches_bwd}",
    ]
    return lines + cnn.target_lines(rows, speedups, _pct_range, faster, pct)


# ----------------------------------------------------------------------------------------------------
# RESULTS.md
# ----------------------------------------------------------------------------------------------------
def _cell(rows_by_key: dict, key: tuple) -> str:
    row = rows_by_key.get(key)
    if row is None:
        return ""
    if row.status != "ok":
        return "n/a" if row.status in ("unavailable", "skipped") else "error"
    return fmt_time(row.median_ms)


def _op_tables(rows: list[Row], op: str) -> list[str]:
    """Markdown table for one op: median time per provider, fused's speed-ups, bandwidth, memory, launches."""
    selected = [r for r in rows if r.op == op]
    if not selected:
        return []
    providers = [p for p in ops.OP_PROVIDERS[op] if any(r.provider == p for r in selected)]
    by_key = {(r.mode, r.dtype, r.shape, r.provider): r for r in selected}
    points = []
    for r in selected:
        point = (r.dtype, r.numel, r.shape, r.mode)
        if point not in points:
            points.append(point)
    points.sort(key=lambda p: (list(ops.DTYPES).index(p[0]), p[1], ops.MODES.index(p[3])))
    baselines = [p for p in providers if p != "fused"]
    header = ["dtype", "shape", "mode", *providers, *(f"fused vs {b}" for b in baselines)]
    has_bytes = ops.OP_MODES[op] != ("step",)  # a training step has no byte model
    if has_bytes:
        header += ["fused GB/s (% copy)"]
    header += ["peak MiB fused / eager", "launches fused / eager"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dtype, _, shape, mode in points:
        cells = [dtype, shape, mode] + [_cell(by_key, (mode, dtype, shape, p)) for p in providers]
        fused = by_key.get((mode, dtype, shape, "fused"))
        eager = by_key.get((mode, dtype, shape, "eager"))
        for b in baselines:
            base = by_key.get((mode, dtype, shape, b))
            both = fused and base and fused.status == "ok" and base.status == "ok"
            cells.append(f"{base.median_ms / fused.median_ms:.2f}x" if both else "")
        if has_bytes:
            good = fused is not None and fused.status == "ok"
            cells.append(f"{fused.gbps:.1f} ({fused.pct_copy_bw:.0f}%)" if good else "")
        cells.append(
            " / ".join(
                _fmt(r.peak_mem_mib if r and r.status == "ok" else None, ".2f") for r in (fused, eager)
            )
        )
        cells.append(
            " / ".join(_fmt(r.launches if r and r.status == "ok" else None, "d") for r in (fused, eager))
        )
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r.provider}: {r.note}" for r in selected if r.status != "ok"})
    if notes:
        lines.append("")
        lines += [f"- n/a or error, {note}" for note in notes]
    return lines


def _summary_table(rows: list[Row]) -> list[str]:
    lines = [
        (
            "| op | mode | dtype | fused vs eager | fused vs torch.compile | fused vs Liger | "
            "best fused % of copy bandwidth |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for op in ops.OPS:
        for mode in ops.OP_MODES[op]:
            for dtype in ops.DTYPES:
                fused = [
                    r
                    for r in rows
                    if (r.op, r.mode, r.dtype, r.provider, r.status) == (op, mode, dtype, "fused", "ok")
                ]
                if not fused:
                    continue
                best = max((r.pct_copy_bw for r in fused if r.pct_copy_bw is not None), default=None)
                lines.append(
                    f"| {ops.OP_TITLES[op]} | {mode} | {dtype} | "
                    f"{_ratio_text(speedups(rows, op, mode, dtype, 'eager'))} | "
                    f"{_ratio_text(speedups(rows, op, mode, dtype, 'compile'))} | "
                    f"{_ratio_text(speedups(rows, op, mode, dtype, 'liger'))} | "
                    f"{'-' if best is None else f'{best:.0f}%'} |"
                )
    return lines


def render_section(rows: list[Row], env: Environment, plots: list[str], csv_link: str | None) -> str:
    """The markdown of one device's section of RESULTS.md."""
    title = "GPU" if env.device == "cuda" else "CPU"
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"## {title}: {env.device_name}", ""]
    lines += [f"- {line}" for line in env.header_lines()]
    lines += [
        f"- command: `{env.command}` ({env.wall_s / 60:.1f} min; rows: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ")"
    ]
    if csv_link:
        lines.append(f"- all rows (p20/p80, GB/s, memory, launches, notes): [{csv_link}]({csv_link})")
    cpus = os.cpu_count() or 1
    if (
        env.device == "cpu"
        and env.load_start is not None
        and max(env.load_start[0], (env.load_end or (0,))[0]) > 0.5 * cpus
    ):
        lines += [
            "",
            (
                f"> The machine was busy while this ran (load average above {0.5 * cpus:.0f} on {cpus} "
                f"logical CPUs): other jobs shared the cores, so treat times as noisy and ratios as rough."
            ),
        ]
    lines += [
        "",
        "### Fused against the alternatives",
        "",
        (
            "Speed-up = the alternative's median time / fused's (> 1: fused is faster); geometric mean over "
            "the shapes measured by both, with (min-max, count)."
        ),
        "",
    ]
    lines += _summary_table(rows)
    lines += ["", "### Against the targets (issues 3, 4 and 13)", ""]
    lines += [f"- {line}" for line in target_lines(rows, env.device)]
    for op in ops.OPS:
        tables = _op_tables(rows, op)
        if not tables:
            continue
        lines += ["", f"### {ops.OP_TITLES[op]}", ""] + tables
        for plot in plots:
            if Path(plot).stem in {f"{op}_{dtype}" for dtype in ops.DTYPES}:
                lines += ["", f"![{Path(plot).stem}]({plot})"]
    return "\n".join(lines) + "\n"


RESULTS_PREAMBLE = """# Benchmark results

Generated by the harness in `bench/`; every section below is rewritten by

    python -m bench --device cpu --results bench/RESULTS.md    # the CPU section
    python -m bench --device cuda --results bench/RESULTS.md   # the GPU section (or: bash bench/gpu_check.sh)

which leave the other device's section and this preamble alone. `bench/gpu_check.sh` starts from this file
and writes it, with its GPU section, to `$OUT/RESULTS.md` and the plots to `$OUT/results/cuda/`: copy both
back here.

What the columns mean:
- **fused**: `fused_ops` (Triton kernels on CUDA, forced with `use_backend("triton")`; on CPU the native C++
  kernels, `use_backend("native")`). **eager**: `F.cross_entropy`, `F.batch_norm` (+ `torch.tanh`), the makemore MLP with torch's
  modules. **compile**: `torch.compile` of that eager code. **unfused**: `fused_ops.batch_norm` followed by a
  separate `torch.tanh`. **liger**: Liger-Kernel's `liger_cross_entropy`, when installed (CUDA only).
- Modes: fwd (inputs require grad, as in training; the fused and Liger cross-entropy forwards then also write
  dlogits), bwd (`y.backward(dy)` alone, after an untimed forward that builds a fresh graph; for those
  cross-entropy forwards that leaves only a scale, so compare cross-entropy providers on fwd+bwd), fwd+bwd,
  and step (one makemore training step: forward, loss, zero_grad, backward, SGD update; fp32).
- Time: median and p20/p80 (`triton.testing.do_bench` on GPU; on CPU `torch.utils.benchmark` on the threads
  set by `--threads`, default 1, as torch.utils.benchmark: the same for every provider, and stable on a shared
  machine). GB/s: the byte model in `bench/ops.py` (cross-entropy fwd+bwd: read logits + write dlogits =
  2*N*C*bytes; BatchNorm fwd: read x + write y = 2*N*C*bytes; bwd: read x, dy + write dx = 3*N*C*bytes,
  4*N*C*bytes with tanh, whose backward also reads the saved y), divided by the median time; % copy: of the
  `dst.copy_(src)` bandwidth measured in the same run, on the same threads.
- Peak memory: bytes allocated by one call above what was live before it (`torch.cuda.max_memory_allocated`
  on GPU; on CPU the peak of the profiler's allocation records, the same quantity).
- Launches: GPU kernels (and memsets/copies) per call from `torch.profiler`. On CPU there are no launches:
  the count is of top-level operator calls (aten ops and compiled-graph calls).
"""


def update_results(path: Path, section: str, device: str) -> None:
    """Write `section` between this device's markers in `path`, keeping everything else."""
    begin, end = f"<!-- bench:{device}:begin -->", f"<!-- bench:{device}:end -->"
    block = f"{begin}\n{section}{end}\n"
    text = path.read_text() if path.exists() else RESULTS_PREAMBLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
