"""A stage run by the first backend of its chain that works, falling back (never silently) to the next.

Built where the worker builds its stages: each backend of the chain is probed at load (an import error or a
failed probe is decided once); a request then runs on the first live backend, and a backend that fails for it
(missing, stale or failed artifact, unsupported shape, out of memory at load, an error at run, a failed parity
gate) hands that request to the next one. A reason that holds for every shape (run error included) makes the
stage stop asking that backend; the others are remembered per shape. Each reason is logged once per stage; what
ran, and why the others did not, goes into the request's report. A strict node fails instead of falling back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from engine.backends.cache import ArtifactCache
from engine.backends.compiled import Compiled, probe_compile
from engine.backends.graph import GraphCall, precision_of
from engine.backends.names import BACKEND_WIDE, GRAPH_BACKENDS, BackendFailure, Reason, StrictBackendError
from engine.backends.recipe import ExportRecipe
from engine.backends.resident import Resident, resident_budget
from engine.backends.runners import graph_runner
from engine.backends.sizes import SizeBounds, size_bounds
from engine.backends.usage import Meter, StageUse, Step
from engine.errors import EngineError
from engine.stages import LoadedComponents, ModelFamily, ProgressFn, RequestParams, Stage

log = logging.getLogger("engine.backends")


class Installed:
    """One backend's way of running a stage: put in place before a request, taken out after."""

    def __init__(self, install: Callable[[], None] = lambda: None, restore: Callable[[], None] = lambda: None):
        self.install, self.restore = install, restore


class GraphBackend(Installed):
    """A graph backend serving every recipe of the stage."""

    def __init__(self, calls: list[GraphCall]):
        self.calls = calls
        self.restores: list[Callable[[], None]] = []
        super().__init__(self._install, self._restore)

    def _install(self) -> None:
        self.restores = [call.recipe.install(call) for call in self.calls]

    def _restore(self) -> None:
        while self.restores:
            self.restores.pop()()


class BackendStage(Stage):
    def __init__(self, inner: Stage, node: str, chain: tuple[str, ...], strict: bool):
        self.inner = inner
        self.spec = inner.spec
        self.node = node
        self.chain = chain
        self.strict = strict
        self.backends: dict[str, Installed] = {}
        self.versions: dict[str, str] = {}
        self.dead: dict[str, BackendFailure] = {}  #: backends that failed for every shape
        self.logged: set[tuple[str, Reason]] = set()
        self.meter = Meter()
        self.last: StageUse | None = None  #: what the last request ran on

    def add(self, backend: str, make: Callable[[], tuple[str, Installed]]) -> None:
        """Probe ``backend`` and keep it live, or record why it cannot serve this stage at all."""
        try:
            self.versions[backend], self.backends[backend] = make()
        except ImportError as exc:
            self.fail(backend, BackendFailure(Reason.IMPORT_ERROR, f"{type(exc).__name__}: {exc}"))
        except BackendFailure as failure:
            self.fail(backend, failure)

    def fail(self, backend: str, failure: BackendFailure) -> None:
        """Note a backend's failure: logged once per reason; strict nodes stop here."""
        if failure.reason in BACKEND_WIDE:
            self.dead[backend] = failure
        if (backend, failure.reason) not in self.logged:
            self.logged.add((backend, failure.reason))
            later = self.chain[self.chain.index(backend) + 1:]
            log.warning("stage %s on %s: backend %s failed with %s (%s)%s", self.spec.name, self.node, backend,
                        failure.reason.value, failure.detail,
                        "" if self.strict else f"; falling back to {later[0]}" if later else "; no backend left")
        if self.strict:
            raise StrictBackendError(f"stage {self.spec.name!r} on node {self.node!r}: backend {backend} failed with "
                                     f"{failure.reason.value}: {failure.detail} (strict: no fallback)") from failure

    def run(self, request: RequestParams, inputs: Mapping[str, torch.Tensor], progress: ProgressFn) -> dict[str, torch.Tensor]:
        steps: list[Step] = []
        for backend in self.chain:
            if backend in self.dead:
                failure = self.dead[backend]
                steps.append(Step(backend, failure.reason, failure.detail))
                continue
            self.meter = Meter()
            installed = self.backends[backend]
            installed.install()
            try:
                outputs = self.inner.run(request, inputs, progress)
            except BackendFailure as failure:
                steps.append(Step(backend, failure.reason, failure.detail))
                self.fail(backend, failure)
                continue
            finally:
                installed.restore()
            steps.append(Step(backend, None))
            self.last = StageUse(asked=self.chain[0], used=backend, chain=steps, meter=self.meter,
                                 versions={b: self.versions[b] for b in self.chain if b in self.versions})
            return outputs
        reasons = "; ".join(f"{s.backend}: {s.reason.value if s.reason else '?'} ({s.detail})" for s in steps)
        raise EngineError(f"stage {self.spec.name!r} on node {self.node!r}: no backend of its chain could run it: {reasons}")


