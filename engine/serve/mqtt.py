"""Jobs over MQTT: a signed ``submit_job`` on the service's submit topic, ``job_update`` messages back.

A client signs with the service's submit key (ENGINE_SUBMIT_KEY, else ``<state-dir>/submit.key``) under its own
client id; the service answers on that client's reply topic only, so no client can make the service publish
anywhere else. The body is validated exactly as the HTTP API's (``job`` has its fields); a repeated
``request_key`` from the same client is answered with the job it already made, never run twice. Updates follow
the job (status, progress) to its end, each new denoising preview inline once (``preview_jpeg_b64``); a completed
one names where to fetch the output, and a small image comes inline. On the embedded broker the service adds a broker user for itself and one for clients, whose
credentials it writes to ``<state-dir>/mqtt-client.json`` (mode 0600) once the broker is up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.control.broker import BrokerAddress, BrokerUser, EmbeddedBroker
from engine.control.client import ControlClient
from engine.control.messages import JobUpdate, SubmitJob
from engine.control.signing import new_key, read_key
from engine.control.topics import ServiceTopics
from engine.errors import ControlError
from engine.serve.bodies import ImageBody, InvalidRequest, VideoBody
from engine.serve.jobs import api_object
from engine.serve.service import QueueFull, Service, Unavailable, UnknownModel

log = logging.getLogger("engine.serve.mqtt")

INLINE_IMAGE_BYTES = 512 << 10  #: images up to this size come inline (base64) in the last update


def submit_key(state_dir: Path) -> bytes:
    """ENGINE_SUBMIT_KEY, else the key in ``<state-dir>/submit.key`` (made on first start, mode 0600)."""
    text = os.environ.get("ENGINE_SUBMIT_KEY")
    if text:
        return read_key(text, "ENGINE_SUBMIT_KEY")
    path = state_dir / "submit.key"
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(new_key().hex() + "\n")
    return read_key(path.read_text(), str(path))


@dataclass
class MqttFront:
    service: Service
    topics: ServiceTopics
    key: bytes
    http_base: str
    client_user: BrokerUser | None  #: on the embedded broker: the clients' broker user

    @classmethod
    def prepare(cls, service: Service, http_base: str) -> MqttFront:
        """Before the deployment starts its broker: the topics, the key, and on the embedded broker its users."""
        topics = ServiceTopics(service.model)
        users = service.controller.access.users
        client_user = None
        if isinstance(service.controller.broker, EmbeddedBroker):
            me = topics.service_client
            users[me] = BrokerUser.generate(me, topics.service_acl)
            name = f"{service.model}-client"
            client_user = users[name] = BrokerUser.generate(name, topics.client_acl(name))
        return cls(service, topics, submit_key(service.options.state_dir), http_base, client_user)

    async def serve(self, broker: BrokerAddress) -> None:
        """Take jobs until cancelled."""
        me = self.topics.service_client
        address = broker.as_user(self.service.controller.access.users[me]) if self.client_user else broker
        if self.client_user is not None:
            self._write_client_file(broker)
        client = ControlClient(address, client_id=me, key=self.key)
        await client.connect()
        followers: set[asyncio.Task[None]] = set()
        try:
            await client.subscribe(self.topics.submit)
            log.info("taking jobs on %s (replies on %s)", self.topics.submit, self.topics.reply("<client id>"))
            async for inbound in client.messages():
                message = inbound.message
                if not isinstance(message, SubmitJob) or inbound.sender != message.client_id:
                    client.rejected["impostor"] += 1
                    log.warning("dropped %r signed by %r on %s", message.kind, inbound.sender, self.topics.submit)
                    continue
                task = asyncio.create_task(self._handle(client, message), name=f"job of {message.client_id}")
                followers.add(task)
                task.add_done_callback(lambda t: (followers.discard(t), _log_failure(t)))
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
            await client.close()

    async def _handle(self, client: ControlClient, message: SubmitJob) -> None:
        reply = self.topics.reply(message.client_id)
        origin = f"mqtt:{message.client_id}:{message.request_key}"
        job = self.service.find_origin(origin)
        if job is None:
            video = message.endpoint == "videos"
            try:
                if video != self.service.makes_video:
                    raise UnknownModel(f"endpoint: this service makes {'videos' if self.service.makes_video else 'images'}")
                job = self.service.accept(self.service.new_id("video" if video else "image"), "video" if video else "image",
                                          VideoBody if video else ImageBody, message.job, None, origin)
            except (InvalidRequest, UnknownModel, QueueFull, Unavailable) as exc:
                code = {InvalidRequest: "invalid_value", UnknownModel: "model_not_found", QueueFull: "queue_full",
                        Unavailable: "stopping"}[type(exc)]
                await client.publish(reply, JobUpdate(request_key=message.request_key, job={
                    "id": None, "status": "rejected", "error": {"code": code, "message": str(exc)}}))
                return
        sent = None
        async for job in self.service.follow(job.id):
            update = JobUpdate(request_key=message.request_key, job=api_object(job))
            preview = self.service.preview(job.id)
            if preview is not sent and preview is not None:  # each preview once
                sent = preview
                update = update.model_copy(update={"preview_jpeg_b64": preview.jpeg_b64})
            if job.status == "completed":
                update = self._with_output(update, job)
            await client.publish(reply, update)

    def _with_output(self, update: JobUpdate, job) -> JobUpdate:  # type: ignore[no-untyped-def]
        kind = "videos" if job.object == "video" else "images"
        fields: dict[str, str] = {"content_url": f"{self.http_base}/v1/{kind}/{job.id}/content"}
        image = job.output((".png",))
        if image is not None and image.is_file() and image.stat().st_size <= INLINE_IMAGE_BYTES:
            fields["b64_json"] = base64.b64encode(image.read_bytes()).decode()
        return update.model_copy(update=fields)

    def _write_client_file(self, broker: BrokerAddress) -> None:
        """The clients' credentials on the embedded broker, for local clients (``engine submit``, scripts)."""
        assert self.client_user is not None
        path = self.service.options.state_dir / "mqtt-client.json"
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({"host": broker.host, "port": broker.port, "username": self.client_user.name,
                       "password": self.client_user.password, "client_id": self.client_user.name,
                       "key": self.key.hex(), "submit_topic": self.topics.submit,
                       "reply_topic": self.topics.reply(self.client_user.name)}, file, indent=2)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("%s failed: %s", task.get_name(), exc, exc_info=not isinstance(exc, ControlError) and exc)
