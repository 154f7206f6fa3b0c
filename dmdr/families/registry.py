"""``model.family`` -> :class:`~dmdr.families.base.Family`: the only place that reads the recipe's family string.

Adding a family: write ``dmdr/families/<name>.py`` with a ``Family`` subclass, add one line to :data:`FAMILIES`
(``"name": "dmdr.families.<module>:<Class>"``, imported lazily so that ``dmdr --help`` stays fast and a family's
heavy imports happen only when it is used) and the name to the ``model.family`` Literal in ``dmdr/recipes.py``.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

from dmdr.families.base import Family

FAMILIES: dict[str, str] = {
    "tiny": "dmdr.families.digits:DigitsFamily",
    "sd3": "dmdr.families.sd3:SD3Family",
    "sdxl": "dmdr.families.sdxl:SDXLFamily",
    "flux1": "dmdr.families.flux:Flux1Family",
    "flux2": "dmdr.families.flux:Flux2Family",
    "wan": "dmdr.families.wan:WanFamily",
    "zimage": "dmdr.families.zimage:ZImageFamily",
}
"""Registered families: ``model.family`` value -> ``module:Class``."""


@lru_cache(maxsize=None)
def family(name: str) -> Family:
    """The :class:`Family` registered as ``name`` (one shared, stateless instance)."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not a registered family; available: {', '.join(FAMILIES)}")
    module, _, cls = FAMILIES[name].partition(":")
    fam = getattr(importlib.import_module(module), cls)()
    if fam.name != name:
        raise RuntimeError(f"{FAMILIES[name]} has name {fam.name!r}, registered as {name!r}")
    return fam


def get_family(recipe) -> Family:
    """The family of a recipe (``recipe.model.family``)."""
    return family(recipe.model.family)


def run_family(run: str | Path) -> Family:
    """The family of a run directory's ``recipe.yaml`` (the digits family when it has no readable recipe: the
    behaviour of runs written before recipes were saved)."""
    import yaml

    from dmdr import safe_yaml

    try:
        data = safe_yaml.load((Path(run) / "recipe.yaml").read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return family("tiny")
    model = data.get("model") if isinstance(data, dict) else None
    name = str(model.get("family", "tiny")) if isinstance(model, dict) else "tiny"
    return family(name)


def build_bundle(recipe, device):
    """``get_family(recipe).build(recipe, device)`` (each family's ``build`` runs its own ``check`` first)."""
    return get_family(recipe).build(recipe, device)


__all__ = ["FAMILIES", "family", "get_family", "run_family", "build_bundle"]
