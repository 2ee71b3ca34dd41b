"""``engine serve``: arguments, start-up (port bound before any worker starts), signals, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import OutputError

if TYPE_CHECKING:
    from engine.plan.check import CheckedGraph
    from engine.plan.model import Plan
    from engine.serve.service import ServiceOptions

DESCRIPTION = """\
Deploy the graph once (broker, one worker per node replica, weights loaded), then take jobs over HTTP and MQTT
until stopped. SIGTERM or Ctrl-C drains: new jobs get 503, running ones may finish within --grace-s, jobs still
queued stay in the state folder and run when the service starts again; then every worker stops.

Jobs and their outputs live under --state-dir (jobs.sqlite, outputs/, uploads/); finished jobs are dropped
oldest first beyond the --retain-* limits. Edge buffers are sized at the graph's `limits`, else at its `request`
defaults, else at the family's defaults (the graph's `requests` are not a service's; the log says which sized
each field): a job asking for more is refused (422) naming the limit to raise, e.g. --set limits.height=720.

The API (OpenAI-shaped; see README "Serve"):
  POST /v1/videos, GET /v1/videos[/{id}[/content|/events]], DELETE /v1/videos/{id},
  POST /v1/images/generations, POST /v1/images/edits, GET /v1/models, GET /health, GET /metrics;
  the page at / (the graph live, the jobs, a form) reads GET /v1/service and /v1/service/events
With ENGINE_API_TOKEN set (or --token-file), /v1 wants `Authorization: Bearer <token>`.

