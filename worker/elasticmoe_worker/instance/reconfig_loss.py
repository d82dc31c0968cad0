"""Planning the reconfiguration after a device is lost, and which rank computes which expert.

Why it exists: a scale has every current device alive to send what it holds; after a loss the
lost device's memory is gone. `plan_recovery` asks the planner for the move-minimal balanced
placement on the survivors (the same one a scale-down to them would get), then re-sources
every copy the planner would take from a lost device: from a surviving redundant copy when
one exists (`--expert-copies 2`; with a memory budget only the hottest experts have one), else
from the checkpoint, read by the copy's new home (only those experts). `reconfig` turns the
result into the transitions it sends the survivors.

`owner_ranks` decides which holder of an expert computes it when there are several copies: the
holder that computes fewest so far, so redundant copies do not pile the work on low device ids.

Pure: no I/O, no clock. Not guaranteed: the sources are balanced greedily (fewest sent first),
not optimally; an expert with no surviving copy is read from the checkpoint once per new home.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import msgspec

from elasticmoe_worker import planner


@dataclasses.dataclass(frozen=True)
class Recovery:
    survivors: tuple[int, ...]
    plan: planner.Plan  # its expert moves all come from surviving holders
    from_checkpoint: Mapping[int, tuple[int, ...]]  # device -> experts it reads from the checkpoint
    copies_per_expert: int  # the most copies any expert has after the recovery

    @property
    def checkpoint_experts(self) -> tuple[int, ...]:
        """Experts no survivor held: only the checkpoint has them."""
        return tuple(sorted({e for es in self.from_checkpoint.values() for e in es}))

    def describe(self) -> str:
        lost = sorted(set(self.plan.source_devices) - set(self.survivors))
        lines = [f"recovery from the loss of device(s) {lost}: {len(self.survivors)} survivor(s) {list(self.survivors)}, "
                 f"{len(self.plan.expert_moves)} expert copies from surviving peers, "
                 f"{sum(map(len, self.from_checkpoint.values()))} read from the checkpoint"]
        lines += [f"  device {m.dst_device} <- device {m.src_device}: expert {m.expert}" for m in self.plan.expert_moves]
        lines += [f"  device {d} <- checkpoint: experts {list(es)}" for d, es in sorted(self.from_checkpoint.items())]
        return "\n".join(lines)


def plan_recovery(placement: planner.Placement, devices: Sequence[int], lost: Sequence[int], *,
                  copies_per_expert: int | Sequence[int], replicated_bytes: int, expert_bytes: int,
                  expert_load: Sequence[float] | None = None) -> Recovery:
    """The configuration of the devices that survive `lost`. Raises ValueError when none does.

    `copies_per_expert`: one int for every expert, or one per expert, each capped at the number
    of survivors (a copy per device at most). `expert_load`: as for `planner.plan`."""
    lost_set = set(lost)
    survivors = tuple(d for d in sorted(devices) if d not in lost_set)
    if not survivors:
        raise ValueError(f"lost: {sorted(lost_set)} are all the devices {sorted(devices)}; expected a survivor")
    each = [copies_per_expert] * placement.num_experts if isinstance(copies_per_expert, int) else copies_per_expert
    copies = [max(1, min(c, len(survivors))) for c in each]
    base = planner.plan(placement, devices, survivors, replicated_bytes=replicated_bytes, expert_bytes=expert_bytes,
                        copies_per_expert=copies, expert_load=expert_load)
    assert not base.replicated_transfers, "nothing is added after a loss"
    sent = {d: 0 for d in survivors}
    moves = [m for m in base.expert_moves if m.src_device not in lost_set]
    for m in moves:
        sent[m.src_device] += 1
    from_checkpoint: dict[int, list[int]] = {}
    for m in base.expert_moves:
        if m.src_device not in lost_set:
            continue
        live = [d for d in placement.homes[m.expert] if d not in lost_set]
        if live:
            src = min(live, key=lambda d: (sent[d], d))
            sent[src] += 1
            moves.append(planner.ExpertMove(expert=m.expert, src_device=src, dst_device=m.dst_device))
        else:
            from_checkpoint.setdefault(m.dst_device, []).append(m.expert)
    moves.sort(key=lambda m: (m.dst_device, m.expert))
    plan = msgspec.structs.replace(base, expert_moves=tuple(moves))
    return Recovery(survivors, plan, {d: tuple(sorted(es)) for d, es in sorted(from_checkpoint.items())},
                    plan.new_placement.copies_per_expert)


def owner_ranks(placement: planner.Placement, devices: Sequence[int]) -> list[int]:
    """Expert id -> the rank (position in `devices`) that computes it: of the expert's holders,
    the one that computes fewest so far (then the lowest id). With one copy: its only holder."""
    rank = {d: r for r, d in enumerate(devices)}
    computes = {d: 0 for d in devices}
    out = []
    for homes in placement.homes:
        d = min(homes, key=lambda x: (computes[x], x))
        computes[d] += 1
        out.append(rank[d])
    return out
