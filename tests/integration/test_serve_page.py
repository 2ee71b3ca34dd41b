"""The service's page in a real browser: Debian's headless Chromium, driven by selenium through chromium-driver,
against a real ``engine serve``. One deployment of the two-DiT T2V graph wants an API token (the page asks for
it once): a job submitted from the form reaches 100% and its video plays, another is cancelled from its card.
A running job's card shows its latest denoising preview (the DiT node
previews every 20 steps). A separate three-node deployment, open, loses its only transformer worker to kill -9 for good: the page shows
the replica down and the job's error; stopped, the page says the service does not answer and shows no replica
ready, and started again on the same port, the page comes back to it by itself. An image edit deployment takes its image from the form and shows the
result. Screenshots land in each test's tmp_path; a failed wait names its own."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.serve_helpers import REPO, Served, start_service

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="chromium and chromium-driver are not installed"),
]

TOKEN = "page-test-token-5f1c"
LIMITS = ("limits.height=128", "limits.width=160", "limits.num_frames=17")
LONG = {"width": 160, "height": 128, "num_frames": 17, "num_inference_steps": 1000}  # about a minute
WAIT_S = 120.0
PREVIEW_EVERY = 20  #: the DiT node's previews, in steps


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("page") / "state"
    token_file = state.parent / "token"
    token_file.write_text(TOKEN)
    served = start_service("wan_t2v_two_dit.yaml", state, *LIMITS, f"nodes.transformer.preview.every={PREVIEW_EVERY}",
                           extra=("--no-mqtt", "--token-file", str(token_file)))
    yield served
    assert served.stop() == 0, served.log_text()[-3000:]
    assert "Traceback" not in served.log_text(), served.log_text()[-5000:]
    assert TOKEN not in served.log_text() + served.worker_logs()


class Page:
    """The page in one headless Chromium; waits that fail save a screenshot and say where."""

    def __init__(self, shots: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                         "--autoplay-policy=no-user-gesture-required"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.shots = shots

    def close(self) -> None:
        self.driver.quit()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, what: str, condition: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
        """condition()'s first true value; AssertionError with a screenshot and the page's text after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                path = self.shot("timeout-" + re.sub(r"\W+", "-", what)[:60])
                text = self.js("return document.body.innerText")
                raise AssertionError(f"{what}: not within {timeout_s:g} s; screenshot {path}; the page says:\n{text[-3000:]}")
            time.sleep(0.2)

    def open(self, url: str, token: str | None = None) -> None:
        """Load the page, give the token when it asks, and wait for the graph."""
        self.driver.get(url)
        if token is not None:
            self.wait("the token dialog", lambda: self.js("return document.getElementById('token-dialog').open"))
            self.driver.find_element("id", "token-input").send_keys(token)
            self.driver.find_element("css selector", "#token-form button").click()
        self.wait("the graph drawn", lambda: self.js("return document.querySelectorAll('#graph g.node').length"))

    def replicas(self) -> dict[str, dict[str, str]]:
        """'node[r]' -> its row's state, stage, text and tooltip."""
        return self.js("""return Object.fromEntries([...document.querySelectorAll('#graph g.replica')].map(g =>
            [`${g.dataset.node}[${g.dataset.replica}]`, {state: g.dataset.state, stage: g.dataset.stage,
             text: g.querySelector('text').textContent, title: g.querySelector('title').textContent}]))""")

    def submit_form(self, prompt: str, **fields: Any) -> None:
        """Fill in the form as a user does and submit it."""
        form = self.driver.find_element("id", "submit")
        form.find_element("name", "prompt").send_keys(prompt)
        for name, value in fields.items():
            field = form.find_element("name", name)
            field.clear()
            field.send_keys(str(value))
        form.find_element("css selector", "button[type=submit]").click()

    def submit(self, prompt: str, **fields: Any) -> str:
        """Submit the form; the id of the job it made, once the list shows it."""
        self.submit_form(prompt, **fields)
        return self.wait(f"a card for {prompt!r}", lambda: self.js(
            "return [...document.querySelectorAll('#jobs .job')].find(c => "
            "c.querySelector('.job-prompt').textContent === arguments[0])?.dataset.jobId", prompt))

    def card(self, job_id: str) -> dict[str, Any]:
        return self.js("""const c = document.querySelector(`#jobs .job[data-job-id="${arguments[0]}"]`);
            return {status: c.dataset.status, progress: c.querySelector('progress').value,
                    label: c.querySelector('.progress-label').textContent, error: c.querySelector('.job-error').textContent,
                    cancel: !c.querySelector('.cancel').hidden}""", job_id)

    def preview(self, job_id: str) -> dict[str, Any]:
        """The card's preview image: shown or not, loaded (its decoded width), the step it is of."""
        return self.js("""const i = document.querySelector(`#jobs .job[data-job-id="${arguments[0]}"] .job-preview`);
            return {hidden: i.hidden, complete: i.complete, naturalWidth: i.naturalWidth, shownWidth: i.clientWidth,
                    step: i.dataset.step, src: i.src}""", job_id)

    def video(self, job_id: str) -> dict[str, Any] | None:
        return self.js("""const v = document.querySelector(`#jobs .job[data-job-id="${arguments[0]}"] video`);
            return v && {duration: v.duration, readyState: v.readyState, src: v.src, error: v.error && v.error.message}""",
                       job_id)


