#!/usr/bin/env bash
# GPU throughput probe for the RL frontier study (bench/rl_frontier.py, issue 10): how many GRPO iterations per
# second the digits 4-step policy runs on one GPU with each regulariser, to size the full study for a GPU session.
# Not a study result: a short starting student (100 steps) and 30 iterations per regulariser.
# Usage (repo root, after the wheels of bench/device_t2i.sh are installed, PYTHONPATH set):
#   bash bench/device_rl.sh OUTDIR        # writes OUTDIR/device_rl.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
OUTD=${1:-bench/results}; mkdir -p "$OUTD"
PY=${PYTHON:-python3}; export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p /tmp/shim && ln -sfn "$PWD/cli" /tmp/shim/dmdr_cli  # cli/ is installed as dmdr_cli
export PYTHONPATH=/tmp/shim:$PWD${PYTHONPATH:+:$PYTHONPATH}
DMDR="$PY -m dmdr_cli.app"
sub() { $PY -c "print(round($1 - $2, 2))"; }
common="--force --set logging.progress=false --set runtime.device=${DEVICE:-cuda}"
t0=$(date +%s.%N)
$DMDR train recipes/digits-rl-start.yaml --out /tmp/rl-start $common --set stages.0.steps=${START_STEPS:-100} \
  --set dmd.dynadg.horizon=50 --set dmd.dynars.horizon=50 > /tmp/rl-start.log 2>&1 || { tail -5 /tmp/rl-start.log; exit 1; }
t1=$(date +%s.%N)
echo "{\"kind\": \"start\", \"steps\": ${START_STEPS:-100}, \"wall_s\": $(sub $t1 $t0)}" | tee -a "$OUTD/device_rl.jsonl"
for spec in "kl:rl.regularizer=kl" "dmd:rl.regularizer=dmd" \
            "dmd_reuse_c5:rl.regularizer=dmd --set rl.critic_reuse_rollout=true --set rl.critic_updates=5"; do
  name=${spec%%:*}; sets=${spec#*:}
  s=$(date +%s.%N)
  $DMDR train recipes/digits-grpo.yaml --out /tmp/rl-$name $common --set rl.init=/tmp/rl-start \
    --set generator.steps=4 --set rl.sde=flow_grpo --set dmd.dynadg.enabled=false --set dmd.dynars.enabled=false \
    --set $sets --set iterations=${ITERS:-30} --set eval.every=0 --set monitors.every=0 --set logging.sample_every=0 \
    --set logging.checkpoint_every=0 > /tmp/rl-$name.log 2>&1 || { tail -5 /tmp/rl-$name.log; continue; }
  e=$(date +%s.%N)
  ips=$($PY -c "import json,sys; print([r for r in map(json.loads, open(sys.argv[1])) if 'iterations_per_s' in r][-1]['iterations_per_s'])" /tmp/rl-$name/metrics.jsonl)
  echo "{\"kind\": \"grpo\", \"setting\": \"$name\", \"iterations\": ${ITERS:-30}, \"iterations_per_s\": $ips, \"process_wall_s\": $(sub $e $s)}" | tee -a "$OUTD/device_rl.jsonl"
done
