"""Planner tests: hypothesis properties for rules 1-6 of the plan, literal examples, errors.

Worked example, 8 experts on devices [0, 1] -> [0, 1, 2] (replicated_bytes=1000,
expert_bytes=100); `plan(...).describe()` prints:

    plan 2 -> 3 devices (add [2], remove []): 2 replicated slices, 2 expert moves of 100 B, 1200 B in all
      device 2 <- device 0: replicated bytes [0, 512)
      device 2 <- device 1: replicated bytes [512, 1000)
      device 2 <- device 0: expert 3
      device 2 <- device 1: expert 7
      device 0: keeps 3, holds 3 experts [0-2]
      device 1: keeps 3, holds 3 experts [4-6]
      device 2: keeps 0, holds 2 experts [3, 7]

The new device takes floor(8 / 3) = 2 experts, one from each old device (both keep the ceil,
3), and pulls its replicated weights half from each: 2 experts moved is the minimum.

Minimality is checked against bounds computed here, not by the planner: for one copy per expert
the simple bound (experts x copies minus what each device can keep under the best choice of
which devices take the ceil) is exact; with two copies it is not always reachable (an expert
cannot land where its other copy already is), so there the reference is a min-cost flow solved
by networkx's network simplex, and on tiny inputs an exhaustive search over all placements.
"""

from __future__ import annotations

import itertools
import random

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from elasticmoe_worker import planner

REPLICATED_BYTES = 10_000_000 + 37  # not a multiple of the alignment: the last slice takes 37 B more
EXPERT_BYTES = 3_000_000
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- independent references ----------------------------------------------------------------------

def simple_bound(cur: planner.Placement, targets, copies: int) -> int:
    """Moves >= experts x copies - the most pairs any balanced placement can keep, counting per
    device (best choice of ceil devices) and per expert; exact for one copy."""
    n = len(targets)
    base, extra = divmod(cur.num_experts * copies, n)
    have = {d: sum(d in devs for devs in cur.homes) for d in targets}
    per_device = sum(min(v, base) for v in have.values()) + min(extra, sum(v > base for v in have.values()))
    per_expert = sum(min(copies, sum(d in have for d in devs)) for devs in cur.homes)
    return cur.num_experts * copies - min(per_device, per_expert)


def _each(cur: planner.Placement, copies) -> list[int]:
    """`copies`: one int for every expert, or one per expert -> one per expert."""
    return [copies] * cur.num_experts if isinstance(copies, int) else list(copies)


def flow_minimum(cur: planner.Placement, targets, copies) -> int:
    """Fewest moved copies over all balanced placements, by networkx's network simplex.
    `copies`: one int, or one per expert."""
    nx = pytest.importorskip("networkx")
    n, each = len(targets), _each(cur, copies)
    base, extra = divmod(sum(each), n)
    g = nx.DiGraph()
    g.add_node("s", demand=-sum(each))
    g.add_node("t", demand=sum(each))
    for e, devs in enumerate(cur.homes):
        g.add_edge("s", ("e", e), capacity=each[e], weight=0)
        for d in targets:
            g.add_edge(("e", e), ("d", d), capacity=1, weight=0 if d in devs else 1)
    for d in targets:
        g.add_edge(("d", d), "t", capacity=base, weight=0)
        g.add_edge(("d", d), "ceil", capacity=1, weight=0)
    g.add_edge("ceil", "t", capacity=extra, weight=0)
    return nx.network_simplex(g)[0]


def brute_minimum(cur: planner.Placement, targets, copies) -> int:
    """Fewest moved copies by trying every placement (tiny inputs only). `copies`: one int, or
    one per expert."""
    num, each = cur.num_experts, _each(cur, copies)
    base, extra = divmod(sum(each), len(targets))
    best = -1
    count = dict.fromkeys(targets, 0)

    def go(e: int, kept: int) -> None:
        nonlocal best
        if e == num:
            best = max(best, kept)
            return
        if kept + sum(each[e:]) <= best:
            return
        for devs in itertools.combinations(targets, each[e]):
            if any(count[d] >= base + 1 for d in devs):
                continue
            for d in devs:
                count[d] += 1
            if sum(v == base + 1 for v in count.values()) <= extra:
                go(e + 1, kept + sum(d in cur.homes[e] for d in devs))
            for d in devs:
                count[d] -= 1

    go(0, 0)
    return sum(each) - best


