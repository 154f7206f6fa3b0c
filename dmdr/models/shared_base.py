"""One frozen text-to-image base with a ``generator`` and a ``critic`` LoRA adapter (:class:`SharedBaseT2I`).

**Memory layout** (method.md §1, §2.6; STYLE.md anti-pattern "two or three full copies of the backbone").
The official code keeps a generator (teacher + LoRA) and a *deep copy* of the teacher with the critic LoRA.
:class:`SharedBaseT2I` keeps ONE frozen base network with two peft LoRA adapters and selects one per call
(:func:`dmdr.models.lora.adapter_scope`)::

    generator  G   = base + 1   · Δ_generator        (trainable: generator_parameters())
    fake score     = base + λ_f · Δ_critic           (trainable: critic_parameters())
    real score     = base + λ_r · Δ_critic           (DynaDG; λ_r(k) → 0 gives the pure teacher)

Both adapters start with ``lora_B = 0``, so G = teacher and fake = real = teacher at step 0. The VAE and the
text encoders are frozen; prompt embeddings are cached per prompt
(:class:`~dmdr.models.prompt_cache.PromptEmbeddingCache`); with ``offload_idle=True`` the text encoders (and the VAE
after a no-grad decode) go back to the CPU after use.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr.models.lora import AdapterView, add_lora, lora_parameters, lora_state_dict, set_trainable
from dmdr.models.prompt_cache import PromptEmbeddingCache
from dmdr.models.t2i_components import CRITIC, GENERATOR, LoraSpec, T2IComponents, TextEncoderStack
from dmdr.models.vae import decode_latents, vae_scale_factor


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



__all__ = ["SharedBaseT2I", "adapter_aware_checkpoint"]
