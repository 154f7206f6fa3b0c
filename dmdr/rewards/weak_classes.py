"""``digits_weak_classes``: an honest digits reward for the RL study (docs/rl.md): raise the reward classifier's
confidence on the classes where the starting student is weakest.

    r(x, y) = p_clf(y | x)                 if y ∈ classes
              others_weight · p_clf(y | x) otherwise (default 0: those groups get zero advantage)

``p_clf`` is the shipped *reward* classifier (:mod:`dmdr.rewards.digits`, mode ``prob``). It is held out from the
evaluation: FID / precision / recall / accuracy use the separately trained *feature* network
(``digits_features.safetensors``, another seed), so a genuine improvement shows up as a higher evaluation
accuracy on ``classes`` without an FID collapse, whereas fooling p_clf does not. Unlike ``digits_hackable`` it pays
nothing for ink. ``classes`` are chosen from the starting student with :func:`weakest_classes` on
:func:`per_class_confidence` (the study, ``bench/rl_frontier.py``, does this per seed and records them).

>>> from dmdr.rewards.base import build_reward
>>> r = build_reward("digits_weak_classes", classes=[3, 8])
>>> r(torch.zeros(2, 1, 8, 8), torch.tensor([3, 1]))[1].item()
0.0
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from dmdr.rewards.base import Reward, RewardSpec, register_reward
from dmdr.rewards.digits import DigitsClassifierReward


class DigitsWeakClassesReward(Reward):
    spec = RewardSpec(name="digits_weak_classes", differentiable=True, input_range=(0.0, 1.0), resolution=8,
                      reads_labels=True)

    def __init__(self, classes: Sequence[int], others_weight: float = 0.0, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__()
        classes = sorted({int(c) for c in classes})
        if not classes or not all(0 <= c < 10 for c in classes):
            raise ValueError(f"digits_weak_classes: classes must be a non-empty list of digits 0-9, got {classes}")
        if not 0 <= others_weight <= 1:
            raise ValueError(f"digits_weak_classes: others_weight must be in [0, 1], got {others_weight}")
        self.classes, self.others_weight = classes, float(others_weight)
        self.classifier = DigitsClassifierReward(mode="prob", checkpoint=checkpoint, device=device)

    def score(self, images: Tensor, cond: Any) -> Tensor:
        p = self.classifier.score(images, cond)
        labels = torch.as_tensor(cond, device=p.device).long().reshape(-1)
        weak = torch.isin(labels, torch.tensor(self.classes, device=p.device))
        return torch.where(weak, p, self.others_weight * p)


def weakest_classes(accuracy_per_class: Sequence[float], k: int = 3) -> list[int]:
    """The ``k`` classes with the lowest accuracy (ties: lower class id first), sorted."""
    order = sorted(range(len(accuracy_per_class)), key=lambda c: (accuracy_per_class[c], c))
    return sorted(order[:k])


@torch.no_grad()
def per_class_accuracy(images: Tensor, labels: Tensor, num_classes: int = 10) -> list[float]:
    """Accuracy of the held-out *feature* network (the evaluation network) per class: images (B,1,8,8) in [0,1]."""
    from dmdr.eval.report import features_and_logits

    pred = torch.from_numpy(features_and_logits(images.float().cpu())[1]).argmax(-1)
    labels = labels.cpu()
    return [float((pred[labels == c] == c).float().mean()) if bool((labels == c).any()) else float("nan")
            for c in range(num_classes)]


@torch.no_grad()
def per_class_confidence(images: Tensor, labels: Tensor, num_classes: int = 10) -> list[float]:
    """Mean probability the held-out *feature* (evaluation) network gives the true class, per class. Unlike the
    accuracy it does not saturate at 1 for a good student, so :func:`weakest_classes` has no ties to break."""
    from dmdr.eval.report import features_and_logits

    p = torch.softmax(torch.from_numpy(features_and_logits(images.float().cpu())[1]), -1)
    labels = labels.cpu()
    conf = p.gather(1, labels[:, None].long()).squeeze(1)
    return [float(conf[labels == c].mean()) if bool((labels == c).any()) else float("nan")
            for c in range(num_classes)]


@register_reward("digits_weak_classes")
def build_digits_weak_classes(classes: Sequence[int] = (), others_weight: float = 0.0, checkpoint: str | None = None,
                              device: str | torch.device = "cpu") -> Reward:
    """Factory for :class:`DigitsWeakClassesReward`."""
    return DigitsWeakClassesReward(classes, others_weight=others_weight, checkpoint=checkpoint, device=device)


__all__ = ["DigitsWeakClassesReward", "per_class_accuracy", "per_class_confidence", "weakest_classes"]
