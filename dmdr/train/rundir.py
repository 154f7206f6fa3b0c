"""Run directories: what ``--out`` may be, what ``--force`` may delete, and one process per run at a time.

* **Marker.** A directory that ``dmdr train`` creates gets a marker file ``.dmdr-run`` (JSON: creation time,
  pid). ``--force`` replaces a non-empty directory *only* when it holds this marker; anything else (a source
  tree, a thesis, a home directory) is refused with exit code 2 and left untouched. ``--resume`` needs the marker
  too (or, for runs made before markers existed, a ``checkpoints/`` folder next to a ``recipe.yaml``).
* **Path.** ``--out`` may be a symlink to a directory (its contents are replaced, the link stays); an ``--out``
  below a regular file, or on a read-only or full file system, is a one-line :class:`RunDirError`.
* **Lock.** An exclusive advisory lock (``fcntl.flock`` on ``.dmdr-lock``) is held from the moment the directory
  is prepared until the command ends. A second ``dmdr train`` on the same directory gets a one-line error
  naming the holder's pid. The kernel drops the lock when its process dies, so a crash or SIGKILL never leaves
  a stale lock behind (the file stays; only the lock matters).
"""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from dmdr.errors import UserError

MARKER = ".dmdr-run"
LOCK = ".dmdr-lock"
_HELD: dict[str, int] = {}   # resolved run dir -> fd holding its flock (this process)


class RunDirError(UserError):
    """The output directory cannot be used as asked (one-line message)."""


def os_error_message(e: OSError, what: str) -> str:
    """One line for an OS error while touching ``what`` (read-only FS, full disk, permissions, ...)."""
    hint = {errno.EROFS: "the file system is read-only; pass an --out on a writable disk",
            errno.ENOSPC: "no space left on the device; free some space or pass an --out on another disk",
            errno.EDQUOT: "disk quota exceeded; free some space or pass an --out on another disk",
            errno.EACCES: "permission denied; pass an --out you can write to",
            errno.EPERM: "operation not permitted; pass an --out you can write to"}.get(e.errno)
    return f"{what}: {hint or (e.strerror or e.__class__.__name__)}"


def is_run_dir(path: Path) -> bool:
    """A directory that ``dmdr train`` created (holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def looks_like_legacy_run(path: Path) -> bool:
    """A run written before markers existed: ``checkpoints/`` next to ``recipe.yaml``."""
    path = Path(path)
    return (path / "checkpoints").is_dir() and (path / "recipe.yaml").is_file()


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` whose existing ancestor is a regular file (``mkdir`` would fail half-way)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; pass a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"--out {out}: {parent} is a file, not a directory; pass another --out")
            break


def _entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


def acquire_lock(out: Path) -> None:
    """Take the exclusive lock of ``out`` for this process (idempotent). Raises :class:`RunDirError` if another
    process holds it."""
    import fcntl

    key = str(Path(out).resolve())
    if key in _HELD:
        return
    try:
        fd = os.open(Path(out) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(os_error_message(e, f"cannot lock {out}")) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        raise RunDirError(f"{out} is in use by another dmdr process (pid {holder}); wait for it to end or stop "
                          f"it, or pass another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass  # the pid is only for the message
    _HELD[key] = fd


def release_lock(out: Path | None = None) -> None:
    """Release the lock of ``out`` (all of this process's locks when ``None``)."""
    import fcntl

    keys = list(_HELD) if out is None else [str(Path(out).resolve())]
    for k in keys:
        fd = _HELD.pop(k, None)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _write_marker(out: Path) -> None:
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"dmdr_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}))
    os.replace(tmp, out / MARKER)


def _clear(out: Path) -> None:
    """Delete the contents of a run directory (not the directory: it may be a symlink's target), lock excepted."""
    import shutil

    for p in _entries(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare(out: Path, *, resume: bool, force: bool) -> Path:
    """Create or validate ``out`` and take its lock (see the module docstring). Returns ``out``."""
    out = Path(out)
    if resume and force:
        raise RunDirError("--resume and --force contradict each other; pick one")
    check_out_path(out)
    try:
        if resume:
            if not _entries(out):
                raise RunDirError(f"--resume: {out} has no run to resume; drop --resume to start a new run")
            if not (is_run_dir(out) or looks_like_legacy_run(out)):
                raise RunDirError(f"--resume: {out} is not a dmdr run directory (no {MARKER} marker); pass the "
                                  f"--out of a `dmdr train` run")
            acquire_lock(out)
            return out
        if _entries(out):
            if not force:
                raise RunDirError(f"{out} already holds "
                                  f"{'a run' if is_run_dir(out) or looks_like_legacy_run(out) else 'files'}; pass "
                                  f"--resume to continue a run or --force to overwrite a run, or pass another --out")
            if not is_run_dir(out):
                raise RunDirError(f"--force: {out} is not a dmdr run directory (no {MARKER} marker); dmdr only "
                                  f"overwrites runs it created; pass another --out or empty the folder yourself")
            acquire_lock(out)   # never delete a run another process is writing
            _clear(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            acquire_lock(out)
        _write_marker(out)
    except OSError as e:
        release_lock(out) if str(out.resolve()) in _HELD else None
        raise RunDirError(os_error_message(e, f"cannot prepare --out {out}")) from None
    return out
