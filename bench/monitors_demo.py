"""Demonstrate the reward-hacking monitors (docs/monitors.md) on digits, 3 seeds, with the shipped monitor sections.

Per seed s (all runs ``runtime.threads=1``, ``logging.progress=false``):

* ``dmdr-default-s{s}``  — ``recipes/digits.yaml``, **shortened**: stage 1 300 generator steps (shipped: 600),
  stage 2 300 steps; the monitors' ``start`` moved to step 300 (the first RL step, as 600 is in the shipped run).
  Expected: no alarm.
* ``dmdr-10x-s{s}``      — the same run resumed from its step-300 checkpoint with the stage-2 reward weight 10×
  too large (0.5 instead of 0.05). Expected: flagged.
* ``grpo-none-warn-s{s}`` / ``grpo-none-stop-s{s}`` — ``recipes/digits-grpo.yaml`` from the distilled
  ``dmdr-default-s{s}`` student + critic (DynaDG/DynaRS off, as the recipe says for a distilled start),
  ``rl.regularizer: none`` on ``digits_hackable``, 40 iterations (shipped: 300), evaluation (1000 samples) every
  iteration. ``warn``: every monitor only warns, so the run shows how FID goes on; ``stop``: the shipped
  actions (FID and reward saturation stop the run).
* ``grpo-default-s{s}`` — the shipped GRPO recipe (DMD regulariser) from the same start, **40 iterations**
  (shipped 300), evaluation every 10. Expected: no alarm.

Writes ``<out>/<run>/{metrics.jsonl,recipe.yaml,log.txt}`` (no weights are kept) and ``<out>/results.json``
(per run: the command, the alarms, stop step, FID series; per group: the summary quoted in docs/monitors.md).

    python bench/monitors_demo.py --out bench/results/monitors --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DMDR = [sys.executable, "-m", "dmdr"]
COMMON = ["--set", "logging.progress=false", "--set", "runtime.threads=1"]


def _records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def summarize(run: Path) -> dict:
    recs = _records(run)
    alarms = [{"step": r["step"], "check": r["alarm"], "action": r["alarm_action"],
               "value": r["alarm_value"], "degradation": r["alarm_degradation"]} for r in recs if "alarm" in r]
    evals = [(r["step"], r["eval_fid"]) for r in recs if "eval_fid" in r]
    mon = [(r["step"], r["monitor_fid"]) for r in recs if "monitor_fid" in r]
    out = {"alarms": alarms, "n_alarms": len(alarms), "first_alarm_step": alarms[0]["step"] if alarms else None,
           "checks_flagged": sorted({a["check"] for a in alarms}),
           "stopped_at": next((a["step"] for a in alarms if a["action"] == "stop"), None),
           "eval_fid": evals, "monitor_fid": mon, "last_step": max((r.get("step", 0) for r in recs), default=0)}
    if evals:
        f0 = evals[0][1]
        out["eval_fid_start"] = f0
        out["first_step_eval_fid_doubled"] = next((s for s, f in evals if f >= 2 * f0), None)
        if out["first_alarm_step"] is not None:
            out["eval_fid_at_first_alarm"] = next((f for s, f in evals if s == out["first_alarm_step"]), None)
        if out["stopped_at"] is not None:
            out["eval_fid_at_stop"] = next((f for s, f in evals if s == out["stopped_at"]), None)
    return out


def run(cmd: list[str], run_dir: Path, results: dict, name: str) -> None:
    t0 = time.time()
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    results["runs"][name] = {"command": "dmdr " + " ".join(cmd[3:]), "exit_code": proc.returncode,
                             "wall_s": round(time.time() - t0, 1), **summarize(run_dir)}
    print(f"  -> exit {proc.returncode}, {results['runs'][name]['n_alarms']} alarms, "
          f"{results['runs'][name]['wall_s']} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "monitors")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dmdr-monitors-demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stage1", type=int, default=300)
    ap.add_argument("--grpo-none-iters", type=int, default=40)
    ap.add_argument("--reuse", action="store_true", help="keep a finished dmdr-default run of an earlier call")
    ap.add_argument("--grpo-only", action="store_true", help="only the GRPO runs (needs the dmdr-default runs)")
    ap.add_argument("--grpo-default-iters", type=int, default=40)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res_file = a.out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {"runs": {}}
    if "meta" in results and not results.get("invocations"):
        results["invocations"] = [results["meta"]]
    results["meta"] = {"command": "python bench/monitors_demo.py " + " ".join(sys.argv[1:]),
                       "seeds": a.seeds, "stage1_steps": a.stage1, "grpo_none_iters": a.grpo_none_iters,
                       "grpo_default_iters": a.grpo_default_iters, "loadavg_at_start": os.getloadavg(),
                       "note": "shortened runs (see the module docstring); CPU, shared 2-core machine",
                       "grpo_only": a.grpo_only}
    results.setdefault("invocations", []).append(results["meta"])
    n_checks = 7
    starts = [x for i in range(n_checks) for x in ("--set", f"monitors.checks.{i}.start={a.stage1}")]
    for s in a.seeds:
        work = a.work / f"s{s}"
        base = work / "dmdr-default"
        seed = ["--set", f"seed={s}"]
        dmdr_common = [*COMMON, *seed, "--set", f"stages.0.steps={a.stage1}",
                       "--set", f"logging.checkpoint_every={a.stage1}", *starts]
        name = f"dmdr-default-s{s}"
        if not (a.reuse and (base / "student.safetensors").exists() and name in results["runs"]):
            run([*DMDR, "train", "recipes/digits.yaml", "--out", str(base), "--force", *dmdr_common], base, results,
                name)
            _save(results, res_file, a.out, base, name)
        # GRPO from the distilled student (+ critic)
        g_common = [*COMMON, *seed, "--set", f"rl.init={base}", "--set", "dmd.dynadg.enabled=false",
                    "--set", "dmd.dynars.enabled=false", "--set", "eval.samples=1000"]
        none = ["--set", "rl.regularizer=none", "--set", f"iterations={a.grpo_none_iters}", "--set", "eval.every=1"]
        for mode, extra in (("stop", []), ("warn", ["--set", "monitors.checks.0.action=warn",
                                                     "--set", "monitors.checks.1.action=warn"])):
            name, d = f"grpo-none-{mode}-s{s}", work / f"grpo-none-{mode}"
            run([*DMDR, "train", "recipes/digits-grpo.yaml", "--out", str(d), "--force", *g_common, *none, *extra],
                d, results, name)
            _save(results, res_file, a.out, d, name)
        # DMDR with a 10x reward weight, resumed from the default run's end of stage 1
        d = work / "dmdr-10x"
        if a.grpo_only:
            pass
        elif d.exists():
            shutil.rmtree(d)
        if not a.grpo_only:
            shutil.copytree(base, d, ignore=shutil.ignore_patterns("student.safetensors", "samples"))
            for ck in sorted((d / "checkpoints").glob("step-*")):
                if int(ck.name.split("-")[1]) > a.stage1:
                    shutil.rmtree(ck)
            name = f"dmdr-10x-s{s}"
            run([*DMDR, "train", "recipes/digits.yaml", "--out", str(d), "--resume", *dmdr_common,
                 "--set", "stages.1.rewards.0.weight=0.5"], d, results, name)
            _save(results, res_file, a.out, d, name)
        name, d = f"grpo-default-s{s}", work / "grpo-default"
        run([*DMDR, "train", "recipes/digits-grpo.yaml", "--out", str(d), "--force", *g_common,
             "--set", f"iterations={a.grpo_default_iters}", "--set", "eval.every=10"], d, results, name)
        _save(results, res_file, a.out, d, name)
    results["summary"] = group_summary(results["runs"])
    res_file.write_text(json.dumps(results, indent=1))


def _save(results: dict, res_file: Path, out: Path, run_dir: Path, name: str) -> None:
    dst = out / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "recipe.yaml", "log.txt"):
        if (run_dir / f).exists():
            shutil.copy(run_dir / f, dst / f)
    results["summary"] = group_summary(results["runs"])
    res_file.write_text(json.dumps(results, indent=1))


def group_summary(runs: dict) -> dict:
    groups: dict[str, list] = {}
    for name, r in runs.items():
        groups.setdefault(name.rsplit("-s", 1)[0], []).append((name, r))
    out = {}
    for g, items in sorted(groups.items()):
        out[g] = {"runs": len(items), "runs_with_alarm": sum(1 for _, r in items if r["n_alarms"]),
                  "first_alarm_steps": [r["first_alarm_step"] for _, r in items],
                  "checks_flagged": sorted({c for _, r in items for c in r["checks_flagged"]}),
                  "stopped_at": [r["stopped_at"] for _, r in items],
                  "eval_fid_start": [r.get("eval_fid_start") for _, r in items],
                  "eval_fid_at_first_alarm": [r.get("eval_fid_at_first_alarm") for _, r in items],
                  "first_step_eval_fid_doubled": [r.get("first_step_eval_fid_doubled") for _, r in items]}
    return out




def table(res_file: Path) -> str:
    """The markdown rows quoted in docs/monitors.md, from results.json."""
    runs = json.loads(res_file.read_text())["runs"]
    lines = ["| run | seed | exit | first alarm (step) | checks that fired | stopped at | eval FID start → at first alarm | "
             "first step with eval FID ≥ 2× start | last step |", "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(runs, key=lambda n: (n.rsplit("-s", 1)[0], n)):
        r = runs[name]
        g, s = name.rsplit("-s", 1)
        f0, fa = r.get("eval_fid_start"), r.get("eval_fid_at_first_alarm")
        fid = "–" if f0 is None else f"{f0:.2f} → {fa:.2f}" if fa is not None else f"{f0:.2f} → –"
        lines.append(f"| {g} | {s} | {r['exit_code']} | {r['first_alarm_step'] if r['first_alarm_step'] is not None else 'none'} | "
                     f"{', '.join(r['checks_flagged']) or '–'} | {r['stopped_at'] if r['stopped_at'] is not None else '–'} | "
                     f"{fid} | {r.get('first_step_eval_fid_doubled') if r.get('first_step_eval_fid_doubled') is not None else '–'} | "
                     f"{r['last_step']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "bench" / "results" / "monitors" / "results.json"))
    else:
        main()
