"""Time to quality: FID against generator steps and wall-clock, and peak memory, for dmdr's default 1-step
recipe and the DMD2-style baseline (recipes/digits-dmd2.yaml), over seeds, in one run (issue 13, docs/results.md).

For each (config, seed), sequentially, one thread each:

1. ``dmdr train RECIPE --out OUT/CONFIG-sS --force --set seed=S --set logging.checkpoint_every=EVERY ...`` as a
   child process; its peak resident memory is the child's ``ru_maxrss`` (``os.wait4``), its wall-clock at each
   checkpoint is the checkpoint directory's mtime minus the launch time (so it includes start-up);
2. every checkpoint's student (the EMA weights when the run keeps an EMA, else the generator) samples 2,000
   digits exactly as ``dmdr sample --run --num 2000 --seed 0`` does, scored by :func:`dmdr.eval.report.evaluate_samples`
   in all three feature spaces (evaluation net, raw pixels, second evaluation net).

The reference is the 50-step teacher (``dmdr sample --teacher --steps 50 --num 2000 --seed 0``), scored the same
way. The JSON output holds every command, the curves, and per config: the first (steps, seconds) at which the
FID reaches the teacher's, per space, or the best FID reached when it never does.

    OMP_NUM_THREADS=1 python bench/time_to_quality.py --seeds 0 1 2 --out bench/results/time_to_quality
    python bench/time_to_quality.py --eval-only --out ...   # re-score existing runs (no training)

Wall-clock on the shared development machine is measured under contention from other processes: compare
configurations by generator steps first.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DMDR = [sys.executable, "-m", "dmdr"]
# config -> (recipe, overrides). The dmdr row names its EMA explicitly so the command means the same thing
# whatever the recipe's default is.
CONFIGS = {
    "dmdr": ("recipes/digits.yaml", ["optim.ema_decay=0.99"]),
    "dmd2": ("recipes/digits-dmd2.yaml", []),
}
SPACES = {"net": "fid", "pixels": "fid_pixels", "mlp": "fid_mlp"}


def train(config: str, seed: int, out: Path, every: int, extra: list[str]) -> dict:
    recipe, over = CONFIGS[config]
    run = out / f"{config}-s{seed}"
    sets = over + extra + [f"seed={seed}", "logging.progress=false", "runtime.threads=1",
                           f"logging.checkpoint_every={every}", "logging.keep_last=100", "logging.sample_every=0"]
    cmd = DMDR + ["train", recipe, "--out", str(run), "--force"] + [x for o in sets for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{config}-s{seed}.log", "w") as log:
        log.write("$ " + shlex.join(cmd[2:]) + "\n")
        log.flush()
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.time() - t0
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"training failed: {shlex.join(cmd)}; see {out / f'{config}-s{seed}.log'}")
    ck = {int(d.name.split("-")[1]): round(d.stat().st_mtime - t0, 1)
          for d in (run / "checkpoints").glob("step-*") if d.is_dir() and "." not in d.name}
    info = {"config": config, "seed": seed, "command": shlex.join(cmd[2:]), "wall_s": round(wall, 1),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "checkpoint_wall_s": dict(sorted(ck.items()))}
    (run / "train_info.json").write_text(json.dumps(info, indent=1))
    return info


@torch.no_grad()
def sample_checkpoint(path: Path, which: str = "ema", num: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` samples (images in [0, 1], labels) of one checkpoint's student, as ``dmdr sample --num N --seed S``."""
    import yaml

    from dmdr.data.digits import to_unit
    from dmdr.models.tiny import load_tiny
    from dmdr.recipes import validate_recipe
    from dmdr.sampling import StudentInfo, sample_student
    from dmdr.train.checkpoint import read_checkpoint

    tensors, _, recipe_yaml = read_checkpoint(path)
    r = validate_recipe(yaml.safe_load(recipe_yaml), str(path))
    model = load_tiny(r.model.teacher)
    model.load_state_dict(tensors[which] if which in tensors else tensors.get("ema", tensors["generator"]))
    info = StudentInfo(r.generator.steps, r.generator.shift, r.model.t_min, str(path), r.generator.backward_sim)
    labels = torch.arange(num) % model.config.num_classes
    x = sample_student(model, labels, info, generator=torch.Generator().manual_seed(seed))
    return to_unit(x).float(), labels


def score_checkpoint(path: Path, which: str = "ema") -> dict:
    """Sample 2,000 digits from one checkpoint's student as ``dmdr sample --num 2000 --seed 0`` does; all metrics.

    ``which="ema"``: the EMA weights when the checkpoint has them (what ``dmdr sample --run`` uses), else the
    generator; ``which="generator"``: the raw generator (the same run without EMA: EMA does not affect training)."""
    from dmdr.eval.report import evaluate_samples

    return evaluate_samples(*sample_checkpoint(path, which))


