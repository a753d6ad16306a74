"""Run mutmut mutants against the multi-process tests, which mutmut itself cannot attribute.

mutmut maps a mutant to the tests that call its function *in the pytest process*; the gloo workers of
tests/test_distributed.py (and torchrun's ranks in tests/test_ddp_train.py) run in subprocesses, so a
function only they call shows as "no tests", and one that an in-process test also calls is judged by
that test alone. The workers import the very fused_ops the test process imported (mutants/ here) and
inherit its environment, so MUTANT_UNDER_TEST, the variable mutmut's trampolines read, selects the
mutant in every rank too.

    cd <repo> && python tests/mutation_subprocess.py NAME [NAME ...]   # after a `mutmut run`

A mutant is killed when pytest fails (exit 1), survives when it passes (exit 0); anything else
(collection error, interrupt) is reported as an error. `--tests FILE ...` runs other test files instead
(ones outside [tool.mutmut]'s selection, say). `--check` first runs the unmutated code (must pass). A "no
tests" mutant that this kills shows that the workers saw the variable: no other process runs its code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
MARKERS = "not slow and not compile"


def test_files(name: str) -> list[str]:
    """setup_ddp and cleanup_ddp run under torchrun only (tests/test_ddp_train.py); the rest run in
    tests/test_distributed.py's gloo groups."""
    if "setup_ddp" in name or "cleanup_ddp" in name:
        return ["tests/test_ddp_train.py"]
    return ["tests/test_distributed.py"]


def run(name: str, files: list[str], markers: str, timeout_s: float) -> tuple[str, float]:
    env = dict(os.environ, MUTANT_UNDER_TEST=name, TRITON_INTERPRET="1", PY_IGNORE_IMPORTMISMATCH="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MUTANTS), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q", "--rootdir=.", "-m", markers]
    start = time.monotonic()
    try:
        rc = subprocess.run(
            cmd + files,
            check=False,
            cwd=MUTANTS,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout_s,
        ).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    verdict = {0: "survived", 1: "killed"}.get(rc, f"error (pytest exit {rc})")
    return verdict, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutant names, as `mutmut results --all true` lists them")
    parser.add_argument("--from-file", type=Path, help="read further names from a file, one a line")
    parser.add_argument("--slow", action="store_true", help="include the slow tests (torchrun training)")
    parser.add_argument("--tests", nargs="+", help="test files to run instead of the multi-process ones")
    parser.add_argument("--check", action="store_true", help="first run the unmutated code: it must pass")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    args = parser.parse_args()
    names = list(args.names)
    if args.from_file:
        names += [line.strip() for line in args.from_file.read_text().splitlines() if line.strip()]
    if not MUTANTS.is_dir():
        sys.exit(f"{MUTANTS} not found: run `mutmut run` first")
    markers = "not compile" if args.slow else MARKERS
    if args.check:
        verdict, seconds = run("", ["tests/test_distributed.py"], markers, args.timeout)
        print(f"check: the unmutated code {verdict} in {seconds:.0f}s", flush=True)
        if verdict != "survived":
            return 2
    for name in names:
        verdict, seconds = run(name, args.tests or test_files(name), markers, args.timeout)
        print(f"{verdict:<9} {seconds:6.0f}s  {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
