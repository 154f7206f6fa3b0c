"""The distribution-matching (DMD) loss with the per-sample normalised gradient (DMD2 / DMDR, method.md §2.4).

    g = (x̂0_fake - x̂0_real) / (mean_CHW |x̂0 - x̂0_real| + 1e-8),   g ← nan_to_num(g)
    L_DMD = ½ mean_{B,C,H,W} (x̂0 - sg(x̂0 - g))²      ⇒   ∂L/∂x̂0 = g / (B·C·H·W)

The normaliser is per sample (the DMD weighting w_t ∝ 1/‖μ_real(x_t) - x‖₁ written in x-space). The loss is
computed in fp32. Identical to DMD2's ``compute_distribution_matching_loss`` and DMDR's
``train_*_deepspeed.py`` (Yin et al. 2024, arXiv 2405.14867; Jiang et al. 2025, arXiv 2511.13649).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from dmdr import keys as K


@dataclass(frozen=True)
class DMDKeys:
    x0_pred: str = K.X0_PRED
    x0_real: str = K.X0_REAL
    x0_fake: str = K.X0_FAKE


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 (the official code computes the loss in fp32); fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def dmd_gradient(x0_pred: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The normalised DMD gradient ``g`` (B,C,H,W), no grad, at least fp32: see the module docstring."""
    with torch.no_grad():
        x0, real, fake = _upcast(x0_pred.detach()), _upcast(x0_real), _upcast(x0_fake)
        dims = tuple(range(1, x0.ndim))
        weight = (x0 - real).abs().mean(dim=dims, keepdim=True) + eps
        return torch.nan_to_num((fake - real) / weight)


def dmd_loss(td: TensorDictBase, *, keys: DMDKeys = DMDKeys(), eps: float = 1e-8) -> TensorDict:
    """DMD loss on a TensorDict.

    Reads ``x0_pred`` (B,C,H,W, differentiable), ``x0_real`` and ``x0_fake`` (B,C,H,W, no grad).
    Returns TensorDict (no batch dims) with ``loss_dmd`` and diagnostics ``dmd_grad_norm`` (mean per-sample L2 norm
    of g), ``dmd_real_fake_gap`` (mean |x̂0_real - x̂0_fake|) and ``dmd_weight`` (mean normaliser).

    >>> out = dmd_loss(TensorDict(x0_pred=x, x0_real=r, x0_fake=f, batch_size=[B]))
    >>> sorted(out.keys())
    ['dmd_grad_norm', 'dmd_real_fake_gap', 'dmd_weight', 'loss_dmd']
    """
    x0 = K.require(td, keys.x0_pred, fn="dmd_loss", field="x0_pred")
    real = K.require(td, keys.x0_real, fn="dmd_loss", field="x0_real").detach()
    fake = K.require(td, keys.x0_fake, fn="dmd_loss", field="x0_fake").detach()
    g = dmd_gradient(x0, real, fake, eps)
    loss = 0.5 * F.mse_loss(_upcast(x0), _upcast(x0.detach()) - g, reduction="mean")
    with torch.no_grad():
        dims = tuple(range(1, x0.ndim))
        diag = {
            "dmd_grad_norm": g.flatten(1).norm(dim=1).mean(),
            "dmd_real_fake_gap": (_upcast(real) - _upcast(fake)).abs().mean(),
            "dmd_weight": ((_upcast(x0.detach()) - _upcast(real)).abs().mean(dim=dims) + eps).mean(),
        }
    return TensorDict({"loss_dmd": loss, **diag}, batch_size=[])
