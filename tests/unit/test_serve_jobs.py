"""The service's job store: what is written is read back after a reopen; lists page; retention drops the oldest."""

from __future__ import annotations

from engine.serve.jobs import Job, JobStore, Retention, api_object


def job(index: int, status: str = "queued", **fields) -> Job:
    return Job(id=f"video_{index:03d}", object="video", model="m", params={"prompt": f"p{index}"}, api={"size": "64x48"},
               status=status, created_at=1000.0 + index, **fields)


def test_jobs_survive_a_reopen(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add(job(1))
    running = job(2, "in_progress", progress=40, origin="mqtt:cam:k1")
    store.add(running)
    running.status, running.outputs, running.output_bytes = "completed", ["/x/video_002.mp4"], 10
    store.save(running)
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")
    assert again.get("video_002") == running and again.get("video_001") == job(1)
    assert [j.id for j in again.with_status("queued")] == ["video_001"]
    assert again.find_origin("mqtt:cam:k1").id == "video_002"
    assert again.counts() == {"queued": 1, "completed": 1}


def test_lists_page_by_creation_time(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for index in range(5):
        store.add(job(index))
    assert [j.id for j in store.list(limit=2)] == ["video_004", "video_003"]
    assert [j.id for j in store.list(limit=2, after="video_003")] == ["video_002", "video_001"]
    assert [j.id for j in store.list(limit=3, order="asc", after="video_001")] == ["video_002", "video_003", "video_004"]


def test_retention_drops_the_oldest_finished_jobs_beyond_count_bytes_and_age(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for index in range(6):
        store.add(job(index, "completed", finished_at=2000.0 + index, output_bytes=100))
    store.add(job(9, "queued"))
    assert [j.id for j in store.prune(Retention(count=4), now=2010)] == ["video_001", "video_000"]
    assert [j.id for j in store.prune(Retention(max_bytes=250), now=2010)] == ["video_003", "video_002"]
    assert [j.id for j in store.prune(Retention(max_age_s=5.5), now=2010)] == ["video_004"]
    assert [j.id for j in store.list(limit=10)] == ["video_009", "video_005"]  # a queued job is never dropped


def test_the_api_shows_a_failed_job_with_its_error():
    shown = api_object(job(1, "failed", error_code="generation_failed", error_message="node 'decoder' replica 0 failed"))
    assert shown["error"] == {"code": "generation_failed", "message": "node 'decoder' replica 0 failed"}
    assert shown["size"] == "64x48" and shown["completed_at"] is None and shown["object"] == "video"
