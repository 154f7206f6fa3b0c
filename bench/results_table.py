"""Render the digits result JSONs into the markdown tables of docs/results.md (mean ± std over seeds).

    python bench/results_table.py > /tmp/tables.md
"""
from __future__ import annotations

import json
import statistics as st
from collections import defaultdict
from pathlib import Path

R = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"] if path.exists() else []


def speed() -> dict[tuple, float]:
    p = R / "sampling_speed.json"
    if not p.exists():
        return {}
    return {(r["model"], r["steps"], r["cfg"]): r["seconds_per_1000"] for r in json.loads(p.read_text())["rows"]}


def fmt(vals: list[float], nd: int = 3) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{nd}f}"
    return f"{st.mean(vals):.{nd}f} ± {st.stdev(vals):.{nd}f}"


def table(rows: list[dict], title: str, hw: str) -> str:
    sp = speed()
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["name"]].append(r)
    out = [f"### {title}", "", f"Hardware for training: {hw}. Evaluation: 2,000 samples, CPU.", "",
           "| row | NFE | seeds | s / 1,000 samples | FID ↓ | precision | recall | accuracy | reward |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        r0 = rs[0]
        if r0["kind"] == "teacher":
            key = ("teacher", r0["nfe"] // (2 if r0.get("cfg", 1) > 1 else 1), r0.get("cfg", 1.0))
        else:
            key = ("student", r0["nfe"], 1.0)
        t = sp.get(key)
        out.append(f"| {name} | {r0['nfe']} | {len(rs)} | {t:.3f} |" if t is not None else
                   f"| {name} | {r0['nfe']} | {len(rs)} | – |")
        out[-1] += " | ".join([""] + [fmt([x[k] for x in rs], 4 if k == "accuracy" else 3)
                                     for k in ("fid", "precision", "recall", "accuracy", "reward")])[2:] + " |"
    return "\n".join(out)


def main() -> None:
    print(table(load(R / "digits_teacher" / "results.json"), "Teacher (Euler, with and without CFG)", "—"))
    print()
    print(table(load(R / "digits_cpu" / "results.json"), "Main rows: DMD-only vs DMDR students (recipes/digits.yaml)",
                "this 2-core CPU machine"))
    print()
    dev = load(R / "device-h200" / "digits_results.json")
    # 4-step device rows were sampled with the ODE sampler before students sampled with their training rollout
    # (sde); they are superseded by the CPU rows and left out here (raw numbers stay in the JSON).
    print(table([r for r in dev if not r["name"].startswith("sweep") and "4step" not in r["name"]],
                "Ablations: DynaDG off, DynaRS off (1-step, same budget)", "NVIDIA H200 (lent device), one seed"))
    print()

    def weight(r):
        return 0.05 if r["name"] == "dmdr-1step" else float(r["name"].split("-w")[1])
    sweep = sorted([r for r in dev if r["name"].startswith("sweep") or r["name"] == "dmdr-1step"], key=weight)
    for r in sweep:
        r["name"] = f"reward weight {weight(r):g}" + (" (default)" if weight(r) == 0.05 else "")
    print(table(sweep, "Reward-weight sweep (1-step): the quality / diversity trade-off", "NVIDIA H200, one seed"))
    tune = R / "device-h200" / "digits_tune.json"
    if tune.exists():
        t = json.loads(tune.read_text())
        print()
        print(table(t["rows"], f"Choosing the default (variants; chosen: {t['chosen']})", "NVIDIA H200, one seed"))


if __name__ == "__main__":
    main()
