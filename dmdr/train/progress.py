"""The training progress display: readable in an 80-column terminal and in a plain (non-TTY) log.

Same calls as ``rich.progress.Progress`` as the trainers use it: ``add_task(description, total=, completed=,
info=, rate=)`` and ``update(task, completed=, info=, rate=)``, as a context manager.

* **terminal** (``console.is_terminal``): a live block of two lines per task, never truncated —
  ``stage 1/2 cold_start ━━━━━━━━━━━━━━━━  120/600  20% 0:00:31<0:02:05 3.85 it/s`` (the bar takes the width
  that is left), then the losses / rewards / monitor status, word-wrapped to the terminal width;
* **not a terminal** (a pipe, a file, CI): one plain line per update, no escape codes, wrapped at 80 columns
  with a two-space indent: ``[stage 1/2 cold_start] 120/600 20% 3.85 it/s eta 0:02:05 | dmd 0.0123 ...``.
"""
from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

WIDTH = 80


@dataclass
class _Task:
    description: str
    total: int
    completed: int = 0
    info: str = ""
    rate: str = ""
    t0: float = field(default_factory=time.time)
    c0: int = 0


def _hms(s: float) -> str:
    if s != s or s == float("inf"):
        return "-:--:--"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressDisplay:
    """See the module docstring. ``console``: a ``rich.console.Console`` (default: stdout)."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.tty = bool(self.console.is_terminal)
        self.tasks: list[_Task] = []
        self._live = None

    # ---- formatting (pure) --------------------------------------------------------------------------------------
    @staticmethod
    def _timing(t: _Task) -> tuple[str, str]:
        elapsed = time.time() - t.t0
        done = t.completed - t.c0
        eta = elapsed / done * (t.total - t.completed) if done > 0 else float("nan")
        return _hms(elapsed), _hms(eta)

    def plain_lines(self, t: _Task, width: int = WIDTH) -> list[str]:
        """The non-TTY line(s) of a task, each at most ``width`` characters."""
        pct = 100 * t.completed / max(t.total, 1)
        _, eta = self._timing(t)
        head = f"[{t.description}] {t.completed}/{t.total} {pct:.0f}%"
        head += f" {t.rate}" if t.rate else ""
        head += f" eta {eta}"
        text = head + (f" | {t.info}" if t.info else "")
        return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False) or [head]

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        width = max(40, self.console.width)
        rows = []
        for t in self.tasks:
            pct = 100 * t.completed / max(t.total, 1)
            elapsed, eta = self._timing(t)
            right = f" {t.completed}/{t.total} {pct:3.0f}% {elapsed}<{eta}" + (f" {t.rate}" if t.rate else "")
            left = t.description
            bar_w = width - len(left) - len(right) - 2
            line = Text(left, style="bold")
            if bar_w >= 5:
                filled = int(round(bar_w * t.completed / max(t.total, 1)))
                line.append(" ")
                line.append("━" * filled, style="green")
                line.append("━" * (bar_w - filled), style="grey37")
                line.append(" ")
            line.append(right)
            rows.append(line)
            if t.info:
                rows.append(Text("  " + t.info, overflow="fold"))
        return Group(*rows)

    # ---- the Progress-like API ----------------------------------------------------------------------------------
    def __enter__(self):
        if self.tty:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
            self._live = None
        return False

    def add_task(self, description: str, total: int, completed: int = 0, info: str = "", rate: str = "",
                 **_: Any) -> int:
        self.tasks.append(_Task(description, int(total), int(completed), info, rate, c0=int(completed)))
        return len(self.tasks) - 1

    def update(self, task: int, completed: int | None = None, info: str | None = None, rate: str | None = None,
               **_: Any) -> None:
        t = self.tasks[task]
        if completed is not None:
            t.completed = int(completed)
        if info is not None:
            t.info = info
        if rate is not None:
            t.rate = rate
        if self._live is not None:
            self._live.refresh()
        elif not self.tty:
            for line in self.plain_lines(t):
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)


__all__ = ["ProgressDisplay", "WIDTH"]
