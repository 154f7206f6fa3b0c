"""The frame-aware core for video: moving digits, the tiny video DiT, per-frame rewards (mean over frames) and the
video-reward plug-in hook, 5-D rollouts and DMD reductions, frame grids, GIF/MP4 files, and the tiny moving-digits
DMDR run end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from dmdr import keys as K
from dmdr.data.moving_digits import MovingDigitsBatches, moving_digits
from dmdr.errors import UserError
from dmdr.losses import dmd_loss, fake_score_batch, fake_score_loss
from dmdr.models.tiny import TinyDiT, TinyDiTConfig
from dmdr.models.tiny_video import TinyVideoDiT, TinyVideoDiTConfig
from dmdr.rewards import build_reward
from dmdr.samplers import few_step_rollout
from dmdr.schedules import few_step_grid

torch.set_num_threads(1)


def test_moving_digits_translate_one_pixel_per_frame():
    x = torch.randn(3, 1, 8, 8)
    clips, labels, d = moving_digits(x, torch.tensor([1, 2, 3]), frames=5, direction=torch.tensor([1, -1, 1]))
    assert clips.shape == (3, 1, 5, 8, 8) and labels.tolist() == [1, 2, 3]
    for i in range(3):
        assert torch.equal(clips[i, :, 0], x[i])
        for f in range(5):
            assert torch.equal(clips[i, :, f], torch.roll(x[i], int(d[i]) * f, dims=-1))
    c1, y1 = next(MovingDigitsBatches(16, frames=4, seed=3))
    c2, y2 = next(MovingDigitsBatches(16, frames=4, seed=3))
    assert torch.equal(c1, c2) and c1.shape == (16, 1, 4, 8, 8) and c1.min() >= -1 and c1.max() <= 1
    moved = [torch.equal(c1[i, :, 1], torch.roll(c1[i, :, 0], s, -1)) for i in range(16) for s in (1, -1)]
    assert sum(moved) >= 16  # each clip moves left or right (a blank digit would match both)


def test_tiny_video_dit_with_one_frame_is_tiny_dit():
    cfg = dict(dim=32, depth=1, heads=2)
    torch.manual_seed(0)
    video = TinyVideoDiT(TinyVideoDiTConfig(frames=1, **cfg))
    for p in video.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.zeros_(video.frame_pos)
    image = TinyDiT(TinyDiTConfig(**cfg))
    image.load_state_dict({k: v for k, v in video.state_dict().items() if k != "frame_pos"})
    x, t, y = torch.randn(2, 1, 1, 8, 8), torch.rand(2), torch.tensor([3, 4])
    assert torch.allclose(video(x, t, y)[:, :, 0], image(x[:, :, 0], t, y), atol=1e-6)
    with pytest.raises(ValueError, match="x_t must be"):
        video(torch.randn(2, 1, 8, 8), t, y)


def test_image_reward_on_clips_is_the_mean_of_frame_rewards():
    reward = build_reward("digits_classifier")
    clips = torch.rand(3, 1, 4, 8, 8, requires_grad=True)
    y = torch.tensor([0, 5, 9])
    r = reward(clips, y)
    per_frame = torch.stack([reward(clips[:, :, f], y) for f in range(4)], 1)
    assert r.shape == (3,) and torch.allclose(r, per_frame.mean(1), atol=1e-6)
    r.sum().backward()
    assert clips.grad is not None and clips.grad.abs().sum() > 0
    assert torch.equal(reward(clips[:, :, 0].detach(), y), per_frame[:, 0].detach())  # images: unchanged path


def test_prompt_rewards_repeat_prompts_per_frame():
    from dmdr.rewards.base import repeat_per_frame

    assert repeat_per_frame(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    assert repeat_per_frame(torch.tensor([1, 2]), 2).tolist() == [1, 1, 2, 2]
    assert repeat_per_frame(None, 4) is None and repeat_per_frame("one prompt", 4) == "one prompt"
    td = TensorDict({"e": torch.arange(2.0)[:, None]}, batch_size=[2])
    assert repeat_per_frame(td, 2)["e"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    seen = {}

    def spy(images, cond):
        seen["shape"], seen["cond"] = tuple(images.shape), list(cond)
        return images.mean(dim=(1, 2, 3))

    from dmdr.rewards.base import RewardSpec
    from dmdr.rewards.plugin import FunctionReward

    r = FunctionReward(spy, RewardSpec("spy", differentiable=True, reads_prompts=True))
    clips = torch.rand(2, 3, 3, 4, 4)
    out = r(clips, ["cat", "dog"])
    assert seen == {"shape": (6, 3, 4, 4), "cond": ["cat"] * 3 + ["dog"] * 3}
    assert torch.allclose(out, clips.mean(dim=(1, 2, 3, 4)))


def test_video_reward_plugin_gets_whole_clips():
    r = build_reward("plugin", target="dmdr.rewards.plugin:temporal_smoothness", differentiable=True, video=True)
    assert r.spec.video
    still = torch.rand(2, 1, 1, 8, 8).expand(2, 1, 4, 8, 8)
    moving, _, _ = moving_digits(torch.rand(2, 1, 8, 8), torch.zeros(2), frames=4, direction=torch.tensor([1, -1]))
    assert torch.equal(r(still), torch.zeros(2)) and torch.equal(r(still[:, :, :1]), torch.zeros(2))  # one frame: 0, not NaN
    assert torch.all(r(moving) < 0)
    with pytest.raises(ValueError, match="video reward: it takes clips"):
        r(torch.rand(2, 1, 8, 8))
    image_plugin = build_reward("plugin", target="dmdr.rewards.plugin:mean_brightness", differentiable=True)
    assert not image_plugin.spec.video
    assert torch.allclose(image_plugin(moving), moving.mean(dim=(1, 2, 3, 4)))


def test_rollout_and_dmd_losses_on_clips_reduce_over_frames():
    torch.manual_seed(0)
    model = TinyVideoDiT(TinyVideoDiTConfig(frames=3, dim=32, depth=1, heads=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    y, noise = torch.tensor([1, 2]), torch.randn(2, 1, 3, 8, 8)
    roll = few_step_rollout(model, noise, few_step_grid(2).float(), y)
    assert roll[K.X_PER_STEP].shape == (2, 2, 1, 3, 8, 8) and roll[K.SAMPLE].shape == (2, 1, 3, 8, 8)
    x0, real, fake = (torch.randn(2, 1, 3, 8, 8) for _ in range(3))
    out = dmd_loss(TensorDict({K.X0_PRED: x0, K.X0_REAL: real, K.X0_FAKE: fake}, batch_size=[2]))
    flat = dmd_loss(TensorDict({K.X0_PRED: x0.flatten(1, 2), K.X0_REAL: real.flatten(1, 2),
                                K.X0_FAKE: fake.flatten(1, 2)}, batch_size=[2]))
    for key in ("loss_dmd", "dmd_grad_norm", "dmd_weight"):  # per-sample normaliser over C, F, H, W
        assert torch.allclose(out[key], flat[key])
    tau = torch.tensor([0.3, 0.8])
    fs = fake_score_batch(model, roll[K.SAMPLE], tau, noise, y)
    assert fs[K.X_T].shape == (2, 1, 3, 8, 8)
    assert torch.allclose(fs[K.X_T], (1 - tau.view(2, 1, 1, 1, 1)) * roll[K.SAMPLE] + tau.view(2, 1, 1, 1, 1) * noise)
    assert fake_score_loss(fs)["loss_fake_score"].ndim == 0


def test_frame_grid_lays_out_one_clip_per_row(tmp_path):
    from PIL import Image

    from dmdr.eval.grid import save_grid

    clips = torch.rand(3, 1, 4, 8, 8)
    save_grid(clips, tmp_path / "g.png", nrow=99, scale=1, pad=2)
    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    f = (clips[1, 0, 2] * 255).round().numpy()  # clip 1, frame 2 at row 1, column 2
    assert np.abs(im[12:20, 22:30, 0].astype(float) - f).max() <= 1


def test_gif_and_mp4_round_trip_frame_count(tmp_path):
    from dmdr.video import read_video, save_video

    clips = torch.rand(2, 3, 5, 8, 10)
    gif = save_video(clips[0], tmp_path / "a.gif", fps=4)
    frames = read_video(gif)
    assert frames.shape == (5, 8, 10, 3)
    # 80 pixels per frame < 256 palette colours: the GIF keeps every value
    assert np.abs(frames.astype(float) - clips[0].permute(1, 2, 3, 0).numpy() * 255).max() <= 1
    mp4 = save_video(clips, tmp_path / "b.mp4", fps=4, nrow=2, scale=2)
    back = read_video(mp4)
    assert back.shape == (5, (16 + 2) + 2, 2 * (20 + 2) + 2, 3)  # one row of two clips, padded; even sizes
    with pytest.raises(UserError, match=r"\.gif or \.mp4"):
        save_video(clips, tmp_path / "c.avi")


def test_mp4_without_encoder_is_one_clear_line(tmp_path, monkeypatch):
    import dmdr.video as video

    monkeypatch.setattr(video, "mp4_available", lambda: False)
    with pytest.raises(UserError) as e:
        video.save_video(torch.rand(1, 3, 2, 4, 4), tmp_path / "x.mp4")
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'dmdr[video]'" in msg and ".gif" in msg
    assert not (tmp_path / "x.mp4").exists()
    video.save_video(torch.rand(1, 3, 2, 4, 4), tmp_path / "x.gif")  # GIF needs Pillow only


def test_moving_digits_dmdr_run_end_to_end(tmp_path):
    from dmdr.train.video_digits import VideoDigitsConfig, run_video_digits
    from dmdr.video import read_video

    cfg = VideoDigitsConfig(frames=4, batch_size=16, teacher_steps=40, dmdr_steps=4, dim=32, depth=1, heads=2)
    out = run_video_digits(cfg, out_dir=tmp_path)
    assert out["samples"].shape == (10, 1, 4, 8, 8)
    assert 0 <= float(out["samples"].min()) and float(out["samples"].max()) <= 1
    t = [r["teacher_loss"] for r in out["teacher_log"]]
    assert np.mean(t[-10:]) < np.mean(t[:10])  # the teacher fits moving digits
    assert len(out["log"]) == 4 and all(np.isfinite(list(r.values())).all() for r in out["log"])
    assert all("reward" in r for r in out["log"])  # per-frame digits reward on 5-D x̂0
    moved = any(not torch.equal(a, b) for a, b in zip(out["generator"].parameters(), out["teacher"].parameters()))
    assert moved
    names = {f.name for f in out["files"]}
    assert {"samples.gif", "samples.mp4", "samples.png"} <= names
    assert read_video(tmp_path / "samples.gif").shape[0] == 4
    assert read_video(tmp_path / "samples.mp4").shape[0] == 4
