"""`engine submit` without a broker: the signing README documents for other clients is the one the service verifies,
the options make the body, and secrets never come from the command line."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from engine.cli import build_parser, main
from engine.control.messages import JobUpdate, SubmitJob
from engine.control.signing import Opener
from engine.serve.cli_submit import connection_from, job_fields
from engine.serve.submit import progress_line

KEY_HEX = "ab" * 32


def test_a_submission_signed_as_the_readme_says_is_what_the_service_verifies():
    key, topic = bytes.fromhex(KEY_HEX), "dge/serve/wan_t2v/submit"
    body = json.dumps({"v": 1, "kind": "submit_job", "client_id": "c1", "request_key": "k1", "endpoint": "videos",
                       "job": {"prompt": "a fox"}}).encode()
    seq = b"1765100000000000"  # the clock in microseconds
    mac = hmac.new(key, b"DGE1\0" + topic.encode() + b"\0c1\0" + seq + b"\n" + body, hashlib.sha256).hexdigest()
    opened = Opener(key).open(topic, b"DGE1 c1 " + seq + b" " + mac.encode() + b"\n" + body)
    assert opened.sender == "c1" and opened.message == SubmitJob(client_id="c1", request_key="k1", endpoint="videos",
                                                                 job={"prompt": "a fox"})


def test_the_options_make_the_body():
    args = build_parser().parse_args(["submit", "--client-file", "f", "--prompt", "a fox", "--size", "64x48", "--steps",
                                      "4", "--field", "guidance_scale=1.5", "--field", "negative_prompt=blur, rain"])
    assert job_fields(args) == {"prompt": "a fox", "size": "64x48", "num_inference_steps": 4, "guidance_scale": 1.5,
                                "negative_prompt": "blur, rain"}


def test_secrets_come_from_files_or_the_environment(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("ENGINE_SUBMIT_KEY", raising=False)
    monkeypatch.delenv("ENGINE_BROKER_PASSWORD", raising=False)
    assert main(["submit", "--broker", "mqtt://u:secret@h:1883", "--service", "s", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "a password on the command line shows in `ps`" in err and "secret" not in err
    assert main(["submit", "--broker", "mqtt://u@h:1883", "--service", "s", "--prompt", "x"]) == 1
    assert capsys.readouterr().err.startswith("error: no submit key: give --key-file or set ENGINE_SUBMIT_KEY")
    (tmp_path / "password").write_text("pw\n")
    monkeypatch.setenv("ENGINE_SUBMIT_KEY", KEY_HEX)
    args = build_parser().parse_args(["submit", "--broker", "mqtt://u@h:1883", "--service", "s", "--prompt", "x",
                                      "--password-file", str(tmp_path / "password"), "--client-id", "edge-1"])
    connection = connection_from(args)
    assert (connection.broker.username, connection.broker.password, connection.key.hex()) == ("u", "pw", KEY_HEX)
    assert (connection.client_id, connection.topics.submit) == ("edge-1", "dge/serve/s/submit")
    client_file = tmp_path / "mqtt-client.json"
    client_file.write_text(json.dumps({"host": "127.0.0.1", "port": 1884, "username": "svc-client", "password": "p2",
                                       "client_id": "svc-client", "key": "cd" * 32, "submit_topic": "dge/serve/svc/submit",
                                       "reply_topic": "dge/serve/svc/reply/svc-client"}))
    args = build_parser().parse_args(["submit", "--client-file", str(client_file), "--prompt", "x"])
    connection = connection_from(args)  # ENGINE_SUBMIT_KEY still set: it comes before the file's key
    assert (connection.broker.display, connection.broker.password, connection.service) == ("127.0.0.1:1884", "p2", "svc")
    assert connection.key.hex() == KEY_HEX and connection.client_id == "svc-client"


@pytest.mark.parametrize(("job", "line"), [
    ({"id": "video_1", "status": "in_progress", "progress": 50}, "video_1: in_progress 50%"),
    ({"id": None, "status": "rejected", "error": {"code": "invalid_value", "message": "height: 48 is not ..."}},
     "job: rejected (invalid_value: height: 48 is not ...)"),
])
def test_progress_lines(job, line):
    assert progress_line(JobUpdate(request_key="k", job=job)) == line
