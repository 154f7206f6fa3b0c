"""SIGKILL a real ``dmdr train`` at random times, resume it each time, and check that nothing was lost.

    OMP_NUM_THREADS=1 python bench/kill_resume.py --kills 10          # ~3 min on one CPU thread

The digits recipe is shortened with ``--set`` (default 40 + 20 generator steps, a checkpoint every 5, a metrics
line every step). First an uninterrupted reference run, then the same run killed with SIGKILL ``--kills`` times
at uniformly random moments (start-up included) and continued with ``--resume`` after each kill (or restarted
with ``--force`` when the kill came before the first checkpoint). Checks:

* each resume starts from the newest checkpoint complete at the moment of the kill (no step lost beyond it),
  and redoes at most ``checkpoint_every`` logged steps;
* the final ``metrics.jsonl`` holds steps 1..N exactly once each, and its losses equal the reference bit for bit;
* the final checkpoint loads into a trainer and the exported student equals the reference's.

Writes the figures (per kill: delay, last logged step, resumed step, steps redone; totals and overhead) to
``bench/results/kill_resume.json``; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("time", "gen_steps_per_s")


def teacher_spec(workdir: Path) -> str:
    """The shipped digits teacher, else /work/teacher_run's, else a random TinyDiT (the figures do not depend on it)."""
    if (ROOT / "dmdr" / "assets" / "digits_teacher.safetensors").exists():
        return "builtin:digits-teacher"
    if Path("/work/teacher_run/teacher.safetensors").exists():
        return "/work/teacher_run/teacher.safetensors"
    import torch

    from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny

    torch.manual_seed(0)
    path = workdir / "random_teacher.safetensors"
    save_tiny(TinyDiT(TinyDiTConfig()), str(path))
    return str(path)


def metrics(run: Path) -> list[dict]:
    from dmdr.train.runtime import read_metrics

    return read_metrics(run / "metrics.jsonl")


def newest_checkpoint_step(run: Path) -> int | None:
    from dmdr.train.checkpoint import list_checkpoints

    cands = list_checkpoints(run / "checkpoints")
    return int(cands[-1].name[5:12]) if cands else None


