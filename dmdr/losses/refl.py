"""ReFL-style reward loss for any differentiable reward (method.md §2.10).

    L_r = w · mean_B relu(h - r(x̂0, c))    with a hinge h (the official T2I code uses h = 0.7), or
    L_r = w · mean_B (-r(x̂0, c))           without a hinge (the SiT code: w · CE = w · mean(-log p(y|x̂0))).

The reward sees the generator's one-step prediction x̂0 (decoded to pixels), and the gradient flows
generator → (decoder) → reward model; the reward model is frozen (Xu et al. 2023 "ImageReward/ReFL").

Scale coupling (method.md §5.2 item 12): the DMD loss is a mean over B·C·H·W while this is a batch mean, so the
reward/DMD balance depends on the sample size. ``per_element=True`` divides by C·H·W so that ``w`` is comparable
to the DMD loss whatever the resolution (a dmdr option; the official code uses the batch mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase

from dmdr import keys as K


@dataclass(frozen=True)
class RewardKeys:
    reward: str | None = None  # default: reward_<name>


def reward_loss(td: TensorDictBase, name: str, *, weight: float, hinge: float | None = None,
                per_element: int | None = None, keys: RewardKeys = RewardKeys()) -> TensorDict:
    """Weighted (optionally hinged) reward loss from the differentiable per-sample reward ``reward_<name>`` (B,).

    Args:
        per_element: if given (= C·H·W of the generator's sample), the loss is divided by it (see module docstring).
    Returns:
        TensorDict with ``loss_reward_<name>`` and the diagnostic ``reward_<name>`` (batch mean, detached).
    """
    key = keys.reward or K.reward_key(name)
    r = K.require(td, key, fn="reward_loss", field="reward")
    if r.ndim != 1:
        raise ValueError(f"reward {name!r} must have shape (B,), got {tuple(r.shape)}")
    per_sample = torch.relu(hinge - r) if hinge is not None else -r
    loss = weight * per_sample.float().mean()
    if per_element:
        loss = loss / per_element
    return TensorDict({f"loss_reward_{name}": loss, key: r.detach().float().mean()}, batch_size=[])
