"""Tiny random text-to-image components built in memory (tests, stand-ins): byte-level CLIP tokenizers and small
random CLIP text encoders / VAEs. No download, no files."""
from __future__ import annotations

from dmdr.rewards.tokenizers import bytes_to_unicode

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



__all__ = ["TINY_TOKENIZER_MAX_LENGTH", "byte_clip_vocab", "tiny_clip_tokenizer", "tiny_clip_text_encoder", "tiny_vae"]
