"""FLUX.1-dev and FLUX.2-klein adapters (dmdr.models.flux): packing, the latent normalisation of FLUX.2, the time
shift, the guidance embedding of the real score, the diffusers pipelines' own encode/denoise, local loading and the
LoRA export that FluxPipeline / Flux2KleinPipeline load. Stand-ins keep the real configs (shrunk in width/depth)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("diffusers")

from dmdr.models.flux import (FLUX_T_MIN, GUIDANCE, Flux2Denoiser, Flux2LatentVAE, FluxDenoiser,  # noqa: E402
                              FluxSharedBase, GuidanceView, export_flux_lora, flux1_mu, flux1_shift, flux2_mu,
                              flux2_shift, load_flux1, load_flux2_klein, pack_latents, patchify, unpack_latents,
                              unpatchify)
from dmdr.models.flux_standins import (FLUX_MODELS, flux_real_network, flux_real_text_encoders,  # noqa: E402
                                       flux_standin_components, shrink_flux_config)
from dmdr.models.standins import real_config  # noqa: E402
from dmdr.models.t2i import PROMPT_EMBEDS, decode_latents, sample_t2i  # noqa: E402
from dmdr.paths import FlowMatching  # noqa: E402
from dmdr.scores import distribution_matching_targets, sample_cfg_scale  # noqa: E402
from t2i_helpers import randomize  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["a red cube", "a cat"]
SMALL = ("flux1-dev", "flux2-klein-4b")


@pytest.fixture(scope="module")
def comps():
    return {n: flux_standin_components(n, seed=0) for n in SMALL}


def _x(C, seed=0, h=8, w=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, C, h, w, generator=g, dtype=dtype), torch.tensor([0.9, 0.35], dtype=dtype)


# ---- conversions (float64) ----------------------------------------------------------------------------------------
def test_pack_unpack_round_trip_and_equal_the_pipelines_packing():
    from diffusers import Flux2KleinPipeline, FluxPipeline

    x = torch.randn(3, 16, 6, 10, dtype=torch.float64)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 15, 64)
    assert torch.equal(unpack_latents(tokens, 6, 10), x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 16, 6, 10))
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 48, 80, 8), x)
    # FLUX.2's patchify + pack is the same permutation
    y = torch.randn(2, 32, 4, 8, dtype=torch.float64)
    assert torch.equal(pack_latents(y), Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(y)))
    assert torch.equal(unpatchify(patchify(y)), y) and torch.equal(patchify(y), Flux2KleinPipeline._patchify_latents(y))
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.zeros(1, 16, 5, 8))


def test_flux2_latent_normalisation_round_trip_and_matches_the_pipeline(comps):
    vae = comps["flux2-klein-4b"].vae
    assert isinstance(vae, Flux2LatentVAE) and vae.config.scaling_factor == 1.0 and vae.config.shift_factor == 0.0
    bn = vae.vae.bn
    assert bn.num_features == 128 and bn.running_mean.abs().sum() > 0  # stand-in statistics are not the identity
    z = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    vae64 = Flux2LatentVAE(vae.vae.double())
    try:
        n = vae64.normalize(z)
        assert torch.allclose(vae64.denormalize(n), z, atol=1e-12, rtol=0)
        # the pipeline normalises the patchified latents: (patchify(z) - mean) / sqrt(var + eps)
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.vae.config.batch_norm_eps)
        assert torch.allclose(patchify(n), (patchify(z) - mean) / std, atol=1e-12, rtol=0)
    finally:
        vae.vae.float()


def test_velocity_x0_conversions_float64():
    """x_t = (1-t) x0 + t ε, v = ε - x0 ⇒ x̂0 = x_t - t v exactly (t_min = 0), and packing commutes with it."""
    path = FlowMatching(t_min=FLUX_T_MIN)
    x0, eps = torch.randn(2, 16, 4, 4, dtype=torch.float64), torch.randn(2, 16, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.8, 0.05], dtype=torch.float64)
    x_t = path.renoise(x0, t, eps)
    v = path.target(x0, eps, t)
    assert torch.allclose(v, eps - x0, atol=1e-14)
    assert torch.allclose(path.to_x0(x_t, t, v), x0, atol=1e-14)
    tv = t.view(-1, 1, 1)
    assert torch.allclose(pack_latents(x_t) - tv * pack_latents(v), pack_latents(x0), atol=1e-14)


def test_time_shift_equals_the_pipelines_dynamic_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from dmdr.models.flux import flux1_scheduler
    from dmdr.schedules import few_step_grid

    assert flux1_mu(4096) == pytest.approx(calculate_shift(4096)) == pytest.approx(1.15)
    assert flux2_mu(4096, 4) == pytest.approx(compute_empirical_mu(4096, 4))
    assert flux2_mu(9000, 4) == pytest.approx(compute_empirical_mu(9000, 4))
    assert flux1_shift(1024, 1024) == pytest.approx(math.exp(1.15))
    assert flux1_shift(1024, 1024) == pytest.approx(3.158, abs=1e-3)
    assert flux2_shift(1024, 1024, 4) == pytest.approx(9.886, abs=1e-3)
    # dmdr's shifted grid at S = e^mu equals the scheduler's exponential time shift of the same unshifted times
    sched = flux1_scheduler()
    mu = flux1_mu(1024)
    grid = few_step_grid(4, flux1_shift(512, 512), 0.0)
    base = torch.linspace(1, 0, 5, dtype=torch.float64)[:-1]
    ref = torch.tensor([sched.time_shift(mu, 1.0, torch.tensor(float(b), dtype=torch.float64)) for b in base])
    assert torch.allclose(grid[:-1], ref, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 16"):
        flux1_shift(1000, 1024)


# ---- shapes and the diffusers pipelines ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_shapes(comps, name):
    c = comps[name]
    C = 16 if name == "flux1-dev" else 32
    assert c.denoiser.in_channels == C and c.denoiser.path.t_min == 0.0
    cond = c.encoder(PROMPTS)
    pe = cond[PROMPT_EMBEDS]
    assert pe.shape[:2] == (2, 512)
    if name == "flux1-dev":
        assert pe.shape[-1] == 64 and cond["pooled_prompt_embeds"].shape == (2, 16)
    else:
        assert pe.shape[-1] == 3 * 16 and "pooled_prompt_embeds" not in cond.keys()
    x, t = _x(C, h=8, w=12)
    with torch.no_grad():
        assert c.denoiser(x, t, cond).shape == x.shape
    assert decode_latents(c.vae, x).shape == (2, 3, 64, 96)


def test_flux1_denoiser_equals_one_fluxpipeline_step(comps):
    """FluxPipeline (its own encode_prompt, packing, ids, guidance 3.5) one Euler step from σ = 1 = x - v(x, 1)."""
    c = comps["flux1-dev"]
    pipe = c.pipeline()
    x, _ = _x(16, seed=3)
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=1, guidance_scale=3.5, height=64, width=64,
                   latents=pack_latents(x), output_type="latent").images
        v = c.denoiser(x, torch.ones(2), c.encoder(PROMPTS))
    assert torch.allclose(out, pack_latents(x - v), atol=1e-5)
    with torch.no_grad():  # and the guidance value matters
        other = pipe(PROMPTS, num_inference_steps=1, guidance_scale=7.0, height=64, width=64,
                     latents=pack_latents(x), output_type="latent").images
    assert (other - out).abs().max() > 1e-4


def test_flux2_denoiser_with_cfg_equals_one_flux2kleinpipeline_step(comps):
    """Flux2KleinPipeline (Qwen3 chat template, layers 9/18/27, true CFG 4 with "" as negative) one step from σ = 1,
    denormalised: equals dmdr's CFG prediction with the encoded "" as the unconditional branch."""
    from dmdr.scores import cfg_prediction

    c = comps["flux2-klein-4b"]
    pipe = c.pipeline()
    x, _ = _x(32, seed=4)
    t = torch.ones(2)
    den = c.denoiser
    den.set_null_embeddings(c.encoder([""]))
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, num_inference_steps=1, guidance_scale=4.0, height=64, width=64,
                   latents=patchify(x), output_type="latent").images  # the pipeline takes patchified latents
        cond = c.encoder(PROMPTS)
        v = cfg_prediction(den, x, t, cond, den.null_cond(cond), 4.0)
    assert torch.allclose(out, c.vae.denormalize(x - v), atol=1e-5)


