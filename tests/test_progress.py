"""The progress display stays readable in an 80-column terminal and in a non-TTY log (nothing truncated)."""
import io
import re

from rich.console import Console

from dmdr.train.progress import ProgressDisplay

INFO = "dmd 0.0123 fake_score 0.456 reward_digits_classifier -0.0871 | monitors ok"
DESC = "stage 1/2 cold_start"


def _run(tty: bool) -> str:
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=tty, color_system=None if not tty else "standard",
                  highlight=False)
    with ProgressDisplay(con) as p:
        t = p.add_task(DESC, total=600, completed=0, info="", rate="")
        for k in (20, 40):
            p.update(t, completed=k, info=INFO, rate="3.85 it/s")
    return buf.getvalue()


def test_non_tty_log_is_plain_and_fits_80_columns():
    out = _run(tty=False)
    assert "\x1b" not in out and "…" not in out
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) >= 2 and all(len(l) <= 80 for l in lines), lines
    joined = " ".join(l.strip() for l in lines)
    assert f"[{DESC}] 40/600 7%" in joined and "3.85 it/s" in joined
    for word in INFO.split():  # every loss, value and the monitor status survive
        assert word in joined


def test_terminal_view_shows_full_stage_name_and_values_at_80_columns():
    out = _run(tty=True)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert "…" not in text
    assert DESC in text and "40/600" in text and "3.85 it/s" in text
    last = text.split(DESC)[-1]  # the last frame
    for word in INFO.split():
        assert word in last
    assert all(len(l) <= 80 for l in text.splitlines())
