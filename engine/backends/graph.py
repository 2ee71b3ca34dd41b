"""A recipe's call run by a graph backend (onnxruntime, openvino, tensorrt) in place of eager PyTorch.

For each input shape it meets, the call finds the artifact in the cache (its manifest's key must match), builds
it on first use when allowed (ONNX export, the backend's build, the parity gate against eager), loads it and
keeps it resident within the budget. A recipe with dynamic axes gets one artifact for every size from the smallest
request to the graph's limits (gated at both ends); where that export fails, or a size falls outside the range
and nothing may be built, each size has a static artifact of its own. Whatever goes wrong raises :class:`BackendFailure` with its reason, which
the stage answers by trying the next backend; a shape that failed is not tried again on this backend.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.backends.cache import (EXPORT, ArtifactCache, Key, Lookup, Manifest, Parity, Range, build_on_first_use,
                                   describe, slot_for)
from engine.backends.faults import injected
from engine.backends.identity import fingerprint, weights_digest
from engine.backends.names import BACKEND_WIDE, BackendFailure, Reason
from engine.backends.onnx_export import MODEL as ONNX_MODEL
from engine.backends.onnx_export import export_onnx, exporter
from engine.backends.parity import parity
from engine.backends.recipe import ExportRecipe, TensorSig
from engine.backends.resident import Resident
from engine.backends.runners.base import GraphRunner, Session
from engine.backends.sizes import SizeBounds, at, pattern, profile, shapes
from engine.backends.usage import Meter

log = logging.getLogger("engine.backends")
PARITY_FAULT = 1e-2  #: what an injected parity fault adds to the artifact's output


def signatures(tensors: tuple[torch.Tensor, ...]) -> tuple[TensorSig, ...]:
    return tuple(TensorSig(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors)


def example_inputs(inputs: tuple[TensorSig, ...], device: str) -> tuple[torch.Tensor, ...]:
    """The parity gate's inputs: seeded normal values of each shape, the same on every build."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(sig.shape, generator=generator, dtype=torch.float32).to(device, getattr(torch, sig.dtype))
                 for sig in inputs)


def precision_of(module: torch.nn.Module) -> str:
    parameter = next(module.parameters(), None)
    return str(parameter.dtype).removeprefix("torch.") if parameter is not None else "float32"


