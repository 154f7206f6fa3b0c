"""Atomic, validated checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step-<global step:07d>/`` holding

* ``generator.safetensors`` — the generator (full weights, or its LoRA adapter);
* ``critic.safetensors``    — the critic's LoRA adapter;
* ``ema.safetensors``       — the generator EMA, if enabled;
* ``state.pt``              — both optimisers, RNG states, counters (loaded with ``weights_only=True``);
* ``recipe.yaml``           — the resolved recipe;
* ``COMPLETE``              — written last: the step and the SHA-256 of every other file; a directory without
  it is ignored, and a file whose hash differs makes the checkpoint "damaged", as does a manifest that names
  another step, lists no checksums, or leaves any file of the directory (or ``state.pt``/``recipe.yaml``) out.

Writes go to ``step-….tmp`` and are renamed into place (``os.replace`` is atomic on POSIX), so a crash or
SIGKILL mid-save never leaves a half-written checkpoint under a final name. Re-writing an existing step (the
end of a stage after a periodic save at the same step) first renames the old one to ``step-….prev``, which
:func:`list_checkpoints` still offers until the new one is in place. Loading never unpickles code:
``*.safetensors`` are plain tensors and ``state.pt`` goes through ``torch.load(weights_only=True)``, which refuses
any pickled object that is not a tensor or a plain container (an arbitrary class there makes the checkpoint
"damaged", like a truncated file). :func:`load_latest_valid` reports a damaged checkpoint and falls back to the
previous valid one; with none valid it raises :class:`CheckpointError` (the CLI's one-line exit 2).
"""
from __future__ import annotations

from dmdr.errors import UserError

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d+)(\.prev)?$")
SAFE_NAME_RE = re.compile(r"^(\.metadata|[A-Za-z0-9_][A-Za-z0-9_.-]*)$")  # a file in the checkpoint dir (.metadata: DCP)
REQUIRED_FILES = ("state.pt", "recipe.yaml")                  # every writer writes these


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(root: str | os.PathLike, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                     state: dict[str, Any], recipe_yaml: str, keep_last: int = 3, tmp_ready: bool = False,
                     manifest_extra: dict[str, Any] | None = None) -> Path:
    """Write ``root/step-<step>`` atomically and prune to the newest ``keep_last`` complete checkpoints.

    Only one process may call this for a given ``root`` (rank 0 under torchrun). ``tmp_ready``: ``step-….tmp``
    already holds files written by every rank (FSDP2's DCP shards, dmdr/train/fsdp.py); they are added to the
    manifest, and ``manifest_extra`` (e.g. ``{"format": "dcp"}``) goes into ``COMPLETE``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    prev = root / f"step-{step:07d}.prev"
    for stale in root.glob("step-*.tmp"):  # left by a kill or a full disk during an earlier save
        if not (tmp_ready and stale == tmp):
            _remove(stale)
    try:
        if not tmp_ready:
            tmp.mkdir()
        for name, sd in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / "COMPLETE").write_text(json.dumps({"step": step, "sha256": files, **(manifest_extra or {})}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # ENOSPC, EROFS, EDQUOT... (torch.save reports some as RuntimeError)
        _remove(tmp)
        prior = [d for d in list_checkpoints(root) if not d.name.endswith(".prev")]
        keep = f"the last complete checkpoint {prior[-1]} is intact" if prior else "no checkpoint was written yet"
        why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else _short(e)
        raise CheckpointError(f"cannot write checkpoint step {step} in {root}: {why}; {keep}; free space (or fix "
                              f"the file system) and continue with --resume") from None
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(final, prev)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(prev, ignore_errors=True)
    for old in [d for d in list_checkpoints(root) if d.name.endswith(".prev")]:
        if (root / old.name[: -len(".prev")]).exists():
            shutil.rmtree(old, ignore_errors=True)
    finals = [d for d in list_checkpoints(root) if not d.name.endswith(".prev")]
    for old in finals[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _remove(p: Path) -> None:
    """Remove a leftover file or directory (a stale ``.tmp`` may be either)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.tmp`` and incomplete ones are skipped; a ``.prev`` left
    by a kill during a re-write sorts just before its step's final directory)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / "COMPLETE").exists():
            out.append((int(m.group(1)), m.group(2) is None, d))
    return [d for *_, d in sorted(out)]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if a file listed in ``COMPLETE`` is missing or its SHA-256 differs."""
    path = Path(path)
    try:
        manifest = json.loads((path / "COMPLETE").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable COMPLETE marker ({e.__class__.__name__})") from None
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise CheckpointError(f"{path}: COMPLETE lists no checksums (damaged or edited)")
    m = STEP_RE.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        raise CheckpointError(f"{path}: COMPLETE names step {manifest.get('step')!r}, not {int(m.group(1))}")
    present = {f.name for f in path.iterdir() if f.name != "COMPLETE"}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise CheckpointError(f"{path}: {', '.join(unlisted[:3])} not listed in COMPLETE (damaged or edited)")
    for required in REQUIRED_FILES:
        if required not in listed:
            raise CheckpointError(f"{path}: COMPLETE does not list {required} (damaged or edited)")
    for name, digest in listed.items():
        if not isinstance(name, str) or not SAFE_NAME_RE.match(name) or not isinstance(digest, str):
            raise CheckpointError(f"{path}: COMPLETE has a malformed entry {str(name)[:40]!r}")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (truncated or corrupted)")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], str]:
    """Load one checkpoint directory: (tensors by file stem, state, recipe yaml). Raises on any damage.

    Nothing is unpickled beyond tensors and plain containers (``weights_only=True``)."""
    path = Path(path)
    verify_checkpoint(path)
    tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    if not tensors and (path / ".metadata").is_file():  # FSDP2 (DCP) shards, read into whole tensors on demand
        from dmdr.train.fsdp import DCPTensors

        tensors = DCPTensors(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}/state.pt holds a {type(state).__name__}, not a state dict")
    recipe_yaml = (path / "recipe.yaml").read_text()
    return tensors, state, recipe_yaml


def load_latest_valid(root: str | os.PathLike, warn=print, apply=None):
    """The newest checkpoint that loads; damaged ones are reported through ``warn`` and skipped.

    ``apply(path, tensors, state, recipe_yaml)``, if given, runs inside the fallback too: a checkpoint whose
    contents do not fit the model (missing keys, wrong shapes) is skipped like a damaged file. A
    :class:`CheckpointError` raised by ``apply`` (e.g. a refused recipe change) is final and propagates.
    Returns (path, tensors, state, recipe_yaml); raises :class:`CheckpointError` if none is valid.
    """
    cands = list_checkpoints(root)
    if not cands:
        raise CheckpointError(f"no checkpoint in {root}; start a new run without --resume")
    for d in reversed(cands):
        try:
            loaded = read_checkpoint(d)
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            warn(f"warning: checkpoint {d} is damaged ({_short(e)}); trying an older one")
            continue
        if apply is not None:
            try:
                apply(d, *loaded)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                warn(f"warning: checkpoint {d} does not fit this run ({_short(e)}); trying an older one")
                continue
        return (d, *loaded)
    raise CheckpointError(f"no valid checkpoint in {root} ({len(cands)} damaged); start a new run with --force")


def _short(e: Exception) -> str:
    msg = " ".join(str(e).split()).replace("[", "(").replace("]", ")")  # safe for rich-markup consoles
    return f"{e.__class__.__name__}: {msg[:120]}"
