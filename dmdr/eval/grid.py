"""PNG sample grids (PIL only; no torchvision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_grid(images01: torch.Tensor, path: str | Path, *, nrow: int, scale: int = 4, pad: int = 2,
              row_labels: list[str] | None = None) -> Path:
    """Save (N,C,H,W) images in [0,1] as a grid with ``nrow`` images per row, upscaled ``scale``× (nearest).

    ``row_labels`` (one per row) are written in a left margin. Grayscale for C=1, RGB for C=3. Atomic write.
    Clips (N,C,F,H,W) are laid out one clip per row, its F frames left to right (``nrow`` is then F).
    """
    x = images01.detach().float().clamp(0, 1).cpu()
    if x.ndim == 5:
        N, C, F, H, W = x.shape
        x, nrow = x.transpose(1, 2).reshape(N * F, C, H, W), F
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    H, W = h * scale, w * scale
    margin = 14 if row_labels else 0
    canvas = np.ones((rows * (H + pad) + pad, margin + nrow * (W + pad) + pad, 3), dtype=np.uint8) * 255
    for i in range(n):
        r, col = divmod(i, nrow)
        img = x[i].permute(1, 2, 0).numpy()
        img = np.repeat(np.repeat(img, scale, 0), scale, 1)
        if c == 1:
            img = np.repeat(img, 3, 2)
        y0, x0 = pad + r * (H + pad), margin + pad + col * (W + pad)
        canvas[y0:y0 + H, x0:x0 + W] = (img * 255).round().astype(np.uint8)
    im = Image.fromarray(canvas)
    if row_labels:
        draw = ImageDraw.Draw(im)
        for r, lab in enumerate(row_labels[:rows]):
            draw.text((2, pad + r * (H + pad) + H // 2 - 5), str(lab), fill=(200, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    im.save(tmp)
    tmp.replace(path)
    return path
