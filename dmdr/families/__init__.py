"""Model families behind one interface (:class:`~dmdr.families.base.Family`); see docs/architecture.md."""
from dmdr.families.base import Bundle, Conditions, Family, SampleInputs
from dmdr.families.registry import build_bundle, family, get_family, run_family

__all__ = ["Bundle", "Conditions", "Family", "SampleInputs", "build_bundle", "family", "get_family", "run_family"]