def moved_pairs(p: planner.Plan) -> set[tuple[int, int]]:
    return {(e, d) for e, devs in enumerate(p.new_placement.homes) for d in devs if d not in p.old_placement.homes[e]}


# -- the rules ----------------------------------------------------------------------------------

def check_plan(p: planner.Plan, cur: planner.Placement, devices, targets, copies: int) -> None:
    new, targets = p.new_placement, sorted(targets)
    num = cur.num_experts
    assert p.source_devices == tuple(sorted(devices)) and p.target_devices == tuple(targets)
    assert p.added_devices == tuple(d for d in targets if d not in devices)
    assert p.removed_devices == tuple(d for d in sorted(devices) if d not in targets)
    assert p.old_placement == cur

    # 1. exactly `copies` distinct homes per expert, all in the target set
    assert new.num_experts == num
    for devs in new.homes:
        assert len(devs) == copies == len(set(devs)) and set(devs) <= set(targets)

    # 2. balance: every target device holds floor or ceil
    base = num * copies // len(targets)
    counts = {d: len(new.experts_on(d)) for d in targets}
    assert set(counts.values()) <= {base, base + 1}, counts
    assert sum(counts.values()) == num * copies

    # 3. minimal moves
    kept = p.kept
    moves = len(p.expert_moves)
    assert moves == sum(max(0, counts[d] - len(kept[d])) for d in targets)
    bound = simple_bound(cur, targets, copies)
    assert moves >= bound
    if copies == 1 and cur.copies_per_expert == 1:
        assert moves == bound
        before = cur.counts()
        # nothing that could stay moved: each device keeps all it may
        assert all(len(kept[d]) == min(before.get(d, 0), counts[d]) for d in targets)
    if set(devices) == set(targets) and copies == cur.copies_per_expert and _balanced(cur, targets):
        assert moves == 0 and new == cur

    # 4. every move adds one missing copy, sent by a current holder
    assert {(m.expert, m.dst_device) for m in p.expert_moves} == moved_pairs(p)
    assert len(set((m.expert, m.dst_device) for m in p.expert_moves)) == moves
    for m in p.expert_moves:
        assert m.src_device in cur.homes[m.expert] and m.src_device in devices
    assert p.unchanged_experts == sum(a == b for a, b in zip(cur.homes, new.homes))

    # 5. replicated weights: only added devices, tiled from the live staying devices
    senders = [d for d in sorted(devices) if d in targets] or sorted(devices)
    assert {t.dst_device for t in p.replicated_transfers} == (set(p.added_devices) if p.replicated_bytes else set())
    firsts = []
    for dst in p.added_devices:
        slices = sorted((t for t in p.replicated_transfers if t.dst_device == dst), key=lambda t: t.offset_bytes)
        offset = 0
        for t in slices:
            assert t.offset_bytes == offset and t.size_bytes > 0 and t.offset_bytes % planner.ALIGNMENT_BYTES == 0
            offset += t.size_bytes
        assert offset == p.replicated_bytes
        srcs = [t.src_device for t in slices]
        assert len(srcs) == len(set(srcs)) and set(srcs) <= set(senders)
        if p.replicated_bytes >= planner.ALIGNMENT_BYTES * len(senders):
            assert sorted(srcs) == senders
            sizes = [t.size_bytes for t in slices]
            assert max(sizes) - min(sizes) <= planner.ALIGNMENT_BYTES
        if srcs:
            firsts.append(srcs[0])
    head = firsts[:len(senders)]
    assert len(set(head)) == len(head), "the first slices rotate over the senders"
    assert p.bytes_moved == moves * p.expert_bytes + sum(t.size_bytes for t in p.replicated_transfers)


def _balanced(cur: planner.Placement, targets) -> bool:
    counts = [len(cur.experts_on(d)) for d in targets]
    return max(counts) - min(counts) <= 1 and set(cur.devices) <= set(targets)


# -- scenarios ----------------------------------------------------------------------------------