class GraphCall:
    def __init__(self, runner: GraphRunner, version: str, recipe: ExportRecipe, *, stage: str, model: str, device: str,
                 cache: ArtifactCache, resident: Resident, meter: Callable[[], Meter], bounds: SizeBounds | None = None):
        """``bounds``: the sizes a dynamic artifact is built for (None: static artifacts only)."""
        self.runner, self.version, self.recipe = runner, version, recipe
        self.stage, self.model, self.device = stage, model, device
        self.cache, self.resident, self.meter = cache, resident, meter
        self.bounds = bounds if recipe.dynamic else None
        self.precision = precision_of(recipe.module)
        self.refused: dict[tuple[TensorSig, ...], BackendFailure] = {}
        self.loaded: dict[tuple[TensorSig, ...], Manifest] = {}  #: slot (-1 on dynamic axes) -> its loaded artifact's
        self.dynamic_failure: BackendFailure | None = None  #: why the dynamic export failed here (static from then on)
        self._weights: str | None = None

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        session = self.session(signatures(tensors))
        started = time.perf_counter()
        try:
            if injected("run_error", self.runner.name):
                raise RuntimeError("run error injected by ENGINE_BACKEND_FAULTS")
            outputs = session(*tensors)
        except BackendFailure:
            raise
        except Exception as exc:  # whatever the runtime raises: this request falls back, the stage stops asking it
            raise BackendFailure(Reason.RUN_ERROR, f"{type(exc).__name__}: {exc}") from exc
        self.meter().run_ms += (time.perf_counter() - started) * 1e3
        return outputs

    def session(self, inputs: tuple[TensorSig, ...]) -> Session:
        """The loaded artifact for ``inputs``: resident (a dynamic one whose range covers them, or this size's),
        or found (or built) and loaded now."""
        for slot in ((pattern(self.recipe, inputs),) if self.recipe.dynamic else ()) + (inputs,):
            held = self.resident.get((self.recipe.name, slot))
            manifest = self.loaded.get(slot)
            if held is not None and manifest is not None and (manifest.range is None or manifest.range.covers(shapes(inputs))):
                self._note(manifest, "resident")
                return held
        if inputs in self.refused:
            raise self.refused[inputs]
        try:
            found = self.ensure_built(inputs)
            session = self._load(found)
        except BackendFailure as failure:
            if failure.reason not in BACKEND_WIDE:
                self.refused[inputs] = failure
            raise
        assert found.manifest is not None
        slot = pattern(self.recipe, inputs) if found.manifest.range is not None else inputs
        self.loaded[slot] = found.manifest
        self.resident.put((self.recipe.name, slot), session)
        return session

    def key(self, inputs: tuple[TensorSig, ...]) -> Key:
        if self._weights is None:
            self._weights = weights_digest(self.recipe.module)
        slot = slot_for(self.model, self.stage, self.recipe.name, inputs, self.precision, self.runner.name, self.device)
        return Key(slot=slot, weights=self._weights, recipe_version=self.recipe.version, backend_version=self.version,
                   exporter=exporter(), fingerprint=fingerprint(self.device))

    def ensure_built(self, inputs: tuple[TensorSig, ...], *, build: bool | None = None) -> Lookup:
        """The artifact for ``inputs`` in the cache, built now if it is missing or stale and building is allowed
        (``build``; None: as ``ENGINE_BACKEND_BUILD`` says): the dynamic one serving every size when the recipe
        has dynamic axes and its export works, else this size's static one."""
        why = self.recipe.unsupported(inputs)
        if why is not None:
            raise BackendFailure(Reason.SHAPE_UNSUPPORTED, why)
        allowed = build_on_first_use() if build is None else build
        found = self._dynamic(inputs, allowed) if self.bounds is not None and self.dynamic_failure is None else None
        return found if found is not None else self._static(inputs, allowed)

    def _dynamic(self, inputs: tuple[TensorSig, ...], allowed: bool) -> Lookup | None:
        """The dynamic artifact serving ``inputs``; None where the static path must answer (not built and building is
        off, its range or parity does not serve, or its export failed here)."""
        assert self.bounds is not None
        slot = pattern(self.recipe, inputs)
        key = self.key(slot)
        found = self.cache.lookup(key)
        held = found.manifest.range if found.state == "hit" and found.manifest is not None else None
        if held is not None and held.covers(shapes(inputs)):
            assert found.manifest is not None and found.manifest.parity is not None
            if not found.manifest.parity.passed:  # recorded failing: never used; a static artifact may pass
                return None
            self._note(found.manifest, "hit")
            return found
        if not allowed:
            if found.state == "stale":
                raise _stale(found, key)
            return None
        wanted = profile(self.recipe, self.bounds, inputs)
        if held is not None:  # built for a narrower range: rebuilt for both
            wanted = wanted.widened(held.smallest).widened(held.largest)
        why = ("range" if held is not None else describe(found.manifest.key, key)) if found.manifest is not None else ""
        try:
            built = self.build(key, at(wanted.optimal, inputs), wanted)
        except BackendFailure as failure:
            self.dynamic_failure = failure
            log.warning("%s %s: the %s artifact with dynamic axes cannot be built (%s); one static artifact per size "
                        "instead", self.stage, self.recipe.name, self.runner.name, failure.detail)
            return None
        assert built.manifest is not None and built.manifest.parity is not None
        self._note(built.manifest, f"rebuilt (stale: {why})" if why else "built")
        return built if built.manifest.parity.passed else None

    def _note(self, manifest: Manifest, cache: str) -> None:
        """The meter's view of the artifact used: how it was had, its shapes, the worst parity of the stage's calls."""
        assert manifest.parity is not None  # graph artifacts are gated
        meter = self.meter()
        meter.cache = cache
        meter.shapes = manifest.range.text() if manifest.range is not None else "static"
        if meter.parity is None or manifest.parity.max_abs > meter.parity.max_abs:
            meter.parity = manifest.parity

    def _static(self, inputs: tuple[TensorSig, ...], allowed: bool) -> Lookup:
        key = self.key(inputs)
        found = self.cache.lookup(key)
        if found.state == "hit":
            cache = "hit"
        elif not allowed:
            if found.state == "stale":
                raise _stale(found, key)
            built = [m.inputs_text() for m in self.cache.manifests(self.runner.name, self.stage, self.model)]
            if built:
                raise BackendFailure(Reason.SHAPE_UNSUPPORTED, f"no artifact for inputs {shapes_text(inputs)}; built: "
                                     f"{'; '.join(built)} (ENGINE_BACKEND_BUILD=never)")
            raise BackendFailure(Reason.ARTIFACT_MISSING, f"nothing built for {self.stage} under {self.cache.root}; run "
                                 "`engine build` (ENGINE_BACKEND_BUILD=never)")
        else:
            stale = f" (stale: {describe(found.manifest.key, key)})" if found.manifest is not None else ""
            found = self.build(key, inputs)
            cache = f"{'rebuilt' if stale else 'built'}{stale}"
        assert found.manifest is not None and found.manifest.parity is not None  # graph artifacts are gated
        self._note(found.manifest, cache)
        if not found.manifest.parity.passed:
            figures = found.manifest.parity
            raise BackendFailure(Reason.PARITY_FAILED, f"max abs {figures.max_abs:.3g}, cosine {figures.cosine:.6f}, "
                                 f"PSNR {figures.psnr_db:.1f} dB against eager; needs {figures.threshold}")
        return found

    def build(self, key: Key, inputs: tuple[TensorSig, ...], dynamic: Range | None = None) -> Lookup:
        """Export, build and gate the artifact for ``inputs`` (with ``dynamic``: for the range, gated at its smallest
        and its largest shapes); commit it (a failing gate is recorded too, never used)."""
        log.info("%s %s: building the %s artifact for inputs %s", self.stage, self.recipe.name, self.runner.name,
                 dynamic.text() if dynamic is not None else shapes_text(inputs))
        started = time.perf_counter()
        gated = [inputs] if dynamic is None else [at(dynamic.smallest, inputs), at(dynamic.largest, inputs)]
        staging = None
        try:
            onnx = self._export(key, example_inputs(inputs, self.device), dynamic)
            staging = self.cache.staging(key.slot)
            files = self.runner.build(onnx, staging, self.device, self.precision, dynamic)
            session = self.runner.load(staging, self.device, self.precision, len(self.recipe.output_names))
            checks = [self._gate(session, example_inputs(sigs, self.device)) for sigs in gated]
        except Exception as exc:  # an exporter or runtime error of any kind: the artifact cannot be had
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise BackendFailure(Reason.BUILD_FAILED, f"{type(exc).__name__}: {exc}") from exc
        worst = next((c for c in checks if not c.passed), max(checks, key=lambda c: c.max_abs))
        manifest = Manifest(key=key, files=files, build_s=round(time.perf_counter() - started, 3), parity=worst,
                            range=dynamic.model_copy(update={"parity": tuple(checks)}) if dynamic is not None else None)
        folder = self.cache.commit(staging, manifest)
        self.meter().build_s += manifest.build_s
        log.info("%s %s: %s artifact built in %.1f s, parity max abs %.3g (%s)", self.stage, self.recipe.name,
                 self.runner.name, manifest.build_s, worst.max_abs, "passed" if worst.passed else "FAILED")
        return Lookup("hit", folder, manifest)

    def _gate(self, session: Session, examples: tuple[torch.Tensor, ...]) -> Parity:
        actual = session(*examples)
        with torch.no_grad():
            expected = as_tuple(self.recipe.module(*examples))
        if injected("parity", self.runner.name):
            actual = tuple(t + PARITY_FAULT for t in actual)
        return parity(expected, actual, self.precision)

    def _export(self, key: Key, examples: tuple[torch.Tensor, ...], dynamic: Range | None) -> Path:
        """The ONNX graph every graph backend builds ``key``'s artifact from: exported once per host and shape (or
        range)."""
        slot = key.slot.model_copy(update={"backend": EXPORT})
        export_key = key.model_copy(update={"slot": slot, "backend_version": exporter()})
        found = self.cache.lookup(export_key)
        if found.state != "hit" or (found.manifest is not None and found.manifest.range != dynamic):
            started = time.perf_counter()
            staging = self.cache.staging(slot)
            try:
                export_onnx(self.recipe, examples, staging, dynamic)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            files = tuple(sorted(p.name for p in staging.iterdir()))
            manifest = Manifest(key=export_key, files=files, build_s=round(time.perf_counter() - started, 3), parity=None,
                                range=dynamic)
            found = Lookup("hit", self.cache.commit(staging, manifest), manifest)
        return found.folder / ONNX_MODEL

    def _load(self, found: Lookup) -> Session:
        started = time.perf_counter()
        try:
            if injected("load_oom", self.runner.name):
                raise MemoryError("out of memory injected by ENGINE_BACKEND_FAULTS")
            session = self.runner.load(found.folder, self.device, self.precision, len(self.recipe.output_names))
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise BackendFailure(Reason.LOAD_OOM, f"{type(exc).__name__}: {exc}") from exc
        self.meter().load_s += time.perf_counter() - started
        return session


def as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _stale(found: Lookup, key: Key) -> BackendFailure:
    assert found.manifest is not None
    return BackendFailure(Reason.ARTIFACT_STALE, f"the artifact at {found.folder} was built for another "
                          f"{describe(found.manifest.key, key)}; run `engine build` (ENGINE_BACKEND_BUILD=never)")


def shapes_text(inputs: tuple[TensorSig, ...]) -> str:
    """1x16x1x8x12, 1x4: each input's shape."""
    return ", ".join("x".join(map(str, sig.shape)) for sig in inputs)
