"""The one narrow model contract of dmdr.

A *denoiser* is anything callable as ``model(x_t, t, cond) -> prediction`` that declares its parameterisation
through a ``path`` attribute (:class:`dmdr.paths.FlowMatching` or :class:`dmdr.paths.DDPMEps`):

* ``x_t``: (B, C, H, W) noisy sample (latents for the diffusers families; (B, C, F, H, W) clips for video);
* ``t``: (B,) continuous time in [0, 1], ``t = 1`` pure noise; each adapter maps it to its network's timestep;
* ``cond``: (B, ...) conditioning — class labels (B,) long for the digits model, or a TensorDict of
  prompt embeddings for text-to-image adapters. ``model.null_cond(cond)`` returns the unconditional batch
  (null class / empty-prompt embeddings) used by classifier-free guidance;
* returns the prediction in the declared parameterisation (velocity or ε), shape of ``x_t``.

The core (paths, schedules, samplers, scores, losses) sees models only through this contract and never imports
diffusers. Adapters live in :mod:`dmdr.models` (one file per family).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from dmdr.paths import Path


@runtime_checkable
class Denoiser(Protocol):
    path: Path

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...

    def null_cond(self, cond: Any) -> Any: ...


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditioning batches along dim 0 (tensors or TensorDicts)."""
    import torch

    return torch.cat([a, b], dim=0)
