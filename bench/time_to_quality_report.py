"""Tables and plot of bench/time_to_quality.py's results (docs/results.md, "Time to quality").

    python bench/time_to_quality_report.py [--results bench/results/time_to_quality/results.json]
        [--plot docs/time_to_quality.png] > /tmp/ttq.md
"""
from __future__ import annotations

import argparse
import json
import statistics as st
from collections import defaultdict
from pathlib import Path

SPACES = {"eval net": "fid", "pixels": "fid_pixels", "MLP net": "fid_mlp"}
RECALLS = {"eval net": "recall", "pixels": "recall_pixels", "MLP net": "recall_mlp"}


def ms(vals: list[float], nd: int = 3) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{nd}f}"
    return f"{st.mean(vals):.{nd}f} ± {st.stdev(vals):.{nd}f}"


def final_rows(res: dict) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(res["runs"], key=lambda r: (r["config"], r["seed"])):
        by[r["config"]].append({**r["curve"][-1], "seed": r["seed"]})
    for r in sorted(res["runs"], key=lambda r: (r["config"], r["seed"])):
        if r.get("final_without_ema"):  # the same run's raw generator: the config without EMA
            by[f"{r['config']} without EMA"].append({**r["final_without_ema"], "seed": r["seed"]})
    return by


def tables(res: dict) -> str:
    t = res["teacher"]
    by = final_rows(res)
    out = ["| run | seeds | " + " | ".join(f"FID {s} (× teacher)" for s in SPACES) +
           " | recall (net / pixels / MLP) | accuracy (net / MLP) |",
           "|---|---|---|---|---|---|---|",
           "| 50-step teacher | – | " + " | ".join(f"{t[k]:.4f}" for k in SPACES.values()) +
           f" | {t['recall']:.3f} / {t['recall_pixels']:.3f} / {t['recall_mlp']:.3f} | "
           f"{t['accuracy']:.4f} / {t['accuracy_mlp']:.4f} |"]
    for cfg, rows in by.items():
        cells = []
        for k in SPACES.values():
            vals = [r[k] for r in rows]
            cells.append(f"{ms(vals, 4)} ({st.mean(vals) / t[k]:.2f}×)")
        rec = " / ".join(ms([r[k] for r in rows]) for k in RECALLS.values())
        acc = " / ".join(ms([r[k] for r in rows], 4) for k in ("accuracy", "accuracy_mlp"))
        out.append(f"| {cfg} (step {rows[0]['step']}) | {', '.join(str(r['seed']) for r in rows)} | "
                   + " | ".join(cells) + f" | {rec} | {acc} |")
    out += ["", "Per seed (final student): FID eval net / pixels / MLP net, recall (eval net), accuracy:", "",
            "| run | seed | FID eval net | FID pixels | FID MLP net | recall | accuracy |", "|---|---|---|---|---|---|---|"]
    for cfg, rows in by.items():
        for r in rows:
            out.append(f"| {cfg} | {r['seed']} | {r['fid']:.3f} | {r['fid_pixels']:.4f} | {r['fid_mlp']:.4f} | "
                       f"{r['recall']:.3f} | {r['accuracy']:.4f} |")
    out += ["", "Time to the 50-step teacher's FID (first checkpoint at or below it; else the best reached):", "",
            "| run | seed | wall s (900 steps) | peak RSS MB | " + " | ".join(SPACES) + " |",
            "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        cells = []
        for s in SPACES:
            q = r["to_teacher"][{"eval net": "net", "pixels": "pixels", "MLP net": "mlp"}[s]]
            cells.append(f"step {q['step']}, {q['wall_s']:.0f} s" if q["reached"] else
                         f"never (best {q['best_fid']:.4g} at step {q['best_step']})")
        out.append(f"| {r['config']} | {r['seed']} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | " + " | ".join(cells) + " |")
    p = res.get("params", {})
    if p:
        out += ["", "Trainable parameters: " + "; ".join(
            f"{c}: generator {v['generator_params']:,}, critic {v['critic_params']:,}" for c, v in p.items())]
    return "\n".join(out)


def plot(res: dict, dst: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = res["teacher"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = {"dmdr": "tab:blue", "dmd2": "tab:orange"}
    for ax, (s, k) in zip(axes[:3], SPACES.items()):
        for r in res["runs"]:
            c = r["curve"]
            ax.plot([x["step"] for x in c], [x[k] for x in c], color=colors.get(r["config"], "gray"), alpha=0.8,
                    label=f"{r['config']}" if r["seed"] == res["runs"][0]["seed"] else None, marker=".")
        ax.axhline(t[k], color="k", ls="--", lw=1, label="50-step teacher")
        ax.set_yscale("log")
        ax.set_xlabel("generator step")
        ax.set_title(f"FID, {s}")
        ax.legend(fontsize=8)
    ax = axes[3]
    for r in res["runs"]:
        c = r["curve"]
        ax.plot([x["wall_s"] for x in c], [x["fid"] for x in c], color=colors.get(r["config"], "gray"), marker=".",
                alpha=0.8)
    ax.axhline(t["fid"], color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("wall-clock s (shared 2-core CPU, under contention)")
    ax.set_title("FID, eval net, vs wall-clock")
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("bench/results/time_to_quality/results.json"))
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    res = json.loads(a.results.read_text())
    print(tables(res))
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
