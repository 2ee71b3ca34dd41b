"""Edge buffers are sized at what the graph and the run's requests need: a limit where the graph sets one, else the
largest request, else (a service, which has no requests) the graph's request defaults, and the family's defaults
only where nothing else gives a size; `engine plan` and `engine graph` say which of them sized each edge."""

from __future__ import annotations

from pathlib import Path

from engine.cli import main
from engine.plan.build import build_plan, check_service_graph
from engine.plan.check import check_graph
from engine.spec.load import load_graph

REPO = Path(__file__).resolve().parents[2]
WAN_T2V = REPO / "configs" / "wan2.1-t2v-1.3b"
#: wan_t2v.yaml without request defaults, two requests of 48x80 and 13 frames, the decoder on another host.
SMALL_REQUESTS = ["request={negative_prompt: blurry, steps: 2}", "nodes.decoder.place.host=gpu1",
                  "requests=[{prompt: a, height: 48, width: 80, num_frames: 13}, {prompt: b, height: 32, width: 80, num_frames: 5}]"]


def test_requests_without_defaults_size_the_edges_and_the_collector_not_the_family_defaults():
    checked = check_graph(load_graph(REPO / "graphs" / "wan_t2v.yaml", SMALL_REQUESTS))
    plan = build_plan(checked, WAN_T2V)
    assert plan.limits == {"height": 48, "width": 80, "num_frames": 13}
    assert plan.sized_from == {"height": "requests", "width": "requests", "num_frames": "requests"}
    (frames,) = plan.edge_between("decoder", "collector").tensors
    assert frames.shape == (1, 13, 48, 80, 3)  # 585 KiB a slot, not 388 MiB at 480x832x81
    assert plan.edge_between("decoder", "collector").slot_bytes == 13 * 48 * 80 * 3 * 4
    (latents,) = plan.edge_between("transformer", "decoder").tensors
    assert latents.shape == (1, 16, 4, 6, 10)
    assert plan.edge_between("encoder", "transformer").sized_by == ()  # prompt embeddings: fixed shapes
    assert latents.sized_by == ("height", "width", "num_frames")


def test_a_service_is_sized_at_limits_then_request_defaults_then_the_family_defaults():
    checked = check_service_graph(REPO / "graphs" / "wan_t2v.yaml", [*SMALL_REQUESTS, "limits.height=64",
                                                                      "request.height=64", "request.num_frames=9"])
    assert checked.requests == ()  # a service's requests come from its clients
    plan = build_plan(checked, WAN_T2V)
    assert plan.limits == {"height": 64, "width": 832, "num_frames": 9}
    assert plan.sized_from == {"height": "limits", "width": "family default", "num_frames": "request defaults"}


def test_plan_and_graph_name_what_sized_each_edge(capsys):
    sets = [arg for s in SMALL_REQUESTS for arg in ("--set", s)]
    assert main(["plan", str(REPO / "graphs" / "wan_t2v.yaml"), *sets, "--set", "limits.height=64", "--set", "request.height=48"]) == 0
    out = capsys.readouterr().out
    assert "sized at height 64 (limits), width 80 (requests), num_frames 13 (requests)\n" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("phase", "outputs"))}
    assert rows["phase1"].endswith("fixed shapes")
    for edge in ("phase2", "outputs"):
        assert rows[edge].endswith("height 64 (limits), width 80 (requests), num_frames 13 (requests)"), rows[edge]
    i2v = REPO / "graphs" / "wan_i2v.yaml"
    assert main(["graph", str(i2v), "--set", "nodes.encoder.place.host=gpu1"]) == 0
    out = capsys.readouterr().out
    assert "edge inputs: feeder -> encoder" in out
    assert "x 3, each tensor 64-byte aligned; sized at largest input file\n" in out
