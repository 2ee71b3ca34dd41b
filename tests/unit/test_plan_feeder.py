"""Input files reach nodes on other hosts: the plan gains a feeder node, whose segment runs first, and an edge to
each node that reads them; the worker's side turns the bytes back into a file of its run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import PlanError, RequestError
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.worker.input_files import read_input_files, remove_input_files, write_input_files
from engine.spec.load import load_graph

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "graphs" / "assets" / "first_frame.png"


def plan_of(graph: str, *overrides: str, model: str = "wan2.1-i2v-14b-480p", **options):
    checked = check_graph(load_graph(REPO / "graphs" / graph, list(overrides)))
    return build_plan(checked, REPO / "configs" / model, **options)


def test_a_remote_encoder_gets_the_image_from_a_feeder_here_first():
    plan = plan_of("wan_i2v.yaml", "nodes.encoder.place.host=gpu1")
    feeder = plan.nodes["feeder"]
    assert (feeder.host, feeder.device, feeder.stages, feeder.components) == ("local", "cpu", (), ())
    edge = plan.edge_between("feeder", "encoder")
    (image,) = edge.tensors
    assert (edge.name, edge.transport, edge.integrity) == ("inputs", "mooncake", "xxh3-128")
    size = IMAGE.stat().st_size  # the largest file the graph's requests name
    assert (image.name, image.dtype, image.shape, image.variable) == ("image_file", "uint8", (size,), (0,))
    assert image.consumers == ("image_encode", "vae_encode")
    first, encoder = plan.segments[:2]
    assert (first.index, first.node, first.stages, first.outputs) == (0, "feeder", (), ("image_file",))
    assert (encoder.index, encoder.node, encoder.inputs) == (1, "encoder", ("image_file",))
    assert [s.index for s in plan.segments] == list(range(len(plan.segments)))


def test_a_service_sizes_the_edge_for_its_uploads():
    plan = plan_of("wan_i2v.yaml", "nodes.encoder.place.host=gpu1", input_file_bytes=20 << 20)
    assert plan.edge_between("feeder", "encoder").slot_bytes == 20 << 20


def test_each_remote_reader_gets_its_own_edge():
    nodes = {"clip": ("image_encode", "gpu3"), "encoder": ("text_encode, vae_encode", "gpu1"), "dit": ("denoise", "gpu2"),
             "decoder": ("vae_decode", "local")}
    plan = plan_of("wan_i2v.yaml", "nodes={" + ", ".join(f"{name}: {{stages: [{stages}], place: {{host: {host}, device: cpu}}}}"
                                                         for name, (stages, host) in nodes.items()) + "}",
                   "edges=[{name: a, from: clip, to: dit}, {name: b, from: encoder, to: dit}, {name: c, from: dit, to: decoder}]")
    assert {(e.name, e.target) for e in plan.edges if e.source == "feeder"} == {("inputs_clip", "clip"),
                                                                                 ("inputs_encoder", "encoder")}
    assert plan.segments[0].node == "feeder" and plan.segments[0].outputs == ("image_file",)


def test_files_read_here_need_no_feeder():
    plan = plan_of("wan_i2v.yaml", "nodes.transformer.place.host=gpu1", "nodes.decoder.place.host=gpu1")
    assert "feeder" not in plan.nodes and plan.segments[0].node == "encoder"
    assert "feeder" not in plan_of("wan_t2v.yaml", "nodes.encoder.place.host=gpu1", model="wan2.1-t2v-1.3b").nodes


def test_a_qwen_edit_text_encoder_elsewhere_gets_the_image_too():
    plan = plan_of("qwen_image_edit.yaml", "nodes.encoder.place.host=gpu1", model="qwen-image-edit")
    (image,) = plan.edge_between("feeder", "encoder").tensors
    assert image.name == "image_file" and set(image.consumers) == {"text_encode", "vae_encode"}


def test_a_graph_using_the_feeders_name_is_told_to_rename_it():
    with pytest.raises(PlanError, match="'feeder' is the name of a node, edge or tensor that brings input files"):
        plan_of("wan_i2v_single.yaml", "nodes.all.place.host=gpu1", "nodes={'feeder': {'stages': ['text_encode', "
                "'image_encode', 'vae_encode', 'denoise', 'vae_decode'], 'place': {'host': 'gpu1', 'device': 'cpu'}}}")


def test_files_cross_as_bytes_and_become_a_file_of_the_run(tmp_path):
    request = {"prompt": "p", "image": str(IMAGE)}
    sent = read_input_files(request, {"image_file": IMAGE.stat().st_size})
    assert sent["image_file"].dtype == torch.uint8
    folder = tmp_path / ".inputs" / "r1"
    received = write_input_files({**request, "image": "/controller/only/path.png"}, sent, folder)
    assert received["prompt"] == "p" and Path(received["image"]) == folder / "image"
    assert (folder / "image").read_bytes() == IMAGE.read_bytes()
    remove_input_files(folder)
    assert not folder.exists()


def test_a_file_larger_than_the_edge_is_a_request_error_naming_it():
    with pytest.raises(RequestError, match=r"image: .*first_frame.png is \d+ bytes; the edge that carries input files"):
        read_input_files({"image": str(IMAGE)}, {"image_file": 10})
    with pytest.raises(RequestError, match="image: cannot read /nowhere.png"):
        read_input_files({"image": "/nowhere.png"}, {"image_file": 10})
