"""The critic's (fake score's) denoising loss on detached generator samples (method.md §2.3).

    τ_c ~ DynaRS(k),  x_τ = renoise(sg(x_clean), τ_c, ε),  L_fake = mean ‖ pred_φ(x_τ, τ_c, c; λ_f) - target ‖²

with ``target = ε - x_clean`` (velocity) for flow matching and ``ε`` for DDPM-ε (``path.target``). ``mean_flat``
then batch mean (= the mean over B,C,H,W). No CFG: conditional only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from dmdr import keys as K
from dmdr.models.contract import Denoiser


@dataclass(frozen=True)
class FakeScoreKeys:
    pred: str = K.FAKE_PRED
    target: str = K.FAKE_TARGET


def fake_score_batch(fake: Denoiser, x_clean: torch.Tensor, tau: torch.Tensor, noise: torch.Tensor,
                     cond: Any) -> TensorDict:
    """Renoise detached samples and run the critic (with gradients into its trainable parameters).

    Shapes: x_clean, noise (B,C,H,W); tau (B,). Returns TensorDict(batch B) with ``fake_pred``, ``fake_target``,
    ``x_t`` and ``t``.
    """
    x_clean = x_clean.detach()
    x_t = fake.path.renoise(x_clean, tau, noise)
    return TensorDict({
        K.FAKE_PRED: fake(x_t, tau, cond),
        K.FAKE_TARGET: fake.path.target(x_clean, noise, tau),
        K.X_T: x_t, K.T: tau,
    }, batch_size=[x_clean.shape[0]])


def fake_score_loss(td: TensorDictBase, *, keys: FakeScoreKeys = FakeScoreKeys()) -> TensorDict:
    """``loss_fake_score = mean (fake_pred - fake_target)²`` over B,C,H,W (fp32).

    Reads ``fake_pred`` (differentiable) and ``fake_target``; returns TensorDict with ``loss_fake_score``.
    """
    pred = K.require(td, keys.pred, fn="fake_score_loss", field="pred")
    target = K.require(td, keys.target, fn="fake_score_loss", field="target").detach()
    from dmdr.losses.dmd import _upcast

    loss = ((_upcast(pred) - _upcast(target)) ** 2).mean()
    return TensorDict({"loss_fake_score": loss}, batch_size=[])
