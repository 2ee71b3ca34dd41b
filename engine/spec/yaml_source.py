"""Reading a graph file: YAML to plain data plus the line of every key and item.

PyYAML's ``safe_load`` forgets where things were and silently keeps the last of two equal keys. Composing
the node tree instead keeps each node's start mark, so every later error can name ``file:line``; duplicate
keys are reported instead of overwritten.

A graph is a few KiB nested five levels deep. Larger, deeper or longer documents are refused before they
cost time: the file's size before it is read, its depth and node count while it is composed (PyYAML's
composer recurses once per level, so a file of 20,000 nested lists would otherwise end in a RecursionError),
and the values aliases expand to while it is converted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from engine.errors import Problem, SpecError

Path_ = tuple[str | int, ...]


@dataclass
class LineMap:
    """Line numbers (1-based) of every mapping key and sequence item, by their path in the document."""

    file: str
    lines: dict[Path_, int] = field(default_factory=dict)
    #: Paths set on the command line (``--set``), with the option that set them.
    overrides: dict[Path_, str] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """Line of ``path``, or of its nearest ancestor that has one (a missing key: its parent's line)."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def problem(self, path: Path_, message: str) -> Problem:
        path = tuple(path)
        for depth in range(len(path), 0, -1):
            option = self.overrides.get(path[:depth])
            if option is not None:
                return Problem(f"{self.file} ({option})", None, dotted(path), message)
        # A problem with a whole part (a request) that an option changed inside: the file's line, and the option.
        inside = [option for at, option in self.overrides.items() if len(at) > len(path) and at[:len(path)] == path]
        if inside:
            message += f" (after {', '.join(inside)})"
        return Problem(self.file, self.line(path), dotted(path), message)


def dotted(path: Path_) -> str:
    """``("nodes", "encoder", "place", "device")`` -> ``nodes.encoder.place.device``; items as ``edges[1]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


#: Largest graph file read (1 MiB); the shipped graphs are under 2 KiB.
MAX_FILE_BYTES = 1 << 20
#: Deepest nesting of mappings and lists; a graph nests five levels (``nodes.encoder.place.device``).
MAX_DEPTH = 64
#: More values than any graph needs, in the file and once aliases are expanded: aliases nested in aliases
#: (``[*a, *a, ...]``) could otherwise expand a few lines into millions of values and hang the validator.
MAX_VALUES = 10_000


class _Refused(Exception):
    """The document is nested too deeply or holds or expands to too many values; ``args``: (line, message)."""


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that stops composing at the first node past MAX_DEPTH or MAX_VALUES, before the
    composer's recursion goes deeper or the rest of a long file is parsed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        self._nodes += 1
        line = self.peek_event().start_mark.line + 1
        if self._depth > MAX_DEPTH:
            raise _Refused(line, f"the document is nested deeper than {MAX_DEPTH} levels; a graph nests about 5")
        if self._nodes > MAX_VALUES:
            raise _Refused(line, f"the document holds more than {MAX_VALUES} keys and values; a graph needs a few hundred")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _to_data(node: yaml.Node, path: Path_, lines: LineMap, problems: list[Problem], budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Refused(node.start_mark.line + 1, f"the document expands to more than {MAX_VALUES} values "
                                                 "(aliases repeated inside aliases?); a graph needs a few hundred")
    lines.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _construct(key_node, path, lines, problems)
            if key is _INVALID:
                continue
            if not isinstance(key, str):
                problems.append(Problem(lines.file, key_node.start_mark.line + 1, dotted(path), f"keys must be text, got {key!r}"))
                continue
            child = (*path, key)
            if key in result:
                first = lines.lines[child]
                problems.append(Problem(lines.file, key_node.start_mark.line + 1, dotted(child), f"duplicate key (first given on line {first})"))
                continue
            lines.lines[child] = key_node.start_mark.line + 1
            result[key] = _to_data(value_node, child, lines, problems, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(item, (*path, i), lines, problems, budget) for i, item in enumerate(node.value)]
    value = _construct(node, path, lines, problems)
    return None if value is _INVALID else value


#: What :func:`_construct` returns for a value it could not build (a problem has been recorded).
_INVALID = object()


def _construct(node: yaml.Node, path: Path_, lines: LineMap, problems: list[Problem]) -> Any:
    """The Python value of a scalar (or of a complex mapping key); a tagged value that cannot be built
    (``!!int two``, ``!!timestamp soon``) is recorded as a problem at its line."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        return node.value
    try:
        # a fresh safe constructor per value: what yaml.safe_load would build, without re-parsing text
        return SafeConstructor().construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, KeyError, AttributeError, TypeError) as exc:
        # PyYAML's constructors raise plain ValueError/KeyError/AttributeError for ill-formed tagged scalars.
        tag = node.tag.rsplit(":", 1)[-1]
        reason = getattr(exc, "problem", None) or f"cannot read {getattr(node, 'value', '')!r} as {tag}"
        problems.append(Problem(lines.file, node.start_mark.line + 1, dotted(path), f"invalid YAML value: {reason}"))
        return _INVALID


def _refusal(exc: _Refused, file: str) -> SpecError:
    line, message = exc.args
    return SpecError([Problem(file, line, "", message)])


def parse_yaml(text: str, file: str) -> tuple[Any, LineMap]:
    """Parse one YAML document. Raises SpecError (with the line) for syntax errors and duplicate keys."""
    lines = LineMap(file)
    try:
        root = yaml.compose(text, Loader=_BoundedLoader)
    except _Refused as exc:
        raise _refusal(exc, file) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:  # where the unclosed bracket or quote was opened
            reason += f" ({context} that starts on line {context_mark.line + 1})"
        raise SpecError([Problem(file, mark.line + 1 if mark else None, "", f"invalid YAML: {reason}")]) from None
    if root is None:
        raise SpecError([Problem(file, None, "", "the file is empty; a graph needs name, model, nodes and edges")])
    problems: list[Problem] = []
    try:
        data = _to_data(root, (), lines, problems, [MAX_VALUES])
    except _Refused as exc:
        raise _refusal(exc, file) from None
    except yaml.YAMLError as exc:  # an unknown tag, a bad timestamp...
        mark = getattr(exc, "problem_mark", None)
        raise SpecError([Problem(file, mark.line + 1 if mark else None, "", f"invalid YAML value: {getattr(exc, 'problem', None) or exc}")]) from None
    except RecursionError:
        raise SpecError([Problem(file, None, "", "invalid YAML: a recursive alias (&anchor referring to itself)")]) from None
    if problems:
        raise SpecError(problems)
    return data, lines


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def read_yaml(path: Path) -> tuple[Any, LineMap]:
    """Read and parse a graph file of at most MAX_FILE_BYTES (checked before reading, and while reading
    for files whose size the system does not know, such as a pipe)."""
    def refuse(message: str) -> SpecError:
        return SpecError([Problem(str(path), None, "", message)])

    limit = f"a graph file is at most {_mib(MAX_FILE_BYTES)} ({MAX_FILE_BYTES} bytes)"
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise refuse(f"the file is {_mib(size)} ({size} bytes); {limit}")
            raw = stream.read(MAX_FILE_BYTES + 1)
        text = raw.decode()
    except FileNotFoundError:
        raise refuse("no such graph file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise refuse(f"cannot read the graph file: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise refuse(f"the file is longer than {MAX_FILE_BYTES} bytes; {limit}")
    return parse_yaml(text, str(path))
