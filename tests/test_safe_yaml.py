"""dmdr.safe_yaml: ordinary YAML reads as yaml.safe_load does; duplicate keys, alias bombs, huge documents don't."""
import time

import pytest
import yaml

from dmdr import safe_yaml


def test_ordinary_documents_read_like_safe_load():
    text = ("base: &b {lr: 1.0e-4, steps: 3}\nstage: {<<: *b, steps: 5}\nlist: [1, 2.5, null, true, 'x']\n"
            "again: *b\n")
    assert safe_yaml.load(text) == yaml.safe_load(text)
    assert safe_yaml.load("") is None


@pytest.mark.parametrize("text,needle", [
    ("a: 1\nb: 2\na: 3\n", "duplicate key 'a' at line 3 (first at line 1)"),
    ("x:\n  y: 1\n  y: 2\n", "duplicate key 'y'"),
    ("".join(f"k{i}: *a\n" if i else "k0: &a 1\n" for i in range(150)), "more than 100 alias references"),
])
def test_refused_documents(text, needle):
    with pytest.raises(safe_yaml.YAMLLimitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        safe_yaml.load(text)


def test_alias_bomb_is_refused_fast():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij"))
    t0 = time.time()
    with pytest.raises(safe_yaml.YAMLLimitError, match="alias bomb"):
        safe_yaml.load(bomb)
    assert time.time() - t0 < 5


def test_huge_document_is_refused():
    with pytest.raises(safe_yaml.YAMLLimitError, match="characters"):
        safe_yaml.load("a: " + "x" * (safe_yaml.MAX_BYTES + 1))


def test_a_bool_for_a_number_and_non_finite_floats_are_refused():
    from dmdr.recipes import RecipeError, load_recipe
    from pathlib import Path

    digits = Path(__file__).resolve().parent.parent / "recipes" / "digits.yaml"
    for over, needle in [("stages.0.steps=true", "expected an integer"), ("optim.lr_gen=true", "expected a number"),
                         ("optim.lr_critic=.inf", "finite"), ("dmd.cfg=.nan", "finite"), ("name=a/b", "name")]:
        with pytest.raises(RecipeError, match=needle):
            load_recipe(digits, [over])
