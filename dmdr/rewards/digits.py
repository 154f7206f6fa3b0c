"""``digits_classifier``: a differentiable class-conditional reward from the shipped 8×8 digits CNN.

For an image x ∈ [0, 1]^{1×8×8} and its class label y, with p(·|x) = softmax(f(x)) of
:class:`dmdr.train.classifier.DigitsClassifier`:

* ``log_prob``:          r = log p(y | x)                      (≤ 0; higher is better)
* ``neg_cross_entropy``: r = -CE(f(x), y) = log p(y | x)        (the same number, under the name DMDR
  (arXiv 2511.13649) uses for its classifier reward in the class-conditional SiT experiments)
* ``prob``:              r = p(y | x)                           (∈ [0, 1])
* ``confidence``:        r = max_c p(c | x)                     (ignores y — a label-free reward)

Shapes: images (B, 1, 8, 8) in [0, 1], labels (B,) long → (B,). All in torch ops, so ∂r/∂x flows to the images.
This is the *reward* network; evaluation uses the independent :class:`~dmdr.train.classifier.DigitsFeatureNet`.

>>> from dmdr.rewards.base import build_reward
>>> r = build_reward("digits_classifier")
>>> r(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])).shape
torch.Size([2])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.rewards.base import Reward, RewardSpec, register_reward

Mode = Literal["log_prob", "neg_cross_entropy", "prob", "confidence"]
MODES = ("log_prob", "neg_cross_entropy", "prob", "confidence")


def assets_dir() -> Path:
    """The package's ``dmdr/assets`` folder (shipped classifier weights)."""
    import dmdr

    return Path(dmdr.__file__).resolve().parent / "assets"


def default_checkpoint(kind: Literal["reward", "features", "features_mlp"] = "reward") -> Path:
    """Path of the shipped reward (``digits_classifier.safetensors``), feature (``digits_features.safetensors``)
    or second, MLP feature net (``digits_features_mlp.safetensors``)."""
    return assets_dir() / {"reward": "digits_classifier.safetensors", "features": "digits_features.safetensors",
                           "features_mlp": "digits_features_mlp.safetensors"}[kind]


class DigitsClassifierReward(Reward):
    """See the module docstring. ``cond`` must be the (B,) long class labels (except in ``confidence`` mode)."""

    spec = RewardSpec(name="digits_classifier", differentiable=True, input_range=(0.0, 1.0), resolution=8,
                      reads_labels=True)

    def __init__(self, mode: Mode = "log_prob", checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown digits_classifier mode {mode!r}; expected one of {', '.join(MODES)}")
        from dmdr.train.classifier import load_classifier

        self.mode = mode
        self.checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint("reward")
        self.net = load_classifier(self.checkpoint, device=device, expect_kind="reward")

    def score(self, images: Tensor, cond: Any) -> Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits_classifier expects images (B, 1, 8, 8) in [0, 1]; got {tuple(images.shape)}")
        logp = F.log_softmax(self.net(images.float()), dim=-1)
        if self.mode == "confidence":
            return logp.exp().max(dim=-1).values
        if cond is None:
            raise ValueError(f"digits_classifier mode {self.mode!r} reads the class labels; got cond=None")
        labels = torch.as_tensor(cond, device=images.device).long().reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"digits_classifier got {labels.shape[0]} labels for {images.shape[0]} images")
        lp = logp.gather(1, labels[:, None]).squeeze(1)
        return lp.exp() if self.mode == "prob" else lp


@register_reward("digits_classifier")
def build_digits_classifier(mode: Mode = "log_prob", checkpoint: str | None = None,
                            device: str | torch.device = "cpu") -> Reward:
    """Factory for :class:`DigitsClassifierReward` (default checkpoint: the shipped asset)."""
    return DigitsClassifierReward(mode=mode, checkpoint=checkpoint, device=device)
