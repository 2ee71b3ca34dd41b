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
    """Apply ``dotted.key=value`` to the raw document (value parsed as a YAML scalar or flow list)."""
    origin = f"--set {assignment}"
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise SpecError([Problem(lines.file, None, origin, "expected dotted.key=value, e.g. --set nodes.transformer.replicas=2")])
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise SpecError([Problem(lines.file, None, origin, f"cannot parse the value: {exc}")]) from None
    # list indices are ASCII digits only: str.isdigit() also accepts "²", which int() refuses
    parts: list[str | int] = [int(p) if p.isascii() and p.isdigit() else p for p in key.split(".")]
    if not isinstance(data, dict):
        raise SpecError([Problem(lines.file, None, origin, "the graph file is not a mapping")])
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(target, dict):
            target = target.setdefault(part, {}) if not isinstance(part, int) else None
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            target = None
        if not isinstance(target, (dict, list)):
            prefix = ".".join(map(str, parts[: i + 1]))
            raise SpecError([Problem(lines.file, None, origin, f"{prefix} is not a mapping or list that can hold {key}")])
    last = parts[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last > len(target):
            raise SpecError([Problem(lines.file, None, origin, f"index {last} is out of range for a list of {len(target)}")])
        target[last:last + 1] = [value]
    else:
        target[last] = value
    # Errors about an overridden value point at the option rather than a line of the file.
    lines.overrides[tuple(parts)] = origin


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
