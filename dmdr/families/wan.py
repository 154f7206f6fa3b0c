"""Wan2.1 text-to-video (``model.family: wan``): ``WanTransformer3DModel``, rectified flow, UMT5-XXL, the causal
3-D ``AutoencoderKLWan`` (×4 time, ×8 space, per-channel latent normalisation).

What differs from the image families (docs/families/wan.md):

* **Samples carry frames**: ``bundle.sample_shape = (16, F', H/8, W/8)`` with ``F' = (F − 1)/4 + 1``
  (``model.num_frames`` = F = 4k + 1; ``model.width``, default ``model.resolution``). The core (paths, samplers,
  DMD/critic/policy losses) reduces over every non-batch dim, so it needs nothing else; sampling draws
  ``randn(B, *sample_shape)`` from the batch seed exactly as the image families do.
* **Decode** (rewards) returns clips (B, 3, F, H, W) in [0, 1]. An image reward then scores each frame and averages
  over frames (:func:`dmdr.rewards.base.per_frame_mean`); a reward declared ``video: true`` (plug-in) gets the whole
  clip. ``model.reward_frames: k`` decodes only the first k latent frames for the rewards (the first 4(k−1)+1 frames;
  exact, the VAE is causal): a differentiable decode of all 81 frames at 480×832 holds hundreds of GiB
  (docs/families/wan.md), one frame about 11 GiB in float32. Grids and files render every frame.
* **Files**: ``dmdr sample --out x.mp4`` (imageio-ffmpeg, the ``video`` extra) or ``x.gif`` (Pillow) at the
  config's 16 fps; ``x.png`` is a frames grid (one clip per row).
* **Smoke** (``--smoke``): stand-ins of ``wan2.1-t2v-1.3b`` shrunk in width/depth, 64×64, 5 frames (2 latent frames),
  prompts truncated to ``model.max_sequence_length``.
* **Export**: the generator LoRA as ``student_lora/pytorch_lora_weights.safetensors`` (``WanPipeline.load_lora_weights``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dmdr.families.diffusers_t2i import (DTYPES, SMOKE_RESOLUTION, USER_BATCH, Components, DiffusersT2IFamily,
                                         PromptInputs, T2IBundle)

SMOKE_FRAMES = 5
"""Frames of a smoke clip: 2 latent frames, so the VAE's temporal up-sampling runs."""


@dataclass
class WanBundle(T2IBundle):
    """A :class:`T2IBundle` with the clip geometry: ``num_frames`` F (pixels), ``width`` and ``fps`` of the files."""

    num_frames: int = 1
    width: int = 0
    fps: int = 16


