"""``engine build``: every artifact a graph's backend chains need for its requests and ``limits``, ahead of time;
and the chains with what is built, for ``engine plan``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.backends.cache import ArtifactCache, Manifest
from engine.backends.names import GRAPH_BACKENDS, BackendFailure
from engine.plan.model import Plan
from engine.stages import ModelFamily, RequestParams


@dataclass(frozen=True)
class Built:
    """One artifact ``engine build`` looked at."""

    node: str
    stage: str
    backend: str
    inputs: str  #: the input shapes, 1x16x1x8x12
    outcome: str  #: hit, built, rebuilt (stale: ...), or the reason it cannot be had
    seconds: float
    parity: str


def build_artifacts(plan: Plan, family: ModelFamily, source: Path, requests: tuple[RequestParams, ...],
                    progress: Callable[[Built], None]) -> list[Built]:
    """Load each node with a graph backend in its chains (on this host), and build what its requests need: a
    dynamic artifact serving every size up to the plan's limits where the recipe has dynamic axes, else one static
    artifact per size."""
    from engine.backends.chain import BackendStage, GraphBackend, with_backends
    from engine.backends.graph import shapes_text

    done: list[Built] = []
    for node in plan.nodes.values():
        wanted = {stage: chain for stage, chain in node.backends.items() if set(chain) & set(GRAPH_BACKENDS)}
        if not wanted:
            continue
        components = family.load_components(plan.task, node.components, source, node.device, node.dtype)
        for stage_name, chain in wanted.items():
            stage = family.build_stage(plan.task, stage_name, components, node.device, node.dtype, plan.configs)
            wrapped = with_backends(stage, family, plan.task, node.name, chain, False, components, node.device, str(source),
                                    plan.limits)
            assert isinstance(wrapped, BackendStage)
            for backend in (b for b in chain if b in GRAPH_BACKENDS):
                installed = wrapped.backends.get(backend)
                if not isinstance(installed, GraphBackend):
                    failure = wrapped.dead[backend]
                    done.append(Built(node.name, stage_name, backend, "-", failure.reason.value, 0.0, failure.detail))
                    progress(done[-1])
                    continue
                for call in installed.calls:
                    listed: set[Path] = set()  #: artifacts listed already (a dynamic one serves several requests)
                    for inputs in dict.fromkeys(call.recipe.inputs(request) for request in requests):
                        started = time.perf_counter()
                        shapes = shapes_text(inputs)
                        wrapped.meter.cache = None
                        try:
                            found = call.ensure_built(inputs, build=True)
                            assert found.manifest is not None and found.manifest.parity is not None
                            if found.folder in listed:
                                continue
                            listed.add(found.folder)
                            shapes = found.manifest.inputs_text()
                            outcome, figures = wrapped.meter.cache or "hit", _figures(found.manifest)
                        except BackendFailure as failure:
                            outcome, figures = failure.reason.value, failure.detail
                        done.append(Built(node.name, stage_name, backend, shapes, outcome,
                                          time.perf_counter() - started, figures))
                        progress(done[-1])
    return done


def _figures(manifest: Manifest) -> str:
    """The parity gate's max abs difference: at the smallest and the largest shapes of a dynamic artifact."""
    checks = manifest.range.parity if manifest.range is not None else (manifest.parity,)
    return " / ".join(f"max abs {check.max_abs:.2g}" for check in checks if check is not None)


def chains(plan: Plan, source: Path, cache: ArtifactCache | None = None) -> Iterator[list[str]]:
    """Rows for ``engine plan``: node, stage, chain, and the input shapes built for each graph backend."""
    cache = cache or ArtifactCache()
    for node in plan.nodes.values():
        for stage, chain in node.backends.items():
            built = []
            for backend in (b for b in chain if b in GRAPH_BACKENDS):
                shapes = [manifest.inputs_text() for manifest in cache.manifests(backend, stage, str(source))]
                built.append(f"{backend}: {', '.join(shapes) if shapes else 'nothing built'}")
            yield [node.name, stage, " -> ".join(chain) + (" (strict)" if node.strict else ""),
                   "; ".join(built) or "-"]
