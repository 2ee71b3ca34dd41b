"""The data plane's EdgeLink carried over the control plane (MQTT), for one outgoing edge and one target.

A sender asks the receiving replica for a slot (grant_request -> grant), writes the payload with its
transport while hinting at the ranges that have landed (landed), tells the receiver (delivered -> ack) and
on a failed write fences the slot (fence). Replies are matched by (kind, request, edge, attempt); a receiver
that dies fails the wait at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from engine.control.client import ControlClient
from engine.control.messages import Delivered, Fence, GrantRequest, Landed, ReplicaRef
from engine.control.topics import Topics
from engine.errors import ControlError, TransportError
from engine.runtime.replies import Replies
from engine.transport import Ack, Manifest, SlotGrant

log = logging.getLogger(__name__)


@dataclass
class MqttEdgeLink:
    edge: str
    client: ControlClient
    topics: Topics
    replies: Replies
    me: ReplicaRef
    target: ReplicaRef
    attempt: int
    timeout_s: float

    @property
    def _peer(self) -> tuple[str, int]:
        return (self.target.node, self.target.replica)

    def _inbox(self) -> str:
        return self.topics.inbox(self.target.node, self.target.replica)

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant:
        key = ("grant", request_id, self.edge, self.attempt)
        future = self.replies.expect(key, self._peer)
        await self.client.publish(self._inbox(), GrantRequest(request_id=request_id, edge=self.edge, attempt=self.attempt,
                                                              sender=self.me, nbytes=nbytes))
        grant = await self.replies.wait(key, future, self.timeout_s, f"slot grant from {self.target.node}[{self.target.replica}]",
                                        self.edge, request_id)
        if grant.error is not None:
            raise TransportError(f"{self.target.node}[{self.target.replica}] refused a slot: {grant.error}",
                                 edge=self.edge, request_id=request_id)
        return SlotGrant.model_validate(grant.grant)

    async def landed(self, grant: SlotGrant, ranges: Sequence[tuple[int, int]]) -> None:
        try:
            await self.client.publish(self._inbox(), Landed(request_id=grant.request_id, edge=self.edge, attempt=self.attempt,
                                                            slot=grant.slot, generation=grant.generation,
                                                            ranges=[[start, stop] for start, stop in ranges]))
        except ControlError as exc:  # only a hint: the receiver hashes these bytes at delivery instead
            log.debug("edge %r request %s: landed hint not sent: %s", self.edge, grant.request_id, exc)

    async def deliver(self, manifest: Manifest) -> Ack:
        key = ("ack", manifest.request_id, self.edge, self.attempt)
        future = self.replies.expect(key, self._peer)
        await self.client.publish(self._inbox(), Delivered(request_id=manifest.request_id, edge=self.edge, attempt=self.attempt,
                                                           sender=self.me, manifest=manifest.model_dump(mode="json")))
        ack = await self.replies.wait(key, future, self.timeout_s, f"acknowledgement from {self.target.node}[{self.target.replica}]",
                                      self.edge, manifest.request_id)
        return Ack(ok=ack.ok, reason=ack.reason, tensors=tuple(ack.tensors), retryable=ack.retryable)

    async def fence(self, grant: SlotGrant, reason: str) -> None:
        try:
            await self.client.publish(self._inbox(), Fence(request_id=grant.request_id, edge=self.edge, attempt=self.attempt,
                                                           sender=self.me, grant=grant.model_dump(mode="json"), reason=reason))
        except ControlError as exc:
            raise TransportError(f"cannot send the fence: {exc}", edge=self.edge, request_id=grant.request_id) from exc
