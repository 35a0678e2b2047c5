"""YAML text to plain data, with bounds, for the config file.

PyYAML's `safe_load` is safe from code execution but not from its input's size: an alias bomb
("billion laughs": nine anchors each listing the previous one nine times) is a few hundred bytes
that compose in a millisecond and expand into hundreds of millions of values in whatever walks
the result (our `${VAR}` substitution, pydantic), for minutes and gigabytes; a deeply nested
document ends in a RecursionError from the recursive composer; `&a [*a]` builds a cycle. So the
composer here counts while it composes, before anything is constructed or walked:

- aliases: at most `MAX_ALIASES` (a config uses a few, e.g. one backoff block shared by three
  platforms; a bomb needs dozens);
- nesting: at most `MAX_DEPTH` levels (the deepest real key is 4 levels down);
- values after expanding every alias: at most `MAX_VALUES`, so the few aliases allowed cannot
  multiply a large list either; an alias to a node that contains it (a cycle) is refused.
The caller bounds the text itself (`MAX_BYTES`). A refusal names the line and column and the
limit, never the text found there.
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 1 << 20
MAX_DEPTH = 20
MAX_ALIASES = 16
MAX_VALUES = 50_000


class Refused(yaml.YAMLError):
    """The document exceeds a bound. `problem` is safe to show; `mark` is where it was found."""

    def __init__(self, problem: str, mark) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses documents beyond the bounds in the module docstring."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._values = 0                  # values composed so far, aliases expanded
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded

    def compose_node(self, parent, index) -> Node:
        mark = self.peek_event().start_mark
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise Refused(f"more than {MAX_ALIASES} aliases (a config needs a few)", mark)
            # the anchored node (or PyYAML's error for an undefined alias)
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise Refused("an alias refers to a node that contains it", mark)
            self._values += size
        else:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels", mark)
            before = self._values
            node = super().compose_node(parent, index)
            self._depth -= 1
            self._values += 1
            self._sizes[id(node)] = self._values - before
        if self._values > MAX_VALUES:
            raise Refused(f"more than {MAX_VALUES} values with aliases expanded", mark)
        return node


def load(text: str) -> tuple[Any, Node | None]:
    """The document's data and its composed node (for the line and column of a key), or raises
    `Refused` / a `yaml.YAMLError`."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def child(node: Node | None, part: Any) -> tuple[Node | None, Any]:
    """One step down a location (a mapping key or a sequence index): the child node and the
    start mark of its key (of the item, in a sequence), or (None, None) when it is not there."""
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node.value, str) and key_node.value == str(part):
                return value_node, key_node.start_mark
    elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part], node.value[part].start_mark
    return None, None
