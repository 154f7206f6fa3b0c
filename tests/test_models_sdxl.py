"""SDXL adapter: ε-prediction contract, integer timesteps, the one-step 399 convention, CFG null cond, export."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dmdr.models.contract import Denoiser  # noqa: E402
from dmdr.models.sdxl import SDXL_ONE_STEP_T, SDXLDenoiser, build_tiny_sdxl, load_sdxl, sdxl_timestep  # noqa: E402
from dmdr.models.t2i import (POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TIME_IDS, SharedBaseT2I, decode_latents,  # noqa: E402
                             export_lora_diffusers, sample_t2i, t2i_grid)
from dmdr.paths import DDPMEps, scaled_linear_alphas_cumprod  # noqa: E402
from t2i_helpers import randomize as _randomize

PROMPTS = ["a cat", "a dog"]


def _record_timesteps(net):
    seen = []
    net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[1].detach().clone()), with_kwargs=True)
    return seen


def _cond(comps, prompts=PROMPTS):
    return comps.encoder.size_cond(comps.encoder(prompts), 16, 16)


def _x(B=2, seed=0):
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_contract_shape_and_ddpm_path():
    comps = build_tiny_sdxl(0)
    den = comps.denoiser
    assert isinstance(den, Denoiser) and isinstance(den.path, DDPMEps) and den.path.prediction == "epsilon"
    assert torch.equal(den.path.alphas_cumprod, scaled_linear_alphas_cumprod())
    out = den(_x(), torch.tensor([0.9, 0.3]), _cond(comps))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_integer_timesteps_and_one_step_399():
    comps = build_tiny_sdxl(0)
    seen = _record_timesteps(comps.denoiser.net)
    comps.denoiser(_x(4), torch.tensor([SDXL_ONE_STEP_T, 0.0004, 1.0, 0.5006]), _cond(comps, PROMPTS * 2))
    assert seen[-1].dtype == torch.long and seen[-1].tolist() == [399, 0, 999, 501]
    assert sdxl_timestep(torch.tensor([1.2, -0.1])).tolist() == [999, 0]
    grid = t2i_grid(comps.denoiser.path, 1)
    assert grid.tolist() == [0.399, 0.0] and comps.denoiser.path.index(grid[0]).item() == 399


def test_multi_step_grid_matches_official_integer_grid():
    path = build_tiny_sdxl(0).denoiser.path
    official = torch.linspace(999, 0, 5, dtype=torch.float64).round()  # noise2x0_sampler, shift 1
    assert torch.equal(path.index(t2i_grid(path, 4)), official.long())


def test_one_step_sample_is_x0_from_pure_noise_at_399():
    shared = SharedBaseT2I.from_components(build_tiny_sdxl(0), generator_lora=None)
    _randomize(shared.generator_parameters(), 1)
    seen = _record_timesteps(shared.denoiser.net)
    latents = sample_t2i(shared, None, PROMPTS, steps=1, height=16, width=16, seed=3, return_latents=True)
    assert len(seen) == 1 and seen[0].tolist() == [399, 399]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = shared.encode(PROMPTS, height=16, width=16)
    with torch.no_grad():
        eps = shared.generator()(noise, torch.full((2,), SDXL_ONE_STEP_T), cond)
    abar = scaled_linear_alphas_cumprod()[399].float()
    assert torch.allclose(latents, (noise - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-5)
    images = sample_t2i(shared, None, PROMPTS, steps=1, height=16, width=16, seed=3)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.allclose(images, decode_latents(shared.vae, latents), atol=1e-6)


def test_encoder_matches_diffusers_and_time_ids():
    comps = build_tiny_sdxl(0)
    pipe = comps.pipeline()
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                     do_classifier_free_guidance=True)
    cond = _cond(comps)
    assert torch.equal(cond[PROMPT_EMBEDS], pe) and torch.equal(cond[POOLED_PROMPT_EMBEDS], pooled)
    ref_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=pe.dtype,
                                     text_encoder_projection_dim=comps.encoder.text_encoder_2.config.projection_dim)
    assert torch.equal(cond[TIME_IDS], ref_ids.expand(2, 6))
    # dmdr's pipeline keeps the encoder's choice: the encoded "" (official), so diffusers' negatives match ours
    null = comps.encoder.null()
    assert torch.allclose(neg, null[PROMPT_EMBEDS].expand_as(neg), atol=1e-6) and neg.abs().sum() > 0
    assert torch.allclose(neg_pooled, null[POOLED_PROMPT_EMBEDS].expand_as(neg_pooled), atol=1e-6)


def test_null_cond_is_the_encoded_empty_prompt_with_cond_time_ids():
    # official train_sdxl_refl_deepspeed.py: neg_prompt_embed = compute_text_embeddings([""], ...), not zeros
    comps = build_tiny_sdxl(0)
    shared = SharedBaseT2I.from_components(comps, generator_lora=None)
    cond = shared.encode(PROMPTS, height=16, width=24)
    null = shared.null_cond(cond)
    empty = comps.encoder([""])
    assert null.batch_size == torch.Size([2])
    assert torch.equal(null[PROMPT_EMBEDS][1], empty[PROMPT_EMBEDS][0]) and null[PROMPT_EMBEDS].abs().sum() > 0
    assert torch.equal(null[POOLED_PROMPT_EMBEDS][0], empty[POOLED_PROMPT_EMBEDS][0])
    assert torch.equal(null[TIME_IDS], cond[TIME_IDS]) and cond[TIME_IDS][0].tolist() == [16, 24, 0, 0, 16, 24]
    # diffusers' inference default (force_zeros_for_empty_prompt) stays available
    comps2 = build_tiny_sdxl(0)
    comps2.encoder.zero_empty_prompt = True
    null2 = SharedBaseT2I.from_components(comps2, generator_lora=None).null_cond(cond)
    assert not null2[PROMPT_EMBEDS].any() and not null2[POOLED_PROMPT_EMBEDS].any()


def test_trainable_sets_and_gradient_isolation_with_conv_loras():
    shared = SharedBaseT2I.from_components(build_tiny_sdxl(0), generator_lora=None)
    gen, critic = shared.generator_parameters(), shared.critic_parameters()
    from peft.tuners.lora import Conv2d as LoraConv

    assert any(isinstance(m, LoraConv) for m in shared.denoiser.net.modules())  # conv1/conv2/... targets
    assert {id(p) for p in shared.parameters() if p.requires_grad} == {id(p) for p in gen + critic}
    _randomize(critic, 2)
    cond = shared.encode(PROMPTS, height=16, width=16)
    x = _x()
    t = torch.full((2,), SDXL_ONE_STEP_T)
    x0 = shared.path.to_x0(x, t, shared.generator()(x, t, cond))
    with torch.no_grad():
        tau = torch.tensor([0.5, 0.8])
        x_tau = shared.path.renoise(x0, tau, torch.randn_like(x0))
        real = shared.path.to_x0(x_tau, tau, shared.real_score(0.5)(x_tau, tau, cond))
        fake = shared.path.to_x0(x_tau, tau, shared.fake_score(2.0)(x_tau, tau, cond))
    (0.5 * ((x0 - (x0 - (fake - real)).detach()) ** 2).mean()).backward()
    assert all(p.grad is not None for p in gen) and any(p.grad.any() for p in gen)
    assert all(p.grad is None for p in critic)
    for p in gen:
        p.grad = None
    eps = torch.randn_like(x0)
    x_tau = shared.path.renoise(x0.detach(), tau, eps)
    ((shared.fake_score(2.0)(x_tau, tau, cond) - eps) ** 2).mean().backward()
    assert all(p.grad is None for p in gen) and all(p.grad is not None for p in critic)


def test_export_lora_loads_into_sdxl_pipeline(tmp_path):
    shared = SharedBaseT2I.from_components(build_tiny_sdxl(0), generator_lora=None)
    _randomize(shared.generator_parameters(), 1, std=0.05)
    export_lora_diffusers(shared, tmp_path, "sdxl")
    pipe = build_tiny_sdxl(0).pipeline()
    theirs = SDXLDenoiser(pipe.unet)
    cond = shared.encode(PROMPTS, height=16, width=16)
    x, t = _x(), torch.tensor([0.399, 0.7])
    with torch.no_grad():
        base = theirs(x, t, cond)
        pipe.load_lora_weights(tmp_path)
        ours = shared.generator()(x, t, cond)
        assert (ours - base).abs().max() > 1e-3
        assert torch.allclose(theirs(x, t, cond), ours, atol=1e-5)
        assert torch.allclose(theirs(x, t, cond, lora_scale=0.0), base, atol=1e-6)  # cross_attention_kwargs path


def test_load_sdxl_from_local_folder_and_missing_path(tmp_path):
    comps = build_tiny_sdxl(0)
    comps.pipeline().save_pretrained(tmp_path / "sdxl")
    loaded = load_sdxl(tmp_path / "sdxl")
    with torch.no_grad():
        a = comps.denoiser(_x(), torch.tensor([0.5, 0.2]), _cond(comps))
        b = loaded.denoiser(_x(), torch.tensor([0.5, 0.2]), _cond(loaded))
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*missing"):
        load_sdxl(tmp_path / "missing")
