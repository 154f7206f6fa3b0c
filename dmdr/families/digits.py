"""The digits family (``model.family: tiny``): the tiny class-conditional DiT on scikit-learn's 8×8 digits.

* **build**: teacher = a :class:`~dmdr.models.tiny.TinyDiT` (frozen); critic = teacher + LoRA (or, with
  ``critic.lora: null``, a full trainable copy: DMD2's fake score); generator = a full copy of the teacher
  (``generator.lora: null``, as SiT; or the ``generator.init`` weights) or a second LoRA on the same base.
* **conditions**: labels ``y ~ U{0..C-1}`` (B,); the null condition is the extra class ``C``; rewards read the labels.
* **grid**: :func:`dmdr.schedules.few_step_grid` ``(generator.steps, generator.shift, model.t_min)``.
* **decode**: ``x / 2 + 1/2`` (:func:`dmdr.data.digits.to_unit`), images (B, 1, 8, 8).
* **sample inputs**: fixed labels and noise from local generators (grid: 10 per class, seeds 1234/4321;
  monitors: ``i mod C``, seeds 777/778; evaluation: ``i mod C``, seed 4321).
* **export**: a standalone ``student.safetensors`` (TinyDiT weights, the grid and rollout in its metadata), which
  ``dmdr sample --run`` and :func:`dmdr.sampling.load_student` read; a LoRA generator has no export.
* **evaluation net**: the digits evaluation network and the real hold-out digits (FID, recall, accuracy, the
  reward ceiling of the monitors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdr import keys as K
from dmdr.families.base import Bundle, Conditions, Family, SampleInputs
from dmdr.models.lora import AdapterView, add_lora, lora_parameters, set_trainable

GRID_PER_CLASS = 10
"""Samples per class row of the training sample grid."""


@dataclass
class DigitsBundle(Bundle):
    """A digits :class:`Bundle`; ``num_classes`` C (the null label is C) and the teacher's ``teacher_config``."""

    num_classes: int = 10
    teacher_config: Any = None


@dataclass
class LabelInputs(SampleInputs):
    """Fixed digits inputs: labels (N,), noise (N, C, H, W), per-step noise (N_steps, N, C, H, W) or None, and the
    grid layout (``nrow``, ``row_labels``)."""

    labels: Tensor = None
    noise: Tensor = None
    step_noise: Tensor | None = None
    nrow: int = 10
    row_labels: list[str] | None = None


