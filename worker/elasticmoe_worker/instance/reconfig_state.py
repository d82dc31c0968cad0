"""The state of `reconfig.step`: facts fixed for the instance's life, the serving
configuration, the scale or recovery in progress, and the small pure helpers both the machine
and its shell use (owner lists, executor start messages, destination names).

Why it is apart: `reconfig` holds the decisions, `reconfig_events` the events and actions, this
module the records they change. Pure: no I/O, no clock, no threads. `reconfig` re-exports every
name, so callers write `reconfig.State`, `reconfig.initial`.

Devices and ranks: a configuration runs on `devices` (ascending ids, not always 0..n-1: a lost
device leaves a gap); rank r of its collective group runs on `devices[r]`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import msgspec

from elasticmoe_worker import hotcopies, planner
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.instance import reconfig_kv, reconfig_loss
from elasticmoe_worker.instance.reconfig_events import Send

WORKERS, TRANSFER, STANDBY, SWITCH = "workers", "transfer", "standby_start", "switch"
STAGES = (WORKERS, TRANSFER, STANDBY, SWITCH)


# -- facts fixed for the instance's life --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Facts:
    """What planning and the messages need; learned at start-up from device 0's memory."""

    num_experts: int
    replicated_bytes: int
    replicated_layout: tuple[wire.TensorSlot, ...]
    expert_w13_bytes: int
    expert_w2_bytes: int
    moe_layers: tuple[int, ...]
    num_kv_blocks: int
    kv_bytes: int
    kv_view_block_bytes: tuple[int, ...]  # bytes of one KV block per view of a pool (`memory.kv_block_bytes`)
    config_json: str
    tokenizer_files: Mapping[str, str]
    engine: wire.EngineOptions
    model_name: str
    collective_timeout_s: float
    recovery_grace_s: float = 0.5
    expert_copies: int = 1  # wanted copies of each expert (fewer when there are fewer devices)
    model_dir: str = ""  # where a recovery reads experts no survivor holds
    recovery_timeout_s: float = 60.0  # a recovery from a lost device that takes longer gives up (Degraded)
    # per device, for the copies beyond the first (`--redundant-expert-mb`); None: no limit, every expert
    # gets `expert_copies`. With a budget only the hottest experts do (see hotcopies).
    redundant_budget_bytes: int | None = None
    # which experts are hot forgets old traffic: a routed token counts half after this long (the
    # second copies follow a workload that changes, not the first hours of the coordinator's life)
    hotness_half_life_s: float = 600.0
    # the HMMs give up a KV copy of departing devices' sequences after this long; the switch waits a little
    # longer for their answers (1.5x + 2 s), then has the sequences recomputed instead
    kv_move_timeout_s: float = 10.0
    # per device: memory each serving device keeps allocated for experts a scale-down would bring it
    # (`--scale-down-reserve-mb`; whole experts); 0: none (`scale_down_reserve_bytes`)
    scale_down_reserve_bytes: int = 0

    @property
    def expert_bytes(self) -> int:
        return (self.expert_w13_bytes + self.expert_w2_bytes) * len(self.moe_layers)