# ---- guidance -----------------------------------------------------------------------------------------------------
def _record(net):
    calls = []

    def hook(module, args, kwargs):
        g = kwargs.get("guidance")
        calls.append({"batch": kwargs["hidden_states"].shape[0], "guidance": None if g is None else g.clone()})

    net.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_flux1_real_score_is_one_pass_at_the_teacher_guidance_and_student_uses_its_fixed_guidance():
    c = flux_standin_components("flux1-dev", seed=0)
    shared = FluxSharedBase.from_components(c, guidance_real=5.0)
    randomize(shared.critic_parameters(), 2)
    randomize(shared.generator_parameters(), 1)
    calls = _record(shared.denoiser.net)
    cond = shared.encode(PROMPTS)
    x, t = _x(16)
    assert sample_cfg_scale(1.0, 0.5) == 1.0  # the FLUX.1 recipe's dmd.cfg: the trainer draws no CFG scale
    with torch.no_grad():
        x0 = shared.path.to_x0(x, t, shared.generator()(x, t, cond))
        assert len(calls) == 1 and torch.equal(calls[0]["guidance"], torch.full((2,), 3.5))
        calls.clear()
        td = distribution_matching_targets(x0, shared.real_score(0.5), shared.fake_score(2.0), cond,
                                           tau=torch.tensor([0.7, 0.4]), noise=torch.randn_like(x0),
                                           uncond=None, cfg_scale=1.0)
    assert [k["batch"] for k in calls] == [2, 2]  # exactly one pass each for the real and the fake score
    assert torch.equal(calls[0]["guidance"], torch.full((2,), 5.0))   # real: the teacher's guidance embedding
    assert torch.equal(calls[1]["guidance"], torch.full((2,), 3.5))   # fake: the student's fixed guidance
    assert not torch.equal(td["x0_real"], td["x0_fake"])
    # the real score's value is the guidance-5 evaluation of the same adapter view
    with torch.no_grad():
        direct = shared.denoiser.path.to_x0(td["x_t"], td["t"], GuidanceView(shared.real_score(0.5).view, 5.0)(
            td["x_t"], td["t"], cond))
        at35 = shared.path.to_x0(td["x_t"], td["t"], shared.real_score(0.5).view(td["x_t"], td["t"], cond))
    assert torch.equal(direct, td["x0_real"]) and (at35 - td["x0_real"]).abs().max() > 1e-5
    assert isinstance(shared.teacher(), GuidanceView) and shared.teacher().guidance == 5.0
    assert GUIDANCE not in cond.keys()  # the view does not write into the caller's conditioning


