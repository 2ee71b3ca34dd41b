"""Where a model's diffusers-layout folder comes from: a named preset, a local folder or a Hugging Face repo id.

Family-agnostic: a family maps its preset names to builder functions and calls :func:`resolve_source`.

- A preset is built on first use into the cache (``$ENGINE_CACHE_DIR`` or
  ``~/.cache/diffusion-graph-engine/models/``), under ``<family>/<preset>-<version>``, so a change to a
  builder bumps its version instead of reusing a stale folder. The build writes into a temporary folder
  beside the target and renames it into place: concurrent workers never see a half-written model, and
  the loser of a race discards its copy.
- A local folder must hold ``model_index.json``.
- A repo id (``owner/name``) is looked up in the local Hugging Face cache only: nothing is downloaded
  at run time.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelError
from engine.models.meta import read_model_index

CACHE_ENV = "ENGINE_CACHE_DIR"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Preset:
    """A model built locally: ``build(folder)`` writes a complete diffusers-layout model into ``folder``."""

    build: Callable[[Path], None]
    #: Bumped whenever ``build`` changes what it writes.
    version: int


def latent_statistics(vae_class: type, z_dim: int) -> tuple[list[float], list[float]]:
    """Per-channel latent mean and std for a preset VAE of ``z_dim`` channels: ``vae_class``'s defaults (those of
    the real checkpoints) repeated over the channels, so that a preset of the real width keeps them exactly."""
    defaults = inspect.signature(vae_class).parameters
    mean, std = defaults["latents_mean"].default, defaults["latents_std"].default
    return [mean[i % len(mean)] for i in range(z_dim)], [std[i % len(std)] for i in range(z_dim)]


def cache_root() -> Path:
    """The folder presets are cached in."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "diffusion-graph-engine" / "models"


def preset_folder(family: str, name: str, preset: Preset) -> Path:
    """Where ``family``'s preset ``name`` is cached (built or not)."""
    return cache_root() / family / f"{name}-v{preset.version}"


def build_preset(family: str, name: str, preset: Preset) -> Path:
    """The cached folder of ``family``'s preset ``name``, built atomically on first use."""
    target = preset_folder(family, name, preset)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        preset.build(staging)
        read_model_index(staging)  # a builder that wrote no model is a bug, not a cache entry
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_source(family: str, path: str, presets: Mapping[str, Preset]) -> Path:
    """A local diffusers-layout folder for ``path``: a preset name, a folder, or a cached repo id."""
    if path in presets:
        return build_preset(family, path, presets[path])
    folder = Path(path).expanduser()
    if folder.is_dir():
        read_model_index(folder)
        return folder
    if _REPO_ID.fullmatch(path):
        return _cached_repo(path)
    names = ", ".join(presets) or "none"
    raise ModelError(
        f"model {path!r} is not a preset of {family} ({names}), an existing folder, or a repo id (owner/name)"
    )


def find_source(family: str, path: str, presets: Mapping[str, Preset]) -> Path | None:
    """The folder :func:`resolve_source` gives for ``path`` without building anything: None for a preset not
    built yet."""
    if path in presets:
        target = preset_folder(family, path, presets[path])
        return target if (target / "model_index.json").is_file() else None
    return resolve_source(family, path, presets)


def _cached_repo(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"repo {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and models are never "
            f"downloaded at run time: run `hf download {repo_id}` where the hub is reachable, or give a local folder"
        ) from None
    read_model_index(folder)
    return folder