# -- state ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scale:
    scale_id: str
    target: int
    old_config: int
    new_config: int
    old_devices: tuple[int, ...]  # device ids; rank r of a configuration runs on its devices[r]
    new_devices: tuple[int, ...]
    added: tuple[int, ...]
    removed: tuple[int, ...]
    stage: str
    waiting: frozenset[int]  # devices (workers, transfer) or ranks (standby_start, switch) this stage waits for
    started: float
    stage_started: float
    deadline: float
    timeout_s: float
    record: admin.ScaleRecord
    plan: planner.Plan | None = None
    ready: Mapping[int, wire.TransitionReady] = dataclasses.field(default_factory=dict)
    delivered: Mapping[int, float] = dataclasses.field(default_factory=dict)  # device -> TransferReady.delivery_s
    handed: Mapping[int, tuple[wire.SequenceState, ...]] = dataclasses.field(default_factory=dict)
    failures: tuple[str, ...] = ()  # what went wrong after the pause: the record says Failed, whatever ends it
    broken: str = ""  # an executor of the new configuration failed after the pause: restart them after the commit
    lost: tuple[int, ...] = ()  # a recovery from these lost devices: no switch, its requests are recomputed
    checkpoint_experts: tuple[int, ...] = ()  # a recovery reads these from the checkpoint (no survivor has them)
    # ranks of the new configuration whose standby executor, started with the transfer (pre-initialised
    # while bytes move), said ready before the transfer ended
    early_ready: frozenset[int] = frozenset()
    # the departing devices' sequences whose KV blocks are being copied to their adopters (set once every old
    # rank handed over; the commit waits for the HMMs in kv_waiting, or kv_deadline)
    kv: reconfig_kv.Plan | None = None
    kv_waiting: frozenset[int] = frozenset()
    kv_deadline: float = 0.0
    kv_failed: str = ""  # why the copy failed: its sequences are recomputed
    kv_bytes: int = 0  # received by the adopters
    kv_gone: frozenset[int] = frozenset()  # departing devices that died or lost their memory after the pause
    informed: frozenset[int] = frozenset()  # ScaleRequested.informed

    @property
    def switched(self) -> bool:
        return self.stage == SWITCH


@dataclasses.dataclass(frozen=True)
class State:
    facts: Facts
    config_id: int  # the configuration that serves
    device_ids: tuple[int, ...]  # its devices, ascending: rank r runs on device_ids[r]
    placement: planner.Placement
    hmm_ready: Mapping[int, wire.HMMReady]  # device -> handles of the memory it serves from
    last_config_id: int  # ids are never reused: they prefix rendezvous keys
    warm: frozenset[int] = frozenset()  # registered workers that hold nothing yet
    scale: Scale | None = None
    paused: bool = False
    held: tuple[str, ...] = ()  # requests that arrived during the pause
    retired: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None  # (config, its devices, new devices) of the last switch
    adopted: frozenset[str] = frozenset()  # requests the serving configuration adopted: never twice
    error: str | None = None  # why the instance is unhealthy
    hmm_lost: bool = False  # a device's memory is gone: only a new worker can repair that
    recover_at: float | None = None
    recovering: frozenset[int] = frozenset()  # ranks of restarted executors not ready yet
    suspended_since: float | None = None  # when the requests in flight were suspended (executors broken)
    # routed token copies per expert, summed over every MoE layer and rank since the coordinator started
    # (empty until an executor reported any): which experts are hot, for the redundant copies
    expert_tokens: tuple[int, ...] = ()
    # the same counts decayed with facts.hotness_half_life_s as of heat_at: what picks the hottest experts
    expert_heat: tuple[float, ...] = ()
    heat_at: float | None = None

    @property
    def phase(self) -> admin.Phase:
        if self.error is not None:
            return admin.Phase.DEGRADED
        return admin.Phase.SCALING if self.scale is not None else admin.Phase.SERVING

    @property
    def devices(self) -> tuple[int, ...]:
        return self.device_ids

    @property
    def num_devices(self) -> int:
        return len(self.device_ids)


def initial(facts: Facts, config_id: int, num_devices: int, placement: planner.Placement,
            hmm_ready: Mapping[int, wire.HMMReady], warm: frozenset[int] = frozenset(),
            device_ids: tuple[int, ...] | None = None) -> State:
    """`device_ids`: default 0..num_devices-1; others when a restarted coordinator adopts a
    configuration that lost a device earlier."""
    devices = tuple(range(num_devices)) if device_ids is None else tuple(device_ids)
    assert len(devices) == num_devices and list(devices) == sorted(set(devices)), devices
    return State(facts=facts, config_id=config_id, device_ids=devices, placement=placement,
                 hmm_ready=dict(hmm_ready), last_config_id=config_id, warm=frozenset(warm))


