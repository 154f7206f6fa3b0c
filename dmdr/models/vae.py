"""VAE decoding and encoding of the text-to-image families (what rewards and grids read)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


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



__all__ = ["vae_scale_factor", "decode_latents", "encode_images"]
