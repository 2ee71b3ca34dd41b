"""A preview never changes the output: with a preview at every step, Wan image to video, Wan2.2 TI2V-5B image to
video (48 latent channels, the image's latent put back in the first frame), Qwen-Image with true CFG and Z-Image
with guidance make the same frames, bit for bit, as with previews off; each step's picture is a JPEG within the
bound. The stages run in-process, on the graph's partition, as the parity tests run them."""

from __future__ import annotations

import io

import torch
from PIL import Image

from engine.preview.picture import MAX_JPEG_BYTES
from engine.preview.sink import Picture, Sink, previews
from nodes.z_image.family import ZImageRequest
from tests.unit import test_qwen_image_runtime as qwen
from tests.unit import test_wan_parity as wan
from tests.unit import test_wan_ti2v as ti2v
from tests.unit import test_z_image_family as z_image
from tests.unit.test_qwen_image_runtime import sources  # noqa: F401 - a fixture
from tests.unit.test_z_image_family import source  # noqa: F401 - a fixture
from tests.unit.wan_support import PARTITIONS
from tests.unit.wan_support import one_thread  # noqa: F401 - a fixture: every test on one torch thread


def with_and_without_previews(run) -> tuple[torch.Tensor, torch.Tensor, list[Picture]]:
    """``run()``'s output with previews off, then with a preview at every step, and the pictures made."""
    pictures: list[Picture] = []
    off = run()
    with previews(Sink(1, pictures.append)):
        on = run()
    return off, on, pictures


def assert_pictures(pictures: list[Picture], steps: int) -> None:
    assert [(p.step, p.total) for p in pictures] == [(step, steps) for step in range(1, steps + 1)]
    for picture in pictures:
        image = Image.open(io.BytesIO(picture.jpeg))
        assert image.format == "JPEG" and image.size == (picture.width, picture.height)
        assert len(picture.jpeg) <= MAX_JPEG_BYTES


def test_wan_i2v_frames_are_the_same_with_previews():
    request = wan.make_request("i2v", 32, 48, 5.0, seed=11)
    off, on, pictures = with_and_without_previews(
        lambda: wan.run_partition("i2v", PARTITIONS["three_nodes"], "float32", request)[0]["frames"])
    assert torch.equal(on, off)
    assert_pictures(pictures, wan.STEPS)


def test_wan22_ti2v_frames_are_the_same_with_previews():
    request = ti2v.make_request("ti2v", guidance_scale=5.0)
    off, on, pictures = with_and_without_previews(lambda: ti2v.run_nodes("ti2v", ti2v.THREE_NODES, "float32", request)["frames"])
    assert torch.equal(on, off)
    assert_pictures(pictures, request.steps)


def test_qwen_image_is_the_same_with_previews(sources):  # noqa: F811 - a fixture
    request = qwen.family.request_type("t2i")(prompt="a red fox in fresh snow", negative_prompt="blurry, dark",
                                              height=48, width=80, steps=3, true_cfg_scale=4.0, seed=7)
    off, on, pictures = with_and_without_previews(
        lambda: qwen.run_partition("t2i", sources["t2i"], qwen.THREE_NODES["t2i"], request)[0]["image"])
    assert torch.equal(on, off)
    assert_pictures(pictures, request.steps)


def test_z_image_is_the_same_with_previews(source):  # noqa: F811 - a fixture
    request = ZImageRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", height=48, width=80, steps=3,
                            seed=5, guidance_scale=3.0, cfg_normalization=1.0, cfg_truncation=0.1)
    off, on, pictures = with_and_without_previews(lambda: z_image.run_nodes(source, (z_image.STAGES,), request)["image"])
    assert torch.equal(on, off)
    assert_pictures(pictures, request.steps)
