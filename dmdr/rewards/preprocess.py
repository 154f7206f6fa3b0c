"""Differentiable image preprocessing for reward models (torch ops only, so gradients reach the pixels).

The reward models were trained on PIL/torchvision pipelines. We reproduce them with
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, which is what torchvision's
``Resize(..., antialias=True)`` calls on tensors (close to, but not bit-identical with, PIL bicubic)::

    x ∈ [lo, hi]^{B×3×H×W}  →  (x - lo) / (hi - lo)                     to [0, 1]
                            →  resize (short side → size, or both sides → size when crop=False)
                            →  center crop size×size
                            →  (x - mean) / std                          per channel

Two resize modes are used by the references:

* ``crop=True``: ``Resize(size)`` on the short side then ``CenterCrop(size)`` (ImageReward, PickScore's
  ``CLIPProcessor``, open_clip's eval transform);
* ``crop=False``: ``Resize((size, size))`` that squashes the image (the official DMDR code's
  ``CLIPImageProcessorTensor`` for DFN-CLIP and HPSv2.1, ``train_t2i/sd3/rl_utils.py``).

Both agree on square images. No clamping: torchvision does not clamp tensor outputs either.

The text rewards also share :func:`prompt_list` (validates the B prompts a reward reads) and :func:`parse_dtype`.

>>> import torch
>>> x = torch.rand(2, 3, 64, 48, requires_grad=True)
>>> clip_preprocess(x, 32).shape
torch.Size([2, 3, 32, 32])
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# openai CLIP normalisation, shared by CLIP, open_clip ViT-H-14 (HPSv2), PickScore and BLIP/ImageReward.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def to_unit_range(images: Tensor, input_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Affinely map images from ``input_range`` to [0, 1] (identity for (0, 1))."""
    lo, hi = input_range
    if (lo, hi) == (0.0, 1.0):
        return images
    return (images - lo) / (hi - lo)


def resize(images: Tensor, size: int, *, crop: bool = True) -> Tensor:
    """Bicubic antialiased resize of (B, C, H, W) images.

    ``crop=True``: the short side becomes ``size`` (the long side ``int(size · long / short)``, as torchvision),
    then a ``size × size`` center crop. ``crop=False``: both sides become ``size``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W); got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if crop:
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
    else:
        new_h, new_w = size, size
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    return center_crop(images, size) if crop else images


def center_crop(images: Tensor, size: int) -> Tensor:
    """``size × size`` center crop with torchvision's offsets ``round((H - size) / 2)``."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {h}x{w} images to {size}x{size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def normalize(images: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """Per-channel ``(x - mean) / std``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(images: Tensor, size: int, *, crop: bool = True, input_range: tuple[float, float] = (0.0, 1.0),
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """Images in ``input_range`` (B, 3, H, W) → normalised (B, 3, size, size) model input. Differentiable."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W); got {tuple(images.shape)}")
    return normalize(resize(to_unit_range(images, input_range), size, crop=crop), mean, std)


# ---- non-image inputs shared by the text rewards ------------------------------------------------------------

def prompt_list(cond: Any, batch: int, name: str) -> list[str]:
    """Validate a reward's prompt conditioning: B strings (a single string is repeated)."""
    if isinstance(cond, str):
        return [cond] * batch
    if not isinstance(cond, (list, tuple)) or not all(isinstance(c, str) for c in cond):
        raise ValueError(f"reward {name!r} reads prompts: pass a list of {batch} strings as cond; "
                         f"got {type(cond).__name__}")
    prompts = list(cond)
    if len(prompts) != batch:
        raise ValueError(f"reward {name!r}: {len(prompts)} prompts for {batch} images")
    return prompts


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or fp32/fp16/bf16, or a torch.dtype) → torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(table)}")
    return table[name]