def test_guidance_per_sample_in_cond_and_flux2_has_no_guidance_embedding(comps):
    c1 = comps["flux1-dev"]
    assert c1.denoiser.has_guidance_embedding and c1.denoiser.guidance == 3.5
    cond = c1.encoder(PROMPTS)
    cond[GUIDANCE] = torch.tensor([3.5, 3.5])
    x, t = _x(16)
    with torch.no_grad():
        assert torch.equal(c1.denoiser(x, t, cond), c1.denoiser(x, t, c1.encoder(PROMPTS)))
    c2 = comps["flux2-klein-4b"]
    assert real_config("flux2-klein-4b")["network"]["guidance_embeds"] is False
    assert not c2.denoiser.has_guidance_embedding and c2.denoiser.guidance_input(cond, 2, "cpu") is None
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxSharedBase.from_components(flux_standin_components("flux2-klein-4b"), guidance_real=4.0)
    shared = FluxSharedBase.from_components(flux_standin_components("flux2-klein-4b"))
    calls = _record(shared.denoiser.net)
    cond2 = shared.encode(PROMPTS)
    x2, t2 = _x(32)
    with torch.no_grad():  # true CFG on the real score (method.md §2.5): one batched pass of 2B, no guidance input
        distribution_matching_targets(x2, shared.real_score(0.0), shared.fake_score(2.0), cond2,
                                      tau=torch.tensor([0.7, 0.4]), noise=torch.randn_like(x2),
                                      uncond=shared.null_cond(cond2), cfg_scale=4.0)
    assert [k["batch"] for k in calls] == [4, 2] and all(k["guidance"] is None for k in calls)


