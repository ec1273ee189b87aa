#!/usr/bin/env bash
# One prepared GPU check: every GPU test, a short real-MNIST training, the GPU benchmark.
#
#   bash scripts/gpu_check.sh [MNIST_DIR]        (default: $BACKPROP_XP_DATA, else data/mnist)
#
# Runs from a source tree on a machine that has CuPy and PyTorch (CUDA) but no
# package index (PYTHONPATH=.). nvmath-python, which the GPU step calls cuBLAS
# through, is installed from wheels in $GPU_CHECK_WHEELS (default .whl) into a
# temporary folder when it is not importable. Each part runs on its own,
# with its own time limit, and prints its own PASS/FAIL/SKIP line, so a broken
# feature (graph capture, say) does not hide the others. Full logs and JSON go
# to $OUT if set (the device runner collects it), else bench/gpu-results/.
# The whole run is meant to take under 8 minutes (a 15-minute device lease leaves room to rerun a
# part); the benchmark gets what is
# left of that budget. The summary table comes last.
#
# Where nvidia-smi lists a GPU, nothing may skip for want of one: a backend
# that refuses CuPy, or a GPU test that skips, is a FAIL with the reason.
set -u

cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-460}
DATA="${1:-${BACKPROP_XP_DATA:-data/mnist}}"
RESULTS="${OUT:-bench/gpu-results}"
mkdir -p "$RESULTS"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BACKPROP_XP_DATA="$DATA"
export BACKPROP_XP_REQUIRE_DATA=1   # a test that would skip for want of MNIST fails instead
export MPLBACKEND=Agg
export PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if command -v timeout >/dev/null 2>&1; then LIMIT=(timeout -k 5); else LIMIT=(); fi

# A GPU listed here means the GPU tests must run: the cupy fixture fails instead of skipping.
GPU_PRESENT=0
if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then GPU_PRESENT=1; export BACKPROP_XP_REQUIRE_GPU=1; fi

WHEELS="${GPU_CHECK_WHEELS:-.whl}"
if ! "$PY" -c "import nvmath.bindings.cublas" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site" && echo "installed $(ls "$WHEELS" | tr '\n' ' ')into $site"
fi
PARTS=()     # "name|status|seconds|note"

elapsed() { echo $(( $(date +%s) - START )); }

