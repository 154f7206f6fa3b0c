"""A full trainable critic copy (DMD2), viewed at a scale like a LoRA adapter.

``critic.lora: null`` gives the fake score its own full copy θ_c of the teacher θ_t (DMD2, Yin et al. 2024) instead
of a LoRA adapter on the frozen teacher. To keep DMDR's scaled views (method.md §1, §2.6) meaningful, a view at
scale λ evaluates the network at the weight-space interpolation

    θ(λ) = θ_t + λ · (θ_c − θ_t)

which is exactly what ``base + λ · Δ_LoRA`` is for an adapter (Δ = θ_c − θ_t here). So λ = 1 is the critic copy
itself (the DMD2 fake score), λ = 0 the teacher (the DMD2 real score), and DynaDG's λ_r(k) and ``scale_fake``
keep their meaning. Gradients reach θ_c only (scaled by λ); θ_t stays frozen.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dmdr.models.lora import BaseView


class FullCopyView(BaseView):
    """A denoiser view ``x_t, t, cond -> output`` of θ_t + λ(θ_c − θ_t), satisfying the model contract.

    >>> fake = FullCopyView(teacher, critic_copy, 1.0)   # DMD2 fake score: the critic copy itself
    >>> real = FullCopyView(teacher, critic_copy, 0.0)   # DMD2 real score: the frozen teacher
    """

    def __init__(self, base: nn.Module, critic: nn.Module, scale: float = 1.0):
        self.base, self.critic, self.scale = base, critic, float(scale)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.scale == 0.0:
            return self.base(x_t, t, cond)
        if self.scale == 1.0:
            return self.critic(x_t, t, cond)
        base = dict(self.base.named_parameters())
        params = {n: torch.lerp(base[n], p, self.scale) for n, p in self.critic.named_parameters()}
        return functional_call(self.critic, params, (x_t, t, cond))

    def __repr__(self) -> str:
        return f"FullCopyView(scale={self.scale})"
