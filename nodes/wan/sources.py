"""Where a Wan model comes from: a preset, a local diffusers-layout folder or a Hugging Face repo id.

Resolution itself is the engine's (:mod:`engine.models.sources`: atomic cached builds, cache-only hub
lookups). This module names the Wan presets: each task has its own model (the I2V one adds the image
encoder; ``tiny-ti2v`` is a text-to-video model only), so presets are cached per task, under
``<cache>/wan/<task>/<preset>-v<version>``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from engine.models.sources import Preset
from engine.models.sources import find_source as find_model_source
from engine.models.sources import resolve_source as resolve_model_source
from nodes.wan.presets import PRESETS, build_preset, serves

#: Bump when build_preset changes what it writes, so cached folders of the old recipe are not reused.
PRESET_VERSION = 2


def resolve_source(task: str, path: str) -> Path:
    """A local diffusers-layout folder for ``path``: a preset name, a folder, or a cached repo id."""
    return resolve_model_source(f"wan/{task}", path, _presets(task))


def find_source(task: str, path: str) -> Path | None:
    """The folder for ``path`` if it is there without building anything (None: a preset not built yet)."""
    return find_model_source(f"wan/{task}", path, _presets(task))


def _presets(task: str) -> dict[str, Preset]:
    return {name: Preset(build=partial(build_preset, name, task), version=PRESET_VERSION)
            for name, sizes in PRESETS.items() if serves(sizes, task)}
