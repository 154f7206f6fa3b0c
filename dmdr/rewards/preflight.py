"""Check a recipe's rewards before anything trains: every stage, at start and in ``dmdr recipes validate``.

A reward problem used to surface only when its stage began (building the reward), i.e. after stage 1 had
trained for hours. :func:`check_recipe_rewards` finds, without building any model:

* an unknown reward name (the message lists the registered ones);
* keyword arguments the reward's factory does not take (``kwargs: {mdoe: prob}``), checked against the
  factory's signature (``inspect.signature(...).bind``), with the ``device`` the trainer adds;
* a ``plugin`` reward whose ``target`` cannot be imported or is not a callable (:func:`resolve_target`).

Each is a one-line :class:`RewardConfigError` naming the recipe path of the term (``stages.1.rewards.0``).
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator

from dmdr.errors import UserError


class RewardConfigError(UserError):
    """A reward term of a recipe cannot be built (one line, naming its recipe path)."""


def reward_terms(recipe) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(recipe path, name, kwargs) of every reward term of ``recipe`` (dmdr stages, grpo ``rl.rewards``)."""
    for i, st in enumerate(getattr(recipe, "stages", None) or []):
        for j, t in enumerate(st.rewards):
            yield f"stages.{i}.rewards.{j}", t.name, dict(t.kwargs)
    rl = getattr(recipe, "rl", None)
    for j, t in enumerate(rl.rewards if rl is not None else []):
        yield f"rl.rewards.{j}", t.name, dict(t.kwargs)


def check_reward(where: str, name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`RewardConfigError` if ``build_reward(name, device=..., **kwargs)`` cannot be called."""
    from dmdr.rewards.base import _REGISTRY, available_rewards

    names = available_rewards()
    if name not in _REGISTRY:
        raise RewardConfigError(f"{where}: unknown reward {name!r}; registered rewards: {', '.join(names)}")
    factory = _REGISTRY[name]
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**{"device": "cpu", **kwargs})
    except TypeError as e:
        known = [p for p in sig.parameters if p != "device" and sig.parameters[p].kind not in
                 (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        unknown = sorted(set(kwargs) - set(sig.parameters))
        what = f"unknown kwargs {', '.join(unknown)}" if unknown else str(e)
        raise RewardConfigError(f"{where}: reward {name!r}: {what}; it takes: {', '.join(known) or 'no kwargs'}") \
            from None
    if name == "plugin":
        from dmdr.rewards.plugin import resolve_target

        try:
            resolve_target(kwargs.get("target"))
        except UserError as e:
            raise RewardConfigError(f"{where}: {e}") from None


def check_recipe_rewards(recipe) -> int:
    """Check every reward term of ``recipe`` (all stages). Returns how many were checked."""
    n = 0
    for where, name, kwargs in reward_terms(recipe):
        check_reward(where, name, kwargs)
        n += 1
    return n
