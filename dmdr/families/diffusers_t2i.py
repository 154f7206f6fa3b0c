"""The shared base of the diffusers text-to-image families (SD3/SD3.5, SDXL; FLUX, Z-Image, Wan build on it).

:class:`DiffusersT2IFamily` turns a recipe into a :class:`T2IBundle` over a
:class:`~dmdr.models.shared_base.SharedBaseT2I` (one frozen base with a ``generator`` and a ``critic`` LoRA adapter,
docs/models.md) and implements every :class:`~dmdr.families.base.Family` question once:

* **build**: ``base`` = the family denoiser (``SD3Denoiser`` / ``SDXLDenoiser`` / ...) carrying both adapters; the
  trainer's real/fake scores are ``AdapterView(base, "critic", λ)``; the generator is ``AdapterView(base,
  "generator", 1)`` or a second, full-weights network (``generator.lora: null`` + ``generator.init``, official SDXL);
* **conditions**: B prompts from a :class:`~dmdr.data.prompts.PromptSampler` over ``data.prompts``; returns the
  prompt embeddings (TensorDict, cached per prompt), the unconditional embeddings (the encoded empty prompt "", as
  the official code) and the prompt strings the rewards read;
* **grid**: :func:`~dmdr.models.t2i_sampling.t2i_grid` of the denoiser's path (:meth:`DiffusersT2IFamily.make_grid`);
* **decode**: :meth:`SharedBaseT2I.decode_reward` (``model.reward_vae``, e.g. taesdxl, when set), differentiable,
  images in [0, 1]; grids and files render with the full VAE;
* **sample**: :func:`~dmdr.models.t2i_sampling.sample_t2i` per (prompts, seed) batch of the inputs;
* **export**: the generator LoRA as a diffusers LoRA folder ``student_lora/`` (the family pipeline's
  ``load_lora_weights`` reads it) or the full-weights generator as ``student_<transformer|unet>/``;
* **memory**: :func:`dmdr.train.memory_estimate.estimate_t2i_memory` from the shipped real configuration.

**The generator's input path.** :attr:`T2IBundle.path` (what the trainer uses to renoise the generator input and
to convert its output to x̂0) is the denoiser's path, except that renoising at (or above) the first grid time
returns the noise itself (:class:`FirstStepNoisePath`): the rollout feeds pure noise at ``t_0``, and so must the
generator update. For flow matching ``t_0 = 1`` and nothing changes; for SDXL's one-step grid ``[0.399, 0]`` this is
the DMD2/DMDR convention "timestep 399 on a pure-noise input" (method.md §2.13, §5.2 item 11).

**Smoke mode** (``model.smoke: true``, set by ``dmdr train --smoke``): random-weight stand-ins of the recipe's real
configuration (``model.config``; :meth:`DiffusersT2IFamily.standin`: the real classes and flags, shrunk only in
width and depth, byte-level tokenizers built in memory), 64×64 images (:data:`SMOKE_RESOLUTION`), float32, the
built-in :data:`SMOKE_PROMPTS` (unless ``data.prompts`` is an existing file) and tiny random-init rewards: every
reward term of a known learned reward has its kwargs replaced by :func:`smoke_reward_kwargs` (``config: tiny,
random_init: true``, paths dropped). The replacement is written into the recipe the trainer holds, and
:meth:`DiffusersT2IFamily.reward` applies the same mapping to any other reward (monitors, ``dmdr eval``).

**A new diffusers family** subclasses :class:`DiffusersT2IFamily` and supplies: ``name``, ``config_names`` (its
shipped real configs, ``dmdr/models/configs/<name>.json``; the first is the default), :meth:`load_local` (the
components from a local diffusers folder) and, when the defaults do not fit, :meth:`standin` (random-weight
stand-ins), :meth:`check_model` (its recipe quirks), :meth:`make_grid`, :meth:`sample_shape`, :meth:`memory`,
and the :class:`~dmdr.families.base.Family` methods it answers differently (a video family: :meth:`decode` per frame,
:meth:`reward`, :meth:`save_samples` and ``sample_suffixes``). Its denoiser
(a :class:`~dmdr.models.t2i_components.DiffusersDenoiser` subclass) names its pipeline class
(``PIPELINE_CLASS``, used by the LoRA export) and its ``network_subfolder``.

Bad input fails before any weights are loaded, with one line naming the field, in this order: ``generator.init``
with a LoRA generator, or neither a LoRA nor ``generator.init`` (outside smoke), ``data.dataset`` not ``prompts``,
the family's own checks (SD3: ``model.t_min != 0.001``), a prompt file that is missing/empty/unreadable, a missing
``model.path`` / ``generator.init`` / ``model.reward_vae``, an unknown reward name, a reward checkpoint/tokenizer
path that does not exist; LoRA targets that match no module fail when the adapters are injected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from dmdr.families.base import Bundle, Conditions, Family, SampleInputs

SMOKE_RESOLUTION = 64
"""Image side of smoke runs: the stand-ins keep the real factor-8 VAE, so latents are C×8×8."""

SMOKE_PROMPTS = ("a red cube on a table", "a photo of a cat", "a watercolor of a lighthouse at dawn",
                 "an astronaut riding a horse", "a bowl of ramen, studio lighting", "a city street at night in rain",
                 "a portrait of an old fisherman", "a blue vase with sunflowers")

LEARNED_REWARDS = ("clip", "hpsv2", "srpo", "pickscore", "imagereward")
"""Rewards with a tiny random-init configuration (``config: tiny, random_init: true``)."""
_PATH_KWARGS = ("checkpoint", "tokenizer", "med_config")
_SMOKE_DROP = _PATH_KWARGS + ("config", "random_init", "dtype")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
USER_BATCH = 8
"""Prompts per sampling batch of ``dmdr sample`` (batch i starts from noise seed ``seed + i``)."""


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
class T2IBundle(Bundle):
    """A text-to-image :class:`Bundle`: the :class:`~dmdr.models.shared_base.SharedBaseT2I` (``shared``), the
    training prompt stream (``prompt_sampler``), the image side (``resolution``), the fixed prompts of the sample
    grids (``sample_prompts``) and whether the bundle holds smoke stand-ins (``smoke``)."""

    shared: Any = None
    prompt_sampler: Any = None
    resolution: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    smoke: bool = False


@dataclass
class PromptInputs(SampleInputs):
    """Fixed text-to-image inputs: ``batches`` of (prompts, noise seed); sample i of batch j starts from
    ``randn(seed_j)``'s row i (:func:`~dmdr.models.t2i_sampling.sample_t2i`)."""

    batches: list[tuple[list[str], int]] = field(default_factory=list)


