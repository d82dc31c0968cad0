"""Membership with pods (an external fleet): a worker that registers under the id of one that
died is a new worker whose death counts again (the operator replaces a lost pod by its index).
Starting workers: the warm pool's refill starts them outside the instance's lock, and an instance
that stops starts none after."""

from __future__ import annotations

import threading
import time

import reconfigharness
from elasticmoe_worker.contract import wire
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker import backends
from elasticmoe_worker.instance import coordinator, fleet, membership, peer_copy

CFG = engine_mod.EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)


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


def test_what_a_worker_says_of_itself_is_kept_per_device():
    m = membership.Membership(fleet.ExternalFleet(heartbeat_timeout_s=5), warm_workers=0, max_devices=4)
    m.hello(wire.HMMHello(device_index=1, pid=11, locality="cpu/boot/ns/uid0", mailbox="@box1"))
    m.hello(wire.HMMHello(device_index=2, pid=12))  # an older HMM: says no locality key
    assert (m.locality(1), m.locality(2), m.locality(3)) == (("cpu/boot/ns/uid0", "@box1"), None, None)
    assert m.spares_ready([1, 2, 3]) == m.informed([1, 2, 3]) == frozenset()
    m.heartbeat(wire.Heartbeat(device_index=1, loaded=False, spare_ready=True, locality="k", tokenizer_digest="d"), "d")
    m.heartbeat(wire.Heartbeat(device_index=2, loaded=False, spare_ready=False, tokenizer_digest="other"), "d")
    assert (m.spares_ready([1, 2]), m.informed([1, 2]), m.locality(1)) == ({1}, {1}, ("k", ""))
    assert m.informed([1]) == {1} and m.informed([2]) == frozenset()
    m.heartbeat(wire.Heartbeat(device_index=1, loaded=False, spare_ready=True, tokenizer_digest="d"), "")
    assert m.informed([1]) == frozenset() and m.locality(1) is None, "no model known: nobody is told it"
    m.heartbeat(wire.Heartbeat(device_index=1, loaded=False, tokenizer_digest="d"), "d")
    m.hello(wire.HMMHello(device_index=1, pid=21, knows_model=False))  # a new process under the same id
    assert m.informed([1]) == frozenset() and m.spares_ready([1]) == frozenset()
    assert m.new_deaths() == {}, "hellos and heartbeats count as signs of life"
    here = peer_copy.locality_key(backends.get_backend("cpu"))
    m.heartbeat(wire.Heartbeat(device_index=2, loaded=False, locality=here), "d")
    assert (m.on_this_host(2), m.on_this_host(1), m.on_this_host(3)) == (True, False, False)


class _SlowFleet(fleet.ExternalFleet):
    """A fleet whose starts block until released (a process spawn on a busy machine)."""

    starts_workers = True

    def __init__(self) -> None:
        super().__init__()
        self.starting = threading.Event()
        self.go = threading.Event()
        self.started: list[int] = []

    def add(self, device_index: int) -> None:
        self.starting.set()
        assert self.go.wait(10)
        self.started.append(device_index)
        super().add(device_index)


def test_stop_adding_waits_for_a_start_under_way_and_then_none_starts():
    f = _SlowFleet()
    m = membership.Membership(f, warm_workers=2, max_devices=4)
    adder = threading.Thread(target=m.add, args=([1, 2],))
    adder.start()
    assert f.starting.wait(5)
    stopper = threading.Thread(target=m.stop_adding)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive(), "stop_adding returned while a worker was still starting"
    f.go.set()
    stopper.join(5)
    adder.join(5)
    assert not stopper.is_alive() and not adder.is_alive()
    assert f.started == [1], "a worker started after stop_adding"
    m.add([3])
    assert f.started == [1]


def test_the_warm_pool_starts_workers_outside_the_instances_lock(tiny_models):
    """A refill's process spawns must not hold the lock the control loop and a caller waiting for
    the scale that just ended need (before: up to 0.14 s of a 4 -> 2 scale's time to capacity)."""
    inst = coordinator.Instance(tiny_models["qwen3_moe"], 1, CFG, warm_workers=2)
    f = _SlowFleet()
    inst.members = membership.Membership(f, warm_workers=2, max_devices=4)
    inst.state = reconfigharness.Harness(1).state
    refill = threading.Thread(target=inst.prewarm)
    refill.start()
    try:
        assert f.starting.wait(5)
        assert inst._lock.acquire(timeout=1), "prewarm holds the instance's lock while a worker starts"
        inst._lock.release()
    finally:
        f.go.set()
        refill.join(5)
    assert f.started == [1, 2]
