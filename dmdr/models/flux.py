"""FLUX.1-dev (``FluxTransformer2DModel``) and FLUX.2-klein (``Flux2Transformer2DModel``) behind the dmdr model
contract.

Contract (``dmdr.models.contract``): ``denoiser(x_t (B,C,h,w), t (B,) ∈ [0,1], cond) -> velocity (B,C,h,w)`` with
``path = FlowMatching(t_min=0)``: ``x̂0 = x_t - t v`` (method.md §1 with ``t_min = 0``; there is no official
DMDR code for FLUX, so dmdr uses the exact flow-matching identity rather than SD3's 0.001).

* **Latents.** dmdr's latents are the VAE latents *in the model's normalised space*, unpacked: (B, 16, H/8, W/8)
  for FLUX.1 (``(z - 0.1159) · 0.3611``), (B, 32, H/8, W/8) for FLUX.2 (the batch-norm statistics of
  ``AutoencoderKLFlux2.bn`` applied to the 2×2-patchified latents, see :class:`Flux2LatentVAE`). ``h`` and ``w``
  must be even. The denoiser packs them itself, exactly as both pipelines do: each 2×2 latent patch becomes one
  token of 4C channels, channel index ``4c + 2·dy + dx``, tokens in row-major order (:func:`pack_latents`;
  FLUX.1's ``_pack_latents`` and FLUX.2's ``_patchify_latents`` + ``_pack_latents`` are the same permutation).
  Packing is a permutation, so Gaussian noise stays Gaussian and every path formula (renoise, x̂0, velocity) is
  the same in packed and unpacked form.
* **Position ids.** FLUX.1: image ids (N, 3) = (0, i, j), text ids zeros (L, 3). FLUX.2: image ids (N, 4) =
  (0, i, j, 0), text ids (L, 4) = (0, 0, 0, l) (the pipelines' ``_prepare_latent_image_ids`` /
  ``_prepare_latent_ids`` / ``_prepare_text_ids``), with i, j the packed (H/16, W/16) grid.
* **Timestep.** Both transformers take ``t ∈ [0, 1]`` and multiply by 1000 inside (the pipelines pass
  ``sigma·1000 / 1000``), so dmdr passes ``t`` unrounded.
* **Time shift.** FLUX shifts its schedule by resolution: ``t' = e^μ t / (1 + (e^μ - 1) t)``, the SD3 shift with
  ``S = e^μ``. FLUX.1: ``μ`` linear in the token count (``calculate_shift``: 0.5 at 256 tokens, 1.15 at 4096),
  so S = 3.158 at 1024², 1.878 at 512². FLUX.2: ``compute_empirical_mu(tokens, steps)`` (S = 9.89 at 1024² for 4
  steps). :func:`flux1_shift` / :func:`flux2_shift` compute S; the recipes put it in ``generator.shift``.
* **Guidance.** FLUX.1-dev is guidance-distilled: ``guidance_embeds=True``, the guidance scale ``g`` is a network
  input (times 1000 inside), and there is no two-pass CFG. dmdr's choice (docs/families/flux.md):

  - **student** (generator) and **fake score**: the fixed input ``guidance`` of the denoiser (3.5, FluxPipeline's
    default, so the exported LoRA samples with the pipeline's default ``guidance_scale``);
  - **real score**: the teacher at guidance ``guidance_real`` (default: the same value) in ONE forward pass; this
    replaces method.md §2.5's two-pass CFG ``v_u + w (v_c - v_u)`` (the recipe sets ``dmd.cfg: 1``, so the trainer
    draws no CFG scale and passes no unconditional batch). :class:`GuidanceView` sets the value per call;
    :class:`FluxSharedBase` returns it from ``real_score`` / ``teacher``.
  - A per-sample value in ``cond["guidance"]`` (B,) overrides the default.

  FLUX.2-klein has **no** guidance embedding (``guidance_embeds: false`` in both published klein configs, and
  ``Flux2KleinPipeline`` passes ``guidance=None``); its undistilled base uses true CFG (``guidance_scale`` 4.0,
  unconditional branch = the encoded ``""``), so method.md §2.5 applies unchanged (``dmd.cfg: 4``).
* **Conditioning.** FLUX.1: ``prompt_embeds`` (B, 512, 4096) from T5-v1.1-XXL and ``pooled_prompt_embeds``
  (B, 768) from CLIP-L's pooled output (:class:`FluxTextEncoder`, mirrors ``FluxPipeline.encode_prompt``).
  FLUX.2-klein: ``prompt_embeds`` (B, 512, 3·D) = the Qwen3 hidden states of layers 9, 18, 27 of the chat-templated
  prompt, concatenated per token (:class:`Flux2KleinTextEncoder`, mirrors ``Flux2KleinPipeline.encode_prompt``).
* **LoRA scale.** As in :mod:`dmdr.models.sd3`: ``forward(..., lora_scale=s)`` forwards diffusers'
  ``joint_attention_kwargs={"scale": s}``.

>>> comps = standin_flux("flux1-dev", seed=0)                       # doctest: +SKIP
>>> cond = comps.encoder(["a cat"])
>>> comps.denoiser(torch.randn(1, 16, 8, 8), torch.rand(1), cond).shape
torch.Size([1, 16, 8, 8])
"""
from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr.models.lora import BaseView
from dmdr.models.shared_base import SharedBaseT2I
from dmdr.models.t2i_components import (POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, DiffusersDenoiser, LoraSpec,
                                        T2IComponents, TextEncoderStack, check_local_model_dir)
