"""The view of the live agents from the broker: who announced itself lately and what its devices offer.

Read by the controller (placing ``place.host: any`` nodes), ``engine hosts`` and ``engine plan --broker``; the
agent process itself lives in :mod:`engine.agent`.
"""

from __future__ import annotations

import os
import time

from engine.control.broker import BrokerAddress
from engine.control.messages import AgentBirth
from engine.control.topics import AgentTopics
from engine.plan.placement import Offer


def agent_offers(births: list[AgentBirth], lease_s: float, now: float | None = None) -> list[Offer]:
    """The devices the agents offer, from announcements fresher than ``lease_s`` (older ones are agents gone)."""
    now = time.time() if now is None else now
    return [Offer(birth.agent, device.name, device.free_bytes or 0) for birth in births
            if birth.state == "online" and now - birth.time < lease_s for device in birth.devices]


async def live_agents(broker: BrokerAddress, deploy_key: bytes, wait_s: float) -> list[AgentBirth]:
    """The latest authentic announcement of every agent heard on the broker within ``wait_s``."""
    from engine.control.client import ControlClient

    topics = AgentTopics()
    births: dict[str, AgentBirth] = {}
    async with ControlClient(broker, client_id=f"hosts-{os.getpid()}", key=deploy_key) as client:
        await client.subscribe(topics.all_births)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            inbound = await client.receive(left)
            if inbound is not None and isinstance(inbound.message, AgentBirth) and \
                    inbound.sender == topics.signer_of(inbound.message):
                births[inbound.message.agent] = inbound.message
    return list(births.values())
