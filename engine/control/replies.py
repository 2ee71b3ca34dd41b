"""Waiting for a reply over the control plane: futures keyed by what the reply answers.

The worker's message loop resolves them, with the replica that answered: a reply from any other replica
resolves nothing. A peer's death fails every future waiting on that peer at once, so a sender never waits a
full timeout for a replica that is already gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

from engine.errors import PeerDead


class Replies:
    def __init__(self) -> None:
        self._waiting: dict[Hashable, tuple[asyncio.Future[Any], tuple[str, int]]] = {}

    def expect(self, key: Hashable, peer: tuple[str, int]) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = (future, peer)
        return future

    def resolve(self, key: Hashable, value: Any, peer: tuple[str, int]) -> bool:
        """Hand ``value`` to whoever waits on ``key`` for ``peer``; False if nobody does (late, or not from them)."""
        entry = self._waiting.get(key)
        if entry is None or entry[0].done() or entry[1] != peer:
            return False
        del self._waiting[key]
        entry[0].set_result(value)
        return True

    def forget(self, key: Hashable) -> None:
        """Stop waiting on ``key``."""
        self._waiting.pop(key, None)

    def peer_died(self, peer: tuple[str, int], detail: str) -> None:
        for key, (future, waiting_on) in list(self._waiting.items()):
            if waiting_on == peer and not future.done():
                future.set_exception(PeerDead(f"{peer[0]}[{peer[1]}] died while we waited for it: {detail}"))
                self._waiting.pop(key, None)
