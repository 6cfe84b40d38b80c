#!/usr/bin/env bash
# One prepared GPU check for a single H100/H200, in at most 8 minutes (the steps' time limits
# sum to 480 s), writing every result into one folder (7 files, none nested):
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_check_out)
#
#   1. environment, an editable install of this tree (no dependencies: the image has them),
#      then the GPU-marked tests, compiled (no interpreter) — first the bf16/fp16 operand
#      branch of the fused backward, which never runs on CPU                  -> gpu_check.log
#   2. the two-view loss benchmark ("check" grid: N = 4096 and 16384, D = 4096, V = 151936,
#      bf16; single-view fused CE rows next to Liger's and CCE's)
#                                                           -> two_view_loss_<gpu>_<date>.json/.png
#   3. the patch augmentation benchmark (quick grid)        -> patch_augment_<gpu>_<date>.json/.png
#   4. one training step of a Qwen2-VL-2B-shaped model: SFT, SFT + fused CE, the shipped
#      defense, the literal two-view objective               -> train_step_<gpu>_<date>.json/.png
#
# Peers (liger-kernel, cut-cross-entropy, kornia) are installed only from local wheels in
# $WHEELS (default ./wheels; the GPU machine has no network): a peer that is not there is
# recorded as unavailable with its reason, never silently dropped. Every step has its own time
# limit and a failing step does not stop the next; the exit status is the first failure's.
# --dry-run prints the plan (the exact commands) and checks that every file it needs exists.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
PY="${PYTHON:-python}"
WHEELS="${WHEELS:-$ROOT/wheels}"
LOG="$OUT_DIR/gpu_check.log"
STATUS=0
STEPS=()
# torch.compile is left out of the check (minutes of compilation); every other method runs
LOSS_METHODS="pcr_torch,pcr_triton,pcr_triton_chunked,eager,liger,cce,ce_pcr_torch,ce_pcr_triton,ce_eager,ce_liger,ce_cce"

plan() {   # plan <limit seconds> <name> <command...>
  STEPS+=("$1|$2|${*:3}")
}

plan 15  "environment"  "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'"
plan 30  "install"      "$PY -m pip install -q --no-deps --no-build-isolation -e $ROOT"
plan 20  "peers"        "if ls $WHEELS/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-deps --no-index $WHEELS/*.whl; else echo 'no peer wheels in $WHEELS: peers will be recorded unavailable'; fi"
plan 75  "gpu-tests-half-precision-backward-first" "$PY -m pytest -q -x -p no:cacheprovider -m gpu tests/test_gpu_kernels.py -k half_precision_operands"
plan 75  "gpu-tests-all" "$PY -m pytest -q -p no:cacheprovider -m gpu -k 'not half_precision_operands' tests"
plan 150 "loss-benchmark" "$PY benchmarks/bench_two_view_loss.py --grid check --quick --methods $LOSS_METHODS --out-dir $OUT_DIR --note gpu_check.sh"
plan 35  "augment-benchmark" "$PY benchmarks/bench_patch_augment.py --quick --out-dir $OUT_DIR --note gpu_check.sh"
plan 80  "step-benchmark" "$PY benchmarks/bench_step.py --config qwen2_vl_2b --out-dir $OUT_DIR --note gpu_check.sh"

if [[ $DRY -eq 1 ]]; then
  echo "gpu_check.sh plan (dry run): results -> $OUT_DIR"
  total=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r limit name cmd <<< "$step"
    total=$((total + limit))
    printf '  [%4ss] %-42s %s\n' "$limit" "$name" "$cmd"
  done
  echo "  worst case ${total}s of command time"
  missing=0
  for f in tests/test_gpu_kernels.py benchmarks/bench_two_view_loss.py benchmarks/bench_patch_augment.py \
           benchmarks/bench_step.py benchmarks/harness.py; do
    [[ -f "$ROOT/$f" ]] || { echo "missing: $f"; missing=1; }
  done
  exit $missing
fi

mkdir -p "$OUT_DIR"
cd "$ROOT" || exit 1
unset TRITON_INTERPRET   # compiled kernels on the GPU
export PYTHONPATH="$ROOT/tests:${PYTHONPATH:-}"
: > "$LOG"
start=$(date +%s)
for step in "${STEPS[@]}"; do
  IFS='|' read -r limit name cmd <<< "$step"
  echo "=== $name (limit ${limit}s): $cmd" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  if [[ $rc -ne 0 && $STATUS -eq 0 ]]; then STATUS=$rc; fi
done
echo "=== total $(( $(date +%s) - start ))s; results in $OUT_DIR:" | tee -a "$LOG"
ls -la "$OUT_DIR" | tee -a "$LOG"
exit $STATUS
