"""Planner tests for experts with different numbers of copies (only the hottest get a second
one when a memory budget allows only some), and the choice of which (`hotcopies`).

The references (an exhaustive search on tiny inputs, networkx's network simplex on larger ones)
are test_planner's, with one capacity per expert.
"""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import test_planner as tp
from elasticmoe_worker import hotcopies, planner


def check_non_uniform(new: planner.Placement, targets, copies) -> None:
    """Every expert has its copies on distinct target devices; devices hold floor/ceil."""
    targets = sorted(targets)
    assert new.copy_counts == tuple(copies)
    for devs in new.homes:
        assert len(set(devs)) == len(devs) and set(devs) <= set(targets)
    base = sum(copies) // len(targets)
    counts = new.counts()
    assert set(counts) == set(targets)
    assert all(base <= counts[d] <= base + 1 for d in targets)
    assert sum(counts.values()) == sum(copies)


def test_a_placement_may_give_experts_different_numbers_of_copies():
    p = planner.Placement(((1, 0), (1,), (2,), (0, 2)))
    assert p.homes == ((0, 1), (1,), (2,), (0, 2))
    assert p.copy_counts == (2, 1, 1, 2) and p.copies(1) == 1 and p.copies(3) == 2
    assert p.copies_per_expert == 2 and not p.uniform and p.num_copies == 6
    assert p.redundant_experts == (0, 3)
    with pytest.raises(ValueError, match=r"^copies_per_expert: 2; .*experts \[0, 3\] have more"):
        p.expert_owner
    one = planner.initial_placement(4, [0, 1])
    assert one.uniform and one.redundant_experts == () and one.copies_per_expert == 1


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_non_uniform_copies_move_exactly_the_fewest(num, seed):
    """Any current placement (copies differing per expert, unbalanced), any target devices, any
    wanted copies per expert: balanced, distinct devices, and as few moves as the best of all
    placements (exhaustive search)."""
    rng = random.Random(seed)
    devices = rng.sample(range(6), rng.randint(2, 4))
    cur = planner.Placement(tuple(tuple(rng.sample(devices, rng.randint(1, 2))) for _ in range(num)))
    targets = sorted(rng.sample(range(6), rng.randint(2, 4)))
    copies = [rng.randint(1, 2) for _ in range(num)]
    if sum(copies) < len(targets):
        copies = [2] * num
        targets = targets[:min(len(targets), 2 * num)]
    p = planner.plan(cur, devices, targets, replicated_bytes=100, expert_bytes=10, copies_per_expert=copies)
    check_non_uniform(p.new_placement, targets, copies)
    assert len(p.expert_moves) == tp.brute_minimum(cur, targets, copies)
    for m in p.expert_moves:  # every copy comes from a current holder, to a device that lacked it
        assert m.src_device in cur.homes[m.expert] and m.dst_device not in cur.homes[m.expert]


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 64), st.integers(0, 2**32 - 1))
def test_non_uniform_copies_match_the_flow_minimum_and_are_deterministic(num, seed):
    rng = random.Random(seed)
    devices = sorted(rng.sample(range(24), rng.randint(2, min(12, num))))
    old = hotcopies.hot_copies(num, 2, rng.randint(0, num), [rng.random() for _ in range(num)])
    cur = planner.initial_placement(num, devices, old)
    check_non_uniform(cur, devices, old)
    targets = sorted(rng.sample(range(24), rng.randint(2, min(12, num))))
    copies = list(hotcopies.hot_copies(num, 2, rng.randint(0, num), [rng.random() for _ in range(num)]))
    p = planner.plan(cur, devices, targets, replicated_bytes=0, expert_bytes=1, copies_per_expert=copies)
    check_non_uniform(p.new_placement, targets, copies)
    assert len(p.expert_moves) == tp.flow_minimum(cur, targets, copies)
    again = planner.plan(cur, list(reversed(devices)), rng.sample(targets, len(targets)), replicated_bytes=0,
                         expert_bytes=1, copies_per_expert=tuple(copies))
    assert msgspec.msgpack.encode(again) == msgspec.msgpack.encode(p)
    same = planner.plan(p.new_placement, targets, targets, replicated_bytes=0, expert_bytes=1)
    assert same.expert_moves == () and same.new_placement == p.new_placement  # default: keep each expert's copies


