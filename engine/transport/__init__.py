"""The data plane: edges that move a request's tensors from one node to another, verified.

The receiving node owns a pool of slots (:func:`make_receiver`), grants one per request, and opens a
delivered payload only after its xxh3-128 digest verifies; the sending node puts the tensors into the
granted slot as one contiguous region, hashing them on the way (:func:`make_sender`). :func:`send_tensors` runs one
transfer over an :class:`EdgeLink` (the control messages between the two), retransmitting on a mismatch
and fencing the slot after a failed write. Transports: ``mooncake`` (TCP or RDMA, any hosts), ``shm``
(same host), ``inproc`` (same process).
"""

from __future__ import annotations

from typing import Any

from engine.transport.base import Receiver, Sender
from engine.transport.errors import PayloadMismatch, SlotsExhausted
from engine.transport.faults import FaultPlan, Faults
from engine.transport.link import Ack, EdgeLink, LocalLink, accept, send_tensors
from engine.transport.manifest import ALIGNMENT, Manifest, SlotGrant, TensorHeader, payload_nbytes
from engine.transport.payload import pack, tensor_digests, unpack

TRANSPORTS = ("mooncake", "shm", "inproc")

__all__ = [
    "ALIGNMENT", "Ack", "EdgeLink", "FaultPlan", "Faults", "LocalLink", "Manifest", "PayloadMismatch", "Receiver",
    "Sender", "SlotGrant", "SlotsExhausted", "TRANSPORTS", "TensorHeader", "accept", "make_receiver",
    "make_sender", "pack", "payload_nbytes", "send_tensors", "tensor_digests", "unpack",
]


def make_receiver(transport: str, edge: str, slot_bytes: int, slots: int, **options: Any) -> Receiver:
    """A receive pool of ``slots`` slots of ``slot_bytes`` for ``edge``, allocated, pre-faulted and registered now.

    Options: ``quarantine_s`` (how long a fenced slot sits out), ``lease_s`` (an undelivered grant is fenced
    after this), ``integrity`` (``xxh3-128``, the default, or ``none``: payloads are not hashed), and for mooncake ``hostname``, ``protocol`` (tcp, rdma) and ``device_name``.
    """
    if transport == "mooncake":
        from engine.transport.mooncake import MooncakeReceiver

        return MooncakeReceiver(edge, slot_bytes, slots, **options)
    if transport == "shm":
        from engine.transport.shm import ShmReceiver

        return ShmReceiver(edge, slot_bytes, slots, **options)
    if transport == "inproc":
        from engine.transport.inproc import InprocReceiver

        return InprocReceiver(edge, slot_bytes, slots, **options)
    raise ValueError(f"edge {edge!r}: unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")


def make_sender(transport: str, edge: str, max_bytes: int, **options: Any) -> Sender:
    """A sender for ``edge`` able to write payloads of up to ``max_bytes``.

    Options: ``timeout_s`` (watchdog on one write), ``faults`` (a Faults to inject; default from
    ``ENGINE_TRANSPORT_FAULTS``), ``integrity`` (as the receiver's), and for mooncake ``hostname``, ``protocol`` and ``device_name``.
    """
    if transport == "mooncake":
        from engine.transport.mooncake import MooncakeSender

        return MooncakeSender(edge, max_bytes, **options)
    if transport == "shm":
        from engine.transport.shm import ShmSender

        return ShmSender(edge, max_bytes, **options)
    if transport == "inproc":
        from engine.transport.inproc import InprocSender

        return InprocSender(edge, max_bytes, **options)
    raise ValueError(f"edge {edge!r}: unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
