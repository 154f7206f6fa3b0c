"""Atomic, validated checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step-<global step:07d>/`` holding

* ``generator.safetensors`` — the generator (full weights, or its LoRA adapter);
* ``critic.safetensors``    — the critic's LoRA adapter;
* ``ema.safetensors``       — the generator EMA, if enabled;
* ``state.pt``              — both optimisers, RNG states, counters (loaded with ``weights_only=True``);
* ``recipe.yaml``           — the resolved recipe;
* ``COMPLETE``              — written last; a directory without it is ignored.

Writes go to ``step-….tmp`` and are renamed into place (``os.replace`` is atomic on POSIX), so a crash or
SIGKILL mid-save never leaves a half-written checkpoint under a final name.
"""
from __future__ import annotations

from dmdr.errors import UserError

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """No usable checkpoint (one-line message)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``save_file`` to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_checkpoint(root: str | os.PathLike, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                     state: dict[str, Any], recipe_yaml: str, keep_last: int = 3) -> Path:
    """Write ``root/step-<step>`` atomically and prune to the newest ``keep_last`` complete checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, sd in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.tmp`` and incomplete ones are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / "COMPLETE").exists():
            out.append((int(m.group(1)), d))
    return [d for _, d in sorted(out)]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], str]:
    """Load one checkpoint directory: (tensors by file stem, state, recipe yaml). Raises on any damage."""
    path = Path(path)
    tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    recipe_yaml = (path / "recipe.yaml").read_text()
    return tensors, state, recipe_yaml


def load_latest_valid(root: str | os.PathLike, warn=print):
    """The newest checkpoint that loads; damaged ones are reported through ``warn`` and skipped.

    Returns (path, tensors, state, recipe_yaml); raises :class:`CheckpointError` if none is valid.
    """
    cands = list_checkpoints(root)
    if not cands:
        raise CheckpointError(f"no checkpoint in {root}; start a new run without --resume")
    for d in reversed(cands):
        try:
            return (d, *read_checkpoint(d))
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            warn(f"warning: checkpoint {d} is damaged ({e.__class__.__name__}: {str(e)[:80]}); trying an older one")
    raise CheckpointError(f"every checkpoint in {root} is damaged; start a new run with --force")
