"""SRPO-style control-word reward (code Tencent-Hunyuan/SRPO ``fastvideo/SRPO.py``; as in DMDR, method.md §2.10b).

On top of a CLIP/HPS encoder, one positive and one negative control word are drawn per batch and prepended to
every prompt; the image feature is scored against the difference of the two text directions::

    pos ~ U{"Natural-lighting", "Detailed", "Realistic"},  neg ~ U{"Painting", "CG Render", "Oil"}   (once per call)
    t⁺ = normalize(E_txt(pos + ". " + prompt)),  t⁻ = normalize(E_txt(neg + ". " + prompt))
    f  = normalize(E_img(x))
    r  = f · ((1 + k) t⁺ − t⁻),   k = 0.1                      (B,)

(official DMDR ``train_sd3_srpo_deepspeed.py``: HPSv2.1 encoder, ``--srpo-k 0.1``; the combination
``(1+k)t⁺ − t⁻`` is not re-normalised). Images are (B, 3, H, W) in [0, 1]; differentiable w.r.t. the pixels.
The words are drawn with ``self.generator`` (seeded by ``seed``), whose state is data:
``reward.generator.get_state()``. The words used by the last call are in ``reward.last_words``.

>>> from dmdr.rewards import build_reward
>>> import torch
>>> r = build_reward("srpo", config="tiny", random_init=True, seed=0)
>>> r(torch.rand(2, 3, 32, 32), ["a cat", "a dog"]).shape
torch.Size([2])
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from dmdr.errors import UserError
from dmdr.rewards.base import Reward, RewardSpec, register_reward
from dmdr.rewards.clip import build_clip_encoder
from dmdr.rewards.preprocess import prompt_list

POSITIVE_WORDS: tuple[str, ...] = ("Natural-lighting", "Detailed", "Realistic")
NEGATIVE_WORDS: tuple[str, ...] = ("Painting", "CG Render", "Oil")


def srpo_reward(f: Tensor, t_pos: Tensor, t_neg: Tensor, k: float) -> Tensor:
    """``r = f · ((1 + k) t⁺ − t⁻)`` for (B, E) unit features → (B,)."""
    return (f * ((1.0 + k) * t_pos - t_neg)).sum(-1)


class SrpoReward(Reward):
    """SRPO control-word reward over an encoder with ``encode_image`` / ``encode_text`` (unit features)."""

    def __init__(self, encoder: Any, *, k: float = 0.1, positive: Sequence[str] = POSITIVE_WORDS,
                 negative: Sequence[str] = NEGATIVE_WORDS, seed: int | None = None, separator: str = ". "):
        super().__init__()
        if not positive or not negative:
            raise UserError("srpo needs at least one positive and one negative control word")
        self.encoder = encoder
        self.k = float(k)
        self.positive = tuple(positive)
        self.negative = tuple(negative)
        self.separator = separator
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self.last_words: tuple[str, str] | None = None
        self.spec = RewardSpec(name="srpo", differentiable=True, input_range=(0.0, 1.0),
                               resolution=getattr(encoder, "image_size", None), reads_prompts=True)

    def draw_words(self) -> tuple[str, str]:
        """One (positive, negative) pair, uniformly, from ``self.generator``."""
        i = int(torch.randint(len(self.positive), (1,), generator=self.generator))
        j = int(torch.randint(len(self.negative), (1,), generator=self.generator))
        return self.positive[i], self.negative[j]

    def score(self, images: Tensor, cond: Any) -> Tensor:
        prompts = prompt_list(cond, images.shape[0], self.spec.name)
        pos, neg = self.draw_words()
        self.last_words = (pos, neg)
        t_pos = self.encoder.encode_text([pos + self.separator + p for p in prompts])
        t_neg = self.encoder.encode_text([neg + self.separator + p for p in prompts])
        f = self.encoder.encode_image(images)
        return srpo_reward(f, t_pos.to(f.device), t_neg.to(f.device), self.k).to(images.device)


@register_reward("srpo")
def build_srpo(checkpoint: str | None = None, tokenizer: Any = None, config: str = "vit-h-14",
               random_init: bool = False, device: str = "cpu", dtype: str = "float32", crop: bool = False,
               k: float = 0.1, positive: Sequence[str] | None = None, negative: Sequence[str] | None = None,
               seed: int | None = None) -> SrpoReward:
    """SRPO reward on an HPS/CLIP encoder (same checkpoint/tokenizer/config options as ``"hpsv2"``).

    Args:
        k: weight of the positive direction, ``(1 + k) t⁺ − t⁻`` (DMDR ``--srpo-k 0.1``).
        positive, negative: control words (defaults: DMDR's / SRPO's lists).
        seed: seeds the word draws (None: nondeterministic).
    """
    enc = build_clip_encoder(checkpoint, tokenizer, config, random_init, device, dtype, crop, "srpo")
    return SrpoReward(enc, k=k, positive=positive or POSITIVE_WORDS, negative=negative or NEGATIVE_WORDS, seed=seed)


__all__ = ["POSITIVE_WORDS", "NEGATIVE_WORDS", "srpo_reward", "SrpoReward", "build_srpo"]