# ---- export -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_export_lora_loads_into_the_diffusers_pipeline_and_matches_the_generator(tmp_path, name):
    shared = FluxSharedBase.from_components(flux_standin_components(name, seed=0))
    randomize(shared.generator_parameters(), 1)
    randomize(shared.critic_parameters(), 2)
    weights = export_flux_lora(shared, tmp_path)
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(shared.generator_parameters()) and all(k.startswith("transformer.") for k in keys)
    if name == "flux2-klein-4b":
        assert any("to_qkv_mlp_proj" in k for k in keys)
    clean = flux_standin_components(name, seed=0)
    pipe = clean.pipeline()
    theirs = type(clean.denoiser)(pipe.transformer, **({"guidance": 3.5} if name == "flux1-dev" else {}))
    x, t = _x(clean.denoiser.in_channels)
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        base = theirs(x, t, cond)
        assert torch.equal(base, shared.teacher()(x, t, cond))
        pipe.load_lora_weights(tmp_path)
        ours = shared.generator()(x, t, cond)
        assert (ours - base).abs().max() > 1e-3
        assert torch.allclose(theirs(x, t, cond), ours, atol=1e-5)
        assert torch.allclose(theirs(x, t, cond, lora_scale=0.0), base, atol=1e-6)


# ---- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_from_local_folders_matches_and_refuses_the_distilled_klein(tmp_path):
    for name, loader in (("flux1-dev", load_flux1), ("flux2-klein-4b", load_flux2_klein)):
        c = flux_standin_components(name, seed=0)
        folder = tmp_path / name
        c.pipeline().save_pretrained(folder)
        loaded = loader(folder)
        x, t = _x(c.denoiser.in_channels)
        with torch.no_grad():
            a = c.denoiser(x, t, c.encoder(PROMPTS))
            b = loaded.denoiser(x, t, loaded.encoder(PROMPTS))
            assert torch.allclose(a, b, atol=1e-6)
            assert torch.allclose(decode_latents(c.vae, x), decode_latents(loaded.vae, x), atol=1e-6)
    index = folder / "model_index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "is_distilled": True}))
    with pytest.raises(ValueError, match="step-distilled FLUX.2-klein"):
        load_flux2_klein(folder)
    assert load_flux2_klein(folder, allow_distilled=True).info["is_distilled"] is True
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*nope"):
        load_flux1(tmp_path / "nope")


def test_sample_with_the_shared_base_uses_the_shifted_grid(comps):
    shared = FluxSharedBase.from_components(flux_standin_components("flux2-klein-4b", seed=0))
    randomize(shared.generator_parameters(), 1)
    seen = []
    shared.denoiser.net.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"][0].item()),
                                                  with_kwargs=True)
    S = flux2_shift(64, 64, 2)
    images = sample_t2i(shared, None, PROMPTS, steps=2, shift=S, height=64, width=64, seed=0)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert seen == pytest.approx([1.0, S * 0.5 / (1 + (S - 1) * 0.5)], abs=1e-6)


# ---- the real configurations --------------------------------------------------------------------------------------
WIDTH_DEPTH = {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim",
               "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_single_layers", "attention_head_dim",
               "axes_dims_rope", "joint_attention_dim", "pooled_projection_dim", "block_out_channels",
               "layers_per_block", "norm_num_groups", "num_key_value_heads", "head_dim"}


@pytest.mark.parametrize("name", FLUX_MODELS)
def test_flux_standins_shrink_only_width_and_depth(name):
    real, small = real_config(name), shrink_flux_config(name)
    for part in ("network", "vae"):
        assert set(real[part]) == set(small[part])
        assert {k for k in real[part] if real[part][k] != small[part][k]} <= WIDTH_DEPTH
    for r, s in zip(real["text_encoders"], small["text_encoders"], strict=True):
        assert r["class"] == s["class"]
        assert {k for k in r["config"] if r["config"][k] != s["config"].get(k)} <= WIDTH_DEPTH
    n = small["network"]
    assert sum(n["axes_dims_rope"]) == n["attention_head_dim"]  # the rotary split must cover the head
    assert len(small["vae"]["block_out_channels"]) == 4
    assert small["vae"]["latent_channels"] == real["vae"]["latent_channels"]
    assert {k: v for k, v in real.items() if k not in ("network", "vae", "text_encoders")} == \
           {k: v for k, v in small.items() if k not in ("network", "vae", "text_encoders")}


