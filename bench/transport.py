"""Edge throughput on this host: the mooncake and shm channels end to end against raw baselines.

    python bench/transport.py [--json] [--repeats N] [--sizes-mib 1 16 64 256]

One receiver process holds a Mooncake pool, a shared-memory pool and a loopback socket; this process sends.
Rows (GB/s, medians over the repeats):
  mooncake channel   send_tensors: grant, pack into staging, xxh3 per tensor, Mooncake TCP write (submit +
                     poll), deliver, receiver verifies, ack
  mooncake raw       transfer_sync_write of the same bytes from a registered buffer, nothing else
  socket             sendall / recv_into over loopback TCP, plus a one-byte ack
  shm channel        send_tensors over shared memory: pack into the slot, hash, deliver, verify, ack
  hash+verify share  (sender hash + receiver verify) / mooncake channel time, counted as if nothing overlapped
                     (the sender hashes while Mooncake writes, so the time it adds is lower)
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
from engine.transport.faults import Faults  # noqa: E402
from engine.transport.link import accept  # noqa: E402
from engine.transport.manifest import TensorHeader, tensor_digests  # noqa: E402

MIB = 1 << 20
TARGETS = "targets: mooncake channel >= 0.8x socket for >= 16 MiB; hash+verify <= 10% of edge time; shm >= 3x socket"


def receiver_main(max_bytes: int, conn: Connection) -> None:
    """The receiving process: answers grant/deliver/release for both pools, and receives socket payloads."""
    pools = {t: make_receiver(t, "bench", max_bytes, 1, quarantine_s=0.0) for t in ("mooncake", "shm")}
    listener = socket.create_server(("127.0.0.1", 0))
    sink = bytearray(max_bytes)
    conn.send_bytes(json.dumps({t: r.location for t, r in pools.items()} | {"socket_port": listener.getsockname()[1]}).encode())
    peer, _ = listener.accept()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(sink)
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except EOFError:
            break
        receiver = pools.get(message.get("transport"))
        if message["op"] == "grant":
            reply: dict[str, Any] = {"grant": receiver.grant(message["request_id"], message["nbytes"]).model_dump(mode="json")}
        elif message["op"] == "deliver":
            manifest = Manifest.model_validate(message["manifest"])
            start = time.perf_counter()
            ack, _ = accept(receiver, manifest)
            reply = {"ack": ack.model_dump(mode="json"), "verify_s": time.perf_counter() - start}
            receiver.release(manifest)
        elif message["op"] == "socket":
            got, nbytes = 0, message["nbytes"]
            while got < nbytes:
                got += peer.recv_into(view[got:nbytes])
            peer.sendall(b"k")
            continue
        conn.send_bytes(json.dumps(reply).encode())
    for receiver in pools.values():
        receiver.close()


class BenchLink:
    """An EdgeLink over the pipe to the receiving process; records the receiver's verify times."""

    def __init__(self, transport: str, conn: Connection):
        self.edge = "bench"
        self.transport = transport
        self.conn = conn
        self.verify_s: list[float] = []

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.conn.send_bytes(json.dumps(message | {"transport": self.transport}).encode())
        return json.loads(self.conn.recv_bytes())

    async def request_grant(self, request_id: str, nbytes: int) -> SlotGrant:
        return SlotGrant.model_validate(self.call({"op": "grant", "request_id": request_id, "nbytes": nbytes})["grant"])

    async def deliver(self, manifest: Manifest) -> Ack:
        reply = self.call({"op": "deliver", "manifest": manifest.model_dump(mode="json")})
        self.verify_s.append(reply["verify_s"])
        return Ack.model_validate(reply["ack"])

    async def fence(self, grant: SlotGrant, reason: str) -> None:
        raise RuntimeError(f"a benchmark write failed: {reason}")


def median_time(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def median_channel_time(sender, link: BenchLink, tensors: dict[str, torch.Tensor], repeats: int) -> float:
    """Median seconds of one send_tensors (grant to ack), after one warm-up, all in one event loop."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        await send_tensors(sender, link, tensors, f"{link.transport}-{i}")
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(sizes: list[int], repeats: int) -> dict[str, dict[str, float]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=receiver_main, args=(max(sizes), child), daemon=True)
    process.start()
    locations = json.loads(parent.recv_bytes())
    sock = socket.create_connection(("127.0.0.1", locations["socket_port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    senders = {t: make_sender(t, "bench", max(sizes), faults=Faults(), timeout_s=60.0) for t in ("mooncake", "shm")}
    for transport, sender in senders.items():
        sender.connect(locations[transport])
    raw_engine, raw_src = senders["mooncake"]._engine, senders["mooncake"]._staging_addr
    session, base = locations["mooncake"]["session"], locations["mooncake"]["base"]
    results: dict[str, dict[str, float]] = {k: {} for k in ("mooncake channel", "mooncake raw", "socket", "shm channel", "hash+verify share")}
    try:
        for nbytes in sizes:
            label = f"{nbytes // MIB} MiB"
            tensors = {"latents": torch.randn(nbytes // 2).to(torch.bfloat16)}
            links = {t: BenchLink(t, parent) for t in senders}
            channel = {t: asyncio.run(median_channel_time(senders[t], links[t], tensors, repeats)) for t in senders}
            raw = median_time(lambda: raw_engine.transfer_sync_write(session, raw_src, base, nbytes), repeats)
            payload = memoryview(bytearray(os.urandom(1024)) * (nbytes // 1024))

            def over_socket():
                parent.send_bytes(json.dumps({"op": "socket", "nbytes": nbytes}).encode())
                sock.sendall(payload)
                sock.recv(1)

            plain = median_time(over_socket, repeats)
            staged = senders["mooncake"]._staging[:nbytes]
            header = (TensorHeader(name="latents", dtype="uint8", shape=(nbytes,), offset=0, nbytes=nbytes),)
            hash_s = median_time(lambda: tensor_digests(staged, header), repeats)
            verify_s = statistics.median(links["mooncake"].verify_s)
            gbps = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
            results["mooncake channel"][label] = gbps(channel["mooncake"])
            results["mooncake raw"][label] = gbps(raw)
            results["socket"][label] = gbps(plain)
            results["shm channel"][label] = gbps(channel["shm"])
            results["hash+verify share"][label] = (hash_s + verify_s) / channel["mooncake"]
    finally:
        for sender in senders.values():
            sender.close()
        sock.close()
        parent.close()
        process.join(10)
    return results



def table(results: dict[str, dict[str, float]]) -> str:
    labels = list(next(iter(results.values())))
    lines = [f"{'GB/s (median)':<20}" + "".join(f"{label:>10}" for label in labels)]
    for row, values in results.items():
        if row.endswith("share"):
            cell = lambda v: f"{v * 100:9.1f}%"  # noqa: E731
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