class WanFamily(DiffusersT2IFamily):
    name = "wan"
    config_names = ("wan2.1-t2v-1.3b",)
    sample_suffixes = (".mp4", ".gif", ".png")

    # ---- recipe ------------------------------------------------------------------------------------------------
    @staticmethod
    def frames_and_width(recipe) -> tuple[int, int, int]:
        """(F, height, width) of a clip: smoke 5×64×64, else ``model.num_frames``, ``resolution``, ``width``."""
        m = recipe.model
        if m.smoke:
            return SMOKE_FRAMES, SMOKE_RESOLUTION, SMOKE_RESOLUTION
        return m.num_frames, m.resolution, m.width or m.resolution

    def check_model(self, recipe) -> None:
        m = recipe.model
        if (m.num_frames - 1) % 4:
            raise ValueError(f"model.num_frames={m.num_frames}: the Wan VAE needs 4k + 1 frames (e.g. 81, 49, 5)")
        if abs(m.t_min) > 1e-12:
            raise ValueError(f"model.t_min={m.t_min}: Wan is plain rectified flow, x̂0 = x_t - t·v; set model.t_min: 0")
        for side, v in (("model.resolution", m.resolution), ("model.width", m.width or m.resolution)):
            if v % 16:
                raise ValueError(f"{side}={v}: must be a multiple of 16 (VAE ×8 and patch 2)")
        if m.reward_vae is not None:
            raise ValueError("model.reward_vae: the Wan family has no tiny reward VAE; use model.reward_frames: k to "
                             "decode only the first k latent frames for the rewards")
        if m.vae_gradient_checkpointing:
            raise ValueError("model.vae_gradient_checkpointing: AutoencoderKLWan does not support gradient "
                             "checkpointing in diffusers; set it false and bound the reward decode with "
                             "model.reward_frames")
        if m.reward_frames is not None and m.reward_frames > (m.num_frames - 1) // 4 + 1:
            raise ValueError(f"model.reward_frames={m.reward_frames}: a clip of {m.num_frames} frames has only "
                             f"{(m.num_frames - 1) // 4 + 1} latent frames")

    def memory(self, recipe):
        from dmdr.train.memory_wan import estimate_wan_memory

        return estimate_wan_memory(recipe, self.config_name(recipe))

    # ---- components ----------------------------------------------------------------------------------------------
    def standin(self, recipe) -> Components:
        from dmdr.models.wan import build_wan_standin

        L = min(recipe.model.max_sequence_length, 512)
        return Components(build_wan_standin(seed=recipe.seed, name=self.config_name(recipe), max_sequence_length=L))

    def load_local(self, recipe) -> Components:
        from dmdr.models.wan import load_wan

        m = recipe.model
        dtype = DTYPES[m.dtype]
        comps = load_wan(m.path, dtype=dtype, max_sequence_length=m.max_sequence_length)
        return Components(comps, dtype, torch.float32)  # WanPipeline keeps the VAE in float32

    def sample_shape(self, shared, recipe, resolution: int) -> tuple[int, ...]:
        from dmdr.models.wan import latent_frames

        F, H, W = self.frames_and_width(recipe)
        return shared.denoiser.in_channels, latent_frames(F), H // 8, W // 8

    def build(self, recipe, device: torch.device) -> WanBundle:
        b = super().build(recipe, device)
        F, _, W = self.frames_and_width(recipe)
        from dmdr.models.wan import WAN_FPS

        return WanBundle(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)}, num_frames=F, width=W,
                         fps=WAN_FPS)

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _decode(self, bundle: WanBundle, x: Tensor, latent_frames: int | None = None) -> Tensor:
        from dmdr.models.wan import decode_wan_latents

        shared = bundle.shared
        if latent_frames is not None:
            x = x[:, :, :latent_frames]
        keep = torch.is_grad_enabled() and x.requires_grad
        with shared._on_device(shared.vae, keep=keep):
            return decode_wan_latents(shared.vae, x)

    def decode(self, bundle: WanBundle, x: Tensor) -> Tensor:
        """Clips (B, 3, F_r, H, W) in [0, 1], differentiable; F_r = all frames or 4(k−1)+1 (``model.reward_frames``)."""
        return self._decode(bundle, x, bundle.recipe.model.reward_frames)

    def render(self, bundle: WanBundle, x: Tensor) -> Tensor:
        """Every frame, :data:`USER_BATCH` clips at a time."""
        return torch.cat([self._decode(bundle, x[i:i + USER_BATCH]) for i in range(0, x.shape[0], USER_BATCH)])

    # ---- sampling ----------------------------------------------------------------------------------------------
    def _noise(self, bundle: WanBundle, B: int, seed: int, n_steps: int, sde: bool):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(B, *bundle.sample_shape, generator=gen)
        step_noise = torch.randn(n_steps, B, *bundle.sample_shape, generator=gen) if sde and n_steps > 1 else None
        return noise, step_noise

    @torch.no_grad()
    def sample(self, bundle: WanBundle, inputs: PromptInputs, *, steps: int | None = None) -> Tensor:
        """The student's rollout on its grid from ``randn(B, C, F', h, w)`` of each batch's seed (float32 noise and
        grid, as :func:`~dmdr.models.t2i_sampling.sample_t2i`). Latents (N, C, F', h, w)."""
        from dmdr import keys as K
        from dmdr.models.t2i_sampling import t2i_grid
        from dmdr.samplers import few_step_rollout

        g, shared = bundle.recipe.generator, bundle.shared
        n = steps or g.steps
        bundle.generator_module.eval()
        model, dev = shared.generator(), shared.device
        grid = t2i_grid(model.path, n, g.shift).to(device=dev, dtype=torch.float32)
        out = []
        for ps, seed in inputs.batches:
            noise, step_noise = self._noise(bundle, len(ps), seed, n, g.backward_sim == "sde")
            roll = few_step_rollout(model, noise.to(dev), grid, shared.encode(ps), mode=g.backward_sim,
                                    step_noise=None if step_noise is None else step_noise.to(dev))
            out.append(roll[K.SAMPLE])
        return torch.cat(out)

    @torch.no_grad()
    def sample_teacher(self, bundle: WanBundle, inputs: PromptInputs, *, steps: int, cfg: float = 1.0) -> Tensor:
        """The frozen base: ``steps`` Euler steps on the shifted grid with CFG ``cfg`` (the negative prompt ""),
        from the same noise :meth:`sample` draws for the same batch. Latents."""
        from dmdr.samplers import sample_euler

        shared = bundle.shared
        teacher, dev = shared.teacher(), shared.device
        grid = self._teacher_grid(teacher.path, steps, bundle.recipe.generator.shift).to(dev, torch.float32)
        out = []
        for ps, seed in inputs.batches:
            noise, _ = self._noise(bundle, len(ps), seed, steps, False)
            cond = shared.encode(ps)
            out.append(sample_euler(teacher, noise.to(dev), grid, cond,
                                    uncond=shared.null_cond(cond) if cfg > 1 else None, cfg=cfg))
        return torch.cat(out)

    def save_samples(self, bundle: WanBundle, images: Tensor, inputs: PromptInputs, path: Path) -> Path:
        """``.mp4`` / ``.gif``: one file, each frame the grid of the clips (4 per row); ``.png``: a frames grid."""
        path = Path(path)
        scale = max(1, 64 // bundle.resolution)
        if path.suffix.lower() in (".mp4", ".gif"):
            from dmdr.video import save_video

            return save_video(images, path, fps=bundle.fps, nrow=min(4, images.shape[0]), scale=scale)
        from dmdr.eval.grid import save_grid

        return save_grid(images, path, nrow=bundle.num_frames, scale=scale)


__all__ = ["WanFamily", "WanBundle", "SMOKE_FRAMES"]
