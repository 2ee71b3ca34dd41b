"""The HTTP API in-process (no sockets): hostile bodies get a 4xx in the API's error shape naming the problem, a
refused job leaves no upload behind, orphaned uploads are swept, and the bearer scheme is case-insensitive."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from engine.serve.http import ApiOptions
from engine.serve.service import Service
from tests.hostile_bodies import Hostile, image_bodies, json_bodies, png
from tests.unit.serve_support import in_process, service_of


@pytest.fixture
def t2v(tmp_path) -> Iterator[TestClient]:
    with in_process(service_of(tmp_path)) as client:
        yield client


@pytest.fixture
def i2v(tmp_path) -> Iterator[tuple[Service, TestClient]]:
    service = service_of(tmp_path, "wan_i2v.yaml", "wan2.1-i2v-14b-480p")
    with in_process(service) as client:
        yield service, client


@pytest.mark.parametrize("hostile", json_bodies(), ids=lambda h: h.name)
def test_hostile_json_and_form_bodies_get_a_4xx_naming_the_problem(t2v, hostile: Hostile):
    hostile.check(t2v.post("/v1/videos", **hostile.send))
    assert t2v.post("/v1/videos", json={"prompt": "a normal job"}).status_code == 200


@pytest.mark.parametrize("hostile", image_bodies("input_reference", {"prompt": "x"}), ids=lambda h: h.name)
def test_hostile_images_get_a_422_and_leave_no_upload(i2v, hostile: Hostile):
    service, client = i2v
    hostile.check(client.post("/v1/videos", **hostile.send))
    assert list(service.options.uploads.iterdir()) == []
    accepted = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("in.png", png(), "image/png")})
    assert accepted.status_code == 200, accepted.text
    assert [p.name for p in service.options.uploads.iterdir()] == [f"{accepted.json()['id']}.png"]


def test_uploads_of_no_job_are_swept_and_a_jobs_upload_stays(i2v):
    service, client = i2v
    job = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("in.png", png(), "image/png")}).json()
    orphan = service.options.uploads / "video_0123456789abcdef01234567.png"
    orphan.write_bytes(png())
    client.portal.call(service._recover)  # at start, and after a job finishes at most once a minute
    assert [p.name for p in service.options.uploads.iterdir()] == [f"{job['id']}.png"]


def test_every_4xx_is_in_the_api_error_shape(t2v):
    bad_limit = t2v.get("/v1/videos", params={"limit": "abc"})
    assert bad_limit.status_code == 422 and bad_limit.json()["error"]["param"] == "limit"
    unknown = t2v.get("/v1/nothing")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = t2v.put("/v1/videos")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_the_bearer_scheme_is_case_insensitive(tmp_path):
    with in_process(service_of(tmp_path), ApiOptions(token="secret")) as client:
        for given in ("Bearer secret", "bearer secret", "BEARER  secret"):
            assert client.get("/v1/models", headers={"Authorization": given}).status_code == 200, given
        for given in ("Bearer wrong", "Basic secret", "secret", "Bearer"):
            refused = client.get("/v1/models", headers={"Authorization": given})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", given


def test_an_internal_error_is_a_500_in_the_api_error_shape(tmp_path):
    service = service_of(tmp_path)
    with in_process(service) as client:
        client.portal.call(service.store.close)  # the store is gone: listing jobs fails inside the service
        answer = TestClient(client.app, raise_server_exceptions=False).get("/v1/videos")
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error", answer.text


def test_a_jobs_stream_follows_its_file_until_the_job_ends_then_the_plain_rules_apply(tmp_path):
    """``?stream=true`` answers a job not finished with its stream file as it grows (chunked, no length), and ends
    when the job does (here: cancelled); afterwards a cancelled job's content is 409 as without ``stream``."""
    import threading
    import time

    import numpy as np

    from engine.stream.fmp4 import FragmentedMp4Writer, stream_path

    service = service_of(tmp_path)
    service.options.outputs.mkdir(parents=True)
    with in_process(service) as client:
        job = client.post("/v1/videos", json={"prompt": "streamed"}).json()
        path = stream_path(service.options.outputs, job["id"])

        def decoder() -> None:
            deadline = time.monotonic() + 10
            while job["id"] not in service._followers and time.monotonic() < deadline:  # the stream follows the job
                time.sleep(0.01)
            try:
                with FragmentedMp4Writer(path, 8) as writer:
                    for count in (1, 4, 4):
                        writer.add(np.full((count, 16, 16, 3), 40 * count, np.uint8))
            finally:
                client.portal.call(service.cancel, job["id"])

        thread = threading.Thread(target=decoder)
        thread.start()
        answer = client.get(f"/v1/videos/{job['id']}/content", params={"stream": "true"})
        thread.join()
        assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
        assert "content-length" not in answer.headers and answer.content == path.read_bytes()
        again = client.get(f"/v1/videos/{job['id']}/content", params={"stream": "true"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "not_completed"
        assert client.get("/v1/videos/video_000000000000000000000000/content", params={"stream": "true"}).status_code == 404
