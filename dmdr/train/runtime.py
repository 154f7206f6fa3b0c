"""Run-time plumbing shared by the trainers: device, precision, seeding, RNG state, metrics, run directories."""
from __future__ import annotations

from dmdr.errors import UserError

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


class RunDirError(UserError):
    """The output directory cannot be used as asked (one-line message)."""


class DeviceError(UserError):
    pass


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda`` without CUDA is a :class:`DeviceError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("runtime.device=cuda but no CUDA device is available; use --device cpu or --device auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for forwards when ``precision == 'bf16'``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors (``torch.load(weights_only=True)``-safe)."""
    st = {"torch": torch.get_rng_state(),
          "python": torch.tensor(list(_py_state_ints()), dtype=torch.int64),
          "numpy": _np_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()]) if torch.cuda.device_count() else None
    return {k: v for k, v in st.items() if v is not None}


def _np_state() -> torch.Tensor:
    _, keys, pos, _, _ = np.random.get_state()
    return torch.from_numpy(np.concatenate([keys.astype(np.int64), [pos]]))


def _py_state_ints():
    version, state, gauss = random.getstate()
    return list(state)


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "python" in st:
        ints = tuple(int(x) for x in st["python"].tolist())
        random.setstate((3, ints, None))
    if "numpy" in st:
        arr = st["numpy"].numpy()
        np.random.set_state(("MT19937", arr[:-1].astype(np.uint32), int(arr[-1]), 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


def prepare_run_dir(out: str | os.PathLike, *, resume: bool, force: bool) -> Path:
    """Create or validate the run directory. An existing non-empty directory needs ``resume`` or ``force``.

    ``force`` moves nothing aside: it deletes the old run's contents (the user asked for it explicitly).
    """
    out = Path(out)
    if resume and force:
        raise RunDirError("--resume and --force contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; pass a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if resume:
        if not nonempty:
            raise RunDirError(f"--resume: {out} has no run to resume; drop --resume to start a new run")
        return out
    if nonempty and not force:
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it or --force to overwrite it")
    if nonempty and force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step (flushed and fsynced per line)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._t0 = time.time()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in record.items()}
        rec.setdefault("time", round(time.time() - self._t0, 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def truncate_metrics(path: str | os.PathLike, max_step: int) -> None:
    """On resume, drop log lines written after the checkpoint being resumed (their work is redone)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
        if rec.get("step", 0) <= max_step:
            keep.append(line)
    path.write_text("".join(l + "\n" for l in keep))


def make_progress(enabled: bool):
    """A rich Progress with stage, step, losses, it/s and ETA columns (or None when disabled)."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