@pytest.fixture
def page(tmp_path) -> Iterator[Page]:
    opened = Page(tmp_path)
    yield opened
    opened.close()


def test_the_page_asks_for_the_token_once_and_a_job_from_the_form_plays(wan, page):
    page.open(wan.url, token=TOKEN)
    page.wait("four replicas ready", lambda: [r["state"] for r in page.replicas().values()] == ["ready"] * 4)
    edges = page.js("return [...document.querySelectorAll('#graph g.edge')].map(e => e.textContent)")
    assert len(edges) == 2 and all("mooncake" in e and "/ request" in e for e in edges), edges

    boxes = page.js("""return Object.fromEntries([...document.querySelectorAll('#submit input[type=number]')].map(i =>
        [i.name, {min: i.min, max: i.max, width: i.clientWidth}]))""")
    assert boxes["num_inference_steps"]["max"] == "1000" and boxes["height"]["max"] == "128", boxes  # family, limits
    assert boxes["num_frames"]["max"] == "17" and boxes["width"]["max"] == "160", boxes
    assert boxes["num_inference_steps"]["width"] >= 90 and boxes["seed"]["width"] >= 180, (boxes, page.shot("form"))

    page.submit_form("too tall", height=256)  # over the limit: the browser holds it back, naming the maximum
    assert page.js("return document.querySelector('#submit [name=height]').validity.rangeOverflow"), page.shot("too-tall")
    page.driver.find_element("name", "height").clear()
    page.driver.find_element("name", "height").send_keys("128")
    page.submit_form("", seed=2**63)  # what only the service knows is refused as the API refuses it, naming the field
    refused = page.wait("the form's error", lambda: page.js("return document.getElementById('submit-error').textContent"))
    assert refused == f"seed: Input should be less than {2**63}", refused
    assert page.js("return document.querySelector('#submit [name=seed]').getAttribute('aria-invalid')") == "true"
    assert not page.js("return document.querySelectorAll('#jobs .job').length")

    page.driver.find_element("name", "prompt").clear()
    job_id = page.submit("a red fox in snow", height=48, num_inference_steps=8, seed=1234567890123)
    assert not page.js("return document.querySelector('#submit [name=seed]').getAttribute('aria-invalid')")
    page.wait("the job completed", lambda: page.card(job_id)["status"] == "completed")
    card = page.card(job_id)
    shot = page.shot("completed")
    assert card["progress"] == 100 and card["label"] == "100% · step 8/8" and not card["cancel"], (card, shot)
    video = page.wait("the video loaded", lambda: (v := page.video(job_id)) and v["readyState"] >= 2 and v)
    assert video["duration"] > 0 and video["error"] is None, (video, shot)
    size = page.js("return document.querySelector(`#jobs .job[data-job-id='${arguments[0]}'] .job-size`).textContent", job_id)
    assert size == f"64x48 · {video['duration']:g} s" == "64x48 · 1.125 s", (size, video)  # 9 frames at 8 fps
    assert video["src"].startswith("blob:"), "with a token the page fetches the video itself"
    played = page.driver.execute_async_script("""const [id, done] = arguments;
        const v = document.querySelector(`#jobs .job[data-job-id="${id}"] video`);
        v.play().then(() => setTimeout(() => done({paused: v.paused, time: v.currentTime}), 300), e => done({error: String(e)}))""",
                                              job_id)
    assert played.get("paused") is False and played["time"] > 0, (played, page.shot("played"))

    page.driver.refresh()  # the same tab: the token is remembered
    page.wait("the graph drawn again", lambda: page.js("return document.querySelectorAll('#graph g.node').length"))
    assert not page.js("return document.getElementById('token-dialog').open"), page.shot("asked-again")
    page.wait("the job listed again", lambda: page.js(
        "return document.querySelector(`#jobs .job[data-job-id='${arguments[0]}']`)?.dataset.status", job_id) == "completed")

    # A job whose DiT skipped passes (step caching, asked for by the request) says how many on its card.
    cached = httpx.post(f"{wan.url}/v1/videos", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60, json={
        "prompt": "a cached job", "size": "64x48", "num_inference_steps": 20, "cache": "fbcache:0.1"}).json()
    page.wait("the cached job completed", lambda: page.js(
        "return document.querySelector(`#jobs .job[data-job-id='${arguments[0]}']`)?.dataset.status", cached["id"]) == "completed")
    label = page.card(cached["id"])["label"]
    assert re.fullmatch(r"100% · step 20/20 · \d+ of 40 DiT passes skipped", label), (label, page.shot("step-cache"))


