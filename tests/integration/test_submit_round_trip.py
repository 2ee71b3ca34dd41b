"""`engine submit` against a real `engine serve`: a video job over embedded mosquitto (the output fetched from the URL
the service gives) and an image job over embedded amqtt (the output inline), each as a user runs the command, with
the credentials and the key from the service's client file; a second job under the same client id is answered (its
signatures count on from the clock); an absent service or a wrong key is an error within the timeout, not a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.cli import main
from tests.integration.serve_helpers import REPO, start_service


def submit(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "submit", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, env={**os.environ, **(env or {})})


def test_a_video_job_round_trip_on_mosquitto_and_no_hang_without_a_service(tmp_path, capsys, monkeypatch):
    served = start_service("wan_t2v_single.yaml", tmp_path / "state", "request.steps=2")
    try:
        client_file = str(served.state / "mqtt-client.json")
        assert ("edge buffers sized at height 48 (request defaults), width 64 (request defaults), num_frames 9 "
                "(request defaults)") in served.log_text()  # a service has no requests of its own
        done = submit("--client-file", client_file, "--prompt", "a fox", "--out", str(tmp_path / "out"))
        assert done.returncode == 0, done.stderr + served.log_text()[-2000:]
        lines = done.stdout.splitlines()
        assert lines[0].endswith(": queued 0%") and lines[-2].endswith(": completed"), lines
        video = Path(lines[-1].removeprefix("wrote "))
        assert video.parent == tmp_path / "out" and video.suffix == ".mp4"
        assert video.read_bytes()[4:8] == b"ftyp"  # an MP4, fetched from the URL the service named
        # The same client id again (as the command, in this process): its signatures must not look replayed.
        assert main(["submit", "--client-file", client_file, "--prompt", "a hare", "--seed", "2", "--out",
                     str(tmp_path / "out")]) == 0, capsys.readouterr().err
        second = Path(capsys.readouterr().out.splitlines()[-1].removeprefix("wrote "))
        assert second != video and second.read_bytes()[4:8] == b"ftyp"
        # A job the service refuses: its words, and no output.
        assert main(["submit", "--client-file", client_file, "--prompt", "x", "--size", "640x480"]) == 1
        refused = capsys.readouterr()
        assert refused.err.startswith("error: job: rejected (invalid_value: ") and "limits.height=480" in refused.err
        # Nobody serves that name: a clear error once the timeout passes. The service drops a job signed with
        # another key: no answer either.
        began = time.monotonic()
        assert main(["submit", "--client-file", client_file, "--service", "nobody", "--prompt", "x", "--timeout-s", "2"]) == 1
        assert time.monotonic() - began < 20
        assert capsys.readouterr().err.startswith("error: no answer from service 'nobody' on broker 127.0.0.1:")
        monkeypatch.setenv("ENGINE_SUBMIT_KEY", "ab" * 32)
        assert main(["submit", "--client-file", client_file, "--prompt", "x", "--timeout-s", "2"]) == 1
        assert "is the key its submit key?" in capsys.readouterr().err
    finally:
        assert served.stop() == 0


def test_an_image_job_round_trip_on_amqtt_with_the_image_inline(tmp_path):
    served = start_service("z_image_t2i_single.yaml", tmp_path / "state", "broker=embedded:amqtt", "request.steps=2")
    try:
        settings = json.loads((served.state / "mqtt-client.json").read_text())
        (tmp_path / "password").write_text(settings["password"])
        done = submit("--broker", f"mqtt://{settings['username']}@127.0.0.1:{settings['port']}", "--service",
                      "z_image_t2i_single", "--client-id", settings["client_id"], "--password-file",
                      str(tmp_path / "password"), "--images", "--prompt", "a lighthouse", "--size", "96x64",
                      "--out", str(tmp_path / "out"), env={"ENGINE_SUBMIT_KEY": settings["key"]})
        assert done.returncode == 0, done.stderr + served.log_text()[-2000:]
        image = Path(done.stdout.splitlines()[-1].removeprefix("wrote "))
        assert image.suffix == ".png" and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        assert served.stop() == 0