@st.composite
def scenarios(draw, direction: str, max_step: int = 4):
    """(placement, current devices, target devices, copies): a balanced placement on 1..64
    devices with arbitrary ids, after 0-2 earlier random steps, then a step of 1..max_step."""
    copies = draw(st.sampled_from([1, 2]))
    num = draw(st.integers(8, 256))
    step = draw(st.integers(1, max_step))
    if direction == "up":
        n = draw(st.integers(copies, min(64, num * copies - step)))
    else:
        n = draw(st.integers(copies + step, min(64, num * copies)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    pool = rng.sample(range(200), n + step + 8)
    devices = sorted(pool[:n])
    cur = planner.initial_placement(num, devices, copies)
    for _ in range(draw(st.integers(0, 2))):  # history: placements need not be contiguous
        spare = [d for d in pool if d not in devices]
        k = rng.randint(1, 3)
        up_room = min(64, num * copies) - (step if direction == "up" else 0)
        if rng.random() < 0.5 and len(devices) + k <= up_room and len(spare) >= k + step:
            devices = sorted(devices + rng.sample(spare, k))
        elif len(devices) - k >= copies + (step if direction == "down" else 0):
            devices = sorted(rng.sample(devices, len(devices) - k))
        cur = planner.plan_placement(cur, devices)
    if direction == "up":
        spare = [d for d in pool if d not in devices]
        targets = sorted(devices + rng.sample(spare, step))
    elif draw(st.booleans()):
        targets = list(planner.resize(devices, len(devices) - step))
    else:
        targets = sorted(rng.sample(devices, len(devices) - step))
    assert len(targets) <= num * copies and len(targets) >= copies
    return cur, devices, targets, copies


def _plan(cur, devices, targets, **kw):
    return planner.plan(cur, devices, targets, replicated_bytes=REPLICATED_BYTES, expert_bytes=EXPERT_BYTES, **kw)


@PROPERTY
@given(scenarios("up"))
def test_scale_up_properties(case):
    cur, devices, targets, copies = case
    p = _plan(cur, devices, targets)
    check_plan(p, cur, devices, targets, copies)
    # 4. sources: the old devices share the sending within one expert
    sent = [sum(m.src_device == d for m in p.expert_moves) for d in devices]
    assert max(sent) - min(sent) <= 1
    if copies == 1:
        assert all(m.dst_device in p.added_devices for m in p.expert_moves)
    else:
        assert moves_equal_flow(p, cur, targets, copies)


@PROPERTY
@given(scenarios("down"))
def test_scale_down_properties(case):
    cur, devices, targets, copies = case
    p = _plan(cur, devices, targets)
    check_plan(p, cur, devices, targets, copies)
    assert p.replicated_transfers == ()
    if copies == 1:  # exactly what the removed devices held moves, and only that
        assert {m.src_device for m in p.expert_moves} <= set(p.removed_devices)
        assert len(p.expert_moves) == sum(len(cur.experts_on(d)) for d in p.removed_devices)
    else:
        assert moves_equal_flow(p, cur, targets, copies)


def moves_equal_flow(p, cur, targets, copies) -> bool:
    if cur.num_experts * len(targets) > 4096:  # network simplex gets slow; the tiny and medium tests cover it
        return True
    return len(p.expert_moves) == flow_minimum(cur, targets, copies)


@PROPERTY
@given(scenarios("up", max_step=1))
def test_one_device_up_takes_exactly_its_share_from_the_fullest(case):
    cur, devices, targets, copies = case
    p = _plan(cur, devices, targets)
    (added,) = p.added_devices
    if copies == 1:
        assert len(p.expert_moves) == len(p.new_placement.experts_on(added))
    before, after = cur.counts(), p.new_placement.counts()
    gave = {d: before.get(d, 0) - after[d] for d in devices}
    assert all(v >= 0 for v in gave.values())
    assert sum(gave.values()) == len(p.new_placement.experts_on(added))
    for a, b in itertools.permutations(devices, 2):  # the more an old device held, the more it gives
        if before.get(a, 0) > before.get(b, 0):
            assert gave[a] >= gave[b]


@PROPERTY
@given(scenarios("down", max_step=1))
def test_one_device_down_moves_exactly_what_it_held(case):
    cur, devices, targets, copies = case
    p = _plan(cur, devices, targets)
    (removed,) = p.removed_devices
    if copies == 1:
        assert sorted(m.expert for m in p.expert_moves) == list(cur.experts_on(removed))
    else:
        assert moves_equal_flow(p, cur, targets, copies)


@settings(max_examples=25, deadline=None)
@given(scenarios("up"), st.permutations(range(8)))
def test_same_inputs_same_plan(case, perm):
    cur, devices, targets, copies = case
    shuffled = list(targets)
    random.Random(sum(perm[:3])).shuffle(shuffled)
    a = _plan(cur, devices, targets)
    b = _plan(cur, list(reversed(devices)), shuffled)
    assert a == b
    assert msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b)
    assert a.describe() == b.describe()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=planner.Plan) == a
    assert planner.plan_placement(cur, targets) == a.new_placement
    same = _plan(cur, devices, devices)  # 3. the same device set moves nothing
    assert same.expert_moves == () and same.replicated_transfers == () and same.new_placement == cur


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_exact_minimum_on_any_tiny_input(num, old_copies, copies, seed):
    """Arbitrary placements (unbalanced, copies changing, devices added and removed at once):
    the planner moves exactly as few copies as the best of all placements."""
    rng = random.Random(seed)
    devices = rng.sample(range(8), rng.randint(old_copies, 5))
    cur = planner.Placement(tuple(tuple(rng.sample(devices, old_copies)) for _ in range(num)))
    n_max = min(4, num * copies)
    assume(n_max >= copies)
    targets = sorted(rng.sample(range(8), rng.randint(copies, n_max)))
    p = planner.plan(cur, devices, targets, replicated_bytes=1000, expert_bytes=10, copies_per_expert=copies)
    check_plan(p, cur, devices, targets, copies)
    assert len(p.expert_moves) == brute_minimum(cur, targets, copies)


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 48), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_exact_minimum_on_any_medium_input(num, old_copies, copies, seed):
    rng = random.Random(seed)
    devices = rng.sample(range(40), rng.randint(old_copies, 12))
    cur = planner.Placement(tuple(tuple(rng.sample(devices, old_copies)) for _ in range(num)))
    targets = sorted(rng.sample(range(40), rng.randint(copies, min(12, num * copies))))
    p = planner.plan(cur, devices, targets, replicated_bytes=0, expert_bytes=10, copies_per_expert=copies)
    check_plan(p, cur, devices, targets, copies)
    assert len(p.expert_moves) == flow_minimum(cur, targets, copies)


