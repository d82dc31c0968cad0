"""A lost device, event by event: `reconfig.step` moves the instance to its survivors, with
experts from surviving copies or the checkpoint (`reconfig_loss.plan_recovery`), and the
requests in flight suspended and recomputed, never failed; and what it does when it cannot.
Pure: no process, no socket, no clock (time is the events' `now`); every step goes through
`reconfigharness.Harness.step` and its invariants.

Worked example, 3 devices, device 1 dies, one copy per expert (8 experts: 0-2 | 3-5 | 6-7):
  ExecutorFailed(rank 0)  -> Suspend(config 1), PauseAdmission            (peers notice first)
  WorkerDied(1)           -> Shutdown hmm-1, RemoveWorkers(1), Shutdown exec-1-0/2,
                             PrepareTransition(config 2) to hmm-0 and hmm-2: experts 3-5 from the
                             checkpoint                                             transfer
  TransferReady x2        -> StartExecutor(config 2, ranks 0-1, replace) to hmm-0, hmm-2  standby_start
  ExecutorReady x2        -> Commit(2), Resume (recompute), Release(held), CommitTransition,
                             Finished(recovery: Succeeded, 3 -> 2)
"""

from __future__ import annotations

import dataclasses

import pytest

import reconfigharness as rh
from elasticmoe_worker import planner
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.instance import reconfig, reconfig_loss

WORKERS, TRANSFER, STANDBY, SWITCH = reconfig.STAGES
FACTS = rh.FACTS


def _sends(actions, kind) -> dict[str, wire.Msg]:
    return {a.dest: a.msg for a in actions if isinstance(a, reconfig.Send) and isinstance(a.msg, kind)}


# -- the plan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("devices, copies, lost", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (4, 1, 3), (4, 2, 2), (2, 2, 1),
                                                   (2, 1, 0)])
def test_the_recovery_plan_keeps_what_survives_and_reads_only_what_no_survivor_holds(devices, copies, lost):
    placement = planner.initial_placement(8, list(range(devices)), copies)
    rec = reconfig_loss.plan_recovery(placement, range(devices), [lost], copies_per_expert=copies,
                                      replicated_bytes=1000, expert_bytes=300)
    survivors = tuple(d for d in range(devices) if d != lost)
    new = rec.plan.new_placement
    assert rec.survivors == survivors and new.devices == survivors
    assert new.copies_per_expert == min(copies, len(survivors)) == rec.copies_per_expert
    # every copy the new placement adds comes from a surviving holder, or from the checkpoint when none holds it
    only_lost = {e for e, homes in enumerate(placement.homes) if set(homes) == {lost}}
    assert set(rec.checkpoint_experts) == only_lost
    for m in rec.plan.expert_moves:
        assert m.src_device in placement.homes[m.expert] and m.src_device != lost and m.dst_device in survivors
    for d, experts in rec.from_checkpoint.items():
        assert set(experts) <= set(new.experts_on(d)) and set(experts) <= only_lost
    added = {(e, d) for e, homes in enumerate(new.homes) for d in homes if d not in placement.homes[e]}
    assert added == ({(m.expert, m.dst_device) for m in rec.plan.expert_moves}
                     | {(e, d) for d, es in rec.from_checkpoint.items() for e in es})
    if copies == 2:  # redundancy: nothing comes from the checkpoint
        assert rec.from_checkpoint == {}
    assert not rec.plan.replicated_transfers and "checkpoint" in rec.describe()


def test_no_survivor_is_an_error_naming_the_field():
    placement = planner.initial_placement(8, [0])
    with pytest.raises(ValueError, match=r"lost: \[0\] are all the devices \[0\]"):
        reconfig_loss.plan_recovery(placement, [0], [0], copies_per_expert=1, replicated_bytes=1, expert_bytes=1)


@pytest.mark.parametrize("devices, copies, expected", [
    ((0, 1), 1, [0] * 4 + [1] * 4),
    ((0, 2), 1, [0] * 4 + [1] * 4),  # ranks, not device ids
    ((0, 1, 2), 2, [0, 1, 0, 2, 2, 0, 1, 1]),  # two holders each: the one computing fewest so far
])
def test_each_expert_is_computed_by_one_holder_spread_over_the_ranks(devices, copies, expected):
    placement = planner.initial_placement(8, list(devices), copies)
    assert reconfig_loss.owner_ranks(placement, devices) == expected


