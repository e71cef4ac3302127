#!/usr/bin/env bash
# One prepared check for a GPU machine with torch + triton preinstalled and no network, in under
# 8 minutes: installs the project (no dependencies), runs the kernel tests on the compiled Triton
# kernels and every other test marked gpu, the meta-step benchmark (the per-task loop against the
# eager, chunked and compiled batched step, as on the CPU), the kernel and one-GPU scaling benchmarks.
# Logs, JUnit XML and JSON go to the folder given as $1, else $OUT, else .out/gpu_check, and all of
# them into gpu_check.tar.gz there; summary.txt lists every step with its exit status and time.
#
#   bash benchmarks/gpu_check.sh "$OUT"
#
# Environment: PYTHON (default python3); BENCH_ARGS (extra bench_kernels.py arguments);
# GPU_CHECK_ALLOW_CPU=1 runs the same steps without a GPU (CUDA tests skip, benchmarks run their
# CPU paths) to rehearse the script. Exit status: 0 if every step passed, 1 otherwise, 2 if no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.out/gpu_check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
export TRITON_INTERPRET=0  # the compiled kernels: tests/conftest.py sets 1 only when this is unset
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install fails
deadline=$((SECONDS + 470))  # every step's limit is cut so the whole run ends within 8 minutes
status=0
: > "$out/summary.txt"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: skipped, the 8-minute budget is spent" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start))s (limit ${limit}s)" | tee -a "$out/summary.txt"
    tail -n 4 "$out/$name.log"
    ((rc == 0)) || status=1
}

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$out/environment.txt"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
        echo "no CUDA device visible to torch: nothing to check (GPU_CHECK_ALLOW_CPU=1 rehearses on the CPU)" | tee -a "$out/summary.txt"
        exit 2
    fi
    echo "no CUDA device: rehearsal on the CPU (CUDA tests skip, benchmarks time the torch paths)" | tee -a "$out/summary.txt"
    device=cpu
else
    device=cuda
fi

step install 60 "$py" -m pip install --no-deps --no-build-isolation --no-index -e .
# Kernel tests: the CUDA ones on the compiled kernels plus the CPU reference checks (gradcheck,
# fullgraph compile) on this torch version; the interpreter tests skip with TRITON_INTERPRET=0.
step test_kernels 150 "$py" -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
    tests/test_kernels.py tests/test_kernels_meta.py --junitxml="$out/test_kernels.xml"
# Other GPU tests; test files whose imports need packages missing here (webdataset) are reported.
# pytest's exit status 5 (no test selected) counts as a pass.
step test_gpu_others 90 bash -c '"$0" -m pytest -q -p no:cacheprovider -m gpu tests \
    --ignore=tests/test_kernels.py --ignore=tests/test_kernels_meta.py \
    --continue-on-collection-errors --junitxml="$1"; rc=$?; ((rc == 5)) && rc=0; exit $rc' \
    "$py" "$out/test_gpu_others.xml"
# The meta-step: every config, the loop against eager (all T in one chunk) and chunked (16), then the
# compiled step at T = 64 in one chunk (compiling takes most of its time; reported as compile_s).
step bench_meta_step 90 "$py" benchmarks/bench_meta_step.py --device "$device" --variants loop eager chunked \
    --repeats 5 --out "$out/bench_meta_step.json"
step bench_meta_step_compiled 100 "$py" benchmarks/bench_meta_step.py --device "$device" --configs mlp-T64-k4 \
    --variants loop compiled --chunk 64 --repeats 5 --out "$out/bench_meta_step_compiled.json"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
step bench_kernels 100 "$py" benchmarks/bench_kernels.py --device "$device" \
    --json "$out/bench_kernels.json" --markdown "$out/bench_kernels.md" ${BENCH_ARGS:-}
# One GPU: its compute time per meta-step feeds the 8-GPU estimate.
step bench_scaling 45 "$py" benchmarks/bench_scaling.py --device "$device" --ranks 1 --out "$out/bench_scaling.json"
echo "total ${SECONDS}s, status $status" | tee -a "$out/summary.txt"
# Everything in one archive beside summary.txt: the device tool returns at most 8 files.
tar -czf "$out/../gpu_check.tar.gz" -C "$out" . && mv "$out/../gpu_check.tar.gz" "$out/"
exit $status