# -- literal examples ---------------------------------------------------------------------------

def _homes(p: planner.Placement, devices) -> dict[int, list[int]]:
    return {d: list(p.experts_on(d)) for d in devices}


def test_worked_example_8_experts_2_to_3():
    cur = planner.initial_placement(8, [0, 1])
    p = planner.plan(cur, [0, 1], [0, 1, 2], replicated_bytes=1000, expert_bytes=100)
    assert _homes(p.new_placement, [0, 1, 2]) == {0: [0, 1, 2], 1: [4, 5, 6], 2: [3, 7]}
    assert p.expert_moves == (planner.ExpertMove(3, 0, 2), planner.ExpertMove(7, 1, 2))
    assert p.replicated_transfers == (planner.SliceTransfer(2, 0, 0, 512), planner.SliceTransfer(2, 1, 512, 488))
    assert p.kept == {0: {0, 1, 2}, 1: {4, 5, 6}, 2: set()}
    assert p.unchanged_experts == 6 and p.bytes_moved == 1200
    assert p.bytes_sent_by_device() == {0: 612, 1: 588}
    assert p.describe() == __doc__.split("prints:\n\n")[1].split("\n\n")[0].replace("\n    ", "\n").strip()


def test_8_experts_3_to_2():
    cur = planner.initial_placement(8, [0, 1, 2])
    assert _homes(cur, [0, 1, 2]) == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7]}
    p = planner.plan(cur, [0, 1, 2], [0, 1], replicated_bytes=1000, expert_bytes=100)
    assert _homes(p.new_placement, [0, 1]) == {0: [0, 1, 2, 6], 1: [3, 4, 5, 7]}
    assert p.expert_moves == (planner.ExpertMove(6, 2, 0), planner.ExpertMove(7, 2, 1))
    assert p.removed_devices == (2,) and p.replicated_transfers == () and p.bytes_moved == 200


