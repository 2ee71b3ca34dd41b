"""Registry of model families.

The engine never imports a model family directly: families are found through the ``engine.families``
entry-point group (``pyproject.toml``), so a new family is a package plus one line of metadata.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from engine.errors import EngineError
from engine.stages import ModelFamily

ENTRY_POINT_GROUP = "engine.families"


@cache
def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def family_names() -> list[str]:
    """Names of the installed families, sorted."""
    return sorted(_entry_points())


@cache
def get_family(name: str) -> ModelFamily:
    """The family registered under exactly ``name``."""
    entry = _entry_points().get(name)
    if entry is None:
        known = ", ".join(family_names()) or "none (is the engine installed with `pip install -e .`?)"
        raise EngineError(f"unknown model family {name!r}; installed families: {known}")
    family = entry.load()  # type: ignore[attr-defined]
    if not isinstance(family, ModelFamily):
        raise EngineError(f"entry point {name!r} does not name a ModelFamily instance")
    return family