class DigitsFamily(Family):
    name = "tiny"
    conditioning = "labels"
    has_eval_net = True

    # ---- before any weights ---------------------------------------------------------------------------------------
    def check_fits(self, recipe, device: torch.device) -> None:
        from dmdr.train.memfit import check_digits_fits

        check_digits_fits(recipe, device)

    # ---- the bundle ---------------------------------------------------------------------------------------------
    def build(self, recipe, device: torch.device) -> DigitsBundle:
        from dmdr.models.tiny import load_tiny
        from dmdr.schedules import few_step_grid

        self.check(recipe)
        teacher = load_tiny(recipe.model.teacher).to(device)
        teacher.requires_grad_(False)
        c = teacher.config
        if recipe.data.num_classes != c.num_classes:
            raise ValueError(f"data.num_classes={recipe.data.num_classes} but the teacher has {c.num_classes} classes")
        base = teacher
        cl = recipe.critic.lora
        critic_module = None
        if cl is None:  # DMD2: a full trainable copy of the teacher as the fake score
            critic_module = load_tiny(recipe.model.teacher).to(device)
            critic_module.requires_grad_(True)
            critic_params = list(critic_module.parameters())
        else:
            add_lora(base, "critic", rank=cl.rank, alpha=cl.alpha, target_modules=cl.targets)
            critic_params = lora_parameters(base, "critic")
        if recipe.generator.init is not None and recipe.generator.lora is not None:
            raise ValueError(f"generator.init={recipe.generator.init} needs generator.lora: null (full-weights student)")
        if recipe.generator.lora is None:
            # a fresh full copy of the teacher, or the generator.init weights (same architecture)
            gen_module = load_tiny(recipe.generator.init or recipe.model.teacher).to(device)
            gen_params = list(gen_module.parameters())
            gen_module.requires_grad_(True)
            generator, is_lora = gen_module, False
        else:
            gl = recipe.generator.lora
            add_lora(base, "generator", rank=gl.rank, alpha=gl.alpha, target_modules=gl.targets)
            gen_params = lora_parameters(base, "generator")
            generator, gen_module, is_lora = AdapterView(base, "generator", 1.0), base, True
        set_trainable(base, (critic_params if critic_module is None else []) + (gen_params if is_lora else []))
        g = recipe.generator
        grid = few_step_grid(g.steps, g.shift, recipe.model.t_min).to(device=device, dtype=torch.float32)
        return DigitsBundle(family=self, recipe=recipe, base=base, generator=generator, generator_module=gen_module,
                            generator_params=gen_params, critic_params=critic_params,
                            sample_shape=(c.channels, c.image_size, c.image_size), grid=grid,
                            generator_is_lora=is_lora, critic_module=critic_module, num_classes=c.num_classes,
                            teacher_config=c)

    # ---- conditions and decoding ---------------------------------------------------------------------------------
    def conditions(self, bundle: DigitsBundle, batch_size: int) -> Conditions:
        labels = torch.randint(0, bundle.num_classes, (batch_size,), device=bundle.grid.device)
        return Conditions(labels, torch.full_like(labels, bundle.num_classes), labels)

    def decode(self, bundle: DigitsBundle, x: Tensor) -> Tensor:
        from dmdr.data.digits import to_unit

        return to_unit(x)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def sample_inputs(self, bundle: DigitsBundle, purpose: str, *, n: int | None = None, seed: int | None = None,
                      prompts=None, labels: Tensor | None = None, repeats: int = 1) -> LabelInputs:
        r, dev, shape = bundle.recipe, bundle.grid.device, bundle.sample_shape
        C, steps = bundle.num_classes, bundle.grid.shape[0] - 1
        sde = r.generator.backward_sim == "sde"
        step_noise = None
        if purpose == "grid":
            g = torch.Generator().manual_seed(1234)
            nc = r.sample_classes
            labels = torch.arange(nc).repeat_interleave(GRID_PER_CLASS)
            noise = torch.randn(labels.shape[0], *shape, generator=g)
            if sde:  # a local generator: sampling must not touch the training RNG streams
                step_noise = torch.randn(steps, *noise.shape, generator=torch.Generator().manual_seed(4321))
            row_labels = [str(i) for i in range(nc)]
        elif purpose == "monitor":
            g = torch.Generator().manual_seed(777)
            labels = torch.arange(n) % C
            noise = torch.randn(n, *shape, generator=g)
            if sde and steps > 1:
                step_noise = torch.randn(steps, *noise.shape, generator=torch.Generator().manual_seed(778))
            row_labels = None
        elif purpose == "eval":
            g = torch.Generator().manual_seed(4321)
            labels = torch.arange(n) % C
            noise = torch.randn(n, *shape, generator=g)
            # fixed per-step noise: a multi-step sde student samples as it was trained
            step_noise = torch.randn(r.generator.steps, n, *shape, generator=g)
            row_labels = None
        else:
            raise ValueError(f"digits sample inputs: unknown purpose {purpose!r} (grid, monitor, eval)")
        labels = labels.to(dev)
        return LabelInputs(reward_cond=labels, groups=labels.cpu(), labels=labels, noise=noise.to(dev),
                           step_noise=None if step_noise is None else step_noise.to(dev), row_labels=row_labels)

    @torch.no_grad()
    def sample(self, bundle: DigitsBundle, inputs: LabelInputs, *, steps: int | None = None,
               chunk: int = 500) -> Tensor:
        from dmdr.samplers import few_step_rollout

        if steps is not None and steps != bundle.grid.shape[0] - 1:
            raise ValueError(f"steps={steps}: a digits bundle samples on its training grid "
                             f"({bundle.grid.shape[0] - 1} steps); use dmdr sample --steps for other grids")
        bundle.generator_module.eval()
        mode = bundle.recipe.generator.backward_sim  # sample the way the student is trained (sde: fresh noise)
        outs = []
        for i in range(0, len(inputs.labels), chunk):
            sn = None if inputs.step_noise is None else inputs.step_noise[:, i:i + chunk]
            roll = few_step_rollout(bundle.generator, inputs.noise[i:i + chunk], bundle.grid,
                                    inputs.labels[i:i + chunk], mode=mode, step_noise=sn)
            outs.append(roll[K.SAMPLE])
        return torch.cat(outs)

    def save_samples(self, bundle: DigitsBundle, images: Tensor, inputs: LabelInputs, path: Path) -> Path:
        from dmdr.eval.grid import save_grid

        return save_grid(images, path, nrow=inputs.nrow, row_labels=inputs.row_labels)

    @torch.no_grad()
    def student_finite(self, bundle: DigitsBundle) -> bool:
        """Finite weights can still be garbage (a huge step leaves 1e30s that overflow): does the student map 10
        fixed noises (a local generator: no global RNG moves) to finite samples?"""
        from dmdr.samplers import few_step_rollout

        dev = bundle.grid.device
        g = torch.Generator().manual_seed(99)
        noise = torch.randn(10, *bundle.sample_shape, generator=g).to(dev)
        labels = (torch.arange(10) % bundle.num_classes).to(dev)
        m = bundle.generator_module
        was_training = m.training
        m.eval()
        try:
            x = few_step_rollout(bundle.generator, noise, bundle.grid, labels, mode="ode")[K.SAMPLE]
        finally:
            m.train(was_training)
        return bool(torch.isfinite(x).all())

    # ---- export -------------------------------------------------------------------------------------------------
    def export(self, bundle: DigitsBundle, path: Path, *, state: dict[str, Tensor] | None = None,
               global_step: int = 0) -> Path | None:
        """A standalone tiny-DiT file with its grid and rollout in the metadata (a LoRA generator: None)."""
        if bundle.generator_is_lora:
            return None
        from dmdr.models.tiny import save_tiny

        m = bundle.generator_module
        if state is not None:
            m = _with_state(m, state)
        r, g = bundle.recipe, bundle.recipe.generator
        save_tiny(m, str(path), extra={"student": {"steps": g.steps, "shift": g.shift, "t_min": r.model.t_min,
                                                   "mode": g.backward_sim},
                                       "recipe": r.name, "global_step": global_step})
        return path

    def load_export(self, bundle: DigitsBundle, path: Path) -> None:
        from dmdr.models.tiny import load_tiny

        bundle.load_generator_state(load_tiny(str(path)).state_dict())

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def reward_ceiling(self, bundle: DigitsBundle, reward) -> float:
        """The 99th percentile of ``reward`` on the real hold-out digits."""
        from dmdr.data.digits import load_digits_tensors, to_unit

        dev = bundle.grid.device
        x, y = load_digits_tensors("holdout")
        r = reward(to_unit(x).to(dev), y.to(dev)).float()
        return float(torch.quantile(r.cpu(), 0.99))


def _with_state(module, sd):
    import copy

    m = copy.deepcopy(module)
    m.load_state_dict({k: v.to(next(module.parameters()).dtype) for k, v in sd.items()})
    return m


__all__ = ["DigitsFamily", "DigitsBundle", "LabelInputs"]
