#!/usr/bin/env bash
# The mutation-testing pass, on demand (not in CI): mutmut (installed here, not a dependency) mutates
# fused_ops/cross_entropy.py, batch_norm.py, convert.py and fused_ops/distributed/*, and runs, for each
# mutant, the tests that cover the mutated function, from the fast test files listed under
# [tool.mutmut] in pyproject.toml. Results: `mutmut results` (survivors), `mutmut show NAME` (a diff).
# CPU-heavy: it runs at low priority; about 4,900 mutants, ~3 a minute on one of 2 shared cores, so a
# whole pass takes a day: name mutants (or a pattern) to run part of it. Mutants in code that only the
# multi-process tests run (gloo workers in subprocesses) show as "no tests": mutmut attributes tests
# in-process only; run those with MUTANT_UNDER_TEST=<name> and tests/test_distributed.py from mutants/
# (the workers inherit the variable).
#
#   bash tests/mutation.sh            # all mutants
#   bash tests/mutation.sh 'fused_ops.convert*'   # only those whose names match
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q mutmut
export TRITON_INTERPRET=1  # the kernels run through the interpreter, as in the test suite on CPU
nice -n 10 python3 -m mutmut run --max-children "${MUTMUT_JOBS:-2}" "$@"
python3 -m mutmut results