def launch(cmd: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, nargs=2, default=(40, 20), metavar=("STAGE1", "STAGE2"))
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--max-delay", type=float, default=None,
                    help="kill delays ~ U[0.5, max] seconds after each start (default: a quarter of the reference wall time)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kill_resume.json")
    a = ap.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="dmdr-kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    total = sum(a.steps)
    sets = [f"model.teacher={teacher_spec(work)}", "runtime.device=cpu", "runtime.threads=1",
            f"stages.0.steps={a.steps[0]}", f"stages.1.steps={a.steps[1]}",
            f"stages.0.batch_size={a.batch_size}", f"stages.1.batch_size={a.batch_size}",
            "logging.log_every=1", "logging.sample_every=0", f"logging.checkpoint_every={a.checkpoint_every}",
            "logging.keep_last=2", "logging.progress=false"]
    base = [sys.executable, "-m", "dmdr", "train", "digits"] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}

    # 1. the uninterrupted reference
    ref = work / "reference"
    t0 = time.time()
    with open(work / "reference.log", "w") as log:
        rc = subprocess.run(base + ["--out", str(ref), "--force"], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    ref_wall = time.time() - t0
    if rc != 0:
        print(f"reference run failed (exit {rc}); see {work / 'reference.log'}", file=sys.stderr)
        return 1
    print(f"reference: {total} generator steps in {ref_wall:.1f}s")

    # 2. the killed run
    rng = random.Random(a.seed)
    max_delay = a.max_delay or ref_wall / 4
    run = work / "killed"
    kills, launches, restarts, problems = [], 0, 0, []
    t0 = time.time()
    mode = ["--force"]
    log_path = work / "killed.log"
    last_recs: list[dict] = []
    while True:
        with open(log_path, "a") as log:
            log.write(f"\n==== launch {launches} {mode}\n")
            log.flush()
            start = log.tell()
            proc = launch(base + ["--out", str(run)] + mode, env, log)
            launches += 1
            delay = rng.uniform(0.5, max_delay) if len(kills) < a.kills else None
            try:
                proc.wait(timeout=delay)
                finished = True
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                finished = False
        text = " ".join(log_path.read_bytes()[start:].decode(errors="replace").split())
        m = re.search(r"resumed from \S*step-(\d+)", text)
        if m or mode == ["--force"]:  # this launch got past loading: settle the kills that led to it
            resumed = int(m.group(1)) if m else 0
            for i, k in enumerate(kills):
                if k["resumed_from"] is not None:
                    continue
                k["resumed_from"] = resumed
                k["steps_redone"] = max(0, k["last_logged_step"] - resumed)
                if k["checkpoint_at_kill"] is not None and resumed != k["checkpoint_at_kill"]:
                    problems.append(f"kill {i + 1}: resumed from step {resumed}, the newest checkpoint was "
                                    f"{k['checkpoint_at_kill']}")
                if k["checkpoint_at_kill"] is not None and k["steps_redone"] > a.checkpoint_every:
                    problems.append(f"kill {i + 1}: {k['steps_redone']} steps redone > checkpoint_every")
        if finished:
            if proc.returncode != 0:
                problems.append(f"launch {launches} exited with {proc.returncode}; see {log_path}")
            break
        recs = metrics(run)
        ck = newest_checkpoint_step(run)
        idle = recs == last_recs  # killed before this launch logged anything (start-up, loading)
        last_recs = recs
        own_last = recs[-1]["step"] if recs and not idle else (ck or 0)
        kills.append({"delay_s": round(delay, 2), "last_logged_step": own_last, "checkpoint_at_kill": ck,
                      "killed_before_first_step": idle, "resumed_from": None})
        print(f"kill {len(kills)}: after {delay:.1f}s, last logged step {own_last}, newest checkpoint {ck}"
              f"{' (during start-up)' if idle else ''}")
        if ck is None:  # killed before the first checkpoint: nothing to resume
            restarts += 1
            mode = ["--force"]
        else:
            mode = ["--resume"]
    killed_wall = time.time() - t0

    # 3. checks on the final state
    steps = [r["step"] for r in metrics(run)]
    contiguous = steps == list(range(1, total + 1))
    if not contiguous:
        problems.append(f"metrics steps are not 1..{total} exactly once: {steps}")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rs]  # noqa: E731
    same_losses = strip(metrics(run)) == strip(metrics(ref))
    if not same_losses:
        problems.append("the killed run's metrics differ from the reference")
    loads, same_student = True, False
    try:
        import torch
        from safetensors.torch import load_file

        from dmdr.recipes import load_recipe
        from dmdr.train.checkpoint import load_latest_valid
        from dmdr.train.dmdr import DMDRTrainer

        path, tensors, state, _ = load_latest_valid(run / "checkpoints", warn=problems.append)
        tr = DMDRTrainer(load_recipe(run / "recipe.yaml"), None, torch.device("cpu"), console=lambda *x, **y: None)
        tr.load(tensors, state)
        loads = tr.state.global_step == total
        s1, s2 = (load_file(str(d / "student.safetensors")) for d in (run, ref))
        same_student = s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    except Exception as e:  # noqa: BLE001
        loads = False
        problems.append(f"final checkpoint does not load: {e.__class__.__name__}: {e}")
    if not same_student:
        problems.append("the exported student differs from the reference")

    redone = [k["steps_redone"] for k in kills if k.get("steps_redone") is not None]
    result = {
        "recipe": "digits", "generator_steps": total, "checkpoint_every": a.checkpoint_every,
        "batch_size": a.batch_size, "kills": len(kills), "launches": launches, "restarts_before_first_checkpoint": restarts,
        "steps_redone_per_kill": redone, "steps_redone_mean": round(sum(redone) / max(len(redone), 1), 2),
        "steps_redone_max": max(redone, default=0),
        "reference_wall_s": round(ref_wall, 1), "killed_wall_s": round(killed_wall, 1),
        "overhead_s": round(killed_wall - ref_wall, 1),
        "overhead_pct": round(100 * (killed_wall - ref_wall) / ref_wall, 1),
        "metrics_steps_contiguous_unique": contiguous, "losses_bitwise_equal_to_reference": same_losses,
        "final_checkpoint_loads": loads, "student_bitwise_equal_to_reference": same_student,
        "per_kill": kills, "problems": problems,
        "machine": f"{os.cpu_count()} CPUs (shared), OMP_NUM_THREADS=1, torch threads 1",
        "command": "OMP_NUM_THREADS=1 python bench/kill_resume.py " + " ".join(sys.argv[1:]),
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_kill"}, indent=2))
    print(f"wrote {a.json}")
    if a.workdir is None and not problems:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
