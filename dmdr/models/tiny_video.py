"""A tiny class-conditional video DiT for the moving-digits check: :class:`dmdr.models.tiny.TinyDiT` over all
frames at once.

Each frame is patchified as in TinyDiT; every token gets the spatial position embedding plus a learned frame
embedding, and the ``depth`` transformer blocks attend over all F·(H/p)·(W/p) tokens of the clip (so motion is
modelled jointly). Same LoRA target names (``qkv``, ``proj``, ``fc1``, ``fc2``) and null class as TinyDiT.

Contract: ``model(x_t (B, C, F, H, W), t (B,) in [0, 1], labels (B,) long) -> velocity (B, C, F, H, W)``,
``model.path`` is :class:`dmdr.paths.FlowMatching`.

>>> m = TinyVideoDiT(TinyVideoDiTConfig(frames=4, dim=32, depth=1, heads=2))
>>> m(torch.randn(2, 1, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).shape
torch.Size([2, 1, 4, 8, 8])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.models.tiny import TinyDiT, TinyDiTConfig, timestep_embedding


@dataclass(frozen=True)
class TinyVideoDiTConfig(TinyDiTConfig):
    frames: int = 4


class TinyVideoDiT(TinyDiT):
    """See the module docstring."""

    def __init__(self, config: TinyVideoDiTConfig = TinyVideoDiTConfig()):
        super().__init__(config)
        self.frame_pos = nn.Parameter(torch.zeros(1, config.frames, 1, config.dim))
        nn.init.normal_(self.frame_pos, std=0.02)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        c = self.config
        if x_t.ndim != 5 or x_t.shape[2] != c.frames:
            raise ValueError(f"TinyVideoDiT: x_t must be (B, C, {c.frames}, H, W); got {tuple(x_t.shape)}")
        B, Fr = x_t.shape[0], c.frames
        p, g = c.patch, c.image_size // c.patch
        t = torch.as_tensor(t, device=x_t.device).expand(B) if torch.as_tensor(t).ndim == 0 else t
        h = x_t.reshape(B, c.channels, Fr, g, p, g, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, Fr, g * g, -1)
        h = (self.patch_in(h) + self.pos[:, None] + self.frame_pos).reshape(B, Fr * g * g, c.dim)
        emb = self.t_mlp(timestep_embedding(t, c.dim).to(h.dtype)) + self.class_emb(cond)
        for blk in self.blocks:
            h = blk(h, emb)
        shift, scale = self.ada_out(F.silu(emb)).unsqueeze(1).chunk(2, dim=-1)
        h = self.patch_out(self.norm_out(h) * (1 + scale) + shift)
        h = h.reshape(B, Fr, g, g, c.channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return h.reshape(B, c.channels, Fr, g * p, g * p)


__all__ = ["TinyVideoDiT", "TinyVideoDiTConfig"]