def refuse_scale(state: State, target: object) -> tuple[str, str] | None:
    """Why a scale to `target` cannot start now -> (kind, message); kind is "invalid" (the
    caller's input) or "busy" (try later). None when it can."""
    n = state.facts.num_experts
    if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= n:
        return "invalid", (f"devices: got {target!r}, expected an integer in [1, {n}] "
                           f"(at most one device per routed expert)")
    if state.scale is not None:
        return "busy", (f"a scale {state.scale.record.from_devices} -> {state.scale.record.to_devices} "
                        f"devices is in progress")
    if state.error is not None:
        return "busy", f"instance unhealthy, not scaling: {state.error}"
    if state.suspended_since is not None:
        return "busy", "recovering from failed executors or a lost device; try again when it serves"
    if target == state.num_devices:
        return "invalid", f"devices: already {target}; nothing to do"
    return None


def owner_list(placement: planner.Placement, devices: tuple[int, ...] | None = None) -> list[int]:
    """Expert id -> the rank that computes it (one of its holders; `devices`: the
    configuration's devices, rank order; default: all holders, ascending)."""
    return reconfig_loss.owner_ranks(placement, devices if devices is not None else placement.devices)


def copies_for(facts: Facts, num_devices: int, expert_heat: tuple[float, ...] = ()) -> tuple[int, ...]:
    """Copies per expert on `num_devices` devices: `expert_copies` (one per device at most) for
    the hottest experts the redundancy budget fits (`expert_heat`: decayed routed tokens), one
    for the others; without observed load, the lowest expert ids (`hotcopies.wanted`)."""
    return hotcopies.wanted(facts.num_experts, num_devices, facts.expert_copies, facts.redundant_budget_bytes,
                            facts.expert_bytes, expert_load(expert_heat))