from dmdr.paths import FlowMatching

FLUX_T_MIN = 0.0
GUIDANCE = "guidance"                 # optional (B,) float32 key of the conditioning TensorDict
FLUX1_DEFAULT_GUIDANCE = 3.5          # FluxPipeline.__call__(guidance_scale=3.5)
FLUX2_DEFAULT_CFG = 4.0               # Flux2KleinPipeline.__call__(guidance_scale=4.0), true CFG
FLUX2_TEXT_LAYERS = (9, 18, 27)       # Flux2KleinPipeline text_encoder_out_layers
# attention q/k/v/out of both streams (FLUX.1 single blocks hold attn.to_q/k/v too; the names match them)
FLUX1_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# FLUX.2: the same in the double-stream blocks plus the fused qkv+mlp input projection of the single-stream blocks
# (20 of klein-4B's 25 blocks are single-stream; their attn.to_out is not targeted: the name also matches the
# double blocks' ModuleList)
FLUX2_LORA_TARGETS = FLUX1_LORA_TARGETS + ("to_qkv_mlp_proj",)


# ---- packing and position ids ------------------------------------------------------------------------------
def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): each 2×2 patch one token, channel ``4c + 2 dy + dx`` (FLUX packing)."""
    B, C, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need an even height and width (2x2 packing), got {h}x{w}; use image sides "
                         f"that are multiples of 16")
    x = x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: (B, h/2 · w/2, 4C) → (B, C, h, w)."""
    B, N, D = tokens.shape
    x = tokens.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)


def patchify(x: Tensor) -> Tensor:
    """(B, C, h, w) → (B, 4C, h/2, w/2), channel ``4c + 2 dy + dx`` (``Flux2Pipeline._patchify_latents``)."""
    B, C, h, w = x.shape
    return x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of :func:`patchify` (``Flux2Pipeline._unpatchify_latents``)."""
    B, C4, h, w = x.shape
    return x.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, h * 2, w * 2)


def flux1_image_ids(h2: int, w2: int, device=None) -> Tensor:
    """(h2·w2, 3) float32 ids (0, i, j) of the packed grid (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] += torch.arange(h2)[:, None]
    ids[..., 2] += torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device)


