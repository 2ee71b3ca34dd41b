"""``engine submit``: arguments, and where the broker, the credentials and the submit key come from."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.control.broker import read_secret
from engine.errors import ControlError, OutputError

if TYPE_CHECKING:
    from engine.serve.submit import Connection

DESCRIPTION = """\
Submit one job to a service (`engine serve`) over MQTT, follow its progress and write its output (the video, or
the image) into --out. The job's fields are those of the HTTP API's body (README "Serve").

Where to submit: --client-file, the <state-dir>/mqtt-client.json a service on the embedded broker writes (broker,
user, password, client id, submit key), or --broker with --service (the served graph's name). Secrets never go on
the command line: the submit key comes from --key-file or ENGINE_SUBMIT_KEY (else the client file), the broker
password from --password-file or ENGINE_BROKER_PASSWORD (else the client file), the HTTP token for fetching a
video from --token-file or ENGINE_API_TOKEN.

examples:
  engine submit --client-file state/wan_t2v_two_dit/mqtt-client.json --prompt "a red fox in snow" --size 64x48 \\
      --seconds 1 --steps 4 --out videos/
  ENGINE_SUBMIT_KEY=<hex> ENGINE_BROKER_PASSWORD=<password> engine submit --broker mqtt://client@10.0.0.10:1883 \\
      --service qwen_image_t2i --images --prompt "a lighthouse at dusk" --field true_cfg_scale=4
"""
#: Environment variables of the secrets.
KEY_ENV, PASSWORD_ENV, TOKEN_ENV = "ENGINE_SUBMIT_KEY", "ENGINE_BROKER_PASSWORD", "ENGINE_API_TOKEN"


def add_submit_parser(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser("submit", help="submit a job to a service over MQTT and fetch its output",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = submit.add_argument_group("where to submit")
    where.add_argument("--client-file", type=Path, help="the mqtt-client.json a service writes in its state folder")
    where.add_argument("--broker", help="mqtt://[user@]host[:port] or mqtts://... (no password: see above)")
    where.add_argument("--service", help="the served graph's name (its topics: dge/serve/NAME/...)")
    where.add_argument("--client-id", help="this client's id, as it signs and as its reply topic names it "
                                           "(default: the client file's, else engine-submit-<hostname>)")
    where.add_argument("--key-file", type=Path, help=f"the service's submit key, in hex (default: {KEY_ENV})")
    where.add_argument("--password-file", type=Path, help=f"the broker user's password (default: {PASSWORD_ENV})")
    where.add_argument("--token-file", type=Path, help=f"bearer token of the service's HTTP API (default: {TOKEN_ENV})")
    job = submit.add_argument_group("the job")
    job.add_argument("--prompt", required=True, help="what the video or image shows")
    job.add_argument("--negative-prompt", help="what it should not show")
    job.add_argument("--size", help="WIDTHxHEIGHT in pixels, e.g. 832x480")
    job.add_argument("--seconds", type=float, help="video length in seconds")
    job.add_argument("--steps", type=int, help="denoising steps (num_inference_steps)")
    job.add_argument("--seed", type=int, help="seed of the initial noise")
    job.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                     help="any other field of the body (the value read as JSON where it parses); repeatable")
    job.add_argument("--images", action="store_true", help="an image service (POST /v1/images/generations' body)")
    job.add_argument("--request-key", help="this job's key: a repeat with the same key and client id is answered "
                                           "with the same job, never run twice (default: a new one)")
    out = submit.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("."), help="folder to write the output into (default: .)")
    out.add_argument("--timeout-s", type=float, default=30.0,
                     help="give up when the broker or the service does not answer within this (default: 30)")
    out.add_argument("--job-timeout-s", type=float, default=3600.0,
                     help="give up when the job has not finished this long after the service answered (default: 3600)")
    submit.set_defaults(handler=_submit)


def job_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The body's fields from the options: named ones, then ``--field KEY=VALUE``."""
    fields: dict[str, Any] = {"prompt": args.prompt}
    named = {"negative_prompt": args.negative_prompt, "size": args.size, "seconds": args.seconds,
             "num_inference_steps": args.steps, "seed": args.seed}
    fields.update({name: value for name, value in named.items() if value is not None})
    for item in args.field:
        name, equals, text = item.partition("=")
        if not equals or not name:
            raise ControlError(f"--field {item!r}: expected KEY=VALUE")
        try:
            fields[name] = json.loads(text)
        except json.JSONDecodeError:
            fields[name] = text
    return fields


def _secret(path: Path | None, option: str, env: str) -> str | None:
    """A secret from the file given with ``option``, else from ``env``."""
    if path is not None:
        return read_secret(path, option)
    return os.environ.get(env) or None


def _client_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        settings = json.loads(path.read_text())
    except OSError as exc:
        raise OutputError(f"--client-file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise OutputError(f"--client-file {path}: not JSON ({exc})") from None
    needed = ("host", "port", "username", "password", "client_id", "key", "submit_topic")
    missing = [key for key in needed if key not in settings] if isinstance(settings, dict) else list(needed)
    if missing:
        raise OutputError(f"--client-file {path}: not a service's mqtt-client.json (lacks {', '.join(missing)})")
    return settings


def connection_from(args: argparse.Namespace) -> Connection:
    """The broker, credentials, client id, submit key and service from the options, the environment and the client
    file, in that order."""
    from engine.control.broker import BrokerAddress, parse_broker
    from engine.control.messages import AGENT_NAME_PATTERN
    from engine.control.signing import read_key
    from engine.serve.submit import Connection

    settings = _client_file(args.client_file)
    if args.broker:
        broker = parse_broker(args.broker)
        if not isinstance(broker, BrokerAddress):
            raise ControlError("--broker: the service's broker (mqtt://... or mqtts://...), not embedded")
        if broker.password is not None:
            raise ControlError(f"--broker: a password on the command line shows in `ps`; give it in {PASSWORD_ENV} "
                               "or --password-file")
    elif settings:
        broker = BrokerAddress(settings["host"], int(settings["port"]), settings["username"])
    else:
        raise ControlError("where to submit: give --client-file (a service's mqtt-client.json) or --broker and --service")
    password = _secret(args.password_file, "--password-file", PASSWORD_ENV) or settings.get("password")
    if password is not None:
        broker = BrokerAddress(broker.host, broker.port, broker.username or settings.get("username"), password, broker.tls)
    key_text = _secret(args.key_file, "--key-file", KEY_ENV)
    if key_text is None and "key" not in settings:
        raise ControlError(f"no submit key: give --key-file or set {KEY_ENV} (the service's, from its "
                           "<state-dir>/submit.key)")
    key = read_key(key_text or settings["key"], str(args.key_file or (KEY_ENV if key_text else args.client_file)))
    service = args.service or _service_of(settings.get("submit_topic", ""))
    if not service:
        raise ControlError("--service: the name of the served graph (engine serve logs its topics)")
    client_id = args.client_id or settings.get("client_id") or f"engine-submit-{socket.gethostname()}"[:64]
    if not re.match(AGENT_NAME_PATTERN, client_id):
        raise ControlError(f"--client-id {client_id!r}: letters, digits, . _ - (at most 64)")
    return Connection(broker, client_id, key, service)


def _service_of(submit_topic: str) -> str:
    """``wan_t2v`` of ``dge/serve/wan_t2v/submit``."""
    parts = submit_topic.split("/")
    return parts[-2] if len(parts) >= 3 and parts[-1] == "submit" else ""


def _submit(args: argparse.Namespace) -> int:
    from engine.serve.submit import submit_job

    for name, value in (("--timeout-s", args.timeout_s), ("--job-timeout-s", args.job_timeout_s)):
        if not value > 0:
            raise OutputError(f"{name} {value}: must be > 0")
    connection = connection_from(args)
    token = _secret(args.token_file, "--token-file", TOKEN_ENV)
    submitted = asyncio.run(submit_job(
        connection, "images/generations" if args.images else "videos", job_fields(args), args.out,
        answer_timeout_s=args.timeout_s, job_timeout_s=args.job_timeout_s, api_token=token,
        request_key=args.request_key, show=lambda line: print(line, flush=True)))
    print(f"wrote {submitted.output}")
    return 0
