"""Measured comparison of the regularisers of policy-gradient RL on the digits student (docs/rl.md, "Results").

For every seed: (1) distil a 1-step student with DMD (recipes/digits.yaml, cold-start stage only, ``--distill-steps``
generator steps) — or reuse ``--init RUN``; (2) from that student, run GRPO (recipes/digits-grpo.yaml) with the
black-box, hackable reward ``digits_hackable`` for ``--iters`` iterations under each configuration:

    dmd        rl.regularizer=dmd, reg_weight --dmd-weight (+ critic updates)
    kl_weak    rl.regularizer=kl,  kl_weight --kl-weights[0]
    kl_strong  rl.regularizer=kl,  kl_weight --kl-weights[1]
    none       rl.regularizer=none
    dmd_only   control: the dmd configuration with reward weight 0 (no policy gradient), to separate the drift
               the DMD term causes by itself from the reward's effect

Every configuration sees the same samples budget (iterations × batch_size rollouts and reward calls) and the same
evaluation (``--eval-samples`` deterministic samples every ``--eval-every`` iterations: FID, precision, recall,
accuracy of the independent evaluation net; the training reward and the mean brightness "ink" of those samples).

Outputs: run directories under ``--out``; ``bench/results/grpo_regularisers{tag}.json`` (per-seed curves and the
final table); ``docs/grpo_regularisers{tag}.png`` (curves, mean ± sd over seeds); a markdown table on stdout.

    # the full comparison (16 cores: 5 configs × 3 seeds, 15 processes of 1 thread each)
    python bench/grpo_regularisers.py --iters 300 --seeds 0 1 2 --workers 15 --out runs/bench-grpo
    # a short check (a couple of minutes on 1 core)
    python bench/grpo_regularisers.py --iters 6 --seeds 0 --distill-steps 20 --eval-every 3 --eval-samples 300 \\
        --tag _short --out /tmp/bench-grpo-short
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ["eval_reward_digits_hackable", "eval_fid", "eval_precision", "eval_recall", "eval_accuracy", "eval_ink"]


def configs(args) -> dict[str, list[str]]:
    kw, ks = args.kl_weights
    return {
        "dmd": ["rl.regularizer=dmd", f"rl.reg_weight={args.dmd_weight}"],
        "kl_weak": ["rl.regularizer=kl", f"rl.kl_weight={kw}"],
        "kl_strong": ["rl.regularizer=kl", f"rl.kl_weight={ks}"],
        "none": ["rl.regularizer=none"],
        # control: the DMD regulariser with the reward switched off (advantages are 0) — the drift DMD causes alone
        "dmd_only": ["rl.regularizer=dmd", f"rl.reg_weight={args.dmd_weight}", "rl.rewards.0.weight=0.0"],
    }


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def distill(seed: int, run: str, teacher: str, steps: int, threads: int) -> str:
    """Stage 1 of recipes/digits.yaml (DMD cold start, no reward) for ``steps`` generator steps → ``run``."""
    torch = _torch(threads)
    from dmdr.recipes import load_recipe
    from dmdr.train.dmdr import DMDRTrainer
    from dmdr.train.runtime import seed_everything

    out = Path(run)
    if (out / "DONE").exists():
        return run
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    horizon = max(1, steps // 2)
    r = load_recipe(ROOT / "recipes" / "digits.yaml", [
        f"seed={seed}", f"model.teacher={teacher}", "runtime.device=cpu", "logging.progress=false",
        "logging.sample_every=0", f"logging.checkpoint_every=0", "logging.log_every=20",
        f"dmd.dynadg.horizon={horizon}", f"dmd.dynars.horizon={horizon}",
        "stages=" + json.dumps([{"name": "cold_start", "steps": steps, "batch_size": 64}])])
    seed_everything(seed)
    t0 = time.time()
    DMDRTrainer(r, out, torch.device("cpu"), console=lambda *a, **k: None).run()
    (out / "DONE").write_text(json.dumps({"seconds": time.time() - t0}))
    return run


def grpo(name: str, overrides: list[str], seed: int, init: str, run: str, args_d: dict) -> str:
    """One GRPO configuration from the distilled student ``init`` → ``run`` (skipped if already complete)."""
    torch = _torch(args_d["threads"])
    from dmdr.recipes import load_recipe
    from dmdr.train.grpo import GRPOTrainer
    from dmdr.train.runtime import seed_everything

    out = Path(run)
    if (out / "DONE").exists():
        return run
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = load_recipe(ROOT / "recipes" / "digits-grpo.yaml", [
        f"seed={seed}", f"model.teacher={args_d['teacher']}", "runtime.device=cpu", f"rl.init={init}",
        f"iterations={args_d['iters']}", f"optim.lr_gen={args_d['lr']}",
        "dmd.dynadg.enabled=false", "dmd.dynars.enabled=false",   # stage-2 semantics: the student is distilled
        f"eval.every={args_d['eval_every']}", f"eval.samples={args_d['eval_samples']}",
        "logging.progress=false", "logging.log_every=1", "logging.sample_every=0", "logging.checkpoint_every=0",
        *overrides])
    seed_everything(seed)
    t0 = time.time()
    GRPOTrainer(r, out, torch.device("cpu"), console=lambda *a, **k: None).run()
    (out / "DONE").write_text(json.dumps({"seconds": time.time() - t0, "config": name}))
    return run


def _map(fn, jobs: list[tuple], workers: int) -> list:
    if workers <= 1:
        return [fn(*j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        futs = [ex.submit(fn, *j) for j in jobs]
        return [f.result() for f in futs]


def read_run(run: Path) -> dict:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in recs if "reward_mean" in r]
    evals = [r for r in recs if "eval_fid" in r]
    done = json.loads((run / "DONE").read_text())
    return {
        "train": {k: [r.get(k) for r in train] for k in ("samples_seen", "reward_digits_hackable", "reward_mean",
                                                         "clip_fraction", "kl_approx",
                                                         "time_iteration", "time_rollout", "time_reward", "time_ppo",
                                                         "time_dmd", "loss_dmd", "kl_ref")},
        "eval": {k: [r.get(k) for r in evals] for k in ["samples_seen", *EVAL_KEYS]},
        "seconds": done["seconds"],
    }


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    import statistics

    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Final-evaluation table: mean ± sd over seeds; training reward = raw ``digits_hackable`` on the rollouts,
    mean of the last 10% of iterations."""
    table = {}
    for name, by_seed in runs.items():
        row = {}
        for k in EVAL_KEYS:
            row[k] = _mean_sd([d["eval"][k][-1] for d in by_seed.values()])
        tail = []
        for d in by_seed.values():
            rw = [x for x in d["train"]["reward_digits_hackable"] if x is not None]
            n = max(1, len(rw) // 10)
            tail.append(sum(rw[-n:]) / n)
        row["train_reward"] = _mean_sd(tail)
        row["s_per_iter"] = _mean_sd([_avg(d["train"]["time_iteration"]) for d in by_seed.values()])
        for part in ("rollout", "reward", "ppo", "dmd"):
            row[f"s_{part}"] = _mean_sd([_avg(d["train"][f"time_{part}"]) for d in by_seed.values()])
        row["wall_s"] = _mean_sd([d["seconds"] for d in by_seed.values()])
        row["start"] = {k: _mean_sd([d["eval"][k][0] for d in by_seed.values()])[0] for k in EVAL_KEYS}
        table[name] = row
    return table


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(table: dict, meta: dict) -> str:
    def f(ms, d=3):
        m, s = ms
        return f"{m:.{d}f} ± {s:.{d}f}" if meta["seeds"] > 1 else f"{m:.{d}f}"

    first = next(iter(table.values()))["start"]
    lines = [f"{meta['iters']} iterations × {meta['batch']} samples = {meta['iters'] * meta['batch']} reward calls per "
             f"run; {meta['seeds']} seed(s); eval on {meta['eval_samples']} deterministic samples; "
             f"{meta['threads']} thread(s) per run",
             "",
             "| config | train reward | eval reward | FID ↓ | precision | recall | accuracy | ink | s/iter "
             "(rollout / reward / ppo / dmd) |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| start (distilled) | – | {first['eval_reward_digits_hackable']:.3f} | {first['eval_fid']:.3f} | "
             f"{first['eval_precision']:.3f} | {first['eval_recall']:.3f} | {first['eval_accuracy']:.3f} | "
             f"{first['eval_ink']:.3f} | – |"]
    for name, r in table.items():
        cost = " / ".join(f"{r[f's_{p}'][0]:.2f}" for p in ("rollout", "reward", "ppo", "dmd"))
        lines.append(f"| {name} | {f(r['train_reward'])} | {f(r['eval_reward_digits_hackable'])} | {f(r['eval_fid'], 2)} | "
                     f"{f(r['eval_precision'])} | {f(r['eval_recall'])} | {f(r['eval_accuracy'])} | {f(r['eval_ink'])} | "
                     f"{r['s_per_iter'][0]:.2f} ({cost}) |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("train", "reward_digits_hackable", "training reward digits_hackable (stochastic samples)"),
              ("eval", "eval_fid", "FID ↓ (eval net)"), ("eval", "eval_precision", "precision"),
              ("eval", "eval_recall", "recall"), ("eval", "eval_accuracy", "class accuracy (eval net)"),
              ("eval", "eval_ink", "ink = mean brightness (real digits: 0.31)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (part, key, label) in zip(axes.flat, panels):
        for name, by_seed in runs.items():
            curves = [np.array([np.nan if v is None else v for v in d[part][key]], float) for d in by_seed.values()]
            n = min(len(c) for c in curves)
            ys = np.stack([c[:n] for c in curves])
            x = np.array(next(iter(by_seed.values()))[part]["samples_seen"][:n], float)
            m, s = np.nanmean(ys, 0), np.nanstd(ys, 0)
            ax.plot(x, m, label=name)
            if ys.shape[0] > 1:
                ax.fill_between(x, m - s, m + s, alpha=0.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("samples (rollouts = reward calls)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=300, help="GRPO iterations per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-grpo"), help="run directories go here")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (each uses --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default="builtin:digits-teacher")
    ap.add_argument("--init", default=None, help="reuse this distilled run for every seed instead of distilling")
    ap.add_argument("--distill-steps", type=int, default=600, help="DMD generator steps of the starting student")
    ap.add_argument("--lr", type=float, default=1e-4, help="generator learning rate during RL")
    ap.add_argument("--dmd-weight", type=float, default=10.0)
    ap.add_argument("--kl-weights", type=float, nargs=2, default=[0.1, 1.0])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--only", nargs="+", default=None, help="run only these configurations")
    ap.add_argument("--tag", default="", help="suffix of the JSON / PNG names (e.g. _short)")
    args = ap.parse_args(argv)
    if args.eval_every < 1:
        ap.error("--eval-every must be >= 1 (the curves need evaluations)")
    cfgs = configs(args)
    if args.only:
        cfgs = {k: v for k, v in cfgs.items() if k in args.only}
    t0 = time.time()
    load = os.getloadavg()
    # 1. starting students (one per seed)
    if args.init:
        inits = {s: args.init for s in args.seeds}
    else:
        jobs = [(s, str(args.out / f"seed{s}" / "distill"), args.teacher, args.distill_steps, args.threads)
                for s in args.seeds]
        inits = dict(zip(args.seeds, _map(distill, jobs, min(args.workers, len(jobs)))))
    print(f"starting students ready after {time.time() - t0:.0f}s", flush=True)
    # 2. GRPO runs
    args_d = {"threads": args.threads, "teacher": args.teacher, "iters": args.iters, "lr": args.lr,
              "eval_every": args.eval_every, "eval_samples": args.eval_samples}
    jobs = [(name, ov, s, inits[s], str(args.out / f"seed{s}" / name), args_d) for s in args.seeds
            for name, ov in cfgs.items()]
    _map(grpo, jobs, args.workers)
    runs = {name: {s: read_run(args.out / f"seed{s}" / name) for s in args.seeds} for name in cfgs}
    meta = {"iters": args.iters, "batch": 64, "seeds": len(args.seeds), "eval_samples": args.eval_samples,
            "threads": args.threads, "workers": args.workers, "lr": args.lr, "dmd_weight": args.dmd_weight,
            "kl_weights": args.kl_weights, "distill_steps": None if args.init else args.distill_steps,
            "init": args.init, "teacher": args.teacher, "seconds_total": time.time() - t0,
            "loadavg_at_start": load, "configs": cfgs, "command": " ".join(sys.argv)}
    table = summarise(runs)
    md = markdown(table, meta)
    print(md)
    res_path = ROOT / "bench" / "results" / f"grpo_regularisers{args.tag}.json"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps({"meta": meta, "table": table, "markdown": md, "runs": runs}, indent=1))
    png = ROOT / "docs" / f"grpo_regularisers{args.tag}.png"
    plot(runs, png, f"GRPO on digits with the hackable reward: regularisers ({len(args.seeds)} seed(s), "
                    f"{args.iters} iterations × 64 samples)")
    print(f"wrote {res_path} and {png} in {time.time() - t0:.0f}s")
    return table


if __name__ == "__main__":
    main()
