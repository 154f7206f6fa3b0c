"""Moving digits: tiny video clips made on the fly from scikit-learn's digits (the digits-sized check for video).

A clip shows one 8×8 digit translating horizontally across the 8×8 canvas, one pixel per frame, wrapping around
(a translation on the torus, so no stroke leaves the canvas):

    clip[:, f] = roll(digit, shifts = d · f, dims = W),   f = 0 .. F-1,   d ∈ {-1, +1} (left / right)

Clips are (N, 1, F, 8, 8) float32 in [-1, 1] (the frames axis after the channels, as video latents), conditioned
on the digit's class (N,). The direction is drawn per clip, so a model must produce both motions for every class.

>>> clips, labels, direction = moving_digits(torch.zeros(2, 1, 8, 8), torch.tensor([3, 7]), frames=4)
>>> tuple(clips.shape), labels.tolist()
((2, 1, 4, 8, 8), [3, 7])
"""
from __future__ import annotations

import torch
from torch import Tensor

from dmdr.data.digits import Split, load_digits_tensors

DEFAULT_FRAMES = 4


def moving_digits(images: Tensor, labels: Tensor, *, frames: int = DEFAULT_FRAMES, direction: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Clips of ``images`` (N, C, H, W) moving one pixel per frame: (clips (N, C, F, H, W), labels (N,),
    direction (N,) in {-1, +1}, drawn from ``generator`` unless given)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    N = images.shape[0]
    if direction is None:
        direction = torch.randint(0, 2, (N,), generator=generator) * 2 - 1
    direction = direction.to(torch.long)
    clips = torch.stack([torch.stack([torch.roll(img, int(d) * f, dims=-1) for f in range(frames)], dim=1)
                         for img, d in zip(images, direction.tolist())]) if N else \
        images.new_zeros(0, images.shape[1], frames, *images.shape[2:])
    return clips, labels, direction


class MovingDigitsBatches:
    """Infinite iterator of ``(clips (B, 1, F, 8, 8) in [-1, 1], labels (B,))`` drawn uniformly from ``split``
    with a random direction per clip; one CPU ``torch.Generator`` seeded with ``seed`` drives everything.

    >>> clips, labels = next(MovingDigitsBatches(batch_size=3, frames=5, seed=0))
    >>> tuple(clips.shape), tuple(labels.shape)
    ((3, 1, 5, 8, 8), (3,))
    """

    def __init__(self, batch_size: int, *, frames: int = DEFAULT_FRAMES, seed: int = 0, split: Split = "train"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.frames = int(batch_size), int(frames)
        self.images, self.labels = load_digits_tensors(split)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __iter__(self) -> "MovingDigitsBatches":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.labels), (self.batch_size,), generator=self.generator)
        clips, labels, _ = moving_digits(self.images[idx], self.labels[idx], frames=self.frames,
                                         generator=self.generator)
        return clips, labels


__all__ = ["DEFAULT_FRAMES", "moving_digits", "MovingDigitsBatches"]
