"""Few-step text-to-image sampling: the training grid of either parameterisation and the student's rollout.

**Sampling** (:func:`sample_t2i`) uses dmdr's own few-step grid (:func:`t2i_grid`) and rollout
(:func:`dmdr.samplers.few_step_rollout`), not a diffusers scheduler: the diffusers grids differ from the training
grid (method.md §2.13).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from dmdr import keys as K
from dmdr.models.shared_base import SharedBaseT2I
from dmdr.models.t2i_components import TextEncoderStack
from dmdr.models.vae import decode_latents, vae_scale_factor
from dmdr.paths import DDPMEps, FlowMatching

SDXL_ONE_STEP_INDEX = 399


def t2i_grid(path, steps: int, shift: float = 1.0) -> Tensor:
    """The few-step grid (N+1,) used in training and sampling, for either parameterisation.

    * Flow matching (SD3): :func:`dmdr.schedules.few_step_grid` with ``t_min = path.t_min`` (method.md §2.1).
    * DDPM-ε (SDXL): ``N = 1`` → ``[0.399, 0]`` (timestep 399 on pure noise, the DMD2/DMDR convention);
      ``N > 1`` → ``t̃ = linspace(0.999, 0, N+1)``, shifted as above and rounded to integer timesteps
      (the official ``noise2x0_sampler``; it applies the shift on the 0..999 scale, dmdr on t̃ ∈ [0, 1], which is
      the same for the official shift 1).
    """
    from dmdr.schedules import few_step_grid

    if isinstance(path, FlowMatching):
        return few_step_grid(steps, shift, path.t_min)
    if isinstance(path, DDPMEps):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        T = path.num_train_timesteps
        if steps == 1:
            return torch.tensor([SDXL_ONE_STEP_INDEX / T, 0.0], dtype=torch.float64)
        base = torch.linspace((T - 1) / T, 0.0, steps + 1, dtype=torch.float64)
        grid = shift * base / (1 + (shift - 1) * base)
        return torch.round(grid * T) / T
    raise TypeError(f"no few-step grid for path {type(path).__name__}")


@torch.no_grad()
def sample_t2i(shared_or_denoiser: Any, vae: nn.Module | None, prompts: Sequence[str] | TensorDict, *, steps: int,
               shift: float = 1.0, height: int, width: int, seed: int = 0, mode: str = "ode",
               encoder: TextEncoderStack | None = None, return_latents: bool = False) -> Tensor:
    """Few-step text-to-image sampling with the training grid, then VAE decode: images (B, 3, H, W) in [0, 1].

    ``x_0 ~ N(0, I)`` in float32 (CPU generator seeded with ``seed``, so the noise is device independent), then
    :func:`dmdr.samplers.few_step_rollout` on :func:`t2i_grid` (``mode="ode"``: Euler/DDIM steps; ``"sde"``:
    renoise x̂0 with fresh noise, the official SDXL multi-step sampler); the last step returns x̂0. No CFG
    (DMDR students are sampled without guidance, method.md §2.13).

    Args:
        shared_or_denoiser: a :class:`SharedBaseT2I` (samples its generator view, with its own VAE and encoder)
            or any denoiser following the contract (then pass ``vae`` and ``encoder``, or a conditioning
            TensorDict as ``prompts``).
        vae: the VAE (ignored/optional for a :class:`SharedBaseT2I`).
        prompts: a list of B prompts, or a precomputed conditioning TensorDict with batch (B,).
    """
    from dmdr.samplers import few_step_rollout

    if isinstance(shared_or_denoiser, SharedBaseT2I):
        shared = shared_or_denoiser
        model = shared.generator()
        vae = vae if vae is not None else shared.vae
        C, h, w = shared.latent_shape(height, width)
        cond = prompts if isinstance(prompts, TensorDict) else shared.encode(prompts, height=height, width=width)
        device, dtype = shared.device, next(shared.denoiser.net.parameters()).dtype
    else:
        model = shared_or_denoiser
        if vae is None:
            raise ValueError("sample_t2i needs a VAE when given a bare denoiser")
        f = vae_scale_factor(vae)
        inner = getattr(model, "base", model)  # an AdapterView wraps the adapter denoiser
        C, h, w = inner.in_channels, height // f, width // f
        if isinstance(prompts, TensorDict):
            cond = prompts
        elif encoder is None:
            raise ValueError("sample_t2i needs encoder= (or a conditioning TensorDict) when given a bare denoiser")
        else:
            cond = encoder.size_cond(encoder(list(prompts)), height, width)
        p = next(inner.net.parameters())
        device, dtype = p.device, p.dtype
    B = cond.batch_size[0]
    gen = torch.Generator().manual_seed(seed)
    # noise and grid stay float32 (as in training): bf16 noise would make the rollout's t bf16 and quantise the
    # network timesteps (e.g. 1000/898/750/500 instead of 1000/900/750/500); the network casts its inputs itself
    noise = torch.randn(B, C, h, w, generator=gen).to(device=device, dtype=torch.float32)
    step_noise = None
    if mode == "sde" and steps > 1:
        step_noise = torch.randn(steps, B, C, h, w, generator=gen).to(device=device, dtype=torch.float32)
    grid = t2i_grid(model.path, steps, shift).to(device=device, dtype=torch.float32)
    latents = few_step_rollout(model, noise, grid, cond.to(device), mode=mode, step_noise=step_noise)[K.SAMPLE]
    if return_latents:
        return latents
    if isinstance(shared_or_denoiser, SharedBaseT2I):
        return shared_or_denoiser.decode(latents)
    return decode_latents(vae, latents)



__all__ = ["SDXL_ONE_STEP_INDEX", "t2i_grid", "sample_t2i"]
