#!/usr/bin/env bash
# make gpu-check: what only a CUDA GPU can check, in at most 8 minutes, each step under its own
# timeout: pytest -m cuda; make bench's GPU rows (ResNet-18 width 1, bf16 and fp32, img/s and
# s per epoch of 50 000 images); one P1 quick grid with --runs-per-gpu (wall time, against the
# same grid's CPU wall time from outputs/runs when a CPU study left it there); a CUDA run resumed
# after SIGKILL. Writes $OUT/gpu_check.json and $OUT/summary.txt. Without a GPU: says so, exits 0,
# runs and writes nothing.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-outputs/gpu_check}
K=${RUNS_PER_GPU:-4}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing run"
    exit 0
fi

rm -rf "$OUT"
mkdir -p "$OUT/logs"
: > "$OUT/steps.txt"

# step NAME LIMIT_S CMD...: one step under `timeout`, its output in $OUT/logs/NAME.log
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "$*" > "$OUT/logs/$name.cmd"
    echo "gpu-check: $name (at most ${limit} s) ..."
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - t0 )) $limit" >> "$OUT/steps.txt"
    echo "gpu-check: $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

# 130 + 100 + 10 + 145 + 75 + 15 = 475 s of limits: within 8 minutes
step pytest_cuda 130 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
step bench 100 "$PY" scripts/bench.py --device cuda --loops bnlib,bnlib_fp32 --n-train 50000 --repeats 2 \
    --budget-s 70 --probe-calls 0 --out "$OUT/bench"
DATASET=$(timeout 10 "$PY" scripts/gpu_check.py dataset 2>/dev/null || echo synthetic)
step p1_grid 145 "$PY" -m bnlib study p1 --preset quick --dataset "$DATASET" --workers "$K" --runs-per-gpu "$K" \
    --out "$OUT/p1"
step resume 75 "$PY" scripts/gpu_check.py resume "$OUT"
timeout 15 "$PY" scripts/gpu_check.py summary "$OUT"
grep -q -v " 0 [0-9]* [0-9]*$" "$OUT/steps.txt" && exit 1
exit 0
