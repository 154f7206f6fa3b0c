"""Trainer bundles for the text-to-image families (``model.family: sd3 | sdxl``), built on one shared base.

:func:`build_t2i_bundle` turns a recipe into a :class:`~dmdr.train.builder.ModelBundle` over a
:class:`~dmdr.models.t2i.SharedBaseT2I` (one frozen base with a ``generator`` and a ``critic`` LoRA adapter,
docs/models.md):

* ``base`` = the family denoiser (``SD3Denoiser`` / ``SDXLDenoiser``) that carries both adapters; the trainer's
  real/fake scores are ``AdapterView(base, "critic", λ)``; the generator is ``AdapterView(base, "generator", 1)``.
* ``sample_cond(B)`` draws B prompts from a :class:`~dmdr.data.prompts.PromptSampler` over ``data.prompts`` and
  returns ``(cond, uncond, prompts)``: the prompt embeddings (TensorDict, cached per prompt), the unconditional
  embeddings (the encoded empty prompt "", as the official code) and the prompt strings the rewards read.
* ``decode(x)`` = :func:`dmdr.models.t2i.decode_latents` (differentiable, images in [0, 1]).
* ``extra``: ``shared`` (the :class:`SharedBaseT2I`), ``grid`` (the training grid, :func:`~dmdr.models.t2i.t2i_grid`),
  ``resolution``, ``sample_prompts`` (fixed prompts of the sample grids), ``prompt_sampler`` and
  ``build_reward`` (the reward factory honouring ``model.smoke``).

**The generator's input path.** :attr:`T2IBundle.path` (what the trainer uses to renoise the generator input and
to convert its output to x̂0) is the denoiser's path, except that renoising at (or above) the first grid time
returns the noise itself: the rollout feeds pure noise at ``t_0``, and so must the generator update. For flow
matching ``t_0 = 1`` and nothing changes; for SDXL's one-step grid ``[0.399, 0]`` this is the DMD2/DMDR
convention "timestep 399 on a pure-noise input" (method.md §2.13, §5.2 item 11).

**Smoke mode** (``model.smoke: true``, set by ``dmdr train --smoke``): random-weight stand-ins of the recipe's real
configuration (``model.config``; :func:`~dmdr.models.standins.standin_components`: the real classes and flags,
T5 with dropout 0.1, the factor-8 VAE, shrunk only in width and depth, byte-level tokenizers built in memory),
64×64 images, float32, the built-in :data:`SMOKE_PROMPTS` (unless ``data.prompts`` is an existing file) and tiny
random-init rewards: every reward term of a known learned reward has its kwargs replaced by
:func:`smoke_reward_kwargs` (``config: tiny, random_init: true``, paths dropped). The replacement is written into
the recipe the trainer holds (so ``DMDRTrainer.reward`` builds the tiny versions) and the same mapping is available
as ``bundle.extra["build_reward"]``. A placeholder ``generator.init`` starts the full generator from the teacher.

**The generator.** ``generator.lora`` set: a LoRA on the shared base (SD3/SD3.5, official). ``generator.lora: null``:
a second, full-weights float32 network loaded from ``generator.init`` (official SDXL: DMD2's ODE-pretrained 1-step
UNet); the base then carries only the critic LoRA. ``decode`` (what the rewards read) uses ``model.reward_vae``
(taesdxl) when set.

Bad input fails before any weights are loaded, with one line naming the field, in this order: ``generator.init``
with a LoRA generator, or neither a LoRA nor ``generator.init`` (outside smoke), ``data.dataset`` not ``prompts``, SD3 with ``model.t_min != 0.001``, a prompt file that is
missing/empty/unreadable, a missing ``model.path`` / ``generator.init`` / ``model.reward_vae``, an unknown reward name, a reward checkpoint/tokenizer path that
does not exist; LoRA targets that match no module fail when the adapters are injected.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdr.train.builder import FAMILY_BUILDERS, ModelBundle

SMOKE_RESOLUTION = 64
"""Image side of smoke runs: the stand-ins keep the real factor-8 VAE, so latents are C×8×8."""

SMOKE_PROMPTS = ("a red cube on a table", "a photo of a cat", "a watercolor of a lighthouse at dawn",
                 "an astronaut riding a horse", "a bowl of ramen, studio lighting", "a city street at night in rain",
                 "a portrait of an old fisherman", "a blue vase with sunflowers")

LEARNED_REWARDS = ("clip", "hpsv2", "srpo", "pickscore", "imagereward")
"""Rewards with a tiny random-init configuration (``config: tiny, random_init: true``)."""
_PATH_KWARGS = ("checkpoint", "tokenizer", "med_config")
_SMOKE_DROP = _PATH_KWARGS + ("config", "random_init", "dtype")
SD3_T_MIN = 0.001
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def smoke_reward_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs of a reward term in smoke mode: learned rewards become tiny and random (paths dropped,
    other options such as ``prefix`` or ``k`` kept); other rewards are unchanged.

    >>> smoke_reward_kwargs("hpsv2", {"checkpoint": "/x/HPS_v2.1_compressed.pt", "tokenizer": "/x/tok"})
    {'config': 'tiny', 'random_init': True}
    """
    if name not in LEARNED_REWARDS:
        return dict(kwargs)
    kept = {k: v for k, v in kwargs.items() if k not in _SMOKE_DROP}
    return {**kept, "config": "tiny", "random_init": True}


