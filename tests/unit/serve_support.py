"""A service over a planned graph without processes or sockets: no scheduler, accepted jobs stay queued."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from engine.controller.controller import Controller, RunOptions
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.serve.http import ApiOptions, create_app
from engine.serve.jobs import JobStore
from engine.serve.service import Service, ServiceOptions
from engine.spec.load import load_graph

REPO = Path(__file__).resolve().parents[2]


def service_of(tmp_path: Path, graph: str = "wan_t2v_two_dit.yaml", configs: str = "wan2.1-t2v-1.3b") -> Service:
    checked = check_graph(load_graph(REPO / "graphs" / graph, []))
    plan = build_plan(checked, REPO / "configs" / configs)
    controller = Controller(plan, REPO, RunOptions(out_dir=tmp_path / "outputs", run_id="t", quiet=True))
    return Service(controller, checked, ServiceOptions(state_dir=tmp_path))


@contextlib.contextmanager
def in_process(service: Service, options: ApiOptions = ApiOptions()) -> Iterator[TestClient]:
    """The service's app behind a TestClient, its job store opened on the app's event loop thread (where the
    service uses it)."""
    with TestClient(create_app(service, options)) as client:
        service.store.close()
        service.store = client.portal.call(JobStore, service.store.path)
        yield client
