"""Membership with pods (an external fleet): a worker that registers under the id of one that
died is a new worker whose death counts again (the operator replaces a lost pod by its index)."""

from __future__ import annotations

import time

from elasticmoe_worker.instance import fleet, membership


def _silent_past(timeout_s: float) -> None:
    time.sleep(timeout_s * 3)


def test_a_worker_registering_under_a_lost_devices_id_is_watched_again():
    m = membership.Membership(fleet.ExternalFleet(heartbeat_timeout_s=0.05), warm_workers=0, max_devices=4)
    m.registered(1)
    _silent_past(0.05)
    assert m.new_deaths() == {1: -1}
    m.remove([1])  # the coordinator drops the lost device
    m.seen(1)  # a heartbeat of the old worker on its way out: not a new worker
    _silent_past(0.05)
    assert m.new_deaths() == {}
    m.registered(1)  # the replacement pod's worker says hello
    assert m.new_deaths() == {}
    _silent_past(0.05)
    assert m.new_deaths() == {1: -1}, "the replacement's death went unseen"
    assert m.new_deaths() == {}  # reported once


def test_a_released_devices_heartbeats_do_not_make_it_a_worker_again():
    m = membership.Membership(fleet.ExternalFleet(heartbeat_timeout_s=0.05), warm_workers=0, max_devices=4)
    m.add([0, 1])
    m.seen(0)
    m.seen(1)
    m.remove([1])  # released by a scale-down
    m.seen(1)
    _silent_past(0.05)
    assert m.new_deaths() == {0: -1}
