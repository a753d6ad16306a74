#!/usr/bin/env bash
# One-shot GPU check (issue 5): install fused_ops from this working tree, run the GPU tests, then the
# benchmark sweep, all within about 8 minutes. Logs, CSV, plots and RESULTS.md go to $OUT when it is
# set, else to bench/out/.
#
#   bash bench/gpu_check.sh                # on a CUDA machine (torch 2.11 + triton 3.6; no internet needed)
#   bash bench/gpu_check.sh --cnn          # only the BatchNorm2d / ResNet rows (issue 13) and their GPU tests:
#                                          # its RESULTS.md GPU section then holds those rows alone
#   bash bench/gpu_check.sh --device cpu   # a dry run of the same steps on a CPU: harness tests, quick shapes
#
# Wheels the GPU machine lacks (it has no internet): put them in .whl/ (git-ignored), e.g.
#   pip download liger-kernel setuptools --no-deps -d .whl
# and carry that folder there; they are installed first, with --no-index --no-deps.
# Afterwards, in the repository: copy $OUT/RESULTS.md over bench/RESULTS.md (this script starts it from
# bench/RESULTS.md, so the CPU section is kept) and $OUT/results/cuda/ to bench/results/cuda/.
#
# Knobs (environment): GPU_CHECK_BUDGET_S (total, default 480), GPU_CHECK_TEST_BUDGET_S (tests, default
# 180), GPU_CHECK_LCE_BUDGET_S (linear + cross-entropy rows, default 150), GPU_CHECK_BENCH_ARGS (extra
# arguments for `python -m bench`, e.g. "--op ce --dtype bf16").
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
CNN=0
while (( $# )); do
    case "$1" in
        --device) DEVICE="${2:?--device needs cpu or cuda}"; shift 2 ;;
        --cnn) CNN=1; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--device cpu|cuda] [--cnn]" >&2; exit 2 ;;
    esac
done
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
TEST_BUDGET_S=${GPU_CHECK_TEST_BUDGET_S:-180}
LCE_BUDGET_S=${GPU_CHECK_LCE_BUDGET_S:-150}
OUT_DIR=${OUT:-bench/out}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
step() { printf '\n== [%4d s] %s\n' "$(elapsed)" "$*"; }
status=0

step "machine"
if [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not available"
fi
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

# Carried wheels first: .whl/ may also hold setuptools, which the editable install below needs.
if compgen -G ".whl/*.whl" > /dev/null; then
    step "install carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    python -m pip install --no-index --no-deps --quiet .whl/*.whl \
        || echo "carried wheels did not install: the liger rows will say 'not installed'"
fi

step "install fused_ops from the working tree"
if ! python -m pip install --no-deps --no-build-isolation --quiet -e .; then
    echo "pip install -e . failed (it needs setuptools >= 64: carry its wheel in .whl/); fused_ops.kernels"
    echo "is importable only through the installed package, so nothing else can run"
    exit 1
fi

if [[ "$DEVICE" == cuda ]]; then
    TESTS=(-m gpu)
    BENCH_SHAPES=()
    LCE_SHAPES=()
else  # dry run: the harness's own tests and quick shapes
    TESTS=(tests/test_bench.py)
    BENCH_SHAPES=(--quick)
    LCE_SHAPES=(--quick)
fi
BENCH_OPS=()
if (( CNN )); then  # issue 13's rows: BatchNorm2d at ResNet-50 shapes, + add + ReLU, the basic-block step
    BENCH_OPS=(--op bn2d,bn2d_add_relu,resnet_block)
    if [[ "$DEVICE" == cuda ]]; then
        TESTS=(-m gpu tests/test_batch_norm_triton.py tests/test_compile.py)
    else
        TESTS=(tests/test_bench.py -k "cnn or smoke")
    fi
fi

step "tests: pytest ${TESTS[*]} (at most ${TEST_BUDGET_S} s)"
timeout "$TEST_BUDGET_S" python -m pytest "${TESTS[@]}" -q -p no:cacheprovider --durations=10 \
    --junitxml="$OUT_DIR/pytest_$DEVICE.xml"
rc=$?
case $rc in
    0) echo "tests passed" ;;
    5) echo "no test selected" ;;
    124) echo "tests stopped at the ${TEST_BUDGET_S} s limit"; status=1 ;;
    *) echo "tests failed (exit $rc)"; status=1 ;;
esac

# Linear + cross-entropy (issue 14): fwd+bwd time and peak memory of fused_ops.linear_cross_entropy,
# eager, torch's chunked path, torch.compile, Liger and the three bare matmuls, at the GPU shapes
# (8192, 4096, 128256) and (16384, 4096, 262144) bf16; table and CSV in $OUT_DIR/linear_cross_entropy_*.
step "linear + cross-entropy rows on $DEVICE (at most ${LCE_BUDGET_S} s)"
timeout "$LCE_BUDGET_S" python -m bench.linear_cross_entropy --device "$DEVICE" "${LCE_SHAPES[@]}" --out "$OUT_DIR"
rc=$?
case $rc in
    0) echo "linear + cross-entropy rows done" ;;
    124) echo "linear + cross-entropy rows stopped at the ${LCE_BUDGET_S} s limit"; status=1 ;;
    *) echo "linear + cross-entropy rows had failures (exit $rc): see the note column"; status=1 ;;
esac

# The sweep gets what is left, less 30 s for this script's end; its own budget keeps 90 s more for the
# job in flight when it runs out, the plots and RESULTS.md. A killed sweep still leaves its CSV rows.
left=$(( BUDGET_S - $(elapsed) - 30 ))
step "benchmark sweep on $DEVICE (at most $left s)"
if (( left < 120 )); then
    echo "less than 120 s left: no sweep"
    exit 1
fi
if [[ -f bench/RESULTS.md ]]; then
    cp bench/RESULTS.md "$OUT_DIR/RESULTS.md"
fi
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of arguments
timeout "$left" python -m bench --device "$DEVICE" "${BENCH_SHAPES[@]}" "${BENCH_OPS[@]}" --time-budget $(( left - 90 )) \
    --out "$OUT_DIR" --results "$OUT_DIR/RESULTS.md" --no-progress ${GPU_CHECK_BENCH_ARGS:-}
rc=$?
case $rc in
    0) echo "sweep done" ;;
    124) echo "sweep stopped at the $left s limit: see $OUT_DIR/results_$DEVICE.csv for the rows it measured"; status=1 ;;
    *) echo "sweep finished with failed measurements or an error (exit $rc): see the note column"; status=1 ;;
esac

step "done (exit $status); files in $OUT_DIR:"
ls -R "$OUT_DIR"
exit $status