def flux2_image_ids(h2: int, w2: int, device=None) -> Tensor:
    """(h2·w2, 4) int64 ids (t=0, i, j, l=0) (``Flux2Pipeline._prepare_latent_ids``)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h2), torch.arange(w2), torch.arange(1)).to(device)


def flux2_text_ids(length: int, device=None) -> Tensor:
    """(L, 4) int64 ids (0, 0, 0, l) (``Flux2Pipeline._prepare_text_ids``)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


# ---- time shift ---------------------------------------------------------------------------------------------
def flux1_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
             max_shift: float = 1.15) -> float:
    """FLUX.1's ``calculate_shift``: μ linear in the packed token count (scheduler_config defaults)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's ``compute_empirical_mu(image_seq_len, num_steps)`` (pipeline_flux2.py)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def _tokens(height: int, width: int) -> int:
    if height % 16 or width % 16:
        raise ValueError(f"FLUX image sides must be multiples of 16 (VAE factor 8 x 2x2 packing), got "
                         f"{height}x{width}")
    return (height // 16) * (width // 16)


def flux1_shift(height: int, width: int) -> float:
    """The SD3-style shift ``S = e^μ`` equal to FLUX.1's dynamic shift at this resolution (3.158 at 1024²)."""
    return math.exp(flux1_mu(_tokens(height, width)))


def flux2_shift(height: int, width: int, steps: int) -> float:
    """The SD3-style shift ``S = e^μ`` equal to FLUX.2's empirical shift for ``steps`` steps (9.886 at 1024², 4)."""
    return math.exp(flux2_mu(_tokens(height, width), steps))


