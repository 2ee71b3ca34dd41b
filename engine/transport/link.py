"""Moving one request's tensors across an edge: grant, write, deliver, retransmit, fence.

The sender's side talks to the receiver through an :class:`EdgeLink` (the runtime implements it over MQTT;
:class:`LocalLink` is the in-process twin). The receiver's side answers with :func:`accept`, so both
sides share one notion of what a delivery means, and :func:`send_tensors` holds the retransmission policy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import IntegrityError, TransportError
from engine.transport.base import Receiver, Sender
from engine.transport.errors import PayloadMismatch
from engine.transport.expect import Expected, mismatch
from engine.transport.manifest import Manifest, SlotGrant, payload_nbytes

log = logging.getLogger(__name__)


class Ack(BaseModel):
    """The receiver's answer to a delivered manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ok: bool = Field(description="the payload verified and was handed to the consuming stage")
    reason: str | None = Field(description="why not, when ok is false")
    tensors: tuple[str, ...] = Field(description="tensors whose bytes failed verification (may be empty)")
    retryable: bool = Field(
        True, description="false when the slot is no longer granted to this request, so writing again cannot help"
    )


class EdgeLink(Protocol):
    """The sender's view of the receiver's control endpoint for one edge.

    ``request_grant`` and ``deliver`` wait for the receiver's answer (under the link's own timeout, raising
    EdgeTimeout or PeerDead); ``fence`` is one-way and must not wait for the receiver, which may be hung.
    ``landed`` is a one-way hint (Receiver.landed) that must not raise: a hint that does not arrive only
    costs the receiver the time to hash those bytes at delivery. A grant the receiver refuses arrives as
    the TransportError the receiver raised.
    """

    edge: str

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant: ...

    async def landed(self, grant: SlotGrant, ranges: Sequence[tuple[int, int]]) -> None: ...

    async def deliver(self, manifest: Manifest) -> Ack: ...

    async def fence(self, grant: SlotGrant, reason: str) -> None: ...


def accept(
    receiver: Receiver, manifest: Manifest, expected: Sequence[Expected] | None = None
) -> tuple[Ack, dict[str, torch.Tensor] | None]:
    """The receiver's handling of a delivered manifest: the Ack to send back, and the views when it verified.

    With ``expected`` (what the plan has this edge carry for the manifest's request), a manifest that differs
    in a tensor's name, dtype or shape is refused before its bytes are verified, as not retryable (the sender
    would only send the same again), and its slot given back. On a PayloadMismatch the slot stays granted so
    the sender can retransmit into it. A manifest for a slot that is no longer granted to it (fenced, expired,
    released) is refused as not retryable.
    """
    wrong = mismatch(manifest, expected) if expected is not None else None
    if wrong is not None:
        receiver.discard(manifest)
        log.warning("edge %r request %s: delivery refused: %s", manifest.edge, manifest.request_id, wrong)
        return Ack(ok=False, reason=wrong, tensors=(), retryable=False), None
    try:
        views = receiver.open(manifest)
    except PayloadMismatch as exc:
        return Ack(ok=False, reason=exc.detail, tensors=exc.tensors), None
    except TransportError as exc:
        return Ack(ok=False, reason=exc.detail, tensors=(), retryable=False), None
    return Ack(ok=True, reason=None, tensors=()), views


async def send_tensors(
    sender: Sender, link: EdgeLink, tensors: Mapping[str, torch.Tensor], request_id: str, *, retries: int = 3
) -> Manifest:
    """Send ``tensors`` for ``request_id`` over the edge and return the manifest the receiver accepted.

    A payload the receiver rejects is written again into the same slot, up to ``retries`` times, then the
    slot is fenced and IntegrityError names the edge and the tensors. A write that fails or times out, or a
    delivery that gets no acknowledgement, fences the slot and raises (PeerDead, EdgeTimeout): retrying a
    dead or hung peer belongs to the caller, which can pick another replica. (A receiver that did open the
    payload ignores that fence, see SlotPool.fence.) A delivery refused as not retryable raises TransportError.
    """
    grant = await link.request_grant(request_id, payload_nbytes(tensors))
    ack: Ack | None = None
    for attempt in range(retries + 1):
        try:
            manifest = await sender.write(grant, tensors, request_id, functools.partial(link.landed, grant))
        except TransportError as exc:
            await _fence(link, grant, f"write failed: {exc}")
            raise
        try:
            ack = await link.deliver(manifest)
        except TransportError as exc:
            await _fence(link, grant, f"no acknowledgement: {exc}")
            raise
        if ack.ok:
            return manifest
        if not ack.retryable:
            raise TransportError(f"the receiver refused the delivery: {ack.reason}", edge=link.edge, request_id=request_id)
        log.warning("edge %r request %s: delivery %d rejected: %s", link.edge, request_id, attempt + 1, ack.reason)
    await _fence(link, grant, "payload rejected after every retransmission")
    names = ", ".join(repr(n) for n in ack.tensors) if ack.tensors else "the manifest"
    raise IntegrityError(
        f"{names} failed verification on {retries + 1} attempts (last: {ack.reason})", edge=link.edge, request_id=request_id
    )


async def _fence(link: EdgeLink, grant: SlotGrant, reason: str) -> None:
    """Tell the receiver to fence; if that fails too, the receiver's lease expiry fences the slot instead."""
    try:
        await link.fence(grant, reason)
    except TransportError as exc:
        log.warning("edge %r request %s: fencing slot %d failed (%s); its lease will fence it", link.edge, grant.request_id, grant.slot, exc)


class LocalLink:
    """An EdgeLink to a receiver in the same process: the in-process twin of the runtime's MQTT link.

    Accepted payloads are kept in ``delivered`` (request id -> views) for the consuming side to take.
    ``expected`` is what the receiver expects of every delivery (see :func:`accept`).
    """

    def __init__(self, receiver: Receiver, expected: Sequence[Expected] | None = None):
        self.edge = receiver.edge
        self.receiver = receiver
        self.expected = expected
        self.delivered: dict[str, dict[str, torch.Tensor]] = {}
        self.acks: list[Ack] = []

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant:
        return self.receiver.grant(request_id, nbytes)

    async def landed(self, grant: SlotGrant, ranges: Sequence[tuple[int, int]]) -> None:
        self.receiver.landed(grant.slot, grant.generation, grant.request_id, ranges)

    async def deliver(self, manifest: Manifest) -> Ack:
        ack, views = accept(self.receiver, manifest, self.expected)
        self.acks.append(ack)
        if views is not None:
            self.delivered[manifest.request_id] = views
        return ack

    async def fence(self, grant: SlotGrant, reason: str) -> None:
        self.receiver.fence(grant)
