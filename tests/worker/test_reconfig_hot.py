"""`reconfig.step` with a redundancy budget (`--expert-copies 2 --redundant-expert-mb`): the
routed tokens the executors report add up in the state, and every scale and recovery gives the
second copies to the experts with the most; `/admin/status`'s `experts` says what is held, what
it costs, the budget and why fewer than all experts have a second copy.

Facts: 8 experts of 300 B (150 B x 2 MoE layers); a budget of 450 B per device fits the second
copy of 3 experts on 2 devices, 4 on 3.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reconfigharness as rh
from elasticmoe_worker import hotcopies, planner
from elasticmoe_worker.instance import reconfig

BUDGET = 450
FACTS = dataclasses.replace(rh.FACTS, expert_copies=2, redundant_budget_bytes=BUDGET)
LOAD = (5, 0, 40, 7, 0, 90, 3, 60)  # hottest first: 5, 7, 2, 3, 0, 6, ...


def harness(devices: int, warm=()) -> rh.Harness:
    h = rh.Harness(devices, warm=warm, copies=2, facts=FACTS)
    placement = planner.initial_placement(8, list(range(devices)), reconfig.copies_for(FACTS, devices))
    h.state = dataclasses.replace(h.state, placement=placement)
    return h


def report(h: rh.Harness, tokens) -> None:
    h.step(reconfig.ExpertLoadReported(tuple(tokens), h._at()))


def test_before_any_load_the_lowest_ids_have_the_second_copies():
    h = harness(2)
    assert reconfig.copies_for(FACTS, 2) == (2, 2, 2, 1, 1, 1, 1, 1)
    assert h.state.placement.redundant_experts == (0, 1, 2)
    s = reconfig.expert_copies_status(h.state)
    assert (s.wanted, s.copies_per_expert, s.min_copies, s.redundant_experts) == (2, 2, 1, [0, 1, 2])
    assert (s.bytes_per_copy, s.redundant_bytes, s.budget_bytes_per_device) == (300, 900, BUDGET)
    assert s.limited_by == "budget: 450 B per device x 2 devices fits the second copy of 3 of 8 experts (300 B each)"
    assert s.chosen_by == "lowest expert ids (no routed tokens counted yet)" and s.routed_tokens == []
    assert sum(s.per_device.values()) == 11


def test_reported_tokens_add_up_and_reports_of_another_size_are_ignored():
    h = harness(2)
    report(h, (1, 0, 0, 0, 0, 2, 0, 0))
    report(h, (0, 0, 3, 0, 0, 2, 0, 0))
    report(h, (9, 9))  # not one per expert: ignored
    report(h, (0,) * 8)
    assert h.state.expert_tokens == (1, 0, 3, 0, 0, 4, 0, 0)
    s = reconfig.expert_copies_status(h.state)
    assert s.routed_tokens == [1, 0, 3, 0, 0, 4, 0, 0] and s.chosen_by == "routed tokens (the most first)"
    assert s.hotness == pytest.approx([1, 0, 3, 0, 0, 4, 0, 0], rel=1e-3)  # moments apart: hardly decayed


def test_old_traffic_fades_so_the_copies_follow_a_workload_that_changed():
    facts = dataclasses.replace(FACTS, hotness_half_life_s=60.0)
    h = rh.Harness(2, warm=(2,), copies=2, facts=facts)
    h.step(reconfig.ExpertLoadReported((1000, 1000, 1000, 1000, 0, 0, 0, 0), 0.0))  # experts 0-3 hot at first
    h.step(reconfig.ExpertLoadReported((0, 0, 0, 0, 300, 300, 300, 300), 600.0))  # ten half-lives later: 4-7
    assert h.state.expert_tokens == (1000,) * 4 + (300,) * 4  # the totals still say 0-3
    assert h.state.expert_heat == pytest.approx((1000 / 1024,) * 4 + (300,) * 4)
    assert h.state.heat_at == 600.0
    h.step(reconfig.ExpertLoadReported((0, 0, 0, 0, 0, 0, 0, 5), 590.0))  # a late report: no decay backwards
    assert h.state.expert_heat[7] == pytest.approx(305) and h.state.heat_at == 600.0
    assert reconfig.copies_for(facts, 3, h.state.expert_heat) == hotcopies.hot_copies(8, 2, 4, h.state.expert_heat)
    assert [e for e, c in enumerate(reconfig.copies_for(facts, 3, h.state.expert_heat)) if c == 2] == [4, 5, 6, 7]


def test_add_heat_decays_by_half_lives():
    assert reconfig.add_heat((), None, (4, 0), 10.0, 5.0) == (4.0, 0.0)
    assert reconfig.add_heat((4.0, 0.0), 10.0, (0, 2), 20.0, 5.0) == (1.0, 2.0)


def test_a_scale_gives_the_second_copies_to_the_hottest_experts():
    h = harness(2, warm=(2,))
    report(h, LOAD)
    h.scale(3)
    new = h.state.scale.plan.new_placement
    assert new.redundant_experts == (2, 3, 5, 7)
    assert new.copy_counts == hotcopies.hot_copies(8, 2, 4, LOAD)
    assert sorted(new.counts().values()) == [4, 4, 4]  # 12 copies on 3 devices
    for m in h.state.scale.plan.expert_moves:
        assert m.src_device in h.state.placement.homes[m.expert]


def test_without_a_budget_every_expert_keeps_two_copies_whatever_the_load():
    facts = dataclasses.replace(FACTS, redundant_budget_bytes=None)
    h = rh.Harness(2, warm=(2,), copies=2, facts=facts)
    report(h, LOAD)
    h.scale(3)
    assert h.state.scale.plan.new_placement.copy_counts == (2,) * 8
    s = reconfig.expert_copies_status(h.state)
    assert (s.limited_by, s.chosen_by, s.redundant_bytes) == ("", "", 8 * 300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.integers(1, 3), warm=st.sets(st.integers(2, 5), max_size=2),
       ops=st.lists(st.tuples(st.sampled_from(rh.KINDS + ("load",) * 3), st.integers(0, 11),
                              st.sampled_from((0.0, 0.01, 0.1, 0.5, 4.0))), min_size=20, max_size=80))
def test_any_event_order_with_a_budget_keeps_the_invariants_and_the_hottest_get_the_copies(start, warm, ops):
    """test_reconfig's event orders, with load reports among them: the harness' invariants hold,
    and every plan's copies are the ones the load known when it was made asks for."""
    h = harness(start, warm={d for d in warm if d >= start})

    def check(before, kind, event, actions):
        sc = h.state.scale
        if sc is not None and sc.plan is not None and sc.plan is not (before.scale and before.scale.plan):
            assert sc.plan.new_placement.copy_counts == reconfig.copies_for(FACTS, len(sc.new_devices),
                                                                            before.expert_heat)

    rh.play(h, ops, check)


