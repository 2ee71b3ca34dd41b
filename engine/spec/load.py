"""Load a graph file: YAML, ``--set`` overrides, schema check; every problem with its file and line."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from engine.errors import Problem, SpecError
from engine.spec.schema import GraphSpec
from engine.spec.yaml_source import LineMap, dotted, read_yaml


@dataclass(frozen=True)
class LoadedGraph:
    """A schema-valid graph and where each of its parts came from."""

    spec: GraphSpec
    lines: LineMap
    base_dir: Path  #: relative paths in the graph (an input image) resolve against this folder


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_override(data: Any, lines: LineMap, assignment: str) -> None:
    """Apply ``dotted.key=value`` to the raw document (value parsed as a YAML scalar or flow list).

    Every part of the document the option sets or creates (``--set a.b.c=1`` creates ``a`` and ``a.b``) is
    recorded as coming from the option, so that a problem found there names the option, not a line of the
    file that has nothing to do with it.
    """
    origin = f"--set {assignment}"

    def refuse(message: str) -> SpecError:
        return SpecError([Problem(lines.file, None, origin, message)])

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise refuse("expected dotted.key=value, e.g. --set nodes.transformer.replicas=2")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise refuse(f"cannot parse the value: {exc}") from None
    if not isinstance(data, dict):
        raise refuse("the graph file is not a mapping")
    path: list[str | int] = []
    target: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        index = _index(part)
        if isinstance(target, dict):
            if part not in target:
                target[part] = {}
                lines.overrides.setdefault((*path, part), origin)
            target = target[part]
            path.append(part)
        elif isinstance(target, list) and index is not None and index < len(target):
            target = target[index]
            path.append(index)
        else:
            target = None
        if not isinstance(target, (dict, list)):
            raise refuse(f"{'.'.join(parts[:i + 1])} is not a mapping or list that can hold {key}")
    last: str | int = parts[-1]
    if isinstance(target, list):
        index = _index(parts[-1])
        if index is None or index > len(target):
            raise refuse(f"{'.'.join(map(str, path))} is a list of {len(target)}: give an index from 0 to {len(target)} "
                         f"(the last appends), got {parts[-1]!r}")
        target[index:index + 1] = [value]
        last = index
    else:
        target[last] = value
    lines.overrides[(*path, last)] = origin


def _index(part: str) -> int | None:
    """A list index: ASCII digits only (str.isdigit() also accepts "²", which int() refuses)."""
    return int(part) if part.isascii() and part.isdigit() else None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model whose field ``loc[-1]`` is (to list its valid keys)."""
    annotation: Any = GraphSpec
    for part in loc[:-1]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next((f for n, f in annotation.model_fields.items() if part in (n, f.alias)), None)
            if field is None:
                return None
            annotation = field.annotation
        else:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[-1] if args else None
        while typing.get_origin(annotation) is typing.Union or str(typing.get_origin(annotation)) == "types.UnionType":
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _message(error: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        valid = [f.alias or n for n, f in model.model_fields.items()] if model else []
        return f"unknown key{did_you_mean(str(loc[-1]), valid)}" + (f" (valid: {', '.join(valid)})" if valid else "")
    if kind == "missing":
        return "required but missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind.startswith(("literal_error", "string_pattern", "greater", "less", "int_", "float_", "bool_", "string_", "dict_", "list_", "too_", "model_type", "multiple_of", "finite_number")):
        return f"got {error.get('input')!r}; {message[0].lower()}{message[1:]}"
    return message


def problems_from_validation(exc: ValidationError, lines: LineMap, prefix: tuple[Any, ...] = ()) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if loc and loc[-1] == "[key]":  # a mapping key itself is wrong (a node name): name the key's line
            loc = loc[:-1]
        problems.append(lines.problem((*prefix, *loc), _message(error, loc)))
    return problems


def load_graph(path: str | Path, overrides: typing.Sequence[str] = ()) -> LoadedGraph:
    """Read, override and schema-check a graph file. Raises SpecError listing every problem."""
    path = Path(path)
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        got = type(data).__name__ if data is not None else "null"
        raise SpecError([Problem(str(path), lines.line(()), "", f"a graph file is a mapping with name, model, nodes and edges; got a {got}")])
    for assignment in overrides:
        apply_override(data, lines, assignment)
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc, lines)) from None
    return LoadedGraph(spec=spec, lines=lines, base_dir=path.resolve().parent)
