"""An outsider on the broker, and a key holder speaking out of turn, against a real run: real worker processes,
a real broker, real Mooncake transfers. On mosquitto the outsider is an anonymous client of an open broker; on
the embedded amqtt (which has no ACLs: there only the signatures keep clients apart) it holds a leaked broker
password. Every forged, unsigned, nested, replayed or misdirected message is refused, nothing is written
outside the run's folder, no secret is left on disk, and the run completes with the monolithic frames.

The controller runs in the test's process so that the test can also act as a holder of the run's key (a
compromised replica): even signed messages are acted on only when they come from whom they speak for, and
answer what was asked."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from engine.control.broker import BrokerAddress
from engine.control.signing import Sealer, new_key
from engine.plan.build import plan_graph
from engine.controller.controller import Controller, RunOptions
from engine.controller.tracker import State
from tests.integration.engine_run import GRAPHS, live_workers, mosquitto, reference_frames, wildcard_listeners

pytestmark = pytest.mark.integration


def _body(raw: bytes) -> dict:
    return json.loads(raw.partition(b"\n")[2])


class Eavesdropper:
    """An anonymous client of the broker that sees every message of the run."""

    def __init__(self, client: aiomqtt.Client, root: str):
        self.client = client
        self.root = root
        self.seen: list[tuple[str, bytes]] = []

    async def wait_for(self, topic_part: str, match: dict, timeout_s: float = 120) -> tuple[str, bytes]:
        async def scan() -> tuple[str, bytes]:
            async for raw in self.client.messages:
                self.seen.append((raw.topic.value, raw.payload))
                body = _body(raw.payload) if raw.payload else {}
                if topic_part in raw.topic.value and all(body.get(k) == v for k, v in match.items()):
                    return raw.topic.value, raw.payload
            raise AssertionError("the broker connection ended")

        return await asyncio.wait_for(scan(), timeout_s)

    async def send(self, topic: str, payload: bytes | str) -> None:
        await self.client.publish(f"{self.root}/{topic}", payload, qos=1)


async def broker_of(controller: Controller) -> BrokerAddress:
    """The run's broker as the outsider reaches it: the URL's address, or the embedded one with a leaked password."""
    if isinstance(controller.broker, BrokerAddress):
        return controller.broker
    while controller.client is None:  # the embedded broker starts with the run
        await asyncio.sleep(0.01)
    return controller.client.address


async def attacked_run(broker: str, out: Path, sneak: str):
    plan, _, source = plan_graph(GRAPHS / "wan_t2v_two_dit.yaml", [f"broker={broker}", "request.steps=30"])
    requests = [plan.requests[0], plan.requests[0].model_copy(update={"seed": 7})]
    controller = Controller(plan, source, RunOptions(out_dir=out, quiet=True, save_frames=True))
    root = controller.topics.root
    as_controller = Sealer(controller.access.key, controller.topics.controller_client)
    run = asyncio.create_task(controller.run(requests))
    address = await broker_of(controller)
    async with aiomqtt.Client(address.host, address.port, username=address.username, password=address.password,
                              identifier="outsider") as client:
        await client.subscribe(f"{root}/#", qos=1)
        spy = Eavesdropper(client, root)

        # The controller's first order to the encoder, captured for a replay.
        encoder_topic, encoder_order = await spy.wait_for("/in/encoder/0", {"kind": "run_stage", "request_id": "r1"})
        # r1's denoising goes to one transformer replica; the other will claim to have done it.
        dit_topic, _ = await spy.wait_for("/in/transformer/", {"kind": "run_stage", "request_id": "r1"})
        dit = int(dit_topic.rsplit("/", 1)[1])
        workers = live_workers(out)
        assert len(workers) == 4 and wildcard_listeners(workers) == []  # data-plane ports bind 127.0.0.1 only
        other = Sealer(controller.access.key, controller.topics.replica_client("transformer", 1 - dit))
        decoder = Sealer(controller.access.key, controller.topics.replica_client("decoder", 0))

        traversal = {"v": 1, "kind": "run_stage", "request_id": sneak, "request": requests[0].model_dump(mode="json"),
                     "node": "decoder", "attempt": 0, "deadline_s": 60, "segment": 2, "send_to": {}}
        done = {"v": 1, "kind": "stage_done", "request_id": "r1", "node": "transformer", "replica": 1 - dit, "attempt": 0,
                "timings": {}, "edges": {}, "outputs": [], "peak_rss_bytes": 0}
        shadow = {**done, "node": "decoder", "replica": 0, "outputs": ["/etc/shadow"]}
        nested = "[" * 2500 + "]" * 2500  # 5 KB
        ctl, decoder_inbox = f"{root}/ctl", f"{root}/in/decoder/0"

        await spy.send("in/decoder/0", json.dumps(traversal))  # 1. unsigned path traversal
        await spy.send("in/decoder/0", as_controller.seal_body(decoder_inbox, json.dumps(traversal).encode()))  # 2. signed
        await spy.send("ctl", json.dumps(shadow))  # 3. unsigned forged stage_done
        await spy.send("ctl", other.seal_body(ctl, json.dumps(done).encode()))  # 4. from a replica not dispatched
        await spy.send("ctl", decoder.seal_body(ctl, json.dumps(shadow).encode()))  # 5. decoder, not asked, /etc/shadow
        await spy.send("ctl", nested)  # 6. nested JSON, to the controller and to a worker
        await spy.send(f"in/transformer/{dit}", nested)
        await spy.send("ctl", as_controller.seal_body(ctl, nested.encode()))  # 7. nested, signed
        await spy.send("ctl", Sealer(new_key(), controller.topics.controller_client).seal_body(
            ctl, json.dumps(done).encode()))  # 8. wrong key
        await spy.send(encoder_topic.removeprefix(root + "/"), encoder_order)  # 9. replay
        await spy.send("in/decoder/0", other.seal_body(decoder_inbox, json.dumps(traversal | {"request_id": "r9"}).encode()))
        # ^ 10. a replica posing as the controller
        result = await asyncio.wait_for(run, 240)
    secrets = [controller.access.key.hex(), *(user.password for user in controller.access.users.values())]
    return result, dit, secrets


@pytest.mark.parametrize("broker", ["mosquitto", "embedded:amqtt"])
def test_forged_replayed_and_misdirected_messages_are_refused_and_the_run_completes(broker, tmp_path):
    out = tmp_path / "out"
    sneak = f"../../../../tmp/dge-trust-{uuid.uuid4().hex[:8]}"
    if broker == "mosquitto":
        with mosquitto(tmp_path) as url:
            result, dit, secrets = asyncio.run(attacked_run(url, out, sneak))
    else:
        result, dit, secrets = asyncio.run(attacked_run(broker, out, sneak))
        assert len(secrets) == 1 + 5  # the run key, and a broker password per process (controller, 4 workers)

    assert [r.state for r in result.requests] == [State.DONE, State.DONE], [r.error for r in result.requests]
    for request in result.requests:  # frames as the monolithic pipeline makes them
        params = json.loads((out / f"{request.id}.json").read_text())["request"]
        expected = reference_frames("t2v", json.dumps(params, sort_keys=True))
        assert np.array_equal(np.load(out / f"{request.id}.npy"), expected)
        assert all(Path(path).parent == out for path in request.outputs)
    assert not list(Path("/tmp").glob(f"{Path(sneak).name}*")), "a file was written outside the output folder"
    assert not (out / "r9.json").exists()

    refused = result.refused
    assert refused["unsigned"] >= 2 and refused["too deep"] == 1 and refused["bad signature"] == 1, refused
    assert refused["impostor"] == 2, refused  # 4 (not dispatched there) and 5 (not asked)
    logs = {name: (out / "deploy" / f"{name}.log").read_text() for name in ("encoder-0", "decoder-0", f"transformer-{dit}")}
    assert "unsigned" in logs["decoder-0"] and "invalid" in logs["decoder-0"] and "request_id" in logs["decoder-0"]
    assert "dropped 'run_stage' signed by" in logs["decoder-0"]  # 10
    assert "replayed" in logs["encoder-0"]
    assert "unsigned" in logs[f"transformer-{dit}"]
    assert live_workers(out) == []
    written = b"".join(path.read_bytes() for path in out.rglob("*") if path.is_file())
    assert not [secret for secret in secrets if secret.encode() in written], "a secret was left on disk"