MQTT: jobs published as signed `submit_job` messages on dge/serve/<name>/submit get `job_update` messages on
dge/serve/<name>/reply/<client id>. The signing key is ENGINE_SUBMIT_KEY, else one generated in
<state-dir>/submit.key; with the embedded broker, a client's broker credentials are written to
<state-dir>/mqtt-client.json (mode 0600) at start. `engine submit` is such a client.
"""


def add_serve_parser(commands: argparse._SubParsersAction, add_graph_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    serve = commands.add_parser("serve", help="deploy the graph once and take jobs over HTTP and MQTT",
                                description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address the HTTP API listens on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000; 0 picks a free one)")
    serve.add_argument("--state-dir", type=Path, help="jobs, outputs and uploads (default: state/<graph name>)")
    serve.add_argument("--queue-size", type=int, default=64, help="jobs waiting beyond which new ones get 429 (default: 64)")
    serve.add_argument("--job-timeout-s", type=float, default=3600.0,
                       help="a job not finished this long after it was accepted fails (default: 3600)")
    serve.add_argument("--grace-s", type=float, default=30.0,
                       help="on SIGTERM, how long running jobs may go on before they are interrupted (default: 30)")
    serve.add_argument("--retain-jobs", type=int, default=1000, help="finished jobs kept, with their outputs (default: 1000)")
    serve.add_argument("--retain-bytes", default="50GiB", help="output bytes kept (default: 50GiB)")
    serve.add_argument("--retain-days", type=float, default=7.0, help="days a finished job is kept (default: 7)")
    serve.add_argument("--token-file", type=Path, help="bearer token for /v1, read from this file (default: ENGINE_API_TOKEN)")
    serve.add_argument("--max-restarts", type=int, default=3,
                       help="a replica whose process dies is started again, at most this many times in 10 minutes; "
                            "after that it stays out (default: 3; 0: never)")
    serve.add_argument("--autoscale", choices=("on", "off"), default="on",
                       help="nodes with replicas: {min, max} follow the load between their bounds (see the graph's "
                            "scaling: section); off: they keep min (default: on)")
    serve.add_argument("--no-mqtt", action="store_true", help="take jobs over HTTP only")
    serve.add_argument("--save-frames", action="store_true", help="also save each job's raw decoded frames as .npy")
    serve.set_defaults(handler=_serve)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any worker starts so that a port in use is a clear error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OutputError(f"--host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OutputError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another with --port") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def api_token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise OutputError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise OutputError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get("ENGINE_API_TOKEN") or None


def _serve(args: argparse.Namespace) -> int:
    from engine.plan.build import check_service_graph, plan_on_this_host
    from engine.controller.cli_run import prepare_output_folder
    from engine.serve.http import ApiOptions
    from engine.serve.jobs import Retention
    from engine.serve.service import ServiceOptions
    from engine.spec.schema import parse_memory

    checked = check_service_graph(args.graph, args.overrides)
    for name, value in (("--queue-size", args.queue_size), ("--job-timeout-s", args.job_timeout_s),
                        ("--grace-s", args.grace_s), ("--retain-jobs", args.retain_jobs), ("--retain-days", args.retain_days),
                        ("--max-restarts", args.max_restarts)):
        if value < 0 or (name in ("--queue-size", "--job-timeout-s") and value == 0):
            raise OutputError(f"{name} {value}: must be > 0" if name in ("--queue-size", "--job-timeout-s") else f"{name}: must be >= 0")
    try:
        retain_bytes = parse_memory(args.retain_bytes)
    except ValueError as exc:
        raise OutputError(f"--retain-bytes {args.retain_bytes!r}: {exc}") from None
    token = api_token(args)
    state = args.state_dir or Path("state") / checked.loaded.spec.name
    prepare_output_folder(state)
    options = ServiceOptions(state_dir=state, queue_size=args.queue_size, job_timeout_s=args.job_timeout_s,
                             grace_s=args.grace_s,
                             retention=Retention(args.retain_jobs, retain_bytes, args.retain_days * 86400))
    plan, source = plan_on_this_host(checked, [], input_file_bytes=ApiOptions().max_image_bytes)
    sock = bind(args.host, args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for chatty in ("amqtt", "transitions"):  # the embedded amqtt broker logs every session's state change
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return asyncio.run(_run_service(checked, plan, source, options, sock, token, mqtt=not args.no_mqtt,
                                    save_frames=args.save_frames, max_restarts=args.max_restarts,
                                    autoscale=args.autoscale == "on"))


async def _run_service(checked: CheckedGraph, plan: Plan, source: Path, options: ServiceOptions, sock: socket.socket,
                       token: str | None, *, mqtt: bool, save_frames: bool, max_restarts: int, autoscale: bool) -> int:
    import uvicorn

    from engine.controller.controller import Controller, RunOptions
    from engine.controller.fleet import RestartPolicy
    from engine.display import sizing_text
    from engine.serve.http import ApiOptions, create_app
    from engine.serve.mqtt import MqttFront
    from engine.serve.service import Service

    run_id = f"serve-{checked.loaded.spec.name.replace('_', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    restarts = RestartPolicy(max_restarts=max_restarts) if max_restarts else None
    controller = Controller(plan, source, RunOptions(out_dir=options.outputs, run_id=run_id, save_frames=save_frames,
                                                     restarts=restarts, autoscale=autoscale, cpu_budget=True,
                                                     stream_video=True))
    service = Service(controller, checked, options)
    host, port = sock.getsockname()[:2]
    front = MqttFront.prepare(service, f"http://{host}:{port}") if mqtt else None
    server = _server(uvicorn.Config(create_app(service, ApiOptions(token=token)), log_level="warning",
                                    access_log=False, lifespan="off"))
    log = logging.getLogger("engine.serve")
    log.info("listening on http://%s:%d (state in %s)%s", host, port, options.state_dir,
             "; bearer token required on /v1" if token else "")
    log.info("edge buffers sized at %s: a job asking for more is refused (raise with --set limits.FIELD=VALUE)",
             sizing_text(plan, list(plan.limits)))
    http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    main = asyncio.create_task(service.run(front.serve if front else None), name="service")
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if service.scheduler is None and not service.draining:
            main.cancel()  # still deploying: stop every worker now
        log.info("stopping: no new jobs; running ones have %g s to finish", options.grace_s)
        service.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        await asyncio.wait([main, http], return_when=asyncio.FIRST_COMPLETED)
        if http.done() and not main.done():
            service.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await main
    finally:
        server.should_exit = True
        await asyncio.gather(http, return_exceptions=True)
        sock.close()
    log.info("stopped")
    return 0


def _server(config):  # type: ignore[no-untyped-def]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its own signal handling: the service drains on SIGTERM itself."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)
