"""SD3 adapter, shared-base memory layout, sampling and export (tiny random models, CPU, float32)."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

pytest.importorskip("diffusers")

from dmdr.keys import MissingKeyError  # noqa: E402
from dmdr.models.contract import Denoiser  # noqa: E402
from dmdr.models.sd3 import SD3Denoiser, build_tiny_sd3, load_sd3, sd3_timestep  # noqa: E402
from dmdr.models.t2i import (CRITIC, GENERATOR, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, PromptEmbeddingCache,  # noqa: E402
                             SharedBaseT2I, decode_latents, export_full_model, export_lora_diffusers, sample_t2i,
                             t2i_grid)
from dmdr.paths import FlowMatching  # noqa: E402
from dmdr.schedules import few_step_grid  # noqa: E402
from dmdr.scores import distribution_matching_targets  # noqa: E402
from t2i_helpers import randomize as _randomize

PROMPTS = ["a cat", "a dog"]


def _shared(seed: int = 0, **kw) -> SharedBaseT2I:
    kw.setdefault("generator_lora", None)
    return SharedBaseT2I.from_components(build_tiny_sd3(seed), **kw)


def _record_timesteps(net):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["timestep"].detach().clone())

    net.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([0.9, 0.3])[:B]


# ---- contract -----------------------------------------------------------------------------------------------
def test_contract_shape_path_and_protocol():
    comps = build_tiny_sd3(0)
    den = comps.denoiser
    assert isinstance(den, Denoiser)
    assert den.path == FlowMatching(t_min=0.001)
    x, t = _inputs()
    out = den(x, t, comps.encoder(PROMPTS))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_network_timestep_is_rounded_1000t():
    comps = build_tiny_sd3(0)
    seen = _record_timesteps(comps.denoiser.net)
    x, _ = _inputs()
    cond = comps.encoder(PROMPTS)
    comps.denoiser(x, torch.tensor([0.90012, 0.0004]), cond)
    assert seen[-1].tolist() == [900.0, 0.0] and seen[-1].dtype == torch.float32
    comps.denoiser.round_timesteps = False
    comps.denoiser(x, torch.tensor([0.90012, 0.0004]), cond)
    assert torch.allclose(seen[-1], torch.tensor([900.12, 0.4]))
    assert sd3_timestep(torch.tensor([0.5006])).item() == 501.0


def test_forward_equals_direct_transformer_call():
    comps = build_tiny_sd3(0)
    x, t = _inputs()
    cond = comps.encoder(PROMPTS)
    direct = comps.denoiser.net(hidden_states=x, timestep=(t * 1000).round(), encoder_hidden_states=cond[PROMPT_EMBEDS],
                                pooled_projections=cond[POOLED_PROMPT_EMBEDS], return_dict=False)[0]
    assert torch.equal(comps.denoiser(x, t, cond), direct)


def test_missing_cond_key_names_the_key():
    comps = build_tiny_sd3(0)
    cond = comps.encoder(PROMPTS).exclude(POOLED_PROMPT_EMBEDS)
    with pytest.raises(MissingKeyError, match="pooled_prompt_embeds"):
        comps.denoiser(*_inputs(), cond)


def test_encoder_matches_diffusers_encode_prompt():
    comps = build_tiny_sd3(0)
    pipe = comps.pipeline()
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                     max_sequence_length=comps.encoder.max_sequence_length,
                                                     device=torch.device("cpu"))
    cond = comps.encoder(PROMPTS)
    assert torch.equal(cond[PROMPT_EMBEDS], pe) and torch.equal(cond[POOLED_PROMPT_EMBEDS], pooled)
    null = comps.encoder([""])  # batch 1 vs diffusers' batch 2: equal up to matmul blocking
    assert torch.allclose(null[PROMPT_EMBEDS].expand_as(neg), neg, atol=1e-6)
    assert torch.allclose(null[POOLED_PROMPT_EMBEDS].expand_as(neg_pooled), neg_pooled, atol=1e-6)
    # no T5: its block is zeros after the 8 CLIP tokens
    assert cond[PROMPT_EMBEDS].shape == (2, 8 + 8, 32) and not cond[PROMPT_EMBEDS][:, 8:].any()


def test_null_cond_is_cached_empty_prompt_expanded():
    comps = build_tiny_sd3(0)
    with pytest.raises(RuntimeError, match="set_null_embeddings"):
        comps.denoiser.null_cond(comps.encoder(PROMPTS))
    shared = SharedBaseT2I.from_components(comps, generator_lora=None)
    cond = shared.encode(PROMPTS * 2)
    null = shared.null_cond(cond)
    assert null.batch_size == torch.Size([4])
    empty = comps.encoder([""])
    for key in (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS):
        assert torch.equal(null[key], empty[key].expand_as(null[key]))


# ---- shared base: trainable sets and gradient isolation ------------------------------------------------------
def _grad_state(params):
    return ["none" if p.grad is None else ("zero" if not p.grad.any() else "nonzero") for p in params]


def test_trainable_set_is_exactly_the_two_adapters_and_survives_view_switches():
    shared = _shared()
    gen, critic = shared.generator_parameters(), shared.critic_parameters()
    assert gen and critic and not ({id(p) for p in gen} & {id(p) for p in critic})
    expected = {id(p) for p in gen + critic}
    x, t = _inputs()
    cond = shared.encode(PROMPTS)
    for view in (shared.generator(), shared.fake_score(2.0), shared.real_score(0.5), shared.teacher(),
                 shared.generator()):
        view(x, t, cond)
        assert {id(p) for p in shared.parameters() if p.requires_grad} == expected
    assert all(p.dtype == torch.float32 for p in gen + critic)
    # checkpoint = the two adapters only
    state = shared.trainable_state_dict()
    assert set(state) == {GENERATOR, CRITIC} and len(state[GENERATOR]) == len(gen)


def test_views_select_adapters_and_scales():
    shared = _shared()
    _randomize(shared.generator_parameters(), 1)
    _randomize(shared.critic_parameters(), 2)
    x, t = _inputs()
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        teacher = shared.teacher()(x, t, cond)
        gen = shared.generator()(x, t, cond)
        fake = shared.fake_score(2.0)(x, t, cond)
        real0 = shared.real_score(0.0)(x, t, cond)
        real = shared.real_score(0.5)(x, t, cond)
        assert torch.equal(real0, teacher)
        assert min((a - b).abs().max() for a, b in [(gen, teacher), (fake, teacher), (real, teacher), (real, fake),
                                                    (gen, fake)]) > 1e-4
        # each view depends only on its own adapter
        _randomize(shared.generator_parameters(), 3)
        assert torch.equal(shared.fake_score(2.0)(x, t, cond), fake)
        assert torch.equal(shared.real_score(0.5)(x, t, cond), real)
        assert not torch.equal(shared.generator()(x, t, cond), gen)


def test_dmd_loss_reaches_only_generator_and_critic_loss_only_critic():
    shared = _shared()
    _randomize(shared.critic_parameters(), 2)  # so that fake != real
    gen_p, critic_p = shared.generator_parameters(), shared.critic_parameters()
    path = shared.path
    noise, _ = _inputs(seed=1)
    s = torch.ones(2)
    cond = shared.encode(PROMPTS)
    # generator step (method.md §2.4): x̂0 = G(x_s, s), DMD gradient from real (CFG) and fake scores, no grad
    x0 = path.to_x0(noise, s, shared.generator()(noise, s, cond))
    td = distribution_matching_targets(x0, shared.real_score(0.5), shared.fake_score(2.0), cond,
                                       tau=torch.tensor([0.7, 0.4]), noise=torch.randn_like(noise),
                                       uncond=shared.null_cond(cond), cfg_scale=3.0)
    grad = (td["x0_fake"] - td["x0_real"]) / ((x0 - td["x0_real"]).abs().mean((1, 2, 3), keepdim=True) + 1e-8)
    loss = 0.5 * ((x0 - (x0 - grad).detach()) ** 2).mean()
    loss.backward()
    gen_state = _grad_state(gen_p)
    assert "none" not in gen_state and "nonzero" in gen_state
    assert set(_grad_state(critic_p)) == {"none"}
    for p in gen_p:
        p.grad = None
    # critic step (method.md §2.3): denoising loss of the fake score on the detached sample
    x_clean = x0.detach()
    tau, eps = torch.tensor([0.6, 0.2]), torch.randn_like(x_clean)
    x_tau = path.renoise(x_clean, tau, eps)
    critic_loss = ((shared.fake_score(2.0)(x_tau, tau, cond) - path.target(x_clean, eps, tau)) ** 2).mean()
    critic_loss.backward()
    assert set(_grad_state(gen_p)) == {"none"}
    critic_state = _grad_state(critic_p)
    assert "none" not in critic_state and "nonzero" in critic_state
    assert not any(p.grad is not None for p in shared.parameters() if not p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        shared = _shared(gradient_checkpointing=ckpt)
        _randomize(shared.generator_parameters(), 1)
        shared.denoiser.net.train()
        x, t = _inputs()
        shared.generator()(x, t, shared.encode(PROMPTS)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in shared.generator_parameters()]))
    assert shared.denoiser.net.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_base_with_float32_adapters():
    shared = _shared(dtype=torch.bfloat16)
    assert next(shared.denoiser.net.transformer_blocks.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in shared.generator_parameters())
    x, t = _inputs()
    cond = shared.encode(PROMPTS)
    assert cond[PROMPT_EMBEDS].dtype == torch.bfloat16
    out = shared.generator()(x, t, cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- prompt-embedding cache ----------------------------------------------------------------------------------
def test_prompt_cache_encodes_each_prompt_once_and_is_lru_bounded():
    calls = []

    def encode(ps):
        calls.append(list(ps))
        return TensorDict({"e": torch.tensor([[float(len(p))] for p in ps])}, batch_size=[len(ps)])

    cache = PromptEmbeddingCache(max_entries=2)
    a = cache.lookup(["aa", "b", "aa"], encode)
    assert calls == [["aa", "b"]] and a["e"].flatten().tolist() == [2.0, 1.0, 2.0]
    cache.lookup(["b"], encode)
    assert calls == [["aa", "b"]] and cache.hits == 2  # "aa" twice in one batch counts once missed
    cache.lookup(["ccc"], encode)  # evicts the least recently used ("aa")
    assert "aa" not in {k[0] for k in cache._store} and len(cache) == 2
    cache.lookup(["aa"], encode)
    assert calls[-1] == ["aa"]


def test_shared_encode_uses_cache_and_matches_encoder():
    shared = _shared()
    before = shared.cache.misses
    a = shared.encode(PROMPTS)
    b = shared.encode(list(reversed(PROMPTS)))
    assert shared.cache.misses - before == 2 and shared.cache.hits >= 2
    direct = shared.encoder(PROMPTS)
    assert torch.equal(a[PROMPT_EMBEDS], direct[PROMPT_EMBEDS])
    assert torch.equal(b[PROMPT_EMBEDS][0], direct[PROMPT_EMBEDS][1])


# ---- sampling and decoding -----------------------------------------------------------------------------------
def test_sample_t2i_uses_training_grid_and_matches_reference_loop():
    shared = _shared()
    _randomize(shared.generator_parameters(), 1)
    seen = _record_timesteps(shared.denoiser.net)
    images = sample_t2i(shared, None, PROMPTS, steps=4, shift=3.0, height=16, width=16, seed=7)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert [s[0].item() for s in seen] == [1000.0, 900.0, 750.0, 501.0]  # SD3-Medium grid, method.md §2.1
    # reference: Euler on few_step_grid, then decode
    grid = few_step_grid(4, 3.0, 0.001)
    assert torch.equal(grid, t2i_grid(shared.path, 4, 3.0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        for i in range(4):
            t = grid[i].float().expand(2)
            x = x + (grid[i + 1] - grid[i]).float() * shared.generator()(x, t, cond)
        ref = decode_latents(shared.vae, x)
    assert torch.allclose(images, ref, atol=1e-5)
    again = sample_t2i(shared, None, PROMPTS, steps=4, shift=3.0, height=16, width=16, seed=7)
    other = sample_t2i(shared, None, PROMPTS, steps=4, shift=3.0, height=16, width=16, seed=8)
    assert torch.equal(images, again) and not torch.equal(images, other)


def test_sample_t2i_with_bare_denoiser_and_encoder():
    comps = build_tiny_sd3(0)
    images = sample_t2i(comps.denoiser, comps.vae, PROMPTS, steps=2, shift=1.0, height=16, width=16, seed=0,
                        encoder=comps.encoder)
    assert images.shape == (2, 3, 16, 16)
    shared = SharedBaseT2I.from_components(comps, generator_lora=None)
    via_view = sample_t2i(shared.generator(), comps.vae, PROMPTS, steps=2, shift=1.0, height=16, width=16, seed=0,
                          encoder=comps.encoder)
    assert torch.allclose(via_view, images, atol=1e-6)  # fresh generator adapter (B = 0) = the base
    with pytest.raises(ValueError, match="encoder"):
        sample_t2i(comps.denoiser, comps.vae, PROMPTS, steps=2, height=16, width=16)


def test_decode_latents_matches_diffusers_postprocess_and_is_differentiable():
    comps = build_tiny_sd3(0)
    pipe = comps.pipeline()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    with torch.no_grad():
        raw = comps.vae.decode(z / comps.vae.config.scaling_factor + comps.vae.config.shift_factor).sample
        ref = pipe.image_processor.postprocess(raw, output_type="pt")
    z.requires_grad_(True)
    img = decode_latents(comps.vae, z)
    assert torch.allclose(img, ref, atol=1e-6)
    img.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# ---- export ---------------------------------------------------------------------------------------------------
def test_export_lora_loads_into_diffusers_pipeline_and_matches_generator(tmp_path):
    shared = _shared()
    _randomize(shared.generator_parameters(), 1)
    _randomize(shared.critic_parameters(), 2)
    weights = export_lora_diffusers(shared, tmp_path, "sd3")
    assert weights.name == "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(shared.generator_parameters()) and all(k.startswith("transformer.") for k in keys)

    pipe = build_tiny_sd3(0).pipeline()  # a clean base with the same weights
    theirs = SD3Denoiser(pipe.transformer)
    x, t = _inputs()
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        base = theirs(x, t, cond)
        assert torch.equal(base, shared.teacher()(x, t, cond))
        pipe.load_lora_weights(tmp_path)
        ours = shared.generator()(x, t, cond)
        assert (ours - base).abs().max() > 1e-3
        assert torch.allclose(theirs(x, t, cond), ours, atol=1e-6)
        # diffusers' own scale path (joint_attention_kwargs): 0 = base, 1 = full LoRA
        assert torch.allclose(theirs(x, t, cond, lora_scale=0.0), base, atol=1e-6)
        half = theirs(x, t, cond, lora_scale=0.5)
        assert (half - base).abs().max() > 1e-4 and (half - ours).abs().max() > 1e-4


def test_export_full_model_equals_generator_view(tmp_path):
    from diffusers import SD3Transformer2DModel

    shared = _shared()
    _randomize(shared.generator_parameters(), 1)
    folder = export_full_model(shared, tmp_path)
    merged = SD3Denoiser(SD3Transformer2DModel.from_pretrained(folder))
    x, t = _inputs()
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(merged(x, t, cond), shared.generator()(x, t, cond), atol=1e-5)


# ---- loading --------------------------------------------------------------------------------------------------
def test_load_sd3_from_local_folder_matches(tmp_path):
    comps = build_tiny_sd3(0)
    comps.pipeline().save_pretrained(tmp_path)
    loaded = load_sd3(tmp_path, max_sequence_length=comps.encoder.max_sequence_length)
    assert loaded.info["t5"] is False
    x, t = _inputs()
    with torch.no_grad():
        a = comps.denoiser(x, t, comps.encoder(PROMPTS))
        b = loaded.denoiser(x, t, loaded.encoder(PROMPTS))
    assert torch.allclose(a, b, atol=1e-6)


def test_load_sd3_missing_folder_names_path_and_field(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*nope"):
        load_sd3(missing)
    with pytest.raises(ValueError, match="model_index.json"):
        load_sd3(tmp_path)
    with pytest.raises(ValueError, match=r"model\.path is not set"):
        load_sd3(None)


def test_trainable_state_dict_round_trip():
    shared = _shared()
    _randomize(shared.generator_parameters(), 1)
    _randomize(shared.critic_parameters(), 2)
    state = shared.trainable_state_dict()
    x, t = _inputs()
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        gen, fake = shared.generator()(x, t, cond), shared.fake_score(2.0)(x, t, cond)
    other = _shared()
    other.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other.generator()(x, t, cond), gen)
        assert torch.equal(other.fake_score(2.0)(x, t, cond), fake)
    with pytest.raises(ValueError, match="generator"):
        other.load_trainable_state_dict({GENERATOR: {}, CRITIC: state[CRITIC]})


def test_offload_idle_keeps_results_and_leaves_encoder_on_cpu():
    plain, offloaded = _shared(), _shared(offload_idle=True)
    a, b = plain.encode(PROMPTS), offloaded.encode(PROMPTS)
    assert torch.equal(a[PROMPT_EMBEDS], b[PROMPT_EMBEDS])
    assert offloaded.encoder.device.type == "cpu" and next(offloaded.vae.parameters()).device.type == "cpu"
    imgs = sample_t2i(offloaded, None, PROMPTS, steps=1, height=16, width=16, seed=0)
    assert torch.equal(imgs, sample_t2i(plain, None, PROMPTS, steps=1, height=16, width=16, seed=0))
