"""SD3 / SD3.5 (diffusers ``SD3Transformer2DModel``) behind the dmdr model contract.

Contract (``dmdr.models.contract``): ``denoiser(x_t (B,16,h,w), t (B,) ∈ [0,1], cond) -> velocity (B,16,h,w)``
with ``path = FlowMatching(t_min=0.001)`` (method.md §1: ``x̂0 = x_t + (0.001 - t) v``).

* **Timestep.** The network receives ``round(1000 t)`` as a float (the official ``v2x0_sampler``:
  ``(t * 1000).round()``). dmdr computes it in float32 whatever the model dtype; the official code rounds in the
  latent dtype (bf16), which quantises timesteps above 512 to multiples of 4 (method.md §5.2 item 10).
  ``round_timesteps=False`` passes ``1000 t`` unrounded, as diffusers' scheduler does at inference.
* **Conditioning** is a TensorDict with ``prompt_embeds`` (B, 77 + T5 length, 4096) and ``pooled_prompt_embeds``
  (B, 2048), as produced by :class:`SD3TextEncoder` (which mirrors ``StableDiffusion3Pipeline.encode_prompt``;
  without T5 the T5 block is zeros, as in diffusers). ``null_cond`` returns the cached embeddings of the empty
  prompt (the official unconditional branch, method.md §2.5), expanded to the batch.
* **LoRA scale.** dmdr selects and scales its own adapters with :func:`dmdr.models.lora.adapter_scope` (peft layers,
  per call). For LoRAs loaded through diffusers (``pipe.load_lora_weights``), ``forward(..., lora_scale=s)``
  forwards ``joint_attention_kwargs={"scale": s}``, diffusers' own path (it rescales the *active* peft adapters
  for that call). The two compose multiplicatively; dmdr's training code uses only the first.

>>> comps = build_tiny_sd3(seed=0)
>>> cond = comps.encoder(["a cat", "a dog"])
>>> comps.denoiser(torch.randn(2, 4, 8, 8), torch.rand(2), cond).shape
torch.Size([2, 4, 8, 8])
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr.models.t2i_components import (POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, DiffusersDenoiser, LoraSpec, T2IComponents,
                                        TextEncoderStack, check_local_model_dir)
from dmdr.models.tiny_text import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae
from dmdr.paths import FlowMatching

SD3_T_MIN = 0.001
# attention q/k/v/out of both streams (official generator and critic targets, method.md §3.1)
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def sd3_timestep(t: Tensor, *, rounded: bool = True) -> Tensor:
    """The network timestep of SD3: ``round(1000 t)`` (float32), or ``1000 t`` when ``rounded=False``."""
    s = t.float() * 1000.0
    return s.round() if rounded else s


class SD3Denoiser(DiffusersDenoiser):
    """Wrap a diffusers ``SD3Transformer2DModel`` as a flow-matching denoiser (see the module docstring).

    Args:
        transformer: the network (stored as ``self.net``; LoRA adapters are injected into it).
        t_min: the ``t_min`` of the x̂0 formula (0.001 in the official SD3 code).
        round_timesteps: feed ``round(1000 t)`` (official) instead of ``1000 t``.
    """

    family = "sd3"
    network_subfolder = "transformer"
    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    DEFAULT_GENERATOR_LORA = LoraSpec(rank=64, alpha=128, target_modules=SD3_LORA_TARGETS)
    DEFAULT_CRITIC_LORA = LoraSpec(rank=32, alpha=32, target_modules=SD3_LORA_TARGETS)

    def __init__(self, transformer: nn.Module, *, t_min: float = SD3_T_MIN, round_timesteps: bool = True):
        super().__init__(transformer, FlowMatching(t_min=t_min))
        self.round_timesteps = round_timesteps

    def network_timestep(self, t: Tensor) -> Tensor:
        return sd3_timestep(t, rounded=self.round_timesteps)

    def forward(self, x_t: Tensor, t: Tensor, cond: TensorDict, *, lora_scale: float | None = None) -> Tensor:
        """Velocity ``v(x_t, t, cond)`` in ``x_t``'s dtype. ``lora_scale`` → diffusers' ``joint_attention_kwargs``."""
        pe, pooled, t, dtype = self._forward_inputs(x_t, t, cond)
        out = self.net(hidden_states=x_t.to(dtype), timestep=self.network_timestep(t).to(x_t.device),
                       encoder_hidden_states=pe.to(dtype), pooled_projections=pooled.to(dtype),
                       joint_attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)},
                       return_dict=False)[0]
        return out.to(x_t.dtype)

    # -- unconditional branch -----------------------------------------------------------------------------------
    def null_cond(self, cond: TensorDict) -> TensorDict:
        """The empty-prompt embeddings expanded to ``cond``'s batch (for CFG)."""
        return TensorDict(self._null_batch(cond), batch_size=[cond.batch_size[0]], device=cond.device)

    def make_pipeline(self, vae: nn.Module, encoder: "SD3TextEncoder", *, network: nn.Module | None = None):
        """A ``StableDiffusion3Pipeline`` over ``network`` (default: this denoiser's network) and the components."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(transformer=network if network is not None else self.net,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        **encoder.pipeline_components())


class SD3TextEncoder(TextEncoderStack):
    """SD3's text stack: CLIP-L + CLIP-G (hidden state −2, pooled projections) and optional T5.

    Mirrors ``StableDiffusion3Pipeline.encode_prompt`` (``clip_skip=None``): ``prompt_embeds =
    cat([pad(cat([clip_l, clip_g], -1), to D_T5), t5], dim=-2)``, ``pooled = cat([pool_l, pool_g], -1)``. Both CLIP
    tokenizers use the first tokenizer's ``model_max_length``; without T5 the T5 block is zeros of shape
    (B, max_sequence_length, joint_attention_dim).
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, text_encoder_2: nn.Module, tokenizer_2,
                 text_encoder_3: nn.Module | None = None, tokenizer_3=None, *, joint_attention_dim: int,
                 max_sequence_length: int = 256):
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.requires_grad_(False)
        self.eval()

    def _clip(self, prompts: list[str], tokenizer, encoder) -> tuple[Tensor, Tensor]:
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TensorDict:
        prompts = list(prompts)
        B, dtype = len(prompts), self.text_encoder.dtype
        h1, p1 = self._clip(prompts, self.tokenizer, self.text_encoder)
        h2, p2 = self._clip(prompts, self.tokenizer_2, self.text_encoder_2)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(B, self.max_sequence_length, self.joint_attention_dim, device=self.device, dtype=dtype)
        else:
            ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.device))[0]
        clip = torch.cat([h1, h2], dim=-1).to(dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pe = torch.cat([clip, t5.to(dtype)], dim=-2)
        pooled = torch.cat([p1, p2], dim=-1).to(dtype)
        return TensorDict({PROMPT_EMBEDS: pe, POOLED_PROMPT_EMBEDS: pooled}, batch_size=[B], device=self.device)

    def pipeline_components(self) -> dict:
        return dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                    tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)


