"""Control-plane dispatch latency over MQTT, mosquitto against amqtt; and the data plane's edge throughput.

    python bench/control.py [--json] [--messages 1000] [--brokers mosquitto amqtt] [--no-transport]

For each embedded broker (as ``broker: embedded`` starts it: mosquitto as a process, amqtt inside the
controller's process), a controller-side ``ControlClient`` hands ``run_stage`` messages one at a time to a
worker-side client in another process, which answers each with a ``stage_done``, as a worker does: QoS 1,
the engine's JSON messages with a real Wan request in them, TCP_NODELAY as the engine sets it. Per message:

- dispatch: from the controller starting the publish to the worker having the decoded message (one way;
  ``time.monotonic`` is one clock for every process on Linux);
- publish ack: the controller's QoS 1 publish until the broker's PUBACK (the controller, like this benchmark,
  publishes in a task and reads replies meanwhile);
- round trip: from the publish to the controller having the decoded ``stage_done``.

Percentiles over ``--messages`` hand-offs after 20 warm-ups. Then, unless ``--no-transport``, the data plane:
bench/transport.py's table at the Wan2.1 480P edge payloads (phase2 latents 8.0 MiB, phase1 27.3 MiB: sizes
8 and 28 MiB), 3 repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, finish_machine, machine, machine_line, percentile  # noqa: E402

WARMUP = 20
NODE, REPLICA = "transformer", 0
REQUEST = {"prompt": "a sun rising over a quiet valley, slow camera pan", "negative_prompt": "blurry, distorted",
           "height": 480, "width": 832, "num_frames": 81, "steps": 50, "guidance_scale": 5.0, "flow_shift": None,
           "fps": 16, "seed": 42, "image": "/data/first_frame.png"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="timed hand-offs per broker (after 20 warm-ups)")
    parser.add_argument("--brokers", nargs="+", choices=("mosquitto", "amqtt"), default=["mosquitto", "amqtt"])
    parser.add_argument("--no-transport", action="store_true", help="skip bench/transport.py's edge throughput table")
    parser.add_argument("--transport-sizes-mib", type=int, nargs="+", default=[8, 28], help="edge payload sizes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.messages < 2:
        parser.error("--messages must be at least 2")
    return args


# -- the worker side, in its own process ----------------------------------------------------------------------

def responder_main(broker: dict, run_id: str, key: bytes, count: int, conn: Connection) -> None:
    received = asyncio.run(respond(broker, run_id, key, count))
    conn.send(received)
    conn.close()


async def respond(broker: dict, run_id: str, key: bytes, count: int) -> dict[str, float]:
    """Answer ``count`` run_stage messages with stage_done; the monotonic time each one arrived, by request id."""
    import os

    from engine.control import BrokerAddress, ControlClient, Topics
    from engine.control.messages import EdgeStats, RunStage, StageDone, Status

    topics = Topics(run_id)
    received: dict[str, float] = {}
    async with ControlClient(BrokerAddress(**broker), client_id=topics.replica_client(NODE, REPLICA), key=key) as client:
        await client.subscribe(topics.inbox(NODE, REPLICA))
        await client.publish(topics.status(NODE, REPLICA), Status(node=NODE, replica=REPLICA, state="ready", pid=os.getpid(),
                                                                 host="bench", receive_edges={}, param_bytes=0, load_s=0.0))
        edges = {"phase2": EdgeStats(nbytes=8386560, tensor_bytes=8386560, seconds=0.01, digest="0" * 32)}
        while len(received) < count:
            inbound = await client.receive(30.0)
            if inbound is None:
                raise TimeoutError(f"no run_stage within 30 s after {len(received)} of {count}")
            message = inbound.message
            if not isinstance(message, RunStage):
                continue
            received[message.request_id] = time.monotonic()
            await client.publish(topics.controller, StageDone(
                request_id=message.request_id, node=NODE, replica=REPLICA, attempt=message.attempt,
                timings={"denoise": 1.0}, edges=edges, outputs=[], peak_rss_bytes=1 << 30))
    return received


# -- the controller side ----------------------------------------------------------------------------------------

async def next_message(client, worker, what: str, timeout_s: float = 30.0):
    """The next inbound message; an error if the responder process died or nothing came within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inbound = await client.receive(0.2)
        if inbound is not None:
            return inbound
        if worker.exitcode is not None:
            raise RuntimeError(f"the responder process exited with code {worker.exitcode} while waiting for {what}")
    raise TimeoutError(f"no {what} within {timeout_s:g} s")


