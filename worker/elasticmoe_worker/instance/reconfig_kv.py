"""Who adopts each sequence handed over in a switch, and where the KV blocks of a departing
device's sequences go: pure functions `reconfig` calls.

Sequences of a staying device stay there (their KV in place). Those of a departing device go to
the least loaded new device; without their KV that device recomputes prompt + generated tokens,
so `plan` has their blocks copied peer to peer (HMM to HMM, `instance.kv_transfer`) into free
blocks of the adopter's pool while admission is paused, and the adopter continues them as if they
had always been there. `reconfig` calls `plan` once every old rank has handed over.

Which blocks are free on the adopter is known without asking it: the new executor has adopted
nothing yet (the commit comes after the copy), and the pool's only users are the sequences its
device's old executor handed over (kept in place). So the free blocks are the pool minus those.

Not guaranteed: a sequence whose blocks do not fit in the adopter's free blocks, or that has
none yet (it never ran), is not in the plan: it is recomputed as before. Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import msgspec

from elasticmoe_worker.contract import wire

_ByDevice = dict[int, list[wire.SequenceState]]


def distribute(handed: Mapping[int, tuple[wire.SequenceState, ...]], new_devices: tuple[int, ...],
               counts: dict[int, int]) -> tuple[_ByDevice, _ByDevice]:
    """`handed`: device -> its sequences; `counts`: device -> sequences it has already. -> (kept:
    adopted on the same device, KV in place; moved: sequences of departing devices, each to the
    least loaded new device), by device. NOTE: one request, one adopter, even when two handovers list it."""
    kept: dict[int, list[wire.SequenceState]] = {d: [] for d in new_devices}
    moved: dict[int, list[wire.SequenceState]] = {d: [] for d in new_devices}
    seen: set[str] = set()
    staying = [r for r in sorted(handed) if r in kept]
    departing = [r for r in sorted(handed) if r not in kept]
    for dev in staying + departing:
        for st in handed[dev]:
            if st.request_id in seen:
                continue
            seen.add(st.request_id)
            if dev in kept:
                kept[dev].append(st)
                d = dev
            else:
                d = min(new_devices, key=lambda x: (counts.get(x, 0), x))
                moved[d].append(st)
            counts[d] = counts.get(d, 0) + 1
    return kept, moved


@dataclasses.dataclass(frozen=True)
class Plan:
    copies: tuple[wire.KVCopy, ...]  # one per (departing device, adopting device) pair with blocks to move
    # adopting device -> its sequences as they continue there (block ids of ITS pool)
    moved: Mapping[int, tuple[wire.SequenceState, ...]]
    # adopting device -> the same sequences as handed over (what it recomputes when the copy fails)
    handed: Mapping[int, tuple[wire.SequenceState, ...]]

    @property
    def devices(self) -> tuple[int, ...]:
        """Every device that sends or receives, ascending (the KV group's rank order)."""
        return tuple(sorted({c.src for c in self.copies} | {c.dst for c in self.copies}))

    @property
    def request_ids(self) -> frozenset[str]:
        return frozenset(st.request_id for sts in self.moved.values() for st in sts)

    @property
    def num_sequences(self) -> int:
        return sum(len(sts) for sts in self.moved.values())

    @property
    def num_blocks(self) -> int:
        return sum(len(c.src_blocks) for c in self.copies)

    def messages(self, config_id: int, view_block_bytes: Sequence[int], timeout_s: float) -> dict[int, wire.MoveKV]:
        """device -> what its HMM is told to do."""
        group = list(self.devices)
        return {d: wire.MoveKV(config_id=config_id, rank=r, group_ranks=group, copies=list(self.copies),
                               view_block_bytes=list(view_block_bytes), timeout_s=timeout_s)
                for r, d in enumerate(group)}


def plan(handed: Mapping[int, tuple[wire.SequenceState, ...]], moved: Mapping[int, list[wire.SequenceState]],
         num_blocks: int, unavailable: frozenset[int] = frozenset()) -> Plan:
    """`handed`: device -> the sequences its old executor handed over (its pool's used blocks);
    `moved`: adopting device -> the sequences of departing devices it adopts (`distribute`);
    `num_blocks`: blocks in each device's pool; `unavailable`: devices nothing can be copied
    from (they died after handing over). Sequences are taken in the order given; each gets
    the lowest free blocks of its adopter, as many as it holds now."""
    source = {}
    for d in sorted(handed):
        for st in handed[d]:
            source.setdefault(st.request_id, d)
    pairs: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    out: dict[int, tuple[wire.SequenceState, ...]] = {}
    before: dict[int, tuple[wire.SequenceState, ...]] = {}
    for dst in sorted(moved):
        used = {b for st in handed.get(dst, ()) for b in st.block_ids}
        free = [b for b in range(num_blocks) if b not in used]
        for st in moved[dst]:
            src = source.get(st.request_id)
            n = len(st.block_ids)
            if src is None or src == dst or src in unavailable or n == 0 or n > len(free):
                continue  # nothing computed yet, its device is gone, or no room: recomputed
            new, free = free[:n], free[n:]
            src_blocks, dst_blocks = pairs.setdefault((src, dst), ([], []))
            src_blocks += st.block_ids
            dst_blocks += new
            out[dst] = out.get(dst, ()) + (msgspec.structs.replace(st, block_ids=new),)
            before[dst] = before.get(dst, ()) + (st,)
    copies = tuple(wire.KVCopy(src=s, dst=d, src_blocks=sb, dst_blocks=db)
                   for (s, d), (sb, db) in sorted(pairs.items()))
    return Plan(copies=copies, moved=out, handed=before)


def adoptions(handed: Mapping[int, tuple[wire.SequenceState, ...]], new_devices: tuple[int, ...], kv: Plan | None,
              copied: bool) -> tuple[_ByDevice, _ByDevice]:
    """At the commit: (device -> sequences it adopts with their KV in its pool, device -> sequences
    it recomputes). The sequences of `kv` go where it placed them, with their new blocks when
    `copied`, else as handed over (recomputed); the others (handed over during the copy too) are
    placed by `distribute`."""
    if kv is None:
        return distribute(handed, new_devices, {})
    rest = {d: tuple(st for st in sts if st.request_id not in kv.request_ids) for d, sts in handed.items()}
    kept, moved = distribute(rest, new_devices, {d: len(sts) for d, sts in kv.moved.items()})
    for d in kv.moved:
        if copied:
            kept[d] += kv.moved[d]
        else:
            moved[d] = list(kv.handed[d]) + moved[d]
    return kept, moved