def test_a_running_job_shows_its_replica_busy_and_cancelled_shows_as_cancelled(wan, page):
    page.open(wan.url, token=TOKEN)
    job_id = page.submit("a long job to cancel", **LONG)
    page.wait("the job in progress", lambda: page.card(job_id)["status"] == "in_progress")
    busy = page.wait("a transformer replica busy denoising", lambda: next(
        (r for name, r in page.replicas().items() if name.startswith("transformer") and r["stage"] == "denoise"), None))
    page.wait("the job's progress moved", lambda: page.card(job_id)["progress"] > 0)
    shot = page.shot("busy")
    assert re.fullmatch(r"\[[01]\] busy · denoise \d+/1000", busy["text"]) and f"job {job_id}" in busy["title"], (busy, shot)
    assert re.fullmatch(r"\d+% · step \d+/1000", page.card(job_id)["label"]), (page.card(job_id), shot)
    # The DiT node previews every 20 steps: the card shows the latest picture while the job runs.
    preview = page.wait("the card's preview image loaded", lambda: (p := page.preview(job_id)) and not p["hidden"]
                        and p["complete"] and p["naturalWidth"] > 0 and p)
    shot = page.shot("preview")
    assert int(preview["step"]) % PREVIEW_EVERY == 0 and preview["shownWidth"] > 0, (preview, shot)
    assert preview["src"].startswith("blob:"), "with a token the page fetches the preview itself"

    page.driver.find_element("css selector", f'#jobs .job[data-job-id="{job_id}"] .cancel').click()
    page.wait("the job cancelled", lambda: page.card(job_id)["status"] == "cancelled")
    card = page.card(job_id)
    shot = page.shot("cancelled")
    assert not card["cancel"] and card["error"] == "", (card, shot)
    assert page.preview(job_id)["hidden"], (page.preview(job_id), shot)  # a preview only while the job runs
    answer = httpx.get(f"{wan.url}/v1/videos/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.json()["status"] == "cancelled"
    page.wait("the transformer replicas idle again", lambda: all(
        r["state"] == "ready" for name, r in page.replicas().items() if name.startswith("transformer")))


def test_a_running_jobs_card_plays_its_video_while_it_is_decoded(wan, page):
    """The card of a running video job plays the stream (Media Source Extensions over the fetched fragmented MP4)
    while the job is still in progress; the finished video replaces it."""
    page.open(wan.url, token=TOKEN)
    job_id = page.submit("a fox streamed as it is decoded", width=160, height=128, num_frames=17, num_inference_steps=2)
    stream = page.wait("the video playing while the job runs", lambda: page.js("""
        const card = document.querySelector(`#jobs .job[data-job-id="${arguments[0]}"]`);
        const v = card.querySelector('video.job-stream');
        return v && card.dataset.status === 'in_progress' && (v.readyState >= 2 || v.currentTime > 0) &&
            {status: card.dataset.status, readyState: v.readyState, time: v.currentTime, src: v.src,
             buffered: v.buffered.length ? v.buffered.end(0) : 0, hidden: v.hidden}""", job_id))
    shot = page.shot("streaming")
    assert stream["src"].startswith("blob:") and not stream["hidden"] and stream["buffered"] > 0, (stream, shot)
    page.wait("the job completed", lambda: page.card(job_id)["status"] == "completed")
    video = page.wait("the finished video loaded", lambda: (v := page.video(job_id)) and v["readyState"] >= 2 and v)
    assert video["duration"] == pytest.approx(17 / 8, abs=0.07) and video["error"] is None, (video, page.shot("streamed-done"))
    assert not page.js("return document.querySelectorAll('#jobs video.job-stream').length")


def test_a_killed_worker_shows_its_replica_down_and_the_jobs_error_then_the_service_restarts(tmp_path, page):
    """kill -9 of the only transformer: its replica down, the job's error; then the service stops (the page says
    it does not answer, in its own words, and shows nothing as ready) and starts again on the same port (the page
    comes back to it by itself, the error gone)."""
    settings = ("wan_t2v.yaml", tmp_path / "state", *LIMITS)
    served = start_service(*settings, extra=("--no-mqtt", "--max-restarts", "0"))
    try:
        page.open(served.url)
        page.wait("three replicas ready", lambda: [r["state"] for r in page.replicas().values()] == ["ready"] * 3)
        job_id = page.submit("a job whose worker dies", **LONG)
        page.wait("the transformer busy denoising", lambda: page.replicas()["transformer[0]"]["stage"] == "denoise")
        replicas = httpx.get(f"{served.url}/v1/service", timeout=30).json()["state"]["replicas"]
        pid = next(r["pid"] for r in replicas if r["node"] == "transformer")
        os.kill(pid, signal.SIGKILL)

        down = page.wait("the transformer down", lambda: (r := page.replicas()["transformer[0]"])["state"] == "down" and r)
        page.wait("the job failed", lambda: page.card(job_id)["status"] == "failed")
        card = page.card(job_id)
        shot = page.shot("killed")
        # Out through its exit (killed by SIGKILL) or its broker last will (dead), whichever the service hears first.
        why = down["title"].splitlines()[0].removeprefix("[0] down: ")
        assert re.match("process killed by SIGKILL|dead: connection lost", why), (down, shot)
        assert card["error"].startswith(f"generation_failed: node 'transformer' replica 0 (stage 'denoise'): {why}"), (card, shot)
        assert page.js("return document.getElementById('status').textContent") == "degraded", shot
        shown = httpx.get(f"{served.url}/v1/videos/{job_id}", timeout=30).json()
        assert card["error"] == f"generation_failed: {shown['error']['message']}", "not the API's own words"
    finally:
        code = served.stop()  # with the page still open: its event stream must not hold the service up
    assert code == 0 and "Traceback" not in served.log_text(), served.log_text()[-5000:]

    page.wait("the page disconnected", lambda: page.js("return document.getElementById('status').textContent") == "disconnected")
    error = page.wait("the page's error in its own words", lambda: (
        text := page.js("return document.getElementById('page-error').textContent")) and "no answer" in text and text)
    page.wait("every replica unknown", lambda: {r["state"] for r in page.replicas().values()} == {"unknown"})
    shot = page.shot("disconnected")
    assert error == "events: GET /v1/service/events: no answer from the service (stopped, restarting, or the network " \
                    "is down); reconnecting every 2 s", (error, shot)
    assert page.replicas()["encoder[0]"]["text"] == "[0] unknown (was ready)", shot
    queue = page.js("const q = document.getElementById('queue'); return [q.textContent, q.dataset.stale]")
    assert re.fullmatch(r"queued 0 · running 0 \(as of .+\)", queue[0]) and queue[1] == "true", (queue, shot)

    port = int(served.url.rsplit(":", 1)[1])
    again = start_service(*settings, extra=("--no-mqtt",), port=port)
    try:
        page.wait("the page back with the service", lambda: page.js("return document.getElementById('status').textContent") == "ok")
        page.wait("three replicas ready again", lambda: [r["state"] for r in page.replicas().values()] == ["ready"] * 3)
        shot = page.shot("back")
        assert page.js("return document.getElementById('page-error').hidden"), shot
        assert page.js("return document.getElementById('queue').dataset.stale") is None, shot
        assert page.card(job_id)["status"] == "failed", shot  # the jobs listed again, from the service's records
    finally:
        code = again.stop()
    assert code == 0 and "Traceback" not in again.log_text(), again.log_text()[-5000:]


def test_the_service_endpoints_describe_the_graph_without_a_browser(wan):
    """What the page reads, checked directly: the graph as planned and events that start with the jobs."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{wan.url}/v1/service", timeout=30).status_code == 401
    assert httpx.get(f"{wan.url}/v1/service", headers={"Authorization": f"bearer {TOKEN}"}, timeout=30).status_code == 200
    assert httpx.get(f"{wan.url}/", timeout=30).status_code == 200  # the page itself holds nothing secret
    service = httpx.get(f"{wan.url}/v1/service", headers=auth, timeout=30).json()
    assert [(n["name"], n["replicas"], n["device"]) for n in service["nodes"]] == [
        ("encoder", 1, "cpu"), ("transformer", 2, "cpu"), ("decoder", 1, "cpu")]
    assert [(e["name"], e["from"], e["to"], e["transport"]) for e in service["edges"]] == [
        ("phase1", "encoder", "transformer", "mooncake"), ("phase2", "transformer", "decoder", "mooncake")]
    phase2 = service["edges"][1]  # latents [1, 16, 3, 6, 8] float32 at the default 9 frames of 48x64
    assert phase2["bytes_per_request"] == 16 * 3 * 6 * 8 * 4 and phase2["slot_bytes"] == 16 * 5 * 16 * 20 * 4
    assert service["endpoint"] == "/v1/videos" and service["defaults"]["steps"] == 4
    with httpx.stream("GET", f"{wan.url}/v1/service/events", headers=auth, timeout=30) as stream:
        names = []
        for line in stream.iter_lines():
            if line.startswith("event: "):
                names.append(line[len("event: "):])
            if len(names) == 2:
                break
    assert names == ["jobs", "state"]
    for name in ("index.html", "app.js", "api.js", "graph.js", "jobs.js", "stream.js", "form.js", "style.css"):
        assert httpx.get(f"{wan.url}/page/{name}", timeout=30).status_code == 200, name


def test_an_image_edit_from_the_form_shows_its_image(tmp_path, page):
    served = start_service("qwen_image_edit_single.yaml", tmp_path / "state", extra=("--no-mqtt",))
    try:
        page.open(served.url)
        assert page.js("return document.querySelector('#submit [name=num_frames]').closest('label').hidden")
        page.driver.find_element("css selector", "#submit input[type=file]").send_keys(str(REPO / "graphs" / "assets" / "first_frame.png"))
        job_id = page.submit("make the sky stormy", seed=7)
        page.wait("the edit completed", lambda: page.card(job_id)["status"] == "completed")
        image = page.wait("the image shown", lambda: page.js(
            "const i = document.querySelector(`#jobs .job[data-job-id='${arguments[0]}'] .job-output img`);"
            "return i && i.complete && i.naturalWidth && [i.naturalWidth, i.naturalHeight]", job_id))
        shot = page.shot("edited")
        assert image == [64, 64] and page.card(job_id)["label"].startswith("100%"), (image, shot)
    finally:
        code = served.stop()
    assert code == 0 and "Traceback" not in served.log_text(), served.log_text()[-5000:]
