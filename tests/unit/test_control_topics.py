"""The topic layout: one place, namespaced by run id, and names that cannot break MQTT topic levels."""

from __future__ import annotations

import pytest

from engine.control.topics import Topics
from engine.errors import ControlError


def test_layout():
    topics = Topics(run_id="run-7", prefix="dge")
    assert topics.status("transformer", 2) == "dge/run-7/status/transformer/2"
    assert topics.heartbeat("transformer", 2) == "dge/run-7/hb/transformer/2"
    assert topics.inbox("decoder", 0) == "dge/run-7/in/decoder/0"
    assert topics.controller == "dge/run-7/ctl"
    assert topics.all_status == "dge/run-7/status/+/+"
    assert topics.all_heartbeats == "dge/run-7/hb/+/+"


def test_runs_do_not_share_topics():
    a, b = Topics(run_id="a"), Topics(run_id="b")
    assert a.controller != b.controller
    assert a.inbox("n", 0) != b.inbox("n", 0)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#"])
def test_names_that_are_not_one_topic_level_are_refused(bad):
    with pytest.raises(ControlError, match="cannot be an MQTT topic level"):
        Topics(run_id="r").status(bad, 0)
    with pytest.raises(ControlError, match="run id"):
        Topics(run_id=bad)


def test_negative_replica_is_refused():
    with pytest.raises(ControlError, match="replica index must be >= 0"):
        Topics(run_id="r").inbox("n", -1)
