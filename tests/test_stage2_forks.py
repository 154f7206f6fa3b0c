"""bench/stage2_forks.py: a fork of a run at the end of its stage 1, continued with --resume, is bitwise the run that
never stopped (so its ``default`` variant reproduces the recipe), and a variant's override really changes stage 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow

TINY = ["--set", "stages.0.steps=6", "--set", "logging.checkpoint_every=3", "--set", "monitors.every=0",
        "--set", "logging.sample_every=0", "--set", "logging.progress=false", "--set", "runtime.threads=1",
        "--set", "stages.0.batch_size=8", "--set", "stages.1.batch_size=8", "--set", "runtime.device=cpu"]


def _student(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


def test_fork_equals_the_uninterrupted_run(tmp_path):
    import stage2_forks as sf

    straight, base = tmp_path / "straight", tmp_path / "b1-0"
    sf._call(["dmdr", "train", "recipes/digits.yaml", "--out", str(straight), "--set", "stages.1.steps=4", *TINY],
             tmp_path / "straight.log")
    sf._call(["dmdr", "train", "recipes/digits.yaml", "--out", str(base), "--set", "stages.1.steps=1", *TINY],
             tmp_path / "base.log")
    assert sf.stage1_end(base) == 6 and (sf.stage1_checkpoint(base) / "COMPLETE").exists()
    same = tmp_path / "default"
    sf.fork(base, same, [], stage2_steps=4)
    a, b = _student(straight), _student(same)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (same / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert steps == sorted(set(steps)) and steps[-1] == 10   # the base's step-7 line did not survive the fork
    other = tmp_path / "no_reward"
    sf.fork(base, other, sf.VARIANTS["no_reward"], stage2_steps=4)
    c = _student(other)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    last = [json.loads(l) for l in (other / "metrics.jsonl").read_text().splitlines() if l.strip()][-1]
    assert last["step"] == 10 and not any(k.startswith("reward_") for k in last)
