"""SDXL-base (``model.family: sdxl``): UNet, DDPM ε-prediction, CLIP-L + OpenCLIP-bigG, ``time_ids``.

Quirks (docs/architecture.md, docs/models.md): the one-step grid is ``[0.399, 0]`` (network timestep 399 on a
pure-noise input, DMD2/DMDR; :func:`~dmdr.models.t2i_sampling.t2i_grid`); the official generator is a second,
full-weights UNet (``generator.lora: null`` + ``generator.init``, DMD2's ODE-pretrained 1-step UNet); rewards may
decode with taesdxl (``model.reward_vae``); the VAE overflows in fp16, so it decodes in float32 unless the base is
bf16.
"""
from __future__ import annotations

import torch

from dmdr.families.diffusers_t2i import DTYPES, Components, DiffusersT2IFamily


class SDXLFamily(DiffusersT2IFamily):
    name = "sdxl"
    config_names = ("sdxl-base",)

    def load_local(self, recipe) -> Components:
        from dmdr.models.sdxl import load_sdxl

        dtype = DTYPES[recipe.model.dtype]
        # SDXL's VAE overflows in fp16 (NaNs): decode in float32 unless the base is bf16
        vae_dtype = torch.float32 if dtype == torch.float16 else None
        return Components(load_sdxl(recipe.model.path, dtype=dtype), dtype, vae_dtype)


__all__ = ["SDXLFamily"]
