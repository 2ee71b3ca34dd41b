"""Transport errors that carry more than a message: what the caller needs in order to react."""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import IntegrityError, TransportError


class PayloadMismatch(IntegrityError):
    """A delivered payload did not verify; ``tensors`` names the tensors whose bytes differ (may be empty
    when the manifest itself was altered)."""

    def __init__(self, message: str, *, edge: str, request_id: str, tensors: Sequence[str]):
        self.tensors = tuple(tensors)
        super().__init__(message, edge=edge, request_id=request_id)


class SlotsExhausted(TransportError):
    """No slot can be granted now; ``retry_after_s`` says when a fenced one clears (None: all are in use)."""

    def __init__(self, message: str, *, edge: str, request_id: str, retry_after_s: float | None):
        self.retry_after_s = retry_after_s
        super().__init__(message, edge=edge, request_id=request_id)
