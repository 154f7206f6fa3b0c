"""Checkpoint files: atomic writes, keep-last-K, checksums, damaged-checkpoint fallback, no code execution on load."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from dmdr.train import checkpoint as ckpt
from dmdr.train.runtime import MetricsLog, read_metrics, truncate_metrics


def _write(root, step, value=None, keep_last=3, state=None):
    v = float(step if value is None else value)
    return ckpt.write_checkpoint(root, step, tensors={"generator": {"w": torch.full((3, 2), v)}},
                                 state=state if state is not None else {"step": torch.tensor(step), "opt": {"lr": 0.1}},
                                 recipe_yaml=f"name: r{step}\n", keep_last=keep_last)


def _names(root):
    return [d.name for d in ckpt.list_checkpoints(root)]


def _refresh_manifest(d: Path) -> None:
    """Recompute COMPLETE's checksums, as an attacker (or a careless tool) would after editing a file."""
    files = {f.name: ckpt._sha256(f) for f in sorted(d.iterdir()) if f.name != "COMPLETE"}
    (d / "COMPLETE").write_text(json.dumps({"step": int(d.name[5:12]), "sha256": files}))


def test_layout_and_round_trip(tmp_path):
    d = _write(tmp_path, 5)
    assert d.name == "step-0000005"
    assert sorted(f.name for f in d.iterdir()) == ["COMPLETE", "generator.safetensors", "recipe.yaml", "state.pt"]
    manifest = json.loads((d / "COMPLETE").read_text())
    assert manifest["step"] == 5 and set(manifest["sha256"]) == {"generator.safetensors", "recipe.yaml", "state.pt"}
    tensors, state, recipe = ckpt.read_checkpoint(d)
    assert torch.equal(tensors["generator"]["w"], torch.full((3, 2), 5.0))
    assert int(state["step"]) == 5 and state["opt"] == {"lr": 0.1} and recipe == "name: r5\n"


def test_keep_last_k_prunes_oldest(tmp_path):
    for s in range(1, 7):
        _write(tmp_path, s, keep_last=2)
    assert _names(tmp_path) == ["step-0000005", "step-0000006"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000005", "step-0000006"]


def test_incomplete_and_temporary_directories_are_ignored_then_cleaned(tmp_path):
    _write(tmp_path, 1)
    (tmp_path / "step-0000002.tmp").mkdir()            # a kill in the middle of writing step 2
    (tmp_path / "step-0000003").mkdir()                # no COMPLETE marker
    (tmp_path / "step-0000003" / "state.pt").write_bytes(b"x")
    assert _names(tmp_path) == ["step-0000001"]
    assert ckpt.load_latest_valid(tmp_path, warn=lambda m: None)[0].name == "step-0000001"
    _write(tmp_path, 4)
    assert not (tmp_path / "step-0000002.tmp").exists()


def test_rewriting_a_step_replaces_it_and_a_kill_between_the_renames_keeps_it(tmp_path):
    _write(tmp_path, 3, value=1.0)
    _write(tmp_path, 3, value=2.0)  # the end-of-stage save at the same step as a periodic one
    assert _names(tmp_path) == ["step-0000003"]
    assert float(ckpt.read_checkpoint(tmp_path / "step-0000003")[0]["generator"]["w"][0, 0]) == 2.0
    # the window inside write_checkpoint: old moved to .prev, new not yet renamed into place
    os.replace(tmp_path / "step-0000003", tmp_path / "step-0000003.prev")
    path, tensors, _, _ = ckpt.load_latest_valid(tmp_path, warn=lambda m: None)
    assert path.name == "step-0000003.prev" and float(tensors["generator"]["w"][0, 0]) == 2.0
    _write(tmp_path, 4)
    assert _names(tmp_path) == ["step-0000003.prev", "step-0000004"]


@pytest.mark.parametrize("damage", ["truncate_safetensors", "flip_a_byte", "garbage_state", "missing_file"])
def test_damaged_newest_falls_back_to_the_previous_with_a_warning(tmp_path, damage):
    _write(tmp_path, 1)
    d = _write(tmp_path, 2)
    f = d / ("state.pt" if damage == "garbage_state" else "generator.safetensors")
    if damage == "truncate_safetensors":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif damage == "flip_a_byte":  # same size, last tensor byte changed: only the checksum notices
        b = bytearray(f.read_bytes())
        b[-1] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "garbage_state":
        f.write_bytes(b"\x80\x04not a checkpoint")
    else:
        f.unlink()
    warnings = []
    path, tensors, state, _ = ckpt.load_latest_valid(tmp_path, warn=warnings.append)
    assert path.name == "step-0000001" and int(state["step"]) == 1
    assert len(warnings) == 1 and "step-0000002" in warnings[0] and "damaged" in warnings[0]


def test_truncated_safetensors_is_refused_even_with_a_matching_manifest(tmp_path):
    d = _write(tmp_path, 1)
    with open(d / "generator.safetensors", "r+b") as fh:
        fh.truncate(40)
    _refresh_manifest(d)
    with pytest.raises(Exception):
        ckpt.read_checkpoint(d)


class _Evil:
    """Unpickling this would create a file: proof that code ran during load."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_object_in_state_pt_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    _write(tmp_path / "ck", 1)
    d = _write(tmp_path / "ck", 2, state={"step": torch.tensor(2), "payload": _Evil()})
    _refresh_manifest(d)  # checksums match: only weights_only stands in the way
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_checkpoint(d)
    warnings = []
    path, *_ = ckpt.load_latest_valid(tmp_path / "ck", warn=warnings.append)
    assert path.name == "step-0000001" and "UnpicklingError" in warnings[0]
    assert not marker.exists()


def test_no_valid_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.load_latest_valid(tmp_path / "none")
    d = _write(tmp_path, 1)
    (d / "state.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no valid checkpoint in .*--force"):
        ckpt.load_latest_valid(tmp_path, warn=lambda m: None)


def test_apply_failures_fall_back_but_checkpoint_errors_are_final(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    seen = []

    def apply(path, tensors, state, recipe):
        seen.append(path.name)
        if path.name == "step-0000002":
            raise ValueError("generator checkpoint does not match the model")
    assert ckpt.load_latest_valid(tmp_path, warn=lambda m: None, apply=apply)[0].name == "step-0000001"
    assert seen == ["step-0000002", "step-0000001"]

    def refuse(*a):
        raise ckpt.CheckpointError("cannot resume: the recipe changed")
    with pytest.raises(ckpt.CheckpointError, match="cannot resume"):
        ckpt.load_latest_valid(tmp_path, warn=lambda m: None, apply=refuse)


def test_atomic_save_safetensors_leaves_no_temporary(tmp_path):
    ckpt.atomic_save_safetensors({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    log = MetricsLog(p)
    for s in range(1, 6):
        log.write({"step": s, "loss": 0.1 * s})
    with open(p, "a") as f:
        f.write('{"step": 6, "lo')  # a SIGKILL in the middle of a write
    truncate_metrics(p, 3)
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3]
    assert p.read_text().endswith("\n") and not (tmp_path / ".metrics.jsonl.tmp").exists()
    MetricsLog(p, enabled=False).write({"step": 4})
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3]
