"""The built-in class-conditional flow-matching network for CPU work: a tiny DiT (Peebles & Xie, 2023).

Patchify (p×p) → ``depth`` transformer blocks with adaLN-Zero modulation by ``emb(t) + emb(class)`` →
unpatchify. The class embedding has ``num_classes + 1`` rows; the last one is the null class used for
classifier-free guidance. Linear layers are named ``qkv``, ``proj``, ``fc1``, ``fc2`` (the LoRA targets).

Contract: ``model(x_t (B,C,H,W), t (B,) in [0,1], labels (B,) long) -> velocity (B,C,H,W)``, ``model.path`` is
:class:`dmdr.paths.FlowMatching`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.paths import FlowMatching


@dataclass(frozen=True)
class TinyDiTConfig:
    image_size: int = 8
    channels: int = 1
    patch: int = 2
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10
    t_min: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``1000 t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        B, L, D = h.shape
        q, k, v = self.qkv(h).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + g1 * self.proj(a)
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TinyDiT(nn.Module):
    """Tiny class-conditional DiT; see the module docstring for the contract."""

    def __init__(self, config: TinyDiTConfig = TinyDiTConfig()):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch:
            raise ValueError(f"image_size {c.image_size} is not divisible by patch {c.patch}")
        self.path = FlowMatching(t_min=c.t_min)
        self.tokens = (c.image_size // c.patch) ** 2
        pdim = c.channels * c.patch * c.patch
        self.patch_in = nn.Linear(pdim, c.dim)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, c.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.t_mlp = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(c.dim, 2 * c.dim)
        self.patch_out = nn.Linear(c.dim, pdim)
        for m in (self.ada_out, self.patch_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def null_cond(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.null_class)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        c = self.config
        B = x_t.shape[0]
        p, g = c.patch, c.image_size // c.patch
        t = torch.as_tensor(t, device=x_t.device).expand(B) if torch.as_tensor(t).ndim == 0 else t
        h = x_t.reshape(B, c.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
        h = self.patch_in(h) + self.pos
        emb = self.t_mlp(timestep_embedding(t, c.dim).to(h.dtype)) + self.class_emb(cond)
        for blk in self.blocks:
            h = blk(h, emb)
        shift, scale = self.ada_out(F.silu(emb)).unsqueeze(1).chunk(2, dim=-1)
        h = self.patch_out(self.norm_out(h) * (1 + scale) + shift)
        return h.reshape(B, g, g, c.channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, c.channels, g * p, g * p)


LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]


BUILTIN = {"builtin:digits-teacher": "digits_teacher.safetensors"}


def resolve_weights(spec: str) -> str:
    """``builtin:digits-teacher`` → the shipped asset path; anything else is returned as given."""
    if spec in BUILTIN:
        from pathlib import Path

        return str(Path(__file__).resolve().parent.parent / "assets" / BUILTIN[spec])
    return spec


def save_tiny(model: TinyDiT, path: str, extra: dict | None = None) -> None:
    """Save weights + config as safetensors (config in the metadata), atomically."""
    import json

    from dmdr.train.checkpoint import atomic_save_safetensors

    meta = {"format": "dmdr.tiny_dit", "config": json.dumps(model.config.to_dict())}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    atomic_save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, meta)


def load_tiny(spec: str, *, map_location: str = "cpu") -> TinyDiT:
    """Load a :class:`TinyDiT` saved by :func:`save_tiny` (or ``builtin:digits-teacher``).

    Raises ``ValueError`` with one line naming the file and the problem (missing, not a dmdr tiny model,
    incompatible keys)."""
    import json
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = resolve_weights(spec)
    if not os.path.isfile(path):
        raise ValueError(f"model weights not found: {path}; set model.teacher to a .safetensors file from "
                         f"`dmdr train recipes/digits-teacher.yaml` or to builtin:digits-teacher")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path, device=map_location)
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(f"cannot read {path} as safetensors ({e.__class__.__name__}); the file is truncated or "
                         f"not a checkpoint") from None
    if meta.get("format") != "dmdr.tiny_dit" or "config" not in meta:
        raise ValueError(f"{path} is not a dmdr tiny-DiT checkpoint (metadata format={meta.get('format')!r})")
    cfg = TinyDiTConfig(**json.loads(meta["config"]))
    model = TinyDiT(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: incompatible keys (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model
