"""Text-to-image evaluation of a run: the few-step student against its teacher on the same prompts and seeds.

``dmdr eval --run DIR --prompts FILE [--teacher-steps N] [--teacher-cfg W] [--seeds K] [--reward NAME[:YAML]]
[--json OUT]``. For every prompt p and seed s ∈ {0..K-1}, both models start from the *same* initial noise
x_T = randn(seed s) (the family's ``sample_inputs(bundle, "eval", prompts=..., seed=s)``):

* **student** — the run's generator (newest valid checkpoint, EMA if saved), its N-step training grid and
  rollout, no CFG (:meth:`Family.sample <dmdr.families.base.Family.sample>`);
* **teacher** — the frozen base (no adapter), ``--teacher-steps`` Euler (flow matching) / DDIM (ε) steps on the
  family's grid with the run's shift, CFG ``w`` = ``--teacher-cfg`` (default ``dmd.cfg``)
  (:meth:`Family.sample_teacher <dmdr.families.base.Family.sample_teacher>`).

Reported for each model (means over P·K images):

* ``reward_<name>`` — every requested registered reward: by default the run's training rewards, plus any
  ``--reward`` (held-out) ones, each tagged ``training`` or ``held-out`` in ``rewards``;
* ``clip_score`` — 100 · cos(f_img, f_txt) with the CLIP model of the run's ``clip`` reward (or
  ``--clip-checkpoint``); smoke runs use the tiny random CLIP, so their numbers only test the plumbing;
* ``diversity`` — mean over prompts of the mean pairwise L2 distance between the K seeds' CLIP image embeddings
  (unit vectors, so in [0, 2]); higher = more varied.

A side-by-side PNG grid is written: one row per prompt, K student images then K teacher images.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dmdr.errors import UserError

DEFAULT_TEACHER_STEPS = 28


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:{yaml mapping}"`` → (name, kwargs)."""
    import yaml

    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"--reward {spec!r}: expected NAME or NAME:{{key: value}}")
    if not rest.strip():
        return name, {}
    try:
        kw = yaml.safe_load(rest)
    except yaml.YAMLError:
        kw = None
    if not isinstance(kw, dict):
        raise UserError(f"--reward {spec!r}: the part after ':' must be a YAML mapping, e.g. "
                        f"{name}:{{checkpoint: /path}}")
    return name, kw


def load_run(run: str | Path, device: torch.device):
    """(recipe, family, bundle, checkpoint path) of a text-conditioned run with its generator loaded."""
    from dmdr.families.registry import get_family
    from dmdr.recipes import load_recipe

    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"--run {run}: no recipe.yaml; pass a run directory written by `dmdr train`")
    recipe = load_recipe(run / "recipe.yaml")
    fam = get_family(recipe) if getattr(recipe, "task", None) in ("dmdr", "grpo") else None
    if fam is None or fam.conditioning != "prompts":
        raise UserError(f"--run {run}: a digits run; evaluate digits with `dmdr sample --run DIR --out X.npz` "
                        f"then `dmdr eval X.npz`")
    bundle, path = fam.load_student(run, recipe, device)
    return recipe, fam, bundle, path


@torch.no_grad()
def teacher_images(fam, bundle, prompts: list[str], *, steps: int, cfg: float, seed: int) -> torch.Tensor:
    """The frozen base, ``steps`` Euler/DDIM steps with CFG ``cfg``, from randn(seed) → images (P, 3, H, W)."""
    inputs = fam.sample_inputs(bundle, "eval", prompts=prompts, seed=seed)
    return fam.render(bundle, fam.sample_teacher(bundle, inputs, steps=steps, cfg=cfg)).float().clamp(0, 1)


def mean_pairwise(emb: torch.Tensor, groups: torch.Tensor) -> float:
    from dmdr.train.monitoring import pairwise_diversity

    return pairwise_diversity(emb, groups)


