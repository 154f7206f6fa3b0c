"""Wan2.1-T2V-1.3B at the model level: the shipped real config (parameter counts on the meta device), the stand-in
shrunk only in width/depth, UMT5 conditioning identical to WanPipeline, the per-channel VAE normalisation, the
flow-matching timestep, the LoRA export that WanPipeline.load_lora_weights loads, and loading a local folder."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("diffusers")

from dmdr.models.t2i import PROMPT_EMBEDS, SharedBaseT2I, clean_network_copy  # noqa: E402
from dmdr.models.wan import (WAN_NAME, WanDenoiser, build_wan_standin, decode_wan_latents, wan_timestep,  # noqa: E402
                             encode_wan_video, export_wan_lora, latent_frames, load_wan, real_wan_network,
                             shrink_wan_config, wan_real_config)

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDTH_DEPTH = {"num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "text_dim", "freq_dim",
               "d_model", "d_ff", "d_kv", "num_heads", "base_dim", "num_res_blocks"}
L = 16  # tokenizer length of the fast stand-in (the real 512 is checked separately)


@pytest.fixture(scope="module")
def comps():
    return build_wan_standin(seed=0, max_sequence_length=L)


def test_real_config_parameter_counts_on_meta():
    net = real_wan_network()
    assert next(net.parameters()).device.type == "meta"
    assert sum(p.numel() for p in net.parameters()) == 1_418_996_800  # "1.3B" (Wan2.1 reports 1.42 B)
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = wan_real_config()
    with torch.device("meta"):
        te = UMT5EncoderModel(UMT5Config(**cfg["text_encoders"][0]["config"]))
    assert sum(p.numel() for p in te.parameters()) == 5_680_910_336  # UMT5-XXL encoder
    assert cfg["max_sequence_length"] == 512 and cfg["network"]["patch_size"] == [1, 2, 2]


def test_standin_shrinks_only_width_and_depth():
    real, small = wan_real_config(), shrink_wan_config()
    for part in ("network", "vae"):
        assert set(real[part]) == set(small[part])
        assert {k for k in real[part] if real[part][k] != small[part][k]} <= WIDTH_DEPTH
    te_r, te_s = real["text_encoders"][0]["config"], small["text_encoders"][0]["config"]
    assert {k for k in te_r if te_r[k] != te_s[k]} <= WIDTH_DEPTH
    assert small["vae"]["latents_mean"] == real["vae"]["latents_mean"]
    assert small["vae"]["temperal_downsample"] == [False, True, True] and te_s["dropout_rate"] == 0.1
    full = build_wan_standin(seed=0)
    assert full.encoder.max_sequence_length == 512
    assert full.encoder.text_encoder.config.dropout_rate == 0.1
    assert full.vae.config.z_dim == 16 and full.denoiser.in_channels == 16


def test_encoder_matches_wanpipeline_and_zeroes_padding(comps):
    prompts = ["a  digit &amp; a cat\n moving", ""]
    cond = comps.encoder(prompts)
    pipe = comps.pipeline()
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L)
    assert torch.equal(cond[PROMPT_EMBEDS], ref)
    pe = cond[PROMPT_EMBEDS]
    n_tokens = (pe.abs().sum(-1) > 0).sum(1)
    assert n_tokens[1] == 2  # "" = <start> <end>: everything after the prompt is exactly zero
    assert torch.all(pe[1, 2:] == 0) and n_tokens[0] > 2


def test_denoiser_flow_matching_timestep_and_null_cond(comps):
    den = comps.denoiser
    cond = comps.encoder(["a", "b"])
    x, t = torch.randn(2, 16, 2, 8, 8), torch.tensor([0.25, 0.9])
    with torch.no_grad():
        v = den(x, t, cond)
        ref = den.net(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond[PROMPT_EMBEDS],
                      return_dict=False)[0]
    assert torch.equal(v, ref)
    x0 = den.path.to_x0(x, t, v)
    assert torch.allclose(x0, x - t.view(2, 1, 1, 1, 1) * v)  # x̂0 = x_t - t v  (t_min = 0)
    with pytest.raises(ValueError, match=r"video latents \(B, C, F, h, w\)"):
        den(torch.randn(2, 16, 8, 8), t, cond)
    den.set_null_embeddings(comps.encoder([""]))
    null = den.null_cond(cond)
    assert null.batch_size == torch.Size([2]) and set(null.keys()) == {PROMPT_EMBEDS}
    assert torch.equal(null[PROMPT_EMBEDS][1], comps.encoder([""])[PROMPT_EMBEDS][0])


def test_vae_per_channel_normalisation(comps):
    vae = comps.vae
    z_model = torch.randn(1, 16, 2, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        video = decode_wan_latents(vae, z_model)
        # WanPipeline: latents / (1 / std) + mean, then decode, then [-1, 1] -> [0, 1]
        ref = vae.decode(z_model / (1.0 / std) + mean, return_dict=False)[0]
    assert video.shape == (1, 3, 5, 32, 32) and latent_frames(5) == 2
    assert torch.allclose(video, (ref / 2 + 0.5).clamp(0, 1))
    with torch.no_grad():
        z = encode_wan_video(vae, video, sample=False)
        raw = vae.encode(video * 2 - 1).latent_dist.mode()
    assert z.shape == (1, 16, 2, 4, 4) and torch.allclose(z, (raw - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        latent_frames(6)


def test_lora_export_loads_into_wanpipeline(tmp_path, comps):
    c = build_wan_standin(seed=1, max_sequence_length=L)
    shared = SharedBaseT2I.from_components(c)
    with torch.no_grad():
        for p in shared.generator_parameters():
            p.normal_(0, 0.1)
    cond = shared.encode(["a cat"])
    x, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([0.7])
    with torch.no_grad():
        student, base = shared.generator()(x, t, cond), shared.teacher()(x, t, cond)
    assert (student - base).abs().max() > 1e-3
    f = export_wan_lora(shared.denoiser.net, tmp_path / "lora")
    assert f.name == "pytorch_lora_weights.safetensors"
    pipe = c.pipeline(network=clean_network_copy(shared.denoiser.net))
    with torch.no_grad():
        before = pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond[PROMPT_EMBEDS],
                                  return_dict=False)[0]
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        after = pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond[PROMPT_EMBEDS],
                                 return_dict=False)[0]
    assert torch.allclose(before, base, atol=1e-6)
    assert torch.allclose(after, student, atol=1e-5)
    frames = pipe("a cat", height=64, width=64, num_frames=5, num_inference_steps=1, guidance_scale=1.0,
                  output_type="np", max_sequence_length=L).frames
    assert frames.shape == (1, 5, 64, 64, 3)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        export_wan_lora(shared.denoiser.net, tmp_path / "x", adapter="nope")


def test_load_wan_from_a_local_folder(tmp_path, comps):
    comps.pipeline().save_pretrained(tmp_path / "wan")
    loaded = load_wan(tmp_path / "wan", max_sequence_length=L)
    assert isinstance(loaded.denoiser, WanDenoiser) and loaded.info["path"] == str(tmp_path / "wan")
    cond_a, cond_b = comps.encoder(["a cat"]), loaded.encoder(["a cat"])
    assert torch.equal(cond_a[PROMPT_EMBEDS], cond_b[PROMPT_EMBEDS])
    x, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        assert torch.allclose(comps.denoiser(x, t, cond_a), loaded.denoiser(x, t, cond_b), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        load_wan(tmp_path / "missing")
    assert WAN_NAME == "wan2.1-t2v-1.3b"


def test_time_path_matches_wans_shifted_flow_sigmas():
    """Wan's scheduler (UniPC, use_flow_sigmas) maps σ -> s σ / (1 + (s - 1) σ), the map of dmdr's few-step grid,
    and feeds int64(1000 σ); dmdr feeds 1000 t (less than one timestep apart)."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    from dmdr.models.wan import WAN_FLOW_SHIFT
    from dmdr.schedules import few_step_grid

    s = WAN_FLOW_SHIFT
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                  flow_shift=s)
    sch.set_timesteps(4)
    sig = sch.sigmas[:-1].double().numpy()
    base = sig / (s - (s - 1) * sig)  # the inverse of the shift map
    assert np.allclose(np.diff(base), np.diff(base)[0], atol=1e-6)  # the scheduler shifts a linspace
    grid = few_step_grid(4, shift=s).numpy()
    lin = np.linspace(1, 0, 5)
    assert np.allclose(grid[:-1], s * lin[:-1] / (1 + (s - 1) * lin[:-1]))  # dmdr: the same map
    t = torch.as_tensor(sig)
    assert torch.all((sch.timesteps.double() - 1000 * t).abs() < 1)
    assert torch.allclose(wan_timestep(t.float()), 1000 * t.float())
