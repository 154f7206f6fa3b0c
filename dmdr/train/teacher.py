"""Train the class-conditional flow-matching teacher (the embedded digits benchmark).

    t ~ logit-normal (or U[0,1]),  x_t = (1 - t) x0 + t ε,  L = mean ‖v_θ(x_t, t, c̃) - (ε - x0)‖²

with ``c̃`` = the null class with probability ``cond_dropout`` (so the teacher supports CFG), AdamW, gradient
clipping, linear warm-up and an EMA of the weights; the EMA is what gets saved as ``teacher.safetensors``
(Lipman et al. 2023; Liu et al. 2023; Ho & Salimans 2022 for CFG).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from dmdr.data.digits import DigitsBatches, to_unit
from dmdr.eval.grid import save_grid
from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny
from dmdr.recipes import TeacherRecipe, recipe_to_yaml
from dmdr.samplers import sample_euler
from dmdr.schedules import few_step_grid
from dmdr.train import checkpoint as ckpt
from dmdr.train.runtime import MetricsLog, autocast, make_progress, rng_state, set_rng_state, truncate_metrics


def flow_matching_loss(model: TinyDiT, x0: torch.Tensor, labels: torch.Tensor, *, cond_dropout: float,
                       time_sampling: str = "logit_normal") -> torch.Tensor:
    """The conditional flow-matching loss above for one batch; x0 (B,C,H,W) in [-1,1], labels (B,)."""
    B = x0.shape[0]
    if time_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(B, device=x0.device))
    else:
        t = torch.rand(B, device=x0.device)
    noise = torch.randn_like(x0)
    drop = torch.rand(B, device=x0.device) < cond_dropout
    cond = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    x_t = model.path.renoise(x0, t, noise)
    return ((model(x_t, t, cond) - model.path.target(x0, noise, t)) ** 2).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``θ_ema ← decay · θ_ema + (1 - decay) · θ`` in place."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def sample_teacher(model: TinyDiT, labels: torch.Tensor, *, steps: int, cfg: float = 1.0, shift: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-sample the teacher for ``labels`` (B,), returns images in [-1, 1], (B,C,H,W)."""
    c = model.config
    noise = torch.randn(labels.shape[0], c.channels, c.image_size, c.image_size, generator=generator,
                        device=labels.device)
    grid = few_step_grid(steps, shift, c.t_min).to(labels.device)
    return sample_euler(model, noise, grid, labels, uncond=model.null_cond(labels), cfg=cfg)


def train_teacher(recipe: TeacherRecipe, out: Path, *, device: torch.device, resume: bool = False,
                  console=print, max_steps: int | None = None) -> Path:
    """Run ``task: teacher``. Writes ``teacher.safetensors`` (EMA weights), metrics, grids, checkpoints."""
    tr, m = recipe.train, recipe.model
    steps = min(tr.steps, max_steps) if max_steps else tr.steps
    model = TinyDiT(TinyDiTConfig(dim=m.dim, depth=m.depth, heads=m.heads, patch=m.patch, mlp_ratio=m.mlp_ratio,
                                  num_classes=recipe.data.num_classes, t_min=m.t_min)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    data = DigitsBatches(tr.batch_size, seed=recipe.seed, split="all")
    step = 0
    log = MetricsLog(out / "metrics.jsonl")
    if resume:
        path, tensors, state, _ = ckpt.load_latest_valid(out / "checkpoints", warn=console)
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["optim"])
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        truncate_metrics(out / "metrics.jsonl", step, warn=console)
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))  # written only once resume succeeded
        console(f"resumed from {path} at step {step}")

    def save(step: int) -> None:
        ckpt.write_checkpoint(out / "checkpoints", step,
                              tensors={"model": model.state_dict(), "ema": ema.state_dict()},
                              state={"optim": opt.state_dict(), "data": data.state_dict(), "rng": rng_state(),
                                     "step": step},
                              recipe_yaml=recipe_to_yaml(recipe), keep_last=recipe.logging.keep_last)

    progress = make_progress(recipe.logging.progress)
    t0, losses = time.time(), []
    with (progress or _Null()) as p:
        task = p.add_task("teacher", total=steps, completed=step, info="", rate="") if progress else None
        while step < steps:
            x0, y = next(data)
            x0, y = x0.to(device), y.to(device)
            lr = tr.lr * min(1.0, (step + 1) / max(tr.warmup, 1))
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            with autocast(device, recipe.runtime.precision):
                loss = flow_matching_loss(model, x0, y, cond_dropout=tr.cond_dropout, time_sampling=tr.time_sampling)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            opt.step()
            ema_update(ema, model, tr.ema_decay if step >= tr.warmup else 0.0)
            step += 1
            losses.append(loss.item())
            if step % recipe.logging.log_every == 0 or step == steps:
                rec = {"stage": "teacher", "step": step, "loss_fm": sum(losses) / len(losses), "grad_norm": float(gnorm),
                       "lr": lr}
                log.write(rec)
                losses = []
                if task is not None:
                    rate = step / max(time.time() - t0, 1e-6)
                    p.update(task, completed=step, info=f"loss {rec['loss_fm']:.4f}", rate=f"{rate:.1f} it/s")
            if recipe.logging.checkpoint_every and step % recipe.logging.checkpoint_every == 0 and step < steps:
                save(step)
            if recipe.logging.sample_every and step % recipe.logging.sample_every == 0 and step < steps:
                _grid(ema, recipe, out / "samples" / f"step-{step:07d}.png", device)
    save(step)
    final = out / "teacher.safetensors"
    save_tiny(ema.cpu(), str(final), extra={"seed": recipe.seed, "steps": steps, "recipe": recipe.name})
    _grid(ema.to(device), recipe, out / "samples" / "final.png", device)
    return final


def _grid(model: TinyDiT, recipe: TeacherRecipe, path: Path, device) -> Path:
    n = recipe.data.num_classes
    labels = torch.arange(n, device=device).repeat_interleave(10)
    g = torch.Generator(device="cpu").manual_seed(1234)
    model.eval()
    x = sample_teacher(model, labels.cpu().to(device), steps=recipe.eval_steps, cfg=recipe.eval_cfg,
                       generator=g if device.type == "cpu" else None)
    return save_grid(to_unit(x), path, nrow=10, row_labels=[str(i) for i in range(n)])


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
