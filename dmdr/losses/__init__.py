"""Objectives, one per file. Each returns a TensorDict of named terms: keys starting with ``loss_`` are summed by
:func:`total_loss`; every other key is a diagnostic to log (torchrl's convention)."""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from dmdr.losses.dmd import DMDKeys, dmd_gradient, dmd_loss
from dmdr.losses.fake_score import FakeScoreKeys, fake_score_batch, fake_score_loss
from dmdr.losses.refl import RewardKeys, reward_loss


def merge_terms(*terms: TensorDictBase) -> TensorDict:
    """Merge term TensorDicts (no batch dims); a duplicate key is an error."""
    out: dict = {}
    for td in terms:
        for k, v in td.items():
            if k in out:
                raise ValueError(f"two loss terms both define {k!r}")
            out[k] = v
    return TensorDict(out, batch_size=[])


def total_loss(terms: TensorDictBase) -> torch.Tensor:
    """Sum of the ``loss_*`` entries (the only ones that carry gradients)."""
    losses = [v for k, v in terms.items() if k.startswith("loss_")]
    if not losses:
        raise ValueError(f"no loss_* key among {sorted(terms.keys())}")
    return torch.stack([l.float() for l in losses]).sum()


def scalars(terms: TensorDictBase) -> dict[str, float]:
    """Every term as a Python float, for logging."""
    return {k: float(v.detach()) for k, v in terms.items()}


__all__ = ["DMDKeys", "FakeScoreKeys", "RewardKeys", "dmd_gradient", "dmd_loss", "fake_score_batch",
           "fake_score_loss", "merge_terms", "reward_loss", "scalars", "total_loss"]