def test_8_experts_1_to_4():
    cur = planner.initial_placement(8, [0])
    p = planner.plan(cur, [0], [0, 1, 2, 3], replicated_bytes=1000, expert_bytes=100)
    assert _homes(p.new_placement, range(4)) == {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7]}
    assert all(m.src_device == 0 for m in p.expert_moves) and len(p.expert_moves) == 6
    assert [(t.dst_device, t.src_device, t.offset_bytes, t.size_bytes) for t in p.replicated_transfers] == [
        (1, 0, 0, 1000), (2, 0, 0, 1000), (3, 0, 0, 1000)]


def test_8_experts_4_to_1():
    cur = planner.initial_placement(8, [0, 1, 2, 3])
    p = planner.plan(cur, [0, 1, 2, 3], [0], replicated_bytes=1000, expert_bytes=100)
    assert p.new_placement.expert_owner == [0] * 8
    assert [(m.expert, m.src_device) for m in p.expert_moves] == [(2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3)]
    assert p.kept == {0: {0, 1}} and p.replicated_transfers == ()


def test_same_devices_move_nothing():
    cur = planner.initial_placement(64, [3, 9, 12], copies_per_expert=2)
    p = planner.plan(cur, [3, 9, 12], [12, 3, 9], replicated_bytes=1000, expert_bytes=100)
    assert p.new_placement == cur and p.expert_moves == () and p.replicated_transfers == () and p.bytes_moved == 0
    assert p.unchanged_experts == 64


def test_initial_placement_is_contiguous_and_matches_the_coordinator():
    assert planner.initial_placement(10, [5, 2, 7]).expert_owner == [2] * 4 + [5] * 3 + [7] * 3
    two = planner.initial_placement(6, [0, 1, 2, 3], copies_per_expert=2)
    assert _homes(two, range(4)) == {0: [0, 1, 2], 1: [3, 4, 5], 2: [0, 1, 2], 3: [3, 4, 5]}


def test_two_copies_where_the_simple_bound_is_out_of_reach():
    """Devices 0 and 1 both hold experts 0-2, devices 2 and 3 both hold 3-5. Removing device 3,
    experts 3-5 cannot go to device 2 (it has them), and devices 0 and 1 have room for one more
    each: one swap is needed, so 4 moves, not the 3 that device 3 held."""
    cur = planner.initial_placement(6, [0, 1, 2, 3], copies_per_expert=2)
    p = planner.plan(cur, [0, 1, 2, 3], [0, 1, 2], replicated_bytes=0, expert_bytes=1)
    check_plan(p, cur, [0, 1, 2, 3], [0, 1, 2], 2)
    assert simple_bound(cur, [0, 1, 2], 2) == 3
    assert len(p.expert_moves) == 4 == brute_minimum(cur, [0, 1, 2], 2)


def test_copies_can_change():
    cur = planner.initial_placement(8, [0, 1, 2, 3])
    two = planner.plan(cur, [0, 1, 2, 3], [0, 1, 2, 3], replicated_bytes=0, expert_bytes=1, copies_per_expert=2)
    assert two.new_placement.copies_per_expert == 2 and len(two.expert_moves) == 8  # one new copy each
    assert all(len(two.new_placement.experts_on(d)) == 4 for d in range(4))
    back = planner.plan_placement(two.new_placement, [0, 1, 2, 3], copies_per_expert=1)
    assert back.counts() == {0: 2, 1: 2, 2: 2, 3: 2}
    assert all(devs[0] in old for devs, old in zip(back.homes, two.new_placement.homes))  # nothing moves


def test_sources_spread_for_each_new_device():
    cur = planner.initial_placement(64, [0, 1, 2, 3])
    p = planner.plan(cur, [0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7], replicated_bytes=1 << 20, expert_bytes=1)
    for dst in range(4, 8):
        from_each = [sum(m.dst_device == dst and m.src_device == s for m in p.expert_moves) for s in range(4)]
        assert from_each == [2, 2, 2, 2]
        slices = [t for t in p.replicated_transfers if t.dst_device == dst]
        assert [t.size_bytes for t in slices] == [1 << 18] * 4
        assert slices[0].src_device == dst - 4  # rotation: new device j starts at sender j


