"""The data plane's EdgeLink carried over the control plane (MQTT), for one outgoing edge and one target.

A sender asks the receiving replica for a slot (grant_request -> grant), writes the payload with its
transport while hinting at the ranges that have landed (landed), tells the receiver (delivered -> ack) and
on a failed write fences the slot (fence). Replies are matched by (kind, request, edge, attempt[, delivery])
and accepted only from the receiving replica; a receiver that dies fails the wait at once.

A question (grant_request, delivered) is asked again every ``RESEND_S`` until it is answered: a broker that
restarted may have dropped it or its answer. The receiver answers a repeated question with the answer it gave
(it keeps them), so asking again never grants a second slot nor verifies twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.control.client import ControlClient
from engine.control.messages import Delivered, Fence, GrantRequest, Landed, Message, ReplicaRef
from engine.control.topics import Topics
from engine.errors import ControlError, EdgeTimeout, TransportError
from engine.control.replies import Replies
from engine.transport import Ack, Manifest, SlotGrant

log = logging.getLogger(__name__)

RESEND_S = 2.0  #: how long a question waits for its answer before it is asked again


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
    request: dict[str, Any]  #: the request's parameters, sent with each delivery (see Delivered)
    deliveries: int = 0  #: payloads delivered so far (a retransmission is a new delivery)

    @property
    def _peer(self) -> tuple[str, int]:
        return (self.target.node, self.target.replica)

    def _inbox(self) -> str:
        return self.topics.inbox(self.target.node, self.target.replica)

    async def _ask(self, key: tuple, question: Message, what: str, request_id: str) -> Any:
        """Publish ``question`` (again every RESEND_S) until the reply keyed ``key`` arrives or the timeout ends."""
        future = self.replies.expect(key, self._peer)
        deadline = time.monotonic() + self.timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                await self.client.publish(self._inbox(), question)
                done, _ = await asyncio.wait([future], timeout=min(RESEND_S, max(0.0, left)))
                if done:
                    return future.result()
        finally:
            self.replies.forget(key)
            if not future.done():
                future.cancel()
        raise EdgeTimeout(f"no {what} from {self.target.node}[{self.target.replica}] within {self.timeout_s:g} s",
                          edge=self.edge, request_id=request_id)

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant:
        question = GrantRequest(request_id=request_id, edge=self.edge, attempt=self.attempt, sender=self.me, nbytes=nbytes)
        grant = await self._ask(("grant", request_id, self.edge, self.attempt), question, "slot grant", request_id)
        if grant.error is not None:
            raise TransportError(f"{self.target.node}[{self.target.replica}] refused a slot: {grant.error}",
                                 edge=self.edge, request_id=request_id)
        return SlotGrant.model_validate(grant.grant)

    async def landed(self, grant: SlotGrant, ranges: Sequence[tuple[int, int]]) -> None:
        try:
            await self.client.publish(self._inbox(), Landed(request_id=grant.request_id, edge=self.edge, attempt=self.attempt,
                                                            sender=self.me, slot=grant.slot, generation=grant.generation,
                                                            ranges=[[start, stop] for start, stop in ranges]))
        except ControlError as exc:  # only a hint: the receiver hashes these bytes at delivery instead
            log.debug("edge %r request %s: landed hint not sent: %s", self.edge, grant.request_id, exc)

    async def deliver(self, manifest: Manifest) -> Ack:
        delivery, self.deliveries = self.deliveries, self.deliveries + 1
        question = Delivered(request_id=manifest.request_id, edge=self.edge, attempt=self.attempt, delivery=delivery,
                             sender=self.me, manifest=manifest.model_dump(mode="json"), request=self.request)
        key = ("ack", manifest.request_id, self.edge, self.attempt, delivery)
        ack = await self._ask(key, question, "acknowledgement", manifest.request_id)
        return Ack(ok=ack.ok, reason=ack.reason, tensors=tuple(ack.tensors), retryable=ack.retryable)

    async def fence(self, grant: SlotGrant, reason: str) -> None:
        try:
            await self.client.publish(self._inbox(), Fence(request_id=grant.request_id, edge=self.edge, attempt=self.attempt,
                                                           sender=self.me, grant=grant.model_dump(mode="json"), reason=reason))
        except ControlError as exc:
            raise TransportError(f"cannot send the fence: {exc}", edge=self.edge, request_id=grant.request_id) from exc