# -- the recovery, step by step --------------------------------------------------------------------
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("lost", [0, 1, 2])
def test_a_lost_device_moves_the_instance_to_its_survivors_and_recomputes_its_requests(lost, copies):
    h = rh.Harness(3, copies=copies)
    old = h.state.placement
    survivors = tuple(d for d in range(3) if d != lost)
    t_failed = h.now = 10.0
    assert h.step(reconfig.ExecutorFailed((lost + 1) % 3, 1, "connection reset by peer", t_failed)) == [
        reconfig.Suspend(1, "executor rank %d failed: connection reset by peer" % ((lost + 1) % 3)),
        reconfig.PauseAdmission()]
    h.now = t_failed + 0.1
    actions = h.step(reconfig.WorkerDied(lost, "exit code -9", h.now))
    assert not any(isinstance(a, (reconfig.FailRequests, reconfig.SetHealth, reconfig.Suspend)) for a in actions)
    assert reconfig.RemoveWorkers((lost,)) in actions and f"hmm-{lost} Shutdown" in rh.summary(actions)
    assert [f"exec-1-{r} Shutdown" for r in range(3) if r != lost] == [
        x for x in rh.summary(actions) if x.startswith("exec-1-")]
    prepares = _sends(actions, wire.PrepareTransition)
    assert sorted(prepares) == [f"hmm-{d}" for d in survivors]
    rec = reconfig_loss.plan_recovery(old, range(3), [lost], copies_per_expert=copies, replicated_bytes=1000,
                                      expert_bytes=FACTS.expert_bytes)
    read = set()
    for rank, d in enumerate(survivors):
        msg = prepares[f"hmm-{d}"]
        assert (msg.config_id, msg.rank, msg.group_ranks) == (2, rank, list(survivors))
        assert msg.expert_ids == list(rec.plan.new_placement.experts_on(d))
        assert all(t.kind == "expert" and {t.src, t.dst} <= set(survivors) for t in msg.transfers)
        assert set(msg.checkpoint_experts) <= set(msg.expert_ids)
        assert msg.model_dir == (FACTS.model_dir if msg.checkpoint_experts else "")
        read |= set(msg.checkpoint_experts)
    assert read == {e for e, homes in enumerate(old.homes) if set(homes) == {lost}}
    assert (read == set()) == (copies == 2)
    assert h.state.phase == admin.Phase.SCALING and h.state.scale.lost == (lost,)
    assert reconfig.refuse_scale(h.state, 3)[0] == "busy"
    assert h.request("waits") == [] and h.state.held == ("waits",)
    actions = h.complete_stage()  # transfers
    starts = _sends(actions, wire.StartExecutor)
    owner = reconfig_loss.owner_ranks(rec.plan.new_placement, survivors)
    assert starts == {f"hmm-{d}": reconfig.start_message(h.state.facts, 2, r, 2, owner, replace=True)
                      for r, d in enumerate(survivors)}
    actions = h.complete_stage()  # executors ready: no switch, the requests were suspended already
    assert rh.summary(actions) == ["Commit", "Resume", "Release", *[f"hmm-{d} CommitTransition" for d in survivors],
                                   "Finished"]
    assert actions[0] == reconfig.Commit(2, 2, {}) and actions[2] == reconfig.Release(("waits",))
    record = rh.finished(actions)
    assert (record.outcome, record.from_devices, record.to_devices) == (admin.Outcome.SUCCEEDED, 3, 2)
    assert record.scale_id == "recovery-2" and "device %d" % lost in record.reason
    assert list(record.phases_ms) == ["detect", TRANSFER, STANDBY] and record.phases_ms["detect"] == 100
    assert record.duration_ms == round((h.now - t_failed) * 1000)  # from the first sign of the loss
    s = h.state
    assert (s.config_id, s.devices, s.placement, s.phase, s.paused, s.scale) == (
        2, survivors, rec.plan.new_placement, admin.Phase.SERVING, False, None)
    assert sorted(s.hmm_ready) == list(survivors)
    h.settled()
    # and it scales back up later: the lost id is the lowest unused one
    h.scale(3)
    assert h.state.scale.added == (lost,) and h.state.scale.new_devices == (0, 1, 2)
    h.to_stage(SWITCH)
    assert rh.finished(h.complete_stage({0: ["a"], 1: ["b"]})).outcome == admin.Outcome.SUCCEEDED
    assert h.state.devices == (0, 1, 2)
    h.settled()


def test_a_lost_device_during_a_scale_aborts_it_and_recovers_on_the_old_survivors():
    h = rh.Harness(2)
    h.scale(3)
    h.to_stage(STANDBY)
    actions = h.step(reconfig.HMMFailed(0, 0, "memory gone", h.now))
    assert rh.finished(actions).outcome == admin.Outcome.ABORTED and reconfig.RemoveWorkers((2,)) in actions
    assert (h.state.scale.lost, h.state.scale.new_devices) == ((0,), (1,))
    h.to_stage(STANDBY)
    h.complete_stage()
    assert (h.state.devices, h.state.phase) == ((1,), admin.Phase.SERVING)
    h.settled()