async def hand_offs(kind: str, count: int) -> dict:
    import dataclasses

    from engine.control import ControlClient, Topics, embedded_broker
    from engine.control.messages import RunStage, StageDone, Status
    from engine.control.signing import new_key

    run_id = f"bench-{kind}-{int(time.time())}"
    topics = Topics(run_id)
    key = new_key()
    total = WARMUP + count
    async with embedded_broker(kind) as address:  # type: ignore[arg-type]
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        worker = context.Process(target=responder_main, args=(dataclasses.asdict(address), run_id, key, total, child),
                                 daemon=True)
        async with ControlClient(address, client_id=topics.controller_client, key=key) as client:
            await client.subscribe(topics.controller)
            await client.subscribe(topics.all_status)
            worker.start()
            while True:  # the worker is subscribed once it says ready
                inbound = await next_message(client, worker, "the responder's ready status")
                if isinstance(inbound.message, Status) and inbound.message.state == "ready":
                    break
            sent, acked, answered = {}, {}, {}
            for i in range(total):
                request_id = f"q{i}"
                message = RunStage(request_id=request_id, request=REQUEST, node=NODE, attempt=0, deadline_s=3600.0,
                                   segment=1, send_to={"phase2": 0})
                sent[request_id] = time.monotonic()
                # As the controller dispatches: the publish runs as a task, replies are read meanwhile.
                publish = asyncio.create_task(client.publish(topics.inbox(NODE, REPLICA), message))
                publish.add_done_callback(lambda _, r=request_id: acked.__setitem__(r, time.monotonic()))
                while request_id not in answered:
                    inbound = await next_message(client, worker, f"stage_done for {request_id}")
                    if isinstance(inbound.message, StageDone):
                        answered[inbound.message.request_id] = time.monotonic()
                await publish
            received = await asyncio.to_thread(parent.recv)
            await client.clear_retained(topics.status(NODE, REPLICA))
        await asyncio.to_thread(worker.join, 10)
    timed = [f"q{i}" for i in range(WARMUP, total)]
    series = {"dispatch": [received[r] - sent[r] for r in timed], "publish_ack": [acked[r] - sent[r] for r in timed],
              "round_trip": [answered[r] - sent[r] for r in timed]}
    return {name: {"p50_ms": percentile(v, 50) * 1e3, "p99_ms": percentile(v, 99) * 1e3, "mean_ms": sum(v) / len(v) * 1e3,
                   "max_ms": max(v) * 1e3} for name, v in series.items()} | {"messages": count}


def measure(args: argparse.Namespace) -> dict:
    from engine.control.broker import find_mosquitto

    info = machine()
    brokers = {}
    for kind in args.brokers:
        if kind == "mosquitto" and find_mosquitto() is None:
            brokers[kind] = {"skipped": "mosquitto is not installed"}
            continue
        brokers[kind] = asyncio.run(hand_offs(kind, args.messages))
    result = {"benchmark": "control", "brokers": brokers}
    if not args.no_transport:
        from bench import transport

        started = time.perf_counter()
        result["transport"] = transport.with_ratios(transport.measure([s << 20 for s in args.transport_sizes_mib], 3))
        result["transport_seconds"] = time.perf_counter() - started
    result["machine"] = finish_machine(info)
    return result


def render(result: dict) -> str:
    from engine.display import table

    lines = ["Control plane: run_stage hand-off controller -> worker process and stage_done back, QoS 1, one at a time", ""]
    rows = []
    for kind, figures in result["brokers"].items():
        if "skipped" in figures:
            rows.append([kind, figures["skipped"], "", "", "", "", ""])
            continue
        rows.append([kind, f"{figures['dispatch']['p50_ms']:.2f}", f"{figures['dispatch']['p99_ms']:.2f}",
                     f"{figures['publish_ack']['p50_ms']:.2f}", f"{figures['round_trip']['p50_ms']:.2f}",
                     f"{figures['round_trip']['p99_ms']:.2f}", figures["messages"]])
    lines.append(table(["broker", "dispatch p50 ms", "dispatch p99 ms", "puback p50 ms", "round trip p50 ms",
                        "round trip p99 ms", "messages"], rows))
    if "transport" in result:
        from bench import transport

        lines += ["", "Data plane (bench/transport.py, 480P edge payload sizes, 3 repeats):", transport.table(result["transport"])]
    lines.append(machine_line(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(measure(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