# ---- factories ----------------------------------------------------------------------------------------------
TINY_SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                       attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                       caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)
TINY_SD3_MAX_SEQUENCE_LENGTH = 8


def build_tiny_sd3(seed: int = 0, **denoiser_kwargs) -> T2IComponents:
    """Random-weight tiny SD3 (same classes as the real model): 77k-param transformer on 4×8×8 latents, a factor-2
    VAE (16×16 images, ``scaling_factor=1.5305, shift_factor=0.0609``), two CLIP-with-projection encoders (hidden
    16, projection 8) with a byte-level tokenizer (8 tokens), no T5. Deterministic in ``seed``; the global RNG is
    left untouched. For tests and ``--smoke`` runs.
    """
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_SD3_CONFIG).eval()
        vae = tiny_vae(4, scaling_factor=1.5305, shift_factor=0.0609)
        tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        te, te2 = tiny_clip_text_encoder(tok), tiny_clip_text_encoder(tok2)
    encoder = SD3TextEncoder(te, tok, te2, tok2, joint_attention_dim=TINY_SD3_CONFIG["joint_attention_dim"],
                             max_sequence_length=TINY_SD3_MAX_SEQUENCE_LENGTH)
    vae.requires_grad_(False)
    return T2IComponents("sd3", SD3Denoiser(transformer, **denoiser_kwargs), vae, encoder, info={"tiny": True})


def load_sd3(path: str | Path | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             use_t5: bool = True, max_sequence_length: int = 256, field: str = "model.path",
             **denoiser_kwargs) -> T2IComponents:
    """Load SD3 / SD3.5 from a local diffusers folder (``local_files_only=True``; nothing is downloaded).

    ``use_t5=False`` (or a folder without ``text_encoder_3``) skips T5 (zeros in its place, as diffusers does).
    A missing folder raises a one-line ``FileNotFoundError`` naming ``path`` and the recipe ``field``.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer

    root = check_local_model_dir(path, field)
    kw = dict(local_files_only=True)
    transformer = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    te = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    te2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype, **kw)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    tok2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw)
    te3 = tok3 = None
    if use_t5 and (root / "text_encoder_3").is_dir():
        from transformers import T5EncoderModel

        te3 = T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3", dtype=dtype, **kw)
        tok3 = AutoTokenizer.from_pretrained(root, subfolder="tokenizer_3", **kw)
    encoder = SD3TextEncoder(te, tok, te2, tok2, te3, tok3, joint_attention_dim=transformer.config.joint_attention_dim,
                             max_sequence_length=max_sequence_length)
    vae.requires_grad_(False).eval()
    comps = T2IComponents("sd3", SD3Denoiser(transformer.eval(), **denoiser_kwargs), vae, encoder,
                          info={"path": str(root), "t5": te3 is not None})
    if device is not None:
        for m in (comps.denoiser, comps.vae, comps.encoder):
            m.to(device)
    return comps


__all__ = ["SD3Denoiser", "SD3TextEncoder", "SD3_T_MIN", "SD3_LORA_TARGETS", "sd3_timestep", "build_tiny_sd3",
           "load_sd3", "TINY_SD3_CONFIG"]
