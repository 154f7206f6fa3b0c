"""scikit-learn's 8×8 digits as torch tensors: the embedded quickstart data set.

``load_digits`` holds 1797 grey images of 8×8 pixels with integer values 0..16 and labels 0..9. Here images are
scaled to the model range ``x = v / 16 · 2 - 1 ∈ [-1, 1]`` with shape (N, 1, 8, 8) float32, labels (N,) int64.

Split (deterministic, stratified, no RNG): within each class, samples are taken in data-set order and every 5th
one (positions 4, 9, 14, ... of that class) goes to ``holdout``; the rest is ``train``. That is 1442 train and
355 holdout images, every class present in both in the proportion ≈4:1.

A second, independent split into halves (also deterministic and stratified): within each class, even positions
(0, 2, 4, ...) form ``half_a`` and odd positions ``half_b`` (899 / 898 images). The second evaluation network is
trained on ``half_b`` only (docs/evaluation.md).

>>> x, y = load_digits_tensors("holdout")
>>> tuple(x.shape), x.min().item() >= -1, x.max().item() <= 1
((355, 1, 8, 8), True, True)
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

Split = Literal["all", "train", "holdout", "half_a", "half_b"]
HOLDOUT_EVERY = 5


@lru_cache(maxsize=1)
def _load() -> tuple[Tensor, Tensor, Tensor]:
    """(images in [-1,1] (N,1,8,8), labels (N,), holdout mask (N,)) — the sklearn load runs once."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("the digits quickstart needs scikit-learn: pip install 'dmdr[quickstart]'") from e
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    holdout = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)  # data-set order
        holdout[idx[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY]] = True
    return x, y, holdout


def load_digits_tensors(split: Split = "all") -> tuple[Tensor, Tensor]:
    """Images (N,1,8,8) float32 in [-1,1] and labels (N,) int64 of ``split`` (see the module docstring).

    Returns fresh copies, so callers may modify them in place.
    """
    x, y, holdout = _load()
    if split == "all":
        m = torch.ones_like(holdout)
    elif split == "train":
        m = ~holdout
    elif split == "holdout":
        m = holdout
    elif split in ("half_a", "half_b"):
        m = torch.zeros_like(holdout)
        for c in range(10):
            idx = (y == c).nonzero().squeeze(1)  # data-set order, as the holdout split
            m[idx[(0 if split == "half_a" else 1) :: 2]] = True
    else:
        raise ValueError(f"unknown digits split {split!r}; expected 'all', 'train', 'holdout', 'half_a' or 'half_b'")
    return x[m].clone(), y[m].clone()


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] → [0, 1]: ``(x + 1) / 2``, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def from_unit(x: Tensor) -> Tensor:
    """[0, 1] → [-1, 1]: ``2 x - 1`` (exact inverse of :func:`to_unit` on [-1, 1])."""
    return x * 2 - 1


class DigitsBatches:
    """Infinite iterator of random training batches ``(images (B,1,8,8) in [-1,1], labels (B,))``.

    ``balanced=True`` draws the labels uniformly over the 10 classes, then an image of that class uniformly;
    ``balanced=False`` draws images uniformly (with replacement) from the split. All randomness comes from one
    CPU ``torch.Generator``; :meth:`state_dict` / :meth:`load_state_dict` save and restore it, so a resumed
    iterator yields exactly the batches the original would have.

    >>> it = DigitsBatches(batch_size=4, seed=0)
    >>> x, y = next(it); tuple(x.shape), tuple(y.shape)
    ((4, 1, 8, 8), (4,))
    """

    def __init__(self, batch_size: int, *, seed: int = 0, split: Split = "train", balanced: bool = False,
                 device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.split = split
        self.balanced = bool(balanced)
        self.device = torch.device(device)
        self.images, self.labels = load_digits_tensors(split)
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self._by_class = [(self.labels == c).nonzero().squeeze(1).cpu() for c in range(10)]
        self._counts = torch.tensor([len(i) for i in self._by_class])
        self.generator = torch.Generator().manual_seed(int(seed))

    def __iter__(self) -> "DigitsBatches":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        g, B = self.generator, self.batch_size
        if self.balanced:
            cls = torch.randint(0, 10, (B,), generator=g)
            pos = (torch.rand(B, generator=g) * self._counts[cls]).long().clamp_max(self._counts[cls] - 1)
            idx = torch.stack([self._by_class[c][p] for c, p in zip(cls.tolist(), pos.tolist())])
        else:
            idx = torch.randint(0, len(self.labels), (B,), generator=g)
        idx = idx.to(self.device)
        return self.images[idx], self.labels[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batch_size": self.batch_size, "split": self.split,
                "balanced": self.balanced}

    def load_state_dict(self, state: dict) -> None:
        for k in ("batch_size", "split", "balanced"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"DigitsBatches state has {k}={state[k]!r} but this iterator has {getattr(self, k)!r}")
        self.generator.set_state(state["generator"])
