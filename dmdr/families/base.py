"""The family seam: what a trainer, the sampler, export, eval and ``--dry-run`` may ask of a model family.

A **family** (``model.family`` in a recipe: ``tiny`` digits, ``sd3``, ``sdxl``, ...) is a stateless
:class:`Family` object from :func:`dmdr.families.registry.get_family`. It turns a recipe into a :class:`Bundle`
(the built networks and everything the family must remember, as typed fields of its own ``Bundle`` subclass) and
answers every later question about that bundle. Callers hold ``(family, bundle)`` and call only these methods:
no ``isinstance``, no family names, no ``extra`` dict::

    family = get_family(recipe)            # registry: the only reader of recipe.model.family
    family.check(recipe)                   # cheap validation, before any weights (one-line errors)
    family.memory(recipe)                  # MemoryEstimate (GiB by part) for --dry-run, or None
    bundle = family.build(recipe, device)  # base + adapters, trainable sets, path, grid (N+1,)
    cond, uncond, rcond = family.conditions(bundle, B)     # training draw: cond, null cond, reward cond
    images = family.decode(bundle, x0)     # differentiable, (B, 3, H, W) in [0, 1], for rewards
    inputs = family.sample_inputs(bundle, "grid" | "monitor" | "eval", ...)  # fixed, reproducible
    x0 = family.sample(bundle, inputs)     # the student's own rollout on its grid, model space
    family.save_samples(bundle, family.render(bundle, x0), inputs, path)
    family.export(bundle, path, state=ema)  # a file the family's own tools load

Shapes: ``bundle.sample_shape`` is one sample in model space, (C, H, W) for images (a video family adds frames:
(C, F, H, W)); ``bundle.grid`` is the few-step grid t_0 > ... > t_N (float32, on the device); ``bundle.path`` is
the generator's input path (renoise / to_x0, docs/paths.md). Conditioning ``cond`` is whatever the family's
networks take (class labels (B,), a prompt-embedding TensorDict (B,)); the reward condition is what rewards read
(labels, prompt strings).

A new family is one module defining a ``Family`` subclass (diffusers text-to-image families subclass
:class:`dmdr.families.diffusers_t2i.DiffusersT2IFamily` and supply only model-level hooks) plus one line in
:data:`dmdr.families.registry.FAMILIES`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from dmdr.models.lora import AdapterView, lora_state_dict


class Conditions(NamedTuple):
    """One training draw of conditions (batch B): ``cond`` for the networks, ``uncond`` its null version (CFG),
    ``reward`` what the rewards read (labels / prompt strings)."""

    cond: Any
    uncond: Any
    reward: Any


@dataclass
class SampleInputs:
    """Fixed inputs of a sampling call (a sample grid, the monitors' set, an evaluation set); opaque to callers.

    ``reward_cond`` is what the rewards read for these samples (one entry per sample, in sample order) and
    ``groups`` (N,) the id of the condition each sample was drawn for (same condition, different noise -> same id).
    Families subclass it (labels + noise tensors; prompt batches + seeds)."""

    reward_cond: Any
    groups: Tensor

    def __len__(self) -> int:
        return int(self.groups.shape[0])


@dataclass
class Bundle:
    """What a family built from a recipe. The trainer reads only these fields; a family adds its own typed fields
    in a subclass (never an untyped dict).

    * ``base``: the frozen teacher network carrying the critic's LoRA adapter (``"critic"``); real and fake scores
      are views of it at scales λ_r(k) and λ_f (:meth:`critic_view`);
    * ``generator``: the student, callable under the model contract (docs/models.md); ``generator_module`` is the
      ``nn.Module`` whose mode (train/eval) and state matter; ``generator_params`` / ``critic_params`` are the two
      trainable sets;
    * ``sample_shape``: one sample in model space, (C, H, W);
    * ``grid``: the few-step grid (N+1,), float32 on the device (the family's, e.g. SDXL's one-step [0.399, 0]);
    * ``generator_path``: the generator's input path, or None for ``base.path``;
    * ``critic_module``: a full trainable critic copy (``critic.lora: null``, DMD2), or None (LoRA on ``base``).
    """

    family: "Family"
    recipe: Any
    base: nn.Module
    generator: Any
    generator_module: nn.Module
    generator_params: list[nn.Parameter]
    critic_params: list[nn.Parameter]
    sample_shape: tuple[int, ...]
    grid: Tensor
    generator_is_lora: bool = False
    critic_module: nn.Module | None = None
    generator_path: Any = None

    # ---- conveniences over the family (so a trainer may write bundle.sample_cond(B) / bundle.decode(x)) -------
    def sample_cond(self, batch_size: int) -> Conditions:
        """``family.conditions(self, B)``."""
        return self.family.conditions(self, batch_size)

    def decode(self, x: Tensor) -> Tensor:
        """``family.decode(self, x)``: differentiable, images in [0, 1]."""
        return self.family.decode(self, x)

    # ---- scores and trainable state ----------------------------------------------------------------------------
    @property
    def path(self):
        """The generator's input path (renoise / to_x0)."""
        return self.generator_path if self.generator_path is not None else self.base.path

    def critic_view(self, scale: float):
        """The critic at scale λ: base + λ·Δ_LoRA, or θ_t + λ(θ_c − θ_t) for a full copy (models/full_critic.py)."""
        if self.critic_module is not None:
            from dmdr.models.full_critic import FullCopyView

            return FullCopyView(self.base, self.critic_module, scale)
        return AdapterView(self.base, "critic", scale)

    def null_cond(self, cond: Any) -> Any:
        """The null condition of ``cond`` (same batch), for CFG."""
        return self.base.null_cond(cond)

    def generator_state(self) -> dict[str, Tensor]:
        if self.generator_is_lora:
            return lora_state_dict(self.base, "generator")
        return {k: v for k, v in self.generator_module.state_dict().items()}

    def critic_state(self) -> dict[str, Tensor]:
        if self.critic_module is not None:
            return {k: v for k, v in self.critic_module.state_dict().items()}
        return lora_state_dict(self.base, "critic")

    def load_generator_state(self, sd: dict[str, Tensor]) -> None:
        load_exact(self.generator_module if not self.generator_is_lora else self.base, sd, "generator",
                   partial=self.generator_is_lora)

    def load_critic_state(self, sd: dict[str, Tensor]) -> None:
        if self.critic_module is not None:
            load_exact(self.critic_module, sd, "critic", partial=False)
            return
        load_exact(self.base, sd, "critic", partial=True)


def load_exact(module: nn.Module, sd: dict[str, Tensor], what: str, partial: bool) -> None:
    """Copy ``sd`` into ``module`` (every key of the module when not ``partial``); a mismatch is one ValueError."""
    from dmdr.models.weights import copy_state, state_mismatch

    own = dict(module.state_dict()) if not partial else {n: p for n, p in module.named_parameters()}
    missing, unexpected, bad_shape = state_mismatch(own, sd, require_all=not partial)
    if missing or unexpected or bad_shape:
        raise ValueError(f"{what} checkpoint does not match the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, shape mismatch {bad_shape[:3]}")
    copy_state(own, sd)


class Family(ABC):
    """A model family (see the module docstring). Stateless: every method takes the recipe or the bundle.

    Class attributes:
        name: the ``model.family`` value it is registered under.
        conditioning: ``"labels"`` (class-conditional; ``dmdr sample --class``) or ``"prompts"`` (text;
            ``--prompt``/``--prompts``, ``dmdr eval --run``).
        has_eval_net: the family has an evaluation network and real data (FID / recall / accuracy / diversity
            monitors, the in-training evaluation).
        sample_suffixes: the file types :meth:`save_samples` writes (``dmdr sample --out``).
    """

    name: ClassVar[str] = ""
    conditioning: ClassVar[str] = "labels"
    has_eval_net: ClassVar[bool] = False
    sample_suffixes: ClassVar[tuple[str, ...]] = (".png",)

    # ---- before any weights are loaded ------------------------------------------------------------------------
    def check(self, recipe) -> None:
        """Refuse a recipe this family cannot train (one line naming the field), before any weights load."""

    def smoke_overrides(self, recipe) -> list[str]:
        """Extra ``--set`` overrides of ``dmdr train --smoke`` (e.g. ``model.smoke=true`` for offline stand-ins)."""
        return []

    def memory(self, recipe):
        """A :class:`~dmdr.train.memory_estimate.MemoryEstimate` (GiB by part) for ``--dry-run``, or None."""
        return None

    def check_fits(self, recipe, device: torch.device) -> None:
        """Refuse a batch that cannot fit on ``device`` now (:class:`~dmdr.train.memfit.MemoryFitError`)."""

    # ---- the bundle ---------------------------------------------------------------------------------------------
    @abstractmethod
    def build(self, recipe, device: torch.device) -> Bundle:
        """Base + adapters, trainable sets, the generator path and grid (see :class:`Bundle`)."""

    # ---- conditions, time path, decoding ----------------------------------------------------------------------
    @abstractmethod
    def conditions(self, bundle: Bundle, batch_size: int) -> Conditions:
        """A training draw of ``batch_size`` conditions (advances the family's data stream)."""

    @abstractmethod
    def decode(self, bundle: Bundle, x: Tensor) -> Tensor:
        """Model space -> images (B, 3|1, H, W) in [0, 1], differentiable (what rewards read)."""

    def render(self, bundle: Bundle, x: Tensor) -> Tensor:
        """Model space -> images in [0, 1] for grids and files (default :meth:`decode`; a family with a cheaper
        reward decoder renders with its full decoder)."""
        return self.decode(bundle, x)

    def reward(self, bundle: Bundle, name: str, kwargs: dict) -> nn.Module:
        """Build the reward ``name`` for this family's samples (smoke runs: tiny versions; video: per frame)."""
        from dmdr.rewards import build_reward

        return build_reward(name, **kwargs)

    # ---- sampling ------------------------------------------------------------------------------------------------
    @abstractmethod
    def sample_inputs(self, bundle: Bundle, purpose: str, *, n: int | None = None, seed: int | None = None,
                      prompts: list[str] | None = None, labels: Tensor | None = None,
                      repeats: int = 1) -> SampleInputs:
        """Fixed inputs for ``purpose`` (deterministic; the global RNG is untouched):

        * ``"grid"``: the training sample grid (the family's fixed set);
        * ``"monitor"``: the monitors' set: ``n`` samples (label families) or ``prompts`` (default: the family's
          sample prompts) × ``repeats`` seeds;
        * ``"eval"``: an evaluation set: ``n`` samples, or ``prompts`` with noise seed ``seed`` (text families:
          the same noise as :meth:`sample_teacher` draws for the same inputs);
        * ``"user"``: ``dmdr sample``: ``prompts`` or ``labels``, from ``seed``.
        A family raises ValueError for a purpose it does not support."""

    @abstractmethod
    def sample(self, bundle: Bundle, inputs: SampleInputs, *, steps: int | None = None) -> Tensor:
        """The student's own rollout (its grid and ``generator.backward_sim``) on ``inputs``: x in model space
        (N, *sample_shape). ``steps`` overrides N (keeping the shift). Runs under ``no_grad``."""

    def sample_teacher(self, bundle: Bundle, inputs: SampleInputs, *, steps: int, cfg: float = 1.0) -> Tensor:
        """The frozen teacher (no adapter): ``steps`` Euler/DDIM steps with CFG ``cfg`` on ``inputs`` (model space)."""
        raise NotImplementedError(f"model.family={self.name} has no teacher sampler")

    def save_samples(self, bundle: Bundle, images: Tensor, inputs: SampleInputs, path: Path) -> Path:
        """Write ``images`` (N, C, H, W) in [0, 1] for ``inputs`` as a PNG grid (a video family: MP4/GIF)."""
        from dmdr.eval.grid import save_grid

        return save_grid(images, path, nrow=min(4, images.shape[0]))

    def student_finite(self, bundle: Bundle) -> bool:
        """Does the student map a few fixed noises to finite samples? (Cheap families check; others say True.)"""
        return True

    # ---- export and resume ---------------------------------------------------------------------------------------
    @abstractmethod
    def export(self, bundle: Bundle, path: Path, *, state: dict[str, Tensor] | None = None,
               global_step: int = 0) -> Path | None:
        """Write the student (``state``: e.g. the EMA weights, else the live generator) to a file the family's own
        tools load; ``path`` is the run's ``student.safetensors`` (a family may write a folder next to it).
        Returns what was written, or None when the family has no export for this generator."""

    def load_student(self, run: Path, recipe, device: torch.device, *, warn=None) -> tuple[Bundle, Path]:
        """(bundle, checkpoint) of a finished or running run: :meth:`build` from its recipe, then the newest valid
        checkpoint's generator (its EMA when saved). A generator that does not match the recipe is one line."""
        from dmdr.errors import UserError
        from dmdr.train import checkpoint as ckpt

        path, tensors, _, _ = ckpt.load_latest_valid(Path(run) / "checkpoints", warn=warn or (lambda m: None))
        bundle = self.build(recipe, device)
        state = tensors.get("ema") or tensors.get("generator")
        own = bundle.generator_state()
        if state is None:
            raise UserError(f"{path}: no generator weights in the checkpoint")
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shape:
            raise UserError(f"{path}: the generator does not match {Path(run) / 'recipe.yaml'} ({len(state)} vs "
                            f"{len(own)} tensors): missing {missing[:3]}, unexpected {unexpected[:3]}, shape "
                            f"mismatch {shape[:3]}")
        bundle.load_generator_state(state)
        bundle.generator_module.eval()
        return bundle, path

    def load_export(self, bundle: Bundle, path: Path) -> None:
        """Load a file written by :meth:`export` into the generator (``rl.init: student.safetensors``)."""
        from dmdr.errors import UserError

        raise UserError(f"{path}: model.family={self.name} cannot start from an exported student file; pass the "
                        f"run directory (its newest checkpoint) instead")

    def data_state(self, bundle: Bundle) -> dict | None:
        """The data stream's position for a checkpoint (exact resume), or None."""
        return None

    def load_data_state(self, bundle: Bundle, state: dict) -> None:
        """Restore :meth:`data_state`."""

    # ---- evaluation -------------------------------------------------------------------------------------------
    def reward_ceiling(self, bundle: Bundle, reward: nn.Module) -> float | None:
        """The saturated level of ``reward`` on real data (the monitors' default ceiling), or None if unknown."""
        return None


__all__ = ["Bundle", "Conditions", "Family", "SampleInputs", "load_exact"]