def test_the_second_copies_follow_the_hot_experts_with_one_move_each():
    """8 experts on 4 devices, experts 0 and 1 hot; then 6 and 7 become the hot ones: their new
    copies are the only moves, and the copies of 0 and 1 are dropped."""
    cur = planner.initial_placement(8, range(4), hotcopies.hot_copies(8, 2, 2))
    assert cur.redundant_experts == (0, 1)
    assert sorted(len(cur.experts_on(d)) for d in range(4)) == [2, 2, 3, 3]
    hot = hotcopies.hot_copies(8, 2, 2, [1, 1, 1, 1, 1, 1, 9, 8])
    p = planner.plan(cur, range(4), range(4), replicated_bytes=0, expert_bytes=1, copies_per_expert=hot)
    assert p.new_placement.redundant_experts == (6, 7)
    assert len(p.expert_moves) == 2 and {m.expert for m in p.expert_moves} == {6, 7}
    check_non_uniform(p.new_placement, range(4), hot)


def test_initial_placement_keeps_the_first_copies_contiguous():
    p = planner.initial_placement(10, [0, 1, 2], hotcopies.hot_copies(10, 2, 3))
    check_non_uniform(p, [0, 1, 2], (2, 2, 2) + (1,) * 7)
    first = planner.initial_placement(10, [0, 1, 2])
    assert all(set(a) <= set(b) for a, b in zip(first.homes, p.homes))  # only the second copies were added


# -- hotcopies -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("num", "devices", "budget", "expert", "want"), [
    (8, 2, None, 100, 8),  # no limit: every expert
    (8, 2, 0, 100, 0),
    (8, 2, 150, 100, 3),  # floor(2 x 150 / 100)
    (8, 4, 150, 100, 6),
    (8, 4, 10_000, 100, 8),  # capped at the number of experts
    (8, 2, 5, 0, 8),  # an expert that weighs nothing always fits
])
def test_redundant_within_the_budget(num, devices, budget, expert, want):
    assert hotcopies.redundant_within(num, devices, budget, expert) == want


def test_hot_copies_go_to_the_hottest_then_the_lowest_ids():
    assert hotcopies.hot_copies(6, 2, 2) == (2, 2, 1, 1, 1, 1)  # no load observed yet: lowest ids
    assert hotcopies.hot_copies(6, 2, 2, [0] * 6) == (2, 2, 1, 1, 1, 1)
    assert hotcopies.hot_copies(6, 2, 2, [5, 1, 9, 1, 5, 0]) == (2, 1, 2, 1, 1, 1)  # 9, then the tie 5/5 to 0
    assert hotcopies.hot_copies(6, 2, 0, [5, 1, 9, 1, 5, 0]) == (1,) * 6
    assert hotcopies.hot_copies(3, 2, 3) == (2, 2, 2)


def test_wanted_copies_fit_the_devices_and_the_budget():
    assert hotcopies.wanted(8, 1, 2, None, 100) == (1,) * 8  # one device: no second copy anywhere
    assert hotcopies.wanted(8, 2, 2, None, 100) == (2,) * 8
    assert hotcopies.wanted(8, 2, 1, None, 100) == (1,) * 8
    assert hotcopies.wanted(8, 2, 2, 150, 100, [0, 0, 0, 0, 0, 7, 8, 9]) == (1, 1, 1, 1, 1, 2, 2, 2)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: hotcopies.redundant_within(0, 1, None, 1), "num_experts"),
    (lambda: hotcopies.redundant_within(4, 0, None, 1), "num_devices"),
    (lambda: hotcopies.redundant_within(4, 2, -1, 1), "budget_bytes"),
    (lambda: hotcopies.redundant_within(4, 2, 1, -1), "expert_bytes"),
    (lambda: hotcopies.hot_copies(4, 0, 1), "copies"),
    (lambda: hotcopies.hot_copies(4, 2, 5), "num_hot"),
    (lambda: hotcopies.hot_copies(4, 2, 1, [1.0]), "expert_load"),
    (lambda: hotcopies.hot_copies(4, 2, 1, [1.0, 1, -1, 1]), "expert_load[2]"),
])
def test_errors_name_the_field(call, field):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(field + ":"), str(info.value)
