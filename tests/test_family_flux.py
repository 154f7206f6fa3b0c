"""The FLUX families through the Family API (dmdr.families.flux): recipe checks, the smoke bundle (grid, shapes,
conditions, decode), the guidance of the real score inside a trainer iteration, export into the diffusers pipeline,
`dmdr sample` on a smoke run and the --dry-run memory estimate."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from dmdr.families.registry import build_bundle, family  # noqa: E402
from dmdr.models.flux import GUIDANCE, flux1_shift, flux2_shift  # noqa: E402
from dmdr.recipes import load_recipe  # noqa: E402
from t2i_helpers import randomize  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the recipes' runtime.precision bf16 autocasts on CPU too; FLUX's qk RMSNorm then warns that it cannot fuse
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"flux1": ROOT / "recipes" / "flux1-dev-4step.yaml", "flux2": ROOT / "recipes" / "flux2-klein-4step.yaml"}


def _smoke(fam, *extra):
    return load_recipe(RECIPES[fam], ["model.smoke=true", "stages.0.batch_size=2", "stages.1.batch_size=2",
                                      "logging.sample_every=0", "logging.checkpoint_every=0",
                                      "logging.progress=false", "model.max_sequence_length=16", *extra])


def test_recipes_hold_the_cited_settings():
    f1, f2 = (load_recipe(p) for p in RECIPES.values())
    assert (f1.model.family, f1.model.config, f1.model.guidance, f1.dmd.cfg) == ("flux1", "flux1-dev", 3.5, 1.0)
    assert (f2.model.family, f2.model.config, f2.model.guidance, f2.dmd.cfg) == ("flux2", "flux2-klein-4b", None, 4.0)
    assert f1.generator.shift == pytest.approx(flux1_shift(512, 512), abs=1e-4) and f1.model.resolution == 512
    assert f2.generator.shift == pytest.approx(flux2_shift(1024, 1024, 4), abs=1e-4) and f2.model.resolution == 1024
    for r in (f1, f2):
        assert r.model.t_min == 0.0 and r.generator.steps == 4 and r.model.max_sequence_length == 512
        g, c = r.generator.lora, r.critic.lora
        assert (g.rank, g.alpha, c.rank, c.alpha) == (64, 128, 32, 32)
    assert "to_qkv_mlp_proj" in f2.generator.lora.targets and "to_qkv_mlp_proj" not in f1.generator.lora.targets


@pytest.mark.parametrize("fam,override,needle", [
    ("flux1", "dmd.cfg=4.0", "guidance-distilled"),
    ("flux1", "model.t_min=0.001", "model.t_min=0.001"),
    ("flux1", "model.resolution=520", "multiple of 16"),
    ("flux2", "model.guidance=3.5", "no guidance embedding"),
    ("flux2", "model.config=flux1-dev", "does not match model.family=flux2"),
])
def test_bad_recipes_fail_with_one_line_naming_the_field(fam, override, needle):
    with pytest.raises(ValueError, match=needle) as e:
        family(fam).check(_smoke(fam, override))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fam", ["flux1", "flux2"])
def test_smoke_bundle_grid_shapes_conditions_decode(fam):
    b = build_bundle(_smoke(fam), torch.device("cpu"))
    C = 16 if fam == "flux1" else 32
    assert b.sample_shape == (C, 8, 8) and b.base.path.t_min == 0.0
    S = b.recipe.generator.shift
    expect = [S * u / (1 + (S - 1) * u) for u in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert b.grid.tolist() == pytest.approx(expect, abs=1e-6)
    cond, uncond, prompts = b.sample_cond(3)
    assert cond.batch_size == uncond.batch_size == torch.Size([3]) and len(prompts) == 3
    assert cond["prompt_embeds"].shape[:2] == (3, 16)  # model.max_sequence_length caps the stand-in's 512
    img = b.decode(torch.randn(1, *b.sample_shape, requires_grad=True))
    assert img.shape == (1, 3, 64, 64) and img.requires_grad


def _record_network_calls(net):
    calls = []

    def hook(module, args, kwargs):
        g = kwargs.get("guidance")
        calls.append((kwargs["hidden_states"].shape[0], None if g is None else sorted(set(g.tolist())),
                      torch.is_grad_enabled()))

    return calls, net.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("guidance", [3.5, 2.0])
def test_flux1_real_score_is_one_pass_at_model_guidance_in_the_trainer(tmp_path, guidance):
    """A generator update on the FLUX.1 smoke: the generator, the real score and the fake score each run ONE network
    pass of batch B, all at the guidance-embedding value model.guidance (no unconditional batch, no CFG)."""
    from dmdr.train.dmdr import DMDRTrainer

    tr = DMDRTrainer(_smoke("flux1", f"model.guidance={guidance}"), tmp_path, torch.device("cpu"),
                     console=lambda *a, **k: None)
    b = tr.bundle
    randomize(b.critic_params, 2)
    cond, uncond, _ = b.sample_cond(2)
    x_clean = torch.randn(2, *b.sample_shape)
    calls, handle = _record_network_calls(b.base.net)
    try:
        out = tr.generator_update(x_clean, torch.ones(2), cond, uncond, None, b.recipe.stages[0])
    finally:
        handle.remove()
    assert out["cfg"] == 1.0
    assert calls == [(2, [guidance], True), (2, [guidance], False), (2, [guidance], False)]
    assert GUIDANCE not in cond.keys()


def test_flux2_real_score_is_true_cfg_in_the_trainer(tmp_path):
    from dmdr.train.dmdr import DMDRTrainer

    tr = DMDRTrainer(_smoke("flux2"), tmp_path, torch.device("cpu"), console=lambda *a, **k: None)
    b = tr.bundle
    cond, uncond, _ = b.sample_cond(2)
    calls, handle = _record_network_calls(b.base.net)
    try:
        out = tr.generator_update(torch.randn(2, *b.sample_shape), torch.ones(2), cond, uncond, None,
                                  b.recipe.stages[0])
    finally:
        handle.remove()
    assert 3.5 <= out["cfg"] <= 4.5  # w ~ U[4 - 0.5, 4 + 0.5] (method.md §2.5)
    assert calls == [(2, None, True), (4, None, False), (2, None, False)]  # generator, real (cond + uncond), fake


@pytest.mark.parametrize("fam", ["flux1", "flux2"])
def test_family_export_loads_into_the_pipeline(fam, tmp_path):
    from dmdr.models.flux_standins import flux_standin_components

    b = build_bundle(_smoke(fam), torch.device("cpu"))
    randomize(b.generator_params, 1)
    out = b.family.export(b, tmp_path / "student.safetensors")
    assert out == tmp_path / "student_lora" / "pytorch_lora_weights.safetensors"
    clean = flux_standin_components(b.recipe.model.config, seed=b.recipe.seed)
    pipe = clean.pipeline()
    pipe.load_lora_weights(out.parent)
    theirs = type(b.base)(pipe.transformer, **({"guidance": 3.5} if fam == "flux1" else {}))
    cond, _, _ = b.sample_cond(2)
    x = torch.randn(2, *b.sample_shape)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = b.generator(x, t, cond)
        assert (ours - b.base(x, t, cond)).abs().max() > 1e-3
        assert torch.allclose(theirs(x, t, cond), ours, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["flux1", "flux2"])
def test_cli_smoke_train_then_sample(fam, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(RECIPES[fam]), "--smoke", "--out", str(run), "--set",
                              "logging.progress=false", "--set", "model.max_sequence_length=16"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"stage"' in l]
    assert recs and all(math.isfinite(v) for x in recs for k, v in x.items() if k.startswith("loss_"))
    assert (run / "student_lora" / "pytorch_lora_weights.safetensors").is_file()
    res = runner.invoke(app, ["sample", "--run", str(run), "--prompt", "a red fox", "--prompt", "a blue car",
                              "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "s.png").size[0] > 64


def test_dry_run_memory_estimate_traces_the_real_flux_networks():
    from dmdr.train.memory_estimate import GIB

    f1 = load_recipe(RECIPES["flux1"])
    est = family("flux1").memory(f1)
    d = est.detail
    assert d["config"] == "flux1-dev" and d["network_params"] == 11_901_408_320
    assert d["text_encoder_params"] == 123_060_480 + 4_762_310_656 and d["text_tokens"] == 512
    # bf16 weights of the transformer + encoders + VAE, the rewards, and float32 LoRAs
    assert est.weights > 2 * (11_901_408_320 + 4_885_371_136) and est.optimiser == 12 * d["lora_params"]
    plain = family("flux1").memory(load_recipe(RECIPES["flux1"], ["model.gradient_checkpointing=false"]))
    assert plain.detail["activation_bytes_per_image_network"] > 4 * d["activation_bytes_per_image_network"]
    assert 5 * GIB < plain.detail["activation_bytes_per_image_network"] < 30 * GIB
    k = family("flux2").memory(load_recipe(RECIPES["flux2"]))
    assert k.detail["network_params"] == 3_875_544_576 and k.detail["text_encoder_params"] == 4_022_468_096


def test_teacher_sampling_follows_each_flux_schedule():
    """FLUX.2's teacher runs the pipeline's own sigmas for its step count (the empirical shift depends on it);
    FLUX.1's teacher refuses CFG (guidance-distilled) and runs at model.guidance."""
    import numpy as np

    from dmdr.models.flux import flux2_mu, flux2_scheduler

    b = build_bundle(_smoke("flux2"), torch.device("cpu"))
    seen, handle = [], b.base.net.register_forward_pre_hook(
        lambda m, a, k: seen.append(round(k["timestep"][0].item(), 6)), with_kwargs=True)
    try:
        b.family.sample_teacher(b, b.family.sample_inputs(b, "user", prompts=["a cat"], seed=0), steps=6, cfg=1.0)
    finally:
        handle.remove()
    sched = flux2_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=flux2_mu((64 // 16) ** 2, 6))
    assert seen == pytest.approx(sched.sigmas[:-1].tolist(), abs=1e-6)
    assert b.recipe.generator.shift == pytest.approx(flux2_shift(1024, 1024, 4), abs=1e-4)  # untouched
    f1 = build_bundle(_smoke("flux1"), torch.device("cpu"))
    with pytest.raises(ValueError, match="guidance-distilled"):
        f1.family.sample_teacher(f1, f1.family.sample_inputs(f1, "user", prompts=["a cat"], seed=0), steps=2, cfg=3.5)
