"""SIGINT/SIGTERM outside the training loops: start-up (imports, model building) and the tasks without a loop
handler (teacher, classifier) stop with one message instead of a traceback or a bare 143.

``dmdr train`` calls :func:`install` first. Until :func:`set_phase` ``("done")``, a signal raises
:class:`Interrupted` at the next Python instruction; the CLI catches it, says what was kept and exits 0 (as an
interrupted training loop does). The DMDR and GRPO loops install their own handlers (a flag checked after every
inner iteration) while they run, and put these back when they return. After ``done`` a signal is only noted:
the run has finished and is printing its report, so it must not turn exit 0 into 143.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"phase": "startup", "late": None}


class Interrupted(BaseException):
    """A signal arrived outside a training loop (a BaseException, so ``except Exception`` cannot swallow it)."""

    def __init__(self, signum: int, phase: str):
        super().__init__(signum, phase)
        self.signum, self.phase = signum, phase


def _handler(signum, frame):
    if _state["phase"] == "done":
        _state["late"] = signum
        return
    raise Interrupted(signum, _state["phase"])


def install() -> dict:
    """Install the handler (main thread only); returns the previous handlers for :func:`restore`."""
    _state.update(phase="startup", late=None)
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def set_phase(phase: str) -> None:
    """``startup`` → ``training`` → ``done``."""
    _state["phase"] = phase


def restore(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)
