"""Where a scale-out's new replica goes: a device with room for one replica's bytes, now.

At deploy the planner places whole nodes (:mod:`engine.plan.placement`). A replica added later goes where one
replica's bytes (its weights and receive buffers, from the memory report) fit in what is free at that moment:

- a node placed on this host (``host: local``): a local device of its kind (cpu, cuda, xpu), by the memory free
  on it now;
- a node with ``place.host: any``: a live agent's device of its kind, by the memory the agent last announced free;
- a node on a named agent: that agent's devices of its kind.

Among the devices with room it prefers one that no replica of the deployment uses (a free device), then the one
with the most room. Replicas started there and not ready yet hold nothing so far: their bytes count against the
free memory until they are. Nothing with room is :class:`NoRoom`, saying what the replica needs and what each
device has. A several-device replica (``place.devices``) is started on its node's own devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.display import human_bytes
from engine.plan.host import local_devices, local_free
from engine.plan.model import Plan
from engine.plan.placement import Offer

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.controller.fleet import Fleet

Where = tuple[str, str]  #: (host: "local" or an agent, device)


@dataclass(frozen=True)
class Spot:
    host: str
    device: str
    reason: str  #: why there, for the scale event

    @property
    def where(self) -> Where:
        return (self.host, self.device)


@dataclass(frozen=True)
class NoRoom:
    reason: str


@dataclass(frozen=True)
class Placed:
    """A replica of the deployment where it runs: loaded (its bytes show in the free memory) or not yet."""

    where: Where
    bytes: int
    loaded: bool


def choose_spot(need: int, offers: Sequence[Offer], placed: Sequence[Placed]) -> Spot | NoRoom:
    """The device among ``offers`` with room for ``need`` bytes (see the module's docstring), or why none has."""
    pending: dict[Where, int] = {}
    users: dict[Where, int] = {}
    for replica in placed:
        users[replica.where] = users.get(replica.where, 0) + 1
        if not replica.loaded:
            pending[replica.where] = pending.get(replica.where, 0) + replica.bytes
    room = {(o.agent, o.device): o.free_bytes - pending.get((o.agent, o.device), 0) for o in offers}
    fitting = [where for where, left in room.items() if left >= need]
    if not fitting:
        has = ", ".join(f"{host} {device} {human_bytes(max(0, left))}" for (host, device), left in sorted(room.items()))
        return NoRoom(f"no room: a replica needs {human_bytes(need)}; " + (f"free: {has}" if has else "no device offered"))
    host, device = min(fitting, key=lambda where: (users.get(where, 0), -room[where], where))
    count = users.get((host, device), 0)
    return Spot(host, device, f"on {host} {device}: {human_bytes(room[(host, device)])} free for "
                              f"{human_bytes(need)}, " + (f"{count} replica(s) there already" if count else "a free device"))


def local_offers() -> list[Offer]:
    """This host's devices with the memory free on each now."""
    return [Offer("local", device, free) for device in local_devices() if (free := local_free(device)) is not None]


class ReplicaPlacer:
    """Picks the spot of each scale-out's replica. ``needs``: one replica's bytes per node; ``anywhere``: the nodes
    the graph placed with ``host: any``; ``agents()`` the live agents' offers, ``local()`` this host's."""

    def __init__(self, plan: Plan, needs: Mapping[str, int], anywhere: frozenset[str], *,
                 agents: Callable[[], list[Offer]] = list, local: Callable[[], list[Offer]] = local_offers):
        self.plan = plan
        self.needs = needs
        self.anywhere = anywhere
        self.agents = agents
        self.local = local

    def offers(self, node: str) -> list[Offer]:
        """The devices a new replica of ``node`` may go to, with their free memory."""
        planned = self.plan.nodes[node]
        kind = planned.device.partition(":")[0]
        if node in self.anywhere:
            offers = self.agents()
        elif planned.host == "local":
            offers = self.local()
        else:
            offers = [offer for offer in self.agents() if offer.agent == planned.host]
        return [offer for offer in offers if offer.device.partition(":")[0] == kind]

    def place(self, node: str, fleet: Fleet) -> Spot | NoRoom:
        """Where a new replica of ``node`` goes, given the replicas ``fleet`` runs now."""
        planned = self.plan.nodes[node]
        if planned.ranks > 1:
            return Spot(planned.host, planned.device, f"on {planned.host} {', '.join(planned.devices)}: its node's "
                                                      "devices (a several-device replica)")
        placed = [Placed(fleet.where(info), self.needs[info.node], info.state == "ready")
                  for info in fleet.replicas.values() if info.down is None]
        return choose_spot(self.needs[node], self.offers(node), placed)
