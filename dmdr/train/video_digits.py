"""The digits-sized check for video: a tiny DMDR run on moving digits that goes through the frame-aware core.

Data: :class:`dmdr.data.moving_digits.MovingDigitsBatches` clips (B, 1, F, 8, 8). Teacher: a
:class:`~dmdr.models.tiny_video.TinyVideoDiT` fitted for ``teacher_steps`` flow-matching steps
(``L = mean ‖v_θ(x_t, t, y) − (ε − x0)‖²``, t ~ U(0, 1)). Then DMDR with full-copy generator and critic (the
digits layout), every tensor a 5-D clip:

* critic step: rollout ``few_step_rollout`` (no grad) → ``fake_score_batch`` at τ ~ DynaRS → ``fake_score_loss``;
* generator step: x̂0 = G(x_i, t_i) at a random grid step i, ``distribution_matching_targets`` (renoise at τ,
  teacher with CFG jitter, critic) → ``dmd_loss``, plus ``weight · reward_loss`` of an image reward scored per frame
  and averaged over frames (:func:`dmdr.rewards.base.per_frame_mean`, here the digits classifier) or a video reward.

:func:`run_video_digits` returns the metrics, the models and a fixed-seed sample batch; ``out_dir`` receives the
sample clips as ``samples.gif`` (+ ``samples.mp4`` when the encoder is installed) and a frames grid ``samples.png``.
Its test (tests/test_wan_video.py) asserts the shapes and reductions, not quality: at this scale (a few hundred
CPU steps) the point is that every core path takes (B, C, F, H, W).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDict

from dmdr import keys as K
from dmdr.data.digits import to_unit
from dmdr.data.moving_digits import MovingDigitsBatches
from dmdr.losses import dmd_loss, fake_score_batch, fake_score_loss, reward_loss
from dmdr.models.tiny_video import TinyVideoDiT, TinyVideoDiTConfig
from dmdr.samplers import few_step_rollout
from dmdr.schedules import few_step_grid, sample_dynars
from dmdr.scores import distribution_matching_targets, sample_cfg_scale


@dataclass
class VideoDigitsConfig:
    frames: int = 4
    batch_size: int = 32
    teacher_steps: int = 200
    teacher_lr: float = 2e-3
    dmdr_steps: int = 20
    steps: int = 2                      # student grid N
    lr: float = 1e-4
    cfg: float = 2.0
    reward: str | None = "digits_classifier"
    reward_kwargs: dict = field(default_factory=dict)
    reward_weight: float = 0.05
    dim: int = 64
    depth: int = 2
    heads: int = 4
    seed: int = 0


def _teacher(cfg: VideoDigitsConfig, data: MovingDigitsBatches, log: list) -> TinyVideoDiT:
    model = TinyVideoDiT(TinyVideoDiTConfig(frames=cfg.frames, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr)
    for _ in range(cfg.teacher_steps):
        x0, y = next(data)
        t = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        y = torch.where(torch.rand(y.shape) < 0.1, torch.full_like(y, model.null_class), y)  # CFG dropout
        loss = ((model(model.path.renoise(x0, t, noise), t, y) - model.path.target(x0, noise, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"teacher_loss": float(loss.detach())})
    return model.eval().requires_grad_(False)


def run_video_digits(cfg: VideoDigitsConfig = VideoDigitsConfig(), out_dir: str | Path | None = None) -> dict:
    """Run the check (see the module docstring). Returns ``{"teacher", "generator", "critic", "samples" (B, 1, F, 8,
    8) in [0, 1], "teacher_log", "log" (per DMDR step: loss_dmd, loss_fake_score, reward), "files"}``."""
    from dmdr.rewards import build_reward

    torch.manual_seed(cfg.seed)
    data = MovingDigitsBatches(cfg.batch_size, frames=cfg.frames, seed=cfg.seed)
    teacher_log: list = []
    teacher = _teacher(cfg, data, teacher_log)
    gen = copy.deepcopy(teacher).train().requires_grad_(True)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=cfg.lr)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.lr)
    reward = build_reward(cfg.reward, **cfg.reward_kwargs) if cfg.reward else None
    grid = few_step_grid(cfg.steps).float()
    log = []
    for k in range(cfg.dmdr_steps):
        _, y = next(data)
        B = y.shape[0]
        noise = torch.randn(B, 1, cfg.frames, 8, 8)
        roll = few_step_rollout(gen, noise, grid, y)
        # critic: denoising loss on the detached rollout sample
        tau_c = sample_dynars(B, k, cfg.dmdr_steps)
        loss_c = fake_score_loss(fake_score_batch(critic, roll[K.SAMPLE], tau_c, torch.randn_like(noise), y))
        opt_c.zero_grad(set_to_none=True)
        loss_c["loss_fake_score"].backward()
        opt_c.step()
        # generator: x̂0 at a random grid step, DMD + reward
        i = int(torch.randint(0, cfg.steps, ()))
        t_i = grid[i].expand(B)
        x0 = gen.path.to_x0(roll[K.X_PER_STEP][:, i], t_i, gen(roll[K.X_PER_STEP][:, i], t_i, y))
        tau = sample_dynars(B, k, cfg.dmdr_steps)
        td = distribution_matching_targets(x0, teacher, critic, y, tau=tau, noise=torch.randn_like(x0),
                                           uncond=teacher.null_cond(y), cfg_scale=sample_cfg_scale(cfg.cfg))
        td[K.X0_PRED] = x0
        out = dmd_loss(td)
        loss = out["loss_dmd"]
        row = {"loss_dmd": float(loss.detach()), "loss_fake_score": float(loss_c["loss_fake_score"].detach())}
        if reward is not None:
            cond = y if reward.spec.reads_labels else None
            r = reward(to_unit(x0), cond)
            rl = reward_loss(TensorDict({K.reward_key(cfg.reward): r}, batch_size=[B]), cfg.reward, weight=cfg.reward_weight)
            loss = loss + rl[f"loss_reward_{cfg.reward}"]
            row["reward"] = float(r.detach().mean())
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        log.append(row)
    gen.eval()
    with torch.no_grad():
        y = torch.arange(10)
        g = torch.Generator().manual_seed(cfg.seed)
        samples = to_unit(few_step_rollout(gen, torch.randn(10, 1, cfg.frames, 8, 8, generator=g), grid, y)[K.SAMPLE])
    files = []
    if out_dir is not None:
        from dmdr.eval.grid import save_grid
        from dmdr.video import mp4_available, save_video

        out = Path(out_dir)
        files.append(save_video(samples, out / "samples.gif", fps=4, nrow=5, scale=4))
        if mp4_available():
            files.append(save_video(samples, out / "samples.mp4", fps=4, nrow=5, scale=4))
        files.append(save_grid(samples, out / "samples.png", nrow=cfg.frames, row_labels=[str(i) for i in range(10)]))
    return {"teacher": teacher, "generator": gen, "critic": critic, "samples": samples, "teacher_log": teacher_log,
            "log": log, "files": files}


__all__ = ["VideoDigitsConfig", "run_video_digits"]
