"""Mooncake's listening ports bind the configured address only, never every interface, and still carry payloads."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MC_LOG_LEVEL", "WARNING")

from transport_helpers import PipeLink, start_receiver, tensor_sha256  # noqa: E402

from engine.transport import make_sender, send_tensors  # noqa: E402
from engine.transport.faults import Faults  # noqa: E402
from engine.transport.mooncake import transfer_engine  # noqa: E402

pytestmark = pytest.mark.integration

EDGE = "phase1"
SLOT_BYTES = 1 << 20
WILDCARDS = {"00000000", "0" * 32}  # 0.0.0.0 and [::] as /proc/net/tcp and tcp6 print them


def listening(pid: int) -> list[tuple[str, int]]:
    """(address in /proc/net hex, port) of every TCP socket process ``pid`` listens on: what `ss -ltnp` shows."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((address, int(port, 16)))
    return found


def test_a_mooncake_receiver_listens_on_its_host_only_and_still_receives():
    process = start_receiver("mooncake", EDGE, SLOT_BYTES, 2, hostname="127.0.0.1")
    try:
        sockets = listening(process.process.pid)
        assert len(sockets) >= 2, sockets  # the handshake port and the TCP data port
        assert all(address == "0100007F" for address, _ in sockets), sockets  # 127.0.0.1, nothing on 0.0.0.0 or [::]
        port = int(process.location["session"].rsplit(":", 1)[1])
        assert port in {p for _, p in sockets}
        for _, p in sockets:  # another local address reaches none of them
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.2", p)) != 0, p

        sender = make_sender("mooncake", EDGE, SLOT_BYTES, faults=Faults(), timeout_s=10.0)
        sender.connect(process.location)
        link = PipeLink(EDGE, process.conn)
        tensors = {"latents": torch.randn(64, 1024), "mask": torch.arange(4096, dtype=torch.int64)}
        manifest = asyncio.run(send_tensors(sender, link, tensors, "req-0", retries=0))
        assert link.acks[-1].ok
        assert link.received["req-0"] == {name: tensor_sha256(t) for name, t in tensors.items()}
        link.release(manifest)
        sender.close()
        own_port = transfer_engine("127.0.0.1", "tcp", "").get_rpc_port()  # the sender's, in this process
        assert ("0100007F", own_port) in listening(os.getpid())
        assert not [s for s in listening(os.getpid()) if s[0] in WILDCARDS and s[1] == own_port]
    finally:
        process.stop()
