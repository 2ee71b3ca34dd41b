"""Wan request validation: bad values are refused, with the reason, before any model runs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from engine.errors import RequestError
from engine.stages import CHECK_FILES
from nodes.wan import family
from nodes.wan.family import WanImageRequest, WanRequest
from tests.unit.wan_support import configs, load_node, tiny


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_frames": 10}, "4k\\+1 \\(e.g. 9 or 13\\)"),
        ({"height": 40}, "multiple of 16"),
        ({"steps": 0}, "greater than or equal to 1"),
        ({"prompt": ""}, "at least 1 character"),
        ({"guidance": 5.0}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_values_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        WanRequest(**{"prompt": "a cat", **fields})


def test_missing_image_names_the_path(tmp_path):
    with pytest.raises(ValidationError, match=f"image {tmp_path / 'absent.png'} does not exist"):
        WanImageRequest.model_validate({"prompt": "a cat", "image": tmp_path / "absent.png"}, context=CHECK_FILES)


def test_unreadable_image_names_the_path(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")

    with pytest.raises(ValidationError, match=f"image {not_an_image} cannot be read"):
        WanImageRequest.model_validate({"prompt": "a cat", "image": not_an_image}, context=CHECK_FILES)


def test_a_worker_takes_an_image_its_host_lacks(tmp_path):
    """On another host the image comes over the data plane: the request is checked where it is made."""
    assert WanImageRequest(prompt="a cat", image=tmp_path / "absent.png").image == tmp_path / "absent.png"


def test_relative_image_is_checked_once_resolved(image, tmp_path):
    request = WanImageRequest(prompt="a cat", image="frame.png")

    assert request.resolve_paths(tmp_path).image == image
    with pytest.raises(ValidationError, match="does not exist"):
        request.resolve_paths(tmp_path / "elsewhere")


def test_image_gone_at_run_time_is_a_request_error(image):
    request = WanImageRequest(prompt="a cat", image=image, height=32, width=32, num_frames=5)
    image.unlink()
    stage = family.build_stage("i2v", "image_encode", load_node("i2v", ("image_encode",), "float32"), "cpu", "float32",
                               configs(tiny("i2v")))

    with pytest.raises(RequestError, match=str(image)):
        stage.run(request, {}, lambda step, total: None)
