"""Z-Image / Z-Image-Turbo (``model.family: zimage``): single-stream DiT, flow matching, Qwen3-4B captions.

Quirks (docs/families/zimage.md, :mod:`dmdr.models.zimage`):

* ``x̂0 = x_t − t·v`` (``t_min = 0``): ZImagePipeline's Euler step ends exactly at σ = 0, so any other
  ``model.t_min`` is refused.
* The network's time runs the other way (0 = noise) and its output is −v; the adapter handles both.
* Images are multiples of 16 pixels (VAE factor 8 × patch 2).
* Captions are padded Qwen3 ``hidden_states[-2]`` plus a mask, up to ``model.max_sequence_length`` tokens
  (the pipeline uses 512).
* The grid is :func:`~dmdr.schedules.few_step_grid`; with shift 3 it equals the Turbo scheduler's sigmas.
* The LoRA export goes through ``ZImagePipeline.save_lora_weights``.
* There is no tiny reward VAE: ``model.reward_vae`` is refused in smoke runs.

:meth:`ZImageFamily.memory` traces the real 6B transformer and the FLUX VAE on the meta device. Captions are taken
at their maximum length (``model.max_sequence_length``), so the activations are an upper estimate for that part.
"""
from __future__ import annotations

import torch

from dmdr.families.diffusers_t2i import DTYPES, Components, DiffusersT2IFamily

PATCH_PIXELS = 16  # VAE factor 8 × transformer patch 2


class ZImageFamily(DiffusersT2IFamily):
    name = "zimage"
    config_names = ("z-image",)

    def check_model(self, recipe) -> None:
        m = recipe.model
        if abs(m.t_min) > 1e-12:
            raise ValueError(f"model.t_min={m.t_min}: Z-Image's Euler step is x̂0 = x_t - t·v (ZImagePipeline ends at "
                             f"σ = 0); set model.t_min: 0.0")
        if m.resolution % PATCH_PIXELS:
            raise ValueError(f"model.resolution={m.resolution}: Z-Image needs a multiple of {PATCH_PIXELS} "
                             f"(VAE factor 8 × patch 2), e.g. {max(PATCH_PIXELS, m.resolution // 16 * 16)}")
        if m.smoke and m.reward_vae is not None:
            raise ValueError("model.reward_vae: Z-Image has no tiny reward VAE stand-in; drop model.reward_vae for "
                             "--smoke (a real run may point it at a local AutoencoderTiny folder for the FLUX VAE)")

    def denoiser_kwargs(self, recipe) -> dict:
        return {"t_min": recipe.model.t_min}

    def standin(self, recipe) -> Components:
        from dmdr.models.zimage import zimage_standin_components

        comps = zimage_standin_components(seed=recipe.seed, **self.denoiser_kwargs(recipe))
        enc = comps.encoder
        enc.max_sequence_length = min(recipe.model.max_sequence_length, enc.max_sequence_length)
        return Components(comps)

    def load_local(self, recipe) -> Components:
        from dmdr.models.zimage import load_zimage

        m = recipe.model
        dtype = DTYPES[m.dtype]
        return Components(load_zimage(m.path, dtype=dtype, max_sequence_length=m.max_sequence_length, t_min=m.t_min),
                          dtype, None)

    def memory(self, recipe):
        """:class:`~dmdr.train.memory_estimate.MemoryEstimate` of the recipe at real size (docs/scale.md's parts):
        weights (transformer, Qwen3-4B, VAE, rewards in ``model.dtype``; LoRAs in float32), AdamW state, and the
        activations of one image traced on the meta device times the batch."""
        from dmdr.models.standins import quiet_diffusers

        with quiet_diffusers():
            return _estimate(recipe, self.config_name(recipe))


def _estimate(recipe, name: str):
    from dmdr.models.zimage import real_zimage_network, zimage_config
    from dmdr.train.memory_estimate import (DTYPE_BYTES, MemoryEstimate, adam_bytes, reward_param_count,
                                            saved_activation_bytes, trainable_param_counts,
                                            vae_decode_activation_bytes)

    m = recipe.model
    cfg = zimage_config()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.dtype]
    wbytes = DTYPE_BYTES[m.dtype]
    net = real_zimage_network(dtype=dtype).requires_grad_(True)
    if m.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    h, L = m.resolution // 8, m.max_sequence_length
    x = [torch.empty(cfg["network"]["in_channels"], 1, h, h, device="meta", dtype=dtype)]
    cap = [torch.empty(L, cfg["network"]["cap_feat_dim"], device="meta", dtype=dtype)]
    t = torch.empty(1, device="meta")
    params = list(net.parameters())
    act_net = saved_activation_bytes(lambda: net(x, t, cap, return_dict=False)[0], params)
    n_net = sum(p.numel() for p in params)
    act_dec, n_vae = vae_decode_activation_bytes(name, m.resolution, dtype, checkpointing=m.vae_gradient_checkpointing)
    n_text = cfg["text_encoder"]["parameters"]
    n_lora, n_full = trainable_param_counts(recipe, net, n_net)
    n_reward = reward_param_count(recipe)
    text_on_gpu = not m.offload_idle
    weights = (n_net * wbytes + (n_text * wbytes if text_on_gpu else 0) + n_vae * wbytes + n_reward * wbytes
               + 4 * (n_lora + n_full))
    peak = max(max(st.batch_size * act_net, st.batch_size * act_net + (st.batch_size * act_dec if st.rewards else 0))
               for st in recipe.stages)
    detail = {"config": name, "resolution": m.resolution, "caption_tokens": L, "network_params": n_net,
              "text_encoder_params": n_text, "vae_params": n_vae, "reward_vae_params": 0, "reward_params": n_reward,
              "lora_params": n_lora, "full_generator_params": n_full, "activation_bytes_per_image_network": act_net,
              "activation_bytes_per_image_decode": act_dec, "text_encoders_on_gpu": text_on_gpu}
    return MemoryEstimate(weights=int(weights), optimiser=int(adam_bytes(n_lora + n_full)), activations=int(peak),
                          detail=detail)


__all__ = ["ZImageFamily"]
