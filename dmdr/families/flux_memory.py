"""``dmdr train --dry-run`` for FLUX: the :class:`~dmdr.train.memory_estimate.MemoryEstimate` of a FLUX.1 /
FLUX.2-klein DMDR recipe, by the rules of :mod:`dmdr.train.memory_estimate` (weights + 12 bytes per trainable
parameter + the activations autograd saves, traced on the meta device with attention counted as a fused kernel;
a lower bound of the real peak).

The traces are FLUX's own: one image as H/16·W/16 packed tokens (64 / 128 channels) with ``model.max_sequence_length``
text tokens (T5 for FLUX.1, Qwen3 for FLUX.2) through the real transformer, and one differentiable decode of the real
VAE (``AutoencoderKL`` 16 channels / ``AutoencoderKLFlux2`` 32 channels) at ``model.resolution``.
"""
from __future__ import annotations

import torch


def flux_network_activation_bytes(name: str, resolution: int, dtype: torch.dtype, *, checkpointing: bool,
                                  text_tokens: int) -> tuple[int, int]:
    """(activation bytes of one image's forward with grad, parameter count) of the real FLUX transformer."""
    from dmdr.models.flux import flux1_image_ids, flux2_image_ids, flux2_text_ids
    from dmdr.models.flux_standins import flux_real_network
    from dmdr.models.standins import real_config
    from dmdr.train.memory_estimate import _meta, saved_activation_bytes

    cfg = real_config(name)
    n = cfg["network"]
    net = flux_real_network(name, dtype=dtype).requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    h2 = resolution // 16
    x = _meta((1, h2 * h2, n["in_channels"]), dtype)
    text = _meta((1, text_tokens, n["joint_attention_dim"]), dtype)
    t = _meta((1,), torch.float32)
    if cfg["family"] == "flux1":
        def fn():
            return net(hidden_states=x, encoder_hidden_states=text, timestep=t, guidance=_meta((1,), torch.float32),
                       pooled_projections=_meta((1, n["pooled_projection_dim"]), dtype),
                       img_ids=flux1_image_ids(h2, h2, "meta"), txt_ids=_meta((text_tokens, 3), torch.float32),
                       return_dict=False)[0]
    else:
        def fn():
            return net(hidden_states=x, encoder_hidden_states=text, timestep=t,
                       img_ids=flux2_image_ids(h2, h2, "meta"), txt_ids=flux2_text_ids(text_tokens, "meta"),
                       return_dict=False)[0]
    params = list(net.parameters())
    return saved_activation_bytes(fn, params), sum(p.numel() for p in params)


def flux_vae_decode_activation_bytes(name: str, resolution: int, dtype: torch.dtype, *, checkpointing: bool
                                     ) -> tuple[int, int]:
    """(activation bytes of one differentiable decode at ``resolution``, VAE parameter count)."""
    from dmdr.models.flux_standins import build_flux_vae
    from dmdr.models.standins import real_config
    from dmdr.train.memory_estimate import _meta, saved_activation_bytes

    cfg = real_config(name)
    with torch.device("meta"):
        vae = build_flux_vae(cfg).to(dtype)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    z = _meta((1, cfg["vae"]["latent_channels"], resolution // 8, resolution // 8), dtype, requires_grad=True)
    params = list(vae.parameters())
    return (saved_activation_bytes(lambda: vae.decode(z, return_dict=False)[0], params),
            sum(p.numel() for p in params))


def estimate_flux_memory(recipe, name: str):
    """The :class:`~dmdr.train.memory_estimate.MemoryEstimate` of a FLUX DMDR recipe on the shipped config ``name``."""
    from dmdr.models.flux_standins import flux_real_network, flux_real_text_encoders
    from dmdr.models.standins import quiet_diffusers
    from dmdr.train.memory_estimate import (DTYPE_BYTES, MemoryEstimate, adam_bytes, reward_param_count,
                                            trainable_param_counts)

    m = recipe.model
    wbytes = DTYPE_BYTES[m.dtype]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.dtype]
    res = m.resolution
    with quiet_diffusers():
        act_net, n_net = flux_network_activation_bytes(name, res, dtype, checkpointing=m.gradient_checkpointing,
                                                       text_tokens=m.max_sequence_length)
        act_dec, n_vae = flux_vae_decode_activation_bytes(name, res, dtype, checkpointing=m.vae_gradient_checkpointing)
        n_text = sum(sum(p.numel() for p in te.parameters()) for te in flux_real_text_encoders(name))
        net = flux_real_network(name)
    n_lora, n_full = trainable_param_counts(recipe, net, n_net)
    n_reward = reward_param_count(recipe)
    text_on_gpu = not m.offload_idle
    weights = (n_net * wbytes + (n_text * wbytes if text_on_gpu else 0) + n_vae * wbytes + n_reward * wbytes
               + 4 * (n_lora + n_full))
    peak_act = 0
    for st in recipe.stages:
        B = st.batch_size
        peak_act = max(peak_act, B * act_net, B * act_net + (B * act_dec if st.rewards else 0))
    detail = {"config": name, "resolution": res, "network_params": n_net, "text_encoder_params": n_text,
              "vae_params": n_vae, "reward_params": n_reward, "lora_params": n_lora, "full_generator_params": n_full,
              "activation_bytes_per_image_network": act_net, "activation_bytes_per_image_decode": act_dec,
              "text_encoders_on_gpu": text_on_gpu, "text_tokens": m.max_sequence_length}
    return MemoryEstimate(weights=int(weights), optimiser=int(adam_bytes(n_lora + n_full)),
                          activations=int(peak_act), detail=detail)


__all__ = ["estimate_flux_memory", "flux_network_activation_bytes", "flux_vae_decode_activation_bytes"]