def warm_reserve_bytes(state: State) -> list[int]:
    """The regions a worker joining `state`'s instance at its next scale-up by one would receive
    bytes into (sizes, as `PrepareTransition` gives them): the replicated region, and `w13` and `w2`
    in every MoE layer for its share of the expert copies at one device more. A warm worker reserves
    them while it waits (`reserve.Reserve`)."""
    f, n = state.facts, state.num_devices + 1
    per_device = -(-sum(copies_for(f, n, state.expert_heat)) // n)
    return [max(f.replicated_bytes, 1)] + [b for _ in range(per_device) for _ in f.moe_layers
                                           for b in (f.expert_w13_bytes, f.expert_w2_bytes)]


def scale_down_reserve_bytes(state: State, device: int) -> list[int]:
    """The regions `device` of `state`'s configuration keeps for experts a scale-down would bring
    it (sizes, as `PrepareTransition` gives them): `w13` and `w2` in every MoE layer for as many
    whole experts as `Facts.scale_down_reserve_bytes` holds, and no more than a scale to one device
    would bring it (every expert it lacks). Every expert region has the same sizes, so a scale-down
    that brings it at most that many experts allocates none of them on the spot (4 -> 3 brings each
    of 4 devices of 16 experts 2, 4 -> 2 brings 4). The HMM keeps them (`wire.Reserve`)."""
    f, n = state.facts, state.num_devices
    if n <= 1 or f.scale_down_reserve_bytes <= 0 or f.expert_bytes <= 0:
        return []
    held = sum(1 for homes in state.placement.homes if device in homes)
    gain = min(max(0, sum(copies_for(f, 1, state.expert_heat)) - held), f.scale_down_reserve_bytes // f.expert_bytes)
    return [b for _ in range(gain) for _ in f.moe_layers for b in (f.expert_w13_bytes, f.expert_w2_bytes)]


def reserve_actions(state: State) -> list[tuple[int, wire.Reserve]]:
    """A `Reserve` for each device of `state`'s configuration; none when the budget is 0."""
    if state.facts.scale_down_reserve_bytes <= 0:
        return []
    return [(d, wire.Reserve(config_id=state.config_id, reserve_bytes=scale_down_reserve_bytes(state, d)))
            for d in state.device_ids]


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds, never negative (the scale record's durations)."""
    return max(0, round(seconds * 1000))


def end_stage(sc: Scale, now: float, **changes) -> Scale:
    """`sc` with its current stage's duration recorded and the next stage's fields (`changes`).
    Rounded on the running total, so the phases add up to duration_ms exactly."""
    phases = {**sc.record.phases_ms}
    phases[sc.stage] = ms(now - sc.started) - sum(phases.values())
    record = msgspec.structs.replace(sc.record, phases_ms=phases)
    return dataclasses.replace(sc, record=record, stage_started=now, **changes)


def device_of(devices: tuple[int, ...], rank: int) -> int:
    """The device rank `rank` ran on; a rank the configuration never had is a departing one."""
    return devices[rank] if 0 <= rank < len(devices) else -1 - rank


def adopt_actions(config_id: int, kept, moved, new_devices: tuple[int, ...]) -> tuple[list[Send], dict[str, int]]:
    """`kept`: device -> sequences whose KV is in its pool (in place, or copied there); `moved`:
    device -> sequences it recomputes."""
    actions: list[Send] = []
    ranks: dict[str, int] = {}
    for r, d in enumerate(new_devices):
        if kept[d]:
            actions.append(Send(exec_dest(config_id, r), wire.Adopt(config_id=config_id, requests=kept[d], keep_kv=True)))
        if moved[d]:
            actions.append(Send(exec_dest(config_id, r), wire.Adopt(config_id=config_id, requests=moved[d], keep_kv=False)))
        ranks.update({st.request_id: r for st in kept[d] + moved[d]})
    return actions, ranks


def hmm_commits(state: State, sc: Scale) -> list[Send]:
    """The new configuration's HMMs told it is committed; with a scale-down reserve, a `Reserve`
    follows each (`reserves`), so the commit keeps what is left of it until then."""
    keep = state.facts.scale_down_reserve_bytes > 0
    return [Send(hmm_dest(d), wire.CommitTransition(config_id=sc.new_config, keep_reserve=keep))
            for d in sc.new_devices]


def reserves(state: State, skip: tuple[int, ...] = ()) -> list[Send]:
    """Each device of `state`'s configuration (but `skip`) told its scale-down reserve."""
    return [Send(hmm_dest(d), msg) for d, msg in reserve_actions(state) if d not in skip]


def transfer_profiles(ready: Mapping[int, wire.TransitionReady],
                      delivered: Mapping[int, float] | None = None) -> list[admin.TransferProfile]:
    """Each device's part of the transfer phase as its HMM reported it, by device (the scale record's
    `transfer_devices`), with how long its `PrepareTransition` and its report took to arrive where its
    clock is the coordinator's (`delivered`: device -> seconds, -1 where not)."""
    delivered = delivered or {}
    out = []
    for d, r in sorted(ready.items()):
        total = ms(r.transfer_seconds)
        setup = min(ms(r.setup_seconds), total)
        data = min(ms(r.data_seconds), total - setup)
        known = delivered.get(d, -1.0) >= 0  # (its clock is the coordinator's)
        out.append(admin.TransferProfile(
            device=d, bytes_sent=r.bytes_sent, bytes_received=r.bytes_received, total_ms=total, setup_ms=setup,
            bytes_ms=data, peers_ms=total - setup - data, hmm_cpu_ms=ms(r.cpu_seconds),
            throttled_ms=ms(r.throttled_seconds) if r.throttled_seconds >= 0 else -1,
            told_ms=ms(r.told_seconds) if known and r.told_seconds >= 0 else -1,
            delivery_ms=ms(delivered[d]) if known else -1))
    return out


def transfer_summary(record: admin.ScaleRecord) -> str:
    """The scale's transfer in words, for its log line: how much moved and how, and the device whose
    part ended last (its message's way there, its transition, its report's way back), or ""."""
    if not record.transfer_devices:
        return ""
    last = max(record.transfer_devices, key=lambda p: max(p.told_ms, 0) + p.total_ms + max(p.delivery_ms, 0))
    told = f"told after {last.told_ms} ms, " if last.told_ms >= 0 else ""
    back = f", its report handled {last.delivery_ms} ms after it was sent" if last.delivery_ms >= 0 else ""
    return (f"; transfer: {record.bytes_transferred / 1e6:.1f} MB ({record.transport or 'nothing moved'}), the last "
            f"device to finish {last.device} ({told}its part {last.total_ms} ms: set-up {last.setup_ms}, bytes "
            f"{last.bytes_ms}, peers {last.peers_ms}{back})")


def expert_load(expert_heat: tuple[float, ...]) -> tuple[float, ...] | None:
    """The planner's `expert_load`: None until any token was routed (nothing to steer by)."""
    return expert_heat if any(expert_heat) else None


def add_heat(heat: tuple[float, ...], heat_at: float | None, tokens: tuple[int, ...], now: float,
             half_life_s: float) -> tuple[float, ...]:
    """`heat` (as of `heat_at`) decayed to `now`, plus `tokens`: each routed token counts
    0.5 ** (age / half_life_s). Reports that arrive out of order never make heat grow by decay."""
    factor = 1.0 if heat_at is None or not heat else 0.5 ** (max(0.0, now - heat_at) / half_life_s)
    base = heat or (0.0,) * len(tokens)
    return tuple(h * factor + t for h, t in zip(base, tokens))


def expert_copies_status(state: State) -> admin.ExpertCopies:
    """What `/admin/status` says of the experts' copies: held now, what they cost, the budget,
    and why fewer than all experts have the wanted copies."""
    f, p, n = state.facts, state.placement, state.num_devices
    per = max(1, min(f.expert_copies, n))
    within = hotcopies.redundant_within(f.num_experts, n, f.redundant_budget_bytes, f.expert_bytes * (per - 1))
    limited_by = ""
    if f.expert_copies > 1 and n < f.expert_copies:
        limited_by = f"devices: {n} device(s) hold at most {per} copy of each expert"
    elif f.expert_copies > 1 and within < f.num_experts:
        limited_by = (f"budget: {f.redundant_budget_bytes} B per device x {n} devices fits the second copy of "
                      f"{within} of {f.num_experts} experts ({f.expert_bytes} B each)")
    hot = bool(any(state.expert_tokens))
    return admin.ExpertCopies(
        wanted=f.expert_copies, copies_per_expert=p.copies_per_expert, bytes_per_copy=f.expert_bytes,
        redundant_bytes=(p.num_copies - p.num_experts) * f.expert_bytes,
        per_device={str(d): k for d, k in p.counts().items()}, min_copies=min(p.copy_counts),
        redundant_experts=list(p.redundant_experts), budget_bytes_per_device=f.redundant_budget_bytes,
        limited_by=limited_by,
        chosen_by=("" if not limited_by.startswith("budget") else
                   "routed tokens (the most first)" if hot else "lowest expert ids (no routed tokens counted yet)"),
        routed_tokens=list(state.expert_tokens),
        hotness=[round(h, 1) for h in state.expert_heat], hotness_half_life_s=f.hotness_half_life_s)


def start_message(facts: Facts, config_id: int, rank: int, world_size: int, owner: list[int],
                  replace: bool = True) -> wire.StartExecutor:
    return wire.StartExecutor(config_id=config_id, rank=rank, world_size=world_size, expert_owner=owner,
                              engine=facts.engine, model_name=facts.model_name,
                              collective_timeout_s=facts.collective_timeout_s, replace=replace)


def exec_dest(config_id: int, rank: int) -> str:
    return f"exec-{config_id}-{rank}"


def hmm_dest(device: int) -> str:
    return f"hmm-{device}"
