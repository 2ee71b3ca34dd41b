"""Request fields as ``engine run`` options, derived from the request models of the installed families.

argparse needs every option before the graph, and so its family, is known: ``engine run`` offers the union
of all families' request fields (``num_frames`` as ``--num-frames``), each with its description, and
:func:`engine.controller.requests.run_requests` refuses those the graph's family and task do not have. Values
stay text until the request model validates them, so a field's type and bounds are checked in one place.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from engine.families import family_names, get_family
from engine.stages import RequestParams

#: How --help shows the value of a field, by its type (``float | None`` as float).
METAVARS = {int: "INT", float: "NUMBER", str: "TEXT", Path: "FILE"}


@dataclass(frozen=True)
class RequestOption:
    field: str
    flag: str  #: ``--num-frames``
    metavar: str
    help: str


def option_flag(field: str) -> str:
    return "--" + field.replace("_", "-")


@cache
def request_models() -> dict[str, type[RequestParams]]:
    """The request model of every installed family and task, by ``"family task"``."""
    return {f"{name} {task}": get_family(name).request_type(task)
            for name in family_names() for task in get_family(name).tasks}


def _base_type(annotation: Any) -> Any:
    """``float | None`` -> ``float``."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return members[0] if len(members) == 1 else annotation


def _owners(labels: Sequence[str], models: Mapping[str, type[RequestParams]]) -> str:
    """``wan t2v, wan i2v`` -> ``wan`` where a family's every task in ``models`` has the field."""
    names = []
    for family in dict.fromkeys(label.split()[0] for label in labels):
        tasks = [label for label in models if label.split()[0] == family]
        names.extend([family] if all(task in labels for task in tasks) else [label for label in labels if label in tasks])
    return ", ".join(names)


@cache
def request_options() -> tuple[RequestOption, ...]:
    """One option per request field of any installed family (:func:`options_for` their request models)."""
    return options_for(request_models())


def options_for(models: Mapping[str, type[RequestParams]]) -> tuple[RequestOption, ...]:
    """One option per request field of ``models`` (by ``"family task"``): the fields some request requires (the
    prompt) first, then the others, each group in the models' field order. A field whose description differs
    between models names the families and tasks of each."""
    descriptions: dict[str, dict[str, list[str]]] = {}  # field -> description -> models that have it
    types: dict[str, set[Any]] = {}
    required: set[str] = set()
    for label, model in models.items():
        for name, info in model.model_fields.items():
            descriptions.setdefault(name, {}).setdefault(info.description or "", []).append(label)
            types.setdefault(name, set()).add(_base_type(info.annotation))
            if info.is_required():
                required.add(name)
    options = []
    for name, by_text in sorted(descriptions.items(), key=lambda item: item[0] not in required):
        everywhere = len(by_text) == 1 and len(next(iter(by_text.values()))) == len(models)
        text = (next(iter(by_text)) if everywhere
                else " ".join(f"{_owners(labels, models)}: {t}" for t, labels in by_text.items()))
        kind = next(iter(types[name])) if len(types[name]) == 1 else None
        options.append(RequestOption(name, option_flag(name), METAVARS.get(kind, "VALUE"), text.replace("%", "%%")))
    return tuple(options)


class _RequestValue(argparse.Action):
    """Collects request values in ``namespace.request`` by field name, apart from the command's own options."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.request = {**namespace.request, self.dest: values}


def add_request_options(parser: argparse.ArgumentParser, title: str, description: str) -> None:
    """Add every request option to ``parser`` in a group of its own; the values land in ``args.request``."""
    group = parser.add_argument_group(title, description)
    for option in request_options():
        group.add_argument(option.flag, dest=option.field, action=_RequestValue, default=argparse.SUPPRESS,
                           metavar=option.metavar, help=option.help)
    parser.set_defaults(request={})
