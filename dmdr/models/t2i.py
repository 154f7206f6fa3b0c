"""The text-to-image model pieces, one import away (the modules below hold them; this name is kept for callers
written before the split of issue 12):

* :mod:`dmdr.models.t2i_components` — what a family supplies: ``DiffusersDenoiser``, ``TextEncoderStack``,
  ``T2IComponents``, ``LoraSpec``, the conditioning keys, loading helpers;
* :mod:`dmdr.models.prompt_cache` — ``PromptEmbeddingCache`` (conditions);
* :mod:`dmdr.models.vae` — ``decode_latents`` / ``encode_images`` (decode for rewards);
* :mod:`dmdr.models.shared_base` — ``SharedBaseT2I``, one frozen base + generator/critic LoRA (build);
* :mod:`dmdr.models.t2i_sampling` — ``t2i_grid``, ``sample_t2i`` (time path, grid, sample);
* :mod:`dmdr.models.t2i_export` — LoRA / full-model export to diffusers (export);
* :mod:`dmdr.models.tiny_text` — tiny in-memory tokenizers, text encoders and VAEs (stand-ins, tests).

The trainers do not import these: they hold a :class:`~dmdr.families.base.Family` (docs/architecture.md).
"""
from __future__ import annotations

from dmdr.models.prompt_cache import PromptEmbeddingCache
from dmdr.models.shared_base import SharedBaseT2I, adapter_aware_checkpoint
from dmdr.models.t2i_components import (CRITIC, GENERATOR, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TIME_IDS,
                                        DiffusersDenoiser, LoraSpec, T2IComponents, TextEncoderStack,
                                        check_local_model_dir, clean_network_copy, load_network_weights,
                                        load_tiny_autoencoder)
from dmdr.models.t2i_export import (LORA_WEIGHT_NAME, export_full_model, export_generator, export_lora_diffusers,
                                    merged_state_dict)
from dmdr.models.t2i_sampling import SDXL_ONE_STEP_INDEX, sample_t2i, t2i_grid
from dmdr.models.tiny_text import (TINY_TOKENIZER_MAX_LENGTH, byte_clip_vocab, tiny_clip_text_encoder,
                                   tiny_clip_tokenizer, tiny_vae)
from dmdr.models.vae import decode_latents, encode_images, vae_scale_factor

__all__ = [
    "PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "TIME_IDS", "GENERATOR", "CRITIC", "LoraSpec", "PromptEmbeddingCache",
    "DiffusersDenoiser", "TextEncoderStack", "T2IComponents", "SharedBaseT2I", "vae_scale_factor", "decode_latents",
    "encode_images", "t2i_grid", "sample_t2i", "export_lora_diffusers", "export_full_model", "merged_state_dict",
    "export_generator", "load_network_weights", "load_tiny_autoencoder", "LORA_WEIGHT_NAME",
    "clean_network_copy", "SDXL_ONE_STEP_INDEX", "adapter_aware_checkpoint", "byte_clip_vocab", "tiny_clip_tokenizer",
    "tiny_clip_text_encoder", "tiny_vae", "check_local_model_dir", "TINY_TOKENIZER_MAX_LENGTH",
]
