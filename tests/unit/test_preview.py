"""Previews: the latent-to-RGB projections, the strip and its JPEG bound, the sink's cadence, the ``preview`` control
message's bounds, the files of ``engine run --preview`` and the controller keeping each request's latest."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from engine.control.messages import PREVIEW_B64_CHARS, Heartbeat, Preview, decode, encode
from engine.controller.tracker import State
from engine.errors import ControlError
from engine.preview.files import write_preview
from engine.preview.latent_spaces import FLUX, WAN21, WAN22
from engine.preview.picture import MAX_JPEG_BYTES, STRIP_FRAMES, Projection, encode_strip, flow_x0, offer, strip_frames
from engine.preview.sink import Picture, Sink, cadence, previews
from nodes.qwen_image.preview import projection as qwen_projection
from nodes.wan.preview import projection as wan_projection
from nodes.z_image.preview import projection as z_image_projection
from tests.unit.test_runtime_scheduler import deployed, dit_runs_forever, plan_of


def jpeg_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "JPEG"
    return image


# -- projections ------------------------------------------------------------------------------------------------


def test_the_published_tables_have_a_row_of_three_per_channel():
    for space, channels in ((WAN21, 16), (WAN22, 48), (FLUX, 16)):
        assert space.channels == channels and all(len(row) == 3 for row in space.factors) and len(space.bias) == 3


def test_each_family_picks_its_latent_space_by_channels_and_falls_back_to_the_first_three():
    assert wan_projection(16).space is WAN21 and wan_projection(48).space is WAN22
    assert qwen_projection(16).space is WAN21 and z_image_projection(16).space is FLUX
    assert wan_projection(12).space is None and qwen_projection(48).space is None and z_image_projection(4).space is None


@pytest.mark.parametrize("space", [WAN21, WAN22, FLUX, None], ids=lambda s: s.name if s else "first_three")
def test_a_projection_makes_rgb_in_the_unit_range_frame_by_frame(space):
    channels = space.channels if space else 12
    latent = torch.randn(channels, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4

    rgb = Projection(space).rgb(latent)

    assert rgb.shape == (3, 5, 7, 3) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    if space is None:  # each of the first three channels stretched to [0, 1]
        assert torch.equal(rgb.amin(dim=(0, 1, 2)), torch.zeros(3)) and torch.allclose(rgb.amax(dim=(0, 1, 2)), torch.ones(3))
        assert torch.allclose(rgb[..., 0], (latent[0] - latent[0].min()) / (latent[0].max() - latent[0].min()))


def test_the_linear_map_is_the_published_one():
    latent = torch.zeros(16, 1, 1, 1)
    latent[2] = 1.0  # channel 2 alone: its row plus the bias, mapped from [-1, 1] to [0, 1]
    expected = (torch.tensor(WAN21.factors[2]) + torch.tensor(WAN21.bias) + 1) / 2
    assert torch.allclose(Projection(WAN21).rgb(latent)[0, 0, 0], expected)


def test_the_flow_prediction_of_x0_is_x_t_less_sigma_times_v():
    sample, velocity = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(flow_x0(sample, velocity, torch.tensor(0.5)), torch.tensor([0.75, 2.5]))
    assert torch.equal(sample, torch.tensor([1.0, 2.0]))  # read, not written


def test_the_prediction_is_the_one_wans_scheduler_makes_at_each_step():
    """Wan's UniPC scheduler keeps its x0 prediction of the step (``model_outputs[-1]``): the preview's is the same."""
    import json
    from pathlib import Path

    from diffusers import UniPCMultistepScheduler

    config = json.loads((Path(__file__).resolve().parents[2] / "configs" / "wan2.1-t2v-1.3b" / "scheduler" /
                         "scheduler_config.json").read_text())
    scheduler = UniPCMultistepScheduler.from_config(config)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 16, 2, 3, 4, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        velocity = torch.randn(latents.shape, generator=generator)
        predicted = flow_x0(latents, velocity, scheduler.sigmas[i])
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        assert torch.allclose(predicted, scheduler.model_outputs[-1], atol=1e-6), i


# -- the strip and its JPEG -------------------------------------------------------------------------------------


def test_a_video_shows_up_to_four_frames_first_and_last_included():
    assert strip_frames(1) == [0] and strip_frames(4) == [0, 1, 2, 3]
    assert strip_frames(21) == [0, 7, 13, 20] and len(strip_frames(81)) == STRIP_FRAMES


def test_a_strip_is_the_frames_side_by_side_scaled_up_by_a_whole_factor():
    frames = torch.rand(4, 6, 8, 3, generator=torch.Generator().manual_seed(1))
    jpeg, width, height = encode_strip(frames)
    image = jpeg_image(jpeg)
    assert image.size == (width, height) == (4 * 8 * 32, 6 * 32)  # a frame's longer side 256 px
    assert len(jpeg) <= MAX_JPEG_BYTES


def test_a_picture_too_large_for_the_bound_steps_down_quality_then_size():
    noise = torch.rand(4, 200, 256, 3, generator=torch.Generator().manual_seed(2))  # noise compresses worst
    jpeg, width, height = encode_strip(noise)
    assert len(jpeg) <= MAX_JPEG_BYTES
    assert jpeg_image(jpeg).size == (width, height) and width <= 4 * 256


# -- the sink ---------------------------------------------------------------------------------------------------


def test_without_a_sink_the_prediction_is_never_computed():
    def predict():
        raise AssertionError("computed without a sink")

    for step in range(1, 5):
        offer(step, 4, predict, Projection(WAN21))
    with previews(None):
        offer(2, 4, predict, Projection(WAN21))


def test_a_sink_gets_a_picture_at_every_nth_step_only():
    got: list[Picture] = []
    latent = torch.randn(16, 9, 4, 6, generator=torch.Generator().manual_seed(3))
    with previews(Sink(2, got.append)):
        for step in range(1, 6):
            offer(step, 5, lambda: latent, Projection(WAN21))
    assert [(p.step, p.total) for p in got] == [(2, 5), (4, 5)]
    image = jpeg_image(got[0].jpeg)
    assert image.size == (got[0].width, got[0].height) == (4 * 6 * 42, 4 * 42)


def test_an_image_latent_is_one_frame():
    got: list[Picture] = []
    with previews(Sink(1, got.append)):
        offer(1, 1, lambda: torch.randn(16, 6, 10), Projection(FLUX))
    assert jpeg_image(got[0].jpeg).size == (250, 150)


def test_a_requests_cadence_overrides_its_nodes_and_zero_means_none():
    assert cadence(None, None) == 0 and cadence(None, 3) == 3 and cadence(1, 3) == 1 and cadence(0, 3) == 0
    assert not Sink(0, print).wants(2) and Sink(2, print).wants(4) and not Sink(2, print).wants(3)


# -- the control message ----------------------------------------------------------------------------------------


def preview_message(**fields) -> Preview:
    values = {"request_id": "r1", "node": "transformer", "replica": 0, "attempt": 0, "stage": "denoise", "step": 2,
              "total_steps": 4, "width": 256, "height": 64, "jpeg_b64": base64.b64encode(b"\xff\xd8jpeg").decode()}
    return Preview(**{**values, **fields})


def test_a_preview_message_round_trips_and_is_bounded():
    message = preview_message()
    assert decode(encode(message)) == message
    largest = preview_message(jpeg_b64="A" * PREVIEW_B64_CHARS)
    assert decode(encode(largest)) == largest
    assert PREVIEW_B64_CHARS >= 4 * MAX_JPEG_BYTES // 3 + 4  # what a worker makes always fits


@pytest.mark.parametrize("change, why", [
    ({"jpeg_b64": "A" * (PREVIEW_B64_CHARS + 4)}, "jpeg_b64: String should have at most"),
    ({"jpeg_b64": "not base64!"}, "jpeg_b64: String should match pattern"),
    ({"step": 5}, "step 5 is past the stage's 4 steps"),
    ({"stage": "../denoise"}, "stage: String should match pattern"),
    ({"request_id": "../r1"}, "request_id: String should match pattern"),
    ({"width": 0}, "width: Input should be greater than or equal to 1"),
])
def test_an_oversized_or_malformed_preview_is_refused(change, why):
    raw = {**preview_message().model_dump(), **change}
    with pytest.raises(ControlError, match="invalid 'preview' message") as caught:
        decode(encode(Preview.model_construct(**raw)))
    assert why in str(caught.value)


# -- files and the controller -----------------------------------------------------------------------------------


def test_engine_run_writes_each_preview_as_a_named_jpeg(tmp_path):
    folder = tmp_path / "made" / "here"
    path = write_preview(folder, preview_message(step=4))
    assert path == folder / "r1-denoise-step4.jpg" and path.read_bytes() == b"\xff\xd8jpeg"


def test_the_controller_keeps_a_requests_latest_preview_from_the_replica_running_it(tmp_path):
    async def scenario(controller, scheduler, launcher):
        from nodes.wan.family import WanRequest

        scheduler.preview_dir = tmp_path / "previews"
        handle = scheduler.submit(WanRequest(prompt="a", seed=1, steps=4))
        await controller.serve_until(lambda: any(node == "transformer" for node, _, _ in launcher.orders))
        request = handle.request
        scheduler.on_preview(preview_message(step=2))
        scheduler.on_preview(preview_message(step=4, attempt=1))  # not the attempt running: dropped
        scheduler.on_preview(preview_message(step=4, node="encoder"))  # not the replica running it: refused
        assert scheduler.impostors == 1
        scheduler.on_heartbeat(Heartbeat(node="transformer", replica=0, seq=1, request_id="r1", stage="denoise",
                                         step=2, total_steps=4, requests_done=0, rss_bytes=1, rejected=0, time=0.0))
        return request

    request = deployed(plan_of("wan_t2v.yaml"), tmp_path, dit_runs_forever, scenario)
    assert request.state == State.RUNNING and request.preview.step == 2
    assert request.previews_written == [str(tmp_path / "previews" / "r1-denoise-step2.jpg")]


# -- the service ------------------------------------------------------------------------------------------------


def test_the_service_shows_a_jobs_latest_preview_and_serves_its_jpeg(tmp_path):
    import time
    from types import SimpleNamespace

    from engine.controller.tracker import TrackedRequest
    from engine.serve.bodies import VideoBody
    from nodes.wan.family import WanRequest
    from tests.unit.serve_support import in_process, service_of

    service = service_of(tmp_path)
    with in_process(service) as client:
        job = client.portal.call(lambda: service.accept(service.new_id("video"), "video", VideoBody,
                                                        {"prompt": "a fox", "preview_every": 2}))
        assert job.params["preview_every"] == 2
        refused = client.get(f"/v1/videos/{job.id}/preview")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "no_preview"

        running = TrackedRequest(job.id, WanRequest(prompt="a fox", steps=4), time.monotonic(), state=State.RUNNING,
                                 segment=1, replica_of={0: 0, 1: 0})
        service.scheduler = SimpleNamespace(requests=[running])  # type: ignore[assignment]
        jpeg, width, height = encode_strip(torch.rand(2, 4, 6, 3))
        for step in (2, 4):
            running.preview = preview_message(request_id=job.id, step=step, width=width, height=height,
                                              jpeg_b64=base64.b64encode(jpeg + bytes([step])).decode())
            client.portal.call(service._sync)  # noqa: SLF001
        shown = client.get(f"/v1/videos/{job.id}").json()
        picture = client.get(f"/v1/videos/{job.id}/preview")
    assert shown["preview"] == {"step": 4, "total_steps": 4, "stage": "denoise", "width": width, "height": height}
    assert picture.headers["content-type"] == "image/jpeg" and picture.content == jpeg + bytes([4])
    assert jpeg_image(picture.content).size == (width, height)