class FirstStepNoisePath:
    """A path whose ``renoise(x0, t, ε)`` returns ε where ``t >= t_first`` (see the module docstring).

    Everything else (``to_x0``, ``step``, ...) is the wrapped path's.
    """

    def __init__(self, path, t_first: float):
        self.path, self.t_first = path, float(t_first)

    def renoise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        out = self.path.renoise(x0, t, noise)
        t = torch.as_tensor(t, device=x0.device)
        first = (t >= self.t_first - 1e-6).reshape(-1, *([1] * (x0.ndim - 1))) if t.ndim else t >= self.t_first - 1e-6
        return torch.where(first, noise.to(out.dtype), out)

    def __getattr__(self, name: str):
        return getattr(self.path, name)

    def __repr__(self) -> str:
        return f"FirstStepNoisePath({self.path!r}, t_first={self.t_first})"


@dataclass
class T2IBundle(ModelBundle):
    """A :class:`ModelBundle` whose :attr:`path` is the generator's input path (:class:`FirstStepNoisePath`)."""

    generator_path: Any = None

    @property
    def path(self):
        return self.generator_path if self.generator_path is not None else self.base.path


# ---- validation (cheap, before any weights are loaded) -------------------------------------------------------
def _lora_spec(lora):
    from dmdr.models.t2i import LoraSpec

    return LoraSpec(rank=lora.rank, alpha=lora.alpha, target_modules=tuple(lora.targets))


def _check_recipe(recipe) -> None:
    m, fam = recipe.model, recipe.model.family
    if recipe.generator.init is not None and recipe.generator.lora is not None:
        raise ValueError(f"generator.init={recipe.generator.init} needs generator.lora: null (a full-weights "
                         f"generator network; see recipes/sdxl-1step.yaml); a LoRA generator starts from the base")
    if recipe.generator.lora is None and recipe.generator.init is None and not m.smoke:
        raise ValueError(f"generator.lora is null and generator.init is not set: model.family={fam} needs either a "
                         f"generator LoRA on the shared base (official SD3: rank 64, alpha 128) or a full-weights "
                         f"generator with generator.init=/local/unet_state_dict.bin (official SDXL)")
    if recipe.data.dataset != "prompts":
        raise ValueError(f"data.dataset={recipe.data.dataset!r}: model.family={fam} trains on prompts; set "
                         f"data.dataset: prompts and data.prompts: /path/to/prompts.txt")
    if fam == "sd3" and abs(m.t_min - SD3_T_MIN) > 1e-12:
        raise ValueError(f"model.t_min={m.t_min}: SD3 uses x̂0 = x_t + (0.001 - t)·v (method.md §1); "
                         f"set model.t_min: 0.001")


def _prompt_list(recipe) -> list[str]:
    from dmdr.data.prompts import load_prompts

    path = recipe.data.prompts
    if recipe.model.smoke and (path is None or not Path(path).expanduser().exists()):
        return list(SMOKE_PROMPTS)
    if path is None:
        raise ValueError("data.prompts is not set: point it at a prompt file (.txt one per line, or .jsonl) with "
                         "--set data.prompts=/local/prompts.txt")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.prompts={path}: no such file; set --set data.prompts=/local/prompts.txt")
    if p.is_dir():
        raise ValueError(f"data.prompts={path} is a directory; pass a prompt file (.txt or .jsonl)")
    return load_prompts(p)


