"""Loaded artifacts of one stage and backend, least recently used first out beyond a budget of sizes."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Hashable

from engine.backends.runners.base import Session
from engine.errors import EngineError

RESIDENT_ENV = "ENGINE_BACKEND_RESIDENT"
log = logging.getLogger("engine.backends")


def resident_budget() -> int:
    """Artifacts a stage keeps loaded per backend (``ENGINE_BACKEND_RESIDENT``, default 1): a static artifact serves
    one input shape, so a request of another size loads its own and the least recently used goes; a dynamic one
    serves every size of its range."""
    raw = os.environ.get(RESIDENT_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise EngineError(f"{RESIDENT_ENV}={raw!r}; expected a whole number of sizes, 1 or more")
    return int(raw)


class Resident:
    def __init__(self, budget: int):
        self.budget = budget
        self.sessions: OrderedDict[Hashable, Session] = OrderedDict()
        self.evicted = 0

    def get(self, key: Hashable) -> Session | None:
        session = self.sessions.get(key)
        if session is not None:
            self.sessions.move_to_end(key)
        return session

    def put(self, key: Hashable, session: Session) -> None:
        self.sessions[key] = session
        self.sessions.move_to_end(key)
        while len(self.sessions) > self.budget:
            old, _ = self.sessions.popitem(last=False)
            self.evicted += 1
            log.info("released the artifact for %s (more than %d resident)", old, self.budget)
