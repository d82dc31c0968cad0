"""Reconfiguration plans: where each routed expert lives on the target devices, and which
bytes move from which live device to get there.

Why it exists: a scaling step A -> B devices must keep every staying device's memory in place
(zero-copy) and move as few bytes as possible, and every worker must agree on the result. So the
plan is a pure, deterministic function of plain data: the coordinator computes it once, logs
`Plan.describe()`, and ships the structs (msgspec, frozen) to the HMMs that execute them.

What it computes:
- `plan_placement`: a balanced placement on the target devices (each holds floor or ceil of
  the total number of copies / devices; experts may have different numbers of copies) keeping as many (expert, device) pairs as any balanced placement
  can: exact, a greedy keep-set completed by a min-cost flow (cost 1 per copy placed where it is
  not now). With one copy that is the simple per-device bound; with more it can be higher (a
  copy may not land where its twin is), and the flow still finds the minimum.
  Which experts get a redundant copy under a memory budget is `hotcopies`' choice.
- `plan`: that placement plus the transfers: each moved copy from a current holder, bytes per
  sender balanced; each new device's replicated weights in disjoint 64-byte-aligned slices
  from all live staying devices, rotated across new devices.

What it does not guarantee:
- optimal load balance: `expert_load` only steers the free choices among move-minimal
  placements (which experts leave a full device, which new device takes which), greedily;
- that the plan is cheapest in time: it minimises the number of expert copies moved, not the
  transfer makespan, and it knows nothing of links or topology;
- that the current placement is balanced: any valid one is accepted, and an unbalanced one is
  rebalanced, which moves experts even when the device set stays the same;
- cheap scale-down with two copies from `initial_placement`: its blocks come in mirrored pairs,
  so the experts of a removed device all have their twin on one device, which cannot take them;
- anything about KV blocks: sequences stay on their DP rank (the executor handover's concern).
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import Iterable, Sequence

import msgspec

from elasticmoe_worker import flow

ALIGNMENT_BYTES = 64  # replicated slices start on this boundary; the last takes the remainder


class Placement(msgspec.Struct, frozen=True):
    """Where each routed expert lives: `homes[e]` is the sorted tuple of device ids holding it.

    Each expert has one or more copies, on distinct devices; experts may differ in how many
    (the hottest get a redundant copy when a memory budget allows only some). Construction sorts
    each tuple, so equal placements compare equal whatever order the ids were given in.
    """

    homes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.homes:
            raise ValueError("homes: empty; expected one tuple of device ids per expert")
        normal = []
        for e, devs in enumerate(self.homes):
            devs = tuple(devs)
            if not devs:
                raise ValueError(f"homes[{e}]: empty; expected at least one device id")
            for d in devs:
                _check_id(f"homes[{e}]", d)
            if len(set(devs)) != len(devs):
                raise ValueError(f"homes[{e}]: {list(devs)} names a device twice; expected distinct devices")
            normal.append(tuple(sorted(devs)))
        msgspec.structs.force_setattr(self, "homes", tuple(normal))

    @property
    def num_experts(self) -> int:
        return len(self.homes)

    @property
    def copies_per_expert(self) -> int:
        """The most copies any expert has: the number of copies of every expert when the
        placement is uniform (see `uniform`)."""
        return max(map(len, self.homes))

    @property
    def uniform(self) -> bool:
        """Whether every expert has the same number of copies."""
        return len(set(map(len, self.homes))) == 1

    def copies(self, expert: int) -> int:
        return len(self.homes[expert])

    @property
    def copy_counts(self) -> tuple[int, ...]:
        """Expert id -> its number of copies (what `plan` keeps when not told otherwise)."""
        return tuple(map(len, self.homes))

    @property
    def num_copies(self) -> int:
        """Copies of all experts together: what the devices hold between them."""
        return sum(map(len, self.homes))

    @property
    def redundant_experts(self) -> tuple[int, ...]:
        """The experts with more than one copy, ascending."""
        return tuple(e for e, devs in enumerate(self.homes) if len(devs) > 1)

    @property
    def devices(self) -> tuple[int, ...]:
        """Every device that holds at least one expert, ascending."""
        return tuple(sorted({d for devs in self.homes for d in devs}))

    def experts_on(self, device: int) -> tuple[int, ...]:
        return tuple(e for e, devs in enumerate(self.homes) if device in devs)

    def counts(self) -> dict[int, int]:
        """Device id -> number of experts it holds (devices holding none are absent)."""
        out: dict[int, int] = {}
        for devs in self.homes:
            for d in devs:
                out[d] = out.get(d, 0) + 1
        return dict(sorted(out.items()))

    @property
    def expert_owner(self) -> list[int]:
        """Expert id -> its device, for a placement with one copy of every expert."""
        if self.copies_per_expert != 1:
            raise ValueError(f"copies_per_expert: {self.copies_per_expert}; expert_owner needs exactly 1 copy of "
                             f"every expert (experts {list(self.redundant_experts)} have more)")
        return [devs[0] for devs in self.homes]


class ExpertMove(msgspec.Struct, frozen=True):
    """Copy all MoE layers of `expert` from `src_device` (a current holder) to `dst_device`."""

    expert: int
    src_device: int
    dst_device: int


class SliceTransfer(msgspec.Struct, frozen=True):
    """Bytes [offset_bytes, offset_bytes + size_bytes) of the replicated region, src -> dst."""

    dst_device: int
    src_device: int
    offset_bytes: int
    size_bytes: int


class Plan(msgspec.Struct, frozen=True):
    """One reconfiguration. Devices in both sets keep their memory (zero-copy) and only gain
    or lose expert pages; added devices receive everything; removed devices stay alive until
    the plan has run, sending away what they hold."""

    source_devices: tuple[int, ...]
    target_devices: tuple[int, ...]
    added_devices: tuple[int, ...]
    removed_devices: tuple[int, ...]
    old_placement: Placement
    new_placement: Placement
    expert_moves: tuple[ExpertMove, ...]
    replicated_transfers: tuple[SliceTransfer, ...]
    replicated_bytes: int
    expert_bytes: int

    @property
    def bytes_moved(self) -> int:
        return len(self.expert_moves) * self.expert_bytes + sum(t.size_bytes for t in self.replicated_transfers)

    @property
    def kept(self) -> dict[int, frozenset[int]]:
        """Target device -> the experts it holds before and after (added devices: empty)."""
        return {d: frozenset(e for e, (old, new) in enumerate(zip(self.old_placement.homes, self.new_placement.homes))
                             if d in old and d in new)
                for d in self.target_devices}

    @property
    def unchanged_experts(self) -> int:
        """Experts whose set of homes is the same before and after."""
        return sum(old == new for old, new in zip(self.old_placement.homes, self.new_placement.homes))

    def bytes_sent_by_device(self) -> dict[int, int]:
        """Source device -> bytes it sends (replicated slices and experts), for every source."""
        out = {d: 0 for d in self.source_devices}
        for t in self.replicated_transfers:
            out[t.src_device] += t.size_bytes
        for m in self.expert_moves:
            out[m.src_device] += self.expert_bytes
        return out

    def describe(self) -> str:
        """One line per step, for logs."""
        lines = [f"plan {len(self.source_devices)} -> {len(self.target_devices)} devices "
                 f"(add {list(self.added_devices)}, remove {list(self.removed_devices)}): "
                 f"{len(self.replicated_transfers)} replicated slices, {len(self.expert_moves)} expert moves "
                 f"of {self.expert_bytes} B, {self.bytes_moved} B in all"]
        for t in self.replicated_transfers:
            lines.append(f"  device {t.dst_device} <- device {t.src_device}: replicated bytes "
                         f"[{t.offset_bytes}, {t.offset_bytes + t.size_bytes})")
        for m in self.expert_moves:
            lines.append(f"  device {m.dst_device} <- device {m.src_device}: expert {m.expert}")
        kept = self.kept
        for d in self.target_devices:
            new = self.new_placement.experts_on(d)
            lines.append(f"  device {d}: keeps {len(kept[d])}, holds {len(new)} experts [{_ranges(new)}]")
        for d in self.removed_devices:
            lines.append(f"  device {d}: removed after sending")
        return "\n".join(lines)


# -- public functions ------------------------------------------------------------------------

def initial_placement(num_experts: int, devices: Sequence[int],
                      copies_per_expert: int | Sequence[int] = 1) -> Placement:
    """Balanced contiguous blocks: copy k of expert e is slot k*num_experts + e, and the devices
    (ascending) take consecutive runs of slots, the first ones one slot more.

    With one copy this is the coordinator's `contiguous_placement`, keyed by device id.
    `copies_per_expert`: one int for every expert, or one per expert; when they differ, the
    first copies are the contiguous blocks of one copy each and the extra copies are added the
    way `plan_placement` would add them (balanced, no expert twice on a device).
    """
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts!r}; expected an int >= 1")
    devs = _check_devices("devices", devices)
    wanted = _check_copies(copies_per_expert, num_experts, devs, "devices")
    if len(set(wanted)) > 1:
        return _solve(initial_placement(num_experts, devs), devs, wanted, None)[0]
    copies = wanted[0]
    base, extra = divmod(num_experts * copies, len(devs))
    homes: list[list[int]] = [[] for _ in range(num_experts)]
    slot = 0
    for i, d in enumerate(devs):
        for _ in range(base + (i < extra)):
            homes[slot % num_experts].append(d)  # a run is <= num_experts slots: no expert twice
            slot += 1
    return Placement(tuple(tuple(h) for h in homes))


def resize(current_devices: Sequence[int], num_devices: int, prefer: Iterable[int] = ()) -> tuple[int, ...]:
    """The default target set: scale-up adds the ids in `prefer` (lowest first; e.g. warm
    workers that are ready), then the lowest unused ids; scale-down removes the highest ids."""
    devs = _check_devices("current_devices", current_devices)
    if not _is_int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices: got {num_devices!r}; expected an int >= 1")
    preferred = sorted(d for d in set(prefer) if d not in set(devs))
    if any(not _is_int(d) or d < 0 for d in preferred):
        raise ValueError(f"prefer: got {sorted(prefer)!r}; expected device ids (ints >= 0)")
    unused = itertools.chain(preferred, (d for d in itertools.count() if d not in set(devs) | set(preferred)))
    return tuple(sorted(devs[:num_devices] + tuple(itertools.islice(unused, max(0, num_devices - len(devs))))))


def plan_placement(current: Placement, target_devices: Sequence[int],
                   copies_per_expert: int | Sequence[int] | None = None, *,
                   expert_load: Sequence[float] | None = None) -> Placement:
    """The balanced placement on `target_devices` that moves the fewest expert copies.

    `copies_per_expert`: one int for every expert, or one per expert (e.g. from `hot_copies`);
    default: each expert keeps its current number. `expert_load` (one non-negative number per
    expert, e.g. tokens routed) breaks ties between move-minimal placements towards even load.
    """
    return _solve(current, _check_devices("target_devices", target_devices), copies_per_expert, expert_load)[0]


def plan(current: Placement, current_devices: Sequence[int], target_devices: Sequence[int], *,
         replicated_bytes: int, expert_bytes: int, copies_per_expert: int | Sequence[int] | None = None,
         expert_load: Sequence[float] | None = None) -> Plan:
    """The full reconfiguration plan from `current_devices` to `target_devices`.

    `replicated_bytes`: what every device holds (attention, embeddings, norms, shared experts);
    `expert_bytes`: one routed expert across all MoE layers.
    """
    src = _check_devices("current_devices", current_devices)
    dst = _check_devices("target_devices", target_devices)
    _check_size("replicated_bytes", replicated_bytes)
    _check_size("expert_bytes", expert_bytes)
    outside = [d for d in current.devices if d not in set(src)]
    if outside:
        e = next(e for e, devs in enumerate(current.homes) if outside[0] in devs)
        raise ValueError(f"current: expert {e} is on device {outside[0]}, which is not in current_devices "
                         f"{list(src)}; expected every holder to be a current device")
    new, moves = _solve(current, dst, copies_per_expert, expert_load)
    removed = tuple(d for d in src if d not in set(dst))
    added = tuple(d for d in dst if d not in set(src))
    return Plan(source_devices=src, target_devices=dst, added_devices=added, removed_devices=removed,
                old_placement=current, new_placement=new, expert_moves=moves,
                replicated_transfers=_replicated_slices(src, removed, added, replicated_bytes),
                replicated_bytes=replicated_bytes, expert_bytes=expert_bytes)


# -- validation --------------------------------------------------------------------------------

def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_id(field: str, d: object) -> None:
    if not _is_int(d):
        raise TypeError(f"{field}: device id {d!r} is a {type(d).__name__}; expected an int")
    if d < 0:
        raise ValueError(f"{field}: device id {d} is negative; expected ids >= 0")


def _check_devices(field: str, devices: Sequence[int]) -> tuple[int, ...]:
    ids = list(devices)
    if not ids:
        raise ValueError(f"{field}: empty; expected at least one device id")
    for d in ids:
        _check_id(field, d)
    dup = sorted(d for d, k in collections.Counter(ids).items() if k > 1)
    if dup:
        raise ValueError(f"{field}: device ids {dup} appear more than once; expected each device once")
    return tuple(sorted(ids))


def _check_size(field: str, value: object) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{field}: got {value!r}; expected an int number of bytes >= 0")


def _check_copies(copies: object, num_experts: int, targets: tuple[int, ...], field: str) -> list[int]:
    """One int for every expert, or one per expert -> the copies of each expert."""
    if _is_int(copies):
        each, name = [copies] * num_experts, "copies_per_expert"
    elif isinstance(copies, Sequence) and not isinstance(copies, (str, bytes)):
        each, name = list(copies), None
        if len(each) != num_experts:
            raise ValueError(f"copies_per_expert: got {len(each)} values; expected one int, or one per expert "
                             f"({num_experts})")
    else:
        raise ValueError(f"copies_per_expert: got {copies!r}; expected an int >= 1 or one per expert")
    for e, c in enumerate(each):
        name_e = name or f"copies_per_expert[{e}]"
        if not _is_int(c) or c < 1:
            raise ValueError(f"{name_e}: got {c!r}; expected an int >= 1")
        if c > len(targets):
            raise ValueError(f"{name_e}: got {c} for {len(targets)} devices in {field}; "
                             f"expected at most one copy per device (<= {len(targets)})")
    if len(targets) > sum(each):
        raise ValueError(f"{field}: got {len(targets)} devices for {num_experts} experts with {sum(each)} copies; "
                         f"expected at most {sum(each)}, so that every device holds an expert")
    return each


def _check_load(load: Sequence[float] | None, num_experts: int) -> list[float] | None:
    if load is None:
        return None
    out = list(load)
    if len(out) != num_experts:
        raise ValueError(f"expert_load: got {len(out)} values; expected one per expert ({num_experts})")
    for e, x in enumerate(out):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"expert_load[{e}]: got {x!r}; expected a finite number >= 0")
    return [float(x) for x in out]


# -- placement ---------------------------------------------------------------------------------

def _solve(current: Placement, targets: tuple[int, ...], copies_per_expert: int | Sequence[int] | None,
           expert_load: Sequence[float] | None) -> tuple[Placement, tuple[ExpertMove, ...]]:
    """The new placement and the moves that build it, by (dst_device, expert)."""
    num = current.num_experts
    copies = _check_copies(current.copy_counts if copies_per_expert is None else copies_per_expert,
                           num, targets, "target_devices")
    load = _check_load(expert_load, num)
    base, extra = divmod(sum(copies), len(targets))
    kept = _greedy_keep(current.homes, targets, copies, base, extra, load)
    final = _complete(current.homes, targets, copies, base, extra, kept)
    units = [(e, d) for e in range(num) for d in final[e] if d not in current.homes[e]]
    removed = set(current.devices) - set(targets)
    moves = _spread(current.homes, final, units, _choose_sources(current.homes, units, removed), load, copies)
    homes = [[d for d in devs if d in current.homes[e]] for e, devs in enumerate(final)]
    for m in moves:
        homes[m.expert].append(m.dst_device)
    return Placement(tuple(tuple(h) for h in homes)), moves


def _greedy_keep(homes, targets, copies, base, extra, load):
    """A good keep-set to start the flow from: per expert at most `copies[e]` current homes, per
    device at most its quota, the ceil going to the fullest devices. kept[e] = list of devices."""
    tset = set(targets)
    cur = {d: 0 for d in targets}
    keep = [[d for d in devs if d in tset] for devs in homes]
    for devs in keep:
        for d in devs:
            cur[d] += 1
    for e, devs in enumerate(keep):  # fewer copies than now: give up the copy on the fullest device
        while len(devs) > copies[e]:
            d = max(devs, key=lambda d: (cur[d], d))
            devs.remove(d)
            cur[d] -= 1
    ceil = set(sorted(targets, key=lambda d: (-cur[d], d))[:extra])
    on: dict[int, list[int]] = {d: [] for d in targets}
    for e, devs in enumerate(keep):
        for d in devs:
            on[d].append(e)
    dropped = [0] * len(homes)
    for d in targets:
        over = len(on[d]) - base - (d in ceil)
        if over <= 0:
            continue
        if load is None:  # spread drops over experts (copies > 1), then drop the highest ids
            drops = sorted(on[d], key=lambda e: (dropped[e], -e))[:over]
        else:
            drops = _drops_for_load(on[d], over, load, copies, (base + (d in ceil)) * sum(load) / sum(copies))
        for e in drops:
            keep[e].remove(d)
            dropped[e] += 1
    return keep


def _drops_for_load(experts, over, load, copies, fair):
    """Which `over` experts leave a full device so that what stays is near its `fair` load
    (an expert's load is shared by its `copies[e]` copies)."""
    left = sorted(experts)
    now = sum(load[e] / copies[e] for e in left)
    drops = []
    for r in range(over, 0, -1):
        want = (now - fair) / r
        e = min(left, key=lambda e: (abs(load[e] / copies[e] - want), -e))
        left.remove(e)
        drops.append(e)
        now -= load[e] / copies[e]
    return drops


def _complete(homes, targets, copies, base, extra, kept):
    """Min-cost flow: source -> expert (cap copies[e]) -> device (cap 1; cost 0 where it holds
    the expert now, else 1) -> sink (cap base) or -> hub (cap 1) -> sink (cap extra). Total
    capacity into the sink is exactly the sum of copies, so a full flow is a balanced placement, and the
    cheapest full flow moves the fewest copies. The greedy keep-set is preloaded: it costs 0,
    so it is a cheapest flow of its size and successive shortest paths stay exact from it."""
    num, n = len(homes), len(targets)
    src, hub, sink = num + n, num + n + 1, num + n + 2
    g = flow.Graph(num + n + 3)
    dev_node = {d: num + i for i, d in enumerate(targets)}
    pair, count = {}, dict.fromkeys(targets, 0)
    for e in range(num):
        g.add(src, e, copies[e], 0, flow=len(kept[e]))
        for d in targets:
            pair[e, d] = g.add(e, dev_node[d], 1, 0 if d in homes[e] else 1, flow=int(d in kept[e]))
            count[d] += d in kept[e]
    for d in targets:  # (add asserts that the keep-set fits: <= base + 1 each, <= extra at base + 1)
        g.add(dev_node[d], sink, base, 0, flow=min(count[d], base))
        g.add(dev_node[d], hub, 1, 0, flow=int(count[d] > base))
    g.add(hub, sink, extra, 0, flow=sum(count[d] > base for d in targets))
    need = sum(copies) - sum(len(k) for k in kept)
    g.min_cost_flow(src, sink, need)
    final = [[d for d in targets if g.cap[pair[e, d]] == 0] for e in range(num)]
    assert all(len(devs) == c for devs, c in zip(final, copies))
    return final


def _spread(homes, final, units, srcs, load, copies) -> tuple[ExpertMove, ...]:
    """Re-deal the added copies (with their senders) over the devices that gain them, same
    count per device, so the move count and each sender's share stay as they are. Without
    `expert_load`, senders take turns and each copy goes to the first device where its sender
    is below its fair share of that device's intake, so each gaining device draws from all
    senders alike; with it, heaviest copy first to the least loaded gaining device. A copy that
    no device with room may take (its expert is on all of them) swaps with a dealt one; failing
    that, the flow's own assignment stands."""
    flow_moves = tuple(sorted((ExpertMove(e, s, d) for (e, d), s in zip(units, srcs)),
                              key=lambda m: (m.dst_device, m.expert)))
    if not units:
        return flow_moves
    free: dict[int, int] = {}
    for _, d in units:
        free[d] = free.get(d, 0) + 1
    has = [set(devs) & set(homes[e]) for e, devs in enumerate(final)]  # what each expert keeps
    share: dict[tuple[int, int], float] = {}  # (sender, device) -> copies still due, fairly
    dev_load: dict[int, float] = {}
    if load is None:  # senders take turns, so none finds only the last devices left
        by_src: dict[int, list[int]] = {}
        for (e, _), s in sorted(zip(units, srcs), key=lambda u: (u[1], u[0][0])):
            by_src.setdefault(s, []).append(e)
        order = [(by_src[s][k], s) for k in range(max(map(len, by_src.values()))) for s in sorted(by_src)
                 if k < len(by_src[s])]
        share = {(s, d): len(by_src[s]) * free[d] / len(units) for s in by_src for d in free}
    else:
        order = sorted(((e, s) for (e, _), s in zip(units, srcs)), key=lambda u: (-load[u[0]], u[0], u[1]))
        dev_load = {d: sum(load[e] / copies[e] for e in range(len(homes)) if d in has[e]) for d in free}

    def better(s: int, d: int) -> tuple:
        return (share[s, d] <= 0, d) if load is None else (dev_load[d], d)

    def take(m: ExpertMove, sign: int) -> None:
        free[m.dst_device] -= sign
        if load is None:
            share[m.src_device, m.dst_device] -= sign
        else:
            dev_load[m.dst_device] += sign * load[m.expert] / copies[m.expert]
        (has[m.expert].add if sign > 0 else has[m.expert].discard)(m.dst_device)

    moves: list[ExpertMove] = []
    for e, s in order:
        options = [d for d in sorted(free) if free[d] and d not in has[e]]
        if not options:  # swap with a dealt copy: it goes to a device left, this one takes its place
            swap = next(((i, d) for d in sorted(free) if free[d] for i, m in enumerate(moves)
                         if d not in has[m.expert] and m.dst_device not in has[e]), None)
            if swap is None:
                return flow_moves
            i, d = swap
            take(moves[i], -1)
            options = [moves[i].dst_device]
            moves[i] = ExpertMove(expert=moves[i].expert, src_device=moves[i].src_device, dst_device=d)
            take(moves[i], 1)
        m = ExpertMove(expert=e, src_device=s, dst_device=min(options, key=lambda d: better(s, d)))
        take(m, 1)
        moves.append(m)
    return tuple(sorted(moves, key=lambda m: (m.dst_device, m.expert)))


# -- transfers ---------------------------------------------------------------------------------

def _choose_sources(homes, units, removed: set[int]) -> list[int]:
    """Each added copy comes from a current holder. Greedy first (the holder that has sent
    least, then one that stays, then the lowest id), then shift copies along holder chains
    while the busiest sender can hand one to a sender with two fewer: a load-balancing
    semi-matching with no such path left sends as evenly as the holders allow (Harvey et al.,
    2003; all experts have one size, so copies count bytes)."""
    sent: dict[int, int] = {}
    src = []
    for e, _ in units:
        s = min(homes[e], key=lambda s: (sent.get(s, 0), s in removed, s))
        sent[s] = sent.get(s, 0) + 1
        src.append(s)
    while True:
        by_src: dict[int, list[int]] = {}
        for i, s in enumerate(src):
            by_src.setdefault(s, []).append(i)
        for start in sorted(by_src, key=lambda s: (-sent[s], s)):
            parent: dict[int, tuple[int, int]] = {start: (-1, -1)}  # device -> (previous device, unit)
            queue, end = [start], None
            for x in queue:
                for i in by_src.get(x, ()):
                    for y in homes[units[i][0]]:
                        if y not in parent:
                            parent[y] = (x, i)
                            queue.append(y)
                            if sent.get(y, 0) <= sent[start] - 2 and end is None:
                                end = y
                if end is not None:
                    break
            if end is not None:
                break
        else:
            break
        sent[start] -= 1
        sent[end] = sent.get(end, 0) + 1
        y = end
        while y != start:
            x, i = parent[y]
            src[i] = y
            y = x
    return src


def _replicated_slices(src: tuple[int, ...], removed: tuple[int, ...], added: tuple[int, ...],
                       total_bytes: int) -> tuple[SliceTransfer, ...]:
    """Each added device gets [0, total_bytes) in one slice per live sender (the staying devices,
    or all current ones when none stays), in units of ALIGNMENT_BYTES, the last slice taking the
    remainder; new device j starts its rotation at sender j so the first slices spread out."""
    senders = [d for d in src if d not in set(removed)] or list(src)
    k = len(senders)
    units, rem = divmod(total_bytes, ALIGNMENT_BYTES)
    per, extra = divmod(units, k)
    sizes = [(per + (i < extra)) * ALIGNMENT_BYTES for i in range(k)]
    sizes[-1] += rem  # extra < k, so the last slice is never one of the larger ones
    out = []
    for j, dst in enumerate(added):
        offset = 0
        for i, size in enumerate(sizes):
            if size:
                out.append(SliceTransfer(dst_device=dst, src_device=senders[(i + j) % k],
                                         offset_bytes=offset, size_bytes=size))
            offset += size
    return tuple(out)


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for x in ids:
        if runs and runs[-1][-1] == x - 1:
            runs[-1][1:] = [x]  # [first, last]
        else:
            runs.append([x])
    return ", ".join("-".join(map(str, r)) for r in runs)
