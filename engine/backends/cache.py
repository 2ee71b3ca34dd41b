"""The artifact cache: each exported or built graph in a folder of its own beside a manifest holding its key.

An artifact's *slot* is what it was asked for (model, stage, call, input shapes and dtypes, precision, backend,
device kind); its *key* adds what makes it valid (weights digest, recipe version, backend and exporter versions,
the device's fingerprint). A slot whose manifest holds another key is stale: rebuilt, never used. The
manifests are the only table of the shapes built. A folder is written beside its slot and renamed into place,
so a reader sees a whole artifact or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.backends.recipe import TensorSig

ARTIFACT_DIR_ENV = "ENGINE_ARTIFACT_DIR"
BUILD_ENV = "ENGINE_BACKEND_BUILD"
MANIFEST = "manifest.json"
EXPORT = "onnx"  #: the cache's name for ONNX exports, shared by every graph backend on the host


def artifact_root() -> Path:
    configured = os.environ.get(ARTIFACT_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "diffusion-graph-engine" / "artifacts"


def build_on_first_use() -> bool:
    """Whether a stage builds a missing or stale artifact when a request needs it (``ENGINE_BACKEND_BUILD``:
    ``first_use``, the default, or ``never``: only what ``engine build`` made is used)."""
    policy = os.environ.get(BUILD_ENV, "first_use")
    if policy not in ("first_use", "never"):
        from engine.errors import EngineError

        raise EngineError(f"{BUILD_ENV}={policy!r}; expected first_use or never")
    return policy == "first_use"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slot(_Frozen):
    """What an artifact is for."""

    model: str = Field(description="the model's local folder")
    stage: str
    call: str = Field(description="the recipe's call within the stage (decode)")
    inputs: tuple[tuple[tuple[int, ...], str], ...] = Field(description="(shape, dtype) of each input")
    precision: str
    backend: str
    device: str = Field(description="cpu, cuda or xpu")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:20]


class Key(_Frozen):
    """What makes an artifact in its slot valid: any difference makes it stale."""

    slot: Slot
    weights: str = Field(description="digest of the exported module's parameters and buffers")
    recipe_version: int
    backend_version: str
    exporter: str = Field(description="torch and ONNX opset versions that exported it")
    fingerprint: str = Field(description="the device: CPU ISA, or GPU SM, driver and CUDA")


class Parity(_Frozen):
    """The artifact's output against eager on the same input."""

    passed: bool
    max_abs: float
    cosine: float
    psnr_db: float
    threshold: str = Field(description="the tolerance applied, for the precision")


class Range(_Frozen):
    """The sizes a dynamic artifact serves: per input, its dynamic axes and its shape at the smallest, the optimal
    (TensorRT's opt: the size it was first built for) and the largest size; its slot's shapes hold -1 there."""

    axes: tuple[tuple[int, ...], ...] = Field(description="per input, the axes that follow the request's size")
    smallest: tuple[tuple[int, ...], ...]
    optimal: tuple[tuple[int, ...], ...]
    largest: tuple[tuple[int, ...], ...]
    parity: tuple[Parity, ...] = Field((), description="the gate at the smallest and at the largest shapes")

    def covers(self, shapes: tuple[tuple[int, ...], ...]) -> bool:
        return all(low[axis] <= shape[axis] <= high[axis]
                   for axes, low, high, shape in zip(self.axes, self.smallest, self.largest, shapes) for axis in axes)

    def widened(self, shapes: tuple[tuple[int, ...], ...]) -> Range:
        """This range grown to serve ``shapes`` too (parity not yet checked)."""
        def bound(pick, ends):  # noqa: ANN001, ANN202
            return tuple(tuple(pick(end[d], shape[d]) if d in axes else end[d] for d in range(len(end)))
                         for axes, end, shape in zip(self.axes, ends, shapes))
        return self.model_copy(update={"smallest": bound(min, self.smallest), "largest": bound(max, self.largest),
                                       "parity": ()})

    def text(self) -> str:
        """1x16x1x2..8x2..12: each input's shape, a dynamic axis as its bounds."""
        return ", ".join("x".join(f"{low[d]}..{high[d]}" if d in axes else str(low[d]) for d in range(len(low)))
                         for axes, low, high in zip(self.axes, self.smallest, self.largest))


class Manifest(_Frozen):
    key: Key
    files: tuple[str, ...] = Field(description="the artifact's files in its folder")
    build_s: float
    parity: Parity | None = Field(description="against eager (a dynamic artifact: the worse of its two gates); "
                                              "None for an ONNX export, which graph backends build from")
    range: Range | None = Field(None, description="the sizes a dynamic artifact serves; None: only its slot's shapes")

    def inputs_text(self) -> str:
        return self.range.text() if self.range is not None else \
            ", ".join("x".join(map(str, shape)) for shape, _ in self.key.slot.inputs)


@dataclass(frozen=True)
class Lookup:
    state: Literal["hit", "missing", "stale"]
    folder: Path
    manifest: Manifest | None  #: the manifest found (a stale one too)


class ArtifactCache:
    def __init__(self, root: Path | None = None):
        self.root = root if root is not None else artifact_root()

    def folder(self, slot: Slot) -> Path:
        return self.root / slot.backend / slot.stage / slot.digest

    def lookup(self, key: Key) -> Lookup:
        folder = self.folder(key.slot)
        manifest = read_manifest(folder)
        if manifest is None:
            return Lookup("missing", folder, None)
        if manifest.key != key or any(not (folder / name).exists() for name in manifest.files):
            return Lookup("stale", folder, manifest)
        return Lookup("hit", folder, manifest)

    def manifests(self, backend: str, stage: str, model: str) -> Iterator[Manifest]:
        """The manifest of every artifact of ``backend`` and ``stage`` of ``model``: the shapes built."""
        for path in sorted((self.root / backend / stage).glob(f"*/{MANIFEST}")):
            manifest = read_manifest(path.parent)
            if manifest is not None and manifest.key.slot.model == model:
                yield manifest

    def staging(self, slot: Slot) -> Path:
        """A fresh folder to build ``slot``'s artifact in, beside its final place."""
        folder = self.folder(slot)
        staging = folder.parent / f".building-{folder.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        return staging

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Write the manifest into ``staging`` and move it into the slot, replacing what was there."""
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        folder = self.folder(manifest.key.slot)
        old = folder.parent / f".old-{folder.name}-{uuid.uuid4().hex[:8]}"
        if folder.exists():
            folder.rename(old)
        try:
            staging.rename(folder)
        except OSError:  # another replica committed the same slot in between: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return folder


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: treated as absent, replaced by the next build
        return None


def slot_for(model: str, stage: str, call: str, inputs: tuple[TensorSig, ...], precision: str, backend: str,
             device: str) -> Slot:
    return Slot(model=model, stage=stage, call=call, inputs=tuple((s.shape, s.dtype) for s in inputs),
                precision=precision, backend=backend, device=device.split(":")[0])


def describe(key: Key, other: Key) -> str:
    """What differs between two keys of one slot (why an artifact is stale)."""
    mine, theirs = json.loads(key.model_dump_json()), json.loads(other.model_dump_json())
    changed = [name for name in mine if mine[name] != theirs[name]]
    return ", ".join(changed) or "its files are missing"
