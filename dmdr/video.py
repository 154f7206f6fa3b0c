"""Video files: write clips as GIF (Pillow) or MP4 (imageio + imageio-ffmpeg, the optional ``video`` extra), chosen
by the output suffix, and read them back.

Clips are float tensors in [0, 1] with the frames axis after the channels, as the Wan VAE decodes them:
``(C, F, H, W)`` for one clip, ``(B, C, F, H, W)`` for a batch. A batch is written as ONE file whose every frame is
the grid of the B clips at that frame (``nrow`` clips per row); ``scale`` upsamples (nearest) for tiny clips.

>>> import torch, tempfile, os
>>> f = os.path.join(tempfile.mkdtemp(), "clip.gif")
>>> save_video(torch.rand(2, 1, 5, 8, 8), f, fps=4, nrow=2)  # doctest: +ELLIPSIS
PosixPath('...clip.gif')
>>> read_video(f).shape
(5, 12, 22, 3)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmdr.errors import UserError

VIDEO_SUFFIXES = (".gif", ".mp4")
MP4_HINT = ("writing .mp4 needs imageio and imageio-ffmpeg (pip install 'dmdr[video]'); or write a .gif "
            "(Pillow only)")


def mp4_available() -> bool:
    """True when an MP4 encoder (imageio with the imageio-ffmpeg binary) is importable."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def check_video_suffix(path: str | Path) -> str:
    """The suffix of a video output, or a one-line ``UserError`` (unknown suffix; .mp4 without the encoder)."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"--out {path}: a video needs a .gif or .mp4 file name")
    if suffix == ".mp4" and not mp4_available():
        raise UserError(f"--out {path}: {MP4_HINT}")
    return suffix


def video_frames_uint8(videos01: torch.Tensor, *, nrow: int | None = None, scale: int = 1,
                       pad: int = 2) -> np.ndarray:
    """(C, F, H, W) or (B, C, F, H, W) in [0, 1] → (F, H', W', 3) uint8 frames (grid of the clips, white padding)."""
    x = videos01.detach().float().clamp(0, 1).cpu()
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected clips (B, C, F, H, W) with C = 1 or 3; got {tuple(videos01.shape)}")
    B, C, F, H, W = x.shape
    if C == 1:
        x = x.expand(B, 3, F, H, W)
    x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    H, W = H * scale, W * scale
    if B == 1:
        return (x[0].permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)
    nrow = nrow or B
    rows = (B + nrow - 1) // nrow
    canvas = np.full((F, rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, dtype=np.uint8)
    frames = (x.permute(0, 2, 3, 4, 1).numpy() * 255).round().astype(np.uint8)  # (B, F, H, W, 3)
    for i in range(B):
        r, c = divmod(i, nrow)
        y0, x0 = pad + r * (H + pad), pad + c * (W + pad)
        canvas[:, y0:y0 + H, x0:x0 + W] = frames[i]
    return canvas


def save_video(videos01: torch.Tensor, path: str | Path, *, fps: int = 8, nrow: int | None = None, scale: int = 1,
               pad: int = 2) -> Path:
    """Write clips (see the module docstring) as ``.gif`` (Pillow, looping) or ``.mp4`` (H.264 yuv420p through
    imageio-ffmpeg; odd sizes are padded to even with white). Atomic write; returns the path."""
    path = Path(path)
    suffix = check_video_suffix(path)
    frames = video_frames_uint8(videos01, nrow=nrow, scale=scale, pad=pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + suffix)
    if suffix == ".gif":
        from PIL import Image

        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(tmp, save_all=True, append_images=ims[1:], duration=max(1, round(1000 / fps)), loop=0,
                    optimize=False, disposal=1)
    else:
        import imageio.v2 as imageio

        F, H, W, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), constant_values=255)
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, ffmpeg_log_level="error") as w:
            for f in frames:
                w.append_data(f)
    tmp.replace(path)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """The frames of a .gif or .mp4 as (F, H, W, 3) uint8 (MP4 needs the ``video`` extra)."""
    path = Path(path)
    suffix = check_video_suffix(path)
    if suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([np.asarray(f) for f in r])


__all__ = ["VIDEO_SUFFIXES", "MP4_HINT", "mp4_available", "check_video_suffix", "video_frames_uint8", "save_video",
           "read_video"]
