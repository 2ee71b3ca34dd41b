"""What step caching did for one stage run of one request, as the worker reports it with the stage's result.

Torch-free: the worker, the control messages and the controller's report import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from engine.context import holding
from engine.spec.schema import StepCacheSpec
from engine.stages import RequestParams

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.stepcache.cache import StepCache

_COLLECTOR: ContextVar[list[Any] | None] = ContextVar("step_cache_collector", default=None)


def with_node_cache(request: RequestParams, node_cache: StepCacheSpec | None) -> RequestParams:
    """The request with the step caching in force for it: its own ``cache`` field, else its node's."""
    if request.cache is not None or node_cache is None:
        return request
    return request.model_copy(update={"cache": node_cache})


@contextlib.contextmanager
def collect() -> Iterator[list[StepCache]]:
    """The step caches opened on this thread while the block runs, in order."""
    with holding(_COLLECTOR, []) as caches:
        yield caches


def opened(cache: StepCache) -> None:
    """Hand a freshly opened cache to the active :func:`collect`, if any."""
    collector = _COLLECTOR.get()
    if collector is not None:
        collector.append(cache)


class StepCacheStats(BaseModel):
    """DiT passes (one transformer call of one guidance branch at one step) run and skipped, and the time saved."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="none, teacache, magcache or fbcache")
    threshold: float
    passes_run: int = 0
    passes_skipped: int = 0
    seconds_saved: float = Field(0.0, description="skipped passes times a computed pass's mean time, less the time the "
                                                  "skipped passes took (their embeddings, head and first block)")

    def plus(self, other: StepCacheStats) -> StepCacheStats:
        """Both runs' counts together (the settings of the first)."""
        return self.model_copy(update={"passes_run": self.passes_run + other.passes_run,
                                       "passes_skipped": self.passes_skipped + other.passes_skipped,
                                       "seconds_saved": round(self.seconds_saved + other.seconds_saved, 4)})
