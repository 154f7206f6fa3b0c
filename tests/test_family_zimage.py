"""Issue 12: the Z-Image family through the Family API (dmdr/families/zimage.py) and its recipe
(recipes/zimage-turbo-dmdr.yaml): build, conditions, sampling, the exported LoRA in ZImagePipeline, checks, the CLI."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from dmdr.families import family, get_family  # noqa: E402
from dmdr.families.zimage import ZImageFamily  # noqa: E402
from dmdr.models.zimage import PROMPT_MASK, ZImageDenoiser, zimage_standin_components  # noqa: E402
from dmdr.recipes import load_recipe  # noqa: E402
from dmdr.schedules import few_step_grid  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "zimage-turbo-dmdr.yaml"


def _recipe(*extra):
    return load_recipe(RECIPE, ["model.smoke=true", "logging.progress=false", *extra])


@pytest.fixture(scope="module")
def built():
    r = _recipe()
    fam = get_family(r)
    return r, fam, fam.build(r, torch.device("cpu"))


def test_recipe_is_registered_and_carries_the_published_settings():
    r = load_recipe(RECIPE)
    assert isinstance(get_family(r), ZImageFamily) and family("zimage").config_name(r) == "z-image"
    assert (r.generator.steps, r.generator.shift, r.model.t_min) == (8, 3.0, 0.0)      # Turbo: 8 NFE, shift 3
    assert r.dmd.decoupled.enabled and r.dmd.decoupled.ca_tau == "annealed" and r.dmd.dynars.enabled
    assert r.dmd.cfg > 1 and any(st.rewards for st in r.stages)                       # Decoupled DMD + DMDR


def test_build_conditions_grid_and_shapes(built):
    r, fam, b = built
    assert b.resolution == 64 and b.sample_shape == (16, 8, 8)
    assert torch.allclose(b.grid.double(), few_step_grid(8, 3.0, 0.0), atol=1e-7)      # = ZImagePipeline's sigmas
    cond, uncond, rcond = fam.conditions(b, 3)
    assert len(rcond) == 3 and cond["prompt_embeds"].shape == (3, 512, 32) and cond[PROMPT_MASK].dtype == torch.bool
    assert torch.equal(uncond[PROMPT_MASK][0], b.shared.encode([""])[PROMPT_MASK][0])    # the empty prompt
    x = fam.sample(b, fam.sample_inputs(b, "user", prompts=["a cat", "a dog"], seed=3))
    assert x.shape == (2, 16, 8, 8) and torch.isfinite(x).all()
    assert fam.render(b, x).shape == (2, 3, 64, 64)
    img = fam.decode(b, x.requires_grad_(True))
    img.mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0                          # differentiable for rewards


def test_exported_student_lora_loads_into_zimage_pipeline(built, tmp_path):
    r, fam, b = built
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.generator_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = fam.export(b, tmp_path / "student.safetensors")
    assert out == tmp_path / "student_lora" / "pytorch_lora_weights.safetensors" and out.is_file()
    from dmdr.models.t2i_components import clean_network_copy

    pipe = zimage_standin_components(seed=r.seed).pipeline(network=clean_network_copy(b.shared.denoiser.net))
    theirs = ZImageDenoiser(pipe.transformer)
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([1.0, 0.4])
    cond = b.shared.encode(["a cat", "a dog"])
    with torch.no_grad():
        base = theirs(x, t, cond)
        pipe.load_lora_weights(out.parent)
        ours = b.shared.generator()(x, t, cond)
        assert (ours - base).abs().max() > 1e-3 and torch.allclose(theirs(x, t, cond), ours, atol=1e-5)


@pytest.mark.parametrize("over,msg", [
    ("model.t_min=0.001", "model.t_min=0.001: Z-Image's Euler step"),
    ("model.resolution=1000", "model.resolution=1000: Z-Image needs a multiple of 16"),
    ("model.reward_vae=/x/taef1", "Z-Image has no tiny reward VAE"),
    ("model.config=sd3-medium", "model.config=sd3-medium does not match model.family=zimage; use z-image"),
])
def test_checks_fail_before_any_weights_with_one_line(over, msg):
    fam = family("zimage")
    with pytest.raises(ValueError, match=msg) as e:
        r = _recipe(over)
        fam.check(r)
        fam.config_name(r)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_memory_estimate_traces_the_real_network():
    r = load_recipe(RECIPE)
    est = family("zimage").memory(r)
    d = est.detail
    assert d["network_params"] == 6_154_908_736 and d["text_encoder_params"] == 4_022_468_096
    assert d["lora_params"] > 0 and est.optimiser == 12 * d["lora_params"]
    assert est.weights > 2 * (6_154_908_736 + 4_022_468_096) and est.activations > 0


@pytest.mark.slow
def test_cli_smoke_train_then_sample(tmp_path):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(RECIPE), "--smoke", "--out", str(run), "--set", "logging.progress=false"])
    assert res.exit_code == 0, res.output
    assert (run / "student_lora" / "pytorch_lora_weights.safetensors").is_file()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["stage"] == "refl" and "ca_norm" in last and "loss_reward_clip" in last   # D-DMD + DMDR ran
    png = tmp_path / "s.png"
    res = CliRunner().invoke(app, ["sample", "--run", str(run), "--prompt", "a cat", "--prompt", "a dog", "--out",
                                   str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activation_trace_counts_attention_called_with_keywords_as_a_fused_kernel():
    # diffusers' attention dispatcher (Z-Image, FLUX) calls scaled_dot_product_attention(query=..., key=..., value=...)
    import torch.nn.functional as F

    from dmdr.train.memory_estimate import saved_activation_bytes

    q, k, v = (torch.empty(1, 2, 64, 8, device="meta", requires_grad=True) for _ in range(3))
    kw = saved_activation_bytes(lambda: F.scaled_dot_product_attention(query=q, key=k, value=v), [])
    pos = saved_activation_bytes(lambda: F.scaled_dot_product_attention(q, k, v), [])
    assert kw == pos == 4 * (4 * 2 * 64 * 8) + 4 * 2 * 64            # q, k, v, out (fp32) + fp32 log-sum-exp; no S×S
