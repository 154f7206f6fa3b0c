"""Shared text-to-image pieces: one frozen base with two LoRA adapters, prompt-embedding cache, VAE decoding,
few-step sampling, and export to diffusers.

**Memory layout** (method.md §1, §2.6; STYLE.md anti-pattern "two or three full copies of the backbone").
The official code keeps a generator (teacher + LoRA) and a *deep copy* of the teacher with the critic LoRA.
:class:`SharedBaseT2I` keeps ONE frozen base network with two peft LoRA adapters and selects one per call
(:func:`dmdr.models.lora.adapter_scope`)::

    generator  G   = base + 1   · Δ_generator        (trainable: generator_parameters())
    fake score     = base + λ_f · Δ_critic           (trainable: critic_parameters())
    real score     = base + λ_r · Δ_critic           (DynaDG; λ_r(k) → 0 gives the pure teacher)

Both adapters start with ``lora_B = 0``, so G = teacher and fake = real = teacher at step 0. The VAE and the
text encoders are frozen; prompt embeddings are cached per prompt (:class:`PromptEmbeddingCache`); with
``offload_idle=True`` the text encoders (and the VAE after a no-grad decode) go back to the CPU after use.

**Conditioning** is a :class:`tensordict.TensorDict` with batch size (B,): ``prompt_embeds`` (B,L,D),
``pooled_prompt_embeds`` (B,P) and, for SDXL, ``time_ids`` (B,6).

**Sampling** (:func:`sample_t2i`) uses dmdr's own few-step grid (:func:`t2i_grid`) and rollout
(:func:`dmdr.samplers.few_step_rollout`), not a diffusers scheduler: the diffusers grids differ from the training
grid (method.md §2.13).

**Export**: :func:`export_lora_diffusers` writes the generator LoRA as ``pytorch_lora_weights.safetensors``, which
``StableDiffusion3Pipeline.load_lora_weights`` / ``StableDiffusionXLPipeline.load_lora_weights`` accept;
:func:`export_full_model` writes the merged network as a diffusers model folder.

Only :mod:`dmdr.models` adapter files import diffusers; the core sees these models through the contract.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr import keys as K
from dmdr.models.lora import AdapterView, add_lora, lora_parameters, lora_state_dict, set_trainable
from dmdr.paths import DDPMEps, FlowMatching
from dmdr.rewards.tokenizers import bytes_to_unicode

# ---- conditioning keys (TensorDict) ------------------------------------------------------------------------
PROMPT_EMBEDS = "prompt_embeds"                # (B, L, D) token embeddings fed to cross/joint attention
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"  # (B, P) pooled text embedding
TIME_IDS = "time_ids"                          # (B, 6) SDXL micro-conditioning (h, w, top, left, h, w)


class DiffusersDenoiser(nn.Module):
    """Base of the diffusers adapters: holds the network ``net`` and the ``path``, and caches the unconditional
    (empty-prompt) embeddings that ``null_cond`` expands for CFG."""

    def __init__(self, net: nn.Module, path):
        super().__init__()
        self.net = net
        self.path = path
        self.register_buffer("_null_prompt_embeds", None, persistent=False)
        self.register_buffer("_null_pooled", None, persistent=False)

    @property
    def in_channels(self) -> int:
        """Latent channels of the wrapped network."""
        return int(self.net.config.in_channels)

    def _forward_inputs(self, x_t: Tensor, t: Tensor, cond: TensorDict) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        """(prompt_embeds (B,L,D), pooled (B,P), t (B,), network dtype); missing keys are named errors."""
        fn = type(self).__name__
        pe = K.require(cond, PROMPT_EMBEDS, fn=fn, field="prompt_embeds")
        pooled = K.require(cond, POOLED_PROMPT_EMBEDS, fn=fn, field="pooled_prompt_embeds")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return pe, pooled, t, next(self.net.parameters()).dtype

    def set_null_embeddings(self, null: TensorDict) -> None:
        """Cache the unconditional embeddings (batch 1, e.g. ``encoder([""])``) used by ``null_cond``."""
        self._null_prompt_embeds = null[PROMPT_EMBEDS][:1].detach().clone()
        self._null_pooled = null[POOLED_PROMPT_EMBEDS][:1].detach().clone()

    def _null_batch(self, cond: TensorDict) -> dict:
        """``{prompt_embeds (B,L,D), pooled_prompt_embeds (B,P)}`` of the cached null embeddings, B = cond's batch."""
        if self._null_prompt_embeds is None:
            raise RuntimeError(f"{type(self).__name__}.null_cond: no unconditional embeddings cached; call "
                               "set_null_embeddings(...) first (SharedBaseT2I does this)")
        B = cond.batch_size[0]
        return {PROMPT_EMBEDS: self._null_prompt_embeds.expand(B, -1, -1),
                POOLED_PROMPT_EMBEDS: self._null_pooled.expand(B, -1)}

