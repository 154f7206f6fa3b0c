"""PickScore (Kirstain et al., NeurIPS 2023, arXiv 2305.01569; ``yuvalkirstain/PickScore_v1``).

A CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences, stored in the transformers ``CLIPModel`` format. As in the
reference code, the score is the temperature-scaled cosine::

    r = exp(logit_scale) · cos(f_img, f_txt(prompt))            (B,), exp(logit_scale) ≈ 100 for PickScore_v1

with ``CLIPProcessor`` preprocessing (short side → 224 bicubic, center crop, CLIP mean/std; here in torch ops,
so it is differentiable) and the tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (pad to 77). Images are
(B, 3, H, W) in [0, 1].

Loading real weights (a GPU box; both directories are local copies of the hub repositories)::

    build_reward("pickscore", checkpoint="/local/PickScore_v1", tokenizer="/local/CLIP-ViT-H-14-laion2B", device="cuda")

>>> from dmdr.rewards import build_reward
>>> import torch
>>> r = build_reward("pickscore", config="tiny", random_init=True)
>>> r(torch.rand(2, 3, 32, 32), ["a cat", "a dog"]).shape
torch.Size([2])
"""
from __future__ import annotations

from typing import Any

from dmdr.rewards.base import register_reward
from dmdr.rewards.clip import ClipScore, build_clip_encoder


@register_reward("pickscore")
def build_pickscore(checkpoint: str | None = None, tokenizer: Any = None, config: str = "vit-h-14",
                    random_init: bool = False, device: str = "cpu", dtype: str = "float32",
                    crop: bool = True) -> ClipScore:
    """PickScore from an HF ``CLIPModel`` directory (``CLIPModel.from_pretrained(checkpoint)``, local files only).

    Args:
        checkpoint: local copy of ``yuvalkirstain/PickScore_v1`` (an open_clip-format file is also accepted).
        tokenizer: directory with ``vocab.json`` + ``merges.txt`` (default: ``checkpoint`` if it ships them).
        config: only for ``random_init`` / state-dict files: ``"vit-h-14"`` or ``"tiny"``.
        crop: short-side resize + center crop as ``CLIPProcessor`` (default) or squash to 224 × 224.
    """
    enc = build_clip_encoder(checkpoint, tokenizer, config, random_init, device, dtype, crop, "pickscore")
    return ClipScore(enc, name="pickscore", use_logit_scale=True)


__all__ = ["build_pickscore"]
