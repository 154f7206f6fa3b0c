"""Loss / reward curves of a run's metrics.jsonl (docs/digits_curves.png).

    python bench/plot_curves.py RUN_DIR/metrics.jsonl docs/digits_curves.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    recs = [json.loads(l) for l in Path(src).read_text().splitlines() if l.strip()]
    step = [r["step"] for r in recs]
    panels = [("loss_fake_score", "critic loss (fake score)"), ("loss_dmd", "DMD loss"),
              ("dmd_real_fake_gap", "mean |x̂_real − x̂_fake|"), ("reward_digits_classifier", "reward log p(y|x̂0)"),
              ("lambda_real", "DynaDG λ_r(k)"), ("dynars_alpha", "DynaRS α(k) (β follows)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    stage_change = max((r["step"] for r in recs if r["stage"] == recs[0]["stage"]), default=None)
    for ax, (key, title) in zip(axes.flat, panels):
        xs = [s for s, r in zip(step, recs) if key in r]
        ys = [r[key] for r in recs if key in r]
        ax.plot(xs, ys, lw=1.2)
        if stage_change:
            ax.axvline(stage_change, color="grey", ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generator step k")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(src).parent.name}: stage 1 (DMD + DynaDG/DynaRS) | stage 2 (DMD + ReFL) — dashed line")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print("wrote", dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
