"""Peak GPU memory of a Wan2.1 video DMDR recipe, estimated before anything is loaded (``dmdr train --dry-run``).

The same three parts as :mod:`dmdr.train.memory_estimate` (weights + optimiser + saved activations, a lower bound),
with the video shapes: the real ``WanTransformer3DModel`` and ``AutoencoderKLWan`` are traced on the ``meta``
device (no memory, no weights) on one clip of latents (1, 16, F', H/8, W/8) with F' = (F − 1)/4 + 1 and 512
UMT5 tokens, attention counted as a fused kernel keeps it (q, k, v, output, float32 log-sum-exp). The reward
decode (stages with rewards) decodes all F frames differentiably. Counts come from
``dmdr/models/configs/<model.config>.json``.
"""
from __future__ import annotations

import torch

from dmdr.train.memory_estimate import (DTYPE_BYTES, MemoryEstimate, _meta, adam_bytes, reward_param_count,
                                        saved_activation_bytes, trainable_param_counts)


def wan_activation_bytes(name: str, height: int, width: int, num_frames: int, dtype: torch.dtype, *,
                         checkpointing: bool, text_tokens: int = 512) -> tuple[int, int]:
    """(saved bytes of one clip's transformer forward with grad, transformer parameter count)."""
    from dmdr.models.wan import latent_frames, real_wan_network, wan_real_config

    n = wan_real_config(name)["network"]
    net = real_wan_network(name, dtype=dtype).requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    x = _meta((1, n["in_channels"], latent_frames(num_frames), height // 8, width // 8), dtype)
    fn = lambda: net(hidden_states=x, timestep=_meta((1,), torch.float32),  # noqa: E731
                     encoder_hidden_states=_meta((1, text_tokens, n["text_dim"]), dtype), return_dict=False)[0]
    params = list(net.parameters())
    return saved_activation_bytes(fn, params), sum(p.numel() for p in params)


def wan_decode_activation_bytes(name: str, height: int, width: int, num_frames: int, dtype: torch.dtype
                                ) -> tuple[int, int]:
    """(saved bytes of one clip's differentiable VAE decode, VAE parameter count)."""
    from dmdr.models.wan import build_wan_vae, latent_frames, wan_real_config

    cfg = wan_real_config(name)
    with torch.device("meta"):
        vae = build_wan_vae(cfg).to(dtype)
    z = _meta((1, cfg["vae"]["z_dim"], latent_frames(num_frames), height // 8, width // 8), dtype, requires_grad=True)
    params = list(vae.parameters())
    return saved_activation_bytes(lambda: vae.decode(z, return_dict=False)[0], params), sum(p.numel() for p in params)


def umt5_params(name: str) -> int:
    from transformers import UMT5Config, UMT5EncoderModel

    from dmdr.models.wan import wan_real_config

    with torch.device("meta"):
        te = UMT5EncoderModel(UMT5Config(**wan_real_config(name)["text_encoders"][0]["config"]))
    return sum(p.numel() for p in te.parameters())


def estimate_wan_memory(recipe, name: str) -> MemoryEstimate:
    """The :class:`~dmdr.train.memory_estimate.MemoryEstimate` of a Wan recipe (see the module docstring).
    The VAE is counted in float32 (Wan's pipeline keeps it there)."""
    from dmdr.models.standins import quiet_diffusers
    from dmdr.models.wan import real_wan_network

    m = recipe.model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.dtype]
    wbytes = DTYPE_BYTES[m.dtype]
    H, W, F = m.resolution, m.width or m.resolution, m.num_frames
    with quiet_diffusers():
        act_net, n_net = wan_activation_bytes(name, H, W, F, dtype, checkpointing=m.gradient_checkpointing,
                                              text_tokens=m.max_sequence_length)
        has_rewards = any(st.rewards for st in recipe.stages)
        F_dec = F if m.reward_frames is None else 4 * (m.reward_frames - 1) + 1  # model.reward_frames (causal VAE)
        act_dec, n_vae = wan_decode_activation_bytes(name, H, W, F_dec, torch.float32) if has_rewards else (0, 0)
        if not has_rewards:
            from dmdr.models.wan import build_wan_vae, wan_real_config

            with torch.device("meta"):
                n_vae = sum(p.numel() for p in build_wan_vae(wan_real_config(name)).parameters())
        n_text = umt5_params(name)
        net = real_wan_network(name)
    n_lora, n_full = trainable_param_counts(recipe, net, n_net)
    n_reward = reward_param_count(recipe)
    text_on_gpu = not m.offload_idle
    weights = (n_net * wbytes + (n_text * wbytes if text_on_gpu else 0) + n_vae * 4 + n_reward * wbytes
               + 4 * (n_lora + n_full))
    peak = 0
    for st in recipe.stages:
        B = st.batch_size
        peak = max(peak, B * act_net, B * act_net + (B * act_dec if st.rewards else 0))
    detail = {"config": name, "resolution": f"{H}x{W}x{F}", "reward_decode_frames": F_dec if has_rewards else 0,
              "network_params": n_net, "text_encoder_params": n_text,
              "vae_params": n_vae, "reward_params": n_reward, "lora_params": n_lora, "full_generator_params": n_full,
              "activation_bytes_per_clip_network": act_net, "activation_bytes_per_clip_decode": act_dec,
              "text_encoders_on_gpu": text_on_gpu}
    return MemoryEstimate(weights=int(weights), optimiser=int(adam_bytes(n_lora + n_full)), activations=int(peak),
                          detail=detail)


__all__ = ["estimate_wan_memory", "wan_activation_bytes", "wan_decode_activation_bytes", "umt5_params"]
