"""Handing the heap's freed pages back to the system after each request.

glibc's malloc keeps what a process frees in its arenas (one per thread that allocated, and a worker runs its
stages and its edge hashing on pool threads) and returns to the system only the free top of each heap. A
worker's requests allocate and free activations of varying sizes, so its resident memory swings by the size of
a request's working set and creeps up with fragments, which reads as memory growing with the jobs a service
ran. ``malloc_trim(0)`` releases every free page of every arena (a few milliseconds); elsewhere (musl, macOS) it
is not there and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return getattr(ctypes.CDLL(name), "malloc_trim", None)


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