def param_counts(config: str) -> dict:
    """Trainable parameters of the generator and the critic (AdamW keeps two more copies of each)."""
    from dmdr.recipes import load_recipe
    from dmdr.families.registry import build_bundle

    b = build_bundle(load_recipe(ROOT / CONFIGS[config][0]), torch.device("cpu"))
    return {"generator_params": sum(p.numel() for p in b.generator_params),
            "critic_params": sum(p.numel() for p in b.critic_params)}


def first_reaching(curve: list[dict], key: str, target: float) -> dict:
    for row in curve:
        if row[key] <= target:
            return {"reached": True, "step": row["step"], "wall_s": row["wall_s"], "fid": row[key]}
    best = min(curve, key=lambda row: row[key])
    return {"reached": False, "best_step": best["step"], "best_wall_s": best["wall_s"], "best_fid": best[key]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--runs", nargs="+", default=None, help="explicit CONFIG:SEED order (instead of the grid)")
    ap.add_argument("--every", type=int, default=100, help="checkpoint (and score) every this many generator steps")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "time_to_quality")
    ap.add_argument("--eval-only", action="store_true", help="score existing runs (their train_info.json) only")
    ap.add_argument("--teacher-json", type=Path, default=None, help="an existing `dmdr eval --json` of the teacher")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.teacher_json is None:
        npz, tj = a.out / "teacher-50step.npz", a.out / "teacher-50step.json"
        cmds = [DMDR + ["sample", "--teacher", "--steps", "50", "--num", "2000", "--seed", "0", "--out", str(npz)],
                DMDR + ["eval", str(npz), "--json", str(tj)]]
        if not tj.exists():
            for c in cmds:
                subprocess.run(c, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL)
        a.teacher_json = tj
        teacher_cmds = [shlex.join(c[2:]) for c in cmds]
    else:
        teacher_cmds = [f"(given) {a.teacher_json}"]
    teacher = json.loads(Path(a.teacher_json).read_text())
    prev = json.loads((a.out / "results.json").read_text())["runs"] if (a.out / "results.json").exists() else []
    runs: list[dict] = []
    order = ([(c, int(sd)) for c, sd in (x.split(":") for x in a.runs)] if a.runs else
             [(c, sd) for sd in a.seeds for c in a.configs])  # interleave configs: contention hits both alike
    for config, seed in order:
        if True:
            run = a.out / f"{config}-s{seed}"
            info = (json.loads((run / "train_info.json").read_text()) if a.eval_only
                    else train(config, seed, a.out, a.every, a.extra))
            curve = []
            for d in sorted((run / "checkpoints").glob("step-*")):
                if not d.is_dir() or "." in d.name:
                    continue
                step = int(d.name.split("-")[1])
                m = score_checkpoint(d)
                curve.append({"step": step, "wall_s": info["checkpoint_wall_s"].get(str(step),
                                                                                 info["checkpoint_wall_s"].get(step)),
                              **{k: m[k] for k in m if k != "n"}})
                print(f"{config} s{seed} step {step:4d}  fid {m['fid']:.3f}  pixels {m['fid_pixels']:.4f}  "
                      f"mlp {m['fid_mlp']:.4f}  rec {m['recall']:.3f}  acc {m['accuracy']:.4f}", flush=True)
            raw = None
            if curve and any(run.glob("checkpoints/step-*/ema.safetensors")):  # the final raw generator = no EMA
                last = sorted(d for d in (run / "checkpoints").glob("step-*") if d.is_dir() and "." not in d.name)[-1]
                m = score_checkpoint(last, which="generator")
                raw = {"step": curve[-1]["step"], **{k: m[k] for k in m if k != "n"}}
            prev = [p for p in prev if (p["config"], p["seed"]) != (config, seed)]  # this run replaces its old entry
            runs.append({**info, "curve": curve, "final_without_ema": raw,
                         "to_teacher": {s: first_reaching(curve, k, teacher[k]) for s, k in SPACES.items()}})
            (a.out / "results.json").write_text(json.dumps(
                {"teacher": {"commands": teacher_cmds, **teacher}, "params": {c: param_counts(c) for c in sorted({c for c, _ in order} | {p["config"] for p in prev})},
                 "runs": prev + runs, "note": "wall-clock measured on a shared 2-core machine under contention"},
                indent=1))
    print(f"wrote {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