def evaluate_t2i_run(run: str | Path, prompts: list[str], *, teacher_steps: int = DEFAULT_TEACHER_STEPS,
                     teacher_cfg: float | None = None, seeds: int = 2, rewards: list[str] = (),
                     clip_checkpoint: str | None = None, grid: str | Path | None = None,
                     device: str = "cpu") -> dict[str, Any]:
    """Evaluate (see the module docstring). Returns a JSON-ready dict:
    ``{"run", "checkpoint", "prompts", "seeds", "teacher": {"steps", "cfg"}, "rewards": {name: "training" |
    "held-out"}, "student": {metric: mean}, "teacher_metrics": {...}, "per_prompt": [...], "grid"}``."""
    from dmdr.eval.grid import save_grid
    from dmdr.train.monitoring import training_rewards
    from dmdr.train.runtime import resolve_device

    if seeds < 2:
        raise UserError(f"--seeds {seeds}: need at least 2 seeds per prompt (diversity compares them)")
    if teacher_steps < 1:
        raise UserError(f"--teacher-steps {teacher_steps}: must be at least 1")
    if not prompts:
        raise UserError("--prompts: the file holds no prompts")
    dev = resolve_device(device)
    recipe, fam, bundle, ck = load_run(run, dev)
    g, smoke = recipe.generator, bool(recipe.model.smoke)
    cfg = float(recipe.dmd.cfg if teacher_cfg is None else teacher_cfg)

    def factory(name: str, **kw):
        return fam.reward(bundle, name, kw)

    train = training_rewards(recipe)
    wanted: dict[str, tuple[dict, str]] = {n: (kw, "training") for n, kw in train}
    for spec in rewards:
        n, kw = parse_reward_spec(spec)
        if n in wanted and not kw:
            continue
        wanted[n] = (kw or wanted.get(n, ({}, ""))[0], "training" if (n, kw) in train else "held-out")
    built = {n: factory(n, **{"device": str(dev), **kw}).to(dev) for n, (kw, _) in wanted.items()}
    clip_kw = dict(wanted["clip"][0]) if "clip" in wanted else None
    if clip_checkpoint is not None:
        clip_kw = {"checkpoint": clip_checkpoint}
    if clip_kw is None and not smoke:
        raise UserError("the CLIP score needs a CLIP model: pass --clip-checkpoint (an open_clip file or HF "
                        "CLIPModel directory), or evaluate a run trained with a `clip` reward")
    clip = built["clip"] if "clip" in built and clip_checkpoint is None else \
        factory("clip", **{"device": str(dev), **(clip_kw or {})}).to(dev)
    student, teacher = [], []
    for s in range(seeds):
        inputs = fam.sample_inputs(bundle, "eval", prompts=prompts, seed=s)
        student.append(fam.render(bundle, fam.sample(bundle, inputs)).float().clamp(0, 1))
        teacher.append(teacher_images(fam, bundle, prompts, steps=teacher_steps, cfg=cfg, seed=s))
    P = len(prompts)
    cond = [p for _ in range(seeds) for p in prompts]            # image i = seed i // P, prompt i % P
    groups = torch.arange(P).repeat(seeds)

    @torch.no_grad()
    def metrics(images: torch.Tensor) -> tuple[dict, dict]:
        out, per = {}, {}
        for n, r in built.items():
            v = r(images, cond).float().cpu()
            out[f"reward_{n}"] = float(v.mean())
            per[f"reward_{n}"] = v.view(seeds, P).mean(0).tolist()
        emb = clip.encoder.encode_image(images).float().cpu()
        txt = clip.encoder.encode_text(cond).float().cpu()
        cs = 100 * (emb * txt).sum(-1)
        out["clip_score"], per["clip_score"] = float(cs.mean()), cs.view(seeds, P).mean(0).tolist()
        out["diversity"] = mean_pairwise(emb, groups)
        per["diversity"] = [mean_pairwise(emb[groups == i], groups[groups == i]) for i in range(P)]
        return out, per

    s_img, t_img = torch.cat(student), torch.cat(teacher)
    s_m, s_per = metrics(s_img)
    t_m, t_per = metrics(t_img)
    grid_path = None
    if grid is not None:
        rows = []
        for i in range(P):
            rows += [student[s][i] for s in range(seeds)] + [teacher[s][i] for s in range(seeds)]
        res = student[0].shape[-1]
        grid_path = str(save_grid(torch.stack(rows).cpu(), grid, nrow=2 * seeds, scale=max(1, 64 // res),
                                  row_labels=[str(i) for i in range(P)]))
    per_prompt = [{"prompt": p, "student": {k: v[i] for k, v in s_per.items()},
                   "teacher": {k: v[i] for k, v in t_per.items()}} for i, p in enumerate(prompts)]
    return {"run": str(run), "checkpoint": str(ck), "prompts": len(prompts), "seeds": seeds,
            "student_steps": g.steps, "teacher": {"steps": teacher_steps, "cfg": cfg},
            "rewards": {n: tag for n, (_, tag) in wanted.items()}, "smoke": smoke,
            "student": s_m, "teacher_metrics": t_m, "per_prompt": per_prompt, "grid": grid_path}


def format_t2i_table(res: dict):
    """A ``rich.table.Table``: metric | student | teacher | student − teacher."""
    from rich.table import Table

    t = Table(title=f"student ({res['student_steps']} steps) vs teacher ({res['teacher']['steps']} steps, "
                    f"cfg {res['teacher']['cfg']:g}); {res['prompts']} prompts x {res['seeds']} seeds")
    for c in ("metric", "student", "teacher", "student - teacher"):
        t.add_column(c, justify="right" if c != "metric" else "left")
    for k, v in res["student"].items():
        tv = res["teacher_metrics"][k]
        tag = ""
        if k.startswith("reward_"):
            tag = f" ({res['rewards'][k[7:]]})"
        d = v - tv if math.isfinite(v) and math.isfinite(tv) else float("nan")
        t.add_row(k + tag, f"{v:.4f}", f"{tv:.4f}", f"{d:+.4f}")
    return t


__all__ = ["evaluate_t2i_run", "format_t2i_table", "load_run", "parse_reward_spec", "teacher_images"]
