"""Parameterisations ("paths") of the forward noising process and the conversions between predictions.

Two families, both indexed by a continuous time ``t ∈ [0, 1]`` with ``t = 1`` pure noise:

* :class:`FlowMatching` (SD3/SD3.5/SiT/Flux and the built-in digits model):
  ``x_t = (1 - t) x0 + t ε``, velocity ``v = ε - x0``. The official DMDR code computes
  ``x̂0 = x_t + (t_min - t) v`` (method.md §1; ``t_min = 0.001`` for SD3, ``0`` for SiT).
* :class:`DDPMEps` (SDXL): ``x_t = sqrt(ᾱ_k) x0 + sqrt(1 - ᾱ_k) ε`` with integer timestep
  ``k = clamp(round(1000 t), 0, 999)`` and ε-prediction, ``x̂0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)``.

Every path offers the same small interface, so samplers, scores and losses never branch on the family:
``renoise``, ``target``, ``to_x0``, ``to_eps``, ``from_x0``, ``step``. All functions broadcast ``t`` of shape
(B,) (or a scalar) against samples of shape (B, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


def _bcast(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a (B,) or scalar time against x (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


@runtime_checkable
class Path(Protocol):
    """What the core needs to know about a model's parameterisation."""

    prediction: str  # "velocity" or "epsilon"

    def renoise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The forward process: x_t from a clean x0 (B,...), time t (B,) and noise (B,...)."""

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of the model's prediction (velocity or ε)."""

    def to_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """The denoised estimate x̂0 from a prediction."""

    def to_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """The noise estimate ε̂ from a prediction."""

    def from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The prediction that :meth:`to_x0` maps to ``x0`` (its inverse)."""

    def step(self, x_t: Tensor, t: Tensor, t_next: Tensor, pred: Tensor) -> Tensor:
        """One deterministic sampler step from t to t_next."""


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow / flow matching with ``t = 1`` as noise.

    Equations (method.md §1)::

        x_t = (1 - t) x0 + t ε                 renoise
        v   = ε - x0                           target
        x̂0  = x_t + (t_min - t) v              to_x0   (exact inverse of renoise when t_min = 0)
        ε̂   = x_t + (1 - t) v                  to_eps
        x_{t'} = x_t + (t' - t) v              step    (Euler; equals the DDIM step when t_min = 0)

    Args:
        t_min: the official code's ``t_min`` in the x̂0 formula (0.001 for SD3, 0 for SiT / digits).
    """

    t_min: float = 0.0
    prediction: str = field(default="velocity", init=False)

    def renoise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = (1 - t) x0 + t ε``; shapes x0, noise (B,...), t (B,) or scalar."""
        t = _bcast(t, x0)
        return (1 - t) * x0 + t * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | None = None) -> Tensor:
        """``v = ε - x0`` (independent of t)."""
        return noise - x0

    def to_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """``x̂0 = x_t + (t_min - t) v`` (the official formula)."""
        return x_t + (self.t_min - _bcast(t, x_t)) * pred

    def to_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """``ε̂ = x_t + (1 - t) v``."""
        return x_t + (1 - _bcast(t, x_t)) * pred

    def from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Velocity that :meth:`to_x0` maps to ``x0``: ``v = (x_t - x0) / (t - t_min)``."""
        return (x_t - x0) / (_bcast(t, x_t) - self.t_min)

    def step(self, x_t: Tensor, t: Tensor, t_next: Tensor, pred: Tensor) -> Tensor:
        """Euler: ``x_{t'} = x_t + (t' - t) v``."""
        return x_t + (_bcast(t_next, x_t) - _bcast(t, x_t)) * pred


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> Tensor:
    """ᾱ_k of the "scaled_linear" DDPM schedule used by SD1.x/SDXL (float64, shape (T,)).

    ``β_k = (linspace(sqrt(β_start), sqrt(β_end), T))²``, ``ᾱ_k = ∏_{j≤k} (1 - β_j)``.
    """
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class DDPMEps:
    """DDPM with ε-prediction (SDXL), indexed by continuous t mapped to an integer timestep.

    Equations::

        k      = clamp(round(T·t), 0, T-1)           timestep index (SDXL one-step uses k = 399, t = 0.399)
        x_t    = sqrt(ᾱ_k) x0 + sqrt(1 - ᾱ_k) ε      renoise
        target = ε
        x̂0     = (x_t - sqrt(1 - ᾱ_k) ε̂) / sqrt(ᾱ_k)  to_x0
        x_{t'} = sqrt(ᾱ_k') x̂0 + sqrt(1 - ᾱ_k') ε̂    step (deterministic DDIM)
    """

    alphas_cumprod: Tensor = field(default_factory=scaled_linear_alphas_cumprod)
    prediction: str = field(default="epsilon", init=False)

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of DDPM timesteps (1000 for SDXL)."""
        return int(self.alphas_cumprod.shape[0])

    def index(self, t: Tensor | float) -> Tensor:
        """Integer timestep ``clamp(round(T t), 0, T-1)`` (long)."""
        T = self.num_train_timesteps
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.clamp(torch.round(t * T), 0, T - 1).long()

    def abar(self, t: Tensor | float, like: Tensor) -> Tensor:
        """ᾱ_k at k = index(t), broadcast against ``like`` (B,...)."""
        a = self.alphas_cumprod.to(like.device)[self.index(t).to(like.device)]
        return _bcast(a.to(like.dtype), like)

    def renoise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε``."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | None = None) -> Tensor:
        """``ε``."""
        return noise

    def to_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """``x̂0 = (x_t - sqrt(1 - ᾱ) ε̂) / sqrt(ᾱ)``."""
        a = self.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()

    def to_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """The prediction is ε̂ itself."""
        return pred

    def from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """``ε = (x_t - sqrt(ᾱ) x0) / sqrt(1 - ᾱ)``."""
        a = self.abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def step(self, x_t: Tensor, t: Tensor, t_next: Tensor, pred: Tensor) -> Tensor:
        """DDIM: ``x_{t'} = renoise(x̂0, t', ε̂)``."""
        x0 = self.to_x0(x_t, t, pred)
        return self.renoise(x0, t_next, pred)
