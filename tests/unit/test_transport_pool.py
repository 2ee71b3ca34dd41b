"""The receiver's slot state machine: grants, generations, fences, quarantine and leases."""

from __future__ import annotations

import pytest

from engine.errors import TransportError
from engine.transport.errors import SlotsExhausted
from engine.transport.pool import SlotPool, SlotState


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_pool(slots=2, quarantine_s=5.0, lease_s=60.0):
    clock = Clock()
    return SlotPool("phase1", slots, quarantine_s=quarantine_s, lease_s=lease_s, clock=clock), clock


def test_grants_distinct_slots_then_reports_exhaustion():
    pool, _ = make_pool(slots=2)
    assert {pool.grant("a").index, pool.grant("b").index} == {0, 1}
    with pytest.raises(SlotsExhausted, match="no free slot of 2: 2 in use, 0 fenced") as info:
        pool.grant("c")
    assert info.value.retry_after_s is None and "phase1" in str(info.value)


def test_fenced_slot_is_not_regranted_until_quarantine_passes_and_comes_back_at_a_new_generation():
    pool, clock = make_pool(slots=1, quarantine_s=5.0)
    slot = pool.grant("a")
    assert pool.fence(slot.index, slot.generation)
    assert pool.state(0).state is SlotState.FENCED
    clock.now += 4.9
    with pytest.raises(SlotsExhausted, match="1 fenced") as info:
        pool.grant("b")
    assert info.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    again = pool.grant("b")
    assert again.index == 0 and again.generation == slot.generation + 1


def test_stale_manifest_generation_and_wrong_request_are_refused():
    pool, _ = make_pool(slots=1, quarantine_s=0.0)
    slot = pool.grant("a")
    pool.fence(slot.index, slot.generation)
    pool.grant("b")
    with pytest.raises(TransportError, match="generation 1, the manifest names 0"):
        pool.check(0, 0, "a")
    with pytest.raises(TransportError, match="not granted to this request"):
        pool.check(0, 1, "a")
    pool.check(0, 1, "b")


def test_a_stale_fence_or_release_does_not_touch_the_slot_at_its_new_generation():
    pool, _ = make_pool(slots=1, quarantine_s=0.0)
    old = pool.grant("a")
    pool.fence(0, old.generation)
    new = pool.grant("b")
    assert not pool.fence(0, old.generation)
    pool.release(0, old.generation)
    assert pool.state(0).state is SlotState.GRANTED and pool.state(0).generation == new.generation


def test_undelivered_grant_expires_into_a_fence():
    pool, clock = make_pool(slots=1, quarantine_s=5.0, lease_s=10.0)
    slot = pool.grant("a")
    clock.now += 10.0
    with pytest.raises(SlotsExhausted, match="1 fenced"):
        pool.grant("b")
    assert pool.state(0).generation == slot.generation + 1


def test_open_slot_does_not_expire_and_release_frees_it():
    pool, clock = make_pool(slots=1, lease_s=1.0)
    slot = pool.grant("a")
    pool.opened(slot.index)
    clock.now += 100
    with pytest.raises(SlotsExhausted, match="1 in use"):
        pool.grant("b")
    pool.release(slot.index, slot.generation)
    assert pool.grant("b").generation == slot.generation


def test_fence_leaves_an_open_slot_alone():
    pool, _ = make_pool(slots=1)
    slot = pool.grant("a")
    pool.opened(slot.index)
    assert not pool.fence(slot.index, slot.generation)
    assert pool.state(0).state is SlotState.OPEN and pool.state(0).generation == slot.generation
