"""The KV blocks of a departing device's sequences during a switch: where they go
(`reconfig_kv.plan`, literal block ids) and what the state machine does while they are copied,
and when the copy fails (the sequences are recomputed: nothing is lost). Pure: no process."""

from __future__ import annotations

import msgspec
import pytest

import reconfigharness as rh
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.instance import reconfig, reconfig_kv

SWITCH = reconfig.SWITCH


def seq(request_id: str, blocks: list[int], num_computed: int = 20) -> wire.SequenceState:
    return msgspec.structs.replace(rh.seq(request_id), block_ids=blocks, num_computed=num_computed)


# -- the plan ---------------------------------------------------------------------------------
def test_departing_blocks_go_to_the_lowest_free_blocks_of_their_adopter():
    handed = {0: (seq("a", [0, 1]), seq("b", [2])), 1: (seq("c", [0, 1, 2]), seq("d", [7]))}
    kv = reconfig_kv.plan(handed, {0: [handed[1][0], handed[1][1]]}, num_blocks=16)
    assert kv.copies == (wire.KVCopy(src=1, dst=0, src_blocks=[0, 1, 2, 7], dst_blocks=[3, 4, 5, 6]),)
    assert [(st.request_id, st.block_ids) for st in kv.moved[0]] == [("c", [3, 4, 5]), ("d", [6])]
    assert kv.handed[0] == handed[1] and kv.devices == (0, 1) and kv.request_ids == {"c", "d"}
    assert (kv.num_sequences, kv.num_blocks) == (2, 4)
    msgs = kv.messages(3, (64, 32), 10.0)
    assert [(d, m.rank, m.group_ranks, m.copies, m.view_block_bytes) for d, m in msgs.items()] == [
        (0, 0, [0, 1], list(kv.copies), [64, 32]), (1, 1, [0, 1], list(kv.copies), [64, 32])]


@pytest.mark.parametrize("blocks, num_blocks, unavailable, why", [
    ([], 16, frozenset(), "never ran: nothing to copy"),
    ([0, 1, 2], 4, frozenset(), "3 blocks, 2 free on the adopter"),
    ([0], 16, frozenset({1}), "its device died after handing over"),
])
def test_a_sequence_without_blocks_room_or_source_is_left_to_be_recomputed(blocks, num_blocks, unavailable, why):
    handed = {0: (seq("a", [0, 1]),), 1: (seq("c", blocks), seq("d", [3]))}
    kv = reconfig_kv.plan(handed, {0: list(handed[1])}, num_blocks, unavailable)
    assert "c" not in kv.request_ids, why
    assert kv.request_ids == (set() if unavailable else {"d"})


def test_two_departing_devices_to_two_adopters_one_copy_per_pair():
    handed = {0: (seq("a", [0]),), 1: (), 2: (seq("c", [0, 1]), seq("d", [5])), 3: (seq("e", [2]),)}
    kv = reconfig_kv.plan(handed, {0: [handed[2][1]], 1: [handed[2][0], handed[3][0]]}, num_blocks=8)
    assert kv.copies == (wire.KVCopy(2, 0, [5], [1]), wire.KVCopy(2, 1, [0, 1], [0, 1]), wire.KVCopy(3, 1, [2], [2]))
    assert kv.devices == (0, 1, 2, 3)


# -- the switch ---------------------------------------------------------------------------------
def _paused_2_to_1() -> rh.Harness:
    h = rh.Harness(2)
    h.scale(1)
    h.to_stage(SWITCH)
    h.step(reconfig.HandedOver(0, 1, (seq("a", [0, 1]),), h.now))
    return h


def test_the_commit_waits_for_the_copy_and_adopts_with_the_new_blocks():
    h = _paused_2_to_1()
    actions = h.step(reconfig.HandedOver(1, 1, (seq("c", [0, 1, 2]), seq("fresh", [], 0)), h.now))
    assert rh.summary(actions) == ["hmm-0 MoveKV", "hmm-1 MoveKV"] and h.state.paused
    assert rh.kv_moves(actions)["hmm-0"].copies == [wire.KVCopy(1, 0, [0, 1, 2], [2, 3, 4])]
    assert h.kv_moved(1) == [] and h.kv_moved(1) == [], "a duplicate changes nothing"
    actions = h.kv_moved(0)
    adopts = [a.msg for a in actions if isinstance(a, reconfig.Send) and isinstance(a.msg, wire.Adopt)]
    assert [(m.keep_kv, [(st.request_id, st.block_ids) for st in m.requests]) for m in adopts] == [
        (True, [("a", [0, 1]), ("c", [2, 3, 4])]), (False, [("fresh", [])])]
    rec = rh.finished(actions)
    assert (rec.outcome, rec.sequences_kv_moved, rec.kv_bytes_moved, rec.tokens_recomputed, rec.kv_fallback) == (
        admin.Outcome.SUCCEEDED, 1, 2000, 0, "")
    h.settled()


@pytest.mark.parametrize("failure, fallback", [
    (lambda h: h.kv_moved(0, ok=False) + h.kv_moved(1), "device 0: peer went away"),
    (lambda h: h.kv_moved(1, ok=False) + h.kv_moved(0), "device 1: peer went away"),
    (lambda h: h.step(reconfig.WorkerDied(1, "exit code -9", h.now)) + h.kv_moved(0, ok=False),
     "device 1 died: exit code -9"),
    (lambda h: h.tick(h.now + 1.5 * rh.FACTS.kv_move_timeout_s + 2),
     "device(s) [0, 1] did not finish the KV copy in time (timeout 10 s)"),
], ids=["adopter-failed", "source-failed", "source-died", "deadline"])
def test_a_failed_copy_recomputes_the_sequences_and_loses_nothing(failure, fallback):
    h = _paused_2_to_1()
    h.request("held")
    h.step(reconfig.HandedOver(1, 1, (seq("c", [0, 1, 2], num_computed=40),), h.now))
    assert h.state.scale.kv_waiting == {0, 1}
    actions = failure(h)
    assert rh.adopts(actions) == [("exec-2-0", ["a"], True), ("exec-2-0", ["c"], False)]
    assert reconfig.Release(("held",)) in actions
    rec = rh.finished(actions)
    assert (rec.outcome, rec.message, rec.sequences_kv_moved, rec.tokens_recomputed, rec.kv_fallback) == (
        admin.Outcome.SUCCEEDED, "", 0, 40, fallback)
    assert h.kv_moved(0, config_id=2) == [] and h.state.scale is None, "an answer after the commit is stale"
    h.settled()


def test_the_copy_does_not_wait_for_the_switch_deadline_nor_fail_ranks_at_it():
    h = _paused_2_to_1()
    h.step(reconfig.HandedOver(1, 1, (seq("c", [0]),), h.now))
    assert h.tick(h.state.scale.deadline) == [] and h.state.scale.kv_waiting, "only the copy's own deadline counts"


def test_a_request_that_raced_the_pause_during_the_copy_is_adopted_once():
    h = _paused_2_to_1()
    h.step(reconfig.HandedOver(1, 1, (seq("c", [0]),), h.now))
    assert h.step(reconfig.HandedOver(1, 1, (seq("c", [0]), seq("raced", [], 0)), h.now)) == []
    actions = h.kv_all()
    assert rh.adopts(actions) == [("exec-2-0", ["a", "c"], True), ("exec-2-0", ["raced"], False)]
    h.settled()
