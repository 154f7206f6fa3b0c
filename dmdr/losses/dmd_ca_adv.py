"""DMD with an advantage-weighted CFG-augmentation term (``rl.regularizer: dmd_ca_adv``).

Decoupled DMD (Liu et al. 2025, arXiv 2511.22677, Eq. 5-6; method.md §6.3) splits DMDR's CFG'd DMD direction into
a distribution-matching (DM) term and a CFG-augmentation (CA) term. In x̂0 space, at one renoise level τ (DMDR's
coupled form), with the real model's conditional / unconditional x̂0 and CFG scale w:

    x̂0_real^cfg = x̂0_real^c + (w - 1)(x̂0_real^c - x̂0_real^u)
    fake - real^cfg = (x̂0_fake - x̂0_real^c)  -  (w - 1)(x̂0_real^c - x̂0_real^u)
                      └────── DM ─────────┘     └──────────── CA ───────────┘

The DMDR maintainer's suggestion for RL (official repository, issues #8 and #13): keep DM as the regulariser and
multiply the CA "engine" by the advantage A_b, so that CFG's push is applied to good samples and reversed on bad
ones:

    g_b = [ (x̂0_fake - x̂0_real^c) - A_b (w - 1)(x̂0_real^c - x̂0_real^u) ] / (mean_{CHW} |x̂0 - x̂0_real^cfg| + eps)
    loss = weight · ½ mean_b mean_{CHW} (x̂0 - sg(x̂0 - g_b))²

With A ≡ 1 this is exactly :func:`dmdr.losses.policy.weighted_dmd_loss` on ``x0_real = x̂0_real^cfg``; with A ≡ 0
it is the DM term alone. With w = 1 the CA term vanishes (the trainer refuses ``dmd.cfg <= 1`` for it).
"""
from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor


def dmd_ca_adv_loss(x0_pred: Tensor, x0_real_cond: Tensor, x0_real_uncond: Tensor, x0_fake: Tensor, advantage: Tensor,
                    cfg_scale: float, *, weight: float = 1.0, eps: float = 1e-8) -> TensorDict:
    """Shapes: x0_* (B,C,H,W) (only ``x0_pred`` differentiable), advantage (B,) or (B,1). Returns ``loss_dmd``,
    ``dm_norm`` and ``ca_norm`` (mean per-sample L2 norms of the two terms, before the advantage)."""
    x0 = x0_pred.float()
    with torch.no_grad():
        rc, ru, fk = x0_real_cond.float(), x0_real_uncond.float(), x0_fake.float()
        dm = fk - rc
        ca = (cfg_scale - 1.0) * (rc - ru)
        real_cfg = rc + ca
        a = advantage.reshape(-1, *([1] * (x0.ndim - 1))).float()
        norm = (x0.detach() - real_cfg).abs().flatten(1).mean(1).reshape(a.shape) + eps
        g = torch.nan_to_num((dm - a * ca) / norm)
    loss = weight * 0.5 * ((x0 - (x0.detach() - g)) ** 2).flatten(1).mean(1).mean()
    return TensorDict({"loss_dmd": loss, "dm_norm": dm.flatten(1).norm(dim=1).mean(),
                       "ca_norm": ca.flatten(1).norm(dim=1).mean(),
                       "dmd_grad_norm": g.flatten(1).norm(dim=1).mean()}, batch_size=[])


__all__ = ["dmd_ca_adv_loss"]
