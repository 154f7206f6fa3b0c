"""SIGINT/SIGTERM outside the training loops: start-up (imports, model building) and the tasks without a loop
handler (teacher, classifier) stop with one message instead of a traceback or a bare 143.

``dmdr train`` calls :func:`install` first. The handler never raises during start-up: raising from a signal
handler in the middle of an import (``transformers`` loads lazily) turns the signal into an unrelated
``ModuleNotFoundError``. Instead it records the signal (phase ``startup``), and

* the CLI calls :func:`check` at safe points (after validation, after ``import torch``, after preparing the run
  directory, before training), which raises :class:`Interrupted`; the CLI then says what was kept and exits 0;
* the DMDR and GRPO loops, which install their own flag handlers, take a signal recorded while their models were
  built or their checkpoint loaded (:func:`take_pending`) and stop after one inner iteration, with a checkpoint.

Phase ``raise`` (teacher and classifier training, which have no loop handler) raises :class:`Interrupted` at
once. After ``done`` (the run has finished and is printing its report) a signal is only noted, so it cannot turn
exit 0 into 143.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"phase": "startup", "pending": None}


class Interrupted(BaseException):
    """A signal arrived outside a training loop (a BaseException, so ``except Exception`` cannot swallow it)."""

    def __init__(self, signum: int, phase: str):
        super().__init__(signum, phase)
        self.signum, self.phase = signum, phase


def _handler(signum, frame):
    if _state["phase"] == "raise":
        raise Interrupted(signum, "training")
    if _state["pending"] is None:
        _state["pending"] = signum


def install() -> dict:
    """Install the handler (main thread only); returns the previous handlers for :func:`restore`."""
    _state.update(phase="startup", pending=None)
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def check() -> None:
    """Raise :class:`Interrupted` if a signal was recorded during start-up."""
    if _state["pending"] is not None and _state["phase"] != "done":
        raise Interrupted(_state["pending"], "start-up")


def take_pending() -> int | None:
    """The signal recorded before a training loop installed its own handler (and forget it)."""
    s, _state["pending"] = _state["pending"], None
    return s if _state["phase"] != "done" else None


def set_phase(phase: str) -> None:
    """``startup`` (record) → ``raise`` (teacher/classifier training) or stay ``startup`` (DMDR/GRPO loops take
    the record) → ``done`` (note only)."""
    _state["phase"] = phase
    if phase == "raise":
        check()


def restore(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)
