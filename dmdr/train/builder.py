"""Recipe -> bundle, kept as an import path for code written before the family seam (issue 12).

The bundle and its builder live in :mod:`dmdr.families`: :class:`~dmdr.families.base.Bundle` (``ModelBundle`` here)
and :func:`~dmdr.families.registry.build_bundle` (``model.family`` -> :class:`~dmdr.families.base.Family` -> bundle).
"""
from __future__ import annotations

from dmdr.families.base import Bundle as ModelBundle
from dmdr.families.registry import build_bundle

__all__ = ["ModelBundle", "build_bundle"]
