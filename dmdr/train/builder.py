"""Turn a recipe into objects, in one place. The trainer never inspects model families itself.

A :class:`ModelBundle` is what the DMDR trainer needs from a family:

* ``base``: the frozen teacher network carrying the critic's LoRA adapter (``"critic"``) — real and fake scores
  are views of it at scales λ_r(k) and λ_f (:class:`dmdr.models.lora.AdapterView`);
* ``generator``: the student, callable under the model contract; ``generator_module`` is the ``nn.Module`` whose
  mode (train/eval) and state matter; ``generator_params`` / ``critic_params`` are the two trainable sets;
* ``sample_cond(B) -> (cond, uncond, reward_cond)``: training conditioning (class labels or prompt embeddings),
  its null version for CFG, and what rewards read (labels or prompt strings);
* ``decode(x) -> images in [0,1]``: differentiable map from samples/latents to pixels for rewards;
* ``sample_shape``: (C, H, W).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from dmdr.models.lora import AdapterView, add_lora, lora_parameters, lora_state_dict, set_trainable


@dataclass
class ModelBundle:
    base: nn.Module
    generator: Any
    generator_module: nn.Module
    generator_params: list[nn.Parameter]
    critic_params: list[nn.Parameter]
    sample_cond: Callable[[int], tuple[Any, Any, Any]]
    decode: Callable[[torch.Tensor], torch.Tensor]
    sample_shape: tuple[int, int, int]
    generator_is_lora: bool = False
    extra: dict = field(default_factory=dict)
    critic_module: nn.Module | None = None  # a full critic copy (``critic.lora: null``, DMD2); None = LoRA on base

    def critic_view(self, scale: float):
        """The critic at scale λ: base + λ·Δ_LoRA, or θ_t + λ(θ_c − θ_t) for a full copy (models/full_critic.py)."""
        if self.critic_module is not None:
            from dmdr.models.full_critic import FullCopyView

            return FullCopyView(self.base, self.critic_module, scale)
        return AdapterView(self.base, "critic", scale)

    @property
    def path(self):
        return self.base.path

    def generator_state(self) -> dict[str, torch.Tensor]:
        if self.generator_is_lora:
            return lora_state_dict(self.base, "generator")
        return {k: v for k, v in self.generator_module.state_dict().items()}

    def critic_state(self) -> dict[str, torch.Tensor]:
        if self.critic_module is not None:
            return {k: v for k, v in self.critic_module.state_dict().items()}
        return lora_state_dict(self.base, "critic")

    def load_generator_state(self, sd: dict[str, torch.Tensor]) -> None:
        _load_exact(self.generator_module if not self.generator_is_lora else self.base, sd, "generator",
                    partial=self.generator_is_lora)

    def load_critic_state(self, sd: dict[str, torch.Tensor]) -> None:
        if self.critic_module is not None:
            _load_exact(self.critic_module, sd, "critic", partial=False)
            return
        _load_exact(self.base, sd, "critic", partial=True)


def _load_exact(module: nn.Module, sd: dict[str, torch.Tensor], what: str, partial: bool) -> None:
    from dmdr.models.weights import copy_state, state_mismatch

    own = dict(module.state_dict()) if not partial else {n: p for n, p in module.named_parameters()}
    missing, unexpected, bad_shape = state_mismatch(own, sd, require_all=not partial)
    if missing or unexpected or bad_shape:
        raise ValueError(f"{what} checkpoint does not match the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, shape mismatch {bad_shape[:3]}")
    copy_state(own, sd)


def build_tiny_bundle(recipe, device: torch.device) -> ModelBundle:
    """The digits family: teacher = a :class:`TinyDiT`; critic = teacher + LoRA; generator = a full copy of the
    teacher (``generator.lora: null``, as SiT) or a second LoRA on the same base."""
    from dmdr.data.digits import to_unit
    from dmdr.models.tiny import load_tiny

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
    n = c.num_classes

    def sample_cond(B: int):
        labels = torch.randint(0, n, (B,), device=device)
        return labels, torch.full_like(labels, n), labels

    return ModelBundle(base=base, generator=generator, generator_module=gen_module, generator_params=gen_params,
                       critic_params=critic_params, sample_cond=sample_cond, decode=to_unit,
                       sample_shape=(c.channels, c.image_size, c.image_size), generator_is_lora=is_lora,
                       extra={"teacher_config": c}, critic_module=critic_module)


FAMILY_BUILDERS: dict[str, Callable[..., ModelBundle]] = {"tiny": build_tiny_bundle}


def build_bundle(recipe, device: torch.device) -> ModelBundle:
    """The :class:`ModelBundle` of ``recipe.model.family`` (tiny here; sd3/sdxl from dmdr.train.t2i_bundle)."""
    fam = recipe.model.family
    if fam not in FAMILY_BUILDERS:
        try:  # text-to-image families register themselves on import
            import dmdr.train.t2i_bundle  # noqa: F401
        except ModuleNotFoundError:
            pass
    if fam not in FAMILY_BUILDERS:
        raise ValueError(f"model.family={fam!r} has no trainer bundle; available: {', '.join(FAMILY_BUILDERS)}")
    if fam != "tiny" and getattr(getattr(recipe, "critic", None), "lora", True) is None:
        from dmdr.errors import UserError

        raise UserError(f"critic.lora: null (a full critic copy) is supported for the tiny digits family only, not "
                        f"model.family={fam!r}; give critic.lora a rank/alpha/targets")
    return FAMILY_BUILDERS[fam](recipe, device)
