"""The real component configurations of SD3-Medium, SD3.5-Large and SDXL-base, and stand-ins built from them.

``dmdr/models/configs/<name>.json`` holds, per model, the configs of the denoiser network, the VAE (with its
``scaling_factor`` / ``shift_factor``), every text encoder (CLIP-L, OpenCLIP-bigG and, for SD3, T5-v1.1-XXL with
``dropout_rate 0.1``), the tokenizer lengths and, for SDXL, the tiny reward VAE (taesdxl, ``AutoencoderTiny``).

:func:`standin_components` builds a random-weight :class:`~dmdr.models.t2i.T2IComponents` from a real config,
**shrunk only in width and depth** (:func:`shrink_config`): hidden sizes, head counts, layer counts and block
counts go down; every class, flag, activation, latent channel count, number of VAE levels (so the factor-8
VAE), dropout rate, scaling/shift factor and tokenizer length is kept. A difference between a real checkpoint and
a stand-in is then only a matter of size. Tokenizers are byte-level and built in memory (no download), with the
real ``model_max_length``.

:func:`real_network` builds the full-size network (on the ``meta`` device: no memory) for parameter counts and
memory estimates; ``device="cuda"`` gives the random-weight real-size network the GPU benchmark times.

>>> comps = standin_components("sd3-medium", seed=0)
>>> comps.encoder.text_encoder_3.config.dropout_rate, comps.vae.config.shift_factor
(0.1, 0.0609)
"""
from __future__ import annotations

import contextlib
import copy
import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
MODELS = ("sd3-medium", "sd35-large", "sdxl-base")
STANDIN_RESOLUTION = 64
"""Image side of stand-in runs: the real factor-8 VAE gives 8×8 latents."""


@lru_cache(maxsize=None)
def _load(name: str) -> str:
    f = CONFIG_DIR / f"{name}.json"
    if not f.is_file():
        raise ValueError(f"unknown model config {name!r}; shipped: {', '.join(MODELS)}")
    return f.read_text()


def real_config(name: str) -> dict:
    """The shipped real configuration of ``name`` (a fresh copy)."""
    return json.loads(_load(name))


def _clip(cfg: dict, hidden: int) -> dict:
    return {**cfg, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_attention_heads": 2,
            "num_hidden_layers": 2, "projection_dim": hidden}


def shrink_config(name: str) -> dict:
    """The real config of ``name`` shrunk in width and depth only (see the module docstring).

    Widths: CLIP-L 768→16, CLIP-G 1280→32, T5 4096→64 (so the SD3 padding ``768+1280 ≤ 4096`` keeps its shape
    ``16+32 ≤ 64``), SD3 transformer 24/38 heads × 64 → 2 × 8, SDXL UNet (320, 640, 1280) → (16, 32, 64), VAE
    (128, 256, 512, 512) → (8, 16, 32, 32). Depths: 2 layers everywhere, one resnet per block.
    """
    cfg = copy.deepcopy(real_config(name))
    encs = cfg["text_encoders"]
    encs[0]["config"] = _clip(encs[0]["config"], 16)
    encs[1]["config"] = _clip(encs[1]["config"], 32)
    pooled = 32 if cfg["family"] == "sdxl" else 16 + 32
    if len(encs) > 2:
        encs[2]["config"] = {**encs[2]["config"], "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4,
                             "num_layers": 2}
    n = cfg["network"]
    if cfg["family"] == "sd3":
        n.update(num_layers=2, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                 joint_attention_dim=64, pooled_projection_dim=pooled)
    else:
        n.update(block_out_channels=[16, 32, 64], attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2],
                 layers_per_block=1, cross_attention_dim=16 + 32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=pooled + 6 * 8, norm_num_groups=8)
    cfg["vae"].update(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4)
    if "reward_vae" in cfg:
        cfg["reward_vae"].update(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4,
                                 num_encoder_blocks=[1, 1, 1, 1], num_decoder_blocks=[1, 1, 1, 1])
    return cfg


