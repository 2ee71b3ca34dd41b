"""A context variable holding a value for the length of a block.

The worker hands a stage run what it listens with (the step caches it collects, the preview sink, the frame sink)
this way rather than through every stage's signature: a stage asks the variable, and finds nothing when no one
listens (a follower rank, a test calling the stage directly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def holding(variable: ContextVar[T], value: T) -> Iterator[T]:
    """``variable`` is ``value`` on this thread while the block runs, then what it was before."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)
