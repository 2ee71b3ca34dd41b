"""Each family's request rule (sizes on the model's token grid), applied where a request enters: a service refuses
a job off the grid before it is queued; Qwen-Image and Z-Image state theirs as Wan does."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.controller.controller import Controller, RunOptions
from engine.families import get_family
from engine.plan.build import build_plan, check_service_graph
from engine.plan.model_check import component_configs
from engine.serve.bodies import InvalidRequest, VideoBody
from engine.serve.service import Service, ServiceOptions
from engine.stages import RequestProblem
from nodes.qwen_image.geometry import LatentGeometry as QwenGeometry
from nodes.qwen_image.geometry import request_problems as qwen_request_problems
from nodes.z_image.geometry import LatentGeometry as ZImageGeometry
from nodes.z_image.geometry import request_problems as z_image_request_problems

REPO = Path(__file__).resolve().parents[2]


def test_engine_run_refuses_a_command_line_request_off_the_grid_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(REPO / "graphs" / "wan22_ti2v.yaml"), "--set", "model.path=configs/wan2.2-ti2v-5b",
                 "--set", "request.height=64", "--prompt", "x", "--image", str(REPO / "graphs" / "assets" / "first_frame.png"),
                 "--width", "80", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        "error: wan ti2v cannot run this request on this model:\n  request 1: width: 80 is not a multiple of 32: a "
        "transformer token of this model covers 32x32 pixels (vae scale_factor_spatial 16 x transformer patch_size "
        "[2, 2]); use 64 or 96\n")
    assert not out.exists()  # refused while planning: no output folder, no broker, no worker


def test_a_service_refuses_a_job_off_the_models_token_grid(tmp_path):
    checked = check_service_graph(REPO / "graphs" / "wan_t2v.yaml", ["model.path=configs/wan2.2-ti2v-5b", "request.height=64"])
    plan = build_plan(checked, REPO / "configs" / "wan2.2-ti2v-5b")
    controller = Controller(plan, REPO, RunOptions(out_dir=tmp_path / "outputs", run_id="t", quiet=True))
    service = Service(controller, checked, ServiceOptions(state_dir=tmp_path))
    with pytest.raises(InvalidRequest) as caught:
        service.accept("video_1", "video", VideoBody, {"prompt": "x", "size": "48x64"})
    assert [field for field, _ in caught.value.problems] == ["width"]
    assert caught.value.problems[0][1].startswith("48 is not a multiple of 32: a transformer token of this model covers")
    assert service.accept("video_2", "video", VideoBody, {"prompt": "x", "size": "64x64"}).status == "queued"


@pytest.mark.parametrize(("family", "task", "folder"), [("qwen_image", "t2i", "qwen-image"),
                                                        ("qwen_image", "edit", "qwen-image-edit"),
                                                        ("z_image", "t2i", "z-image-turbo"),
                                                        ("wan", "t2v_experts", "wan2.2-t2v-a14b"),
                                                        ("wan", "i2v_experts", "wan2.2-i2v-a14b")])
def test_the_shipped_models_take_every_size_their_requests_admit(family, task, folder):
    """Tokens of 16 pixels: every multiple of 16 the request fields admit is on the grid."""
    model = get_family(family)
    configs = component_configs(model, task, REPO / "configs" / folder)
    sizes = {"height": 48, "width": 1040} | ({"num_frames": 13} if family == "wan" else {})
    assert model.request_problems(task, configs, model.request_type(task).model_construct(**sizes)) == []


def test_image_families_state_the_grid_rule_by_field():
    """A VAE that downsampled 16x would put their tokens 32 pixels apart (their config checks refuse such a model
    today, as their stages have not run one)."""
    assert qwen_request_problems(QwenGeometry(channels=16, scale=16), 48, 64) == [RequestProblem(
        "height", "48 is not a multiple of 32: a packed latent token covers 32 pixels (2 latent pixels of the vae's "
                  "16x downsampling); use 32 or 64")]
    assert [p.field for p in z_image_request_problems(ZImageGeometry(channels=16, scale=16), 64, 80)] == ["width"]


def test_validate_refuses_an_edit_input_the_pipeline_would_not_take(tmp_path, capsys):
    """Qwen-Image-Edit takes inputs up to 4:1; a wider one is refused at its request's line, not in the worker."""
    from PIL import Image

    Image.new("RGB", (90, 20)).save(tmp_path / "wide.png")
    graph = str(REPO / "graphs" / "qwen_image_edit.yaml")
    assert main(["validate", graph, "--set", f"requests.0.image={tmp_path / 'wide.png'}"]) == 1
    assert capsys.readouterr().err == (
        f"error: 1 problem in the graph:\n  {graph} (--set requests.0.image={tmp_path / 'wide.png'}) requests[0].image: "
        f"input image {tmp_path / 'wide.png'} is 90x20 (aspect 4.50); at most 4:1 is accepted\n")
