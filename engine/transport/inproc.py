"""Edges between two nodes in one process: the receiver gets the sender's tensors themselves, no copy.

Grants, generations and fencing work as on the other transports (the pool still bounds how many requests
are in flight on the edge), but no bytes move, so nothing can be corrupted in transit and there is nothing
to hash: the manifest's digest binds only the edge, the request and the headers, and the receiver checks
that the tensors handed over match those headers.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import PeerDead
from engine.transport.base import LandedHook, Receiver, Sender
from engine.transport.errors import PayloadMismatch
from engine.transport.manifest import Manifest, SlotGrant, combine, headers_for, payload_nbytes

_receivers: weakref.WeakValueDictionary[int, InprocReceiver] = weakref.WeakValueDictionary()
_ids = itertools.count()


class InprocReceiver(Receiver):
    transport = "inproc"

    def __init__(self, edge: str, slot_bytes: int, slots: int, *, quarantine_s: float | None = None, **options: Any):
        super().__init__(edge, slot_bytes, slots, quarantine_s=0.0 if quarantine_s is None else quarantine_s, **options)
        self._id = next(_ids)
        self._handed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        _receivers[self._id] = self

    @property
    def location(self) -> dict[str, Any]:
        return {"transport": "inproc", "receiver": self._id}

    def hand_over(self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor]) -> None:
        self.pool.check(grant.slot, grant.generation, grant.request_id)
        with self._lock:
            self._handed[(grant.slot, grant.generation)] = dict(tensors)

    def open(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        self._check(manifest)
        where = {"edge": self.edge, "request_id": manifest.request_id, "tensors": ()}
        with self._lock:
            tensors = self._handed.pop((manifest.slot, manifest.generation), None)
        if tensors is None:
            raise PayloadMismatch(f"nothing was handed over for slot {manifest.slot}", **where)
        if combine(self.edge, manifest.request_id, manifest.tensors, ()) != manifest.digest:
            raise PayloadMismatch("manifest digest mismatch: the headers, edge or request id were altered", **where)
        if headers_for(tensors) != manifest.tensors:
            raise PayloadMismatch("the tensors handed over do not match the manifest's headers", **where)
        self.pool.opened(manifest.slot)
        return tensors

    def close(self) -> None:
        with self._lock:
            self._handed.clear()
        _receivers.pop(self._id, None)


class InprocSender(Sender):
    transport = "inproc"

    def connect(self, location: dict[str, Any]) -> None:
        self._receiver(location)

    async def write(
        self, grant: SlotGrant, tensors: Mapping[str, torch.Tensor], request_id: str, on_landed: LandedHook | None = None
    ) -> Manifest:
        """Hand ``tensors`` to the receiver as they are (the caller must not modify them afterwards)."""
        self._check_grant(grant, request_id)
        headers = headers_for(tensors)
        self._receiver(grant.location).hand_over(grant, tensors)
        return Manifest(
            edge=self.edge, request_id=request_id, slot=grant.slot, generation=grant.generation, nbytes=payload_nbytes(tensors),
            tensors=headers, tensor_digests=(), digest=combine(self.edge, request_id, headers, ()),
        )

    def _receiver(self, location: dict[str, Any]) -> InprocReceiver:
        receiver = _receivers.get(location["receiver"])
        if receiver is None:
            raise PeerDead(f"no receiver {location['receiver']} in this process", edge=self.edge)
        return receiver

    def close(self) -> None:
        """Nothing to release."""

