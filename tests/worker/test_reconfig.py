"""reconfig.step event by event: every stage of a scale, each failure at each stage, stale and
duplicate messages, requests during the pause, recovery, and hypothesis-generated event orders
of consecutive scales. Pure: no process, no socket, no clock (time is the events' `now`).

Every step goes through `reconfigharness.Harness.step`, which checks the module's invariants
on what comes back (listed in reconfigharness); the tests check what each case must do.

Worked example, 2 -> 4 devices without warm workers (8 experts of 300 B, 1000 B replicated):
  ScaleRequested(4)         -> AddWorkers((2, 3))                                   workers
  WorkerRegistered 2, 3     -> PrepareTransition(config 2) to hmm-0..3              transfer
  TransferReady x4          -> StartExecutor(config 2, replace=False) to hmm-0..3   standby_start
  ExecutorReady x4          -> PauseAdmission, PauseForSwitch to exec-1-0, exec-1-1 switch
  HandedOver from 0 and 1   -> Adopt(keep_kv) to exec-2-0, exec-2-1, Commit(2), Shutdown to
                               exec-1-*, CommitTransition to hmm-0..3, Finished(Succeeded)
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reconfigharness as rh
from elasticmoe_worker import planner
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.instance import reconfig

WORKERS, TRANSFER, STANDBY, SWITCH = reconfig.STAGES
DT, FACTS, TIMEOUT_S = rh.DT, rh.FACTS, rh.TIMEOUT_S


# -- happy paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("start, target, warm", [
    (1, 2, ()), (1, 4, ()), (1, 4, (1, 2, 3)), (1, 4, (2, 5)), (4, 2, ()), (2, 1, ())])
def test_a_scale_goes_through_every_stage_and_commits(start, target, warm):
    h = rh.Harness(start, warm)
    old, new = list(range(start)), list(range(target))
    added, removed = [d for d in new if d not in old], [d for d in old if d not in new]
    cold = tuple(d for d in added if d not in warm)
    plan = planner.plan(h.state.placement, old, new, replicated_bytes=1000, expert_bytes=FACTS.expert_bytes)
    t0 = h.now + DT
    actions = h.scale(target)
    if cold:  # workers: only cold devices are started; warm ones are taken as they are
        assert actions == [reconfig.AddWorkers(cold)] and h.state.scale.stage == WORKERS
        assert all(h.register(d) == [] for d in cold[:-1])
        actions = h.register(cold[-1])
    group = sorted(set(old) | set(new))
    transfers = [wire.Transfer("replicated", t.src_device, t.dst_device, t.offset_bytes, t.size_bytes)
                 for t in plan.replicated_transfers] + [
                 wire.Transfer("expert", m.src_device, m.dst_device, expert_id=m.expert) for m in plan.expert_moves]
    assert rh.summary(actions) == [f"hmm-{d} PrepareTransition" for d in group]
    owner = [homes[0] for homes in plan.new_placement.homes]
    for rank, (d, a) in enumerate(zip(group, actions)):
        assert (a.msg.config_id, a.msg.rank, a.msg.group_ranks, a.msg.transfers) == (2, rank, group, transfers)
        assert a.msg.expert_ids == list(plan.new_placement.experts_on(d))
        # the standby of each new rank starts with the transfer (pre-initialised), beside the serving one
        assert a.msg.standby == (reconfig.start_message(FACTS, 2, new.index(d), target, owner, replace=False)
                                 if d in new else None)
        # the tokenizer only to a device that joins: one that stays has it
        assert a.msg.tokenizer_files == (dict(FACTS.tokenizer_files) if d in added else {})
    assert h.state.scale.stage == TRANSFER and h.state.warm == frozenset(warm) - set(added)
    assert all(h.transfer_ready(d) == [] for d in group[:-1])
    assert h.transfer_ready(group[-1]) == [], "no StartExecutor after the transfer: they started with it"
    assert h.state.scale.stage == STANDBY and h.state.config_id == 1
    assert all(h.executor_ready(r) == [] for r in new[:-1])
    actions = h.executor_ready(new[-1])
    assert actions == [reconfig.PauseAdmission()] + [
        reconfig.Send(f"exec-1-{r}", wire.PauseForSwitch(config_id=1)) for r in old]
    assert h.state.paused and h.request("held") == []
    handed = {r: [f"r{r}-a", f"r{r}-b"] for r in old}
    actions = h.complete_stage(handed)
    # departing ranks' sequences: their KV blocks are copied to their adopters before the commit
    moves = [a for a in actions if isinstance(a, reconfig.Send) and isinstance(a.msg, wire.MoveKV)]
    assert [a.dest for a in moves] == [f"hmm-{d}" for d in (old if removed else [])]
    actions = actions[len(moves):]
    got = rh.adopts(actions)
    assert rh.summary(actions)[len(got):] == [
        "Commit", "Release", *[f"exec-1-{r} Shutdown" for r in old], *[f"hmm-{d} CommitTransition" for d in new],
        *[f"hmm-{d} Shutdown" for d in removed], *(["RemoveWorkers"] if removed else []), "Finished"]
    assert all(keep_kv for _, _, keep_kv in got), "nothing is recomputed: departing ranks' KV moved"
    for dest, ids, _ in got:  # a staying rank keeps its own sequences and their KV; departing ones join them
        assert ids[:2] == handed[int(dest[-1])] and {i.split("-")[0] for i in ids[2:]} <= {f"r{r}" for r in removed}
    assert len(got) == len(set(old) & set(new))
    per_rank = collections.Counter(r for r in actions[len(got)].ranks.values())
    if removed:  # departing ranks' sequences are recomputed on the least loaded ranks: even here
        assert set(per_rank.values()) == {2 * start // target}
    assert actions[len(got)] == reconfig.Commit(2, target, actions[len(got)].ranks)
    assert actions[len(got) + 1] == reconfig.Release(("held",))
    if removed:
        assert actions[-2] == reconfig.RemoveWorkers(tuple(removed))
    rec = rh.finished(actions)
    assert (rec.outcome, rec.message, rec.from_devices, rec.to_devices) == (admin.Outcome.SUCCEEDED, "", start, target)
    assert list(rec.phases_ms) == list(reconfig.STAGES) and rec.duration_ms == round((h.now - t0) * 1000)
    assert (rec.bytes_transferred, rec.requests_handed_over) == (plan.bytes_moved, 2 * start)
    assert (rec.sequences_kv_moved, rec.tokens_recomputed, rec.kv_fallback) == (2 * len(removed), 0, "")
    assert rec.kv_bytes_moved == 1000 * (len(old) if removed else 0)
    assert rec.transfer_data_ms == round((0.25 + group[-1] / 100) * 1000)
    # each device's part, by device: set-up, bytes, then its peers, adding up to its transition; then the
    # delivery of its PrepareTransition and of its report where the coordinator knows them (one clock)
    assert [(p.device, p.total_ms, p.setup_ms, p.bytes_ms, p.peers_ms, p.hmm_cpu_ms, p.throttled_ms, p.told_ms,
             p.delivery_ms) for p in rec.transfer_devices] == [
        (d, 500, 100, 250 + d * 10, 150 - d * 10, 20, -1, *((1, d + 3) if d % 2 == 0 else (-1, -1)))
        for d in sorted(group)]
    s = h.state
    assert (s.config_id, s.num_devices, s.placement, s.scale, s.paused, s.held) == (
        2, target, plan.new_placement, None, False, ())
    assert sorted(s.hmm_ready) == new and s.phase == admin.Phase.SERVING
    h.settled()


def test_a_scale_up_takes_warm_devices_whose_spare_is_ready_first():
    """Device 1's warm worker was restarted a moment ago (its spare still imports), device 2's
    is ready: 1 -> 2 adds device 2, and starts no worker."""
    h = rh.Harness(1, warm=(1, 2))
    h.scales.append("s1")
    actions = h.step(reconfig.ScaleRequested(2, "s1", "test", TIMEOUT_S, "", h.now + DT, ready=frozenset({0, 2, 7})))
    assert h.state.scale.new_devices == (0, 2) and h.state.warm == frozenset({1})
    assert rh.summary(actions) == ["hmm-0 PrepareTransition", "hmm-2 PrepareTransition"]


def test_a_transition_sends_the_tokenizer_only_to_joining_devices_that_did_not_say_they_hold_it():
    """0.55 MB per device to encode, send and decode (the small preset's tokenizer) is not free on a
    busy machine; a staying device holds it, and a warm one said so in its heartbeats."""
    h = rh.Harness(1, warm=(1, 2))
    h.scales.append("s1")
    actions = h.step(reconfig.ScaleRequested(3, "s1", "test", TIMEOUT_S, "", h.now + DT, informed=frozenset({0, 1})))
    files = {a.dest: a.msg.tokenizer_files for a in actions}
    assert files == {"hmm-0": {}, "hmm-1": {}, "hmm-2": dict(rh.FACTS.tokenizer_files)}


def test_standbys_ready_before_the_transfer_ends_switch_as_the_last_byte_arrives():
    """Pre-initialised standbys say ready as soon as their own HMM has every byte, perhaps while
    peers still move theirs; the switch then starts the moment the transfer stage ends, with a
    standby_start of 0 ms, and the phases still add up to the total."""
    h = rh.Harness(1)
    t0 = h.now + DT
    h.scale(2)
    h.to_stage(TRANSFER)
    assert h.transfer_ready(0) == []
    assert h.executor_ready(0) == [] and h.executor_ready(1) == [], "early: recorded, nothing to do yet"
    assert h.state.scale.stage == TRANSFER and h.state.scale.early_ready == {0, 1}
    assert h.executor_ready(7) == [] and h.state.scale.early_ready == {0, 1}, "not a rank of the new configuration"
    actions = h.transfer_ready(1)
    assert actions == [reconfig.PauseAdmission(), reconfig.Send("exec-1-0", wire.PauseForSwitch(config_id=1))]
    assert h.state.scale.stage == SWITCH
    rec = rh.finished(h.complete_stage({0: []}))
    assert rec.phases_ms["standby_start"] == 0 and sum(rec.phases_ms.values()) == rec.duration_ms
    assert rec.duration_ms == round((h.now - t0) * 1000)


def test_a_standby_ready_early_on_some_ranks_waits_for_the_others_after_the_transfer():
    h = rh.Harness(2)
    h.scale(3)
    h.to_stage(TRANSFER)
    assert h.executor_ready(1) == []
    for d in (0, 1):
        assert h.transfer_ready(d) == []
    assert h.transfer_ready(2) == [] and h.state.scale.stage == STANDBY and h.state.scale.waiting == {0, 2}
    assert h.executor_ready(0) == [] and h.executor_ready(2)[0] == reconfig.PauseAdmission()


def test_departing_sequences_go_to_the_least_loaded_rank_and_staying_ones_stay():
    h = rh.Harness(4)
    h.scale(2)
    h.to_stage(SWITCH)
    actions = h.complete_stage({0: ["a", "b"], 2: ["c", "d", "e"], 3: ["f"]})
    # rank 0 keeps 2 and rank 1 none; then c -> 1, d -> 1, e -> 0 (tie: lowest rank), f -> 1, with their KV
    assert rh.adopts(actions) == [("exec-2-0", ["a", "b", "e"], True), ("exec-2-1", ["c", "d", "f"], True)]
    assert rh.commit_of(actions) == reconfig.Commit(2, 2, {"a": 0, "b": 0, "e": 0, "c": 1, "d": 1, "f": 1})


# -- failures ---------------------------------------------------------------------------------
PRE_SWITCH_FAILURES = {
    "new worker died": (lambda h: reconfig.WorkerDied(3, "exit code -9", h.now), "new worker(s) died: device 3"),
    "staying worker died": (lambda h: reconfig.WorkerDied(1, "exit code 1", h.now),
                            "device 1 lost: worker process(es) died: device 1 (exit code 1)"),
    "transition failed": (lambda h: reconfig.HMMFailed(2, 2, "out of memory", h.now), "device 2: out of memory"),
    "standby failed": (lambda h: reconfig.ExecutorFailed(2, 2, "CUDA error", h.now),
                       "standby executor rank 2 failed: CUDA error"),
    "deadline": (lambda h: reconfig.Tick(DT + TIMEOUT_S), "timed out after 10 s waiting for {what}"),
    "abort requested": (lambda h: reconfig.AbortRequested("the operator gave up", h.now), "the operator gave up"),
}
WAITING_FOR = {WORKERS: "new workers to register (still waiting for device(s) [2, 3])",
               TRANSFER: "peer-to-peer transfers", STANDBY: "standby executors"}


@pytest.mark.parametrize("stage", [WORKERS, TRANSFER, STANDBY])
@pytest.mark.parametrize("failure", list(PRE_SWITCH_FAILURES))
def test_a_failure_before_the_switch_aborts_to_the_old_configuration(stage, failure):
    h = rh.Harness(2)
    h.scale(4)
    h.to_stage(stage)
    make, message = PRE_SWITCH_FAILURES[failure]
    actions = h.step(make(h))
    alive = [0] if failure == "staying worker died" else [0, 1]  # a lost device is told nothing
    assert [(a.dest, a.msg.config_id) for a in actions if isinstance(a, reconfig.Send)
            and isinstance(a.msg, wire.AbortTransition)] == [(f"hmm-{d}", 2) for d in alive]
    assert {"hmm-2 Shutdown", "hmm-3 Shutdown"} <= set(rh.summary(actions))
    assert reconfig.RemoveWorkers((2, 3)) in actions
    rec = rh.finished(actions)
    assert rec.outcome == admin.Outcome.ABORTED and message.format(what=WAITING_FOR[stage]) in rec.message
    s = h.state
    if failure == "staying worker died":  # the serving configuration lost a device too: device 0 goes on
        assert not any(isinstance(a, reconfig.FailRequests) for a in actions)
        assert (s.config_id, s.scale.lost, s.scale.new_devices, s.scale.stage, s.paused) == (1, (1,), (0,), TRANSFER,
                                                                                             True)
        assert h.request("after") == []  # waits for the survivor
        h.to_stage(STANDBY)
        h.complete_stage()
        assert (h.state.config_id, h.state.devices, h.state.phase) == (3, (0,), admin.Phase.SERVING)
        assert h.state.held == () and h.released["after"] == 1
        h.settled()
        return
    assert (s.config_id, s.num_devices, s.scale, s.paused) == (1, 2, None, False)
    assert s.phase == admin.Phase.SERVING and not any(isinstance(a, reconfig.FailRequests) for a in actions)
    assert h.request("after") == [reconfig.Release(("after",))]  # the old configuration admits at once
    h.settled()


SWITCH_FAILURES = {  # -> (start, target, the rank lost, the failure, healthy afterwards)
    "old executor failed": (2, 4, 1, lambda h: reconfig.ExecutorFailed(1, 1, "segfault", h.now), True),
    "deadline": (2, 4, 1, lambda h: reconfig.Tick(DT + TIMEOUT_S), True),
    "departing worker died": (4, 2, 3, lambda h: reconfig.WorkerDied(3, "exit code -9", h.now), True),
    "staying worker died": (2, 4, 1, lambda h: reconfig.WorkerDied(1, "exit code -9", h.now), False),
}


@pytest.mark.parametrize("failure, lost_first", [(f, first) for f in SWITCH_FAILURES for first in (False, True)
                                                 if not (f == "deadline" and first)])
def test_a_rank_lost_during_the_switch_fails_its_requests_and_the_new_configuration_serves(failure, lost_first):
    start, target, lost, make, healthy = SWITCH_FAILURES[failure]
    h = rh.Harness(start)
    h.scale(target)
    h.to_stage(SWITCH)
    h.request("held")
    others = [r for r in range(start) if r != lost]
    actions = h.step(make(h)) if lost_first else []
    for r in others:
        actions += h.hand_over(r, [f"r{r}"])
    if not lost_first:
        actions += h.step(make(h))
    actions += h.kv_all()
    fails = [a for a in actions if isinstance(a, reconfig.FailRequests) and a.ranks is not None]
    assert [(f.config_id, f.ranks) for f in fails] == [(1, (lost,))] and str(lost) in fails[0].error
    assert sorted(i for _, ids, _ in rh.adopts(actions) for i in ids) == sorted(f"r{r}" for r in others)
    assert reconfig.Release(("held",)) in actions
    rec = rh.finished(actions)
    assert rec.outcome == admin.Outcome.FAILED and str(lost) in rec.message
    assert (h.state.config_id, h.state.num_devices, h.state.paused) == (2, target, False)
    assert (h.state.error is None) == healthy, h.state.error
    if not healthy:  # a device of the new configuration is gone for good: it does not recover
        assert h.tick(h.now + 100) == [] and h.state.phase == admin.Phase.DEGRADED
    h.settled()


def test_a_standby_that_fails_during_the_switch_is_recovered_after_the_commit():
    h = rh.Harness(1)
    h.scale(2)
    h.to_stage(SWITCH)
    assert h.step(reconfig.ExecutorFailed(1, 2, "segfault", h.now)) == []  # no way back: the switch goes on
    actions = h.hand_over(0, ["a"])
    assert rh.summary(actions)[-3:] == ["Finished", "FailRequests", "SetHealth"]
    assert actions[-2] == reconfig.FailRequests(2, None, "executor rank 1 failed: segfault")
    assert rh.finished(actions).outcome == admin.Outcome.FAILED and "rank 1" in rh.finished(actions).message
    assert h.state.phase == admin.Phase.DEGRADED
    actions = h.tick(h.now + FACTS.recovery_grace_s)
    assert rh.summary(actions) == ["Recovering", "hmm-0 StartExecutor", "hmm-1 StartExecutor"]
    h.settled()


def test_the_switch_cannot_be_aborted_and_waits_for_its_deadline():
    h = rh.Harness(1)
    h.scale(2)
    h.to_stage(SWITCH)
    before = h.state
    assert h.step(reconfig.AbortRequested("too slow", h.now)) == [] and h.state == before
    assert reconfig.refuse_scale(h.state, 3)[0] == "busy"
    assert h.tick(TIMEOUT_S) == [] and h.state.paused  # the deadline counts from the ScaleRequested
    assert "Commit" in rh.summary(h.tick(DT + TIMEOUT_S))
    h.settled()


# -- stale and duplicate messages -------------------------------------------------------------
@pytest.mark.parametrize("stage", [*reconfig.STAGES, "committed"])
@pytest.mark.parametrize("kind", list(rh.STALE))
def test_messages_of_an_aborted_attempt_change_nothing_later(kind, stage):
    h = rh.Harness(1)
    h.scale(2)
    h.to_stage(STANDBY)
    h.step(reconfig.AbortRequested("operator", h.now))
    h.scale(3)  # configuration 3; configuration 2 was given up
    if stage == "committed":
        h.to_stage(SWITCH)
        h.complete_stage()
    else:
        h.to_stage(stage)
    before = h.state
    assert h.step(rh.STALE[kind](h, 2)) == [] and h.state == before
    if stage != "committed":
        h.to_stage(SWITCH)
        assert rh.finished(h.complete_stage({0: ["a"]})).outcome == admin.Outcome.SUCCEEDED
    assert h.state.config_id == 3 and "ghost" not in h.adopted
    h.settled()


def test_readiness_delivered_twice_does_not_advance_a_stage():
    h = rh.Harness(2)
    h.scale(4)
    for send, stage, x in [(h.register, WORKERS, 2), (h.transfer_ready, TRANSFER, 0), (h.executor_ready, STANDBY, 0)]:
        h.to_stage(stage)
        assert send(x) == []
        before = h.state
        assert send(x) == [] and h.state == before and h.state.scale.stage == stage
    h.to_stage(SWITCH)  # and the scale goes on


def test_a_handover_delivered_twice_is_adopted_once():
    h = rh.Harness(4)
    h.scale(2)
    h.to_stage(SWITCH)
    h.hand_over(2, ["a", "b"])
    h.hand_over(2, ["a", "b"])  # before the commit
    h.hand_over(0, ["c"])
    h.hand_over(1)
    actions = h.hand_over(3, ["d"]) + h.kv_all()
    assert sorted(rh.commit_of(actions).ranks) == ["a", "b", "c", "d"]
    assert h.hand_over(2, ["a", "b"]) == [] and h.hand_over(0, ["c"]) == []  # and after it


@pytest.mark.parametrize("rank, keep_kv, to", [(0, True, 0), (1, True, 1), (3, False, 0)])
def test_a_late_handover_of_the_replaced_configuration_is_adopted_by_the_new_one(rank, keep_kv, to):
    h = rh.Harness(4)
    h.scale(2)
    h.to_stage(SWITCH)
    h.complete_stage({r: [f"r{r}"] for r in range(4)})
    actions = h.hand_over(rank, ["raced"], config_id=1)  # a request that raced the pause
    adopt = wire.Adopt(config_id=2, requests=[rh.seq("raced")], keep_kv=keep_kv)
    assert actions == [reconfig.Send(f"exec-2-{to}", adopt), reconfig.Rebind({"raced": to})]
    h.settled()


def test_a_request_adopted_late_is_handed_over_again_by_its_new_rank():
    h = rh.Harness(1)
    h.scale(2)
    h.to_stage(SWITCH)
    h.complete_stage({0: ["a"]})
    h.hand_over(0, ["y"], config_id=1)  # raced the first pause: configuration 2's rank 0 adopts it late
    h.scale(3)
    h.to_stage(SWITCH)
    h.hand_over(0, ["a"])
    h.hand_over(0, ["y"])  # rank 0 of configuration 2 hands over twice; the second lists the late one
    actions = h.hand_over(1)
    assert actions[len(rh.adopts(actions))] == reconfig.Commit(3, 3, {"a": 0, "y": 0})


def test_a_late_handover_from_two_configurations_back_is_adopted_at_the_next_commit():
    h = rh.Harness(1)
    h.scale(2)
    h.to_stage(SWITCH)
    h.complete_stage({0: ["a"]})  # configuration 2 replaces 1
    h.scale(3)
    h.to_stage(SWITCH)
    h.hand_over(0, ["old"], config_id=1)  # configuration 1's rank 0, very late: before 2's rank 0 hands over
    actions = h.complete_stage({0: ["a"]})
    assert actions[len(rh.adopts(actions))] == reconfig.Commit(3, 3, {"a": 0, "old": 0})


@pytest.mark.parametrize("loss, handed_first", [
    (lambda h: reconfig.WorkerDied(3, "exit code 0", h.now), True),
    (lambda h: reconfig.HMMFailed(3, 0, "memory gone", h.now), False)],
    ids=["worker-exited-after-its-handover", "memory-lost-before-its-handover"])
def test_a_departing_device_lost_after_the_pause_harms_nothing(loss, handed_first):
    h = rh.Harness(4)
    h.scale(2)
    h.to_stage(SWITCH)
    if handed_first:
        h.hand_over(3, ["r3"])
    before = h.state
    assert h.step(loss(h)) == []  # nothing after the commit needs device 3; only its KV is not copied
    assert dataclasses.replace(h.state.scale, kv_gone=frozenset()) == before.scale
    actions = h.complete_stage({r: [f"r{r}"] for r in range(4)})
    assert sorted(rh.commit_of(actions).ranks) == ["r0", "r1", "r2", "r3"]
    assert {c.src for m in rh.kv_moves(actions).values() for c in m.copies} == {2}
    assert ("exec-2-1", ["r3"], False) in rh.adopts(actions), "recomputed: its blocks were on device 3"
    assert rh.finished(actions).outcome == admin.Outcome.SUCCEEDED and h.state.phase == admin.Phase.SERVING
    h.settled()


# -- requests during the pause ----------------------------------------------------------------
def test_requests_held_during_the_pause_are_released_once_at_the_commit():
    h = rh.Harness(1)
    h.scale(2)
    h.to_stage(SWITCH)
    assert h.request("x") == [] and h.request("y") == [] and h.state.held == ("x", "y")
    actions = h.complete_stage({0: ["a"]})
    assert [a for a in actions if isinstance(a, reconfig.Release)] == [reconfig.Release(("x", "y"))]
    assert h.state.held == () and h.request("z") == [reconfig.Release(("z",))]
    h.settled()


@pytest.mark.parametrize("stage", [None, WORKERS, TRANSFER, STANDBY])
def test_a_request_outside_the_pause_is_released_at_once(stage):
    h = rh.Harness(1)
    if stage is not None:
        h.scale(2)
        h.to_stage(stage)
    before = h.state
    assert h.request("x") == [reconfig.Release(("x",))] and h.state == before


# -- recovery ---------------------------------------------------------------------------------
def test_a_failed_executor_is_restarted_on_the_same_memory_after_the_grace():
    h = rh.Harness(2)
    actions = h.step(reconfig.ExecutorFailed(1, 1, "segfault", 5.0))
    # its requests (and new ones) wait: the router keeps what their clients have, to recompute them
    assert actions == [reconfig.Suspend(1, "executor rank 1 failed: segfault"), reconfig.PauseAdmission()]
    assert h.step(reconfig.ExecutorFailed(0, 1, "connection reset by peer", 5.1)) == []  # its peer's, after
    assert h.state.phase == admin.Phase.SERVING and reconfig.refuse_scale(h.state, 3)[0] == "busy"
    assert h.request("waits") == [] and h.tick(5.4) == []
    actions = h.tick(5.5)
    assert actions == [reconfig.Recovering(2)] + [
        reconfig.Send(f"hmm-{d}", reconfig.start_message(FACTS, 2, d, 2, [0] * 4 + [1] * 4)) for d in (0, 1)]
    assert all(a.msg.replace for a in actions[1:])
    assert h.executor_ready(0, 2) == [] and h.executor_ready(1, 1) == []  # one to go; a stale one
    assert h.executor_ready(1, 2) == [reconfig.Resume(), reconfig.Release(("waits",))]
    assert (h.state.phase, h.state.config_id, h.state.paused) == (admin.Phase.SERVING, 2, False)
    h.scale(3)
    assert h.state.scale.new_config == 3


def test_restarted_executors_that_fail_again_end_their_requests():
    h = rh.Harness(2)
    h.step(reconfig.ExecutorFailed(1, 1, "segfault", 1.0))
    h.tick(2.0)  # the restart, configuration 2
    actions = h.step(reconfig.ExecutorFailed(0, 2, "segfault again", 2.5))
    assert rh.summary(actions) == ["FailRequests", "SetHealth"] and actions[0] == reconfig.FailRequests(
        2, None, "executor rank 0 failed: segfault again")
    assert h.state.phase == admin.Phase.DEGRADED and not h.state.paused
    h.settled()


@pytest.mark.parametrize("target, expected", [(0, "got 0"), (9, "got 9"), (True, "got True"), ("3", "got '3'"),
                                              (2, "already 2")])
def test_an_invalid_target_is_refused_naming_the_field(target, expected):
    kind, message = reconfig.refuse_scale(rh.Harness(2).state, target)
    assert kind == "invalid" and message.startswith("devices: ") and expected in message


# -- hypothesis: any order of the events of consecutive scales --------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.integers(1, 3), warm=st.sets(st.integers(2, 5), max_size=2),
       ops=st.lists(st.tuples(st.sampled_from(rh.KINDS), st.integers(0, 11),
                              st.sampled_from((0.0, 0.01, 0.1, 0.1, 0.5, 4.0))), min_size=20, max_size=80))
def test_any_event_order_keeps_the_invariants(start, warm, ops):
    h = rh.Harness(start, {d for d in warm if d >= start})

    def check(before, kind, event, actions):
        if kind == "stale":  # an aborted or replaced configuration never changes a later one
            assert actions == [] and h.state == before, event

    rh.play(h, ops, check)


def test_a_scales_log_line_names_the_device_whose_transfer_ended_last():
    p = admin.TransferProfile
    rec = admin.ScaleRecord(from_devices=4, to_devices=2, bytes_transferred=25_200_000, transport="shared memory",
                            transfer_devices=[p(device=0, total_ms=40, setup_ms=1, bytes_ms=35, peers_ms=4, told_ms=2,
                                                delivery_ms=1),
                                              p(device=3, total_ms=38, setup_ms=1, bytes_ms=20, peers_ms=17, told_ms=9,
                                                delivery_ms=6)])
    assert reconfig.transfer_summary(rec) == (
        "; transfer: 25.2 MB (shared memory), the last device to finish 3 (told after 9 ms, its part 38 ms: set-up 1, "
        "bytes 20, peers 17, its report handled 6 ms after it was sent)")
    other_host = admin.ScaleRecord(from_devices=1, to_devices=2, bytes_transferred=1_000_000, transport="gloo",
                                   transfer_devices=[p(device=1, total_ms=50, setup_ms=5, bytes_ms=40, peers_ms=5)])
    assert reconfig.transfer_summary(other_host) == (
        "; transfer: 1.0 MB (gloo), the last device to finish 1 (its part 50 ms: set-up 5, bytes 40, peers 5)")
    assert reconfig.transfer_summary(admin.ScaleRecord(from_devices=2, to_devices=1)) == ""