# ---- denoisers ----------------------------------------------------------------------------------------------
class _FluxDenoiserBase(DiffusersDenoiser):
    """Shared by both FLUX generations: packing, guidance input, null embeddings without a required pooled key."""

    def __init__(self, transformer: nn.Module, *, t_min: float = FLUX_T_MIN, guidance: float | None = None):
        super().__init__(transformer, FlowMatching(t_min=t_min))
        self.guidance = None if guidance is None else float(guidance)
        if self.has_guidance_embedding and self.guidance is None:
            raise ValueError(f"{type(transformer).__name__} has a guidance embedding (guidance_embeds=true): pass "
                             f"guidance= (e.g. {FLUX1_DEFAULT_GUIDANCE})")

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(getattr(self.net.config, "guidance_embeds", False))

    @property
    def in_channels(self) -> int:
        """Unpacked latent channels: the network's packed ``in_channels`` / 4 (16 for FLUX.1, 32 for FLUX.2)."""
        return int(self.net.config.in_channels) // 4

    def network_timestep(self, t: Tensor) -> Tensor:
        """``t`` itself (float32): both FLUX transformers multiply by 1000 inside."""
        return t.float()

    def guidance_input(self, cond: TensorDict, B: int, device) -> Tensor | None:
        """(B,) float32 guidance for the network: ``cond["guidance"]`` if present, else the fixed ``guidance``;
        None when the network has no guidance embedding."""
        if not self.has_guidance_embedding:
            return None
        g = cond.get(GUIDANCE, None) if isinstance(cond, TensorDict) else None
        if g is None:
            return torch.full((B,), self.guidance, device=device, dtype=torch.float32)
        return g.to(device=device, dtype=torch.float32).expand(B)

    def _time(self, x_t: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.ndim == 0 else t

    # -- unconditional branch (pooled key optional) -------------------------------------------------------------
    def set_null_embeddings(self, null: TensorDict) -> None:
        self._null_prompt_embeds = null[PROMPT_EMBEDS][:1].detach().clone()
        self._null_pooled = null[POOLED_PROMPT_EMBEDS][:1].detach().clone() if POOLED_PROMPT_EMBEDS in null.keys() \
            else None

    def null_cond(self, cond: TensorDict) -> TensorDict:
        """The empty-prompt embeddings expanded to ``cond``'s batch (``cond``'s guidance, if any, is kept)."""
        if self._null_prompt_embeds is None:
            raise RuntimeError(f"{type(self).__name__}.null_cond: no unconditional embeddings cached; call "
                               "set_null_embeddings(...) first (SharedBaseT2I does this)")
        B = cond.batch_size[0]
        out = {PROMPT_EMBEDS: self._null_prompt_embeds.expand(B, -1, -1)}
        if self._null_pooled is not None:
            out[POOLED_PROMPT_EMBEDS] = self._null_pooled.expand(B, -1)
        if GUIDANCE in cond.keys():
            out[GUIDANCE] = cond[GUIDANCE]
        return TensorDict(out, batch_size=[B], device=cond.device)


class FluxDenoiser(_FluxDenoiserBase):
    """FLUX.1 (``FluxTransformer2DModel``) as a flow-matching denoiser on unpacked (B, 16, h, w) latents.

    Args:
        transformer: the network (``self.net``; LoRA adapters go into it).
        guidance: the fixed guidance-embedding input (FLUX.1-dev: required; 3.5 = FluxPipeline's default). Ignored
            by a network without a guidance embedding (FLUX.1-schnell).
        t_min: the ``t_min`` of the x̂0 formula (0: ``x̂0 = x_t - t v``).
    """

    family = "flux1"
    network_subfolder = "transformer"
    PIPELINE_CLASS = "FluxPipeline"
    DEFAULT_GENERATOR_LORA = LoraSpec(rank=64, alpha=128, target_modules=FLUX1_LORA_TARGETS)
    DEFAULT_CRITIC_LORA = LoraSpec(rank=32, alpha=32, target_modules=FLUX1_LORA_TARGETS)

    def __init__(self, transformer: nn.Module, *, guidance: float | None = FLUX1_DEFAULT_GUIDANCE,
                 t_min: float = FLUX_T_MIN):
        if not getattr(transformer.config, "guidance_embeds", False):
            guidance = None
        super().__init__(transformer, t_min=t_min, guidance=guidance)

    def forward(self, x_t: Tensor, t: Tensor, cond: TensorDict, *, lora_scale: float | None = None) -> Tensor:
        """Velocity ``v(x_t, t, cond)`` (B, 16, h, w) in ``x_t``'s dtype; one network call."""
        pe, pooled, t, dtype = self._forward_inputs(x_t, t, cond)
        B, _, h, w = x_t.shape
        tokens = pack_latents(x_t).to(dtype)
        g = self.guidance_input(cond, B, x_t.device)
        out = self.net(hidden_states=tokens, encoder_hidden_states=pe.to(dtype), pooled_projections=pooled.to(dtype),
                       timestep=self.network_timestep(t).to(x_t.device), guidance=g,
                       img_ids=flux1_image_ids(h // 2, w // 2, x_t.device),
                       txt_ids=torch.zeros(pe.shape[1], 3, device=x_t.device),
                       joint_attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)},
                       return_dict=False)[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def make_pipeline(self, vae: nn.Module, encoder: "FluxTextEncoder", *, network: nn.Module | None = None):
        """A ``FluxPipeline`` over ``network`` (default: this denoiser's network) and the components."""
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=network if network is not None else self.net, scheduler=flux1_scheduler(),
                            vae=vae, **encoder.pipeline_components())


