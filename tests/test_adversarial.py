"""The adversarial cases of bench/adversarial_cases.py (issue 14), one test each.

Each case reproduces what an unkind user did (``--force`` on a source tree, a tampered checkpoint manifest, an
alias bomb, a full disk during a save, a second SIGTERM during a checkpoint, ...) and asserts the promise: exit 2
with one ``error:`` line and nothing lost, or a clean exit 0 where the run must go on. The multi-process cases
(real signals, two processes on one run) are ``slow``. ``bench/adversarial_cases.py`` runs the same functions and
writes the table of docs/reliability.md.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("adversarial_cases", ROOT / "bench" / "adversarial_cases.py")
A = importlib.util.module_from_spec(_spec)
sys.modules["adversarial_cases"] = A
_spec.loader.exec_module(A)


@pytest.fixture(scope="module")
def shared():
    return {}   # the tiny teacher and the finished smoke run, built once for the module


def _params():
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in A.CASES]


@pytest.mark.parametrize("case", _params())
def test_adversarial_case(case, tmp_path, shared):
    out = A.run_case(case, tmp_path, shared)
    assert out.ok, f"{case.title}: exit {out.code}: {out.detail}"


def test_every_case_has_a_distinct_id():
    ids = [c.id for c in A.CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
