"""A restarted coordinator adopts the workers of the one that died: from what each worker says
it holds (`wire.HMMRejoin`), the configuration they served, or why they cannot serve together.

Why it exists: the workers (HMMs) outlive a coordinator that is killed, with their weights and
KV pool; a new coordinator started with the same command learns the configuration from them
instead of from its own memory (gone) or the checkpoint (maybe gone too). What they say must
agree (one configuration, every one of its devices, the same model and memory layout, every
expert held) before anything runs on it; this module decides that, and nothing else.

Pure: no I/O, no clock, no threads. The coordinator (`instance.coordinator`) collects the
messages and executes the result (fresh executors on the adopted memory).

Not decided here: a configuration with a device missing is refused (not recovered onto the
others: the restarted coordinator does not know why the device is gone); workers holding
nothing are the coordinator's warm pool, not part of the adoption.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from elasticmoe_worker import hotcopies, planner
from elasticmoe_worker.contract import wire


class Refused(ValueError):
    """The rejoined workers cannot serve together; the message says why, naming devices."""


@dataclasses.dataclass(frozen=True)
class Adoption:
    config_id: int  # the configuration the workers held
    next_config_id: int  # the first id the new coordinator may use (above every id a worker has seen)
    devices: tuple[int, ...]  # ascending: rank r runs on devices[r]
    placement: planner.Placement
    hmm_ready: Mapping[int, wire.HMMReady]
    config_json: str
    tokenizer_files: Mapping[str, str]
    # more experts hold a second copy than this coordinator's budget fits, in words ("" when not);
    # adopted anyway (the memory is held already), and the next scale or recovery drops the excess
    over_budget: str = ""


def missing(rejoins: Mapping[int, wire.HMMRejoin]) -> str | None:
    """None when the rejoined workers make up a whole configuration (all its devices); else what
    is still missing, in words (the coordinator waits, and names it if it never comes)."""
    if not rejoins:
        return "no worker holding memory has rejoined"
    by_config: dict[int, list[int]] = {}
    for d, r in rejoins.items():
        by_config.setdefault(r.config_id, []).append(d)
    newest = max(by_config)
    if newest == 0:
        return (f"device(s) {sorted(by_config[0])} hold memory no configuration ever served from (their "
                f"coordinator died while they loaded it); they exit after their orphan timeout")
    sizes = {rejoins[d].world_size for d in by_config[newest]}
    have = len(by_config[newest])
    want = max(sizes)
    if want <= 0 or have < want:
        return (f"configuration {newest} ran on {want if want > 0 else 'an unknown number of'} device(s); "
                f"only device(s) {sorted(by_config[newest])} rejoined")
    return None


def adopt(rejoins: Mapping[int, wire.HMMRejoin], *, num_experts: int, expert_copies: int,
          model_config_json: str | None = None, redundant_budget_bytes: int | None = None) -> Adoption:
    """The configuration the rejoined workers served. Raises `Refused` when their holdings do not
    agree: different configurations, a device missing or extra, different models or memory
    layouts, an expert of the model's `num_experts` nobody holds, or copies other than `expert_copies` (fewer when there are
    fewer devices) wants. With a `redundant_budget_bytes` per device only some experts need the
    extra copies: experts holding 1 or `expert_copies` are accepted (which ones is the dead
    coordinator's choice by load; the next scale or recovery chooses again), and more of them than
    the budget fits is said in `Adoption.over_budget`, not refused: the start-up's choice divides
    the budget by an estimate of an expert's size, which page padding can exceed, and refusing
    would leave the workers' memory unserved. `model_config_json`: the checkpoint's config.json
    when the coordinator could read it (the workers must hold that model)."""
    if not rejoins:
        raise Refused("no worker holding memory rejoined")
    configs = {d: r.config_id for d, r in sorted(rejoins.items())}
    if len(set(configs.values())) > 1:
        raise Refused(f"the rejoined workers hold different configurations (device: configuration): {configs}; "
                      f"a coordinator died during a scale's switch")
    gap = missing(rejoins)
    if gap is not None:
        raise Refused(gap)
    devices = tuple(sorted(rejoins))
    config_id = configs[devices[0]]
    world = len(devices)
    for rank, d in enumerate(devices):
        r = rejoins[d]
        if r.device_index != d:
            raise Refused(f"device {d}: its rejoin names device {r.device_index}")
        if (r.rank, r.world_size) != (rank, world):
            raise Refused(f"device {d}: rank {r.rank} of {r.world_size} in configuration {config_id}; expected rank "
                          f"{rank} of {world} (devices {list(devices)}, ascending)")
    first = rejoins[devices[0]]
    for d in devices[1:]:
        r = rejoins[d]
        for what, mine, theirs in (
                ("model config.json", r.config_json, first.config_json),
                ("replicated tensors' layout", r.ready.replicated_layout, first.ready.replicated_layout),
                ("replicated bytes", r.ready.replicated.size_bytes, first.ready.replicated.size_bytes),
                ("KV blocks", r.ready.num_kv_blocks, first.ready.num_kv_blocks),
                ("KV bytes", r.ready.kv.size_bytes, first.ready.kv.size_bytes)):
            if mine != theirs:
                raise Refused(f"device {d} and device {devices[0]} disagree on the {what}"
                              + (f" ({mine} vs {theirs})" if isinstance(mine, int) else ""))
    if model_config_json is not None and first.config_json != model_config_json:
        raise Refused("the rejoined workers hold another model than the checkpoint's config.json says")
    homes: dict[int, list[int]] = {}
    for d in devices:
        for e in rejoins[d].expert_ids:
            homes.setdefault(e, []).append(d)
    absent = [e for e in range(num_experts) if e not in homes]
    if absent:
        raise Refused(f"expert(s) {absent} are held by no rejoined device")
    unknown = sorted(e for e in homes if not 0 <= e < num_experts)
    if unknown:
        raise Refused(f"expert id(s) {unknown} held, but the model has {num_experts} routed experts")
    try:
        placement = planner.Placement(tuple(tuple(homes[e]) for e in range(num_experts)))
    except ValueError as exc:
        raise Refused(f"the rejoined workers' experts are no placement: {exc}") from exc
    want = max(1, min(expert_copies, world))
    over_budget = ""
    if redundant_budget_bytes is None and not (placement.uniform and placement.copies_per_expert == want):
        held = (f"{placement.copies_per_expert} copies" if placement.uniform else
                f"{min(placement.copy_counts)} to {placement.copies_per_expert} copies (several: experts "
                f"{list(placement.redundant_experts)})")
        raise Refused(f"the rejoined workers hold {held} of each expert; this coordinator's "
                      f"expert_copies={expert_copies} wants {want} on {world} device(s)")
    if redundant_budget_bytes is not None:
        regions = first.ready.experts  # (a device of a balanced placement holds at least one expert)
        expert_bytes = sum(r.w13.size_bytes + r.w2.size_bytes for r in regions
                           if r.expert_id == regions[0].expert_id) if regions else 0
        fits = hotcopies.redundant_within(num_experts, world, redundant_budget_bytes, expert_bytes * (want - 1))
        odd = [e for e in range(num_experts) if placement.copies(e) not in (1, want)]
        if odd:
            raise Refused(f"the rejoined workers hold experts {odd} in neither 1 nor {want} copies; this "
                          f"coordinator's expert_copies={expert_copies} wants 1 or {want} on {world} device(s)")
        if len(placement.redundant_experts) > fits:
            over_budget = (f"the rejoined workers hold {len(placement.redundant_experts)} experts in {want} copies; "
                           f"this coordinator's budget of {redundant_budget_bytes} B per device on {world} "
                           f"device(s) fits {fits}")
    return Adoption(config_id=config_id, next_config_id=max(r.last_config_id for r in rejoins.values()) + 1,
                    devices=devices, placement=placement, hmm_ready={d: rejoins[d].ready for d in devices},
                    config_json=first.config_json, tokenizer_files=dict(first.tokenizer_files),
                    over_budget=over_budget)
