"""``engine submit``: the MQTT client of a service (``engine serve``), from any box that has the package.

It signs a ``submit_job`` with the service's submit key under its client id, publishes it on the service's submit
topic, follows the ``job_update`` messages the service sends to its reply topic (only those the service signed, as
``<service>-service``) until the job ends, and writes the output into a folder: a small image comes inline, anything
else is fetched from the URL the service names. Nothing waits forever: no broker within the timeout, or no answer
from the service (absent, or the key is not its submit key: it drops what it cannot verify), is an error that says
so.

The signature's sequence number starts at the clock in microseconds, so that a client id used again by a later
``engine submit`` keeps counting up: the service refuses a sequence number it has seen from that client.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.control.broker import BrokerAddress
from engine.control.client import ControlClient
from engine.control.messages import JobUpdate, SubmitJob
from engine.control.topics import ServiceTopics
from engine.errors import ControlError, EngineError, OutputError

Endpoint = Literal["videos", "images/generations"]
#: A job's statuses that end it.
ENDED = ("completed", "failed", "cancelled", "rejected")
#: File suffixes by the content type the service answers with.
SUFFIXES = {"video/mp4": ".mp4", "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class JobFailed(EngineError):
    """The service refused the job, or the job failed or was cancelled: its status and the service's message."""


@dataclass(frozen=True)
class Connection:
    """Where and as whom to submit: the broker (with the client's broker user), the client id, the submit key and
    the service's name (its topics)."""

    broker: BrokerAddress
    client_id: str
    key: bytes
    service: str

    @property
    def topics(self) -> ServiceTopics:
        return ServiceTopics(self.service)


@dataclass(frozen=True)
class Submitted:
    """A job that completed: its last update and the file written."""

    job: dict[str, Any]
    output: Path


def progress_line(update: JobUpdate) -> str:
    """``video_1a2b: in_progress 40%``, or the status with the service's message when the job ended otherwise."""
    job = update.job
    line = f"{job.get('id') or 'job'}: {job.get('status')}"
    if job.get("status") in ("queued", "in_progress"):
        line += f" {job.get('progress', 0)}%"
    error = job.get("error")
    if isinstance(error, dict) and error.get("message"):
        line += f" ({error.get('code')}: {error['message']})"
    return line


async def submit_job(connection: Connection, endpoint: Endpoint, fields: dict[str, Any], out_dir: Path, *,
                     answer_timeout_s: float, job_timeout_s: float, api_token: str | None = None,
                     request_key: str | None = None, show: Callable[[str], None] = print) -> Submitted:
    """Submit ``fields`` (the HTTP body's) and follow the job to its end; write its output into ``out_dir``.

    ControlError when the broker cannot be reached or the service does not answer within ``answer_timeout_s``;
    JobFailed when the job is refused, fails or is cancelled; OutputError when the output cannot be fetched or
    written. ``job_timeout_s`` bounds the whole job once the service answered."""
    topics = connection.topics
    key = request_key or uuid.uuid4().hex
    message = SubmitJob(client_id=connection.client_id, request_key=key, endpoint=endpoint, job=fields)
    client = ControlClient(connection.broker, client_id=connection.client_id, key=connection.key,
                           connect_timeout_s=answer_timeout_s, broker_timeout_s=answer_timeout_s,
                           first_seq=time.time_ns() // 1000)
    await client.connect()
    try:
        await client.subscribe(topics.reply(connection.client_id))
        await client.publish(topics.submit, message)
        last = await _follow(client, topics.service_client, key, answer_timeout_s, job_timeout_s, show)
    finally:
        await client.close()
    if last.job.get("status") != "completed":
        raise JobFailed(progress_line(last))
    return Submitted(last.job, _write_output(last, out_dir, api_token))


async def _follow(client: ControlClient, service_client: str, key: str, answer_timeout_s: float,
                  job_timeout_s: float, show: Callable[[str], None]) -> JobUpdate:
    """The updates of job ``key`` signed by the service, shown as they change, until the last one."""
    answered = False
    deadline = time.monotonic() + answer_timeout_s
    shown = ""
    while True:
        inbound = await client.receive(max(0.0, deadline - time.monotonic()))
        if inbound is None:
            if not answered:
                raise ControlError(f"no answer from service {service_client.removesuffix('-service')!r} on broker "
                                   f"{client.address.display} within {answer_timeout_s:g} s: is `engine serve` running "
                                   "with MQTT there, and is the key its submit key? (it drops what it cannot verify)")
            raise ControlError(f"the job was not finished within {job_timeout_s:g} s of its submission")
        update = inbound.message
        if inbound.sender != service_client or not isinstance(update, JobUpdate) or update.request_key != key:
            continue  # not the service's answer to this job
        if not answered:
            answered, deadline = True, time.monotonic() + job_timeout_s
        line = progress_line(update)
        if line != shown:
            show(line)
            shown = line
        if update.job.get("status") in ENDED:
            return update


def _write_output(update: JobUpdate, out_dir: Path, api_token: str | None) -> Path:
    """The completed job's output in ``out_dir``, named after the job: inline bytes, else fetched from its URL."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out_dir}: {exc.strerror or exc}") from None
    job_id = str(update.job.get("id"))
    if update.b64_json is not None:
        return _write(out_dir / f"{job_id}.png", base64.b64decode(update.b64_json))
    if not update.content_url:
        raise OutputError(f"job {job_id} completed without an output to fetch")
    request = urllib.request.Request(update.content_url)
    if api_token:
        request.add_header("Authorization", f"Bearer {api_token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            suffix = SUFFIXES.get(answer.headers.get_content_type(), "")
            data = answer.read()
    except urllib.error.HTTPError as exc:
        raise OutputError(f"fetching {update.content_url}: HTTP {exc.code} {_error_text(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OutputError(f"fetching {update.content_url}: {reason} (the job's output stays there)") from None
    return _write(out_dir / f"{job_id}{suffix}", data)


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The service's ``{"error": {"message"}}``, else the reason phrase."""
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def _write(path: Path, data: bytes) -> Path:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
