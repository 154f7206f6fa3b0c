"""Text-to-image DMDR training in smoke mode (tiny random SD3/SDXL modules, tiny rewards, offline), the
``dmdr sample`` path for T2I runs, and one-line errors for bad T2I input."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmdr.recipes import load_recipe
from dmdr_cli.app import app

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sd3": ROOT / "recipes" / "sd3-medium-4step.yaml", "sdxl": ROOT / "recipes" / "sdxl-1step.yaml"}
ALL_T2I = ["sd3-medium-4step", "sd3-medium-4step-srpo", "sd35-large-4step", "sd35-large-4step-srpo", "sdxl-1step"]
runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code, out, err, needle):
    assert code == 2, (code, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def _smoke_recipe(family, *extra):
    return load_recipe(RECIPES[family], ["model.smoke=true", "stages.0.batch_size=2", "stages.1.batch_size=2",
                                         "logging.sample_every=0", "logging.checkpoint_every=0",
                                         "logging.progress=false", *extra])


# ---- the shipped recipes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_T2I)
def test_recipes_mirror_the_official_runs(name):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    sd3 = r.model.family == "sd3"
    if r.model.family == "sd3":
        assert r.generator.lora is not None and r.generator.lora.rank == 64 and r.generator.lora.alpha == 128
    else:  # official SDXL: a full-weights generator from DMD2's ODE-pretrained 1-step UNet (--use-lora-gen 0)
        assert r.generator.lora is None and r.generator.init.endswith(".bin")
    assert (r.critic.lora.rank, r.critic.lora.alpha, r.critic.scale_fake, r.optim.ratio) == (32, 32, 2.0, 5)
    assert r.data.dataset == "prompts" and r.model.path.startswith("/path/to/")
    assert len(r.stages) == 2 and not r.stages[0].rewards
    hinges = {t.hinge for t in r.stages[1].rewards}
    names = [t.name for t in r.stages[1].rewards]
    assert hinges == {0.7} and names == (["clip", "srpo"] if name.endswith("srpo") else ["clip", "hpsv2"])
    if sd3:
        assert r.model.t_min == 0.001 and r.generator.steps == 4
        assert r.dmd.dynadg.scale0 == 0.5 and r.dmd.dynadg.horizon == r.dmd.dynars.horizon == 2000
    else:
        assert r.generator.steps == 1 and not r.dmd.dynadg.enabled and not r.dmd.dynars.enabled
    large = name.startswith("sd35")
    assert (r.model.resolution, r.generator.shift, r.dmd.cfg) == ((1024, 5.0, 4.0) if large else
                                                                   (512, 3.0, 7.0) if sd3 else (1024, 1.0, 7.0))


# ---- the trainer in smoke mode ---------------------------------------------------------------------------------
def _frozen(shared):
    return {n: p.detach().clone() for n, p in shared.named_parameters() if ".lora_" not in n}


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_smoke_training_updates_only_the_adapters(family, tmp_path):
    from dmdr.train.dmdr import DMDRTrainer

    lora = ["generator.init=null", "generator.lora={rank: 64, alpha: 128, targets: [to_q, to_k, to_v, to_out.0]}"]
    r = _smoke_recipe(family, *(lora if family == "sdxl" else []))  # SDXL's LoRA-generator option
    tr = DMDRTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a, **k: None)
    b, shared = tr.bundle, tr.bundle.shared
    assert b.generator_is_lora and b.base is shared.denoiser
    trainable = {id(p) for p in shared.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in b.generator_params + b.critic_params}
    base0, gen0, crit0 = _frozen(shared), dict(b.generator_state()), dict(b.critic_state())
    gen0, crit0 = {k: v.clone() for k, v in gen0.items()}, {k: v.clone() for k, v in crit0.items()}
    summary = tr.run(max_steps_per_stage=1)

    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in recs] == ["cold_start", "refl"]
    for x in recs:
        assert all(math.isfinite(v) for k, v in x.items() if k.startswith("loss_")), x
        assert x["skipped_updates"] == 0
    assert "loss_reward_clip" in recs[1] and "loss_reward_hpsv2" in recs[1] and "loss_reward_clip" not in recs[0]
    assert all(torch.equal(v, base0[k]) for k, v in _frozen(shared).items()), "the base must stay frozen"
    assert any(not torch.equal(v, gen0[k]) for k, v in b.generator_state().items()), "generator LoRA unchanged"
    assert any(not torch.equal(v, crit0[k]) for k, v in b.critic_state().items()), "critic LoRA unchanged"
    # smoke rewards are tiny random-init versions (the placeholder checkpoint paths are dropped)
    assert r.stages[1].rewards[0].kwargs == {"config": "tiny", "random_init": True}
    lora = summary["student"]
    assert lora.name == "pytorch_lora_weights.safetensors" and lora.parent == tmp_path / "student_lora"
    assert Image.open(summary["final_grid"]).size[0] > 0


def test_bundle_grid_and_generator_input():
    """SDXL one step: grid [0.399, 0] and the generator sees pure noise at t_0 (as in the rollout); SD3: the
    official shifted grid with t_min 0.001 and ordinary renoising."""
    from dmdr.families.registry import build_bundle

    xl = build_bundle(_smoke_recipe("sdxl"), torch.device("cpu"))
    assert xl.grid.tolist() == pytest.approx([0.399, 0.0])
    x0, eps = torch.randn(2, *xl.sample_shape), torch.randn(2, *xl.sample_shape)
    t = torch.full((2,), 0.399)
    assert torch.equal(xl.path.renoise(x0, t, eps), eps)
    assert not torch.allclose(xl.base.path.renoise(x0, t, eps), eps)
    assert torch.allclose(xl.path.renoise(x0, torch.full((2,), 0.2), eps), xl.base.path.renoise(x0, torch.full((2,), 0.2), eps))
    sd3 = build_bundle(_smoke_recipe("sd3"), torch.device("cpu"))
    assert sd3.grid[:4].tolist() == pytest.approx([1.0, 0.9001, 0.7503, 0.5010], abs=1e-4)
    assert sd3.base.path.t_min == 0.001
    cond, uncond, prompts = sd3.sample_cond(3)
    assert cond.batch_size == torch.Size([3]) and uncond.batch_size == torch.Size([3]) and len(prompts) == 3
    assert all(isinstance(p, str) for p in prompts)
    img = sd3.decode(torch.randn(1, *sd3.sample_shape, requires_grad=True))
    assert img.shape == (1, 3, 64, 64) and img.requires_grad and sd3.sample_shape == (16, 8, 8)


def test_trainer_uses_the_family_grid(tmp_path):
    from dmdr.train.dmdr import DMDRTrainer

    tr = DMDRTrainer(_smoke_recipe("sdxl"), tmp_path, torch.device("cpu"), console=lambda *a, **k: None)
    assert tr.grid.tolist() == pytest.approx(tr.bundle.grid.tolist())
    assert tr.grid[0].item() == pytest.approx(0.399)  # SDXL one-step convention: timestep 399 on pure noise


def test_smoke_reward_kwargs():
    from dmdr.families.diffusers_t2i import smoke_reward_kwargs

    assert smoke_reward_kwargs("srpo", {"checkpoint": "/x", "tokenizer": "/t", "k": 0.1}) == \
        {"k": 0.1, "config": "tiny", "random_init": True}
    assert smoke_reward_kwargs("plugin", {"target": "a:b"}) == {"target": "a:b"}


# ---- CLI: train --smoke, then sample ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "sd3"
    code, stdout, err = _cli("train", RECIPES["sd3"], "--smoke", "--out", out, "--force")
    assert code == 0, err
    assert (out / "student_lora" / "pytorch_lora_weights.safetensors").is_file()
    return out


def test_cli_smoke_train_then_sample(sd3_run, tmp_path):
    png = tmp_path / "x.png"
    code, stdout, err = _cli("sample", "--run", sd3_run, "--steps", 4, "--prompt", "a red cube", "--out", png)
    assert code == 0, err
    assert "wrote 1 samples" in stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 16
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n# comment\na dog\n")
    code, stdout, err = _cli("sample", "--run", sd3_run, "--prompts", prompts, "--num", 3, "--out", png)
    assert code == 0 and "wrote 3 samples" in stdout, err


def test_cli_sample_bad_input(sd3_run, tmp_path):
    png = tmp_path / "x.png"
    _one_line_error(*_cli("sample", "--run", sd3_run, "--out", png), "needs --prompt TEXT")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    _one_line_error(*_cli("sample", "--run", sd3_run, "--prompts", empty, "--out", png), "holds no prompts")
    _one_line_error(*_cli("sample", "--run", sd3_run, "--prompt", "x", "--out", tmp_path / "x.npz"), "written as .png")
    # a run whose recipe no longer matches its checkpoint: the error lists the first keys
    run = tmp_path / "edited"
    import shutil

    shutil.copytree(sd3_run, run)
    text = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(text.replace("rank: 64", "rank: 8", 1))
    _one_line_error(*_cli("sample", "--run", run, "--prompt", "x", "--out", png), "shape mismatch ['net.")
    r = load_recipe(sd3_run / "recipe.yaml", ["generator.lora.targets=[to_q]"])
    from dmdr.recipes import save_recipe

    save_recipe(r, run / "recipe.yaml")
    _one_line_error(*_cli("sample", "--run", run, "--prompt", "x", "--out", png), "unexpected ['net.")


# ---- CLI: bad training input ------------------------------------------------------------------------------------
def test_cli_train_bad_input(tmp_path):
    sd3 = RECIPES["sd3"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "a", "--set", f"data.prompts={prompts}"), "model.path")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "b", "--set", f"data.prompts={prompts}",
                          "--set", f"model.path={tmp_path}"), "model_index.json")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "c", "--smoke", "--set", "stages.1.rewards.0.name=nope"),
                    "unknown reward")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "d", "--smoke", "--set", f"data.prompts={empty}"),
                    "holds no prompts")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "e", "--smoke", "--set", f"data.prompts={binary}"),
                    "cannot read prompt file")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "f", "--set", "data.prompts=/nonexistent/p.txt"),
                    "data.prompts=/nonexistent/p.txt")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "g", "--set", f"data.prompts={prompts}",
                          "--set", "generator.lora=null"), "generator.lora is null and generator.init is not set")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "h", "--smoke", "--set", "model.t_min=0.0"),
                    "model.t_min")
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "i", "--smoke", "--set", "critic.lora.targets=[qkv]"),
                    "critic.lora.targets")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text("{}")
    # reward files are checked before any weights are loaded (not when stage 2 starts)
    _one_line_error(*_cli("train", sd3, "--out", tmp_path / "j", "--set", f"data.prompts={prompts}",
                          "--set", f"model.path={model_dir}"), "stages.1.rewards.0.kwargs.checkpoint=/path/to/")
    if not torch.cuda.is_available():
        _one_line_error(*_cli("train", sd3, "--out", tmp_path / "k", "--smoke", "--device", "cuda"),
                        "runtime.device=cuda")