def with_backends(stage: Stage, family: ModelFamily, task: str, node: str, chain: tuple[str, ...], strict: bool,
                  components: LoadedComponents, device: str, model: str, limits: Mapping[str, int] | None = None) -> Stage:
    """``stage`` run by its chain of backends (``stage`` itself when it has none). ``limits``: the graph's largest
    sizes, which a graph backend's dynamic artifacts are built to serve (None: static artifacts, one per size)."""
    if not chain or chain == ("eager",):
        return stage
    wrapped = BackendStage(stage, node, chain, strict)
    recipes: tuple[ExportRecipe, ...] = family.export_recipes(task, stage) if stage.spec.exportable else ()
    bounds = size_bounds(family.request_type(task), limits) if limits else None
    cache = ArtifactCache()
    for backend in chain:
        if backend == "eager":
            wrapped.add(backend, lambda: (torch.__version__, Installed()))
        elif backend == "compile":
            modules = [components.objects[c] for c in stage.spec.components
                       if isinstance(components.objects.get(c), torch.nn.Module)]
            wrapped.add(backend, lambda: (probe_compile(device), _installed(Compiled(recipes, modules, lambda: wrapped.meter))))
        elif backend in GRAPH_BACKENDS:
            wrapped.add(backend, lambda backend=backend: _graph(backend, recipes, wrapped, device, model, cache, bounds))
        else:
            raise EngineError(f"unknown backend {backend!r}")
    return wrapped


def _installed(compiled: Compiled) -> Installed:
    return Installed(compiled.install, compiled.restore)


def _graph(backend: str, recipes: tuple[ExportRecipe, ...], stage: BackendStage, device: str, model: str,
           cache: ArtifactCache, bounds: SizeBounds | None) -> tuple[str, Installed]:
    if not recipes:
        raise BackendFailure(Reason.PROBE_FAILED, f"the family exports nothing of stage {stage.spec.name!r}")
    runner = graph_runner(backend)
    version = runner.probe(device, precision_of(recipes[0].module))
    calls = [GraphCall(runner, version, recipe, stage=stage.spec.name, model=model, device=device, cache=cache,
                       resident=Resident(resident_budget()), meter=lambda: stage.meter, bounds=bounds) for recipe in recipes]
    return version, GraphBackend(calls)


def stage_uses(stages: Mapping[str, Stage], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """What ran each of ``names`` that has a chain, for the last request (the worker's report to the controller)."""
    uses = {}
    for name in names:
        stage = stages[name]
        if isinstance(stage, BackendStage) and stage.last is not None:
            use = stage.last
            meter = use.meter
            uses[name] = {
                "asked": use.asked, "used": use.used,
                "chain": [{"backend": s.backend, "reason": s.reason.value if s.reason else None, "detail": s.detail}
                          for s in use.chain],
                "cache": meter.cache, "shapes": meter.shapes, "build_s": round(meter.build_s, 4), "load_s": round(meter.load_s, 4),
                "run_ms": round(meter.run_ms, 3),
                "parity": meter.parity.model_dump() if meter.parity is not None else None, "versions": use.versions,
            }
    return uses
