"""Reading a configuration file's YAML safely, remembering where each key was written.

``load_yaml`` composes the document with PyYAML's safe loader and records the line
of every mapping key and sequence item under its key path (``routes[2].reconcile.probe.url``,
the paths ``key_paths.Problems`` reports), so a problem can be shown as ``FILE:LINE``.
It also reports what PyYAML would otherwise let pass or crash on: a key written twice
in one mapping (YAML forbids it; PyYAML keeps the last silently), recursive aliases,
and aliases that expand to more than ``MAX_NODES`` nodes (a "billion laughs" document).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: Nodes a document may expand to once its aliases are followed; a configuration has a few hundred.
MAX_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """The file is not a YAML document this reader accepts; ``line`` is 1-based, if known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.message = message
        self.line = line
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class SourceMap:
    """Where each key path of one file was written: ``routes[0].retention`` -> line 7."""

    name: str
    lines: Mapping[str, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int | None:
        """The line of exactly this key path, or ``None`` when the file does not set it."""
        return self.lines.get(path)

    def nearest_line(self, path: str) -> int | None:
        """The line of ``path``, else of its closest enclosing key or item that the file has."""
        current: str | None = path
        while current is not None:
            if current in self.lines:
                return self.lines[current]
            current = parent_path(current)
        return None

    def locate(self, problem: str) -> int | None:
        """The line a ``"key.path: message"`` problem belongs to (``(top level)``: the document's)."""
        if problem.startswith("(top level)"):
            return self.lines.get("")
        best: str | None = None
        start = 0
        while (cut := problem.find(": ", start)) != -1:
            if problem[:cut] in self.lines:
                best = problem[:cut]  # the longest prefix that is a key path: keys may contain ": "
            start = cut + 1
        if best is not None:
            return self.lines[best]
        return self.nearest_line(problem.split(": ", 1)[0])


def parent_path(path: str) -> str | None:
    """``routes[0].probe`` -> ``routes[0]`` -> ``routes`` -> ``""`` (the document) -> ``None``."""
    if not path:
        return None
    if path.endswith("]") and (bracket := path.rfind("[")) > 0:
        return path[:bracket]
    dot = path.rfind(".")
    return path[:dot] if dot > 0 else ""


@dataclass(frozen=True, slots=True)
class Document:
    data: Any  # None for an empty document
    source: SourceMap
    #: ``(key path, line, message)`` for what YAML forbids but PyYAML loads: duplicate keys.
    problems: tuple[tuple[str, int, str], ...] = ()


class _Loader(yaml.SafeLoader):
    """The safe loader, named after the file so its own messages say which."""


def load_yaml(text: str, name: str) -> Document:
    """The document in ``text`` (read from the file ``name``); raises ``YamlError``."""
    try:
        loader = _Loader(text)  # checks that every character may appear in YAML
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise YamlError(f"not valid YAML: {_reader_message(exc)}", line) from None
    loader.name = name
    try:
        node = loader.get_single_node()
        walker = _Walker(loader)
        if node is not None:
            _check_size(node)
            walker.lines[""] = node.start_mark.line + 1
            walker.walk(node, "", weak=False)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise YamlError(*_marked_message(exc)) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise YamlError(f"not valid YAML: {_reader_message(exc)}", line) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise YamlError("not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return Document(data, SourceMap(name, walker.lines), tuple(walker.problems))


def _marked_message(exc: yaml.MarkedYAMLError) -> tuple[str, int | None]:
    """PyYAML's "context, problem" without its ``in "<unicode string>"`` lines: the line is ours to show."""
    mark = exc.problem_mark or exc.context_mark
    context = ""
    if exc.context and exc.problem:
        context_mark = exc.context_mark
        started = context_mark is not None and (mark is None or context_mark.line != mark.line)
        context = f"{exc.context} at line {context_mark.line + 1}: " if started and context_mark else f"{exc.context}: "
    message = f"not valid YAML: {context}{exc.problem or exc.context or 'unreadable'}"
    if mark is not None:
        message += f" (column {mark.column + 1})"
    return message, (mark.line + 1 if mark is not None else None)


def _reader_message(exc: yaml.reader.ReaderError) -> str:
    return f"unacceptable character #x{exc.character:04x}: {exc.reason}"


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _check_size(root: Node) -> None:
    """Refuse recursive aliases and documents whose aliases expand beyond ``MAX_NODES``.
    Each node is counted once (memoized), so this takes time linear in the text."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    # An explicit stack: a deeply nested document must not exhaust Python's.
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            if total > MAX_NODES:
                raise YamlError(
                    f"not valid YAML for a configuration: its aliases expand to more than {MAX_NODES} nodes",
                    node.start_mark.line + 1,
                )
            sizes[key] = total
            open_nodes.discard(key)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise YamlError("not valid YAML for a configuration: an alias refers to itself", node.start_mark.line + 1)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _key_text(loader: _Loader, node: Node) -> str:
    """The key as ``key_paths.Problems`` names it: ``str`` of the loaded key."""
    if isinstance(node, ScalarNode):
        try:
            return str(loader.construct_object(node))
        except yaml.YAMLError:
            return str(node.value)
    return "?"


class _Walker:
    """Records the line of every key and item; reports each mapping's duplicate keys once,
    however many aliases refer to it."""

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.lines: dict[str, int] = {}
        self.problems: list[tuple[str, int, str]] = []
        self._checked: set[int] = set()

    def walk(self, node: Node, path: str, *, weak: bool) -> None:
        """``weak``: under a merge key (``<<: *defaults``), where the mapping's own keys win."""
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                child = f"{path}[{index}]"
                self.record(child, item.start_mark.line + 1, weak=weak)
                self.walk(item, child, weak=weak)
            return
        if not isinstance(node, MappingNode):
            return
        check = id(node) not in self._checked
        self._checked.add(id(node))
        seen: dict[str, int] = {}
        merged: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.append(value_node)
                continue
            key = _key_text(self.loader, key_node)
            child = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen and check:
                message = f"duplicate key (also set at line {seen[key]}); YAML keys must be unique"
                self.problems.append((child, line, message))
            seen[key] = line
            self.record(child, line, weak=weak)  # the last one is the one PyYAML keeps
            self.walk(value_node, child, weak=weak)
        for value_node in merged:
            for source in value_node.value if isinstance(value_node, SequenceNode) else [value_node]:
                self.walk(source, path, weak=True)

    def record(self, path: str, line: int, *, weak: bool) -> None:
        if weak:
            self.lines.setdefault(path, line)
        else:
            self.lines[path] = line
