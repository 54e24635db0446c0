#!/usr/bin/env bash
# A GPU machine's checks in one script: the device-parametrised tests on the GPU (tests/test_device.py with
# FCAFORMER_TEST_DEVICE), then the GPU benchmark (benchmarks/gpu.py). Writes at most five files into OUT_DIR:
# tests.log, benchmark.log, gpu.json, gpu.md, gpu.png. Exit status: the tests' (the benchmark's if they pass).
#
#   bash benchmarks/device_check.sh OUT_DIR                          # GPU machine, under 8 minutes on an H100
#   bash benchmarks/device_check.sh OUT_DIR --device cpu --quick     # the dry run of the test suite
#
# Options: --device DEV (default cuda), --quick (one test, tiny benchmark), --budget-s S (default 420: half for
# the tests, the rest for the benchmark, whose torch.compile part is skipped when time is short), --tests-only,
# --bench-only, --wheels DIR (pip-install DIR/*.whl first, offline, for machines without a package index),
# --shared DIR (the tests' shared data, FCAFORMER_SHARED; benchmarks/prepare_device.sh builds both folders).
# The project needs no installation: src/ is put on the path (also for the tests' child processes).
set -uo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1
shift
device=cuda quick="" budget=420 tests=1 bench=1 wheels="" shared=""
while [ $# -gt 0 ]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --budget-s) budget=$2; shift 2 ;;
        --tests-only) bench=""; shift ;;
        --bench-only) tests=""; shift ;;
        --wheels) wheels=$2; shift 2 ;;
        --shared) shared=$2; shift 2 ;;
        *) echo "error: unknown option $1" >&2; usage ;;
    esac
done
out=$(mkdir -p "$out" && cd "$out" && pwd)
if [ -n "$shared" ]; then  # resolved before the cd below, like OUT_DIR
    if [ ! -d "$shared/data" ]; then
        echo "error: --shared $shared has no data/ folder (build it with benchmarks/prepare_device.sh)" >&2
        exit 2
    fi
    FCAFORMER_SHARED=$(cd "$shared" && pwd)
    export FCAFORMER_SHARED
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "$wheels" ]; then
    $python -m pip install -q --no-index --no-deps --no-compile "$wheels"/*.whl || exit 2
fi

status=0
if [ -n "$tests" ]; then
    selection=()
    [ -n "$quick" ] && selection=(-k "fast_path_equals_faithful_in_fp32 and l1")
    test_budget=$budget
    [ -n "$bench" ] && test_budget=$((budget / 2))
    FCAFORMER_TEST_DEVICE=$device timeout "$test_budget" $python -m pytest -m "not slow" -q -rs \
        -p no:cacheprovider tests/test_device.py "${selection[@]}" > "$out/tests.log" 2>&1
    status=$?
    tail -n 25 "$out/tests.log"
fi
if [ -n "$bench" ]; then
    bench_budget=$budget
    [ -n "$tests" ] && bench_budget=$((budget / 2))
    args=(--out "$out" --device "$device" --budget-s "$bench_budget")
    [ -n "$quick" ] && args+=(--quick)
    $python benchmarks/gpu.py "${args[@]}" > "$out/benchmark.log" 2>&1
    bench_status=$?
    tail -n 40 "$out/benchmark.log"
    [ $status -eq 0 ] && status=$bench_status
fi
exit $status
