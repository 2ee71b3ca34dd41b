"""Signed control messages: forged, altered, moved, replayed, oversized and deeply nested messages are refused
before anything acts on them; reordered ones are not."""

from __future__ import annotations

import json

import pytest

from engine.control.messages import Shutdown, StageDone
from engine.control.signing import MAX_DEPTH, MAX_MESSAGE_BYTES, REPLAY_WINDOW, Opener, Rejected, Sealer, json_depth, new_key

KEY = new_key()
TOPIC = "dge/run1/ctl"


def _done(request_id: str = "r1") -> StageDone:
    return StageDone(request_id=request_id, node="decoder", replica=0, attempt=0, timings={}, edges={}, outputs=[],
                     peak_rss_bytes=0)


def _reason(opener: Opener, topic: str, payload: bytes) -> str:
    with pytest.raises(Rejected) as info:
        opener.open(topic, payload)
    return info.value.reason


def test_a_sealed_message_opens_with_its_sender():
    payload = Sealer(KEY, "run1-decoder-0").seal(TOPIC, _done())
    opened = Opener(KEY).open(TOPIC, payload)
    assert opened.sender == "run1-decoder-0"
    assert opened.message == _done()


def test_an_unsigned_message_is_refused_before_parsing():
    assert _reason(Opener(KEY), TOPIC, json.dumps(_done().model_dump()).encode()) == "unsigned"


def test_another_key_an_altered_body_or_another_topic_fail_the_signature():
    payload = Sealer(KEY, "run1-decoder-0").seal(TOPIC, _done())
    assert _reason(Opener(new_key()), TOPIC, payload) == "bad signature"
    assert _reason(Opener(KEY), TOPIC, payload.replace(b'"r1"', b'"r2"')) == "bad signature"
    assert _reason(Opener(KEY), "dge/run1/in/decoder/0", payload) == "bad signature"
    header, _, body = payload.partition(b"\n")
    forged = header.replace(b"run1-decoder-0", b"run1-decoder-1") + b"\n" + body
    assert _reason(Opener(KEY), TOPIC, forged) == "bad signature"


def test_a_replayed_message_is_refused_but_reordered_ones_are_not():
    sealer, opener = Sealer(KEY, "run1-controller"), Opener(KEY)
    first, second, third = (sealer.seal(TOPIC, Shutdown(reason=str(i))) for i in range(3))
    opener.open(TOPIC, third)
    opener.open(TOPIC, first)  # late, but never seen: accepted
    assert _reason(opener, TOPIC, first) == "replayed"
    assert _reason(opener, TOPIC, third) == "replayed"
    opener.open(TOPIC, second)


def test_a_message_older_than_the_window_is_refused():
    sealer, opener = Sealer(KEY, "run1-controller"), Opener(KEY)
    old = sealer.seal(TOPIC, Shutdown(reason="old"))
    for _ in range(REPLAY_WINDOW):
        sealer.seal(TOPIC, Shutdown(reason="skipped"))
    opener.open(TOPIC, sealer.seal(TOPIC, Shutdown(reason="new")))
    assert _reason(opener, TOPIC, old) == "replayed"


def test_sequence_numbers_are_tracked_per_topic():
    sealer, opener = Sealer(KEY, "run1-transformer-0"), Opener(KEY)
    status = sealer.seal("dge/run1/status/transformer/0", Shutdown(reason="will, sealed at connect"))
    for i in range(REPLAY_WINDOW + 10):
        opener.open("dge/run1/hb/transformer/0", sealer.seal("dge/run1/hb/transformer/0", Shutdown(reason=str(i))))
    opener.open("dge/run1/status/transformer/0", status)  # a last will published long after it was sealed


def test_oversized_and_deeply_nested_messages_are_refused():
    sealer, opener = Sealer(KEY, "run1-controller"), Opener(KEY)
    assert _reason(opener, TOPIC, b"x" * (MAX_MESSAGE_BYTES + 1)) == "too large"
    nested = b'{"v": 1, "kind": "shutdown", "reason": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _reason(opener, TOPIC, sealer.seal_body(TOPIC, nested)) == "too deep"  # signed by a key holder


def test_a_signed_message_that_fails_the_schema_is_refused_as_invalid():
    body = json.dumps({"v": 1, "kind": "run_stage", "request_id": "../../../../tmp/x", "request": {}, "node": "decoder",
                       "attempt": 0, "deadline_s": 1, "segment": 0, "send_to": {}}).encode()
    assert _reason(Opener(KEY), TOPIC, Sealer(KEY, "run1-controller").seal_body(TOPIC, body)) == "invalid"


@pytest.mark.parametrize(("text", "depth"), [(b"1", 0), (b"[]", 1), (b'{"a": [1, {"b": 2}]}', 3),
                                              (b'{"a": "[[[[{{"}', 1), (b'["\\"[["]', 1)])
def test_json_depth_skips_strings(text, depth):
    assert json_depth(text) == depth
    assert depth <= MAX_DEPTH
