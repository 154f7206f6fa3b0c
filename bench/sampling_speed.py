"""Sampling wall time per 1,000 digits samples for the teacher (K Euler steps, with/without CFG) and the students
(N steps), on this machine. Weights do not change the cost, so the shipped teacher is used for every row.

    OMP_NUM_THREADS=2 python bench/sampling_speed.py --out bench/results/sampling_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dmdr.models.tiny import load_tiny
from dmdr.sampling import StudentInfo, sample_student, sample_teacher


def timeit(fn, reps: int = 3) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/sampling_speed.json"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = load_tiny("builtin:digits-teacher").eval()
    labels = torch.arange(1000) % 10
    rows = []
    for k in (50, 25, 8, 4, 1):
        for cfg in (1.0, 2.0):
            s = timeit(lambda: sample_teacher(m, labels, steps=k, cfg=cfg))
            rows.append({"model": "teacher", "steps": k, "cfg": cfg, "nfe": k * (2 if cfg > 1 else 1), "seconds_per_1000": s})
    for n in (1, 4):
        info = StudentInfo(n, 1.0, 0.0, "timing")
        s = timeit(lambda: sample_student(m, labels, info))
        rows.append({"model": "student", "steps": n, "cfg": 1.0, "nfe": n, "seconds_per_1000": s})
    base = next(r["seconds_per_1000"] for r in rows if r["model"] == "teacher" and r["steps"] == 50 and r["cfg"] == 1.0)
    for r in rows:
        r["speedup_vs_teacher50"] = base / r["seconds_per_1000"]
        r["speedup_over_nfe_ratio"] = r["speedup_vs_teacher50"] / (50 / r["nfe"])
    info = {"threads": a.threads, "cpu": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
            "torch": torch.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['model']:8s} steps {r['steps']:3d} cfg {r['cfg']:.1f} nfe {r['nfe']:3d}  {r['seconds_per_1000']*1000:8.1f} ms/1000  "
              f"speed-up {r['speedup_vs_teacher50']:.1f}x  ({r['speedup_over_nfe_ratio']:.2f} of NFE ratio)")
    print("machine:", info)


if __name__ == "__main__":
    main()
