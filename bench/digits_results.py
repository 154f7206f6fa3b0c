"""Produce the digits results table (docs/results.md) with the project's own commands.

Every row is made by subprocess calls of the CLI, recorded verbatim in the JSON output:

    dmdr train recipes/digits.yaml --out RUN --set seed=S [--set ...]     (students)
    dmdr sample --run RUN --num 2000 --seed 0 --out RUN/samples.npz
    dmdr sample --teacher --steps K --cfg W --num 2000 --seed 0 --out ...  (teacher rows)
    dmdr eval X.npz --json X.json

Runs execute in parallel worker processes (one thread each). Usage:

    python bench/digits_results.py --workers 16 --seeds 0 1 2 --out bench/results/digits
    python bench/digits_results.py --only teacher --workers 2          # just the teacher rows

Sampling wall time per 1,000 samples is measured separately on a quiet machine by bench/sampling_speed.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DMDR = [sys.executable, "-m", "dmdr"]

# name -> (student steps N, extra overrides); every config also gets --set seed=S
STUDENTS = {
    "dmd-1step": ["generator.steps=1", "stages.1.rewards=[]"],
    "dmd-4step": ["generator.steps=4", "generator.shift=1.0", "stages.1.rewards=[]"],
    "dmdr-1step": ["generator.steps=1"],
    "dmdr-4step": ["generator.steps=4", "generator.shift=1.0"],
    "dmdr-1step-no-dynadg": ["generator.steps=1", "dmd.dynadg.enabled=false"],
    "dmdr-1step-no-dynars": ["generator.steps=1", "dmd.dynars.enabled=false"],
}
MAIN = ["dmd-1step", "dmd-4step", "dmdr-1step", "dmdr-4step"]  # run with every seed; the rest with the first seed
SWEEP = [0.0, 0.02, 0.05, 0.1, 0.2]  # reward weights for the quality/diversity trade-off (1-step, first seed)
TEACHER = [(k, w) for k in (50, 25, 8, 4, 1) for w in (1.0, 2.0)]
# --tune: candidate variants of the default recipe (none changes the per-step cost); the one with the lowest
# 1-step DMDR FID (first seed) becomes the base of every student row. docs/results.md reports all of them.
VARIANTS = {
    "base": [],
    "lr2x": ["optim.lr_gen=2e-4", "optim.lr_critic=2e-4", "stages.1.lr_gen=1e-4", "stages.1.lr_critic=1e-4"],
    "critic-lr2x": ["optim.lr_critic=2e-4", "stages.1.lr_critic=1e-4"],
    "gen-lr-half": ["optim.lr_gen=5e-5", "stages.1.lr_gen=2.5e-5"],
    "rank64": ["critic.lora.rank=64", "critic.lora.alpha=64"],
    "scale-fake1": ["critic.scale_fake=1.0"],
    "dyn-horizon600": ["dmd.dynadg.horizon=600", "dmd.dynars.horizon=600"],
    "stage2-lr-same": ["stages.1.lr_gen=1e-4", "stages.1.lr_critic=1e-4"],
}


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


def student_job(name: str, over: list[str], seed: int, out: Path, extra: list[str]) -> dict:
    run = out / f"{name}-s{seed}"
    log = out / f"{name}-s{seed}.log"
    sets = [x for o in over + [f"seed={seed}", "logging.progress=false", "runtime.threads=1"] + extra for x in ("--set", o)]
    train = DMDR + ["train", "recipes/digits.yaml", "--out", str(run), "--force"] + sets
    t_train = sh(train, log)
    npz = run / "eval_samples.npz"
    sample = DMDR + ["sample", "--run", str(run), "--num", "2000", "--seed", "0", "--out", str(npz)]
    sh(sample, log)
    mjson = run / "eval.json"
    ev = DMDR + ["eval", str(npz), "--json", str(mjson)]
    sh(ev, log)
    m = json.loads(mjson.read_text())
    steps = next((int(o.split("=")[1]) for o in over if o.startswith("generator.steps=")), 1)
    return {"kind": "student", "name": name, "seed": seed, "nfe": steps, "train_seconds": round(t_train, 1),
            "commands": [shlex.join(c[2:]) for c in (train, sample, ev)], **m}


def teacher_job(steps: int, cfg: float, out: Path) -> dict:
    name = f"teacher-{steps}step-cfg{cfg:g}"
    log = out / f"{name}.log"
    npz = out / f"{name}.npz"
    sample = DMDR + ["sample", "--teacher", "--steps", str(steps), "--cfg", str(cfg), "--num", "2000", "--seed", "0",
                     "--out", str(npz)]
    sh(sample, log)
    mjson = out / f"{name}.json"
    ev = DMDR + ["eval", str(npz), "--json", str(mjson)]
    sh(ev, log)
    return {"kind": "teacher", "name": name, "seed": 0, "nfe": steps * (2 if cfg > 1 else 1), "cfg": cfg,
            "commands": [shlex.join(c[2:]) for c in (sample, ev)], **json.loads(mjson.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "digits")
    ap.add_argument("--only", choices=["all", "teacher", "students", "sweep", "runs"], default="all")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every student run")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; jobs not started by then are skipped")
    ap.add_argument("--main-only", action="store_true", help="only the MAIN student configs (every seed)")
    ap.add_argument("--tune", action="store_true", help="first pick the base variant (VARIANTS) by 1-step DMDR FID")
    a = ap.parse_args()
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.tune:
        print("tuning:", ", ".join(VARIANTS), flush=True)
        with ThreadPoolExecutor(a.workers) as ex:
            futs = {v: ex.submit(student_job, f"tune-{v}", ["generator.steps=1"] + over, a.seeds[0], a.out, a.extra)
                    for v, over in VARIANTS.items()}
            tuned = {}
            for v, f in futs.items():
                try:
                    tuned[v] = f.result()
                    print(f"tune {v:16s} fid {tuned[v]['fid']:.3f} acc {tuned[v]['accuracy']:.4f} "
                          f"rec {tuned[v]['recall']:.3f} ({time.time() - t_start:.0f}s)", flush=True)
                except Exception as e:  # noqa: BLE001
                    print("FAILED tune", v, e, flush=True)
        best = min(tuned, key=lambda v: tuned[v]["fid"])
        print(f"chosen base variant: {best} {VARIANTS[best]}", flush=True)
        (a.out / "tune.json").write_text(json.dumps({"chosen": best, "overrides": VARIANTS[best],
                                                     "rows": list(tuned.values())}, indent=1))
        a.extra = a.extra + VARIANTS[best]
    jobs = []
    if a.only in ("all", "teacher"):
        jobs += [(teacher_job, (k, w, a.out)) for k, w in TEACHER]
    if a.only in ("all", "students", "runs"):
        for name, over in STUDENTS.items():
            if a.main_only and name not in MAIN:
                continue
            for s in (a.seeds if name in MAIN else a.seeds[:1]):
                jobs.append((student_job, (name, over, s, a.out, a.extra)))
    if a.only in ("all", "sweep", "runs"):
        for w in SWEEP:
            if w == 0.05:
                continue  # the default weight is the dmdr-1step row
            jobs.append((student_job, (f"sweep-w{w:g}", ["generator.steps=1", f"stages.1.rewards.0.weight={w}"]
                                       if w > 0 else ["generator.steps=1", "stages.1.rewards=[]"], a.seeds[0], a.out,
                         a.extra)))
    # priority: the first seed of every student config, then the other seeds, then teacher rows
    def prio(j):
        fn, args = j
        return (fn is teacher_job, 0 if fn is teacher_job else (args[2] != a.seeds[0]))
    jobs.sort(key=prio)
    results, failures = [], []
    lock = __import__("threading").Lock()

    def guarded(fn, args):
        if a.deadline and time.time() - t_start > a.deadline:
            raise RuntimeError(f"skipped (deadline): {fn.__name__}{args[:3]}")
        r = fn(*args)
        with lock:
            results.append(r)
            (a.out / "results.json").write_text(json.dumps({"results": results, "failures": failures}, indent=1))
        print(f"{r['name']:28s} seed {r['seed']}  fid {r['fid']:.3f}  prec {r['precision']:.3f}  "
              f"rec {r['recall']:.3f}  acc {r['accuracy']:.3f}  reward {r['reward']:.3f}  "
              f"({time.time() - t_start:.0f}s)", flush=True)
        return r

    with ThreadPoolExecutor(a.workers) as ex:
        futs = [ex.submit(guarded, fn, args) for fn, args in jobs]
        for f in futs:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - report and keep the other rows
                with lock:
                    failures.append(str(e))
                print("FAILED:", e, flush=True)
    (a.out / "results.json").write_text(json.dumps({"results": results, "failures": failures}, indent=1))
    print(f"wrote {a.out / 'results.json'} ({len(results)} rows, {len(failures)} failures)")


if __name__ == "__main__":
    main()
