#!/usr/bin/env bash
# FSDP2 on CUDA/NCCL (bench/device_fsdp.py): the digits DMDR run sharded over every GPU of the machine, stop +
# resume exactness, a resume with another process count, plain vs FSDP2; JSON in bench/results/device_fsdp.json.
# Usage (repo root):  bash bench/device_fsdp.sh                 # GPU, < 3 min
#                     bash bench/device_fsdp.sh --device cpu    # CPU (gloo, 2 processes), checks the script
# Wheels carried in .whl/ are installed to /tmp/site first when present (as bench/device_t2i.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  PY=python3
fi
exec timeout 900 "$PY" bench/device_fsdp.py "$@"
