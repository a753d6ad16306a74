"""`python -m bench`: sweep the ops, print a table, write a CSV, PNG plots and (optionally) RESULTS.md.

Examples:
    python -m bench --device cpu                                  # the CPU default: a few minutes
    python -m bench --device cpu --results bench/RESULTS.md       # ... and rewrite RESULTS.md's CPU section
    python -m bench --op ce --mode fwd+bwd --dtype bf16 --shapes 4096x32000,16384x128256
    python -m bench --quick                                       # a smoke run: fused and eager, seconds
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from bench import environment, ops, report
from bench.sweep import PRESETS, Settings, plan, run
from bench.timing import copy_bandwidth_gbps

# --quick is a smoke run: torch.compile costs tens of seconds per case on a CPU, and an optional
# provider that is not installed only adds "unavailable" rows. Name them with --provider to add them.
QUICK_PROVIDERS = ("fused", "eager")

DEFAULT_REPS = {"cuda": 100, "cpu": 15}


def _choices(allowed: tuple[str, ...], name: str):
    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in picked if t not in allowed]
        if bad or not picked:
            raise argparse.ArgumentTypeError(
                f"{name}: {', '.join(bad) or text!r} not in {', '.join(allowed)}"
            )
        return picked

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--op",
        type=_choices(ops.OPS, "--op"),
        default=ops.OPS,
        help=f"comma list of {','.join(ops.OPS)} (default: all)",
    )
    parser.add_argument(
        "--mode",
        type=_choices(ops.MODES, "--mode"),
        default=ops.MODES,
        help=f"comma list of {','.join(ops.MODES)} (step: the makemore training step; default: all)",
    )
    parser.add_argument(
        "--provider",
        type=_choices(ops.PROVIDERS, "--provider"),
        default=None,
        help=f"comma list of {','.join(ops.PROVIDERS)} (default: all; with --quick: "
        f"{','.join(QUICK_PROVIDERS)})",
    )
    parser.add_argument(
        "--dtype",
        type=_choices(tuple(ops.DTYPES), "--dtype"),
        default=tuple(ops.DTYPES),
        help="comma list of fp32,bf16 (default: both; the makemore step is fp32)",
    )
    parser.add_argument(
        "--shapes",
        default="auto",
        help=f"a preset ({', '.join(PRESETS)}; default: full on cuda, cpu on cpu) or a comma list "
        f"of NxC and makemore sizes ({', '.join(ops.MAKEMORE_SIZES)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: the 'quick' shapes, 3 reps, fused and eager only (seconds on a CPU)",
    )
    parser.add_argument(
        "--compile-shapes",
        choices=("default", "all"),
        default="default",
        help="torch.compile on a few shapes (default) or on every shape (slow on CPU)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"timed samples per measurement (default: {DEFAULT_REPS['cuda']} cuda, "
        f"{DEFAULT_REPS['cpu']} cpu; CPU sampling also stops after a few seconds)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for --device cpu, as torch.utils.benchmark: stable "
        "on a shared machine and the same for every provider; torch's default otherwise)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="past this, remaining measurements are recorded as skipped",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/out"), help="CSV, plots and table (default bench/out)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="RESULTS.md",
        help="also rewrite this device's section of this file, with plots and CSV beside it",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(build_parser().parse_args(argv), argv)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests): leave torch as found


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(device_type)
    if args.threads is not None or device_type == "cpu":
        torch.set_num_threads(args.threads or 1)
    reps = args.reps or (3 if args.quick else DEFAULT_REPS[device_type])
    if reps < 1:
        print("python -m bench: --reps must be >= 1", file=sys.stderr)
        return 2
    settings = Settings(
        device=device,
        ops=args.op,
        modes=args.mode,
        providers=args.provider or (QUICK_PROVIDERS if args.quick else ops.PROVIDERS),
        dtypes=args.dtype,
        shapes="quick" if args.quick else args.shapes,
        compile_shapes=args.compile_shapes,
        reps=reps,
        time_budget_s=args.time_budget,
        progress=not args.no_progress,
    )
    try:
        jobs = plan(settings)
    except ValueError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    env = environment.capture(
        device, " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    )
    env.copy_gbps = copy_bandwidth_gbps(device, reps)
    print("\n".join(env.header_lines()), flush=True)
    print(
        f"{sum(len(j.modes) for j in jobs)} measurements planned ({len(jobs)} provider x case jobs)",
        flush=True,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"results_{device_type}.csv"
    report.write_csv([], csv_path)  # header now, rows as they come: a killed sweep keeps what it measured
    rows = run(
        jobs, settings, env.copy_gbps, on_row=lambda row: report.write_csv([row], csv_path, append=True)
    )
    env.load_end = environment.load_average()
    env.wall_s = time.perf_counter() - started

    table = report.format_table(rows)
    print(table)
    (args.out / f"table_{device_type}.txt").write_text(table + "\n")
    plots = report.save_plots(rows, args.out / f"plots_{device_type}")
    if plots is None:
        plots = []
        print(
            "\nplots: skipped, matplotlib is not installed (pip install 'fused_ops[plot]'; from a clone: "
            "pip install -e '.[plot]')"
        )
    print(f"\nCSV: {csv_path}\nplots: {', '.join(str(p) for p in plots) or 'none'}")

    if args.results is not None:
        _write_results(args.results, rows, env, csv_path, plots)
    errors = [r for r in rows if r.status == "error"]
    if errors:
        print(f"\n{len(errors)} measurement(s) failed; see the note column", file=sys.stderr)
        return 1
    return 0


def _write_results(path: Path, rows, env, csv_path: Path, plots: list[Path]) -> None:
    """Copy the CSV and plots to results/<device>/ beside `path`, and rewrite the device's section."""
    assets = path.parent / "results" / env.device
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    shutil.copy(csv_path, assets / csv_path.name)
    links = []
    for plot in plots:
        shutil.copy(plot, assets / plot.name)
        links.append(f"results/{env.device}/{plot.name}")
    section = report.render_section(rows, env, links, f"results/{env.device}/{csv_path.name}")
    report.update_results(path, section, env.device)
    print(f"{path}: {env.device} section rewritten; plots and CSV in {assets}")


if __name__ == "__main__":
    sys.exit(main())
