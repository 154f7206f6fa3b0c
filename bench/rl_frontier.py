"""The RL regulariser study (issue 10, docs/rl.md "The frontier study"): which regulariser buys how much reward for how
much loss of fidelity, on the digits student, at a cost counted in network evaluations.

For every seed s (each with its own starting student, made by the committed recipe)::

    dmdr train recipes/digits-rl-start.yaml --set seed=s --set generator.steps=N --out OUT/start-N-s

(or, with ``--start-base DIR``, the stage-1 checkpoint of bench/stage2_forks.py's base run ``DIR/b{N}-{s}`` of
recipes/digits-4step.yaml / digits.yaml, the start of the committed results in docs/rl.md §8), then, for every
reward and every regulariser setting, from that student::

    dmdr train recipes/digits-grpo.yaml --set seed=s --set rl.init=OUT/start-N-s --set generator.steps=N \\
        --set rl.sde=flow_grpo --set dmd.dynadg.enabled=false --set dmd.dynars.enabled=false \\
        --set rl.regularizer=R --set rl.reg_weight=λ | --set rl.kl_weight=β  [reward overrides] --out OUT/runs/...

Settings: ``none``; ``kl`` β ∈ --betas; ``dmd`` / ``dmd_adv`` λ ∈ --lambdas (``dmd_ca_adv`` with --cfg > 1 when
listed in --regularisers). Rewards: ``hackable`` (digits_hackable, ink pays) and ``weak`` (digits_weak_classes on
the starting student's 3 weakest classes by the held-out evaluation network's mean true-class probability, recorded per
seed). Every run logs per-term gradient norms, whether the clip bound, and ``nfe_total`` (dmdr.train.nfe).

Per run: **reward gain** = mean of the last k evaluations of the reward on the deterministic evaluation samples minus
its value at iteration 0; **FID / recall** = mean of the same last k evaluations; **cost** = mean ``nfe_total`` per
iteration. Per setting: mean and a 95% t-interval over seeds. Per reward: Pareto plots (reward gain vs FID, vs
recall) and, per regulariser, FID/recall interpolated along its weight sweep at matched reward gains.

Outputs: ``bench/results/rl_frontier{tag}.json`` (every command, per-run numbers, the table), and
``docs/rl_frontier{tag}.png``.

    # the full study (one process at a time; a long CPU job, or a GPU machine with --device cuda)
    OMP_NUM_THREADS=1 python bench/rl_frontier.py --out runs/rl-frontier
    # the pipeline check (1 seed, 2 settings, a tiny budget): output labelled "pipeline check, not a result"
    OMP_NUM_THREADS=1 python bench/rl_frontier.py --quick --out /tmp/rl-frontier-quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
REWARDS = {"hackable": "digits_hackable", "weak": "digits_weak_classes"}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def settings(args) -> dict[str, list[str]]:
    """name -> recipe overrides, for every regulariser setting of the sweep."""
    out: dict[str, list[str]] = {}
    for reg in args.regularisers:
        if reg == "none":
            out["none"] = ["rl.regularizer=none"]
        elif reg == "kl":
            out.update({f"kl_b{b:g}": ["rl.regularizer=kl", f"rl.kl_weight={b}"] for b in args.betas})
        elif reg in ("dmd", "dmd_adv", "dmd_ca_adv"):
            extra = [f"dmd.cfg={args.cfg}"] if reg == "dmd_ca_adv" else []
            extra += [f"rl.critic_updates={args.critic_updates}"] if args.critic_updates is not None else []
            extra += ["rl.critic_reuse_rollout=true"] if args.critic_reuse else []
            out.update({f"{reg}_l{lam:g}": [f"rl.regularizer={reg}", f"rl.reg_weight={lam}", *extra]
                        for lam in args.lambdas})
        else:
            raise SystemExit(f"error: unknown regulariser {reg!r}; use none, kl, dmd, dmd_adv or dmd_ca_adv")
    if args.only:
        missing = [s for s in args.only if s not in out]
        if missing:
            raise SystemExit(f"error: --only {missing}: not among the settings {sorted(out)}")
        out = {k: out[k] for k in args.only}
    return out


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {rc}); see {log}")


def dmdr_cmd(recipe: str, out: Path, overrides: list[str], device: str) -> list[str]:
    sets = [a for o in ["logging.progress=false", f"runtime.device={device}", *overrides] for a in ("--set", o)]
    return [sys.executable, "-m", "dmdr", "train", f"recipes/{recipe}", "--out", str(out), "--force", *sets]


def start_student(args, seed: int) -> tuple[Path, list[str]]:
    if args.start_base is not None:  # the stage-1 end of bench/stage2_forks.py's base run (shared with issue 13)
        from stage2_forks import ensure_base, stage1_checkpoint

        run, cmd = ensure_base(args.steps, seed, args.start_base)
        return stage1_checkpoint(run), [sys.executable, "-m", *cmd]
    out = args.out / f"start-{args.steps}-{seed}"
    over = [f"seed={seed}", f"generator.steps={args.steps}"]
    if args.distill_steps is not None:
        h = max(1, args.distill_steps // 2)
        over += [f"stages.0.steps={args.distill_steps}", f"dmd.dynadg.horizon={h}", f"dmd.dynars.horizon={h}"]
    cmd = dmdr_cmd("digits-rl-start.yaml", out, over, args.device)
    if not (out / "student.safetensors").exists():
        run(cmd, out.with_suffix(".log"))
    return out, cmd


def weak_classes(start: Path, k: int = 3) -> tuple[list[int], list[float]]:
    """The starting student's k weakest classes: lowest mean true-class probability under the held-out evaluation
    network, on 1000 fixed samples (accuracy saturates at 1 for a good student)."""
    import torch

    from dmdr.data.digits import to_unit
    from dmdr.rewards.weak_classes import per_class_confidence, weakest_classes
    from dmdr.sampling import load_student, sample_student

    if (start / "COMPLETE").exists():  # one checkpoint (--start-base: the end of a run's stage 1)
        from time_to_quality import sample_checkpoint

        x, labels = sample_checkpoint(start, "ema", num=1000, seed=4321)
    else:
        model, info = load_student(start)
        labels = torch.arange(1000) % 10
        with torch.no_grad():
            x = to_unit(sample_student(model, labels, info, generator=torch.Generator().manual_seed(4321)))
    conf = per_class_confidence(x, labels)
    return weakest_classes(conf, k), conf


def reward_overrides(reward: str, classes: list[int]) -> list[str]:
    if reward == "hackable":
        return []
    return [f"rl.rewards=" + json.dumps([{"name": "digits_weak_classes", "weight": 1.0,
                                          "kwargs": {"classes": classes}}])]


def read_run(path: Path, reward: str, k: int) -> dict:
    recs = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in recs if "reward_mean" in r]
    evals = [r for r in recs if "eval_fid" in r]
    key = f"eval_reward_{REWARDS[reward]}"
    last = evals[-k:] if len(evals) > 1 else evals

    def avg(rows, name):
        v = [r[name] for r in rows if r.get(name) is not None and not math.isnan(r[name])]
        return sum(v) / len(v) if v else float("nan")

    n = max(1, len(train) // 10)
    return {
        "reward_gain": avg(last, key) - evals[0][key], "reward_start": evals[0][key],
        "fid": avg(last, "eval_fid"), "recall": avg(last, "eval_recall"), "precision": avg(last, "eval_precision"),
        "fid_pixels": avg(last, "eval_fid_pixels"), "fid_mlp": avg(last, "eval_fid_mlp"),
        "fid_pixels_start": evals[0].get("eval_fid_pixels"), "fid_mlp_start": evals[0].get("eval_fid_mlp"),
        "accuracy": avg(last, "eval_accuracy"), "fid_start": evals[0]["eval_fid"],
        "recall_start": evals[0]["eval_recall"],
        "train_reward_gain": avg(train[-n:], "reward_mean") - avg(train[:n], "reward_mean"),
        "nfe_per_iteration": avg(train[1:] or train, "nfe_total"),
        "clip_bound_fraction": avg(train, "grad_clip_bound"),
        **{f"grad_norm_{t}": avg(train, f"grad_norm_{t}") for t in ("ppo", "kl", "dmd")},
        "evals": [{k_: r.get(k_) for k_ in ("step", key, "eval_fid", "eval_fid_pixels", "eval_fid_mlp", "eval_recall")}
                  for r in evals],
    }


def mean_ci(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    ci = T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return {"mean": m, "ci95": ci, "sd": sd, "n": len(xs)}


def family(name: str) -> str:
    return name.rsplit("_", 1)[0] if name != "none" else "none"


def matched(table: dict, target_gain: float, metric: str) -> dict[str, float]:
    """Per regulariser family: ``metric`` linearly interpolated along its weight sweep at reward gain ``target``
    (NaN where the sweep does not reach that gain)."""
    out = {}
    for fam in sorted({family(n) for n in table}):
        pts = sorted((r["reward_gain"]["mean"], r[metric]["mean"]) for n, r in table.items() if family(n) == fam)
        val = float("nan")
        for (g0, m0), (g1, m1) in zip(pts, pts[1:]):
            if g0 <= target_gain <= g1 and g1 > g0:
                val = m0 + (m1 - m0) * (target_gain - g0) / (g1 - g0)
        for g, m in pts:
            if g == target_gain:
                val = m
        out[fam] = val
    return out


def plot(results: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(results["table"])
    fig, axes = plt.subplots(len(rewards), 2, figsize=(10, 4 * len(rewards)), squeeze=False)
    for i, rw in enumerate(rewards):
        table = results["table"][rw]
        for j, metric in enumerate(("fid", "recall")):
            ax = axes[i][j]
            for fam in sorted({family(n) for n in table}):
                pts = sorted((r["reward_gain"]["mean"], r[metric]["mean"], r["reward_gain"]["ci95"],
                              r[metric]["ci95"], n) for n, r in table.items() if family(n) == fam)
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.errorbar(xs, ys, xerr=[p[2] for p in pts], yerr=[p[3] for p in pts], marker="o", capsize=3,
                            label=fam, linestyle="-" if len(pts) > 1 else "none")
                for p in pts:
                    ax.annotate(p[4].split("_")[-1], (p[0], p[1]), fontsize=7)
            ax.set_xlabel(f"reward gain ({REWARDS[rw]}, eval, last-k mean)")
            ax.set_ylabel(f"{metric.upper() if metric == 'fid' else metric} (last-k mean)")
            ax.set_title(f"{rw}: {metric} vs reward gain")
            ax.legend(fontsize=8)
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(results: dict) -> str:
    """The per-setting table of a results file (mean ± 95% t-half-width over seeds) as markdown."""
    def f(c, d=3):
        return f"{c['mean']:.{d}f} ± {c['ci95']:.{d}f}" if c["n"] > 1 else f"{c['mean']:.{d}f}"

    rows = []
    for rw, table in results["table"].items():
        rows += [f"reward `{REWARDS[rw]}` | seeds | reward gain | FID eval net | FID pixels | FID MLP net | recall | "
                 "accuracy | NFE / iteration | clip bound (fraction of steps) | grad norm PPO / KL / DMD",
                 "|".join(["---"] * 11)]
        for n, r in table.items():
            gn = " / ".join("–" if math.isnan(r[f"grad_norm_{t}"]["mean"]) else f"{r[f'grad_norm_{t}']['mean']:.3f}"
                            for t in ("ppo", "kl", "dmd"))
            rows.append(f"{n} | {r['fid']['n']} | {f(r['reward_gain'], 4)} | {f(r['fid'], 2)} | "
                        f"{f(r['fid_pixels'], 3)} | {f(r['fid_mlp'], 3)} | {f(r['recall'])} | {f(r['accuracy'])} | "
                        f"{r['nfe_per_iteration']['mean']:.0f} | {r['clip_bound_fraction']['mean']:.2f} | {gn}")
    return "\n".join("| " + r + " |" for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="run directories (required unless --report)")
    ap.add_argument("--quick", action="store_true", help="pipeline check: 1 seed, 2 settings, tiny budget")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=4, help="student steps N (4: multi-step policy; 1: 1-step case)")
    ap.add_argument("--rewards", nargs="+", default=["hackable", "weak"], choices=list(REWARDS))
    ap.add_argument("--regularisers", nargs="+", default=["none", "kl", "dmd", "dmd_adv"])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 1, 3, 10, 30])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1])
    ap.add_argument("--only", nargs="+", default=None, help="run only these setting names (e.g. kl_b0.1 dmd_l1)")
    ap.add_argument("--cfg", type=float, default=2.0, help="dmd.cfg for dmd_ca_adv")
    ap.add_argument("--critic-updates", type=int, default=None, help="rl.critic_updates for the dmd settings")
    ap.add_argument("--critic-reuse", action="store_true", help="rl.critic_reuse_rollout=true for the dmd settings")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--last-k", type=int, default=3, help="evaluations averaged at the end of a run")
    ap.add_argument("--distill-steps", type=int, default=None, help="override the start recipe's 600 steps")
    ap.add_argument("--batch-size", type=int, default=None, help="override rl.batch_size (and minibatch)")
    ap.add_argument("--start-base", type=Path, default=None,
                    help="start from the stage-1 checkpoint of bench/stage2_forks.py's base runs in this folder "
                         "(recipes/digits-4step.yaml or digits.yaml, 600 DMD steps, EMA + critic) instead of "
                         "recipes/digits-rl-start.yaml")
    ap.add_argument("--workers", type=int, default=1, help="runs at once (one thread each)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="")
    ap.add_argument("--report", type=Path, default=None, help="print the markdown table of this results file")
    args = ap.parse_args(argv)
    if args.report is not None:
        return print(markdown(json.loads(args.report.read_text())))
    if args.out is None:
        raise SystemExit("error: --out DIR is required (the run directories); or pass --report RESULTS.json")
    if args.quick:
        args.seeds, args.rewards, args.only = args.seeds[:1], ["weak"], args.only or ["kl_b0.1", "dmd_l1"]
        args.iters, args.eval_every, args.eval_samples, args.last_k = 4, 2, 200, 2
        args.distill_steps, args.batch_size = args.distill_steps or 20, args.batch_size or 16
        args.tag = args.tag or "_quick"
    label = ("PIPELINE CHECK, NOT A RESULT: --quick (1 seed, 2 settings, tiny budget)" if args.quick else
             f"{len(args.seeds)} seeds, {args.iters} iterations, N = {args.steps}")
    sets = settings(args)
    t0 = time.time()
    results: dict = {"label": label, "argv": sys.argv[1:], "steps": args.steps, "seeds": args.seeds,
                     "starts": {}, "runs": {}, "table": {}, "matched": {}}
    starts = {}
    for s in args.seeds:
        start, cmd = start_student(args, s)
        classes, acc = weak_classes(start)
        starts[s] = (start, classes)
        results["starts"][str(s)] = {"command": "dmdr " + " ".join(cmd[3:]), "student": str(start),
                                     "weak_classes": classes,
                                     "per_class_eval_confidence": acc}
    jobs = []
    for rw in args.rewards:
        for name, over in sets.items():
            for s in args.seeds:
                start, classes = starts[s]
                out = args.out / "runs" / rw / name / f"seed{s}"
                o = [f"seed={s}", f"rl.init={start}", f"generator.steps={args.steps}", "rl.sde=flow_grpo",
                     "dmd.dynadg.enabled=false", "dmd.dynars.enabled=false", f"iterations={args.iters}",
                     f"eval.every={args.eval_every}", f"eval.samples={args.eval_samples}", "logging.log_every=1",
                     "logging.sample_every=0", "logging.checkpoint_every=0",
                     # the study measures drift itself: the shipped monitors would stop the very runs it compares
                     "monitors.every=0", *reward_overrides(rw, classes), *over]
                if args.batch_size:
                    o += [f"rl.batch_size={args.batch_size}", f"rl.minibatch_size={args.batch_size * args.steps // 2}"]
                jobs.append((rw, name, s, out, dmdr_cmd("digits-grpo.yaml", out, o, args.device)))
    def run_if_missing(job) -> None:  # checked when the job's turn comes: drivers on disjoint --only sets may share OUT
        if not (job[3] / "student.safetensors").exists():
            run(job[4], job[3].with_suffix(".log"))

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(run_if_missing, jobs))
    for rw, name, s, out, cmd in jobs:
        results["runs"].setdefault(rw, {}).setdefault(name, {})[str(s)] = {
            "command": "dmdr " + " ".join(cmd[3:]), **read_run(out, rw, args.last_k)}
    for rw in args.rewards:
        keys = ("reward_gain", "fid", "fid_pixels", "fid_mlp", "recall", "precision", "accuracy", "fid_start",
                "fid_pixels_start", "fid_mlp_start", "recall_start", "reward_start", "train_reward_gain", "nfe_per_iteration",
                "clip_bound_fraction", "grad_norm_ppo", "grad_norm_kl", "grad_norm_dmd")
        table = {n: {k: mean_ci([d[k] for d in ps.values()]) for k in keys} for n, ps in results["runs"][rw].items()}
        results["table"][rw] = table
        gains = sorted(r["reward_gain"]["mean"] for r in table.values())
        targets = [gains[len(gains) // 4], gains[len(gains) // 2]] if gains else []
        results["matched"][rw] = [{"reward_gain": g, "fid": matched(table, g, "fid"),
                                   "recall": matched(table, g, "recall")} for g in targets]
        nfe = {family(n): r["nfe_per_iteration"]["mean"] for n, r in table.items()}
        if "kl" in nfe and "dmd" in nfe:
            results.setdefault("nfe_ratio_dmd_over_kl", {})[rw] = nfe["dmd"] / nfe["kl"]
    results["wall_s"] = time.time() - t0
    res = ROOT / "bench" / "results" / f"rl_frontier{args.tag}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(results, indent=1, default=float) + "\n")
    plot(results, ROOT / "docs" / f"rl_frontier{args.tag}.png", label)
    print(label)
    for rw, table in results["table"].items():
        print(f"\n{rw}: setting | reward gain | FID | recall | nfe/iter | clip bound")
        for n, r in table.items():
            print(f"  {n} | {r['reward_gain']['mean']:.4f} | {r['fid']['mean']:.3f} | {r['recall']['mean']:.3f} | "
                  f"{r['nfe_per_iteration']['mean']:.0f} | {r['clip_bound_fraction']['mean']:.2f}")
    print(f"\nwrote {res}")


if __name__ == "__main__":
    main()
