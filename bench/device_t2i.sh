#!/usr/bin/env bash
# Real-size text-to-image DMDR on one GPU (bench/device_t2i.py): step time + peak memory per layout with gradient
# checkpointing off/on, 4-step vs 28-step CFG sampling at 1024 px; JSON in bench/results/device_t2i.json.
# Usage (repo root):  bash bench/device_t2i.sh          # GPU, ~8 min
#                     bash bench/device_t2i.sh --tiny   # CPU, same code on the shrunk stand-ins, < 3 min (CI)
# The GPU machine has torch but no diffusers/transformers/peft/tensordict/torchrl and no registry: wheels carried
# in .whl/ (docs/scale.md has the download command: diffusers, tensordict, torchrl, pydantic and their needs) are
# installed to /tmp/site first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  PY=python3
fi
if [ "${1:-}" = "--tiny" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec timeout 175 "$PY" bench/device_t2i.py --tiny "${@:2}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU: use --tiny'; print(torch.cuda.get_device_name(0))"
# one process per model, each under its own limit (sd3-medium 100 s, sd35-large 200 s, sdxl 160 s); < 8 min in all
exec timeout 475 "$PY" bench/device_t2i.py "$@"
