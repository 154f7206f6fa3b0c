"""A bounded YAML reader for recipes and run files: no duplicate keys, no alias bombs, no huge documents.

``yaml.safe_load`` accepts three things that hurt a recipe reader:

* a **duplicate key** (``steps: 10`` then ``steps: 1000`` in the same mapping): the later value wins silently;
* an **alias bomb** ("billion laughs": ``a: &a [x, x]``, ``b: &b [*a, *a]``, …): a few hundred bytes that
  expand to 2^k nodes when the document is walked — ``recipes show`` hangs and training exhausts memory;
* a **huge document** (a generated recipe of hundreds of MB).

:func:`load` refuses each with :class:`YAMLLimitError` (a ``ValueError``) naming the problem and the line:
at most ``MAX_BYTES`` characters of text, ``MAX_ALIASES`` alias references, and ``MAX_NODES`` nodes once aliases
are expanded (counted on the composed node graph, before any Python object is built).
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 1_000_000      # a recipe is a few KB
MAX_ALIASES = 100          # anchors are fine (&defaults / <<: *defaults), a few dozen uses at most
MAX_NODES = 100_000        # nodes after expanding aliases


class YAMLLimitError(yaml.YAMLError, ValueError):
    """The document breaks one of the limits above, or repeats a key (one-line message)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts alias uses and refuses duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YAMLLimitError(f"more than {MAX_ALIASES} alias references (*name) at line {mark.line + 1}; "
                                     f"write the values out instead")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:
                        continue
                    if key in seen:
                        raise YAMLLimitError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at "
                                             f"line {seen[key]}); keep one of them")
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _count_nodes(node: Node) -> int:
    """Nodes of the document with every alias expanded (memoised per node: linear in the graph size)."""
    memo: dict[int, int] = {}

    def count(n: Node, depth: int) -> int:
        if id(n) in memo:
            return memo[id(n)]
        if depth > 1000:
            raise YAMLLimitError("nesting deeper than 1000 levels")
        if isinstance(n, SequenceNode):
            total = 1 + sum(count(c, depth + 1) for c in n.value)
        elif isinstance(n, MappingNode):
            total = 1 + sum(count(k, depth + 1) + count(v, depth + 1) for k, v in n.value)
        else:
            total = 1
        memo[id(n)] = total
        if total > MAX_NODES:
            raise YAMLLimitError(f"the document expands to more than {MAX_NODES:,} nodes (an alias bomb?); "
                                 f"write the values out instead of nesting aliases")
        return total

    return count(node, 0)


def load(text: str) -> Any:
    """``yaml.safe_load`` with the limits of this module. Raises ``yaml.YAMLError`` (syntax) or
    :class:`YAMLLimitError`."""
    if len(text) > MAX_BYTES:
        raise YAMLLimitError(f"the document is {len(text):,} characters; the limit is {MAX_BYTES:,}")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
