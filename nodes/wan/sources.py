"""Where a Wan model comes from: a preset, a local diffusers-layout folder or a Hugging Face repo id.

Resolution itself is the engine's (:mod:`engine.models.sources`: atomic cached builds, cache-only hub
lookups). This module names the Wan presets: each task has its own model (the I2V one adds the image
encoder; ``tiny-ti2v`` is a model of t2v and ti2v only), so presets are cached per task, under
``<cache>/wan/<task>/<preset>-v<version>``. A preset of other tasks is refused by name, with the tasks it serves.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from engine.errors import ModelError
from engine.models.meta import read_component_config
from engine.models.sources import Preset
from engine.models.sources import find_source as find_model_source
from engine.models.sources import resolve_source as resolve_model_source
from nodes.wan.family import WanFamily
from nodes.wan.geometry import TI2V_INSTEAD, expands_timesteps, ti2v_model_problem
from nodes.wan.presets import PRESETS, build_preset, serves

#: Bump when build_preset changes what it writes, so cached folders of the old recipe are not reused.
PRESET_VERSION = 2


def resolve_source(task: str, path: str) -> Path:
    """A local diffusers-layout folder for ``path``: a preset name, a folder, or a cached repo id."""
    return _checked(task, resolve_model_source(f"wan/{task}", path, _presets(task, path)))


def find_source(task: str, path: str) -> Path | None:
    """The folder for ``path`` if it is there without building anything (None: a preset not built yet)."""
    source = find_model_source(f"wan/{task}", path, _presets(task, path))
    return None if source is None else _checked(task, source)


def _presets(task: str, path: str) -> dict[str, Preset]:
    """The presets of ``task``; ModelError when ``path`` names a preset of other tasks."""
    if path in PRESETS and not serves(PRESETS[path], task):
        tasks = [other for other in WanFamily.tasks if serves(PRESETS[path], other)]
        hint = f"; {TI2V_INSTEAD}" if "ti2v" in tasks else ""
        raise ModelError(f"preset {path!r} is not a model of wan {task}; it serves {', '.join(tasks)}{hint}")
    return {name: Preset(build=partial(build_preset, name, task), version=PRESET_VERSION)
            for name, sizes in PRESETS.items() if serves(sizes, task)}


def _checked(task: str, source: Path) -> Path:
    """``source``, unless it is a TI2V-5B model (its VAE patchifies) under another image-to-video task. Refused here
    rather than by the family's config checks, which would first miss the components it lacks for that task (an
    image encoder, a second expert)."""
    vae = read_component_config(source, "vae")
    if task.removesuffix("_experts") == "i2v" and expands_timesteps(vae):
        raise ModelError(f"wan {task} cannot run this model: {source}/{ti2v_model_problem(task, vae)}")
    return source
