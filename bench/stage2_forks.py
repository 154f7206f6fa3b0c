"""Stage-2 variants of one stage 1 (issue 13): what the reward stage of recipes/digits.yaml (1 step) and
recipes/digits-4step.yaml (4 steps) buys and costs, in the three feature spaces of docs/evaluation.md, over seeds.

Every variant of a seed continues the *same* stage-1 student, so the variants differ only in stage 2:

1. **base** (once per recipe and seed; one thread)::

       dmdr train RECIPE --out OUT/b{N}-{S} --set seed=S --set stages.1.steps=1 --set runtime.threads=1

   which stops one step into stage 2, with a checkpoint at the end of stage 1 (``step-0000600``);
2. **fork** (per variant): a copy of the base without anything after step 600, continued with ::

       dmdr train --out OUT/{variant}-b{N}-{S} --resume --set stages.1.steps=300 [variant overrides]

   A resumed run is bitwise the run that never stopped (tests/test_stage2_forks.py checks this for a fork), so
   ``default`` reproduces ``dmdr train RECIPE --set seed=S`` exactly;
3. ``stage1`` is the stage-1 checkpoint itself (600 steps, no reward ever), at no training cost.

Every student (its EMA; and its raw generator, i.e. the same run without EMA) samples 2,000 digits exactly as
``dmdr sample --run --num 2000 --seed 0`` and is scored by ``dmdr eval``'s code in all three spaces. The reference
is the 50-step teacher of bench/results/time_to_quality/teacher-50step.json (same sampling and scoring).

    OMP_NUM_THREADS=1 python bench/stage2_forks.py --steps 1 --variants default:0 stage1 reward_w0.02 no_reward \\
        --workers 2 --out runs/forks --json bench/results/stage2_forks/steps1.json
    python bench/stage2_forks.py --report bench/results/stage2_forks/steps1.json bench/results/stage2_forks/steps4.json

``VARIANT:S`` restricts a variant to the listed seeds (``default:0`` = the reproduction check on seed 0 only).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
RECIPES = {1: "recipes/digits.yaml", 4: "recipes/digits-4step.yaml"}
# variant -> overrides of stage 2 (applied on --resume; the stage-1 student is shared)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "stage1": [],  # no fork: the stage-1 checkpoint itself
    "no_reward": ["stages.1.rewards=[]", "monitors.every=0"],  # its reward monitors need a reward
    "reward_w0.02": ["stages.1.rewards.0.weight=0.02"],
    "reward_w0.01": ["stages.1.rewards.0.weight=0.01"],
    "stage2_150": ["stages.1.steps=150"],
    "reward_hinge": ["stages.1.rewards.0.hinge=-0.1"],
}
SPACES = {"net": "fid", "pixels": "fid_pixels", "mlp": "fid_mlp"}
METRICS = ("fid", "fid_pixels", "fid_mlp", "recall", "recall_pixels", "recall_mlp", "precision", "accuracy",
           "accuracy_mlp", "reward")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _call(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "dmdr", *cmd[1:]], stdout=f, stderr=subprocess.STDOUT,
                             cwd=ROOT, env=_env())
    if rc:
        raise SystemExit(f"error: `{shlex.join(cmd)}` failed (exit {rc}); see {log}")
    return time.time() - t0


def base_command(steps: int, seed: int, out: Path) -> list[str]:
    return ["dmdr", "train", RECIPES[steps], "--out", str(out / f"b{steps}-{seed}"), "--set", f"seed={seed}",
            "--set", "stages.1.steps=1", "--set", "runtime.threads=1", "--set", "logging.progress=false"]


def stage1_end(run: Path) -> int:
    """Generator steps of stage 1 of the run in ``run`` (its recipe.yaml)."""
    from dmdr import safe_yaml

    return int(safe_yaml.load((run / "recipe.yaml").read_text())["stages"][0]["steps"])


def stage1_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / f"step-{stage1_end(run):07d}"


def ensure_base(steps: int, seed: int, out: Path) -> tuple[Path, list[str]]:
    """The shared stage-1 run of (recipe, seed); trained when its stage-1 checkpoint is missing."""
    cmd, run = base_command(steps, seed, out), out / f"b{steps}-{seed}"
    if not (run / "recipe.yaml").exists() or not (stage1_checkpoint(run) / "COMPLETE").exists():
        _call(cmd, out / f"b{steps}-{seed}.log")
    return run, cmd


def fork(base: Path, dest: Path, overrides: list[str], stage2_steps: int = 300) -> list[str]:
    """Copy ``base`` up to its stage-1 checkpoint into ``dest`` and continue stage 2 with ``overrides``."""
    end = stage1_end(base)
    cmd = ["dmdr", "train", "--out", str(dest), "--resume", "--set", f"stages.1.steps={stage2_steps}", "--set",
           "logging.progress=false", "--set", "runtime.threads=1"] + [a for o in overrides for a in ("--set", o)]
    if (dest / "student.safetensors").exists() and (dest / "fork.json").exists():
        return cmd
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("samples", "student.safetensors"))
    for d in (dest / "checkpoints").iterdir():  # nothing after the end of stage 1 survives
        if d.name.startswith("step-") and int(d.name.split("-")[1].split(".")[0]) > end:
            shutil.rmtree(d)
    metrics = dest / "metrics.jsonl"
    if metrics.exists():
        keep = [l for l in metrics.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= end]
        metrics.write_text("".join(l + "\n" for l in keep))
    wall = _call(cmd, dest.with_suffix(".log"))
    (dest / "fork.json").write_text(json.dumps({"base": str(base), "command": shlex.join(cmd), "wall_s": wall}))
    return cmd


def score(ckpt: Path, which: str) -> dict:
    from time_to_quality import score_checkpoint

    m = score_checkpoint(ckpt, which)
    return {k: m[k] for k in METRICS if k in m}


def final_checkpoint(run: Path) -> Path:
    from dmdr.train.checkpoint import list_checkpoints

    return list_checkpoints(run / "checkpoints")[-1]


def summarise(rows: list[dict]) -> dict:
    """Per (variant, weights): mean, sd, 95% t-interval over seeds of every metric (rl_frontier.mean_ci)."""
    from rl_frontier import mean_ci

    out: dict = {}
    for key in sorted({(r["variant"], r["weights"]) for r in rows}):
        sel = [r for r in rows if (r["variant"], r["weights"]) == key]
        out[f"{key[0]}|{key[1]}"] = {"seeds": [r["seed"] for r in sel],
                                     **{m: mean_ci([r["metrics"][m] for r in sel]) for m in METRICS
                                        if all(m in r["metrics"] for r in sel)}}
    return out


def report(paths: list[Path]) -> None:
    teacher = json.loads((ROOT / "bench/results/time_to_quality/teacher-50step.json").read_text())
    print("| N | variant | weights | seeds | FID net (× teacher) | FID pixels (× teacher) | FID MLP (× teacher) | "
          "recall net / pixels / MLP | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        d = json.loads(p.read_text())
        for key, s in d["summary"].items():
            var, w = key.split("|")
            f = lambda m: f"{s[m]['mean']:.4g} ± {s[m]['sd']:.2g} ({s[m]['mean'] / teacher[m]:.2f}×)" \
                if s[m]["n"] > 1 else f"{s[m]['mean']:.4g} ({s[m]['mean'] / teacher[m]:.2f}×)"
            print(f"| {d['steps']} | {var} | {w} | {','.join(map(str, s['seeds']))} | {f('fid')} | "
                  f"{f('fid_pixels')} | {f('fid_mlp')} | {s['recall']['mean']:.3f} / {s['recall_pixels']['mean']:.3f}"
                  f" / {s['recall_mlp']['mean']:.3f} | {s['accuracy']['mean']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, choices=sorted(RECIPES), default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["stage1", "default", "no_reward"],
                    help=f"VARIANT or VARIANT:S,S (seeds); variants: {', '.join(VARIANTS)}")
    ap.add_argument("--workers", type=int, default=1, help="training processes at once (one thread each)")
    ap.add_argument("--out", type=Path, default=Path("runs/forks"))
    ap.add_argument("--json", type=Path, default=None, help="results file (default bench/results/stage2_forks/stepsN.json)")
    ap.add_argument("--report", type=Path, nargs="+", default=None, help="print the table of these results files")
    a = ap.parse_args()
    if a.report:
        return report(a.report)
    import torch

    torch.set_num_threads(1)
    jobs: list[tuple[str, int]] = []
    for v in a.variants:
        name, _, seeds = v.partition(":")
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        jobs += [(name, s) for s in ([int(x) for x in seeds.split(",")] if seeds else a.seeds)]
    a.out.mkdir(parents=True, exist_ok=True)
    bases = {}
    with ThreadPoolExecutor(a.workers) as pool:  # the shared stage-1 runs first
        for s, res in zip(sorted({s for _, s in jobs}),
                          pool.map(lambda s: ensure_base(a.steps, s, a.out), sorted({s for _, s in jobs}))):
            bases[s] = res

    def run_job(job):
        name, s = job
        base, _ = bases[s]
        if name == "stage1":
            return job, stage1_checkpoint(base), None
        dest = a.out / f"{name}-b{a.steps}-{s}"
        cmd = fork(base, dest, VARIANTS[name])
        return job, final_checkpoint(dest), cmd

    rows = []
    with ThreadPoolExecutor(a.workers) as pool:
        for (name, s), ck, cmd in pool.map(run_job, jobs):
            for which in ("ema", "generator"):
                m = score(ck, which)
                rows.append({"variant": name, "seed": s, "weights": which, "checkpoint": str(ck),
                             "base_command": shlex.join(bases[s][1]), "fork_command": cmd and shlex.join(cmd),
                             "metrics": m})
                print(f"N={a.steps} {name:14s} s{s} {which:9s} fid {m['fid']:.3f} pixels {m['fid_pixels']:.4f} "
                      f"mlp {m['fid_mlp']:.4f} recall {m['recall']:.3f} acc {m['accuracy']:.4f}", flush=True)
    path = a.json or ROOT / "bench" / "results" / "stage2_forks" / f"steps{a.steps}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    keys = {(r["variant"], r["seed"], r["weights"]) for r in rows}
    rows = [r for r in old if (r["variant"], r["seed"], r["weights"]) not in keys] + rows
    path.write_text(json.dumps({"steps": a.steps, "recipe": RECIPES[a.steps], "argv": sys.argv[1:],
                                "teacher": "bench/results/time_to_quality/teacher-50step.json",
                                "rows": rows, "summary": summarise(rows)}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
