"""Issue 12, deliverable 2: the Z-Image adapter (dmdr/models/zimage.py) against diffusers' own ZImagePipeline on
stand-ins built from the real configuration (dmdr/models/configs/z-image.json), shrunk only in width and depth."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from dmdr.models.shared_base import SharedBaseT2I  # noqa: E402
from dmdr.models.t2i_components import clean_network_copy  # noqa: E402
from dmdr.models.t2i_export import export_lora_diffusers  # noqa: E402
from dmdr.models.t2i_sampling import sample_t2i  # noqa: E402
from dmdr.models.vae import decode_latents  # noqa: E402
from dmdr.models.zimage import (PROMPT_MASK, ZImageDenoiser, real_zimage_network, shrink_zimage_config,  # noqa: E402
                                zimage_config, zimage_standin_components, zimage_timestep)
from dmdr.schedules import few_step_grid  # noqa: E402
from dmdr.scores import denoise  # noqa: E402

PROMPTS = ("a photo of a cat", "一只猫在沙发上", "an astronaut riding a horse at dawn, watercolor")  # a tuple: ZImagePipeline rewrites a prompt list in place


@pytest.fixture(scope="module")
def comps():
    return zimage_standin_components(seed=0)


def _noise(seed, B=3, hw=8):
    return torch.randn(B, 16, hw, hw, generator=torch.Generator().manual_seed(seed))


# ---- the real configuration ---------------------------------------------------------------------------------------
def test_real_parameter_counts_on_the_meta_device():
    cfg = zimage_config()
    net = real_zimage_network()
    n = sum(p.numel() for p in net.parameters())
    assert next(net.parameters()).device.type == "meta"
    assert n == cfg["network_parameters"] == 6_154_908_736            # "6B" (Z-Image report, arXiv 2511.22699)
    import transformers
    from diffusers import AutoencoderKL

    te = cfg["text_encoder"]
    with torch.device("meta"):
        q = getattr(transformers, te["class"])(transformers.Qwen3Config(**te["config"]))
        vae = AutoencoderKL(**cfg["vae"])
    assert sum(p.numel() for p in q.parameters()) == te["parameters"] == 4_022_468_096   # Qwen3-4B
    assert sum(p.numel() for p in vae.parameters()) == cfg["vae_parameters"]
    # the RoPE axes add up to the head dimension; the caption projection reads Qwen3-4B's width
    assert sum(cfg["network"]["axes_dims"]) == cfg["network"]["dim"] // cfg["network"]["n_heads"] == 128
    assert cfg["network"]["cap_feat_dim"] == te["config"]["hidden_size"]


def test_standin_differs_from_the_real_config_only_in_width_and_depth():
    real, small = zimage_config(), shrink_zimage_config()
    size_keys = {"dim", "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "axes_dims", "cap_feat_dim",
                 "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "block_out_channels", "layers_per_block", "norm_num_groups"}
    for section in ("network", "vae"):
        changed = {k for k in real[section] if real[section][k] != small[section][k]}
        assert changed <= size_keys, changed
    te_r, te_s = real["text_encoder"]["config"], small["text_encoder"]["config"]
    assert {k for k in te_r if te_r[k] != te_s[k]} <= size_keys
    assert len(small["vae"]["block_out_channels"]) == 4                      # factor-8 VAE kept
    assert (small["vae"]["scaling_factor"], small["vae"]["shift_factor"]) == (0.3611, 0.1159)
    assert small["max_sequence_length"] == 512 and small["network"]["in_channels"] == 16
    assert sum(small["network"]["axes_dims"]) == small["network"]["dim"] // small["network"]["n_heads"]


# ---- conditioning ---------------------------------------------------------------------------------------------------
def test_text_encoding_equals_the_pipeline_encode_prompt(comps):
    pipe = comps.pipeline()
    pos, neg = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=True)
    td = comps.encoder(PROMPTS)
    assert td["prompt_embeds"].shape == (3, 512, 32) and td[PROMPT_MASK].dtype == torch.bool
    for i in range(3):
        assert torch.equal(td["prompt_embeds"][i][td[PROMPT_MASK][i]], pos[i])
        assert float(td["prompt_embeds"][i][~td[PROMPT_MASK][i]].abs().sum()) == 0.0   # padding rows are zeros
    null = comps.encoder([""])
    assert torch.equal(null["prompt_embeds"][0][null[PROMPT_MASK][0]], neg[0])
    # the chat template wraps the prompt as Qwen3's does with enable_thinking=True
    assert comps.encoder.chat("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"


def test_null_cond_is_the_empty_prompt_expanded(comps):
    d = ZImageDenoiser(comps.denoiser.net)
    with pytest.raises(RuntimeError, match="set_null_embeddings"):
        d.null_cond(comps.encoder(PROMPTS))
    d.set_null_embeddings(comps.encoder([""]))
    u = d.null_cond(comps.encoder(PROMPTS))
    ref = comps.encoder([""])
    assert u.batch_size == torch.Size([3]) and torch.equal(u["prompt_embeds"][2], ref["prompt_embeds"][0])
    assert torch.equal(u[PROMPT_MASK][1], ref[PROMPT_MASK][0])


# ---- the denoiser against the pipeline ---------------------------------------------------------------------------
def test_timestep_convention_and_grid_match_the_turbo_scheduler(comps):
    assert torch.equal(zimage_timestep(torch.tensor([1.0, 0.25, 0.0])), torch.tensor([0.0, 0.75, 1.0]))
    pipe = comps.pipeline()
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    pipe.scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(8), mu=0.5)   # mu is ignored (no dynamic shift)
    assert torch.allclose(pipe.scheduler.sigmas.double(), few_step_grid(8, 3.0, 0.0), atol=1e-6)


def test_eight_step_sampling_equals_the_pipeline_latents_and_images(comps):
    pipe = comps.pipeline()
    x = _noise(1)
    ref = pipe(list(PROMPTS), height=64, width=64, num_inference_steps=8, guidance_scale=0.0, latents=x.clone(),
               output_type="latent").images
    cond = comps.encoder(PROMPTS)
    from dmdr.samplers import few_step_rollout
    from dmdr import keys as K

    grid = few_step_grid(8, 3.0, 0.0).float()
    ours = few_step_rollout(comps.denoiser, x.clone(), grid, cond, mode="ode")[K.SAMPLE]
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()
    img_ref = pipe(list(PROMPTS), height=64, width=64, num_inference_steps=8, guidance_scale=0.0, latents=x.clone(),
                   output_type="pt").images
    assert torch.allclose(decode_latents(comps.vae, ours), img_ref, atol=1e-4)
    # the shared sampler (training grid, seed -> noise) gives the same latents for the same noise
    lat = sample_t2i(comps.denoiser, comps.vae, cond, steps=8, shift=3.0, height=64, width=64, seed=5,
                     return_latents=True)
    x5 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    ref5 = pipe(list(PROMPTS), height=64, width=64, num_inference_steps=8, guidance_scale=0.0, latents=x5,
                output_type="latent").images
    assert torch.allclose(lat, ref5, atol=2e-5)


def test_cfg_scale_convention_w_equals_one_plus_pipeline_guidance(comps):
    d = comps.denoiser
    d.set_null_embeddings(comps.encoder([""]))
    pipe = comps.pipeline()
    x, g = _noise(2), 2.5
    ref = pipe(list(PROMPTS), height=64, width=64, num_inference_steps=1, guidance_scale=g, latents=x.clone(),
               output_type="latent").images                              # one Euler step from σ = 1 to 0 = x̂0
    cond = comps.encoder(PROMPTS)
    ours = denoise(d, x, torch.ones(3), cond, d.null_cond(cond), scale=1.0 + g)
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()
    plain = denoise(d, x, torch.ones(3), cond)
    assert (plain - ref).abs().max() > 1e-3                              # guidance changed the output


def test_velocity_is_batch_independent_and_follows_the_contract(comps):
    cond = comps.encoder(PROMPTS)
    x, t = _noise(3), torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        v = comps.denoiser(x, t, cond)
        v1 = comps.denoiser(x[1:2], t[1:2], cond[1:2])
    assert v.shape == x.shape and torch.allclose(v[1:2], v1, atol=1e-5)
    assert comps.denoiser.path.t_min == 0.0
    x0 = comps.denoiser.path.to_x0(x, t, v)                             # x̂0 = x_t - t v, ε̂ = x̂0 + v
    assert torch.allclose(comps.denoiser.path.renoise(x0, t, x0 + v), x, atol=1e-5)


# ---- LoRA export through SharedBaseT2I -------------------------------------------------------------------------------
def _randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_export_loads_into_zimage_pipeline_and_matches_the_generator(tmp_path):
    shared = SharedBaseT2I.from_components(zimage_standin_components(seed=0))
    n_targets = sum(1 for n, _ in shared.denoiser.net.named_modules()
                    if n.endswith(("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")))
    assert n_targets == 4 * (2 + 1 + 1)              # 2 main layers, 1 noise refiner, 1 context refiner
    _randomize(shared.generator_parameters(), 1)
    _randomize(shared.critic_parameters(), 2)
    f = export_lora_diffusers(shared, tmp_path, "zimage")       # through ZImageDenoiser.PIPELINE_CLASS
    from safetensors import safe_open

    with safe_open(f, "pt") as fh:
        keys = list(fh.keys())
    assert f.name == "pytorch_lora_weights.safetensors" and len(keys) == 2 * n_targets
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    comps = zimage_standin_components(seed=0)        # a clean base with the same weights
    pipe = comps.pipeline(network=clean_network_copy(shared.denoiser.net))
    theirs = ZImageDenoiser(pipe.transformer)
    x, t = _noise(4), torch.tensor([1.0, 0.6, 0.2])
    cond = shared.encode(PROMPTS)
    with torch.no_grad():
        base = theirs(x, t, cond)
        assert torch.allclose(base, shared.teacher()(x, t, cond), atol=1e-6)
        pipe.load_lora_weights(tmp_path)
        ours = shared.generator()(x, t, cond)
        assert (ours - base).abs().max() > 1e-3
        assert torch.allclose(theirs(x, t, cond), ours, atol=1e-5)
        assert torch.allclose(theirs(x, t, cond, lora_scale=0.0), base, atol=1e-6)   # diffusers' scale path


def test_shared_base_trains_both_adapters_through_the_contract():
    shared = SharedBaseT2I.from_components(zimage_standin_components(seed=0))
    cond = shared.encode(PROMPTS[:2])
    x, t = _noise(5, B=2), torch.tensor([1.0, 0.5])
    v = shared.generator()(x, t, cond)
    v.square().mean().backward()
    gen = shared.generator_parameters()
    assert all(p.grad is not None for p in gen) and any(float(p.grad.abs().sum()) > 0 for p in gen)
    assert all(p.grad is None for p in shared.critic_parameters())
    u = shared.null_cond(cond)
    assert u["prompt_embeds"].shape == cond["prompt_embeds"].shape and u[PROMPT_MASK].shape == cond[PROMPT_MASK].shape


def test_load_zimage_missing_folder_is_one_line(tmp_path):
    from dmdr.models.zimage import load_zimage

    with pytest.raises(FileNotFoundError) as e:
        load_zimage(tmp_path / "nope")
    assert "model.path" in str(e.value) and "\n" not in str(e.value)