def test_two_copies_send_from_a_staying_holder_when_it_costs_nothing():
    cur = planner.initial_placement(4, [0, 1, 2], copies_per_expert=2)  # 0: 0-2, 1: 3, 0, 1, 2: 2, 3
    p = planner.plan(cur, [0, 1, 2], [0, 1], replicated_bytes=0, expert_bytes=1)
    assert p.expert_moves == (planner.ExpertMove(3, 1, 0), planner.ExpertMove(2, 0, 1))


def test_two_copies_balance_the_senders():
    cur = planner.initial_placement(94, [0, 1, 2], copies_per_expert=2)
    p = planner.plan(cur, [0, 1, 2], [0, 1, 2, 3, 4, 5], replicated_bytes=0, expert_bytes=1)
    sent = [sum(m.src_device == d for m in p.expert_moves) for d in range(3)]
    assert sum(sent) == len(p.expert_moves) == 3 * 31 and max(sent) - min(sent) <= 1


def test_replicated_slices_rotate_and_take_the_remainder_last():
    cur = planner.initial_placement(12, [0, 1, 2])
    p = planner.plan(cur, [0, 1, 2], [0, 1, 2, 3, 4], replicated_bytes=1000, expert_bytes=0)
    got = [(t.dst_device, t.src_device, t.offset_bytes, t.size_bytes) for t in p.replicated_transfers]
    assert got == [(3, 0, 0, 320), (3, 1, 320, 320), (3, 2, 640, 360),
                   (4, 1, 0, 320), (4, 2, 320, 320), (4, 0, 640, 360)]


def test_replicated_slices_come_from_removed_devices_when_none_stays():
    cur = planner.initial_placement(4, [0, 1])
    p = planner.plan(cur, [0, 1], [2, 3], replicated_bytes=200, expert_bytes=5)
    assert [(t.dst_device, t.src_device, t.offset_bytes, t.size_bytes) for t in p.replicated_transfers] == [
        (2, 0, 0, 128), (2, 1, 128, 72), (3, 1, 0, 128), (3, 0, 128, 72)]
    assert len(p.expert_moves) == 4 and p.kept == {2: set(), 3: set()}


def test_tiny_replicated_region_skips_empty_slices():
    cur = planner.initial_placement(8, [0, 1, 2])
    p = planner.plan(cur, [0, 1, 2], [0, 1, 2, 3], replicated_bytes=100, expert_bytes=1)
    assert [(t.src_device, t.offset_bytes, t.size_bytes) for t in p.replicated_transfers] == [(0, 0, 64), (2, 64, 36)]


def test_resize_adds_lowest_free_ids_and_removes_highest():
    assert planner.resize([0, 2, 5], 5) == (0, 1, 2, 3, 5)
    assert planner.resize([5, 0, 2], 2) == (0, 2)


def test_resize_adds_preferred_ids_first_then_the_lowest_free_ones():
    assert planner.resize([0], 2, prefer={2, 3}) == (0, 2)
    assert planner.resize([0], 4, prefer={3}) == (0, 1, 2, 3)
    assert planner.resize([0, 1], 3, prefer={1, 4}) == (0, 1, 4), "a serving id is no preference"
    assert planner.resize([0, 1, 2], 2, prefer={5}) == (0, 1), "a scale-down ignores it"
    with pytest.raises(ValueError, match="prefer"):
        planner.resize([0], 2, prefer={-1})


def test_load_aware_balances_load_with_the_same_moves():
    load = [1.0, 1, 1, 10, 1, 1, 1, 10, 1, 1, 1, 10]  # the plain tie-break drops the highest ids
    cur = planner.initial_placement(12, [0, 1, 2])  # device 0: 0-3, 1: 4-7, 2: 8-11
    plain = planner.plan_placement(cur, [0, 1, 2, 3])
    aware = planner.plan_placement(cur, [0, 1, 2, 3], expert_load=load)

    def loads(p):
        return [sum(load[e] for e in p.experts_on(d)) for d in range(4)]

    def moves(p):
        return sum(d not in cur.homes[e] for e, devs in enumerate(p.homes) for d in devs)

    assert moves(aware) == moves(plain) == 3
    assert max(loads(aware)) < max(loads(plain))
    assert loads(plain) == [3, 3, 3, 30] and loads(aware) == [12, 12, 12, 3]


