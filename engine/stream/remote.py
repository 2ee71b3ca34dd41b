"""A decoder on another host streams through the collector: each chunk of frames is one more delivery on the edge
that brings the outputs back (:mod:`engine.plan.collector`), verified like every delivery.

A chunk goes under its own key, ``<request id>.stream-<n>``, so that its grant, delivery and acknowledgement are
questions of their own (answered once, kept apart from the request's final outputs). Its manifest carries the
edge's final output tensor with fewer frames: the collector expects the plan's shape with the frame dimension
(dimension 1 of ``[1, F, H, W, 3]``) at most the request's. The collector appends each chunk to the request's
stream file as it is verified, frees the slot at once, and ends the file when the request's outputs arrive or the
request is dropped. The decoder sends the chunks one after the other, each acknowledged before the next.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from engine.control.messages import REQUEST_ID_PATTERN
from engine.stream.sink import listening
from engine.transport.expect import Expected

FRAMES_DIM = 1  #: the frame dimension of a chunk, [1, f, H, W, 3]
_KEY = re.compile(r"^(?P<request>.+)\.stream-(?P<index>\d+)$")


def chunk_key(request_id: str, index: int) -> str | None:
    """The delivery key of chunk ``index`` of ``request_id``; None when it would be no valid request id (too long)."""
    key = f"{request_id}.stream-{index}"
    return key if re.fullmatch(REQUEST_ID_PATTERN, key) else None


def chunk_of(key: str) -> tuple[str, int] | None:
    """The request and chunk index a delivery key names; None for a request's own deliveries."""
    found = _KEY.fullmatch(key)
    return (found["request"], int(found["index"])) if found else None


def chunk_expected(expected: Sequence[Expected]) -> tuple[Expected, ...]:
    """What a chunk delivery may carry: the plan's tensors with at most the request's frames."""
    return tuple(dataclasses.replace(e, variable=tuple(sorted({*e.variable, FRAMES_DIM}))) for e in expected)


class ChunkSender:
    """The decoder's sink when its outputs go to the collector: ``send(key, tensors)`` delivers one chunk (blocking
    the decode until it is acknowledged); ``check`` raises when the request was dropped."""

    def __init__(self, request_id: str, name: str, send: Callable[[str, dict[str, Any]], None], check: Callable[[], None]):
        self.request_id, self.name, self.send, self.check = request_id, name, send, check
        self.sent = 0

    def __call__(self, chunk: Any) -> None:
        self.check()
        key = chunk_key(self.request_id, self.sent)
        if key is not None:
            self.send(key, {self.name: chunk.contiguous()})
            self.sent += 1

    def feeding(self, compute: Callable[..., Any], *args: Any) -> Any:
        with listening(self):
            return compute(*args)
