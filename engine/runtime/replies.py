"""Waiting for a reply over the control plane: futures keyed by what the reply answers.

The worker's message loop resolves them; a peer's death fails every future waiting on that peer at once,
so a sender never waits a full timeout for a replica that is already gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

from engine.errors import EdgeTimeout, PeerDead


class Replies:
    def __init__(self) -> None:
        self._waiting: dict[Hashable, tuple[asyncio.Future[Any], tuple[str, int]]] = {}

    def expect(self, key: Hashable, peer: tuple[str, int]) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = (future, peer)
        return future

    def resolve(self, key: Hashable, value: Any) -> bool:
        entry = self._waiting.pop(key, None)
        if entry is None or entry[0].done():
            return False
        entry[0].set_result(value)
        return True

    def peer_died(self, peer: tuple[str, int], detail: str) -> None:
        for key, (future, waiting_on) in list(self._waiting.items()):
            if waiting_on == peer and not future.done():
                future.set_exception(PeerDead(f"{peer[0]}[{peer[1]}] died while we waited for it: {detail}"))
                self._waiting.pop(key, None)

    async def wait(self, key: Hashable, future: asyncio.Future[Any], timeout_s: float, what: str, edge: str, request_id: str) -> Any:
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise EdgeTimeout(f"no {what} within {timeout_s:g} s", edge=edge, request_id=request_id) from None
        finally:
            self._waiting.pop(key, None)