class Flux2Denoiser(_FluxDenoiserBase):
    """FLUX.2 (``Flux2Transformer2DModel``) as a flow-matching denoiser on unpacked, normalised (B, 32, h, w)
    latents (:class:`Flux2LatentVAE`). klein has no guidance embedding; ``guidance`` is used only by a network with
    one (FLUX.2-dev)."""

    family = "flux2"
    network_subfolder = "transformer"
    PIPELINE_CLASS = "Flux2KleinPipeline"
    DEFAULT_GENERATOR_LORA = LoraSpec(rank=64, alpha=128, target_modules=FLUX2_LORA_TARGETS)
    DEFAULT_CRITIC_LORA = LoraSpec(rank=32, alpha=32, target_modules=FLUX2_LORA_TARGETS)

    def __init__(self, transformer: nn.Module, *, guidance: float | None = None, t_min: float = FLUX_T_MIN):
        super().__init__(transformer, t_min=t_min, guidance=guidance)

    def forward(self, x_t: Tensor, t: Tensor, cond: TensorDict, *, lora_scale: float | None = None) -> Tensor:
        """Velocity ``v(x_t, t, cond)`` (B, 32, h, w) in ``x_t``'s dtype; one network call."""
        from dmdr import keys as K

        pe = K.require(cond, PROMPT_EMBEDS, fn=type(self).__name__, field="prompt_embeds")
        t = self._time(x_t, t)
        dtype = next(self.net.parameters()).dtype
        B, _, h, w = x_t.shape
        out = self.net(hidden_states=pack_latents(x_t).to(dtype), encoder_hidden_states=pe.to(dtype),
                       timestep=self.network_timestep(t).to(x_t.device),
                       guidance=self.guidance_input(cond, B, x_t.device),
                       img_ids=flux2_image_ids(h // 2, w // 2, x_t.device),
                       txt_ids=flux2_text_ids(pe.shape[1], x_t.device),
                       joint_attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)},
                       return_dict=False)[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def make_pipeline(self, vae: nn.Module, encoder: "Flux2KleinTextEncoder", *, network: nn.Module | None = None,
                      is_distilled: bool = False):
        """A ``Flux2KleinPipeline`` over ``network`` (default: this denoiser's network) and the components."""
        from diffusers import Flux2KleinPipeline

        raw = vae.vae if isinstance(vae, Flux2LatentVAE) else vae
        return Flux2KleinPipeline(transformer=network if network is not None else self.net,
                                  scheduler=flux2_scheduler(), vae=raw, is_distilled=is_distilled,
                                  **encoder.pipeline_components())


def flux1_scheduler():
    """FLUX.1's published scheduler: ``FlowMatchEulerDiscreteScheduler`` with dynamic (resolution) shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def flux2_scheduler():
    """FLUX.2's scheduler: dynamic shifting (μ from ``compute_empirical_mu``, passed by the pipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


# ---- guidance for the real score ----------------------------------------------------------------------------
class GuidanceView(BaseView):
    """A denoiser view that evaluates ``view`` with the guidance-embedding input set to ``guidance`` (B,) for
    every sample: the real score of a guidance-distilled teacher is ONE forward pass at guidance g (replacing
    method.md §2.5's ``v_u + w (v_c - v_u)``).

    >>> real = GuidanceView(AdapterView(base, "critic", 0.25), 3.5)     # doctest: +SKIP
    """

    def __init__(self, view: Any, guidance: float):
        self.view, self.guidance = view, float(guidance)
        self.base = getattr(view, "base", view)

    def __getattr__(self, name: str):  # adapter / scale of the wrapped AdapterView
        view = self.__dict__.get("view")
        if view is None:
            raise AttributeError(name)
        return getattr(view, name)

    def __call__(self, x_t: Tensor, t: Tensor, cond: TensorDict) -> Tensor:
        return self.view(x_t, t, with_guidance(cond, self.guidance))

    def __repr__(self) -> str:
        return f"GuidanceView({self.view!r}, guidance={self.guidance})"


def with_guidance(cond: TensorDict, guidance: float) -> TensorDict:
    """A shallow copy of ``cond`` whose ``guidance`` key is ``guidance`` for every sample (float32, (B,))."""
    out = cond.clone(recurse=False)
    out.set(GUIDANCE, torch.full((cond.batch_size[0],), float(guidance), device=cond.device, dtype=torch.float32))
    return out


class FluxSharedBase(SharedBaseT2I):
    """:class:`~dmdr.models.t2i.SharedBaseT2I` for FLUX: the same one-base/two-adapter layout, and for a
    guidance-distilled network (FLUX.1-dev) the real score and the teacher run at ``guidance_real``.

    generator  = base + Δ_gen            at the denoiser's fixed ``guidance`` (student input, exported)
    fake score = base + λ_f Δ_critic     at the same fixed ``guidance``
    real score = base + λ_r Δ_critic     at ``guidance_real`` (default: ``guidance``), one pass
    """

    def __init__(self, denoiser: nn.Module, vae: nn.Module, encoder: TextEncoderStack, *,
                 guidance_real: float | None = None, **kwargs):
        super().__init__(denoiser, vae, encoder, **kwargs)
        has = getattr(denoiser, "has_guidance_embedding", False)
        if guidance_real is not None and not has:
            raise ValueError(f"{type(denoiser.net).__name__} has no guidance embedding: guidance_real applies only "
                             f"to guidance-distilled FLUX.1-dev; use CFG (dmd.cfg) instead")
        self.guidance_real = (guidance_real if guidance_real is not None else denoiser.guidance) if has else None

    @classmethod
    def from_components(cls, components: T2IComponents, **kwargs) -> "FluxSharedBase":
        return cls(components.denoiser, components.vae, components.encoder, **kwargs)

    def real_score(self, scale: float = 0.0):
        view = super().real_score(scale)
        return view if self.guidance_real is None else GuidanceView(view, self.guidance_real)

    def teacher(self):
        view = super().teacher()
        return view if self.guidance_real is None else GuidanceView(view, self.guidance_real)


# ---- text encoders ------------------------------------------------------------------------------------------
class FluxTextEncoder(TextEncoderStack):
    """FLUX.1's text stack: CLIP-L pooled output + T5-v1.1-XXL last hidden state.

    Mirrors ``FluxPipeline.encode_prompt``: ``pooled = CLIPTextModel(ids padded to 77).pooler_output`` (B, 768);
    ``prompt_embeds = T5EncoderModel(ids padded to max_sequence_length)[0]`` (B, L, 4096), L = 512 for dev.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, text_encoder_2: nn.Module, tokenizer_2, *,
                 max_sequence_length: int = 512):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = int(max_sequence_length)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TensorDict:
        prompts = list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.text_encoder.dtype)
        ids2 = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt").input_ids.to(self.device)
        pe = self.text_encoder_2(ids2, output_hidden_states=False)[0].to(self.text_encoder_2.dtype)
        return TensorDict({PROMPT_EMBEDS: pe, POOLED_PROMPT_EMBEDS: pooled}, batch_size=[len(prompts)],
                          device=self.device)

    def pipeline_components(self) -> dict:
        return dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                    tokenizer_2=self.tokenizer_2)


class Flux2KleinTextEncoder(TextEncoderStack):
    """FLUX.2-klein's text encoder: Qwen3 (``Qwen3ForCausalLM``; 4B for klein-4B, 8B for klein-9B).

    Mirrors ``Flux2KleinPipeline._get_qwen3_prompt_embeds``: each prompt goes through the tokenizer's chat template
    (one user message, ``add_generation_prompt=True``, ``enable_thinking=False``), is padded to
    ``max_sequence_length`` (512) and run with its attention mask; the hidden states of ``layers`` (9, 18, 27;
    index 0 = the embeddings) are stacked and concatenated per token: (B, L, 3·hidden).
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, *, max_sequence_length: int = 512,
                 layers: Sequence[int] = FLUX2_TEXT_LAYERS):
        super().__init__()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.max_sequence_length = int(max_sequence_length)
        self.layers = tuple(int(i) for i in layers)
        n = int(text_encoder.config.num_hidden_layers)
        if max(self.layers) > n:
            raise ValueError(f"text encoder has {n} layers; hidden-state layers {self.layers} need at least "
                             f"{max(self.layers)}")
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (B, L): the chat-templated prompts, padded to L."""
        ids, masks = [], []
        for p in prompts:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            enc = self.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                 max_length=self.max_sequence_length)
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TensorDict:
        prompts = list(prompts)
        ids, mask = self.tokenize(prompts)
        out = self.text_encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                output_hidden_states=True, use_cache=False)
        h = torch.stack([out.hidden_states[k] for k in self.layers], dim=1).to(self.text_encoder.dtype)
        B, n, L, D = h.shape
        pe = h.permute(0, 2, 1, 3).reshape(B, L, n * D)
        return TensorDict({PROMPT_EMBEDS: pe}, batch_size=[B], device=self.device)

    def pipeline_components(self) -> dict:
        return dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer)


# ---- the FLUX.2 VAE in dmdr's latent space -----------------------------------------------------------------
class _NormalisedDist:
    def __init__(self, dist, fn):
        self.dist, self.fn = dist, fn

    def sample(self, generator=None) -> Tensor:
        return self.fn(self.dist.sample(generator))

    def mode(self) -> Tensor:
        return self.fn(self.dist.mode())


class Flux2LatentVAE(nn.Module):
    """``AutoencoderKLFlux2`` seen from dmdr's latent space (normalised, unpacked (B, 32, h, w) latents).

    FLUX.2 normalises its latents with the running statistics of the VAE's ``bn`` (BatchNorm2d over the 128
    channels of the 2×2-patchified latents, ``eps = batch_norm_eps``) instead of a scaling/shift factor:
    ``z_model = unpatchify((patchify(z) - mean) / sqrt(var + eps))`` (``Flux2KleinPipeline._encode_vae_image``
    and the decode at the end of ``__call__``). :meth:`decode` inverts that and decodes; ``config`` is the VAE's
    config with ``scaling_factor = 1`` and ``shift_factor = 0``, so :func:`dmdr.models.t2i.decode_latents` (what
    the rewards read) and :func:`~dmdr.models.t2i.encode_images` work unchanged.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = dict(vae.config)
        cfg.update(scaling_factor=1.0, shift_factor=0.0)
        self.config = types.SimpleNamespace(**cfg)

    def _stats(self, ref: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(ref.device, ref.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(ref.device, ref.dtype)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        """Raw VAE latents (B, 32, h, w) → model latents (B, 32, h, w)."""
        mean, std = self._stats(z)
        return unpatchify((patchify(z) - mean) / std)

    def denormalize(self, z: Tensor) -> Tensor:
        """Model latents → raw VAE latents (what ``vae.decode`` reads)."""
        mean, std = self._stats(z)
        return unpatchify(patchify(z) * std + mean)

    def decode(self, z: Tensor, return_dict: bool = True):
        return self.vae.decode(self.denormalize(z), return_dict=return_dict)

    def encode(self, images: Tensor):
        """``encode(images).latent_dist.sample()/.mode()`` give model latents."""
        dist = self.vae.encode(images).latent_dist
        return types.SimpleNamespace(latent_dist=_NormalisedDist(dist, self.normalize))

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


# ---- loaders ------------------------------------------------------------------------------------------------
def _to(comps: T2IComponents, device) -> T2IComponents:
    if device is not None:
        for m in (comps.denoiser, comps.vae, comps.encoder):
            m.to(device)
    return comps


def load_flux1(path: str | Path | None, *, dtype: torch.dtype | None = None, device=None,
               max_sequence_length: int = 512, guidance: float = FLUX1_DEFAULT_GUIDANCE, field: str = "model.path",
               **denoiser_kwargs) -> T2IComponents:
    """Load FLUX.1 (dev) from a local diffusers folder (``local_files_only=True``; nothing is downloaded)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    root = check_local_model_dir(path, field)
    kw = dict(local_files_only=True)
    transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    te2 = T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype, **kw)
    tok2 = AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw)
    encoder = FluxTextEncoder(te, tok, te2, tok2, max_sequence_length=max_sequence_length)
    vae.requires_grad_(False).eval()
    den = FluxDenoiser(transformer.eval(), guidance=guidance, **denoiser_kwargs)
    return _to(T2IComponents("flux1", den, vae, encoder, info={"path": str(root)}), device)


def load_flux2_klein(path: str | Path | None, *, dtype: torch.dtype | None = None, device=None,
                     max_sequence_length: int = 512, allow_distilled: bool = False, field: str = "model.path",
                     **denoiser_kwargs) -> T2IComponents:
    """Load FLUX.2-klein from a local diffusers folder (``local_files_only=True``).

    DMD distils from the undistilled **base** checkpoints (FLUX.2-klein-base-4B / -9B, true CFG). A folder whose
    ``model_index.json`` says ``is_distilled: true`` (FLUX.2-klein-4B/9B, already 4-step, CFG ignored) raises a
    one-line error unless ``allow_distilled=True``.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    root = check_local_model_dir(path, field)
    index = json.loads((root / "model_index.json").read_text())
    if index.get("is_distilled") and not allow_distilled:
        raise ValueError(f"{field}={path}: this is a step-distilled FLUX.2-klein (model_index.json is_distilled: "
                         f"true); DMD needs the undistilled teacher, e.g. FLUX.2-klein-base-4B")
    kw = dict(local_files_only=True)
    transformer = Flux2Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **kw)
    vae = AutoencoderKLFlux2.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    te = Qwen3ForCausalLM.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    encoder = Flux2KleinTextEncoder(te, tok, max_sequence_length=max_sequence_length)
    vae.requires_grad_(False).eval()
    den = Flux2Denoiser(transformer.eval(), **denoiser_kwargs)
    return _to(T2IComponents("flux2", den, Flux2LatentVAE(vae), encoder,
                             info={"path": str(root), "is_distilled": bool(index.get("is_distilled"))}), device)


# ---- export -------------------------------------------------------------------------------------------------
def export_flux_lora(shared: SharedBaseT2I, out_dir: str | Path, *, adapter: str = "generator",
                     dtype: torch.dtype | None = None) -> Path:
    """Write one adapter (default: the generator) as ``out_dir/pytorch_lora_weights.safetensors`` through the
    denoiser's ``PIPELINE_CLASS``: ``FluxPipeline.save_lora_weights`` (FLUX.1) or
    ``Flux2KleinPipeline.save_lora_weights`` (FLUX.2), i.e. :func:`dmdr.models.t2i_export.export_lora_diffusers`:
    peft keys prefixed ``transformer.``, the LoRA config (rank, α, targets) in the metadata. Load with
    ``pipe.load_lora_weights(out_dir)``; sample FLUX.1 with ``guidance_scale`` = the trained ``guidance``."""
    from dmdr.models.t2i_export import export_lora_diffusers

    if not isinstance(shared.denoiser, _FluxDenoiserBase):
        raise ValueError(f"not a FLUX denoiser: {type(shared.denoiser).__name__}")
    return export_lora_diffusers(shared, out_dir, adapter=adapter, dtype=dtype)


__all__ = ["FluxDenoiser", "Flux2Denoiser", "FluxTextEncoder", "Flux2KleinTextEncoder", "Flux2LatentVAE",
           "FluxSharedBase", "GuidanceView", "with_guidance", "pack_latents", "unpack_latents", "patchify",
           "unpatchify", "flux1_image_ids", "flux2_image_ids", "flux2_text_ids", "flux1_mu", "flux2_mu",
           "flux1_shift", "flux2_shift", "load_flux1", "load_flux2_klein", "export_flux_lora", "FLUX_T_MIN",
           "FLUX1_DEFAULT_GUIDANCE", "FLUX2_DEFAULT_CFG", "FLUX1_LORA_TARGETS", "FLUX2_LORA_TARGETS", "GUIDANCE",
           "flux1_scheduler", "flux2_scheduler"]
