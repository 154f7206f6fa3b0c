"""How long does ``dmdr train`` take to stop after SIGTERM? (issue 14: it was one whole generator step.)

    OMP_NUM_THREADS=1 python bench/stop_latency.py --repeats 3 [--steps 300]

Runs the digits recipe with a long student rollout (``generator.steps`` = 300, so that one inner iteration — a
300-step backward simulation plus a critic update — takes about a second, and a generator step, ``ratio`` = 5 inner
iterations, several), no periodic checkpoints, a metrics line per generator step. Once the first metrics line
exists, waits a random 0-3 s, sends SIGTERM and measures the wall time until the process exits (the stop includes
writing one checkpoint). The inner-iteration time is measured from the same run: (time of the second metrics
line - time of the first) / ratio. Writes ``bench/results/stop_latency.json`` (``--out`` to change). Wall times on
a shared, busy machine: compare the two columns, not the absolute values.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(steps: int, seed: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="stoplat-")) / "run"
    args = [sys.executable, "-m", "dmdr", "train", str(ROOT / "recipes" / "digits.yaml"), "--out", str(out),
            "--device", "cpu", "--set", f"generator.steps={steps}", "--set", "stages.0.batch_size=32",
            "--set", "logging.log_every=1", "--set", "logging.checkpoint_every=0", "--set", "logging.sample_every=0",
            "--set", "logging.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"

    def lines():
        return [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    while len(lines()) < 2 and p.poll() is None:
        time.sleep(0.05)
    recs = lines()
    inner = (recs[1]["time"] - recs[0]["time"]) / 5
    time.sleep(random.Random(seed).uniform(0, 3))
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=600)
    latency = time.time() - t0
    return {"latency_s": round(latency, 2), "inner_iteration_s": round(inner, 2),
            "generator_step_s": round(inner * 5, 2), "exit_code": p.returncode,
            "interrupted_message": "interrupted" in stdout + stderr}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stop_latency.json")
    a = ap.parse_args()
    runs = [one(a.steps, s) for s in range(a.repeats)]
    for r in runs:
        print(r, flush=True)
    res = {"command": "OMP_NUM_THREADS=1 python bench/stop_latency.py " + " ".join(sys.argv[1:]),
           "machine": "2-core shared CPU machine (busy), one torch thread", "generator_steps": a.steps, "ratio": 5,
           "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