def test_flux_real_configs_hold_the_published_values_and_sizes():
    f1, k4, k9 = (real_config(n) for n in FLUX_MODELS)
    assert f1["network"]["guidance_embeds"] is True and f1["guidance"] == 3.5
    vae = f1["vae"]
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (0.3611, 0.1159, 16)
    assert [e["class"] for e in f1["text_encoders"]] == ["CLIPTextModel", "T5EncoderModel"]
    assert f1["text_encoders"][1]["config"]["dropout_rate"] == 0.1 and f1["t5_max_sequence_length"] == 512
    for k, width in ((k4, 2560), (k9, 4096)):
        assert k["network"]["guidance_embeds"] is False and k["cfg"] == 4.0
        assert k["network"]["joint_attention_dim"] == 3 * width == 3 * k["text_encoders"][0]["config"]["hidden_size"]
        assert k["vae"]["latent_channels"] == 32 and k["text_encoder_layers"] == [9, 18, 27]
    # parameter counts of the real networks (meta device): FLUX.1-dev 11.9 B, klein-4B 3.9 B, klein-9B 9.08 B
    sizes = {n: sum(p.numel() for p in flux_real_network(n).parameters()) for n in FLUX_MODELS}
    assert sizes == {"flux1-dev": 11_901_408_320, "flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248}
    # text encoders: CLIP-L 123 M, T5-v1.1-XXL encoder 4.76 B, Qwen3-4B 4.02 B, Qwen3-8B 8.19 B
    te = {n: [sum(p.numel() for p in m.parameters()) for m in flux_real_text_encoders(n)] for n in FLUX_MODELS}
    assert te == {"flux1-dev": [123_060_480, 4_762_310_656], "flux2-klein-4b": [4_022_468_096],
                  "flux2-klein-9b": [8_190_735_360]}


def test_standin_components_keep_the_real_flags(comps):
    f1, k4 = comps["flux1-dev"], comps["flux2-klein-4b"]
    assert type(f1.encoder.text_encoder).__name__ == "CLIPTextModel"
    assert type(f1.encoder.text_encoder_2).__name__ == "T5EncoderModel"
    assert f1.encoder.text_encoder_2.config.dropout_rate == 0.1 and f1.encoder.max_sequence_length == 512
    assert f1.encoder.tokenizer.model_max_length == 77
    assert f1.vae.config.scaling_factor == 0.3611 and f1.vae.config.shift_factor == 0.1159
    assert f1.denoiser.net.config.guidance_embeds is True
    assert type(k4.encoder.text_encoder).__name__ == "Qwen3ForCausalLM" and k4.encoder.layers == (9, 18, 27)
    assert type(k4.vae.vae).__name__ == "AutoencoderKLFlux2" and k4.encoder.max_sequence_length == 512
    assert isinstance(k4.denoiser, Flux2Denoiser) and isinstance(f1.denoiser, FluxDenoiser)


def test_the_shared_standin_entry_points_dispatch_to_flux():
    """dmdr.models.standins.real_network / standin_components (what --dry-run and --smoke call) know FLUX."""
    from dmdr.models.standins import real_network, standin_components

    assert type(real_network("flux2-klein-4b")).__name__ == "Flux2Transformer2DModel"
    c = standin_components("flux1-dev", seed=1)
    assert isinstance(c.denoiser, FluxDenoiser) and c.info["standin"] == "flux1-dev"
    k9 = standin_components("flux2-klein-9b", seed=1)
    cond = k9.encoder(["a cat"])
    with torch.no_grad():
        assert k9.denoiser(torch.randn(1, 32, 8, 8), torch.rand(1), cond).shape == (1, 32, 8, 8)
