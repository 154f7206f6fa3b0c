"""Real and fake score estimators, classifier-free guidance with jitter, and the distribution-matching targets.

Both scores are *denoisers* (model contract, :mod:`dmdr.models.contract`). In DMDR they share one frozen base
with the critic's LoRA scaled per call (:class:`dmdr.models.lora.AdapterView`, method.md §1, §2.6):

* real score ``s_real = base + λ_r(k) Δ_LoRA`` with CFG ``v = v_u + w (v_c - v_u)``, ``w ~ U[cfg ± 0.5]`` (§2.5);
* fake score ``s_fake = base + λ_f Δ_LoRA`` without CFG.

Every function here returns denoised estimates x̂0 via the model's own path, so the DMD loss never needs to know
the parameterisation.
"""
from __future__ import annotations

import random
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from dmdr import keys as K
from dmdr.models.contract import Denoiser, cat_cond


def sample_cfg_scale(cfg: float, jitter: float = 0.5, rng: random.Random | None = None) -> float:
    """The official real-score CFG draw: ``w ~ U[cfg - jitter, cfg + jitter]`` if ``cfg > 1``, else 1 (no CFG).

    One scalar per generator step, shared across the batch (``samplers.py::pred_v``, method.md §2.5).
    Uses the global torch RNG unless ``rng`` is given.
    """
    if cfg <= 1.0:
        return 1.0
    if jitter <= 0:
        return float(cfg)
    u = rng.random() if rng is not None else float(torch.rand(()))
    return float(cfg - jitter + 2 * jitter * u)


def cfg_prediction(model: Denoiser, x_t: Tensor, t: Tensor, cond: Any, uncond: Any = None,
                   scale: float = 1.0) -> Tensor:
    """``pred = p_u + w (p_c - p_u)`` in the model's parameterisation; ``w = 1`` or ``uncond=None``: conditional.

    The conditional and unconditional branches run as one batch of 2B. Shapes: x_t (B,...), t (B,).
    """
    if scale == 1.0 or uncond is None:
        return model(x_t, t, cond)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, uncond))
    p_c, p_u = both.chunk(2)
    return p_u + scale * (p_c - p_u)


def denoise(model: Denoiser, x_t: Tensor, t: Tensor, cond: Any, uncond: Any = None, scale: float = 1.0) -> Tensor:
    """x̂0 of ``model`` at (x_t, t) with optional CFG: ``path.to_x0(x_t, t, cfg_prediction(...))``."""
    return model.path.to_x0(x_t, t, cfg_prediction(model, x_t, t, cond, uncond, scale))


@torch.no_grad()
def distribution_matching_targets(x0_pred: Tensor, real: Denoiser, fake: Denoiser, cond: Any, *, tau: Tensor,
                                  noise: Tensor, uncond: Any = None, cfg_scale: float = 1.0) -> TensorDict:
    """Renoise the generator output and evaluate both scores (method.md §2.4), without gradients.

    ``x_τ = renoise(sg(x̂0), τ, ε)``; ``x̂0_real = denoise(real, x_τ, τ, CFG w)``; ``x̂0_fake = denoise(fake, x_τ, τ)``.

    Args:
        x0_pred: (B,C,H,W) generator output x̂0 (detached here).
        tau: (B,) renoise times (DynaRS); noise: (B,C,H,W).
    Returns:
        TensorDict(batch B) with keys ``x_t``, ``t``, ``x0_real``, ``x0_fake``.
    """
    path = real.path
    x_t = path.renoise(x0_pred.detach(), tau, noise)
    x0_real = denoise(real, x_t, tau, cond, uncond, cfg_scale)
    x0_fake = denoise(fake, x_t, tau, cond)
    return TensorDict({K.X_T: x_t, K.T: tau, K.X0_REAL: x0_real, K.X0_FAKE: x0_fake}, batch_size=[x0_pred.shape[0]])
