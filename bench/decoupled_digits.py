"""Coupled vs Decoupled DMD on the digits benchmark (docs/decoupled_dmd.md), with the project's own commands.

Per seed and variant, recorded verbatim in the JSON output:

    dmdr train recipes/digits-rl-start.yaml --out RUN --set seed=S --set generator.steps=4 --set dmd.cfg=2.0
               --set stages.0.steps=STEPS --set dmd.dynadg.horizon=STEPS/2 --set dmd.dynars.horizon=STEPS/2
               [--set dmd.decoupled.enabled=true]
    dmdr sample --run RUN --num 2000 --seed 0 --out RUN/eval_samples.npz
    dmdr eval RUN/eval_samples.npz --json RUN/eval.json

The student is the 4-step DMD cold start (no reward) with real-score CFG 2 ± 0.5 (the CA term needs w > 1), DynaDG
and DynaRS on; the two variants differ only in ``dmd.decoupled`` (``ca_tau: below_gen``). Runs execute one at a
time, one thread each (the machine is shared). Usage:

    python bench/decoupled_digits.py --seeds 0 1 2 --steps 150 --out bench/results/decoupled_digits

(150 generator steps instead of the recipe's 600: the shared 2-core machine runs ~0.5 generator steps/s, so this
keeps the 6 runs near half an hour; a short-budget comparison, not converged students.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DMDR = [sys.executable, "-m", "dmdr"]
VARIANTS = {"coupled": [], "decoupled": ["dmd.decoupled.enabled=true", "dmd.decoupled.ca_tau=below_gen"]}
COMMON = ["generator.steps=4", "dmd.cfg=2.0", "logging.progress=false", "runtime.threads=1"]
METRICS = ("fid", "precision", "recall", "accuracy", "reward")


def sh(cmd: list[str], log: Path) -> float:
    t = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"command failed ({r.returncode}): {shlex.join(cmd)}; see {log}")
    return time.time() - t


def run(variant: str, seed: int, steps: int, out: Path) -> dict:
    rd, log = out / f"{variant}-s{seed}", out / f"{variant}-s{seed}.log"
    h = max(1, steps // 2)  # DynaDG / DynaRS anneal over the first half, as in the recipe (300 of 600)
    sets = COMMON + VARIANTS[variant] + [f"seed={seed}", f"stages.0.steps={steps}", "logging.checkpoint_every=0",
                                         f"dmd.dynadg.horizon={h}", f"dmd.dynars.horizon={h}"]
    train = DMDR + ["train", "recipes/digits-rl-start.yaml", "--out", str(rd), "--force"] + \
        [x for o in sets for x in ("--set", o)]
    t_train = sh(train, log)
    npz = rd / "eval_samples.npz"
    sample = DMDR + ["sample", "--run", str(rd), "--num", "2000", "--seed", "0", "--out", str(npz)]
    sh(sample, log)
    mjson = rd / "eval.json"
    ev = DMDR + ["eval", str(npz), "--json", str(mjson)]
    sh(ev, log)
    return {"variant": variant, "seed": seed, "train_seconds": round(t_train, 1), "loadavg": os.getloadavg(),
            "commands": [shlex.join(c[2:]) for c in (train, sample, ev)], **json.loads(mjson.read_text())}


def summary(rows: list[dict]) -> dict:
    """Mean, sample std and a 95% t-interval (n - 1 degrees of freedom) of every metric per variant."""
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
    out = {}
    for v in VARIANTS:
        vals = [r for r in rows if r["variant"] == v]
        n, s = len(vals), {}
        for m in METRICS:
            xs = [r[m] for r in vals]
            if n < 2:
                continue
            mean = sum(xs) / n
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
            half = t95.get(n - 1, 1.96) * sd / math.sqrt(n)
            s[m] = {"mean": mean, "std": sd, "ci95": [mean - half, mean + half], "values": xs}
        out[v] = {"n": n, **s}
    verdict = {}
    for m in METRICS:
        a, b = out["coupled"].get(m), out["decoupled"].get(m)
        if a and b:
            overlap = not (a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0])
            verdict[m] = "inconclusive (95% intervals overlap)" if overlap else \
                ("decoupled higher" if b["mean"] > a["mean"] else "decoupled lower")
    out["verdict"] = verdict
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150, help="generator steps of the cold start")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decoupled_digits")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for seed in a.seeds:
        for v in VARIANTS:
            rows.append(run(v, seed, a.steps, a.out))
            r = rows[-1]
            print(f"{v:10s} seed {seed} fid {r['fid']:.3f} acc {r['accuracy']:.4f} recall {r['recall']:.3f} "
                  f"({r['train_seconds']:.0f}s train, {time.time() - t0:.0f}s total)", flush=True)
            res = {"machine": "shared 2-core CPU, no GPU (other jobs running: timings are not comparable)",
                   "steps": a.steps, "rows": rows, "summary": summary(rows)}
            (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary(rows)["verdict"], indent=1))


if __name__ == "__main__":
    main()
