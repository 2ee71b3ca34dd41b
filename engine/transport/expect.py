"""What a receiver expects on an edge for one request, and the check of a delivered manifest against it.

The plan declares every tensor an edge carries (name, dtype, shape expression); evaluated for a request's
parameters, that is exactly what a correct sender delivers. A manifest that differs is refused before its
bytes are verified and before any stage sees them: a payload of the wrong shape would verify (its digest
covers what was sent) and fail, or worse compute, somewhere downstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.transport.manifest import Manifest


@dataclass(frozen=True)
class Expected:
    """One tensor the plan expects on an edge for one request."""

    name: str
    dtype: str
    shape: tuple[int, ...]  #: for the request's parameters; a ``variable`` dimension is an upper bound
    optional: bool  #: may be absent (a negative prompt's embeddings without guidance)
    variable: tuple[int, ...]  #: dimensions that may be shorter than ``shape`` (a prompt's token count)

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            got <= want if i in self.variable else got == want for i, (got, want) in enumerate(zip(shape, self.shape))
        )


def mismatch(manifest: Manifest, expected: Sequence[Expected]) -> str | None:
    """The first way ``manifest`` differs from ``expected``, naming the tensor; None when it carries exactly
    what is expected."""
    wanted = {e.name: e for e in expected}
    sent = {h.name: h for h in manifest.tensors}
    if len(sent) != len(manifest.tensors):
        return "a tensor name appears twice in the manifest"
    unexpected = next((h.name for h in manifest.tensors if h.name not in wanted), None)
    if unexpected is not None:
        return f"tensor {unexpected!r} is not one the plan has this edge carry ({', '.join(wanted) or 'none'})"
    for name, want in wanted.items():
        header = sent.get(name)
        if header is None:
            if not want.optional:
                return f"tensor {name!r} is missing; the plan has this edge carry it"
            continue
        if header.dtype != want.dtype:
            return f"tensor {name!r} is {header.dtype}; the plan expects {want.dtype}"
        if not want.admits(header.shape):
            return (f"tensor {name!r} has shape {list(header.shape)}; the plan expects {list(want.shape)}"
                    f"{_bounds(want.variable)} for this request")
    return None


def _bounds(variable: tuple[int, ...]) -> str:
    if not variable:
        return ""
    return f" (dimension{'s' if len(variable) > 1 else ''} {', '.join(map(str, variable))} at most)"
