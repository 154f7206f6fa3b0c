"""dmdr.models.weights: strict state-dict matching and in-place copy."""
import torch

from dmdr.models.weights import copy_state, state_mismatch


def test_state_mismatch_names_missing_unexpected_and_shape():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    sd = {"a": torch.ones(2), "b": torch.ones(4), "z": torch.ones(1)}
    assert state_mismatch(own, sd) == (["c"], ["z"], ["b"])
    assert state_mismatch(own, sd, require_all=False) == ([], ["z"], ["b"])
    assert state_mismatch(own, {k: v.clone() for k, v in own.items()}) == ([], [], [])


def test_copy_state_copies_in_place_and_keeps_storage():
    t = torch.zeros(3, dtype=torch.float64)
    own = {"w": t}
    copy_state(own, {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)})
    assert own["w"] is t and t.tolist() == [1.0, 2.0, 3.0]
