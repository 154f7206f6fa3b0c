"""dmdr.train.startup: a signal during start-up is recorded (never raised mid-import) and acted on at safe points."""
import os
import signal

import pytest

from dmdr.train import startup


def test_signal_is_recorded_then_check_raises_and_done_only_notes():
    old = startup.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)   # would raise inside an import if the handler raised
        with pytest.raises(startup.Interrupted) as e:
            startup.check()
        assert e.value.signum == signal.SIGTERM and e.value.phase == "start-up"
        assert startup.take_pending() == signal.SIGTERM and startup.take_pending() is None
        startup.check()                        # nothing pending any more
        startup.set_phase("done")
        os.kill(os.getpid(), signal.SIGINT)    # after the run: noted, not acted on
        startup.check()
        assert startup.take_pending() is None
    finally:
        startup.restore(old)


def test_raise_phase_interrupts_at_once():
    old = startup.install()
    try:
        startup.set_phase("raise")
        with pytest.raises(startup.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    finally:
        startup.restore(old)
