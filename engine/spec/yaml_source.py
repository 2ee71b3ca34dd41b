"""Reading a graph file: YAML to plain data plus the line of every key and item.

PyYAML's ``safe_load`` forgets where things were and silently keeps the last of two equal keys. Composing
the node tree instead keeps each node's start mark, so every later error can name ``file:line``; duplicate
keys are reported instead of overwritten.
"""

from __future__ import annotations

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


#: More values than any graph needs; aliases nested in aliases (``[*a, *a, ...]``) could otherwise expand a
#: few lines into millions of values and hang the validator.
MAX_VALUES = 10_000


class _TooLarge(Exception):
    """The document expands to more than MAX_VALUES values."""


def _to_data(node: yaml.Node, path: Path_, lines: LineMap, problems: list[Problem], budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(node.start_mark.line + 1)
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


def parse_yaml(text: str, file: str) -> tuple[Any, LineMap]:
    """Parse one YAML document. Raises SpecError (with the line) for syntax errors and duplicate keys."""
    lines = LineMap(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
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
    except _TooLarge as exc:
        raise SpecError([Problem(file, exc.args[0], "", f"the document expands to more than {MAX_VALUES} values "
                                                        "(aliases repeated inside aliases?); a graph needs a few hundred")]) from None
    except yaml.YAMLError as exc:  # an unknown tag, a bad timestamp...
        mark = getattr(exc, "problem_mark", None)
        raise SpecError([Problem(file, mark.line + 1 if mark else None, "", f"invalid YAML value: {getattr(exc, 'problem', None) or exc}")]) from None
    except RecursionError:
        raise SpecError([Problem(file, None, "", "invalid YAML: a recursive alias (&anchor referring to itself)")]) from None
    if problems:
        raise SpecError(problems)
    return data, lines


def read_yaml(path: Path) -> tuple[Any, LineMap]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([Problem(str(path), None, "", "no such graph file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem(str(path), None, "", f"cannot read the graph file: {exc}")]) from None
    return parse_yaml(text, str(path))
