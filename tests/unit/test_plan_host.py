"""The devices of ``host: local`` nodes are checked against this host when a graph is planned; ``engine validate``
does not look at the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import PlanError
from engine.plan import host
from engine.plan.check import check_graph
from engine.spec.load import load_graph

GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "wan_t2v.yaml"


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with two CUDA devices and no XPU."""
    monkeypatch.setattr(host, "device_count", lambda kind: {"cuda": 2, "xpu": 0}[kind])


def checked(*overrides: str):
    return check_graph(load_graph(GRAPH, list(overrides)))


def test_devices_this_host_has_pass(two_gpus: None) -> None:
    host.check_local_devices(checked("nodes.encoder.place.device=cuda:0", "nodes.transformer.place.device=cuda:1"))
    assert host.local_devices() == ["cpu", "cuda:0", "cuda:1"]


def test_every_missing_device_is_named_with_its_node_and_what_the_host_has(two_gpus: None) -> None:
    with pytest.raises(PlanError) as caught:
        host.check_local_devices(checked("nodes.transformer.place.device=cuda:2", "nodes.decoder.place.device=xpu:0"))
    assert str(caught.value).splitlines() == [
        "the graph places nodes on devices this host does not have:",
        f"  {GRAPH} (--set nodes.transformer.place.device=cuda:2) node 'transformer' place.device cuda:2: "
        "this host has 2 CUDA devices (valid here: cpu, cuda:0, cuda:1)",
        f"  {GRAPH} (--set nodes.decoder.place.device=xpu:0) node 'decoder' place.device xpu:0: "
        "this host has 0 XPU devices (valid here: cpu, cuda:0, cuda:1)",
    ]


def test_a_device_written_in_the_file_is_named_at_its_line(two_gpus: None, tmp_path: Path) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text(GRAPH.read_text().replace("place: {host: local, device: cpu}\n  decoder",
                                               "place: {host: local, device: cuda:7}\n  decoder"))
    with pytest.raises(PlanError, match=rf"{graph}:19 node 'transformer' place.device cuda:7: this host has 2 CUDA devices"):
        host.check_local_devices(check_graph(load_graph(graph)))


def test_other_hosts_and_cpu_are_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_torch(kind: str) -> int:
        raise AssertionError("a graph on cpu and on other hosts needs no device lookup")

    monkeypatch.setattr(host, "device_count", no_torch)
    host.check_local_devices(checked("nodes.transformer.place.host=gpu1", "nodes.transformer.place.device=cuda:9"))


def test_a_device_this_host_lacks_has_no_capacity(two_gpus: None) -> None:
    assert host.local_capacity("cuda:2") is None and host.local_capacity("xpu:0") is None
    assert host.local_capacity("cpu") > 2**20
