"""Strict weight loading: which names of a state dict do not fit a model, and copying a state dict that fits.

Used by the trainers' checkpoint loading and by ``generator.init``; each caller words its own one-line error.
"""
from __future__ import annotations

import torch
from torch import Tensor


def state_mismatch(own: dict[str, Tensor], sd: dict[str, Tensor], *,
                   require_all: bool = True) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, shape_mismatch)`` names of ``sd`` against the model tensors ``own``, sorted.

    ``missing`` lists names of ``own`` absent from ``sd`` (empty when ``require_all`` is False: a partial load)."""
    missing = sorted(k for k in own if k not in sd) if require_all else []
    unexpected = sorted(k for k in sd if k not in own)
    bad = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape)
    return missing, unexpected, bad


@torch.no_grad()
def copy_state(own: dict[str, Tensor], sd: dict[str, Tensor]) -> None:
    """Copy every tensor of ``sd`` in place into the tensor of the same name in ``own`` (names checked first)."""
    for k, v in sd.items():
        own[k].copy_(v)
