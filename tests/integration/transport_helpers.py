"""A receiver in its own process and an EdgeLink to it over a pipe, for the transport integration tests.

Messages on the pipe are JSON (``send_bytes``/``recv_bytes``), the same shapes the runtime sends over MQTT:
``grant`` -> SlotGrant or an error, ``landed`` one-way, ``deliver`` -> Ack (plus, for the tests, a SHA-256
of every received tensor's bytes, an independent check of what arrived), ``fence`` one-way, ``release``,
``peek`` (a slot's state and the SHA-256 of its first bytes, to watch a late write land) and ``hinted``
(every landed hint received so far).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from engine.errors import EdgeTimeout, PeerDead, TransportError
from engine.transport import Ack, Manifest, SlotGrant, SlotsExhausted

CALL_TIMEOUT_S = 10.0


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def serve(transport: str, edge: str, slot_bytes: int, slots: int, options: dict[str, Any], conn: Connection) -> None:
    """The receiver process: owns the pool and answers the link's messages until the pipe closes."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    from engine.transport import accept, make_receiver

    receiver = make_receiver(transport, edge, slot_bytes, slots, **options)
    conn.send_bytes(json.dumps({"location": receiver.location}).encode())
    opened: dict[str, dict[str, torch.Tensor]] = {}
    hinted: list[list[list[int]]] = []  # the ranges of every landed hint, for the tests to see
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except EOFError:
            break
        op = message["op"]
        if op == "grant":
            try:
                grant = receiver.grant(message["request_id"], message["nbytes"])
                reply: dict[str, Any] = {"grant": grant.model_dump(mode="json")}
            except SlotsExhausted as exc:
                reply = {"error": "SlotsExhausted", "message": exc.detail, "retry_after_s": exc.retry_after_s}
            except TransportError as exc:
                reply = {"error": "TransportError", "message": exc.detail}
        elif op == "deliver":
            manifest = Manifest.model_validate(message["manifest"])
            ack, views = accept(receiver, manifest)
            reply = {"ack": ack.model_dump(mode="json")}
            if views is not None:
                reply["sha256"] = {name: tensor_sha256(view) for name, view in views.items()}
                opened[manifest.request_id] = views
        elif op == "landed":
            receiver.landed(message["slot"], message["generation"], message["request_id"], message["ranges"])
            hinted.append(message["ranges"])
            continue
        elif op == "hinted":
            reply = {"ranges": hinted}
        elif op == "fence":
            receiver.fence(SlotGrant.model_validate(message["grant"]))
            continue
        elif op == "release":
            manifest = Manifest.model_validate(message["manifest"])
            opened.pop(manifest.request_id, None)
            receiver.release(manifest)
            continue
        elif op == "peek":
            state = receiver.pool.state(message["slot"])
            data = receiver._slot_bytes(message["slot"])[: message["nbytes"]]
            reply = {"state": state.state.value, "generation": state.generation, "sha256": tensor_sha256(data)}
        else:
            reply = {"error": "TransportError", "message": f"unknown op {op!r}"}
        conn.send_bytes(json.dumps(reply).encode())
    receiver.close()


@dataclass
class ReceiverProcess:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    location: dict[str, Any]

    def stop(self) -> None:
        self.conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def freeze(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until the kernel reports it stopped (the signal is delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop in {timeout_s} s")
        time.sleep(0.001)


def start_receiver(transport: str, edge: str, slot_bytes: int, slots: int, **options: Any) -> ReceiverProcess:
    """Start a receiver process; it answers on the returned pipe once its pool is registered.

    Processes come from a fork server (a fresh interpreter, like spawn, that has imported torch and the
    engine once) so that each test's receiver starts in milliseconds rather than re-importing torch.
    """
    ctx = multiprocessing.get_context("forkserver")
    # Python 3.11's fork server does not take the test's sys.path, so preload what it can import: the engine.
    ctx.set_forkserver_preload(["engine.transport.mooncake", "engine.transport.shm", "mooncake.engine"])
    parent, child = ctx.Pipe()
    process = ctx.Process(target=serve, args=(transport, edge, slot_bytes, slots, options, child), daemon=True)
    process.start()
    child.close()
    if not parent.poll(60):
        process.kill()
        raise RuntimeError("receiver process did not start in 60 s")
    location = json.loads(parent.recv_bytes())["location"]
    return ReceiverProcess(process, parent, location)


class PipeLink:
    """EdgeLink over the pipe to a receiver process (the test twin of the runtime's MQTT link)."""

    def __init__(self, edge: str, conn: Connection, timeout_s: float = CALL_TIMEOUT_S):
        self.edge = edge
        self.conn = conn
        self.timeout_s = timeout_s
        self.acks: list[Ack] = []
        self.received: dict[str, dict[str, str]] = {}  # request id -> tensor name -> sha256 on the receiver

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant:
        reply = await self.call({"op": "grant", "request_id": request_id, "nbytes": nbytes}, request_id)
        if reply.get("error") == "SlotsExhausted":
            raise SlotsExhausted(reply["message"], edge=self.edge, request_id=request_id, retry_after_s=reply["retry_after_s"])
        if "error" in reply:
            raise TransportError(reply["message"], edge=self.edge, request_id=request_id)
        return SlotGrant.model_validate(reply["grant"])

    async def deliver(self, manifest: Manifest) -> Ack:
        reply = await self.call({"op": "deliver", "manifest": manifest.model_dump(mode="json")}, manifest.request_id)
        ack = Ack.model_validate(reply["ack"])
        self.acks.append(ack)
        if ack.ok:
            self.received[manifest.request_id] = reply["sha256"]
        return ack

    async def landed(self, grant: SlotGrant, ranges) -> None:
        message = {"op": "landed", "slot": grant.slot, "generation": grant.generation, "request_id": grant.request_id}
        self.send(message | {"ranges": [list(r) for r in ranges]}, grant.request_id)

    async def hinted(self) -> list[list[list[int]]]:
        return (await self.call({"op": "hinted"}, None))["ranges"]

    async def fence(self, grant: SlotGrant, reason: str) -> None:
        self.send({"op": "fence", "grant": grant.model_dump(mode="json"), "reason": reason}, grant.request_id)

    def release(self, manifest: Manifest) -> None:
        self.send({"op": "release", "manifest": manifest.model_dump(mode="json")}, manifest.request_id)

    async def peek(self, slot: int, nbytes: int) -> dict[str, Any]:
        return await self.call({"op": "peek", "slot": slot, "nbytes": nbytes}, None)

    def send(self, message: dict[str, Any], request_id: str | None) -> None:
        try:
            self.conn.send_bytes(json.dumps(message).encode())
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise PeerDead(f"receiver pipe closed ({exc})", edge=self.edge, request_id=request_id) from exc

    async def call(self, message: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        self.send(message, request_id)
        try:
            ready = await asyncio.to_thread(self.conn.poll, self.timeout_s)
            if not ready:
                raise EdgeTimeout(f"no answer to {message['op']} in {self.timeout_s} s", edge=self.edge, request_id=request_id)
            return json.loads(self.conn.recv_bytes())
        except (EOFError, ConnectionResetError) as exc:
            raise PeerDead(f"receiver pipe closed during {message['op']}", edge=self.edge, request_id=request_id) from exc