def _check_rewards(recipe) -> None:
    """Unknown reward names and missing reward files fail now, not when stage 2 starts hours later."""
    from dmdr.rewards import available_rewards

    known = available_rewards()
    for i, st in enumerate(getattr(recipe, "stages", [])):
        for j, term in enumerate(st.rewards):
            where = f"stages.{i}.rewards.{j}"
            if term.name not in known:
                raise ValueError(f"{where}.name={term.name!r}: unknown reward; registered rewards: {', '.join(known)}")
            if recipe.model.smoke:
                continue
            for key in _PATH_KWARGS:
                v = term.kwargs.get(key)
                if isinstance(v, str) and not Path(v).expanduser().exists():
                    raise FileNotFoundError(f"{where}.kwargs.{key}={v}: no such file or folder; set it with "
                                            f"--set {where}.kwargs.{key}=/local/path")


def _apply_smoke_rewards(recipe) -> None:
    for st in getattr(recipe, "stages", []):
        for term in st.rewards:
            term.kwargs = smoke_reward_kwargs(term.name, term.kwargs)
    rl = getattr(recipe, "rl", None)   # task: grpo
    for term in (rl.rewards if rl is not None else []):
        term.kwargs = smoke_reward_kwargs(term.name, term.kwargs)


# ---- the bundle -----------------------------------------------------------------------------------------------
def model_config_name(recipe) -> str:
    """The shipped real configuration of a T2I recipe: ``model.config``, else the family's default."""
    m = recipe.model
    name = m.config or ("sdxl-base" if m.family == "sdxl" else "sd3-medium")
    if (name == "sdxl-base") != (m.family == "sdxl"):
        raise ValueError(f"model.config={name} does not match model.family={m.family}; use "
                         f"{'sdxl-base' if m.family == 'sdxl' else 'sd3-medium or sd35-large'}")
    return name


def load_t2i_components(recipe, device: torch.device):
    """The family's :class:`~dmdr.models.t2i.T2IComponents`: random-weight stand-ins of the real configuration
    (``model.smoke``, :func:`dmdr.models.standins.standin_components`) or a local diffusers folder
    (``model.path``), plus the dtypes for :class:`SharedBaseT2I`."""
    m, fam = recipe.model, recipe.model.family
    if m.smoke:
        from dmdr.models.standins import standin_components

        name = model_config_name(recipe)
        kw = {"t_min": m.t_min} if fam == "sd3" else {}
        comps = standin_components(name, seed=recipe.seed, with_reward_vae=m.reward_vae is not None, **kw)
        if fam == "sd3":
            comps.encoder.max_sequence_length = min(m.max_sequence_length, comps.encoder.max_sequence_length)
        return comps, None, None
    dtype = DTYPES[m.dtype]
    if fam == "sd3":
        from dmdr.models.sd3 import load_sd3

        comps = load_sd3(m.path, dtype=dtype, max_sequence_length=m.max_sequence_length, t_min=m.t_min)
        return comps, dtype, None
    from dmdr.models.sdxl import load_sdxl

    # SDXL's VAE overflows in fp16 (NaNs): decode in float32 unless the base is bf16
    vae_dtype = torch.float32 if dtype == torch.float16 else None
    return load_sdxl(m.path, dtype=dtype), dtype, vae_dtype


def _reward_vae(recipe, comps):
    """The tiny reward VAE: the stand-in built with the components (smoke) or ``model.reward_vae`` (a local
    ``AutoencoderTiny`` folder, e.g. taesdxl)."""
    m = recipe.model
    if m.reward_vae is None:
        return None
    if m.smoke:
        return comps.info.get("reward_vae")
    from diffusers import AutoencoderTiny

    p = Path(m.reward_vae).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model.reward_vae={m.reward_vae}: no such local folder; point it at an "
                                f"AutoencoderTiny folder (e.g. taesdxl) or set model.reward_vae: null")
    return AutoencoderTiny.from_pretrained(p, local_files_only=True).eval()


def _full_generator(recipe, comps):
    """The full-weights generator (``generator.lora: null``): a second network of the family, initialised from
    ``generator.init`` (official SDXL: DMD2's ODE-pretrained 1-step UNet) or, without it, a copy of the teacher.
    It keeps float32 weights (its master weights; see :class:`SharedBaseT2I`)."""
    import copy

    from dmdr.models.t2i import load_network_weights

    gen = copy.deepcopy(comps.denoiser).float()
    init = recipe.generator.init
    if init is not None and not (recipe.model.smoke and not Path(init).expanduser().exists()):
        load_network_weights(gen.net, init, "generator.init")
    return gen.train().requires_grad_(True)


