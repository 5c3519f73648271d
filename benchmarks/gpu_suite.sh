#!/usr/bin/env bash
# The GPU benchmarks in one call, most important first, each under its own time limit, each one's full
# output in OUT_DIR/full.log and the end of each in OUT_DIR/summary.log:
#
#     benchmarks/gpu_suite.sh [OUT_DIR]          # env: PY (python), BUDGET_S (1000), SMOKE=1 (tiny sizes)
#
# 1. model:     bench_model, ResNet-50 RetinaNet at 512 px vs torchvision, train b8 + inference b1/b16, fp32/bf16
# 2. model_b32: the same training step at batch 32 (what a GPU run uses), fp32/bf16
# 3. pipeline:  bench_scaling, real `train` on synthetic DICOMs cached at 512 px (cache, loader workers,
#               augmentation, Lightning, bf16), 2 epochs, the second timed: the rate a user gets
# 4. peak:      bench_peak, achieved FLOP/s of the train step and inference against a large matmul/conv
# 5. batch:     bench_batch, largest batch that fits the GPU, resnet50 fp32/bf16
# 6. encoders:  bench_model training at batch 32 bf16 for se_resnext50 and pnasnet5
# 7. compiled:  bench_model --compile, inference b16 bf16 (compile stalls included in the wall time)
# A step that would start with less than its limit left of BUDGET_S is skipped and says so; all steps
# take about 15 min on an H200, the first five about 8.
set -u
OUT_DIR=${1:-${OUT:-/tmp/pneumodet-gpu}}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-1000}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.log"
rm -f "$OUT_DIR/full.log"

if [ "${SMOKE:-0}" = 1 ]; then
  SIZE=64; SOURCE=64; N=40; VAL=8; REP=2; B=2; BIG=4; ENC_EXTRA=(); DEV=cpu
else
  SIZE=512; SOURCE=128; N=2000; VAL=32; REP=20; B=8; BIG=32; ENC_EXTRA=(se_resnext50 pnasnet5); DEV=cuda
fi

step() {  # step NAME LIMIT_S CMD...: run CMD under LIMIT_S unless the budget is too short
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt "$limit" ]; then
    echo "== $name: skipped ($left s of the budget left, needs $limit s)" >>"$SUMMARY"
    return
  fi
  local t0=$(date +%s)
  local log="$OUT_DIR/$name.log"
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  { echo "== $name: rc $rc in $(($(date +%s) - t0)) s"; grep -v '^\s*$' "$log" | grep -iv warn | tail -n 25; } >>"$SUMMARY"
  { echo "== $name: $*"; cat "$log"; } >>"$OUT_DIR/full.log" && rm "$log"
}

{
  echo "== environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, torchvision, timm, lightning, pydicom, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, 'pydicom', pydicom.__version__, 'cuda', torch.cuda.is_available())" 2>&1
  nproc
} >"$SUMMARY"

step model 150 $PY benchmarks/bench_model.py --device $DEV --size $SIZE --batch $B --infer-batch 1 16 --repeats $REP
step model_b32 90 $PY benchmarks/bench_model.py --device $DEV --size $SIZE --batch $BIG --infer-batch --repeats $REP
step pipeline 200 $PY benchmarks/bench_scaling.py --sizes $N --size $SIZE --source-size $SOURCE --val $VAL \
  --encoder resnet50 --batch $BIG --workers $(( $(nproc) > 4 ? $(nproc) - 4 : 1 )) --aug heavy --epochs 2
step peak 90 $PY benchmarks/bench_peak.py --device $DEV --size $SIZE --batch $BIG --infer-batch 16 --repeats 5 \
  --matmul 8192 --conv 32 256 128
step batch 200 $PY benchmarks/bench_batch.py --device $DEV --size $SIZE --encoders resnet50 --precision fp32 bf16 --time-budget 150
for enc in "${ENC_EXTRA[@]}"; do
  step "encoder_$enc" 120 $PY benchmarks/bench_model.py --device $DEV --size $SIZE --batch $BIG --infer-batch \
    --precision bf16 --encoder "$enc" --repeats 5
done
step compiled 200 $PY benchmarks/bench_model.py --device $DEV --size $SIZE --batch $BIG --infer-batch 16 --precision bf16 \
  --skip-train --compile --repeats $REP
echo "== total $(($(date +%s) - START)) s" >>"$SUMMARY"
cat "$SUMMARY"