def _network(cfg: dict) -> nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if cfg["network_class"].startswith("Flux"):  # FLUX.1 / FLUX.2 (dmdr.models.flux_standins)
        from dmdr.models.flux_standins import _network as flux_network
        return flux_network(cfg)
    cls = {"SD3Transformer2DModel": SD3Transformer2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if cfg["network_class"] not in cls:  # other families' networks (Wan, Z-Image): the diffusers class by name
        import diffusers

        return getattr(diffusers, cfg["network_class"])(**cfg["network"])
    return cls[cfg["network_class"]](**cfg["network"])


def build_vae(cfg: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg["vae"])


def build_reward_vae(cfg: dict) -> nn.Module:
    """The tiny reward VAE (``AutoencoderTiny``, taesdxl's configuration) of ``cfg``."""
    from diffusers import AutoencoderTiny

    if "reward_vae" not in cfg:
        raise ValueError(f"{cfg['family']}: no tiny reward VAE in the shipped config (only SDXL has taesdxl)")
    return AutoencoderTiny(**cfg["reward_vae"])


def _text_encoder(spec: dict, tokenizer):
    import transformers

    cls = getattr(transformers, spec["class"])
    c = dict(spec["config"], vocab_size=len(tokenizer))
    if spec["class"] == "T5EncoderModel":
        c.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return cls(transformers.T5Config(**c))
    c.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
             pad_token_id=tokenizer.pad_token_id)
    return cls(transformers.CLIPTextConfig(**c))


def standin_components(name: str, *, seed: int = 0, with_reward_vae: bool = False, **denoiser_kwargs):
    """Random-weight :class:`~dmdr.models.t2i.T2IComponents` of ``name`` from :func:`shrink_config`.

    The text encoders and the VAE are in eval mode and frozen, as :func:`~dmdr.models.sd3.load_sd3` /
    :func:`~dmdr.models.sdxl.load_sdxl` return them; ``info["reward_vae"]`` holds a stand-in taesdxl when
    ``with_reward_vae``. Deterministic in ``seed``; the global RNG is left untouched.
    """
    from dmdr.models.sd3 import SD3Denoiser, SD3TextEncoder
    from dmdr.models.sdxl import SDXLDenoiser, SDXLTextEncoder
    from dmdr.models.t2i_components import T2IComponents
    from dmdr.models.tiny_text import tiny_clip_tokenizer

    if name.startswith("flux"):  # FLUX.1-dev / FLUX.2-klein stand-ins live in their own module
        from dmdr.models.flux_standins import flux_standin_components
        return flux_standin_components(name, seed=seed, **denoiser_kwargs)
    cfg = shrink_config(name)
    L = cfg["tokenizer_max_length"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _network(cfg).eval()
        vae = build_vae(cfg).eval().requires_grad_(False)
        toks = [tiny_clip_tokenizer(L), tiny_clip_tokenizer(L)]
        if len(cfg["text_encoders"]) > 2:
            toks.append(tiny_clip_tokenizer(cfg["t5_max_sequence_length"]))
        encs = [_text_encoder(spec, tok).eval() for spec, tok in zip(cfg["text_encoders"], toks)]
        info = {"standin": name, "config": cfg}
        if with_reward_vae:
            info["reward_vae"] = build_reward_vae(cfg).eval().requires_grad_(False)
    if cfg["family"] == "sd3":
        encoder = SD3TextEncoder(encs[0], toks[0], encs[1], toks[1], encs[2], toks[2],
                                 joint_attention_dim=cfg["network"]["joint_attention_dim"],
                                 max_sequence_length=cfg["t5_max_sequence_length"])
        denoiser = SD3Denoiser(net, **denoiser_kwargs)
    else:
        encoder = SDXLTextEncoder(encs[0], toks[0], encs[1], toks[1])
        denoiser = SDXLDenoiser(net, **denoiser_kwargs)
    return T2IComponents(cfg["family"], denoiser, vae, encoder, info=info)


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' info/warning logs (e.g. "modules that should be kept in float32" on ``.to(dtype)``)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def real_network(name: str, *, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The full-size denoiser network of ``name`` with random weights (``meta``: shapes only, no memory)."""
    cfg = real_config(name)
    with torch.device(device):
        net = _network(cfg)
    return net.to(dtype) if dtype is not None else net


__all__ = ["MODELS", "CONFIG_DIR", "STANDIN_RESOLUTION", "real_config", "shrink_config", "standin_components",
           "real_network", "build_vae", "build_reward_vae", "quiet_diffusers"]