@dataclass
class Components:
    """What :meth:`DiffusersT2IFamily.load_local` / :meth:`~DiffusersT2IFamily.standin` return: the components
    (``T2IComponents``) and the dtypes :class:`SharedBaseT2I` casts to (None: keep)."""

    components: Any
    dtype: torch.dtype | None = None
    vae_dtype: torch.dtype | None = None


class DiffusersT2IFamily(Family):
    """Base of the diffusers text-to-image families (see the module docstring for what a subclass supplies)."""

    conditioning = "prompts"
    config_names: ClassVar[tuple[str, ...]] = ()
    """The shipped real configurations this family accepts as ``model.config`` (the first is the default)."""

    # ---- hooks a family supplies ---------------------------------------------------------------------------------
    def load_local(self, recipe) -> Components:
        """The components from the local diffusers folder ``model.path`` in ``model.dtype``."""
        raise NotImplementedError(f"{type(self).__name__}.load_local")

    def standin(self, recipe) -> Components:
        """Random-weight stand-ins of ``model.config`` shrunk in width and depth (smoke runs, tests)."""
        from dmdr.models.standins import standin_components

        comps = standin_components(self.config_name(recipe), seed=recipe.seed,
                                   with_reward_vae=recipe.model.reward_vae is not None, **self.denoiser_kwargs(recipe))
        return Components(comps)

    def denoiser_kwargs(self, recipe) -> dict:
        """Keyword arguments of the family's denoiser adapter taken from the recipe (SD3: ``t_min``)."""
        return {}

    def check_model(self, recipe) -> None:
        """The family's own recipe checks (one line naming the field)."""

    def sample_shape(self, shared, recipe, resolution: int) -> tuple[int, ...]:
        """One sample in model space: (C, H/f, W/f) for images (a video family adds frames: (C, F, H/f, W/f))."""
        return shared.latent_shape(resolution, resolution)

    def make_grid(self, path, recipe) -> Tensor:
        """The few-step grid (N+1,) of the denoiser's ``path`` (SDXL one step: [0.399, 0])."""
        from dmdr.models.t2i_sampling import t2i_grid

        return t2i_grid(path, recipe.generator.steps, recipe.generator.shift)

    # ---- before any weights ------------------------------------------------------------------------------------
    def config_name(self, recipe) -> str:
        """The shipped real configuration of the recipe: ``model.config``, else the family's default."""
        m = recipe.model
        name = m.config or self.config_names[0]
        if name not in self.config_names:
            raise ValueError(f"model.config={name} does not match model.family={self.name}; use "
                             f"{' or '.join(self.config_names)}")
        return name

    def check(self, recipe) -> None:
        from dmdr.errors import UserError

        if getattr(getattr(recipe, "critic", None), "lora", True) is None:
            raise UserError(f"critic.lora: null (a full critic copy) is supported for the tiny digits family only, "
                            f"not model.family={self.name!r}; give critic.lora a rank/alpha/targets")
        m, fam = recipe.model, self.name
        if recipe.generator.init is not None and recipe.generator.lora is not None:
            raise ValueError(f"generator.init={recipe.generator.init} needs generator.lora: null (a full-weights "
                             f"generator network; see recipes/sdxl-1step.yaml); a LoRA generator starts from the base")
        if recipe.generator.lora is None and recipe.generator.init is None and not m.smoke:
            raise ValueError(f"generator.lora is null and generator.init is not set: model.family={fam} needs either "
                             f"a generator LoRA on the shared base (official SD3: rank 64, alpha 128) or a "
                             f"full-weights generator with generator.init=/local/unet_state_dict.bin (official SDXL)")
        if recipe.data.dataset != "prompts":
            raise ValueError(f"data.dataset={recipe.data.dataset!r}: model.family={fam} trains on prompts; set "
                             f"data.dataset: prompts and data.prompts: /path/to/prompts.txt")
        self.check_model(recipe)

    def smoke_overrides(self, recipe) -> list[str]:
        return ["model.smoke=true"]

    def memory(self, recipe):
        from dmdr.train.memory_estimate import estimate_t2i_memory

        return estimate_t2i_memory(recipe, self.config_name(recipe))

    # ---- the bundle ---------------------------------------------------------------------------------------------
    def components(self, recipe) -> Components:
        """:meth:`standin` in smoke mode, else :meth:`load_local`."""
        return self.standin(recipe) if recipe.model.smoke else self.load_local(recipe)

    def build(self, recipe, device: torch.device) -> T2IBundle:
        from dmdr.data.prompts import PromptSampler
        from dmdr.models.shared_base import SharedBaseT2I
        from dmdr.models.t2i_components import LoraSpec, check_local_model_dir

        m = recipe.model
        self.check(recipe)
        prompts = _prompt_list(recipe)
        if not m.smoke:
            check_local_model_dir(m.path, "model.path")
            for fld, value in (("generator.init", recipe.generator.init), ("model.reward_vae", m.reward_vae)):
                if value is not None and not Path(value).expanduser().exists():
                    raise FileNotFoundError(f"{fld}={value}: no such file or folder; set --set {fld}=/local/path")
        _check_rewards(recipe)
        if m.smoke:
            _apply_smoke_rewards(recipe)
        loaded = self.components(recipe)
        comps = loaded.components
        full = recipe.generator.lora is None
        gen_net = _full_generator(recipe, comps) if full else None
        reward_vae = _reward_vae(recipe, comps)
        offload = m.offload_idle and device.type == "cuda"
        for part in (comps.denoiser,) if offload else (comps.denoiser, comps.vae, comps.encoder, reward_vae):
            if part is not None:
                part.to(device)
        if gen_net is not None:
            gen_net.to(device)

        def spec(lora):
            return LoraSpec(rank=lora.rank, alpha=lora.alpha, target_modules=tuple(lora.targets))

        try:
            shared = SharedBaseT2I.from_components(
                comps, generator_lora=None if full else spec(recipe.generator.lora),
                critic_lora=spec(recipe.critic.lora), dtype=loaded.dtype, vae_dtype=loaded.vae_dtype,
                offload_idle=offload, gradient_checkpointing=m.gradient_checkpointing,
                cache_size=256, cache_device="cpu", generator_network=gen_net, reward_vae=reward_vae,
                vae_gradient_checkpointing=m.vae_gradient_checkpointing)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            if "Target modules" in str(e) or "target_modules" in str(e):
                raise ValueError(f"generator.lora.targets / critic.lora.targets: {' '.join(str(e).split())[:200]}; "
                                 f"use the family's module names (docs/models.md)") from None
            raise
        res = SMOKE_RESOLUTION if m.smoke else m.resolution
        sample_shape = self.sample_shape(shared, recipe, res)
        denoiser = shared.denoiser
        grid = self.make_grid(denoiser.path, recipe)
        sampler = PromptSampler(prompts, batch_size=1, seed=recipe.seed + 1_000_003 * _process_index())
        n_sample = max(1, min(recipe.sample_classes, len(prompts)))
        return T2IBundle(
            family=self, recipe=recipe, base=denoiser, generator=shared.generator(),
            generator_module=gen_net.net if full else shared, generator_params=shared.generator_parameters(),
            critic_params=shared.critic_parameters(), sample_shape=sample_shape,
            grid=grid.to(device=device, dtype=torch.float32), generator_is_lora=not full,
            generator_path=FirstStepNoisePath(denoiser.path, float(grid[0])), shared=shared, prompt_sampler=sampler,
            resolution=res, sample_prompts=prompts[:n_sample], smoke=m.smoke)

    # ---- conditions and decoding -------------------------------------------------------------------------------
    def conditions(self, bundle: T2IBundle, batch_size: int) -> Conditions:
        sampler, res = bundle.prompt_sampler, bundle.resolution
        sampler.batch_size = batch_size  # batches are consecutive slices of the epoch's permutation, whatever size
        batch = sampler.next_batch()
        cond = bundle.shared.encode(batch, height=res, width=res)
        return Conditions(cond, bundle.shared.null_cond(cond), batch)

    def decode(self, bundle: T2IBundle, x: Tensor) -> Tensor:
        return bundle.shared.decode_reward(x)

    def render(self, bundle: T2IBundle, x: Tensor) -> Tensor:
        """The full VAE, :data:`USER_BATCH` latents at a time (a 1024 px decode holds GiBs of activations)."""
        return torch.cat([bundle.shared.decode(x[i:i + USER_BATCH]) for i in range(0, x.shape[0], USER_BATCH)])

    def reward(self, bundle: T2IBundle, name: str, kwargs: dict):
        from dmdr.rewards import build_reward

        return build_reward(name, **(smoke_reward_kwargs(name, kwargs) if bundle.smoke else kwargs))

    # ---- sampling ----------------------------------------------------------------------------------------------
    def sample_inputs(self, bundle: T2IBundle, purpose: str, *, n: int | None = None, seed: int | None = None,
                      prompts: list[str] | None = None, labels=None, repeats: int = 1) -> PromptInputs:
        if labels is not None:
            raise ValueError(f"model.family={self.name} is conditioned on prompts, not class labels")
        if purpose == "grid":
            batches = [(list(bundle.sample_prompts), 1234)]
        elif purpose == "monitor":
            ps = list(prompts) if prompts else list(bundle.sample_prompts)
            batches = [(ps, 9000 + s) for s in range(repeats)]
        elif purpose == "eval":
            batches = [(list(prompts), int(seed or 0))]
        elif purpose == "user":
            ps, s0 = list(prompts), int(seed or 0)
            batches = [(ps[i:i + USER_BATCH], s0 + i) for i in range(0, len(ps), USER_BATCH)]
        else:
            raise ValueError(f"text-to-image sample inputs: unknown purpose {purpose!r} (grid, monitor, eval, user)")
        cond = [p for ps, _ in batches for p in ps]
        if purpose == "monitor":
            groups = torch.arange(len(batches[0][0])).repeat(len(batches))
        else:
            groups = torch.arange(len(cond))
        return PromptInputs(reward_cond=cond, groups=groups, batches=batches)

    @torch.no_grad()
    def sample(self, bundle: T2IBundle, inputs: PromptInputs, *, steps: int | None = None) -> Tensor:
        from dmdr.models.t2i_sampling import sample_t2i

        g, res = bundle.recipe.generator, bundle.resolution
        bundle.generator_module.eval()
        return torch.cat([sample_t2i(bundle.shared, None, ps, steps=steps or g.steps, shift=g.shift, height=res,
                                     width=res, seed=seed, mode=g.backward_sim, return_latents=True)
                          for ps, seed in inputs.batches])

    @torch.no_grad()
    def sample_teacher(self, bundle: T2IBundle, inputs: PromptInputs, *, steps: int, cfg: float = 1.0) -> Tensor:
        """The frozen base, ``steps`` Euler (flow matching) / DDIM (ε) steps on the family grid with the recipe's
        shift and CFG ``cfg``, from the same noise :meth:`sample` draws for the same batch. Latents."""
        from dmdr.samplers import sample_euler

        shared, res, shift = bundle.shared, bundle.resolution, bundle.recipe.generator.shift
        out = []
        for ps, seed in inputs.batches:
            cond = shared.encode(ps, height=res, width=res)
            C, h, w = shared.latent_shape(res, res)
            p = next(shared.denoiser.net.parameters())
            noise = torch.randn(len(ps), C, h, w, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
            teacher = shared.teacher()
            grid = self._teacher_grid(teacher.path, steps, shift)
            out.append(sample_euler(teacher, noise, grid, cond, uncond=shared.null_cond(cond) if cfg > 1 else None,
                                    cfg=cfg))
        return torch.cat(out)

    def _teacher_grid(self, path, steps: int, shift: float) -> Tensor:
        from dmdr.models.t2i_sampling import t2i_grid

        return t2i_grid(path, steps, shift)

    def save_samples(self, bundle: T2IBundle, images: Tensor, inputs: PromptInputs, path: Path) -> Path:
        from dmdr.eval.grid import save_grid

        return save_grid(images, path, nrow=min(4, images.shape[0]), scale=max(1, 64 // bundle.resolution))

    # ---- export and resume -------------------------------------------------------------------------------------
    def export(self, bundle: T2IBundle, path: Path, *, state: dict[str, Tensor] | None = None,
               global_step: int = 0) -> Path | None:
        """The generator (``state`` swapped in for the export, then the live weights restored) as
        ``path.parent/student_lora/`` (LoRA) or ``path.parent/student_<network>/`` (full weights)."""
        from dmdr.models.t2i_export import export_generator

        live = {k: v.clone() for k, v in bundle.generator_state().items()} if state is not None else None
        if state is not None:
            bundle.load_generator_state(state)
        try:
            return export_generator(bundle.shared, Path(path).parent)
        finally:
            if live is not None:
                bundle.load_generator_state(live)

    def data_state(self, bundle: T2IBundle) -> dict:
        return bundle.prompt_sampler.state_dict()

    def load_data_state(self, bundle: T2IBundle, state: dict) -> None:
        bundle.prompt_sampler.load_state_dict(state)


# ---- validation and loading helpers (cheap, before any weights are loaded) -------------------------------------
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


def _reward_vae(recipe, comps):
    """The tiny reward VAE: the stand-in built with the components (smoke) or ``model.reward_vae`` (a local
    ``AutoencoderTiny`` folder, e.g. taesdxl)."""
    m = recipe.model
    if m.reward_vae is None:
        return None
    if m.smoke:
        return comps.info.get("reward_vae")
    from dmdr.models.t2i_components import load_tiny_autoencoder

    return load_tiny_autoencoder(m.reward_vae, "model.reward_vae")


def _full_generator(recipe, comps):
    """The full-weights generator (``generator.lora: null``): a second network of the family, initialised from
    ``generator.init`` (official SDXL: DMD2's ODE-pretrained 1-step UNet) or, without it, a copy of the teacher.
    It keeps float32 weights (its master weights; see :class:`SharedBaseT2I`)."""
    from dmdr.models.t2i_components import load_network_weights

    gen = copy.deepcopy(comps.denoiser).float()
    init = recipe.generator.init
    if init is not None and not (recipe.model.smoke and not Path(init).expanduser().exists()):
        load_network_weights(gen.net, init, "generator.init")
    return gen.train().requires_grad_(True)


def _process_index() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


__all__ = ["DiffusersT2IFamily", "T2IBundle", "PromptInputs", "Components", "FirstStepNoisePath",
           "smoke_reward_kwargs", "SMOKE_PROMPTS", "SMOKE_RESOLUTION", "LEARNED_REWARDS", "DTYPES"]