GENERATOR = "generator"
CRITIC = "critic"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA adapter: rank, alpha (scaling α/r), the target module names and peft's init."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    init: str | bool = "gaussian"


# ---- prompt embeddings --------------------------------------------------------------------------------------
class PromptEmbeddingCache:
    """LRU cache of text embeddings, one entry per (prompt, extra) key.

    A batch is looked up prompt by prompt; only the missing prompts are encoded, in one call, and the rows are
    stacked back in order. Entries are stored on ``device`` (default: where they were computed; ``"cpu"`` keeps GPU
    memory free). ``max_entries=0`` disables caching.

    >>> cache = PromptEmbeddingCache(max_entries=2)
    >>> td = cache.lookup(["a", "b"], lambda ps: TensorDict({"e": torch.ones(len(ps), 3)}, batch_size=[len(ps)]))
    >>> td.batch_size, len(cache), cache.misses
    (torch.Size([2]), 2, 2)
    """

    def __init__(self, max_entries: int = 512, device: torch.device | str | None = None):
        self.max_entries = int(max_entries)
        self.device = device
        self._store: OrderedDict[Any, TensorDict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Any) -> bool:
        return key in self._store

    def clear(self) -> None:
        self._store.clear()

    def lookup(self, prompts: Sequence[str], encode: Callable[[list[str]], TensorDict], *, extra: Any = None,
               device: torch.device | str | None = None) -> TensorDict:
        """Embeddings of ``prompts`` as one TensorDict (batch len(prompts)), encoding the missing ones."""
        prompts = list(prompts)
        keys = [(p, extra) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        fresh: dict[Any, TensorDict] = {}
        if missing:
            td = encode([k[0] for k in missing])
            for i, k in enumerate(missing):
                row = td[i].clone()
                fresh[k] = row.to(self.device) if self.device is not None else row
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = []
        for k in keys:
            row = fresh.get(k)
            if row is None:
                row = self._store[k]
                self._store.move_to_end(k)
            rows.append(row)
        if self.max_entries > 0:
            for k, row in fresh.items():
                self._store[k] = row
                self._store.move_to_end(k)
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)
        out = torch.stack(rows, 0)
        return out.to(device) if device is not None else out