@PROPERTY
@given(scenarios("up"), st.integers(0, 2**32 - 1))
def test_load_aware_keeps_every_rule(case, seed):
    cur, devices, targets, copies = case
    rng = random.Random(seed)
    load = [rng.expovariate(1.0) for _ in range(cur.num_experts)]
    p = _plan(cur, devices, targets, expert_load=load)
    check_plan(p, cur, devices, targets, copies)
    assert len(p.expert_moves) == len(_plan(cur, devices, targets).expert_moves)


# -- errors --------------------------------------------------------------------------------------

CUR = planner.initial_placement(4, [0, 1])


@pytest.mark.parametrize(("call", "field"), [
    (lambda: planner.plan(CUR, [0, 1], [], replicated_bytes=0, expert_bytes=0), "target_devices"),
    (lambda: planner.plan(CUR, [0, 1], [0, 1, 2, 3, 4], replicated_bytes=0, expert_bytes=0), "target_devices"),
    (lambda: planner.plan(CUR, [0, 1], [0, 1, 1], replicated_bytes=0, expert_bytes=0), "target_devices"),
    (lambda: planner.plan(CUR, [0, 0, 1], [0, 1], replicated_bytes=0, expert_bytes=0), "current_devices"),
    (lambda: planner.plan(CUR, [], [0, 1], replicated_bytes=0, expert_bytes=0), "current_devices"),
    (lambda: planner.plan(CUR, [0, 1], [0], replicated_bytes=0, expert_bytes=0, copies_per_expert=2),
     "copies_per_expert"),
    (lambda: planner.plan(CUR, [0, 1], [0, 1], replicated_bytes=0, expert_bytes=0, copies_per_expert=0),
     "copies_per_expert"),
    (lambda: planner.plan(CUR, [0], [0, 1], replicated_bytes=0, expert_bytes=0), "current"),
    (lambda: planner.plan(CUR, [0, 1], [0, 1], replicated_bytes=-1, expert_bytes=0), "replicated_bytes"),
    (lambda: planner.plan(CUR, [0, 1], [0, 1], replicated_bytes=0, expert_bytes=-5), "expert_bytes"),
    (lambda: planner.plan(CUR, [0, 1], [0, -1], replicated_bytes=0, expert_bytes=0), "target_devices"),
    (lambda: planner.plan_placement(CUR, [0, 1], expert_load=[1.0]), "expert_load"),
    (lambda: planner.plan_placement(CUR, [0, 1], expert_load=[1.0, 1, float("nan"), 1]), "expert_load[2]"),
    (lambda: planner.plan_placement(CUR, [0, 1], expert_load=[1.0, -1, 1, 1]), "expert_load[1]"),
    (lambda: planner.initial_placement(0, [0]), "num_experts"),
    (lambda: planner.initial_placement(2, [0, 1, 2]), "devices"),
    (lambda: planner.initial_placement(4, [0, 1], copies_per_expert=3), "copies_per_expert"),
    (lambda: planner.Placement(()), "homes"),
    (lambda: planner.Placement(((0,), ())), "homes[1]"),
    (lambda: planner.Placement(((0, 0),)), "homes[0]"),
    (lambda: planner.plan_placement(CUR, [0, 1], copies_per_expert=[1, 2, 3, 1]), "copies_per_expert[2]"),
    (lambda: planner.plan_placement(CUR, [0, 1], copies_per_expert=[1, 2]), "copies_per_expert"),
    (lambda: planner.plan_placement(CUR, [0, 1, 2], copies_per_expert=[0, 1, 1, 1]), "copies_per_expert[0]"),
    (lambda: planner.resize([0, 1], 0), "num_devices"),
    (lambda: planner.Placement(((0, 1),)).expert_owner, "copies_per_expert"),
])
def test_errors_name_the_field(call, field):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_non_int_device_id_is_a_type_error():
    with pytest.raises(TypeError, match="target_devices"):
        planner.plan(CUR, [0, 1], [0, "1"], replicated_bytes=0, expert_bytes=0)