def test_a_scale_down_keeps_second_copies_for_as_many_of_the_hottest_as_still_fit():
    h = harness(3)
    report(h, LOAD)
    h.scale(2)
    plan = h.state.scale.plan
    assert plan.new_placement.copy_counts == hotcopies.hot_copies(8, 2, 3, LOAD)  # 4 fit on 3 devices, 3 on 2
    assert plan.new_placement.devices == (0, 1) and sorted(plan.new_placement.counts().values()) == [5, 6]


def test_a_recovery_keeps_second_copies_for_the_hottest_and_reads_only_experts_no_survivor_holds():
    h = harness(3)
    old = h.state.placement
    assert old.redundant_experts == (0, 1, 2, 3)
    report(h, LOAD)
    h.step(reconfig.WorkerDied(2, "killed by signal 9", h._at()))
    sc = h.state.scale
    new = sc.plan.new_placement
    assert new.devices == (0, 1)
    assert new.copy_counts == hotcopies.hot_copies(8, 2, 3, LOAD)  # 3 fit on 2 devices: 5, 7, 2
    only_on_lost = tuple(e for e, homes in enumerate(old.homes) if homes == (2,))
    assert only_on_lost and sc.checkpoint_experts == only_on_lost
    for m in sc.plan.expert_moves:  # the rest come from a surviving holder
        assert m.src_device in old.homes[m.expert] and m.src_device != 2