def test_a_second_loss_during_a_recovery_starts_over_without_both():
    h = rh.Harness(4)
    h.step(reconfig.WorkerDied(1, "exit code -9", 1.0))
    h.transfer_ready(0)
    actions = h.step(reconfig.WorkerDied(2, "exit code -9", 1.5))
    first = rh.finished(actions)
    assert first.outcome == admin.Outcome.ABORTED and first.scale_id == "recovery-2"
    assert [d for d, m in _sends(actions, wire.AbortTransition).items()] == ["hmm-0", "hmm-3"]
    assert sorted(_sends(actions, wire.PrepareTransition)) == ["hmm-0", "hmm-3"]
    assert (h.state.scale.lost, h.state.scale.new_devices, h.state.scale.new_config) == ((1, 2), (0, 3), 3)
    h.to_stage(STANDBY)
    record = rh.finished(h.complete_stage())
    assert (record.from_devices, record.to_devices, record.outcome) == (4, 2, admin.Outcome.SUCCEEDED)
    assert h.state.devices == (0, 3) and h.state.placement.devices == (0, 3)
    # the departed devices' late messages change nothing
    before = h.state
    assert h.step(reconfig.HMMFailed(2, 0, "gone", h.now)) == [] and h.state == before
    assert h.step(reconfig.ExecutorFailed(1, 1, "reset", h.now)) == [] and h.state == before
    h.settled()


FAILURES = {  # -> (facts, events after the loss, what the reason says)
    "no checkpoint configured": (dataclasses.replace(FACTS, model_dir=""), [],
                                 "experts [3, 4, 5] had no other copy and there is no checkpoint"),
    "checkpoint unreadable": (FACTS, [lambda h: reconfig.HMMFailed(
        2, 2, "transition 2: FileNotFoundError: /models/tiny/config.json", h.now)],
        "experts [3, 4, 5] had no other copy and had to be read from the checkpoint; device 2: transition 2: "
        "FileNotFoundError"),
    "recovery executor failed": (FACTS, [lambda h: reconfig.TransferReady(wire.TransitionReady(
        device_index=0, config_id=2, ready=rh.hmm_ready(0), transfer_seconds=0.1, bytes_received=0,
        bytes_sent=0), h.now), lambda h: reconfig.TransferReady(wire.TransitionReady(
            device_index=2, config_id=2, ready=rh.hmm_ready(2), transfer_seconds=0.1, bytes_received=0,
            bytes_sent=0), h.now), lambda h: reconfig.ExecutorFailed(1, 2, "out of memory", h.now)],
        "standby executor rank 1 failed: out of memory"),
    "deadline": (FACTS, [lambda h: reconfig.Tick(h.now + rh.TIMEOUT_S)],
                 "timed out after 10 s waiting for peer-to-peer transfers"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_recovery_that_cannot_succeed_leaves_the_instance_degraded_saying_why(failure):
    facts, events, reason = FAILURES[failure]
    h = rh.Harness(3, facts=facts)
    actions = h.step(reconfig.WorkerDied(1, "exit code -9", h.now))
    if events:
        assert h.request("held") == []  # waits for the recovery, then fails with it
    for make in events:
        actions = h.step(make(h))
    fails = [a for a in actions if isinstance(a, reconfig.FailRequests)]
    assert len(fails) == 1 and fails[0].config_id == 1 and fails[0].ranks is None  # suspended and held ones too
    s = h.state
    assert s.phase == admin.Phase.DEGRADED and reason in s.error and "device(s) [1] lost" in s.error, s.error
    assert reconfig.SetHealth(s.error) in actions and not s.paused and s.scale is None
    if events:  # the survivors drop what the recovery half-built
        assert rh.finished(actions).outcome == admin.Outcome.ABORTED
        assert sorted(_sends(actions, wire.AbortTransition)) == ["hmm-0", "hmm-2"]
    assert h.tick(h.now + 100) == [] and h.state.phase == admin.Phase.DEGRADED
    h.settled()


def test_the_last_device_lost_leaves_nothing_to_recover_on():
    h = rh.Harness(1)
    actions = h.step(reconfig.WorkerDied(0, "exit code -9", 1.0))
    assert rh.summary(actions)[-2:] == ["FailRequests", "SetHealth"]
    assert "no device survives" in h.state.error and h.state.phase == admin.Phase.DEGRADED
    h.settled()


def test_a_recovery_cannot_be_aborted_and_a_scale_waits_for_it():
    h = rh.Harness(2)
    h.step(reconfig.WorkerDied(1, "exit code -9", 1.0))
    before = h.state
    assert h.step(reconfig.AbortRequested("operator", 1.1)) == [] and h.state == before
    assert reconfig.refuse_scale(h.state, 3)[0] == "busy"
    h.to_stage(STANDBY)
    h.complete_stage()
    assert reconfig.refuse_scale(h.state, 2) is None
    h.settled()