class TextEncoderStack(nn.Module):
    """Base class of the per-family text encoders: ``forward(prompts) -> TensorDict`` of embeddings, (B,).

    Subclasses implement :meth:`forward`, :meth:`null` (the unconditional embeddings, batch 1) and may add
    size conditioning in :meth:`size_cond` (SDXL ``time_ids``). All parameters are frozen.
    """

    def forward(self, prompts: Sequence[str]) -> TensorDict:  # pragma: no cover - abstract
        raise NotImplementedError

    def null(self, negative_prompt: str = "") -> TensorDict:
        """Unconditional embeddings (batch 1): the encoded ``negative_prompt`` (default ``""``)."""
        return self([negative_prompt])

    def size_cond(self, td: TensorDict, height: int, width: int) -> TensorDict:
        """Add resolution conditioning to ``td`` (no-op unless the family needs it)."""
        return td

    def pipeline_components(self) -> dict:
        """The text encoders and tokenizers as diffusers pipeline keyword arguments."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


@dataclass
class T2IComponents:
    """What a text-to-image family provides: the contract-satisfying denoiser, the VAE and the text encoders.

    Built by ``build_tiny_sd3`` / ``load_sd3`` (:mod:`dmdr.models.sd3`) and the SDXL equivalents.
    """

    family: str
    denoiser: nn.Module
    vae: nn.Module
    encoder: TextEncoderStack
    info: dict = field(default_factory=dict)

    def pipeline(self, network: nn.Module | None = None):
        """A diffusers pipeline (``StableDiffusion3Pipeline`` / ``StableDiffusionXLPipeline``) over these components.

        ``network`` replaces the denoiser's network (e.g. a clean copy of the base for a LoRA round trip).
        """
        return self.denoiser.make_pipeline(self.vae, self.encoder, network=network)


# ---- VAE ----------------------------------------------------------------------------------------------------
def vae_scale_factor(vae: nn.Module) -> int:
    """Pixel size of one latent cell: ``2 ** (len(block_out_channels) - 1)`` (8 for the SD3/SDXL VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Differentiable decode of model latents to images in [0, 1], float32 (ReFL rewards read this).

    ``img = clamp(VAE.decode(z / scaling_factor + shift_factor) / 2 + 1/2, 0, 1)`` (the official code's
    ``postprocess(decode(x̂0 / sf + shift), "pt")``, method.md §2.10); SDXL's VAE has no shift factor.
    Shapes: latents (B, C, h, w) → images (B, 3, h·f, w·f) with f = :func:`vae_scale_factor`.
    """
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    z = latents / cfg.scaling_factor + shift
    param = next(vae.parameters())
    image = vae.decode(z.to(device=param.device, dtype=param.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def encode_images(vae: nn.Module, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Images in [0, 1] → model latents ``(z - shift_factor) · scaling_factor`` (a posterior sample)."""
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    dist = vae.encode((images * 2 - 1).to(device=param.device, dtype=param.dtype)).latent_dist
    return (dist.sample(generator) - shift) * cfg.scaling_factor


# ---- activation checkpointing that remembers the active adapter ----------------------------------------------
def _lora_state(module: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [(m, list(m.active_adapters), dict(m.scaling)) for m in module.modules() if isinstance(m, LoraLayer)]


def _apply_lora_state(state: list) -> None:
    for layer, active, scaling in state:
        layer._active_adapter = active
        layer.scaling.update(scaling)


def adapter_aware_checkpoint(function: Callable, *args):
    """Non-reentrant activation checkpoint that recomputes with the LoRA selection active at forward time.

    :func:`dmdr.models.lora.adapter_scope` selects an adapter only for the duration of a call, but checkpointed
    blocks are recomputed during ``backward()``, after the scope has exited: with diffusers' default checkpoint
    function the recomputation would run a different network (no adapter) and fail (or, worse, give wrong
    gradients). This function snapshots the active adapters and scalings of the LoRA layers inside ``function``
    (a diffusers block) at forward time and re-applies them around the recomputation.
    Pass it as ``net.enable_gradient_checkpointing(adapter_aware_checkpoint)``.
    """
    import torch.utils.checkpoint

    state = _lora_state(function) if isinstance(function, nn.Module) else []

    def run(*a):
        if not state:
            return function(*a)
        now = [(layer, list(layer.active_adapters), dict(layer.scaling)) for layer, _, _ in state]
        _apply_lora_state(state)
        try:
            return function(*a)
        finally:
            _apply_lora_state(now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


# ---- the shared-base layout ---------------------------------------------------------------------------------
class SharedBaseT2I(nn.Module):
    """One frozen text-to-image base with a ``generator`` and a ``critic`` LoRA adapter (see the module docstring).

    Args:
        denoiser: an :class:`~dmdr.models.sd3.SD3Denoiser` or :class:`~dmdr.models.sdxl.SDXLDenoiser` (its
            ``net`` is the base that receives the adapters).
        vae, encoder: the family's VAE and :class:`TextEncoderStack`; both frozen.
        generator_lora, critic_lora: adapter specs (defaults: the family's ``DEFAULT_GENERATOR_LORA`` /
            ``DEFAULT_CRITIC_LORA``, the official r64/α128 and r32/α32).
        dtype: cast the base and the text encoders to this dtype (e.g. ``torch.bfloat16``); ``vae_dtype``
            likewise for the VAE (default: ``dtype``).
        adapter_dtype: dtype of the LoRA parameters (float32 by default, as in diffusers' training scripts).
        offload_idle: move the text encoders (and the VAE after a no-grad decode) to the CPU when idle.
        cache_size: entries of the prompt-embedding cache (0 disables it); ``cache_device`` where they live (CPU by
            default: with a large prompt file almost no entry is hit again, so they must not hold GPU memory; a hit
            costs one host-to-device copy of (L, D) values).
        gradient_checkpointing: enable activation checkpointing in the base network.
        negative_prompt: the prompt whose embeddings are the unconditional branch (``null_cond``).
        generator_network: a second denoiser (same family) that *is* the generator, fully trainable (the official
            SDXL set-up: DMD2's ODE-pretrained 1-step UNet, full fine-tune); then no generator adapter is injected
            and the base carries only the critic adapter. Its dtype is kept (float32 master weights: an AdamW
            step of lr 5e-8 is below bf16's resolution).
        reward_vae: a VAE used only by :meth:`decode_reward` (e.g. taesdxl, ``AutoencoderTiny``).
        vae_gradient_checkpointing: activation checkpointing in the VAE(s): a differentiable 1024 px decode keeps
            about 11 GiB of activations per image in bf16 without it.

    Trainable sets are explicit: exactly the two adapters' LoRA matrices (with ``generator_network``: its weights
    and the critic adapter) have ``requires_grad=True``; the generator optimiser takes
    :meth:`generator_parameters`, the critic optimiser :meth:`critic_parameters`.
    Nothing here calls peft's ``set_adapter``, so switching views never changes ``requires_grad``.
    """

    def __init__(self, denoiser: nn.Module, vae: nn.Module, encoder: TextEncoderStack, *,
                 generator_lora: LoraSpec | None = None, critic_lora: LoraSpec | None = None,
                 dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                 adapter_dtype: torch.dtype | None = torch.float32, offload_idle: bool = False,
                 cache_size: int = 512, cache_device: torch.device | str | None = "cpu",
                 gradient_checkpointing: bool = False, negative_prompt: str = "",
                 generator_network: nn.Module | None = None, reward_vae: nn.Module | None = None,
                 vae_gradient_checkpointing: bool = False):
        super().__init__()
        self.denoiser, self.vae, self.encoder = denoiser, vae, encoder
        self.generator_denoiser = generator_network  # full-weights generator (a second network) or None (LoRA)
        self.reward_vae = reward_vae
        self.family = getattr(denoiser, "family", "t2i")
        self.offload_idle = offload_idle
        self.negative_prompt = negative_prompt
        self.requires_grad_(False)
        if dtype is not None:
            denoiser.net.to(dtype)
            encoder.to(dtype)
            vae.to(vae_dtype or dtype)
        elif vae_dtype is not None:
            vae.to(vae_dtype)
        if reward_vae is not None:
            reward_vae.requires_grad_(False)
            if dtype is not None or vae_dtype is not None:
                reward_vae.to(vae_dtype or dtype)
        self.generator_lora = None if generator_network is not None else \
            (generator_lora or denoiser.DEFAULT_GENERATOR_LORA)
        self.critic_lora = critic_lora or denoiser.DEFAULT_CRITIC_LORA
        adapters = ((GENERATOR, self.generator_lora), (CRITIC, self.critic_lora))
        for name, spec in (a for a in adapters if a[1] is not None):
            with warnings.catch_warnings():  # peft warns that a second adapter is "multiple adapters": intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                add_lora(denoiser.net, name, rank=spec.rank, alpha=spec.alpha,
                         target_modules=list(spec.target_modules), init=spec.init)
            if adapter_dtype is not None:
                for p in lora_parameters(denoiser.net, name):
                    p.data = p.data.to(adapter_dtype)
        set_trainable(self, self.generator_parameters() + self.critic_parameters())
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
        if vae_gradient_checkpointing:
            for v in (vae, reward_vae):
                if v is not None:
                    v.enable_gradient_checkpointing()
        self.cache = PromptEmbeddingCache(cache_size, device=cache_device)
        with torch.no_grad(), self._on_device(self.encoder):
            null = self.encoder.null(negative_prompt)
        denoiser.set_null_embeddings(null)
        if generator_network is not None:
            generator_network.set_null_embeddings(null)
        if offload_idle:
            self.encoder.to("cpu")

    def train(self, mode: bool = True) -> "SharedBaseT2I":
        """Train/eval mode for the denoiser only: the text encoders and the VAE(s) stay in eval mode for the whole
        run. (T5-v1.1-XXL has dropout 0.1: in train mode every prompt would get random embeddings, and the prompt
        cache would keep them. The official code calls ``.train()`` on the network alone.)"""
        super().train(mode)
        self.encoder.eval()
        self.vae.eval()
        if getattr(self, "reward_vae", None) is not None:
            self.reward_vae.eval()
        return self

    @classmethod
    def from_components(cls, components: T2IComponents, **kwargs) -> "SharedBaseT2I":
        return cls(components.denoiser, components.vae, components.encoder, **kwargs)

    # -- trainable sets and views ------------------------------------------------------------------------------
    @property
    def full_generator(self) -> bool:
        """True when the generator is a second, full-weights network (``generator_network``), not a LoRA."""
        return self.generator_denoiser is not None

    def generator_parameters(self) -> list[nn.Parameter]:
        """The generator optimiser's parameters: the adapter's LoRA matrices, or every weight of the full-weights
        generator network."""
        if self.full_generator:
            return list(self.generator_denoiser.net.parameters())
        return lora_parameters(self.denoiser.net, GENERATOR)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic adapter's LoRA matrices (the critic optimiser's parameters)."""
        return lora_parameters(self.denoiser.net, CRITIC)

    def generator(self):
        """G = base + Δ_generator (scale 1), or the full-weights generator network."""
        if self.full_generator:
            return self.generator_denoiser
        return AdapterView(self.denoiser, GENERATOR, 1.0)

    def fake_score(self, scale: float = 2.0) -> AdapterView:
        """Fake score = base + λ_f Δ_critic (λ_f = 2 in the official scripts)."""
        return AdapterView(self.denoiser, CRITIC, scale)

    def real_score(self, scale: float = 0.0) -> AdapterView:
        """Real score = base + λ_r Δ_critic (DynaDG, :func:`dmdr.schedules.dynadg_scale`); 0 = the teacher."""
        return AdapterView(self.denoiser, CRITIC, scale)

    def teacher(self) -> AdapterView:
        """The frozen base alone (no adapter)."""
        return AdapterView(self.denoiser, None, 0.0)

    @property
    def path(self):
        return self.denoiser.path

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.net.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the base, adapter-aware (:func:`adapter_aware_checkpoint`)."""
        self.denoiser.net.enable_gradient_checkpointing(adapter_aware_checkpoint)
        if self.full_generator:
            self.generator_denoiser.net.enable_gradient_checkpointing(adapter_aware_checkpoint)

    def trainable_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{"generator": {...}, "critic": {...}}``: the only weights a checkpoint needs besides the base."""
        gen = self.generator_denoiser.net.state_dict() if self.full_generator else \
            lora_state_dict(self.denoiser.net, GENERATOR)
        return {GENERATOR: {k: v.clone() for k, v in gen.items()},
                CRITIC: {k: v.clone() for k, v in lora_state_dict(self.denoiser.net, CRITIC).items()}}

    def load_trainable_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        params = dict(self.denoiser.net.named_parameters())
        if self.full_generator:
            self.generator_denoiser.net.load_state_dict(state[GENERATOR], strict=True)
        for adapter in (CRITIC,) if self.full_generator else (GENERATOR, CRITIC):
            mine = lora_state_dict(self.denoiser.net, adapter)
            theirs = state[adapter]
            if set(mine) != set(theirs):
                raise ValueError(f"adapter {adapter!r}: checkpoint keys do not match this model's LoRA layers "
                                 f"({len(theirs)} vs {len(mine)} tensors)")
            with torch.no_grad():
                for k, v in theirs.items():
                    params[k].copy_(v)

    # -- conditioning -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self, module: nn.Module, keep: bool = False) -> Iterator[None]:
        if not self.offload_idle:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            if not keep:
                module.to("cpu")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None) -> TensorDict:
        """Conditioning TensorDict for ``prompts`` (cached per prompt), on the base's device and dtype.

        ``height``/``width`` (pixels) are needed by SDXL's ``time_ids``; SD3 ignores them.
        """
        def _encode(ps: list[str]) -> TensorDict:
            with self._on_device(self.encoder):
                return self.encoder(ps)

        td = self.cache.lookup(prompts, _encode, device=self.device)
        if height is not None and width is not None:
            td = self.encoder.size_cond(td, height, width)
        return td

    def null_cond(self, cond: TensorDict) -> TensorDict:
        return self.denoiser.null_cond(cond)

    def decode(self, latents: Tensor) -> Tensor:
        """:func:`decode_latents` with the VAE; offloaded afterwards only when no gradient is being recorded."""
        keep = torch.is_grad_enabled() and latents.requires_grad
        with self._on_device(self.vae, keep=keep):
            return decode_latents(self.vae, latents)

    def decode_reward(self, latents: Tensor) -> Tensor:
        """Differentiable decode for the rewards: the tiny reward VAE (``reward_vae``, e.g. taesdxl, as the official
        SDXL script) when set, else :meth:`decode`. Images (B, 3, H, W) in [0, 1]."""
        if self.reward_vae is None:
            return self.decode(latents)
        keep = torch.is_grad_enabled() and latents.requires_grad
        with self._on_device(self.reward_vae, keep=keep):
            return decode_latents(self.reward_vae, latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the VAE factor {f}, got {height}x{width}")
        return self.denoiser.in_channels, height // f, width // f


# ---- sampling -----------------------------------------------------------------------------------------------
SDXL_ONE_STEP_INDEX = 399


def t2i_grid(path, steps: int, shift: float = 1.0) -> Tensor:
    """The few-step grid (N+1,) used in training and sampling, for either parameterisation.

    * Flow matching (SD3): :func:`dmdr.schedules.few_step_grid` with ``t_min = path.t_min`` (method.md §2.1).
    * DDPM-ε (SDXL): ``N = 1`` → ``[0.399, 0]`` (timestep 399 on pure noise, the DMD2/DMDR convention);
      ``N > 1`` → ``t̃ = linspace(0.999, 0, N+1)``, shifted as above and rounded to integer timesteps
      (the official ``noise2x0_sampler``; it applies the shift on the 0..999 scale, dmdr on t̃ ∈ [0, 1], which is
      the same for the official shift 1).
    """
    from dmdr.schedules import few_step_grid

    if isinstance(path, FlowMatching):
        return few_step_grid(steps, shift, path.t_min)
    if isinstance(path, DDPMEps):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        T = path.num_train_timesteps
        if steps == 1:
            return torch.tensor([SDXL_ONE_STEP_INDEX / T, 0.0], dtype=torch.float64)
        base = torch.linspace((T - 1) / T, 0.0, steps + 1, dtype=torch.float64)
        grid = shift * base / (1 + (shift - 1) * base)
        return torch.round(grid * T) / T
    raise TypeError(f"no few-step grid for path {type(path).__name__}")


@torch.no_grad()
def sample_t2i(shared_or_denoiser: Any, vae: nn.Module | None, prompts: Sequence[str] | TensorDict, *, steps: int,
               shift: float = 1.0, height: int, width: int, seed: int = 0, mode: str = "ode",
               encoder: TextEncoderStack | None = None, return_latents: bool = False) -> Tensor:
    """Few-step text-to-image sampling with the training grid, then VAE decode: images (B, 3, H, W) in [0, 1].

    ``x_0 ~ N(0, I)`` in float32 (CPU generator seeded with ``seed``, so the noise is device independent), then
    :func:`dmdr.samplers.few_step_rollout` on :func:`t2i_grid` (``mode="ode"``: Euler/DDIM steps; ``"sde"``:
    renoise x̂0 with fresh noise, the official SDXL multi-step sampler); the last step returns x̂0. No CFG
    (DMDR students are sampled without guidance, method.md §2.13).

    Args:
        shared_or_denoiser: a :class:`SharedBaseT2I` (samples its generator view, with its own VAE and encoder)
            or any denoiser following the contract (then pass ``vae`` and ``encoder``, or a conditioning
            TensorDict as ``prompts``).
        vae: the VAE (ignored/optional for a :class:`SharedBaseT2I`).
        prompts: a list of B prompts, or a precomputed conditioning TensorDict with batch (B,).
    """
    from dmdr.samplers import few_step_rollout

    if isinstance(shared_or_denoiser, SharedBaseT2I):
        shared = shared_or_denoiser
        model = shared.generator()
        vae = vae if vae is not None else shared.vae
        C, h, w = shared.latent_shape(height, width)
        cond = prompts if isinstance(prompts, TensorDict) else shared.encode(prompts, height=height, width=width)
        device, dtype = shared.device, next(shared.denoiser.net.parameters()).dtype
    else:
        model = shared_or_denoiser
        if vae is None:
            raise ValueError("sample_t2i needs a VAE when given a bare denoiser")
        f = vae_scale_factor(vae)
        inner = getattr(model, "base", model)  # an AdapterView wraps the adapter denoiser
        C, h, w = inner.in_channels, height // f, width // f
        if isinstance(prompts, TensorDict):
            cond = prompts
        elif encoder is None:
            raise ValueError("sample_t2i needs encoder= (or a conditioning TensorDict) when given a bare denoiser")
        else:
            cond = encoder.size_cond(encoder(list(prompts)), height, width)
        p = next(inner.net.parameters())
        device, dtype = p.device, p.dtype
    B = cond.batch_size[0]
    gen = torch.Generator().manual_seed(seed)
    # noise and grid stay float32 (as in training): bf16 noise would make the rollout's t bf16 and quantise the
    # network timesteps (e.g. 1000/898/750/500 instead of 1000/900/750/500); the network casts its inputs itself
    noise = torch.randn(B, C, h, w, generator=gen).to(device=device, dtype=torch.float32)
    step_noise = None
    if mode == "sde" and steps > 1:
        step_noise = torch.randn(steps, B, C, h, w, generator=gen).to(device=device, dtype=torch.float32)
    grid = t2i_grid(model.path, steps, shift).to(device=device, dtype=torch.float32)
    latents = few_step_rollout(model, noise, grid, cond.to(device), mode=mode, step_noise=step_noise)[K.SAMPLE]
    if return_latents:
        return latents
    if isinstance(shared_or_denoiser, SharedBaseT2I):
        return shared_or_denoiser.decode(latents)
    return decode_latents(vae, latents)


# ---- export -------------------------------------------------------------------------------------------------
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _lora_metadata(net: nn.Module, adapter: str) -> dict | None:
    cfg = getattr(net, "peft_config", {}).get(adapter)
    if cfg is None:
        return None
    meta = cfg.to_dict()
    return json.loads(json.dumps(meta, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def export_lora_diffusers(shared: SharedBaseT2I, out_dir: str | Path, family: str | None = None, *,
                          adapter: str = GENERATOR, dtype: torch.dtype | None = None) -> Path:
    """Write one adapter (default: the generator) as a diffusers LoRA folder; returns the weights file.

    The file is ``out_dir/pytorch_lora_weights.safetensors`` with ``transformer.``/``unet.``-prefixed peft keys
    (``...to_q.lora_A.weight``) and the LoRA config (rank, alpha, targets) in the safetensors metadata, written by
    the pipeline class's own ``save_lora_weights``. Load with
    ``StableDiffusion3Pipeline.load_lora_weights(out_dir)`` (family ``"sd3"``) or
    ``StableDiffusionXLPipeline.load_lora_weights(out_dir)`` (``"sdxl"``).
    """
    from peft import get_peft_model_state_dict

    family = family or shared.family
    if adapter == GENERATOR and shared.full_generator:
        raise ValueError("the generator is a full-weights network, not a LoRA: use export_generator / "
                         "export_full_model")
    net = shared.denoiser.net
    state = get_peft_model_state_dict(net, adapter_name=adapter)
    if not state:
        raise ValueError(f"the base has no LoRA adapter named {adapter!r}")
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    meta = _lora_metadata(net, adapter)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=meta)
    elif family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    else:
        raise ValueError(f"unknown family {family!r}; use 'sd3' or 'sdxl'")
    return out / LORA_WEIGHT_NAME


def merged_state_dict(net: nn.Module, adapter: str = GENERATOR, *, dtype: torch.dtype | None = None
                      ) -> dict[str, Tensor]:
    """The base network's state dict with ``adapter`` merged (``W + scaling · B A``) and all peft keys removed."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            with torch.no_grad():
                deltas[f"{name}.weight"] = module.get_delta_weight(adapter).float()
    out: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        value = value.detach()
        if key in deltas:
            value = (value.float() + deltas.pop(key).to(value.device)).to(value.dtype)
        out[key] = value.to(dtype or value.dtype).contiguous().cpu()
    if deltas:
        raise RuntimeError(f"could not place merged LoRA weights for {sorted(deltas)[:3]}")
    return out


def export_full_model(shared: SharedBaseT2I, out_dir: str | Path, *, adapter: str = GENERATOR,
                      dtype: torch.dtype | None = None, max_shard_size: str = "10GB") -> Path:
    """Write the base with ``adapter`` merged as a diffusers model folder ``out_dir/<transformer|unet>``.

    Load it with ``SD3Transformer2DModel.from_pretrained(folder)`` (or ``UNet2DConditionModel``) and pass it to the
    pipeline in place of the original network. Returns the folder.
    """
    from huggingface_hub import save_torch_state_dict

    net = shared.denoiser.net
    folder = Path(out_dir) / shared.denoiser.network_subfolder
    folder.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(net, adapter, dtype=dtype)
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size)
    net.save_config(folder)
    return folder


