"""One entry point per recipe task: ``run_task(recipe, out, device, ...)`` dispatches on ``recipe.task``.

Each runner returns a dict of named output files (printed by the CLI) plus ``interrupted`` when a signal
stopped the run. Adding a task = adding a runner here and a recipe class in :mod:`dmdr.recipes`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch


def run_teacher(recipe, out: Path, device: torch.device, *, resume: bool, smoke: bool, console) -> dict[str, Any]:
    from dmdr.train.distributed import require_single_process
    from dmdr.train.teacher import train_teacher

    require_single_process("task: teacher")
    final = train_teacher(recipe, out, device=device, resume=resume, console=console)
    return {"teacher weights": final, "sample grid": out / "samples" / "final.png"}


def run_classifier(recipe, out: Path, device: torch.device, *, resume: bool, smoke: bool, console) -> dict[str, Any]:
    from dmdr.train.classifier import save_classifier, train_digits_classifier
    from dmdr.train.distributed import require_single_process

    require_single_process("task: classifier")
    t = recipe.train
    model, metrics = train_digits_classifier(t.kind, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                                             seed=recipe.seed, device=str(device), split=t.split,
                                             weight_decay=t.weight_decay, label_smoothing=t.label_smoothing,
                                             augment=t.augment)
    final = out / f"digits_{ {'reward': 'classifier', 'features': 'features'}.get(t.kind, t.kind)}.safetensors"
    save_classifier(model, final, metrics=metrics)
    console(f"metrics: {metrics}")
    return {"classifier weights": final}


def run_dmdr(recipe, out: Path, device: torch.device, *, resume: bool, smoke: bool, console) -> dict[str, Any]:
    from dmdr.train.dmdr import DMDRTrainer

    summary = DMDRTrainer(recipe, out, device, console=console).run(resume=resume,
                                                                    max_steps_per_stage=2 if smoke else None)
    return {"student": summary.get("student"), "sample grid": summary.get("final_grid"),
            "interrupted": summary.get("interrupted", False)}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "teacher": run_teacher,
    "classifier": run_classifier,
    "dmdr": run_dmdr,
    "grpo": lambda *a, **kw: __import__("dmdr.train.grpo", fromlist=["run_grpo"]).run_grpo(*a, **kw),
}


def run_task(recipe, out: Path, device: torch.device, *, resume: bool = False, smoke: bool = False,
             console=print) -> dict[str, Any]:
    if recipe.task not in RUNNERS:
        raise ValueError(f"task {recipe.task!r} has no runner; known: {', '.join(RUNNERS)}")
    from dmdr.train.fsdp import check_task

    check_task(recipe)  # runtime.distributed: fsdp2 / runtime.fsdp are for task: dmdr only
    return RUNNERS[recipe.task](recipe, out, device, resume=resume, smoke=smoke, console=console)
