"""The Wan video family through the Family API and the trainer (smoke stand-ins of the real config): video sample
shape, per-frame rewards on decoded clips, model.reward_frames, seeded sampling, MP4/GIF/PNG files, the LoRA export
that WanPipeline loads, recipe checks and `dmdr sample` errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from dmdr.families import family  # noqa: E402
from dmdr.models.t2i_components import PROMPT_EMBEDS  # noqa: E402
from dmdr.recipes import load_recipe  # noqa: E402
from dmdr_cli.app import app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "wan2.1-t2v-1.3b-4step.yaml"
CPU = torch.device("cpu")
SMOKE = ["model.smoke=true", "model.max_sequence_length=16", "stages.0.batch_size=2", "stages.1.batch_size=2",
         "logging.sample_every=0", "logging.checkpoint_every=0", "logging.progress=false"]
runner = CliRunner()


def _recipe(*extra):
    return load_recipe(RECIPE, [*SMOKE, *extra])


@pytest.fixture(scope="module")
def bundle():
    fam = family("wan")
    return fam, fam.build(_recipe("model.reward_frames=null"), CPU)


def test_recipe_cites_settings_and_validates():
    r = load_recipe(RECIPE)
    assert (r.model.family, r.model.config, r.model.num_frames, r.model.resolution, r.model.width) == \
        ("wan", "wan2.1-t2v-1.3b", 81, 480, 832)
    # FastVideo's published DMD values for Wan2.1-T2V-1.3B (docs/families/wan.md)
    assert (r.dmd.cfg, r.optim.ratio, r.optim.lr_gen, r.optim.grad_clip, r.generator.shift) == (3.5, 5, 2e-6, 1.0, 8.0)
    assert (r.dmd.tau_floor, r.dmd.tau_ceiling) == (0.02, 0.98)
    assert r.model.reward_frames == 1 and r.stages[1].rewards[0].name == "clip"


def test_bundle_has_video_shapes_and_per_frame_rewards(bundle):
    fam, b = bundle
    assert b.sample_shape == (16, 2, 8, 8) and b.num_frames == 5 and b.fps == 16
    cond, uncond, prompts = fam.conditions(b, 2)
    assert cond[PROMPT_EMBEDS].shape == (2, 16, 32) and uncond[PROMPT_EMBEDS].shape == (2, 16, 32)
    assert len(prompts) == 2 and all(isinstance(p, str) for p in prompts)
    x = torch.randn(2, *b.sample_shape, requires_grad=True)
    clips = fam.decode(b, x)
    assert clips.shape == (2, 3, 5, 64, 64)
    reward = fam.reward(b, "clip", {"checkpoint": "/none", "tokenizer": "/none"})  # smoke: tiny random CLIP
    r = reward(clips, prompts)
    frames = torch.stack([reward(clips[:, :, f], prompts) for f in range(5)], 1)
    assert r.shape == (2,) and torch.allclose(r, frames.mean(1), atol=1e-5)
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable through the 3-D VAE


def test_reward_frames_decodes_the_causal_prefix(bundle):
    fam, b = bundle
    x = torch.randn(1, *b.sample_shape)
    b.recipe.model.reward_frames = 1
    try:
        first = fam.decode(b, x)
    finally:
        b.recipe.model.reward_frames = None
    full = fam.render(b, x)
    assert first.shape == (1, 3, 1, 64, 64) and full.shape == (1, 3, 5, 64, 64)
    assert torch.allclose(first[:, :, 0], full[:, :, 0], atol=1e-6)


def test_sampling_is_seeded_and_writes_video_files(bundle, tmp_path):
    from dmdr.video import read_video

    fam, b = bundle
    inputs = fam.sample_inputs(b, "user", prompts=["a cat", "a dog"], seed=3)
    x1, x2 = fam.sample(b, inputs), fam.sample(b, inputs)
    other = fam.sample(b, fam.sample_inputs(b, "user", prompts=["a cat", "a dog"], seed=4))
    assert x1.shape == (2, 16, 2, 8, 8) and torch.equal(x1, x2) and not torch.equal(x1, other)
    teacher = fam.sample_teacher(b, inputs, steps=2, cfg=2.0)
    assert teacher.shape == x1.shape and torch.isfinite(teacher).all()
    clips = fam.render(b, x1)
    for suffix in (".gif", ".mp4"):
        f = fam.save_samples(b, clips, inputs, tmp_path / f"s{suffix}")
        assert read_video(f).shape[0] == 5
    png = fam.save_samples(b, clips, inputs, tmp_path / "s.png")
    from PIL import Image

    assert Image.open(png).size == (5 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # one clip per row, its frames across


def test_export_loads_into_wanpipeline(bundle, tmp_path):
    from dmdr.models.t2i import clean_network_copy

    fam, b = bundle
    shared = b.shared
    with torch.no_grad():
        for p in b.generator_params:
            p.normal_(0, 0.05)
    out = fam.export(b, tmp_path / "student.safetensors")
    assert out == tmp_path / "student_lora" / "pytorch_lora_weights.safetensors" and out.is_file()
    from dmdr.models.wan import WanDenoiser

    pipe = WanDenoiser.make_pipeline(shared.denoiser, shared.vae, shared.encoder,
                                     network=clean_network_copy(shared.denoiser.net))
    pipe.load_lora_weights(out.parent)
    cond = shared.encode(["a cat"])
    x, t = torch.randn(1, *b.sample_shape), torch.tensor([0.6])
    with torch.no_grad():
        ref = b.generator(x, t, cond)
        got = pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond[PROMPT_EMBEDS],
                               return_dict=False)[0]
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("override,needle", [
    ("model.num_frames=6", "4k + 1"),
    ("model.vae_gradient_checkpointing=true", "model.reward_frames"),
    ("model.reward_frames=30", "has only 21 latent frames"),
    ("model.t_min=0.001", "model.t_min: 0"),
    ("model.width=840", "multiple of 16"),
])
def test_bad_video_recipes_fail_in_one_line(override, needle):
    r = load_recipe(RECIPE, ["model.smoke=false", override])
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        family("wan").check(r)


def test_trainer_smoke_run_and_dmdr_sample(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    monitors = ["monitors.every=1", "monitors.seeds=2",
                "monitors.checks=[{kind: diversity, threshold: 0.9}, {kind: heldout_reward, threshold: 0.9, "
                "reward: {name: plugin, kwargs: {target: 'dmdr.rewards.plugin:temporal_smoothness', "
                "differentiable: true, video: true}}}]"]
    sets = [a for o in [*SMOKE[1:], "stages.0.steps=1", "stages.1.steps=1", "model.reward_frames=2", *monitors]
            for a in ("--set", o)]
    res = runner.invoke(app, ["train", str(RECIPE), "--smoke", "--out", str(run), *sets])
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in lines if "stage" in x]
    mons = [x for x in lines if "monitor_diversity" in x]
    assert [x["stage"] for x in recs] == ["cold_start", "refl"] and len(mons) == 3
    assert all(math.isfinite(v) for x in recs for k, v in x.items() if k.startswith("loss_"))
    assert "reward_clip" in recs[1]  # stage 2's CLIP reward, per frame on the decoded clips
    # monitors on clips: diversity over all frames, a video-reward plug-in on whole clips
    assert all(math.isfinite(x["monitor_diversity"]) and x["monitor_diversity"] > 0 for x in mons)
    assert all(x["monitor_heldout_plugin"] < 0 for x in mons)  # 5 frames (reward_frames=2): real motion
    lora = load_file(run / "student_lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.blocks.") and k.endswith("lora_B.weight") and v.abs().sum() > 0
               for k, v in lora.items())  # the generator moved from its zero init
    tmp_path = run

    res = runner.invoke(app, ["sample", "--run", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "a.gif")])
    assert res.exit_code == 0, res.stderr
    from dmdr.video import read_video

    assert read_video(tmp_path / "a.gif").shape[0] == 5
    import dmdr.video as video

    monkeypatch.setattr(video, "mp4_available", lambda: False)
    res = runner.invoke(app, ["sample", "--run", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "a.mp4")])
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "dmdr[video]" in lines[0]
    assert not (tmp_path / "a.mp4").exists()


def test_dmdr_eval_on_a_video_run(tmp_path):
    """`dmdr eval --run` on a Wan smoke run: the CLIP score of a clip is the mean of its frames' scores, i.e.
    100 × the per-frame CLIP reward, and the side-by-side grid has one clip per row."""
    from PIL import Image

    run = tmp_path / "run"
    sets = [a for o in [*SMOKE[1:], "stages.0.steps=1", "stages.1.steps=1"] for a in ("--set", o)]
    res = runner.invoke(app, ["train", str(RECIPE), "--smoke", "--out", str(run), *sets])
    assert res.exit_code == 0, res.stderr
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    res = runner.invoke(app, ["eval", "--run", str(run), "--prompts", str(prompts), "--teacher-steps", "1",
                              "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.stderr
    out = json.loads((tmp_path / "e.json").read_text())
    for side in ("student", "teacher_metrics"):
        assert math.isclose(out[side]["clip_score"], 100 * out[side]["reward_clip"], rel_tol=1e-3)
    assert Image.open(out["grid"]).size[1] == 2 * 2 * 2 * (64 + 2) + 2  # 2 prompts × (2 student + 2 teacher) clips


def test_grpo_on_video_scores_one_log_prob_per_clip_transition(tmp_path):
    """task: grpo through the Wan family: the policy's Gaussian covers (C, F, H, W) (event_dim 4), so each
    transition has one log-probability and the on-policy ratio is 1."""
    run = tmp_path / "grpo"
    sets = ["model.family=wan", "model.config=wan2.1-t2v-1.3b", "model.t_min=0", "model.max_sequence_length=16",
            "logging.progress=false", "iterations=1"]
    res = runner.invoke(app, ["train", str(ROOT / "recipes" / "sd3-medium-grpo.yaml"), "--smoke", "--out", str(run),
                              *[a for o in sets for a in ("--set", o)]])
    assert res.exit_code == 0, res.stderr
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"ppo_updates"' in line]
    assert len(rec) == 1 and rec[0]["ppo_updates"] > 0
    assert abs(rec[0]["mean_ratio"] - 1) < 1e-4 and math.isfinite(rec[0]["loss_objective"])
