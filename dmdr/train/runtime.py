"""Run-time plumbing shared by the trainers: device, precision, seeding, RNG state, metrics, run directories."""
from __future__ import annotations

from dmdr.errors import UserError

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdr.train.rundir import RunDirError  # noqa: F401 - re-exported (it used to live here)


class DeviceError(UserError):
    """The requested device is not available (one-line message)."""

    pass


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda`` without CUDA is a :class:`DeviceError`.

    Under torchrun (``WORLD_SIZE > 1``) the process group is initialised here and CUDA means this process's
    ``cuda:LOCAL_RANK`` (:mod:`dmdr.train.distributed`)."""
    from dmdr.train import distributed

    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("runtime.device=cuda but no CUDA device is available; use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    distributed.init_from_env()
    if name == "cuda" and distributed.launched():
        return torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for forwards when ``precision == 'bf16'``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state (torch CPU, CUDA, Python ``random``, NumPy) as tensors, so that it survives
    ``torch.load(weights_only=True)``. Gaussian caches are included: :func:`set_rng_state` restores the exact
    next draw of ``random.gauss`` and ``np.random.randn`` too."""
    version, state, gauss = random.getstate()
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    st = {"torch": torch.get_rng_state(),
          "python": torch.tensor(list(state), dtype=torch.int64),
          "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
          "numpy": torch.from_numpy(np.concatenate([keys.astype(np.int64), [pos]])),
          "numpy_gauss": torch.tensor([has_gauss, cached], dtype=torch.float64)}
    if torch.cuda.is_available() and torch.cuda.device_count():
        st["cuda"] = torch.stack(list(torch.cuda.get_rng_state_all()))
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (keys it lacks are left alone)."""
    torch.set_rng_state(st["torch"])
    if "python" in st:
        ints = tuple(int(x) for x in st["python"].tolist())
        g = st.get("python_gauss")
        gauss = float(g[1]) if g is not None and bool(g[0]) else None
        random.setstate((3, ints, gauss))
    if "numpy" in st:
        arr = st["numpy"].numpy()
        g = st.get("numpy_gauss")
        has, cached = (int(g[0]), float(g[1])) if g is not None else (0, 0.0)
        np.random.set_state(("MT19937", arr[:-1].astype(np.uint32), int(arr[-1]), has, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


@contextlib.contextmanager
def rng_neutral():
    """Run a block (e.g. building a reward model, whose layers draw their initial weights) without moving any
    global RNG: the states are restored on exit, so *when* the block runs cannot change later draws."""
    st = rng_state()
    try:
        yield
    finally:
        set_rng_state(st)


def prepare_run_dir(out: str | os.PathLike, *, resume: bool, force: bool) -> Path:
    """Create or validate the run directory. An existing non-empty directory needs ``resume`` or ``force``.

    ``force`` deletes the old run's contents, and only in a directory that dmdr created as a run (its marker
    file); the directory is locked for this process (:mod:`dmdr.train.rundir`).
    Under torchrun, rank 0 does the work and the other ranks wait for it (same errors on every rank).
    """
    from dmdr.train import distributed

    out = Path(out)
    if resume and force:
        raise RunDirError("--resume and --force contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; pass a directory")
    if distributed.init_from_env():
        err = None
        if distributed.is_main():
            try:
                _prepare(out, resume=resume, force=force)
            except RunDirError as e:
                err = e
        failed = _any_rank(err is not None)
        if failed:
            raise err or RunDirError(f"rank 0 could not prepare {out}; see its error")
        return out
    return _prepare(out, resume=resume, force=force)


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _prepare(out: Path, *, resume: bool, force: bool) -> Path:
    """Marker, ``--force`` and lock rules: :func:`dmdr.train.rundir.prepare`."""
    from dmdr.train import rundir

    return rundir.prepare(out, resume=resume, force=force)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step (flushed and fsynced per line)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._t0 = time.time()
        self.tracker = None  # optional mirror (dmdr.train.trackers); this file stays the source of truth

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in record.items()}
        rec.setdefault("time", round(time.time() - self._t0, 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tracker is not None:
            self.tracker.log(rec)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn line (a kill in the middle of a write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: str | os.PathLike, max_step: int, warn=None) -> None:
    """On resume, drop log lines written after the checkpoint being resumed (their work is redone) and any line
    that is not a JSON object (a torn last line after a kill, or garbage). Such lines are not lost silently: they
    are appended to ``<path>.rejected`` and reported through ``warn``. The file is rewritten atomically
    (temporary file + rename), so a kill here loses nothing."""
    path = Path(path)
    if not path.exists():
        return
    keep, rejected = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            if line.strip():
                rejected.append((i, line))
            continue
        step = rec.get("step", 0)
        if not isinstance(step, (int, float)) or step <= max_step:
            keep.append(line)
    if rejected:
        with open(path.with_name(path.name + ".rejected"), "a") as f:
            f.write("".join(l + "\n" for _, l in rejected))
        if warn is not None:
            lines = ", ".join(str(i) for i, _ in rejected[:5]) + (" ..." if len(rejected) > 5 else "")
            warn(f"warning: {path}: {len(rejected)} line(s) that are not JSON records (line {lines}) moved to "
                 f"{path.name}.rejected")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(l + "\n" for l in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_progress(enabled: bool, console=None):
    """The progress display (:class:`dmdr.train.progress.ProgressDisplay`: stage, step, it/s, ETA, then the
    losses and monitor status on their own wrapped line; plain lines when stdout is not a terminal), or None."""
    if not enabled:
        return None
    from dmdr.train.progress import ProgressDisplay

    return ProgressDisplay(console)
