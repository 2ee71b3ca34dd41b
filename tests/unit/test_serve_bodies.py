"""The API's bodies turned into the family's request: names, sizes, seconds, limits, and every fault named."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.plan.check import check_graph
from engine.serve.bodies import ImageBody, InvalidRequest, VideoBody, translate, validate_body
from engine.spec.load import load_graph

REPO = Path(__file__).resolve().parents[2]


def checked(graph: str = "wan_t2v_two_dit.yaml", *overrides: str):
    return check_graph(load_graph(REPO / "graphs" / graph, list(overrides)))


def video(raw: dict, graph=None, image=None):
    return translate(graph or checked("wan_t2v_two_dit.yaml", "limits.height=480", "limits.width=832",
                                      "limits.num_frames=81"), validate_body(VideoBody, raw), image)


def problems(call) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as caught:
        call()
    return caught.value.problems


def test_openai_fields_become_the_familys_over_the_graphs_defaults():
    made = video({"prompt": "a fox", "size": "832x480", "seconds": 5, "fps": 16, "num_inference_steps": 20, "seed": 9})
    params = made.params
    assert (params.width, params.height, params.num_frames, params.steps, params.seed) == (832, 480, 81, 20, 9)
    assert params.negative_prompt == "blurry, distorted" and params.guidance_scale == 5.0  # the graph's defaults
    assert made.api == {"size": "832x480", "seconds": "5"}


def test_seconds_use_the_graphs_frame_rate_and_a_bad_frame_count_blames_seconds():
    assert video({"prompt": "a", "seconds": 1}).params.num_frames == 9  # the graph's fps is 8
    assert problems(lambda: video({"prompt": "a", "seconds": 1.1}))[0][0] == "seconds"


def test_every_fault_is_named_by_its_api_field():
    found = problems(lambda: validate_body(VideoBody, {"prompt": "", "width": "wide", "steps": 3}))
    assert [name for name, _ in found] == ["prompt", "width", "steps"]
    assert dict(found)["steps"] == "not a field of this API"
    assert problems(lambda: video({"prompt": "a", "num_inference_steps": 0}))[0][0] == "num_inference_steps"
    assert problems(lambda: video({"prompt": "a", "size": "832x480", "width": 64}))[0][0] == "size"
    assert problems(lambda: video({"prompt": "a", "seconds": 2, "num_frames": 9}))[0][0] == "seconds"
    assert problems(lambda: validate_body(VideoBody, {"prompt": "x" * 20_001}))[0] == ("prompt", "longer than 20000 characters")


def test_a_size_over_the_edge_buffers_names_the_limit_to_raise():
    (found,) = problems(lambda: video({"prompt": "a", "height": 96}, graph=checked()))
    assert found == ("height", "96 is over the 48 this service's edge buffers hold; restart it with --set limits.height=96")


def test_fields_of_another_family_are_refused():
    qwen = checked("qwen_image_t2i.yaml")
    assert problems(lambda: translate(qwen, validate_body(ImageBody, {"prompt": "a", "guidance_scale": 3.0})))[0] == (
        "guidance_scale", "not a field of qwen_image t2i requests")
    made = translate(qwen, validate_body(ImageBody, {"prompt": "a", "size": "64x64", "response_format": "url"}))
    assert made.api == {"size": "64x64", "response_format": "url"}


def test_an_uploaded_image_is_the_requests_image_and_a_broken_one_is_blamed_on_its_field(tmp_path):
    i2v = checked("wan_i2v.yaml")
    good = REPO / "graphs" / "assets" / "first_frame.png"
    assert translate(i2v, validate_body(VideoBody, {"prompt": "a"}), ("input_reference", good)).params.image == good
    broken = tmp_path / "x.png"
    broken.write_bytes(b"not an image")
    (found,) = problems(lambda: translate(i2v, validate_body(VideoBody, {"prompt": "a"}), ("input_reference", broken)))
    assert found[0] == "input_reference" and "cannot be read as an image" in found[1]
