"""Text-to-image at the real configurations: the shipped SD3-Medium / SD3.5-Large / SDXL-base configs, stand-ins
shrunk only in width and depth, and the fixes those stand-ins expose (eval-mode encoders with T5 dropout 0.1,
SDXL's encoded "" unconditional branch, float32 sampling that honours backward_sim, CPU prompt cache, the
full-weights SDXL generator from generator.init, reward decoding with a tiny VAE and VAE checkpointing)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("diffusers")

from dmdr.models.standins import MODELS, real_config, real_network, shrink_config, standin_components  # noqa: E402
from dmdr.models.t2i import (POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, SharedBaseT2I, decode_latents,  # noqa: E402
                             sample_t2i, t2i_grid)
from dmdr.recipes import load_recipe, recipes_dir  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# keys a stand-in may change: widths and depths only
WIDTH_DEPTH = {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim",
               "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "attention_head_dim", "caption_projection_dim",
               "joint_attention_dim", "pooled_projection_dim", "block_out_channels", "transformer_layers_per_block",
               "layers_per_block", "cross_attention_dim", "addition_time_embed_dim",
               "projection_class_embeddings_input_dim", "norm_num_groups", "encoder_block_out_channels",
               "decoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks"}


def _changed(a: dict, b: dict) -> set:
    assert set(a) == set(b)
    return {k for k in a if a[k] != b[k]}


# ---- the shipped configurations and the stand-ins -------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_standins_shrink_only_width_and_depth(name):
    real, small = real_config(name), shrink_config(name)
    assert _changed(real["network"], small["network"]) <= WIDTH_DEPTH
    assert _changed(real["vae"], small["vae"]) <= WIDTH_DEPTH
    for r, s in zip(real["text_encoders"], small["text_encoders"], strict=True):
        assert r["class"] == s["class"] and _changed(r["config"], s["config"]) <= WIDTH_DEPTH
    if "reward_vae" in real:
        assert _changed(real["reward_vae"], small["reward_vae"]) <= WIDTH_DEPTH
    # the number of levels (VAE factor 8, UNet resolutions) is kept
    assert len(small["vae"]["block_out_channels"]) == len(real["vae"]["block_out_channels"]) == 4
    assert len(real["network"].get("block_out_channels", [])) == len(small["network"].get("block_out_channels", []))


def test_real_configs_hold_the_published_values_and_sizes():
    m, l, x = (real_config(n) for n in MODELS)
    t5 = m["text_encoders"][2]
    assert t5["class"] == "T5EncoderModel" and t5["config"]["dropout_rate"] == 0.1 and t5["config"]["d_model"] == 4096
    assert (m["vae"]["scaling_factor"], m["vae"]["shift_factor"], m["vae"]["latent_channels"]) == (1.5305, 0.0609, 16)
    assert (x["vae"]["scaling_factor"], x["vae"]["shift_factor"], x["vae"]["latent_channels"]) == (0.13025, None, 4)
    assert l["network"]["qk_norm"] == "rms_norm" and "qk_norm" not in m["network"]
    assert [e["class"] for e in x["text_encoders"]] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert m["tokenizer_max_length"] == x["tokenizer_max_length"] == 77
    assert x["reward_vae"]["scaling_factor"] == 1.0  # taesdxl decodes the scaled latents directly
    # parameter counts of the real networks (meta device: no memory): 2.0B, 8.1B, 2.6B
    sizes = {n: sum(p.numel() for p in real_network(n).parameters()) for n in MODELS}
    assert sizes == {"sd3-medium": 2_028_328_000, "sd35-large": 8_056_627_520, "sdxl-base": 2_567_463_684}


def test_standin_components_keep_the_real_flags():
    sd3 = standin_components("sd3-medium")
    t5 = sd3.encoder.text_encoder_3
    assert type(t5).__name__ == "T5EncoderModel" and t5.config.dropout_rate == 0.1
    assert sd3.encoder.tokenizer.model_max_length == sd3.encoder.tokenizer_2.model_max_length == 77
    assert sd3.vae.config.scaling_factor == 1.5305 and sd3.vae.config.shift_factor == 0.0609
    assert not sd3.vae.config.use_quant_conv and sd3.denoiser.in_channels == 16
    assert type(sd3.encoder.text_encoder).__name__ == "CLIPTextModelWithProjection"
    xl = standin_components("sdxl-base", with_reward_vae=True)
    assert type(xl.encoder.text_encoder).__name__ == "CLIPTextModel"
    assert xl.denoiser.net.config.addition_embed_type == "text_time"
    assert type(xl.info["reward_vae"]).__name__ == "AutoencoderTiny"
    large = standin_components("sd35-large")
    assert large.denoiser.net.config.qk_norm == "rms_norm"


# ---- fix 1: text encoders and VAE stay in eval mode -----------------------------------------------------------
def _smoke(name, *extra):
    return load_recipe(recipes_dir() / f"{name}.yaml",
                       ["model.smoke=true", "stages.0.batch_size=2", "stages.1.batch_size=2", "logging.sample_every=0",
                        "logging.checkpoint_every=0", "logging.progress=false", *extra])


def test_t5_with_dropout_gives_the_same_embeddings_across_training_iterations(tmp_path):
    from dmdr.train.dmdr import DMDRTrainer

    tr = DMDRTrainer(_smoke("sd3-medium-4step", "optim.ratio=1"), tmp_path, torch.device("cpu"),
                     console=lambda *a, **k: None)
    shared = tr.bundle.shared
    t5 = shared.encoder.text_encoder_3
    assert t5.config.dropout_rate == 0.1
    before = shared.encoder(["a lighthouse"])[PROMPT_EMBEDS]
    for _ in range(2):
        out = tr.iteration()
        assert "loss_dmd" in out  # a generator update ran (it sets the generator to train mode)
        assert not shared.encoder.training and not t5.training and not shared.vae.training
        assert shared.denoiser.net.training  # the network itself does follow train()
        again = shared.encoder(["a lighthouse"])[PROMPT_EMBEDS]
        assert torch.equal(again, before)
        shared.cache.clear()
        assert torch.equal(shared.encode(["a lighthouse"])[PROMPT_EMBEDS], before)


def test_shared_train_mode_reaches_only_the_networks():
    shared = SharedBaseT2I.from_components(standin_components("sdxl-base", with_reward_vae=True),
                                           reward_vae=None)
    shared.train()
    assert shared.denoiser.net.training and not shared.encoder.training and not shared.vae.training
    assert not any(m.training for m in shared.encoder.modules())


# ---- fix 3: SDXL's unconditional branch is the encoded "" -----------------------------------------------------
def test_sdxl_bundle_uncond_is_the_encoded_empty_prompt():
    from dmdr.families.registry import build_bundle

    b = build_bundle(_smoke("sdxl-1step"), torch.device("cpu"))
    cond, uncond, _ = b.sample_cond(2)
    empty = b.shared.encoder([""])
    assert uncond[PROMPT_EMBEDS].abs().sum() > 0
    assert torch.allclose(uncond[PROMPT_EMBEDS][0], empty[PROMPT_EMBEDS][0])
    assert torch.allclose(uncond[POOLED_PROMPT_EMBEDS][1], empty[POOLED_PROMPT_EMBEDS][0])


# ---- fix 5: sampling matches training -------------------------------------------------------------------------
def test_bf16_sampling_uses_float32_noise_and_grid():
    comps = standin_components("sd3-medium")
    shared = SharedBaseT2I.from_components(comps, dtype=torch.bfloat16)
    seen = []
    shared.denoiser.net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                  with_kwargs=True)
    sample_t2i(shared, None, ["a cat"], steps=4, shift=3.0, height=64, width=64, return_latents=True)
    grid = t2i_grid(shared.path, 4, 3.0)[:-1].float()
    assert [float(s[0]) for s in seen] == (grid * 1000).round().tolist() == [1000.0, 900.0, 750.0, 501.0]


def test_sampling_honours_backward_sim_in_trainer_grids_and_cli(tmp_path, monkeypatch):
    import dmdr.models.t2i_sampling as t2i
    from dmdr.train.dmdr import DMDRTrainer

    comps = standin_components("sd3-medium")
    shared = SharedBaseT2I.from_components(comps)
    from t2i_helpers import randomize

    randomize(shared.generator_parameters(), 0)
    ode = sample_t2i(shared, None, ["a cat"], steps=2, height=64, width=64, mode="ode", return_latents=True)
    sde = sample_t2i(shared, None, ["a cat"], steps=2, height=64, width=64, mode="sde", return_latents=True)
    assert not torch.allclose(ode, sde)
    modes = []
    real = t2i.sample_t2i
    monkeypatch.setattr(t2i, "sample_t2i", lambda *a, **k: (modes.append(k.get("mode")), real(*a, **k))[1])
    tr = DMDRTrainer(_smoke("sd3-medium-4step", "generator.backward_sim=sde"), tmp_path, torch.device("cpu"),
                     console=lambda *a, **k: None)
    tr.sample_grid(tmp_path / "g.png", tr._fixed_sample_inputs())
    assert modes == ["sde"]
    # the monitors' and the evaluation's samples use the student's own rollout too
    fam, b = tr.family, tr.bundle
    fam.sample(b, fam.sample_inputs(b, "monitor", repeats=1))
    fam.sample(b, fam.sample_inputs(b, "eval", prompts=["a cat"], seed=0))
    assert modes == ["sde"] * 3


# ---- fix 6: prompt cache on the CPU ---------------------------------------------------------------------------
def test_prompt_cache_keeps_entries_on_the_cpu():
    from dmdr.families.registry import build_bundle

    b = build_bundle(_smoke("sd3-medium-4step"), torch.device("cpu"))
    shared = b.shared
    assert shared.cache.device == "cpu"
    assert SharedBaseT2I.__init__.__kwdefaults__["cache_device"] == "cpu"
    b.sample_cond(2)
    assert all(v.device.type == "cpu" for row in shared.cache._store.values() for v in row.values())


# ---- fix 2: the official SDXL generator -----------------------------------------------------------------------
def test_sdxl_full_weights_generator_from_init(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from dmdr.models.lora import adapter_names
    from dmdr.train.dmdr import DMDRTrainer

    net = standin_components("sdxl-base", seed=30).denoiser.net
    g = torch.Generator().manual_seed(1)
    init = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    save_file({k: v.contiguous() for k, v in init.items()}, str(tmp_path / "ode_init.safetensors"))
    torch.save(init, tmp_path / "ode_init.bin")
    for f in ("ode_init.safetensors", "ode_init.bin"):
        r = _smoke("sdxl-1step", f"generator.init={tmp_path / f}", "optim.ratio=1")
        assert r.generator.lora is None
        tr = DMDRTrainer(r, tmp_path / f"run-{f}", torch.device("cpu"), console=lambda *a, **k: None)
        b, shared = tr.bundle, tr.bundle.shared
        gen = shared.generator_denoiser.net
        assert shared.full_generator and not b.generator_is_lora and gen is not shared.denoiser.net
        assert adapter_names(shared.denoiser.net) == {"critic"}  # the base is teacher + critic only
        assert all(torch.equal(v, init[k]) for k, v in gen.state_dict().items())
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in shared.denoiser.net.state_dict().items()
                   if ".lora_" not in k and "base_layer" not in k)
        trainable = {id(p) for p in shared.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in list(gen.parameters()) + b.critic_params}
        assert len(b.generator_params) == len(list(gen.parameters()))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    for group in tr.opt_gen.param_groups:
        group["lr"] = 1e-3
    assert "loss_dmd" in tr.iteration()
    assert any(not torch.equal(v, before[k]) for k, v in gen.state_dict().items())
    # a checkpoint holds the whole generator network and restores it exactly
    tensors, state = {k: {n: t.clone() for n, t in d.items()} for k, d in tr.tensors().items()}, tr.state_dict()
    assert set(tensors["generator"]) == set(gen.state_dict())
    with torch.no_grad():
        for p in gen.parameters():
            p.zero_()
    tr.load(tensors, state)
    assert all(torch.equal(v, tensors["generator"][k]) for k, v in gen.state_dict().items())
    out = tr.export_student(tmp_path / "run" / "student.safetensors")
    assert out.name == "student_unet"
    loaded = UNet2DConditionModel.from_pretrained(out)
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_generator_init_bad_input_is_one_line(tmp_path):
    from dmdr.families.registry import build_bundle

    bad = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"not.a.unet.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=r"generator.init=.*weights do not match the UNet2DConditionModel"):
        build_bundle(_smoke("sdxl-1step", f"generator.init={bad}"), torch.device("cpu"))
    lora = {"rank": 4, "alpha": 4, "targets": ["to_q"]}
    r = _smoke("sdxl-1step", f"generator.init={bad}")
    from dmdr.recipes import LoRA

    r.generator.lora = LoRA(**lora)
    with pytest.raises(ValueError, match="generator.init=.* needs generator.lora: null"):
        build_bundle(r, torch.device("cpu"))


def test_config_family_mismatch_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    res = CliRunner().invoke(app, ["train", str(recipes_dir() / "sdxl-1step.yaml"), "--dry-run", "--smoke",
                                   "--set", "model.config=sd35-large"])
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: model.config=sd35-large"), res.stderr


def test_sdxl_recipe_mirrors_the_official_generator():
    r = load_recipe(recipes_dir() / "sdxl-1step.yaml")
    assert r.generator.lora is None and "ode_pretraining" in r.generator.init
    assert (r.optim.lr_gen, r.stages[1].lr_gen, r.critic.lora.rank, r.critic.lora.alpha) == (1e-7, 5e-8, 32, 32)
    assert r.model.reward_vae.endswith("taesdxl") and r.model.config == "sdxl-base"


# ---- fix 4: reward decoding fits in memory ---------------------------------------------------------------------
def test_rewards_decode_with_the_tiny_vae():
    from dmdr.families.registry import build_bundle

    b = build_bundle(_smoke("sdxl-1step"), torch.device("cpu"))
    shared = b.shared
    assert type(shared.reward_vae).__name__ == "AutoencoderTiny"
    z = torch.randn(2, *b.sample_shape, requires_grad=True)
    img = b.decode(z)
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    assert torch.allclose(img, decode_latents(shared.reward_vae, z))
    assert not torch.allclose(img, shared.decode(z))  # the full VAE is still what samples use
    img.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("tiny", [False, True])
def test_vae_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients(tiny):
    comps = standin_components("sdxl-base", with_reward_vae=True)
    vae = comps.info["reward_vae"] if tiny else comps.vae
    z = torch.randn(1, 4, 8, 8)
    grads, sizes = [], []
    for ckpt in (False, True):
        if ckpt:
            vae.enable_gradient_checkpointing()
        x = z.clone().requires_grad_(True)
        img, n = _saved_bytes(lambda: decode_latents(vae, x))
        img.square().sum().backward()
        grads.append(x.grad)
        sizes.append(n)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert sizes[1] < 0.6 * sizes[0], sizes


def test_vae_gradient_checkpointing_recipe_flag():
    from dmdr.families.registry import build_bundle

    b = build_bundle(_smoke("sd3-medium-4step", "model.vae_gradient_checkpointing=true"), torch.device("cpu"))
    assert b.shared.vae.decoder.gradient_checkpointing


# ---- fix 6: GRPO KL reference of a LoRA student shares the base -------------------------------------------------
def test_grpo_kl_reference_of_a_lora_student_is_not_a_copy(tmp_path):
    from dmdr.models.lora import AdapterView
    from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny
    from dmdr.recipes import LoRA
    from dmdr.train.grpo import GRPOTrainer
    from t2i_helpers import randomize

    torch.manual_seed(0)
    teacher = tmp_path / "t.safetensors"
    net = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_tiny(net, str(teacher))
    r = load_recipe(recipes_dir() / "digits-grpo.yaml",
                    [f"model.teacher={teacher}", "runtime.device=cpu", "rl.regularizer=kl", "rl.batch_size=8",
                     "rl.group_size=4", "rl.minibatch_size=4", "eval.samples=0", "logging.progress=false",
                     "critic.lora.rank=4", "critic.lora.alpha=4"])
    r.generator.lora = LoRA(rank=4, alpha=4, targets=["qkv", "proj"])
    tr = GRPOTrainer(r, None, torch.device("cpu"), console=lambda *a: None)
    b = tr.bundle
    ref = tr.reference
    assert ref.owner is b.base  # no deep copy of the network
    assert isinstance(ref.model, AdapterView) and ref.model.adapter is None  # the base, adapter disabled
    x, t = torch.randn(4, *b.sample_shape), torch.full((4,), 0.7)
    y = torch.arange(4)
    randomize(b.generator_params, 3)  # the student moves; the reference stays the base
    with torch.no_grad():
        assert torch.equal(ref.model(x, t, y), AdapterView(b.base, None, 0.0)(x, t, y))
        assert not torch.allclose(ref.model(x, t, y), b.generator(x, t, y))
    # a trained LoRA student (rl.init): the reference is a frozen copy of its adapter, still on the same base
    tr2 = GRPOTrainer(r, None, torch.device("cpu"), console=lambda *a: None,
                      bundle=_with_trained_lora(r, randomize))
    with torch.no_grad():
        x0 = tr2.bundle.generator(x, t, y)
        assert tr2.reference.owner is tr2.bundle.base and tr2.reference.model.adapter == "reference"
        assert torch.equal(tr2.reference.model(x, t, y), x0)
    assert not any(p.requires_grad for n, p in tr2.bundle.base.named_parameters() if ".reference." in n)


def _with_trained_lora(recipe, randomize):
    from dmdr.families.registry import build_bundle

    b = build_bundle(recipe, torch.device("cpu"))
    randomize(b.generator_params, 5)
    return b


@pytest.mark.slow
def test_bench_layouts_compute_the_same_iteration():
    """bench/device_t2i.py's two-copy (official) layout differs from the shared one only in memory: same seed, same
    losses (the --tiny path of the GPU benchmark)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import device_t2i as bench

    class A:
        tiny, res, sample_res, batch, warmup, iters = True, 64, 64, 1, 0, 1
        student_steps, teacher_steps, sample_reps = 4, 3, 1

    dev = torch.device("cpu")
    shared = bench.measure_iteration("sd3-medium", "shared", False, dev, A)
    two = bench.measure_iteration("sd3-medium", "two_copy", False, dev, A)
    assert shared["losses"] == two["losses"] and set(shared["losses"]) >= {"loss_dmd", "loss_fake_score"}
    assert shared["params"] == two["params"]