# run_part NAME SECONDS COMMAND...: runs it with a time limit, log in $RESULTS/NAME.log, shows the log's tail.
run_part() {
    local name=$1 limit=$2; shift 2
    local log="$RESULTS/$name.log" t0 rc status note
    t0=$(date +%s)
    local shown="$*"
    echo "=== $name (limit ${limit}s): ${shown:0:160}"
    if [ ${#LIMIT[@]} -gt 0 ]; then "${LIMIT[@]}" "$limit" "$@" >"$log" 2>&1; rc=$?; else "$@" >"$log" 2>&1; rc=$?; fi
    tail -n "${TAIL_LINES:-12}" "$log" | sed 's/^/    /'
    note=""
    if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; note="exit $rc"; fi
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="timed out after ${limit}s"
    # a pytest part where everything skipped did not test anything: say SKIP, with the reason
    if grep -qE '^[0-9]+ skipped' "$log" 2>/dev/null || grep -qE '^=+ [0-9]+ skipped in' "$log" 2>/dev/null; then
        status=SKIP; note=$(grep -m1 -oE "SKIPPED \[[0-9]+\] [^:]+:[0-9]+: .*" "$log" | cut -c1-120)
    fi
    { [ "$name" = bench ] || [ "$name" = train ] || [ "$name" = train-adam ] || [ "$name" = launches ]; } && [ $rc -eq 2 ] && status=SKIP && note="no CUDA device"
    # with a GPU on the machine, a skip means something refused it: that is a failure
    [ "$GPU_PRESENT" = 1 ] && [ "$status" = SKIP ] && status=FAIL && note="a GPU is listed but the part skipped: $note"
    local summary
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    [ -n "$summary" ] && note="${note:+$note; }$summary"
    PARTS+=("$name|$status|$(( $(date +%s) - t0 ))|$note")
    echo "--- $name: $status ($(( $(date +%s) - t0 )) s) $note"
}

PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)

# 0. what we are running on
run_part env 60 bash -c "nvidia-smi -L 2>&1 | head -n 4; $PY - <<'EOF'
import sys
print('python', sys.version.split()[0])
try:
    import cupy
    print('cupy', cupy.__version__, 'runtime', cupy.cuda.runtime.runtimeGetVersion(), 'driver', cupy.cuda.runtime.driverGetVersion())
    print('device', cupy.cuda.runtime.getDeviceProperties(0)['name'])
except Exception as exc:
    print('cupy unusable:', type(exc).__name__, exc); sys.exit(1)
try:
    import torch
    print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
except Exception as exc:
    print('torch unusable:', type(exc).__name__, exc)
try:
    import nvmath
    print('nvmath-python', nvmath.__version__)
except Exception as exc:
    print('nvmath-python unusable:', type(exc).__name__, exc)
import backprop_xp as bx
b = bx.get_backend('auto'); print('backend auto ->', b.name, '(', b.reason, ')')
if $GPU_PRESENT and not b.is_gpu:
    sys.exit('FAIL: nvidia-smi lists a GPU but the backend refuses CuPy: ' + b.reason)
EOF"

# 1. the CUDA sources compile with NVRTC (the CPU test; here with the device's NVRTC)
run_part nvrtc 60 "${PYTEST[@]}" tests/test_cuda_compile.py --junitxml="$RESULTS/junit-nvrtc.xml"

# 2. every GPU test except the graph ones and the trainings: fused kernels vs NumPy twins, public API CuPy vs NumPy
run_part kernels 240 "${PYTEST[@]}" -m gpu tests --ignore=tests/test_gpu_train.py -k "not graph and not never_waits" \
    --junitxml="$RESULTS/junit-kernels.xml"

# 2b. training on the GPU through the library: train(), divergence, checkpoint and resume, load, TF32
run_part gpu-train-tests 240 "${PYTEST[@]}" tests/test_gpu_train.py --junitxml="$RESULTS/junit-gpu-train.xml"

# 3. CUDA graphs: capture per batch size, replay vs eager vs reference, fallback, no host sync in the loop
run_part graphs 120 "${PYTEST[@]}" -m gpu tests/test_gpu.py -k "graph or never_waits" --junitxml="$RESULTS/junit-graphs.xml"

# 3b. each launch of the step, captured and timed with events
run_part launches 90 "$PY" bench/gpu_launches.py --out "$RESULTS/gpu_launches.json"

# 4. a short real-MNIST training, every variant, against NumPy; TF32's accuracy effect
run_part train 120 "$PY" scripts/gpu_train_check.py --data "$DATA" --epochs 2 --out "$RESULTS/gpu_train_check.json"
# 4b. the same with Adam: the captured step with Adam's kernel, its per-step numbers refilled before each replay
run_part train-adam 120 "$PY" scripts/gpu_train_check.py --data "$DATA" --epochs 2 --optimizer adam \
    --out "$RESULTS/gpu_train_check_adam.json"

# 5. the command line on the GPU (what a user runs)
rm -rf "$RESULTS/cli-run"
run_part cli 90 "$PY" -m backprop_xp train --backend cupy --data-dir "$DATA" --hidden 128 --epochs 2 \
    --lr-schedule constant --quiet --out "$RESULTS/cli-run"

# 6. the benchmark, with whatever is left of the time budget
left=$(( TOTAL_BUDGET - $(elapsed) - 15 ))
[ $left -lt 30 ] && left=30
# (GPU_CHECK_BENCH_ARGS adds options, e.g. "--hidden 128 --batch 128 4096" to rerun a subset)
# shellcheck disable=SC2086
run_part bench $(( left + 30 )) "$PY" bench/bench_gpu.py --data "$DATA" --tf32 --budget-s "$left" \
    --out "$RESULTS/bench_gpu.json" ${GPU_CHECK_BENCH_ARGS:-}

# ---------------------------------------------------------------------------- summary (last)
"$PY" - "$RESULTS" "$(elapsed)" "${PARTS[@]}" <<'EOF'
import json, os, sys
results, wall, parts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = [dict(zip(("part", "status", "seconds", "note"), p.split("|", 3))) for p in parts]
summary = {"wall_s": wall, "parts": rows}
bench = os.path.join(results, "bench_gpu.json")
print()
print("=" * 100)
if os.path.exists(bench):
    sys.path.insert(0, "bench")
    try:
        import bench_gpu
        with open(bench) as f:
            report = json.load(f)
        print(bench_gpu.table(report))
        summary["targets"] = report.get("targets")
    except Exception as exc:
        print(f"(could not read {bench}: {exc})")
    print("-" * 100)
print(f"{'part':10s} {'result':6s} {'s':>5s}  note")
for r in rows:
    print(f"{r['part']:10s} {r['status']:6s} {r['seconds']:>5s}  {r['note'][:150]}")
print(f"total {wall} s; logs and JSON in {results}/")
tmp = os.path.join(results, ".gpu_check.json.tmp")
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, os.path.join(results, "gpu_check.json"))
EOF

for p in "${PARTS[@]}"; do
    case "$p" in *"|FAIL|"*) exit 1 ;; esac
done
exit 0