def _process_index() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def build_t2i_bundle(recipe, device: torch.device) -> T2IBundle:
    """``FAMILY_BUILDERS["sd3"]`` / ``["sdxl"]``: the :class:`T2IBundle` of a recipe (see the module docstring)."""
    from dmdr.data.prompts import PromptSampler
    from dmdr.models.t2i import SharedBaseT2I, check_local_model_dir, t2i_grid
    from dmdr.rewards import build_reward

    m = recipe.model
    _check_recipe(recipe)
    prompts = _prompt_list(recipe)
    if not m.smoke:
        check_local_model_dir(m.path, "model.path")
        for field, value in (("generator.init", recipe.generator.init), ("model.reward_vae", m.reward_vae)):
            if value is not None and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"{field}={value}: no such file or folder; set --set {field}=/local/path")
    _check_rewards(recipe)
    if m.smoke:
        _apply_smoke_rewards(recipe)
    comps, dtype, vae_dtype = load_t2i_components(recipe, device)
    full = recipe.generator.lora is None
    gen_net = _full_generator(recipe, comps) if full else None
    reward_vae = _reward_vae(recipe, comps)
    offload = m.offload_idle and device.type == "cuda"
    for part in (comps.denoiser,) if offload else (comps.denoiser, comps.vae, comps.encoder, reward_vae):
        if part is not None:
            part.to(device)
    if gen_net is not None:
        gen_net.to(device)
    try:
        shared = SharedBaseT2I.from_components(
            comps, generator_lora=None if full else _lora_spec(recipe.generator.lora),
            critic_lora=_lora_spec(recipe.critic.lora), dtype=dtype, vae_dtype=vae_dtype,
            offload_idle=offload, gradient_checkpointing=m.gradient_checkpointing,
            cache_size=256, cache_device="cpu", generator_network=gen_net, reward_vae=reward_vae,
            vae_gradient_checkpointing=m.vae_gradient_checkpointing)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        if "Target modules" in str(e) or "target_modules" in str(e):
            raise ValueError(f"generator.lora.targets / critic.lora.targets: {' '.join(str(e).split())[:200]}; use "
                             f"the family's module names (docs/models.md)") from None
        raise
    res = SMOKE_RESOLUTION if m.smoke else m.resolution
    sample_shape = shared.latent_shape(res, res)
    denoiser = shared.denoiser
    grid = t2i_grid(denoiser.path, recipe.generator.steps, recipe.generator.shift)
    sampler = PromptSampler(prompts, batch_size=1, seed=recipe.seed + 1_000_003 * _process_index())

    def sample_cond(B: int):
        sampler.batch_size = B  # batches are consecutive slices of the epoch's permutation, whatever their size
        batch = sampler.next_batch()
        cond = shared.encode(batch, height=res, width=res)
        return cond, shared.null_cond(cond), batch

    def make_reward(name: str, **kwargs):
        return build_reward(name, **(smoke_reward_kwargs(name, kwargs) if m.smoke else kwargs))

    n_sample = max(1, min(recipe.sample_classes, len(prompts)))
    return T2IBundle(
        base=denoiser, generator=shared.generator(), generator_module=gen_net.net if full else shared,
        generator_params=shared.generator_parameters(), critic_params=shared.critic_parameters(),
        sample_cond=sample_cond, decode=shared.decode_reward, sample_shape=sample_shape, generator_is_lora=not full,
        extra={"shared": shared, "family": m.family, "grid": grid, "resolution": res, "prompt_sampler": sampler,
               "sample_prompts": prompts[:n_sample], "build_reward": make_reward, "smoke": m.smoke},
        generator_path=FirstStepNoisePath(denoiser.path, float(grid[0])))


FAMILY_BUILDERS["sd3"] = build_t2i_bundle
FAMILY_BUILDERS["sdxl"] = build_t2i_bundle

__all__ = ["build_t2i_bundle", "load_t2i_components", "model_config_name", "T2IBundle", "FirstStepNoisePath", "smoke_reward_kwargs",
           "SMOKE_PROMPTS", "SMOKE_RESOLUTION", "LEARNED_REWARDS"]
