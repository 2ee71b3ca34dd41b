"""Edge throughput on this host: the mooncake and shm channels end to end against raw baselines.

    python bench/transport.py [--json] [--repeats N] [--sizes-mib 1 16 64 256]

One receiver process holds Mooncake and shared-memory pools and a loopback socket; this process sends.
Every repeat runs each row once, in turn, so a change in the machine's load hits all rows alike.
Rows (GB/s, medians over the repeats):
  mooncake channel     send_tensors: grant, Mooncake TCP writes of the tensor from where it lies, in 8 MiB
                       pieces, while the sender hashes it; the receiver hashes each piece as it is told it
                       landed; deliver, the receiver verifies what is left, ack
  mooncake, no digest  the same edge with integrity none: what the channel costs without hashing
  mooncake raw         transfer_sync_write of the same bytes from a registered buffer, nothing else
  socket               sendall / recv_into over loopback TCP, plus a one-byte ack
  shm channel          send_tensors over shared memory: copy into the slot hashing each chunk as it is
                       copied, deliver, verify, ack
  integrity added      (mooncake channel - mooncake, no digest) / mooncake channel: the edge time hashing
                       and verification add
  hash+verify work     (sender hash + receiver verify) / mooncake channel, as if nothing overlapped (the
                       sender hashes while Mooncake writes, so the time it adds is lower)
  verify at delivery   ms the mooncake receiver spends verifying once the manifest arrives (what it could not
                       hash as the pieces landed), beside "verify all" (the same payload with no hint)
Control messages travel over a pipe as JSON, as the runtime's would over MQTT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.transport import Ack, Manifest, SlotGrant, make_receiver, make_sender, send_tensors  # noqa: E402
from engine.transport.base import anonymous_memory  # noqa: E402
from engine.transport.faults import Faults  # noqa: E402
from engine.transport.link import accept  # noqa: E402
from engine.transport.mooncake import transfer_engine  # noqa: E402
from engine.transport.manifest import headers_for  # noqa: E402
from engine.transport.payload import source_digests, tensor_digests  # noqa: E402

MIB = 1 << 20
TARGETS = "targets: mooncake channel >= 0.8x socket for >= 16 MiB; integrity added <= 10% of edge time; shm >= 3x socket"
EDGES = {"mooncake": ("mooncake", "xxh3-128"), "mooncake, no digest": ("mooncake", "none"), "shm": ("shm", "xxh3-128")}


def receiver_main(max_bytes: int, conn: Connection) -> None:
    """The receiving process: answers grant/deliver for every pool, and receives socket payloads."""
    pools = {
        name: make_receiver(transport, "bench", max_bytes, 1, quarantine_s=0.0, integrity=integrity)
        for name, (transport, integrity) in EDGES.items()
    }
    listener = socket.create_server(("127.0.0.1", 0))
    sink = memoryview(anonymous_memory(max_bytes))
    conn.send_bytes(json.dumps({"pools": {n: r.location for n, r in pools.items()}, "socket_port": listener.getsockname()[1]}).encode())
    peer, _ = listener.accept()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except EOFError:
            break
        if message["op"] == "socket":
            got, nbytes = 0, message["nbytes"]
            while got < nbytes:
                got += peer.recv_into(sink[got:nbytes])
            peer.sendall(b"k")
            continue
        receiver = pools[message["edge"]]
        if message["op"] == "landed":
            receiver.landed(message["slot"], message["generation"], message["request_id"], message["ranges"])
            continue
        if message["op"] == "grant":
            reply: dict[str, Any] = {"grant": receiver.grant(message["request_id"], message["nbytes"]).model_dump(mode="json")}
        else:
            manifest = Manifest.model_validate(message["manifest"])
            start = time.perf_counter()
            ack, _ = accept(receiver, manifest)
            reply = {"ack": ack.model_dump(mode="json"), "verify_s": time.perf_counter() - start}
            receiver.release(manifest)
        conn.send_bytes(json.dumps(reply).encode())
    for receiver in pools.values():
        receiver.close()


class BenchLink:
    """An EdgeLink over the pipe to the receiving process; records the receiver's verify times."""

    def __init__(self, name: str, conn: Connection):
        self.edge = "bench"
        self.name = name
        self.conn = conn
        self.verify_s: list[float] = []

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.conn.send_bytes(json.dumps(message | {"edge": self.name}).encode())
        return json.loads(self.conn.recv_bytes())

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant:
        return SlotGrant.model_validate(self.call({"op": "grant", "request_id": request_id, "nbytes": nbytes})["grant"])

    async def landed(self, grant: SlotGrant, ranges) -> None:
        message = {"op": "landed", "slot": grant.slot, "generation": grant.generation, "request_id": grant.request_id}
        self.conn.send_bytes(json.dumps(message | {"ranges": list(ranges), "edge": self.name}).encode())

    async def deliver(self, manifest: Manifest) -> Ack:
        reply = self.call({"op": "deliver", "manifest": manifest.model_dump(mode="json")})
        self.verify_s.append(reply["verify_s"])
        return Ack.model_validate(reply["ack"])

    async def fence(self, grant: SlotGrant, reason: str) -> None:
        raise RuntimeError(f"a benchmark write failed: {reason}")


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(sizes: list[int], repeats: int) -> dict[str, dict[str, float]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=receiver_main, args=(max(sizes), child), daemon=True)
    process.start()
    hello = json.loads(parent.recv_bytes())
    sock = socket.create_connection(("127.0.0.1", hello["socket_port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    senders = {}
    for name, (transport, integrity) in EDGES.items():
        senders[name] = make_sender(transport, "bench", max(sizes), faults=Faults(), timeout_s=60.0, integrity=integrity)
        senders[name].connect(hello["pools"][name])
    engine = transfer_engine("127.0.0.1", "tcp", "")
    raw_memory = anonymous_memory(max(sizes))
    raw_source = torch.frombuffer(raw_memory, dtype=torch.uint8).random_(0, 256)
    engine.register_memory(raw_source.data_ptr(), raw_source.numel())
    session, base = hello["pools"]["mooncake"]["session"], hello["pools"]["mooncake"]["base"]
    rows = ("mooncake channel", "mooncake, no digest", "mooncake raw", "socket", "shm channel",
            "integrity added", "hash+verify work", "verify at delivery ms", "verify all ms")
    results: dict[str, dict[str, float]] = {row: {} for row in rows}
    loop = asyncio.new_event_loop()
    try:
        for nbytes in sizes:
            tensors = {"latents": torch.randn(nbytes // 2).to(torch.bfloat16)}
            headers = headers_for({"latents": raw_source[:nbytes]})
            links = {name: BenchLink(name, parent) for name in EDGES}
            counter = iter(range(1 << 30))

            def channel(name: str):
                return lambda: loop.run_until_complete(send_tensors(senders[name], links[name], tensors, f"r{next(counter)}"))

            def over_socket():
                parent.send_bytes(json.dumps({"op": "socket", "nbytes": nbytes}).encode())
                sock.sendall(memoryview(raw_memory)[:nbytes])
                sock.recv(1)

            runs = {
                "mooncake channel": channel("mooncake"),
                "mooncake, no digest": channel("mooncake, no digest"),
                "mooncake raw": lambda: engine.transfer_sync_write(session, raw_source.data_ptr(), base, nbytes),
                "socket": over_socket,
                "shm channel": channel("shm"),
                "hash": lambda: source_digests([tensors["latents"]]),
                "verify all": lambda: tensor_digests(raw_source[:nbytes], headers),
            }
            times: dict[str, list[float]] = {name: [] for name in runs}
            for repeat in range(repeats + 1):  # the first round warms up and is dropped
                for name, run in runs.items():
                    seconds = timed(run)
                    if repeat:
                        times[name].append(seconds)
            median = {name: statistics.median(values) for name, values in times.items()}
            verify_s = statistics.median(links["mooncake"].verify_s[1:])
            verify_all = median["verify all"]
            label = f"{nbytes // MIB} MiB"
            for name in ("mooncake channel", "mooncake, no digest", "mooncake raw", "socket", "shm channel"):
                results[name][label] = nbytes / median[name] / 1e9
            results["integrity added"][label] = 1 - median["mooncake, no digest"] / median["mooncake channel"]
            results["hash+verify work"][label] = (median["hash"] + verify_all) / median["mooncake channel"]
            results["verify at delivery ms"][label] = verify_s * 1e3
            results["verify all ms"][label] = verify_all * 1e3
    finally:
        loop.close()
        for sender in senders.values():
            sender.close()
        engine.unregister_memory(raw_source.data_ptr())
        sock.close()
        parent.close()
        process.join(10)
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    labels = list(next(iter(results.values())))
    lines = [f"{'GB/s (median)':<20}" + "".join(f"{label:>10}" for label in labels)]
    for row, values in results.items():
        if row in ("integrity added", "hash+verify work"):
            cell = lambda v: f"{v * 100:9.1f}%"  # noqa: E731
        elif row.endswith(" ms"):
            cell = lambda v: f"{v:10.1f}"  # noqa: E731
        elif row.endswith(" x"):
            cell = lambda v: f"{v:9.2f}x"  # noqa: E731
        else:
            cell = lambda v: f"{v:10.2f}"  # noqa: E731
        lines.append(f"{row:<20}" + "".join(cell(values[label]) for label in labels))
    return "\n".join(lines + [TARGETS])


def with_ratios(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add the rows the targets are stated in: channel/socket, channel/raw and shm/socket."""
    def ratio(a: str, b: str) -> dict[str, float]:
        return {k: results[a][k] / results[b][k] for k in results[a]}

    return results | {
        "channel/socket x": ratio("mooncake channel", "socket"),
        "channel/raw x": ratio("mooncake channel", "mooncake raw"),
        "shm/socket x": ratio("shm channel", "socket"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (after one warm-up)")
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64, 256], help="payload sizes in MiB")
    args = parser.parse_args()
    results = with_ratios(measure([size * MIB for size in args.sizes_mib], args.repeats))
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
