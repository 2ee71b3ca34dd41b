"""Where the previews of a stage run go: a sink the worker opens around the run, found by the denoising loop.

Torch-free: the worker imports it. A thread's sink is a context variable, so a loop on a thread without one (a
follower rank of a several-device replica, a test calling a stage directly) makes no preview.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from engine.context import holding


@dataclass(frozen=True)
class Picture:
    """One preview: the prediction after ``step`` of ``total`` steps, as a JPEG of ``width`` x ``height`` pixels."""

    step: int
    total: int
    width: int
    height: int
    jpeg: bytes


@dataclass(frozen=True)
class Sink:
    """Takes a picture every ``every`` steps (at steps ``every``, ``2 * every`` ...) and hands it to ``emit``."""

    every: int
    emit: Callable[[Picture], None]

    def wants(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


_SINK: ContextVar[Sink | None] = ContextVar("preview_sink", default=None)


@contextlib.contextmanager
def previews(sink: Sink | None) -> Iterator[None]:
    """Denoising loops run on this thread while the block runs send their previews to ``sink`` (None: none)."""
    with holding(_SINK, sink):
        yield


def active() -> Sink | None:
    """The sink open on this thread, if any."""
    return _SINK.get()


def cadence(request_every: int | None, node_every: int | None) -> int:
    """Steps between previews for a request: its own ``preview_every`` (0: none), else its node's, else none."""
    if request_every is not None:
        return request_every
    return node_every or 0
