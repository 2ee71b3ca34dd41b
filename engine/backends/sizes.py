"""The sizes a dynamic artifact is built to serve: from the smallest request the model takes to the graph's limits.

A recipe with ``dynamic`` axes is exported once for the whole range: its shapes at the smallest request (each size
field at its lowest valid value) and at the largest (the graph's ``limits``, which the plan always fills: explicit
limits, else the largest request, else the request defaults), widened by any shape met outside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import annotated_types
from pydantic.fields import FieldInfo

from engine.backends.cache import Range
from engine.backends.recipe import ExportRecipe, TensorSig
from engine.stages import RequestParams


@dataclass(frozen=True)
class SizeBounds:
    smallest: RequestParams
    largest: RequestParams


def size_bounds(request_type: type[RequestParams], limits: Mapping[str, int]) -> SizeBounds | None:
    """The smallest request and the largest the graph allows; None when ``limits`` does not size every field."""
    fields = request_type.size_fields
    if not fields or any(name not in limits for name in fields):
        return None
    smallest = request_type.model_construct(**{name: lowest(request_type.model_fields[name]) for name in fields})
    return SizeBounds(smallest, request_type.model_construct(**{name: limits[name] for name in fields}))


def lowest(field: FieldInfo) -> int:
    """The smallest value a size field accepts: its lower bound rounded up to its step."""
    low, step = 1, 1
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Ge):
            low = int(constraint.ge)
        elif isinstance(constraint, annotated_types.Gt):
            low = int(constraint.gt) + 1
        elif isinstance(constraint, annotated_types.MultipleOf):
            step = int(constraint.multiple_of)
    return -(-low // step) * step


def dynamic_axes(recipe: ExportRecipe, inputs: tuple[TensorSig, ...]) -> tuple[tuple[int, ...], ...]:
    """The recipe's dynamic axes for each of ``inputs`` (none for an input it does not name)."""
    return tuple(recipe.dynamic[i] if i < len(recipe.dynamic) else () for i in range(len(inputs)))


def pattern(recipe: ExportRecipe, inputs: tuple[TensorSig, ...]) -> tuple[TensorSig, ...]:
    """``inputs`` with each dynamic axis as -1: the slot of the one dynamic artifact serving every size."""
    return tuple(TensorSig(tuple(-1 if axis in axes else d for axis, d in enumerate(sig.shape)), sig.dtype)
                 for sig, axes in zip(inputs, dynamic_axes(recipe, inputs)))


def shapes(inputs: tuple[TensorSig, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(sig.shape for sig in inputs)


def profile(recipe: ExportRecipe, bounds: SizeBounds, inputs: tuple[TensorSig, ...]) -> Range:
    """The range an artifact built now for ``inputs`` serves: the bounds' shapes, widened to ``inputs``."""
    smallest, largest = shapes(recipe.inputs(bounds.smallest)), shapes(recipe.inputs(bounds.largest))
    bounded = Range(axes=dynamic_axes(recipe, inputs), smallest=smallest, optimal=shapes(inputs), largest=largest)
    return bounded.widened(shapes(inputs))


def at(end: tuple[tuple[int, ...], ...], like: tuple[TensorSig, ...]) -> tuple[TensorSig, ...]:
    """The signatures of ``like`` with the shapes of one end of a range."""
    return tuple(TensorSig(shape, sig.dtype) for shape, sig in zip(end, like))
