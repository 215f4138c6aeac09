"""YAML for configs and recipes: ``yaml.safe_load`` with bounds, and errors as one line naming the source.

PyYAML shares an aliased node instead of copying it, so a "billion laughs" document (nine levels of nine
aliases each) loads as a few hundred objects that *expand* to 10^9: anything that walks, copies, merges or
prints the config then runs out of memory. :func:`load_yaml` composes the node graph (linear in the text),
counts the nodes the document expands to and refuses it past a bound, before constructing anything.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_CHARS = 1_000_000  # a recipe or run config is a few kB
MAX_ALIAS_NODES = 10_000  # nodes that aliases add when expanded (a shared block reused a few times is fine)


def load_yaml(
    text: str, source: str, *, max_chars: int = MAX_CHARS, max_alias_nodes: int = MAX_ALIAS_NODES
) -> Any:
    """The single YAML document ``text`` as ``yaml.safe_load`` reads it (None for an empty one).

    Args:
        text: The document.
        source: Where it comes from (a file path), named in every error.
        max_chars: Longest document accepted.
        max_alias_nodes: Most nodes that aliases (``*name``) may add to the document when expanded.

    Raises:
        ValueError: A document longer than ``max_chars``, aliases that expand past ``max_alias_nodes`` or
            refer to themselves, a key given twice in one mapping, or a YAML error
            (``source:line:column: what is wrong``).
    """
    if len(text) > max_chars:
        raise ValueError(
            f"{source}: {len(text):,} characters, more than the {max_chars:,} a YAML config may hold; "
            "is it the right file?"
        )
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        composed, expanded = _node_counts(node, source)
        if expanded - composed > max_alias_nodes:
            raise ValueError(
                f"{source}: its aliases (*name) expand {composed:,} YAML nodes to {expanded:,}, more than "
                f"the {max_alias_nodes:,} extra nodes allowed; write the repeated values out, or reuse fewer."
            )
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ValueError(_one_line(error, source, text)) from None
    except RecursionError:
        raise ValueError(f"{source}: the YAML is nested too deeply to read; flatten it.") from None
    finally:
        if loader is not None:
            loader.dispose()


def _node_counts(root: yaml.Node, source: str) -> tuple[int, int]:
    """``(distinct nodes, nodes once every alias is expanded)`` of a composed document."""
    expanded: dict[int, int] = {}
    on_path: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in expanded:
            return expanded[key]
        if key in on_path:
            mark = node.start_mark
            raise ValueError(
                f"{source}:{mark.line + 1}:{mark.column + 1}: an alias refers to the node that contains it "
                "(a recursive YAML structure); a config cannot hold one."
            )
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(count(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            _refuse_repeated_keys(node, source)
            total += sum(count(k) + count(v) for k, v in node.value)
        on_path.discard(key)
        expanded[key] = total
        return total

    total = count(root)
    return len(expanded), total


def _refuse_repeated_keys(node: yaml.MappingNode, source: str) -> None:
    """A mapping that names a key twice (PyYAML keeps the last value silently: a lost setting)."""
    seen: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if (key.tag, key.value) in seen:
            first, mark = seen[(key.tag, key.value)].start_mark, key.start_mark
            raise ValueError(
                f"{source}:{mark.line + 1}:{mark.column + 1}: key {key.value!r} is given twice in one "
                f"mapping (first on line {first.line + 1}); YAML would keep only the last value. Remove one."
            )
        seen[(key.tag, key.value)] = key


def _one_line(error: yaml.YAMLError, source: str, text: str) -> str:
    """``source:line:column: problem (context)`` for a PyYAML error."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        context = error.context or ""
        if context and error.context_mark and error.context_mark is not mark:
            context += f" at line {error.context_mark.line + 1}"
        detail = f" ({context})" if context else ""
        return f"{where}: {error.problem or 'invalid YAML'}{detail}; fix the YAML there."
    position = getattr(error, "position", None)
    if isinstance(position, int):  # ReaderError: a character YAML does not allow
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = getattr(error, "character", None)
        what = f"character {character!r}" if isinstance(character, str) else f"character #x{character:04x}"
        return f"{source}:{line}:{column}: {what} is not allowed in YAML ({error.reason}); remove it."
    return f"{source}: {' '.join(str(error).split())}"
