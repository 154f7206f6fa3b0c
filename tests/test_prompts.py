"""Prompt files and the resumable prompt sampler."""
from __future__ import annotations

import json

import pytest
import torch

from dmdr.data.prompts import PromptSampler, load_prompts


def test_plain_text_keeps_every_non_empty_line_hash_included(tmp_path):
    # the official TextPromptDataset keeps every line: "#" is a legal prompt character (e.g. "#1 fan, poster")
    f = tmp_path / "p.txt"
    f.write_text("#1 fan poster\n a red fox \n\n#hashtag sunset\nA blue car\n   \n", encoding="utf-8")
    assert load_prompts(f) == ["#1 fan poster", "a red fox", "#hashtag sunset", "A blue car"]


def test_jsonl_reads_prompt_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a cat", "id": 1}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n")
    assert load_prompts(f) == ["a cat", "a dog"]
    g = tmp_path / "c.jsonl"
    g.write_text(json.dumps({"caption": "x"}) + "\n")
    assert load_prompts(g, key="caption") == ["x"]


@pytest.mark.parametrize("content,suffix,match", [
    ("", ".txt", "holds no prompts"),
    ("\n   \n\n", ".txt", "holds no prompts"),
    ('{"prompt": "ok"}\nnot json\n', ".jsonl", "line 2: invalid JSON"),
    ('{"text": "no prompt key"}\n', ".jsonl", "line 1: expected an object with a string 'prompt'"),
])
def test_bad_files_raise_one_line_value_error_naming_the_file(tmp_path, content, suffix, match):
    f = tmp_path / f"prompts{suffix}"
    f.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_prompts(f)
    assert str(f) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_files_raise_value_error_naming_the_file(tmp_path):
    for bad in (tmp_path / "missing.txt", tmp_path):  # missing file, a directory
        with pytest.raises(ValueError, match="cannot read prompt file") as info:
            load_prompts(bad)
        assert str(bad) in str(info.value)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bin.txt"):
        load_prompts(binary)


def test_sampler_sees_every_prompt_once_per_epoch_and_is_seeded():
    prompts = [f"p{i}" for i in range(7)]
    s = PromptSampler(prompts, batch_size=3, seed=1)
    first = [p for _ in range(7) for p in s.next_batch()]  # 21 prompts = 3 epochs
    for e in range(3):
        assert sorted(first[7 * e:7 * e + 7]) == sorted(prompts)
    assert first[:7] != first[7:14]  # a fresh permutation per epoch
    again = PromptSampler(prompts, batch_size=3, seed=1)
    assert [p for _ in range(7) for p in again.next_batch()] == first
    other = PromptSampler(prompts, batch_size=3, seed=2)
    assert [p for _ in range(7) for p in other.next_batch()] != first


def test_sampler_does_not_touch_global_rng():
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    s = PromptSampler(["a", "b", "c"], batch_size=2, seed=5)
    for _ in range(4):
        s.next_batch()
    assert torch.equal(torch.rand(3), ref)


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 5])
def test_state_dict_resume_gives_the_same_next_batches(consumed):
    prompts = [f"p{i}" for i in range(5)]
    s = PromptSampler(prompts, batch_size=2, seed=3)
    for _ in range(consumed):
        s.next_batch()
    state = s.state_dict()
    expected = [s.next_batch() for _ in range(6)]
    resumed = PromptSampler(prompts, batch_size=2, seed=99)  # seed comes from the state
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == expected


def test_state_for_other_prompts_is_refused():
    state = PromptSampler(["a", "b"], batch_size=1).state_dict()
    with pytest.raises(ValueError, match="same prompts file"):
        PromptSampler(["a", "b", "c"], batch_size=1).load_state_dict(state)


def test_negative_prompt_and_unshuffled_order_and_path_input(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\nthree\n")
    s = PromptSampler(f, batch_size=2, shuffle=False, negative_prompt="blurry")
    assert s.next_batch() == ["one", "two"] and s.next_batch() == ["three", "one"]
    assert s.negative() == ["blurry", "blurry"] and s.negative(3) == ["blurry"] * 3
    assert PromptSampler(["x"], batch_size=1).negative(1) == [""]
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(["x"], batch_size=0)
