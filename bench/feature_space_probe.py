"""Which image changes does each feature space of `dmdr eval` see? (docs/evaluation.md, issue 13)

Applies controlled perturbations to all 1,797 real digits (images in [0, 1]) and scores the perturbed set
against the real set with :func:`dmdr.eval.report.evaluate_samples`, in the three spaces (evaluation net, raw
pixels, second MLP evaluation net). Each FID is also given as a multiple of the 50-step teacher's FID in that
space (``--teacher-json``, a ``dmdr eval --json`` of ``dmdr sample --teacher --steps 50 --num 2000 --seed 0``),
so that the spaces can be compared on one scale: "x teacher" is how many teacher-gaps the perturbation costs.

    OMP_NUM_THREADS=1 python bench/feature_space_probe.py --teacher-json T.json --out bench/results/feature_space_probe.json

``--checkpoints NAME=RUN/checkpoints/step-K[:generator] ...`` adds, per checkpoint (its EMA student, or the raw
generator with ``:generator``), stroke "ink" statistics (mean pixel, share of full-ink and grey pixels) next to
those of the real digits and the teacher: the check that reward-trained students saturate their strokes.

Deterministic (fixed seeds); no training, about a minute on one core.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dmdr.data.digits import load_digits_tensors, to_unit
from dmdr.eval.report import evaluate_samples

KEYS = {"net": ("fid", "recall"), "pixels": ("fid_pixels", "recall_pixels"), "mlp": ("fid_mlp", "recall_mlp")}


def perturbations(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (images (N,1,8,8) in [0,1], labels). x: real digits in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    n = len(x)
    out = {"real (reference)": (x, y)}
    # ±1-pixel shift in a random direction (zero fill): the evaluation net was trained to ignore it
    pad = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    out["shift ±1 px"] = (torch.stack([pad[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(n)]), y)
    k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))
    out["blur 3x3"] = (blur, y)
    out["noise σ=0.05"] = ((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), y)
    out["contrast ×1.5 (sharper strokes)"] = (((x - 0.5) * 1.5 + 0.5).clamp(0, 1), y)
    out["intensity ×0.85 (fainter strokes)"] = (x * 0.85, y)
    # diversity loss: half of the data duplicated (half_a twice); what a mode-seeking student does
    xa, ya = load_digits_tensors("half_a")
    out["half the modes (half_a ×2)"] = (torch.cat([to_unit(xa), to_unit(xa)]), torch.cat([ya, ya]))
    # class-typical: keep the 75% of each class the reward net is most confident about, resampled to N (what a
    # reward on log p(y|x) favours), without changing any single image
    from dmdr.rewards.base import build_reward

    with torch.no_grad():
        conf = build_reward("digits_classifier", mode="log_prob")(x, y)
    keep = torch.cat([(y == c).nonzero().squeeze(1)[conf[y == c].argsort(descending=True)[: int(0.75 * (y == c).sum())]]
                      for c in range(10)])
    pick = keep[torch.randint(0, len(keep), (n,), generator=g)]
    out["most class-typical 75% only"] = (x[pick], y[pick])
    # class-prototypical: every image pulled 50% towards its class mean
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    out["50% towards class mean"] = (0.5 * x + 0.5 * means[y], y)
    return out


def ink_stats(images: torch.Tensor) -> dict[str, float]:
    """How saturated the strokes are: mean pixel, share of pixels ≥ 0.9 (full ink), share in (0.1, 0.9) (grey)."""
    x = images.float()
    return {"mean_pixel": float(x.mean()), "share_full_ink": float((x >= 0.9).float().mean()),
            "share_grey": float(((x > 0.1) & (x < 0.9)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-json", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results/feature_space_probe.json"))
    ap.add_argument("--checkpoints", nargs="*", default=[], metavar="NAME=DIR[:generator]",
                    help="also report ink statistics of these checkpoints' students (2,000 samples, seed 0)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    teacher = json.loads(a.teacher_json.read_text())
    x, y = load_digits_tensors("all")
    rows = []
    for name, (imgs, labels) in perturbations(to_unit(x), y).items():
        m = evaluate_samples(imgs.float(), labels)
        row = {"perturbation": name, **{k: v for k, v in m.items() if k != "n"}}
        for s, (fk, _) in KEYS.items():
            row[f"x_teacher_{s}"] = m[fk] / teacher[fk]
        rows.append(row)
        print(f"{name:36s} " + "  ".join(f"{s} {m[KEYS[s][0]]:.3f} ({row[f'x_teacher_{s}']:.1f}x) rec {m[KEYS[s][1]]:.2f}"
                                           for s in KEYS), flush=True)
    ink = {"real digits": ink_stats(to_unit(x))}
    if teacher.get("npz") or Path(a.teacher_json).with_suffix(".npz").exists():
        from dmdr.eval.report import load_samples_npz

        ink["50-step teacher"] = ink_stats(load_samples_npz(Path(a.teacher_json).with_suffix(".npz"))[0])
    if a.checkpoints:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from time_to_quality import sample_checkpoint

        for spec in a.checkpoints:
            name, path = spec.split("=", 1)
            which = "generator" if path.endswith(":generator") else "ema"
            imgs, labels = sample_checkpoint(Path(path.removesuffix(":generator")), which)
            m = evaluate_samples(imgs, labels)
            ink[name] = {**ink_stats(imgs), **{k: m[k] for k in ("fid", "fid_pixels", "fid_mlp", "recall", "accuracy")}}
    for name, v in ink.items():
        print(f"{name:40s} " + "  ".join(f"{k} {val:.4f}" for k, val in v.items()), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = f"python bench/feature_space_probe.py --teacher-json {a.teacher_json} --out {a.out}"
    if a.checkpoints:
        cmd += " --checkpoints " + " ".join(a.checkpoints)
    a.out.write_text(json.dumps({"command": cmd, "teacher": teacher, "rows": rows, "ink": ink}, indent=1))


if __name__ == "__main__":
    main()
