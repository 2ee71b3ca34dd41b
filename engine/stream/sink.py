"""Where a stage hands the frames it has decoded so far: a context variable, set by whoever listens.

The worker that writes a request's final outputs listens while its decoder runs (:func:`listening`); the
decoder asks :func:`stream_sink` once and, with no listener, decodes exactly as it does without streaming. A
chunk is ``[1, f, H, W, 3]`` float frames in [0, 1], post-processed exactly as the stage's final frames, in
order; the chunks concatenated along frames are the final frames. A sink may raise (the request was cancelled):
the stage stops there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from engine.context import holding


FrameSink = Callable[[Any], None]  #: takes one chunk of frames (a torch tensor; typed loosely: torch-free module)

_SINK: ContextVar[FrameSink | None] = ContextVar("frame_sink", default=None)


@contextlib.contextmanager
def listening(sink: FrameSink) -> Iterator[None]:
    """Stages run in this block (on this thread) hand their chunks of frames to ``sink``."""
    with holding(_SINK, sink):
        yield


def stream_sink() -> FrameSink | None:
    """The active sink, or None when no one listens."""
    return _SINK.get()


def emit(chunk: Any) -> None:
    """Hand ``chunk`` to the active sink, if any."""
    sink = _SINK.get()
    if sink is not None:
        sink(chunk)
