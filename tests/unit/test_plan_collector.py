"""Final outputs made on another host come back to the controller's: the plan gains a collector node and edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import PlanError
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.worker.contract import written_by
from engine.spec.load import load_graph

REPO = Path(__file__).resolve().parents[2]


def plan_of(graph: str, *overrides: str):
    checked = check_graph(load_graph(REPO / "graphs" / graph, list(overrides)))
    return build_plan(checked, REPO / "configs" / "wan2.1-t2v-1.3b")


def test_a_remote_decoder_sends_its_frames_to_a_collector_here():
    plan = plan_of("wan_t2v.yaml", "nodes.decoder.place.host=gpu1", "limits.height=480", "limits.width=832",
                   "limits.num_frames=81")
    collector = plan.nodes["collector"]
    assert (collector.host, collector.device, collector.stages, collector.components) == ("local", "cpu", (), ())
    edge = plan.edge_between("decoder", "collector")
    (frames,) = edge.tensors
    assert (edge.name, edge.transport, edge.integrity) == ("outputs", "mooncake", "xxh3-128")
    assert (frames.name, frames.dtype, frames.shape) == ("frames", "float32", (1, 81, 480, 832, 3))
    assert edge.slot_bytes == 81 * 480 * 832 * 3 * 4
    last = plan.segments[-1]
    assert (last.node, last.stages, last.inputs, last.outputs) == ("collector", (), ("frames",), ("frames",))
    assert written_by(plan, "decoder") == () and written_by(plan, "collector") == ("frames",)


def test_outputs_made_here_need_no_collector():
    plan = plan_of("wan_t2v.yaml", "nodes.encoder.place.host=gpu1")
    assert "collector" not in plan.nodes and [e.name for e in plan.edges] == ["phase1", "phase2"]
    assert written_by(plan, "decoder") == ("frames",)


def test_a_graph_using_the_collectors_name_is_told_to_rename_it():
    with pytest.raises(PlanError, match="'collector' is the name of the node and edge that bring outputs back"):
        plan_of("wan_t2v_single.yaml", "nodes.all.place.host=gpu1", "nodes={'collector': {'stages': "
                "['text_encode', 'denoise', 'vae_decode'], 'place': {'host': 'gpu1', 'device': 'cpu'}}}")
