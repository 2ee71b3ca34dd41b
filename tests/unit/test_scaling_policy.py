"""The scaling policy alone: decisions from a node's load over a window (engine.controller.scaling)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.controller.scaling import LoadWindow, NodeLoad, NodeState, Sample, decide
from engine.spec.schema import Scaling

POLICY = Scaling(window_s=10, in_window_s=30, cooldown_s=10, out_busy=0.8, out_waiting=1.0, in_busy=0.2)


def state(replicas: int, *, warming: int = 0, draining: int = 0, fewest: int = 1, most: int = 4,
          changed_at: float = 0.0) -> NodeState:
    return NodeState(replicas, warming, draining, fewest, most, changed_at)


def test_a_busy_node_scales_out_naming_its_share():
    decision = decide("decoder", state(1), NodeLoad(busy=0.93, waiting=0.5, span_s=10), None, POLICY, now=20)
    assert (decision.direction, decision.reason) == ("out", "busy")
    assert "busy 93%" in decision.detail and "above 80%" in decision.detail


def test_a_queue_scales_out_even_below_the_busy_share():
    decision = decide("decoder", state(1), NodeLoad(busy=0.6, waiting=2.5, span_s=10), None, POLICY, now=20)
    assert (decision.direction, decision.reason) == ("out", "queue")
    assert "2.5 segment(s) waiting per replica" in decision.detail


def test_an_idle_node_scales_in_after_the_cooldown_and_a_whole_longer_window_only():
    idle = NodeLoad(busy=0.05, waiting=0.0, span_s=30)
    assert decide("decoder", state(2, changed_at=35), None, idle, POLICY, now=40) is None  # 5 s after its last change
    assert decide("decoder", state(2), None, NodeLoad(busy=0.05, waiting=0.0, span_s=20), POLICY, now=40) is None
    decision = decide("decoder", state(2), NodeLoad(busy=0.0, waiting=0.0, span_s=10), idle, POLICY, now=40)
    assert (decision.direction, decision.reason) == ("in", "idle")
    assert "10% on 1" in decision.detail and "of the last 30 s" in decision.detail


def test_something_waiting_keeps_an_idle_looking_node():
    assert decide("decoder", state(2), None, NodeLoad(busy=0.05, waiting=0.2, span_s=30), POLICY, now=40) is None


@pytest.mark.parametrize("kind", ["warming", "draining"])
def test_no_decision_while_a_replica_warms_up_or_drains(kind):
    busy = NodeLoad(busy=1.0, waiting=3.0, span_s=10)
    assert decide("decoder", state(1, **{kind: 1}), busy, busy, POLICY, now=20) is None
    assert decide("decoder", state(1), busy, busy, POLICY, now=20) is not None


def test_no_decision_before_a_whole_window_since_the_last_change():
    assert decide("decoder", state(1), NodeLoad(busy=1.0, waiting=3.0, span_s=4), None, POLICY, now=20) is None


def test_min_and_max_are_held():
    busy, idle = NodeLoad(busy=1.0, waiting=5.0, span_s=30), NodeLoad(busy=0.0, waiting=0.0, span_s=30)
    assert decide("decoder", state(4, most=4), busy, busy, POLICY, now=40) is None
    assert decide("decoder", state(2, fewest=2), idle, idle, POLICY, now=40) is None


def simulate(demand_at, seconds: int = 300) -> tuple[list[str], int]:
    """Ticks of one second under ``demand_at(t)`` (replica-seconds of work per second): the decisions, the count."""
    replicas, changed_at, changes, history = 1, 0.0, [], []
    for now in range(seconds):
        history.append((now, demand_at(now)))

        def load(window: float) -> NodeLoad:
            span = min(window, now - changed_at)
            seen = [d for t, d in history if t > now - span] or [0.0]
            return NodeLoad(busy=min(1.0, sum(seen) / len(seen) / replicas), waiting=0.0, span_s=span)

        decision = decide("decoder", state(replicas, changed_at=changed_at), load(POLICY.window_s),
                          load(POLICY.in_window_s), POLICY, now=float(now))
        if decision is not None:
            changes.append(decision.direction)
            replicas += 1 if decision.direction == "out" else -1
            changed_at = float(now)
    return changes, replicas


@pytest.mark.parametrize("demand", [0.79, 0.8, 0.81, 0.95, 1.6])
def test_a_steady_load_at_the_boundary_does_not_flap(demand):
    """A steady demand changes the count at most once per needed replica, and never back."""
    changes, replicas = simulate(lambda t: demand)
    assert "in" not in changes
    assert replicas == (1 if demand <= 0.8 else 2 if demand / 2 <= 0.8 else 3)


def test_lulls_between_bursts_keep_the_replica_a_long_idle_removes_it():
    """Bursts of 12 s at 1.5 times one replica's pace, 12 s apart: out once and kept; then 40 s idle: in once."""
    changes, replicas = simulate(lambda t: 0.0 if t >= 200 else 1.5 if t % 24 < 12 else 0.0, seconds=260)
    assert changes == ["out", "in"] and replicas == 1


def test_in_busy_must_stay_well_below_out_busy():
    with pytest.raises(ValidationError, match="in_busy 0.5 must be at most half of out_busy 0.8"):
        Scaling(in_busy=0.5, out_busy=0.8)


def test_the_window_measures_busy_share_and_waiting_per_replica():
    window = LoadWindow(window_s=10)
    for t in range(0, 21):  # replica 0 busy all the time, replica 1 half of it; 2 waiting on replica 0
        window.observe("decoder", 0, Sample(float(t), float(t), 2))
        window.observe("decoder", 1, Sample(float(t), t / 2, 0))
    load = window.load("decoder", [0, 1], since=0.0, now=20.0, window_s=10)
    assert load.busy == pytest.approx(0.75) and load.waiting == pytest.approx(1.0) and load.span_s == 10
    assert window.busy_share("decoder", 1, since=15.0) == pytest.approx(0.5)
    window.observe("decoder", 1, Sample(21.0, 0.0, 0))  # a new process of replica 1 counts from 0 again
    assert window.busy_share("decoder", 1, since=0.0) is None


def test_a_busy_cpu_node_on_cores_in_full_use_scales_out_only_for_a_queue():
    busy = NodeLoad(busy=0.95, waiting=0.5, span_s=10)
    cores_used = NodeState(1, 0, 0, 1, 4, 0.0, spare_cores=0.4)
    assert decide("decoder", cores_used, busy, None, POLICY, now=20) is None
    queued = decide("decoder", cores_used, NodeLoad(busy=0.95, waiting=2.0, span_s=10), None, POLICY, now=20)
    assert (queued.direction, queued.reason) == ("out", "queue")
    spare = NodeState(1, 0, 0, 1, 4, 0.0, spare_cores=1.2)
    assert decide("decoder", spare, busy, None, POLICY, now=20).reason == "busy"
