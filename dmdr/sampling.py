"""High-level sampling for the digits family: the shipped/any teacher and trained students.

* :func:`load_student` — a run directory's student (``student.safetensors``, else the newest checkpoint's generator);
* :func:`sample_student` — the training-time few-step sampler on the training grid (method.md §2.13: never a
  scheduler whose grid silently differs);
* :func:`sample_teacher` — Euler with optional CFG (re-exported from :mod:`dmdr.train.teacher`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dmdr import keys as K
from dmdr.errors import UserError
from dmdr.models.tiny import TinyDiT, load_tiny
from dmdr.samplers import few_step_rollout
from dmdr.schedules import few_step_grid
from dmdr.train.teacher import sample_teacher

__all__ = ["StudentInfo", "load_student", "sample_student", "sample_teacher"]


@dataclass(frozen=True)
class StudentInfo:
    steps: int
    shift: float
    t_min: float
    source: str
    mode: str = "ode"  # the rollout the student was trained on (generator.backward_sim); sampling uses the same


def load_student(run_dir: str | Path, warn=None) -> tuple[TinyDiT, StudentInfo]:
    """Load the student of a digits run. Raises :class:`UserError` (one line) if the run has none.

    Without ``student.safetensors`` the newest valid checkpoint is used; a damaged newer one is skipped and
    reported through ``warn`` (the CLI prints it on stderr), and so is the fallback itself."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run {run}: no such run directory; pass the --out directory of a `dmdr train` run")
    f = run / "student.safetensors"
    if f.exists():
        try:
            model = load_tiny(str(f))
        except ValueError as e:
            raise UserError(str(e)) from None
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            meta = json.loads((h.metadata() or {}).get("student", "null") or "null")
        if not meta:
            raise UserError(f"{f} has no student metadata (steps/shift); it is not a dmdr student")
        return model, StudentInfo(int(meta["steps"]), float(meta["shift"]), float(meta["t_min"]), str(f),
                                  str(meta.get("mode", "ode")))
    from dmdr.recipes import validate_recipe
    from dmdr.train.checkpoint import CheckpointError, load_latest_valid

    try:
        path, tensors, _, recipe_yaml = load_latest_valid(run / "checkpoints", warn=warn or (lambda m: None))
    except CheckpointError:
        raise UserError(f"{run} has no student yet (no student.safetensors and no checkpoint); train it first "
                        f"with `dmdr train RECIPE --out {run}`") from None
    import yaml

    recipe = validate_recipe(yaml.safe_load(recipe_yaml), str(path / "recipe.yaml"))
    if getattr(recipe, "task", None) != "dmdr" or recipe.generator.lora is not None:
        raise UserError(f"{run} is not a digits DMDR run with a full-weight student")
    model = load_tiny(recipe.model.teacher)
    try:
        model.load_state_dict(tensors["generator"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}: generator weights do not match the teacher architecture ({str(e)[:80]})") from None
    g = recipe.generator
    if warn is not None:
        warn(f"note: {run} has no student.safetensors; sampling the generator of checkpoint {path.name}")
    return model, StudentInfo(g.steps, g.shift, recipe.model.t_min, str(path), g.backward_sim)


@torch.no_grad()
def sample_student(model: TinyDiT, labels: torch.Tensor, info: StudentInfo, *, steps: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step sampling on the student's training grid (``steps`` overrides N, keeping the shift), with the
    rollout it was trained on: ``ode`` (Euler) or ``sde`` (x̂0 renoised with fresh noise at each step, as DMD2
    samples). All noise comes from ``generator``. Returns images in [-1, 1], (B,C,H,W)."""
    c = model.config
    n = steps or info.steps
    grid = few_step_grid(n, info.shift, info.t_min).to(device=labels.device, dtype=torch.float32)
    shape = (labels.shape[0], c.channels, c.image_size, c.image_size)
    noise = torch.randn(*shape, generator=generator).to(labels.device)
    step_noise = torch.randn(n, *shape, generator=generator).to(labels.device) if info.mode == "sde" else None
    model.eval()
    return few_step_rollout(model, noise, grid, labels, mode=info.mode, step_noise=step_noise)[K.SAMPLE]
