#!/usr/bin/env bash
# The mutation-testing pass, on demand (not in CI): mutmut (installed here, not a dependency) mutates
# fused_ops/cross_entropy.py, linear_cross_entropy.py, batch_norm.py, convert.py and
# fused_ops/distributed/* (about 4980 mutants), and runs, for each mutant, the tests that cover the
# mutated function, from the test files listed under [tool.mutmut] in pyproject.toml. Results:
# `mutmut results` (survivors), `mutmut show NAME` (a diff). CPU-heavy: hours for every mutant on 2
# shared cores, so pass names or patterns for a sample (issue 11's pass drew 307, in about an hour).
#
# mutmut attributes tests in-process only: code that only the multi-process tests run (gloo workers,
# torchrun ranks) shows as "no tests", and the multi-process tests do not judge mutants that in-process
# tests reach. tests/mutation_subprocess.py runs such mutants against those tests.
#
#   bash tests/mutation.sh                        # all mutants
#   bash tests/mutation.sh 'fused_ops.convert*'   # only those whose names match
#   python3 tests/mutation_subprocess.py NAME...  # then: a "no tests" mutant of fused_ops/distributed
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q mutmut
export TRITON_INTERPRET=1  # the kernels run through the interpreter, as in the test suite on CPU
# One OpenMP thread until a test asks for more: mutmut forks a child per mutant, and libgomp's worker
# threads, once started, do not survive a fork (the child hangs in its first parallel op).
export OMP_NUM_THREADS=1
nice -n 19 python3 -m mutmut run --max-children "${MUTMUT_JOBS:-1}" "$@"
python3 -m mutmut results