def export_generator(shared: SharedBaseT2I, run_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the student: the generator LoRA as ``run_dir/student_lora/pytorch_lora_weights.safetensors``
    (:func:`export_lora_diffusers`) or, for a full-weights generator, the network as a diffusers model folder
    ``run_dir/student_<unet|transformer>`` (load with ``UNet2DConditionModel.from_pretrained``). Returns the path."""
    if not shared.full_generator:
        return export_lora_diffusers(shared, Path(run_dir) / "student_lora", dtype=dtype)
    import copy

    net = shared.generator_denoiser.net
    if dtype is not None:  # a converted copy: the live float32 weights stay untouched
        net = copy.deepcopy(net).to(dtype)
    folder = Path(run_dir) / f"student_{shared.generator_denoiser.network_subfolder}"
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def load_network_weights(net: nn.Module, path: str | Path, field: str = "generator.init") -> nn.Module:
    """Load a full state dict into ``net`` in place (strict): a ``.safetensors`` file, a ``torch.save`` file
    (``.bin``/``.pt``, e.g. DMD2's ``sdxl_..._ode_pretraining_..._model_002000.bin``, read with
    ``weights_only=True``) or a diffusers model folder. Bad input raises a one-line error naming ``field``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{field}={path}: no such file or folder; pass a local state dict (.safetensors, "
                                f".bin) or diffusers model folder")
    if p.is_dir():
        try:
            state = type(net).from_pretrained(p, local_files_only=True).state_dict()
        except (OSError, ValueError, EnvironmentError) as e:
            raise ValueError(f"{field}={path}: not a {type(net).__name__} folder ({str(e).splitlines()[0][:120]})") \
                from None
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
            raise ValueError(f"{field}={path}: cannot read a state dict ({type(e).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{field}={path}: expected a state dict (name -> tensor)")
    from dmdr.models.weights import copy_state, state_mismatch

    own = net.state_dict()
    missing, unexpected, bad = state_mismatch(own, state)
    if missing or unexpected or bad:
        raise ValueError(f"{field}={path}: weights do not match the {type(net).__name__} of model.path "
                         f"(missing {missing[:2]}, unexpected {unexpected[:2]}, shape mismatch {bad[:2]})")
    copy_state(own, state)
    return net


def clean_network_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every LoRA adapter removed (the plain base), e.g. for a pipeline round trip."""
    clone = type(net).from_config(net.config)
    state = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}
    clone.load_state_dict(state)
    return clone.to(dtype=next(net.parameters()).dtype)


# ---- tiny random components (tests, --smoke runs) -----------------------------------------------------------
TINY_TOKENIZER_MAX_LENGTH = 8


def byte_clip_vocab() -> dict[str, int]:
    """A byte-level CLIP BPE vocabulary with no merges (514 tokens): the 256 byte characters, the same with
    ``</w>``, then ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_clip_tokenizer(model_max_length: int = TINY_TOKENIZER_MAX_LENGTH):
    """A byte-level ``CLIPTokenizer`` (514 tokens, no merges) built in memory: no download, no files.

    (transformers 5 reads ``vocab=``/``merges=``; the old ``vocab_file=`` keyword is silently ignored.)
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_clip_vocab(), merges=[], model_max_length=model_max_length)


def tiny_clip_text_encoder(tokenizer, *, hidden_size: int = 16, projection_dim: int | None = 8, layers: int = 2):
    """A random ``CLIPTextModelWithProjection`` (or ``CLIPTextModel`` when ``projection_dim`` is None)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=2,
                         max_position_embeddings=max(tokenizer.model_max_length, 8),
                         projection_dim=projection_dim or hidden_size, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModelWithProjection(cfg) if projection_dim is not None else CLIPTextModel(cfg)
    return model.eval()


def tiny_vae(latent_channels: int, *, scaling_factor: float, shift_factor: float | None):
    """A random 2-level ``AutoencoderKL`` (factor 2: 16×16 images ↔ 8×8 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16,
                         scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def check_local_model_dir(path: str | Path | None, field: str = "model.path") -> Path:
    """Validate a local diffusers pipeline folder; raise a one-line error naming ``path`` and the recipe field."""
    if path is None or str(path) == "":
        raise ValueError(f"{field} is not set: point it at a local diffusers folder (--set {field}=/local/dir)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{field}={path}: no such local folder (dmdr never downloads weights; "
                                f"set --set {field}=/local/dir)")
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{field}={path}: not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(root / "model_index.json", field, path)
    for comp in ("transformer", "unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(comp)
        if isinstance(entry, list) and entry and entry[0] is not None:  # listed and not disabled (null)
            if not (root / comp / "config.json").is_file():
                raise ValueError(f"{field}={path}: model_index.json lists {comp} but {comp}/config.json is missing; "
                                 f"re-copy the model folder")
            _read_json(root / comp / "config.json", field, path)
    return root


def _read_json(f: Path, field: str, path) -> dict:
    """A JSON object from ``f``, or a one-line ValueError naming the file (invalid JSON, not an object)."""
    import json

    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{field}={path}: {f.relative_to(Path(path).expanduser())} is not valid JSON "
                         f"({e.__class__.__name__}); re-copy the model folder") from None
    if not isinstance(data, dict):
        raise ValueError(f"{field}={path}: {f.name} is not a JSON object; re-copy the model folder")
    return data


__all__ = [
    "PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "TIME_IDS", "GENERATOR", "CRITIC", "LoraSpec", "PromptEmbeddingCache",
    "TextEncoderStack", "T2IComponents", "SharedBaseT2I", "vae_scale_factor", "decode_latents", "encode_images",
    "t2i_grid", "sample_t2i", "export_lora_diffusers", "export_full_model", "merged_state_dict", "export_generator",
    "load_network_weights",
    "clean_network_copy", "SDXL_ONE_STEP_INDEX", "adapter_aware_checkpoint", "byte_clip_vocab", "tiny_clip_tokenizer",
    "tiny_clip_text_encoder", "tiny_vae", "check_local_model_dir",
]

