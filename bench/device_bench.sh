#!/usr/bin/env bash
# The digits results matrix + the GRPO regulariser comparison on a lent 16-core GPU machine, in one go.
# Students train on the GPU (10 parallel processes, `runtime.device=cuda`); GRPO runs on the CPU (10 processes,
# 1 thread each); sampling and evaluation run on the CPU. Usage (repo root): bash bench/device_bench.sh OUTDIR
# Needs python deps in PYTHONPATH (the device image lacks tensordict/pydantic: carried as wheels).
set -u
OUT=${1:?out dir}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
DEV=cpu; python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && DEV=cuda
# a CUDA smoke first; fall back to the CPU if it fails
if [ "$DEV" = cuda ]; then
  python3 -m dmdr train recipes/digits.yaml --smoke --out /tmp/cuda-smoke --force --device cuda --set logging.progress=false > "$OUT/cuda_smoke.log" 2>&1 || DEV=cpu
fi
echo "students train on: $DEV"
GRPO_INIT=${GRPO_INIT:-.devout/grpo_init}
( timeout 500 python3 bench/grpo_regularisers.py --init "$GRPO_INIT" --iters ${GRPO_ITERS:-150} --seeds 0 1 --workers 10 \
    --eval-every 25 --eval-samples 1000 --out /tmp/bench-grpo > "$OUT/grpo.log" 2>&1; echo "grpo exit $?" >> "$OUT/grpo.log" ) &
timeout ${DIGITS_TIMEOUT:-520} python3 bench/digits_results.py --tune --only runs --workers 10 --seeds 0 1 2 --out /tmp/digits \
    --deadline ${DIGITS_DEADLINE:-330} --set runtime.device=$DEV > "$OUT/digits.log" 2>&1
echo "digits exit $?" >> "$OUT/digits.log"
wait
cp /tmp/digits/results.json "$OUT/digits_results.json" 2>/dev/null
cp /tmp/digits/tune.json "$OUT/digits_tune.json" 2>/dev/null
cp /tmp/digits/dmdr-1step-s0/metrics.jsonl "$OUT/dmdr-1step-s0-metrics.jsonl" 2>/dev/null
cp bench/results/grpo_regularisers.json "$OUT/grpo_regularisers.json" 2>/dev/null
cp docs/grpo_regularisers.png "$OUT/grpo_regularisers.png" 2>/dev/null
ls -la "$OUT"
