"""Every reconfiguration of an instance as a pure state machine: `step(state, event) -> (state, actions)`.

Why it exists: a scale (DESIGN §4.6) and a recovery are sequences of messages from many
processes, any of which can die, time out, arrive twice or arrive late from an attempt that was
given up. Deciding what each one means is the whole difficulty, so it lives here, apart from
sockets, threads and processes, and is unit-tested event by event (tests/worker/test_reconfig.py).
The coordinator (`instance.coordinator`) turns messages and clock ticks into events, calls
`step`, and executes the actions it gets back, in order.

A scale A -> B goes through stages:
  workers  — cold workers for the added devices start and register (warm ones are taken as they are);
  transfer — the planner's transfers run between HMMs while A serves;
  standby_start — B's executors start beside A's, on the new memory;
  switch   — admission pauses, A's executors hand over their sequences, the KV blocks of departing
             devices' sequences are copied to the devices that adopt them (`reconfig_kv`; when that
             fails they are recomputed instead), B adopts them, admission resumes on B (the commit);
             A's executors exit, departing workers are released.
A lost device (its worker died, its memory failed, or it fell silent) starts a recovery
instead: the requests in flight are suspended (the router keeps what their clients have), the
survivors' broken executors are stopped, the survivors move to the placement planned by
`reconfig_loss` (experts from surviving redundant copies, else read from the checkpoint), start
executors, and the suspended requests are recomputed there (prompt + tokens already streamed).
A recovery that fails leaves the instance Degraded with the reason.
Anything before the switch aborts back to A, which never stopped serving. After the pause there
is no way back: a rank that never hands over has its requests failed, and B serves (a standby
of B that fails after the pause is restarted, like any failed executor, once B serves).

Invariants (asserted by the tests for every event order they generate):
- exactly one configuration serves (`State.config_id`) after every step;
- every request id handed over is adopted by exactly one rank of the new configuration, and
  every request held during the pause is released, or failed when nothing can take it;
- a message of an aborted or replaced configuration never changes the state of a later one
  (every event carries its configuration id; a fresh id is used for every attempt).

Not here: which request goes to which rank in steady state (`routing`), liveness detection
(`membership`), and the wire encoding (`contract.wire`). No clock reads: time arrives in events.
"""

from __future__ import annotations

import dataclasses

import msgspec

from elasticmoe_worker import planner
from elasticmoe_worker.contract import admin, wire
from elasticmoe_worker.instance import reconfig_kv, reconfig_loss
from elasticmoe_worker.instance.reconfig_state import (  # noqa: F401 - re-exported: reconfig.X
    WORKERS, TRANSFER, STANDBY, SWITCH, STAGES, Facts, Scale, State, initial, refuse_scale, owner_list, copies_for,
    expert_load, expert_copies_status, add_heat, warm_reserve_bytes, scale_down_reserve_bytes, reserve_actions,
    start_message, exec_dest, hmm_dest, device_of, adopt_actions, hmm_commits, reserves, transfer_profiles, ms,
    transfer_summary,
    end_stage,
)
from elasticmoe_worker.instance.reconfig_events import (  # noqa: F401 - re-exported: reconfig.X
    ScaleRequested, WorkerRegistered, WorkerDied, TransferReady, HMMFailed, ExecutorReady, ExecutorFailed,
    HandedOver, KVMoved, RequestArrived, ExpertLoadReported, Tick, AbortRequested, Send, AddWorkers, RemoveWorkers,
    PauseAdmission, Commit, Release, Rebind, FailRequests, SetHealth, Recovering, Suspend, Resume, Finished, Event, Action,
)


# -- the step -------------------------------------------------------------------------
def step(state: State, event: Event) -> tuple[State, list[Action]]:
    """The next state and what to do, for one event. Pure and deterministic."""
    handler = _HANDLERS[type(event)]
    return handler(state, event)


def _on_scale_requested(state: State, ev: ScaleRequested) -> tuple[State, list[Action]]:
    refused = refuse_scale(state, ev.target)
    assert refused is None, f"the shell checks refuse_scale first: {refused}"
    new_config = state.last_config_id + 1
    old = state.devices
    # adds warm devices whose spare is ready, then the lowest unused ids; removes the highest
    new = planner.resize(old, ev.target, prefer=ev.ready & state.warm)
    added = tuple(d for d in new if d not in old)
    removed = tuple(d for d in old if d not in new)
    cold = tuple(d for d in added if d not in state.warm)
    record = admin.ScaleRecord(from_devices=state.num_devices, to_devices=ev.target, reason=ev.reason,
                               scale_id=ev.scale_id, started_at=ev.started_at, outcome=admin.Outcome.RUNNING)
    sc = Scale(scale_id=ev.scale_id, target=ev.target, old_config=state.config_id, new_config=new_config,
               old_devices=old, new_devices=new, added=added, removed=removed, stage=WORKERS,
               waiting=frozenset(cold), started=ev.now, stage_started=ev.now, deadline=ev.now + ev.timeout_s,
               timeout_s=ev.timeout_s, record=record, informed=ev.informed)
    state = dataclasses.replace(state, scale=sc, last_config_id=new_config, warm=state.warm - set(added))
    actions: list[Action] = [AddWorkers(cold)] if cold else []
    if not cold:
        state, more = _start_transfer(state, ev.now)
        actions += more
    return state, actions


def _start_transfer(state: State, now: float, recovery: reconfig_loss.Recovery | None = None
                    ) -> tuple[State, list[Action]]:
    sc, f = state.scale, state.facts
    if recovery is None:
        plan = planner.plan(state.placement, sc.old_devices, sc.new_devices, replicated_bytes=f.replicated_bytes,
                            expert_bytes=f.expert_bytes,
                            copies_per_expert=copies_for(f, len(sc.new_devices), state.expert_heat),
                            expert_load=expert_load(state.expert_heat))
        from_checkpoint = {}
    else:
        plan, from_checkpoint = recovery.plan, recovery.from_checkpoint
    transfers = [wire.Transfer("replicated", t.src_device, t.dst_device, t.offset_bytes, t.size_bytes)
                 for t in plan.replicated_transfers]
    transfers += [wire.Transfer("expert", m.src_device, m.dst_device, expert_id=m.expert) for m in plan.expert_moves]
    # NOTE: a lost device takes no part: its memory is gone, and it might never answer.
    group = sorted((set(sc.old_devices) | set(sc.new_devices)) - set(sc.lost))
    holds: dict[int, list[int]] = {}
    for e, homes in enumerate(plan.new_placement.homes):
        for d in homes:
            holds.setdefault(d, []).append(e)
    # A scale pre-initialises its standbys: each new rank's executor starts with the transfer (a
    # recovery replaces broken executors after it, as before).
    owner = owner_list(plan.new_placement, sc.new_devices) if recovery is None else []
    standby = {d: start_message(f, sc.new_config, r, sc.target, owner, replace=False)
               for r, d in enumerate(sc.new_devices)} if recovery is None else {}
    actions: list[Action] = [
        Send(hmm_dest(d), wire.PrepareTransition(
            config_id=sc.new_config, rank=rank, group_ranks=group, expert_ids=sorted(holds.get(d, [])),
            transfers=transfers, replicated_layout=list(f.replicated_layout), replicated_bytes=f.replicated_bytes,
            expert_w13_bytes=f.expert_w13_bytes, expert_w2_bytes=f.expert_w2_bytes, moe_layers=list(f.moe_layers),
            num_kv_blocks=f.num_kv_blocks, kv_bytes=f.kv_bytes, config_json=f.config_json,
            tokenizer_files={} if d in sc.old_devices or d in sc.informed else dict(f.tokenizer_files),
            timeout_s=sc.timeout_s,
            checkpoint_experts=list(from_checkpoint.get(d, ())), model_dir=f.model_dir if d in from_checkpoint else "",
            dtype=f.engine.dtype, standby=standby.get(d)))
        for rank, d in enumerate(group)]
    record = msgspec.structs.replace(sc.record, bytes_transferred=plan.bytes_moved)
    sc = end_stage(dataclasses.replace(sc, record=record), now, stage=TRANSFER, waiting=frozenset(group), plan=plan)
    return dataclasses.replace(state, scale=sc), actions


def _on_registered(state: State, ev: WorkerRegistered) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is not None and ev.device in sc.added:
        if sc.stage == WORKERS and ev.device in sc.waiting:
            sc = dataclasses.replace(sc, waiting=sc.waiting - {ev.device})
            state = dataclasses.replace(state, scale=sc)
            if not sc.waiting:
                return _start_transfer(state, ev.now)
        return state, []  # a hello repeated while it joins
    if ev.device in state.devices or ev.device in state.warm:
        return state, []  # an active device says hello again: nothing new
    return dataclasses.replace(state, warm=state.warm | {ev.device}), []


def _on_transfer_ready(state: State, ev: TransferReady) -> tuple[State, list[Action]]:
    sc, msg = state.scale, ev.msg
    if sc is None or msg.config_id != sc.new_config or sc.stage != TRANSFER or msg.device_index not in sc.waiting:
        return state, []  # stale (an aborted attempt) or duplicate
    ready = {**sc.ready, msg.device_index: msg}
    sc = dataclasses.replace(sc, ready=ready, waiting=sc.waiting - {msg.device_index},
                             delivered={**sc.delivered, msg.device_index: ev.delivery_s})
    if sc.waiting:
        return dataclasses.replace(state, scale=sc), []
    transports = sorted({part for r in ready.values() for part in r.transport.split(" + ") if part})
    record = msgspec.structs.replace(sc.record, transfer_data_ms=ms(max(r.data_seconds for r in ready.values())),
                                     transport=" + ".join(transports),
                                     transfer_devices=transfer_profiles(ready, sc.delivered))
    actions: list[Action] = []
    if sc.lost:  # a recovery replaces the broken executors now; a scale's standbys started with the transfer
        owner = owner_list(sc.plan.new_placement, sc.new_devices)
        actions = [Send(hmm_dest(d), start_message(state.facts, sc.new_config, r, sc.target, owner, replace=True))
                   for r, d in enumerate(sc.new_devices)]
    waiting = frozenset(range(len(sc.new_devices))) - sc.early_ready
    sc = end_stage(dataclasses.replace(sc, record=record), ev.now, stage=STANDBY, waiting=waiting)
    state = dataclasses.replace(state, scale=sc)
    if not waiting:  # every standby was ready before the last byte arrived
        return _standbys_ready(state, ev.now)
    return state, actions


def _on_executor_ready(state: State, ev: ExecutorReady) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is not None and ev.config_id == sc.new_config:
        if sc.stage == TRANSFER and not sc.lost and 0 <= ev.rank < len(sc.new_devices):
            # a pre-initialised standby: ready (its HMM has every byte) while peers still move theirs
            return dataclasses.replace(state, scale=dataclasses.replace(sc, early_ready=sc.early_ready | {ev.rank})), []
        if sc.stage != STANDBY or ev.rank not in sc.waiting:
            return state, []
        sc = dataclasses.replace(sc, waiting=sc.waiting - {ev.rank})
        if sc.waiting:
            return dataclasses.replace(state, scale=sc), []
        return _standbys_ready(dataclasses.replace(state, scale=sc), ev.now)
    if ev.config_id == state.config_id and ev.rank in state.recovering:
        recovering = state.recovering - {ev.rank}
        state = dataclasses.replace(state, recovering=recovering)
        if not recovering and not state.hmm_lost:
            actions = [Resume()] + ([Release(state.held)] if state.held else [])
            actions += [SetHealth(None)] if state.error is not None else []
            return dataclasses.replace(state, error=None, paused=False, held=(), suspended_since=None), actions
    return state, []


def _standbys_ready(state: State, now: float) -> tuple[State, list[Action]]:
    """Every executor of the new configuration is ready: a recovery commits, a scale switches."""
    sc = state.scale
    if sc.lost:
        return _commit_recovery(state, now)
    old_ranks = range(len(sc.old_devices))
    sc = end_stage(sc, now, stage=SWITCH, waiting=frozenset(old_ranks))
    actions: list[Action] = [PauseAdmission()]
    actions += [Send(exec_dest(sc.old_config, r), wire.PauseForSwitch(config_id=sc.old_config)) for r in old_ranks]
    return dataclasses.replace(state, scale=sc, paused=True), actions


def _on_handed_over(state: State, ev: HandedOver) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is not None and sc.stage == SWITCH and ev.config_id == sc.old_config:
        if ev.rank not in sc.waiting:
            return _adopt_late(state, ev, sc.old_devices)
        # merged: a late handover of the configuration before may have put sequences under this device
        d = device_of(sc.old_devices, ev.rank)
        handed = {**sc.handed, d: tuple(sc.handed.get(d, ())) + tuple(ev.requests)}
        sc = dataclasses.replace(sc, handed=handed, waiting=sc.waiting - {ev.rank})
        state = dataclasses.replace(state, scale=sc)
        if sc.waiting:
            return state, []
        return _move_kv(state, ev.now)
    if state.retired is not None and ev.config_id == state.retired[0]:
        # a handover delivered twice lists requests adopted already: adopting one again would run it on two ranks
        ev = dataclasses.replace(ev, requests=tuple(st for st in ev.requests if st.request_id not in state.adopted))
        return _adopt_late(state, ev, state.retired[1])
    return state, []  # a configuration we never switched from


def _move_kv(state: State, now: float) -> tuple[State, list[Action]]:
    """Every old rank handed over: their KV is final. Copy the blocks of the departing devices'
    sequences into free blocks of their adopters' pools, then commit (`_on_kv_moved`); with
    nothing to copy, commit now."""
    sc, f = state.scale, state.facts
    _, moved = reconfig_kv.distribute(sc.handed, sc.new_devices, {})
    kv = reconfig_kv.plan(sc.handed, moved, f.num_kv_blocks, unavailable=sc.kv_gone)
    if not kv.copies:
        return _commit(state, now, failed_ranks=())
    # NOTE: later than the HMMs' own timeout, after which an adopter never writes into its pool: once
    # the commit gives its blocks to the new executor, no late copy may land in them.
    sc = dataclasses.replace(sc, kv=kv, kv_waiting=frozenset(kv.devices),
                             kv_deadline=now + 1.5 * f.kv_move_timeout_s + 2)
    messages = kv.messages(sc.new_config, f.kv_view_block_bytes, f.kv_move_timeout_s)
    return dataclasses.replace(state, scale=sc), [Send(hmm_dest(d), m) for d, m in messages.items()]


def _kv_answered(state: State, now: float, device: int, error: str, bytes_received: int) -> tuple[State, list[Action]]:
    """`device` is done with its part of the KV copy (failed when `error`): commit after the last."""
    sc = state.scale
    sc = dataclasses.replace(sc, kv_waiting=sc.kv_waiting - {device}, kv_failed=sc.kv_failed or error,
                             kv_bytes=sc.kv_bytes + bytes_received)
    state = dataclasses.replace(state, scale=sc)
    if sc.kv_waiting:
        return state, []
    return _commit(state, now, failed_ranks=())


def _kv_gone(state: State, device: int) -> State:
    """A departing device died or lost its memory after the pause: no KV is copied from it."""
    sc = state.scale
    if sc is None or not sc.switched:
        return state
    return dataclasses.replace(state, scale=dataclasses.replace(sc, kv_gone=sc.kv_gone | {device}))


def _on_kv_moved(state: State, ev: KVMoved) -> tuple[State, list[Action]]:
    sc, msg = state.scale, ev.msg
    if sc is None or msg.config_id != sc.new_config or msg.device_index not in sc.kv_waiting:
        return state, []  # stale (a switch that gave up waiting) or duplicate
    error = "" if msg.ok else f"device {msg.device_index}: {msg.error or 'failed'}"
    return _kv_answered(state, ev.now, msg.device_index, error, msg.bytes_received)


def _adopt_late(state: State, ev: HandedOver, old_devices: tuple[int, ...]) -> tuple[State, list[Action]]:
    """Sequences an old executor handed over after its first handover (a request that raced
    the pause): they go to the new configuration like the others."""
    if not ev.requests:
        return state, []
    d = device_of(old_devices, ev.rank)
    if state.scale is not None and state.scale.stage == SWITCH:
        # not committed yet: the commit will bind them
        sc = state.scale
        extra = {**sc.handed, d: tuple(sc.handed.get(d, ())) + tuple(ev.requests)}
        return dataclasses.replace(state, scale=dataclasses.replace(sc, handed=extra)), []
    kept, moved = reconfig_kv.distribute({d: tuple(ev.requests)}, state.devices, {})
    actions, ranks = adopt_actions(state.config_id, kept, moved, state.devices)
    return dataclasses.replace(state, adopted=state.adopted | set(ranks)), actions + [Rebind(ranks)]


def _commit(state: State, now: float, failed_ranks: tuple[int, ...], message: str = "") -> tuple[State, list[Action]]:
    sc = state.scale
    kv = sc.kv
    kept, moved = reconfig_kv.adoptions(sc.handed, sc.new_devices, kv, copied=not sc.kv_failed)
    actions, ranks = adopt_actions(sc.new_config, kept, moved, sc.new_devices)
    if failed_ranks:
        actions.append(FailRequests(sc.old_config, failed_ranks, message))
    actions.append(Commit(config_id=sc.new_config, num_devices=sc.target, ranks=ranks))
    if state.held:
        actions.append(Release(state.held))
    actions += [Send(exec_dest(sc.old_config, r), wire.Shutdown(reason="replaced by a new configuration"))
                for r in range(len(sc.old_devices))]
    actions += hmm_commits(state, sc)
    actions += [Send(hmm_dest(d), wire.Shutdown(reason="device released")) for d in sc.removed]
    if sc.removed:
        actions.append(RemoveWorkers(sc.removed))
    sc = end_stage(sc, now)
    messages = sc.failures + ((message,) if message else ())
    outcome = admin.Outcome.FAILED if messages else admin.Outcome.SUCCEEDED
    record = msgspec.structs.replace(
        sc.record, outcome=outcome, message="; ".join(messages), duration_ms=ms(now - sc.started),
        requests_handed_over=len(ranks), tokens_recomputed=sum(st.num_computed for sts in moved.values() for st in sts),
        sequences_kv_moved=0 if kv is None or sc.kv_failed else kv.num_sequences, kv_bytes_moved=sc.kv_bytes,
        kv_fallback=sc.kv_failed)
    hmm_ready = {d: sc.ready[d].ready for d in sc.new_devices if d in sc.ready}
    actions.append(Finished(record, sc.new_config))
    state = dataclasses.replace(
        state, config_id=sc.new_config, device_ids=sc.new_devices, placement=sc.plan.new_placement,
        hmm_ready=hmm_ready, scale=None, paused=False, held=(), retired=(sc.old_config, sc.old_devices, sc.new_devices),
        adopted=frozenset(ranks))
    actions += reserves(state)
    if sc.broken:  # the new configuration serves with a dead executor: end its requests, restart them all
        state, more = _degrade(state, sc.broken, hmm_lost=False, recover_at=now + state.facts.recovery_grace_s)
        actions += more
    return state, actions


def _lose_rank(state: State, now: float, rank: int, failure: str, error: str) -> tuple[State, list[Action]]:
    """An old rank that died before handing over: its requests are lost, the others go on. The
    scale is Failed (`failure` in its record) whichever event ends it."""
    sc = state.scale
    sc = dataclasses.replace(sc, waiting=sc.waiting - {rank})
    if not sc.waiting:
        return _commit(dataclasses.replace(state, scale=sc), now, (rank,), failure)
    sc = dataclasses.replace(sc, failures=sc.failures + (failure,))
    return dataclasses.replace(state, scale=sc), [FailRequests(sc.old_config, (rank,), error)]


def _abort(state: State, now: float, reason: str) -> tuple[State, list[Action]]:
    """Give up the scale in progress: back to the configuration before. A recovery has no
    working configuration to go back to: the instance is Degraded."""
    sc = state.scale
    assert sc is not None and not sc.switched, "no way back after the pause"
    if sc.lost:
        return _fail_recovery(state, now, reason)
    return _abort_scale(state, now, reason)


def _abort_scale(state: State, now: float, reason: str) -> tuple[State, list[Action]]:
    sc = state.scale
    actions: list[Action] = [Send(hmm_dest(d), wire.AbortTransition(config_id=sc.new_config, reason=reason))
                             for d in sc.old_devices if d not in sc.lost]
    # the aborted transition's regions from the reserve were released with it: the configuration kept fills it again
    actions += reserves(state, skip=sc.lost)
    # A worker of a pod fleet outlives RemoveWorkers: it must drop what it half-received.
    actions += [Send(hmm_dest(d), wire.Shutdown(reason=f"scale aborted: {reason}")) for d in sc.added]
    if sc.added:
        actions.append(RemoveWorkers(sc.added))
    sc = end_stage(sc, now)
    record = msgspec.structs.replace(sc.record, outcome=admin.Outcome.ABORTED, message=reason,
                                     duration_ms=ms(now - sc.started))
    actions.append(Finished(record, sc.new_config))
    return dataclasses.replace(state, scale=None), actions


def _degrade(state: State, error: str, *, hmm_lost: bool, recover_at: float | None) -> tuple[State, list[Action]]:
    full = error if state.error is None else (state.error if error in state.error else f"{state.error}; {error}")
    actions: list[Action] = []
    if state.error is None or state.suspended_since is not None:
        actions.append(FailRequests(state.config_id, None, error))  # held and suspended ones too
    actions.append(SetHealth(full))
    state = dataclasses.replace(state, error=full, hmm_lost=state.hmm_lost or hmm_lost,
                                recover_at=None if (hmm_lost or state.hmm_lost) else recover_at,
                                paused=False if state.scale is None else state.paused,
                                held=() if state.scale is None else state.held, suspended_since=None)
    return state, actions


def _suspend(state: State, now: float, reason: str) -> tuple[State, list[Action]]:
    """The serving configuration's executors are broken: its requests wait to be recomputed,
    new ones wait for the configuration that replaces it (a pause for their clients)."""
    if state.suspended_since is not None:
        return state, []
    # retired=None: a late handover from now on is ignored; the router recomputes its requests too
    return (dataclasses.replace(state, paused=True, suspended_since=now, retired=None),
            [Suspend(state.config_id, reason), PauseAdmission()])


def _lose_device(state: State, now: float, device: int, reason: str) -> tuple[State, list[Action]]:
    """A device of the serving configuration is gone (its worker died, or its memory): go on
    with the survivors (see reconfig_loss). A recovery under way starts over without it too."""
    sc, actions = state.scale, []
    lost = {device} | set(sc.lost if sc is not None else ())
    if sc is not None:  # (not told to abort: its memory is gone, or it is cut off)
        state = dataclasses.replace(state, scale=dataclasses.replace(sc, lost=tuple(sorted(lost))))
        state, actions = _abort_scale(state, now, f"device {device} lost: {reason}")
    survivors = tuple(d for d in state.devices if d not in lost)
    state, more = _suspend(state, now, reason)
    actions += more
    actions += [Send(hmm_dest(device), wire.Shutdown(reason=f"device lost: {reason}")), RemoveWorkers((device,))]
    if not survivors:
        state, more = _degrade(state, f"{reason}; no device survives", hmm_lost=True, recover_at=None)
        return state, actions + more
    f = state.facts
    rec = reconfig_loss.plan_recovery(state.placement, state.devices, sorted(lost),
                                      copies_per_expert=copies_for(f, len(survivors), state.expert_heat),
                                      replicated_bytes=f.replicated_bytes, expert_bytes=f.expert_bytes,
                                      expert_load=expert_load(state.expert_heat))
    if rec.checkpoint_experts and not f.model_dir:
        state, more = _degrade(state, f"device(s) {sorted(lost)} lost ({reason}) and cannot be recovered: experts "
                                      f"{list(rec.checkpoint_experts)} had no other copy and there is no checkpoint "
                                      f"to read them from", hmm_lost=True, recover_at=None)
        return state, actions + more
    # the broken executors of the survivors: their collective group lost a member
    actions += [Send(exec_dest(state.config_id, r), wire.Shutdown(reason=f"device lost: {reason}"))
                for r, d in enumerate(state.devices) if d not in lost]
    new_config = state.last_config_id + 1
    since = state.suspended_since
    record = admin.ScaleRecord(from_devices=len(state.devices), to_devices=len(survivors),
                               reason=f"recovery: {reason}", scale_id=f"recovery-{new_config}",
                               outcome=admin.Outcome.RUNNING)
    timeout_s = f.recovery_timeout_s
    sc = Scale(scale_id=record.scale_id, target=len(survivors), old_config=state.config_id, new_config=new_config,
               old_devices=state.devices, new_devices=survivors, added=(), removed=tuple(sorted(lost)), stage="detect",
               waiting=frozenset(), started=since, stage_started=since, deadline=now + timeout_s, timeout_s=timeout_s,
               record=record, lost=tuple(sorted(lost)), checkpoint_experts=rec.checkpoint_experts)
    state = dataclasses.replace(state, scale=sc, last_config_id=new_config, recover_at=None, recovering=frozenset())
    state, more = _start_transfer(state, now, rec)
    return state, actions + more


def _fail_recovery(state: State, now: float, reason: str) -> tuple[State, list[Action]]:
    sc = state.scale
    state, actions = _abort_scale(state, now, reason)
    why = (f"experts {list(sc.checkpoint_experts)} had no other copy and had to be read from the checkpoint; "
           if sc.checkpoint_experts else "")
    state, more = _degrade(state, f"device(s) {list(sc.lost)} lost and the recovery failed: {why}{reason}",
                           hmm_lost=True, recover_at=None)
    return state, actions + more


def _commit_recovery(state: State, now: float) -> tuple[State, list[Action]]:
    """The survivors' new executors are ready: recompute the suspended requests there."""
    sc = state.scale
    actions: list[Action] = [Commit(config_id=sc.new_config, num_devices=sc.target, ranks={}), Resume()]
    if state.held:
        actions.append(Release(state.held))
    actions += hmm_commits(state, sc)
    sc = end_stage(sc, now)
    record = msgspec.structs.replace(sc.record, outcome=admin.Outcome.SUCCEEDED, duration_ms=ms(now - sc.started))
    actions.append(Finished(record, sc.new_config))
    state = dataclasses.replace(
        state, config_id=sc.new_config, device_ids=sc.new_devices, placement=sc.plan.new_placement,
        hmm_ready={d: sc.ready[d].ready for d in sc.new_devices}, scale=None, paused=False, held=(), retired=None,
        adopted=frozenset(), suspended_since=None)
    actions += reserves(state)
    return state, actions


def _on_executor_failed(state: State, ev: ExecutorFailed) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is not None and ev.config_id == sc.new_config and not sc.switched:
        return _abort(state, ev.now, f"standby executor rank {ev.rank} failed: {ev.error}")
    if sc is not None and ev.config_id == sc.new_config:
        # No way back after the pause: the switch goes on, and the commit restarts the new executors.
        failure = f"standby executor rank {ev.rank} failed during the switch: {ev.error}"
        sc = dataclasses.replace(sc, broken=sc.broken or f"executor rank {ev.rank} failed: {ev.error}",
                                 failures=sc.failures + ((failure,) if failure not in sc.failures else ()))
        return dataclasses.replace(state, scale=sc), []
    if ev.config_id != state.config_id or (sc is not None and sc.lost):
        return state, []  # a straggler of a configuration replaced or given up, or being replaced after a loss
    if sc is not None and sc.switched and ev.rank in sc.waiting:
        return _lose_rank(state, ev.now, ev.rank, f"executor rank {ev.rank} failed during the switch: {ev.error}",
                          f"executor rank {ev.rank} failed: {ev.error}")
    if sc is not None and sc.switched:
        return state, []  # it handed over already; it is on its way out
    error = f"executor rank {ev.rank} failed: {ev.error}"
    if state.recovering or state.error is not None:  # restarted ones failed too, or unhealthy already: end them
        return _degrade(state, error, hmm_lost=False, recover_at=ev.now + state.facts.recovery_grace_s)
    actions: list[Action] = []
    if sc is not None:
        state, actions = _abort(state, ev.now, f"the serving configuration failed: rank {ev.rank}: {ev.error}")
    # Decide a moment later: when a whole worker died, its peers' executors report broken
    # connections before the fleet sees the death. Meanwhile the requests wait (suspended).
    state, more = _suspend(state, ev.now, error)
    if state.error is None and state.recover_at is None:
        state = dataclasses.replace(state, recover_at=ev.now + state.facts.recovery_grace_s)
    return state, actions + more


def _on_hmm_failed(state: State, ev: HMMFailed) -> tuple[State, list[Action]]:
    sc = state.scale
    if ev.config_id:
        if sc is not None and ev.config_id == sc.new_config and not sc.switched:
            return _abort(state, ev.now, f"device {ev.device}: {ev.error}")
        return state, []  # a transition that was aborted or is over: its failure changes nothing
    if sc is not None and ev.device in sc.lost:
        return state, []  # lost already
    if sc is not None and not sc.switched and ev.device in sc.added:
        return _abort(state, ev.now, f"device {ev.device} failed: {ev.error}")
    if ev.device not in state.devices and (sc is None or ev.device not in sc.new_devices):
        return state, []  # a warm worker's problem; it holds nothing
    if sc is not None and sc.switched and ev.device not in sc.new_devices:
        return _kv_gone(state, ev.device), []  # a departing device after the pause: only a KV copy needed its memory
    error = f"HMM of device {ev.device} failed: {ev.error}"
    if sc is not None and sc.switched:
        return _degrade(state, error, hmm_lost=True, recover_at=None)
    return _lose_device(state, ev.now, ev.device, error)


def _on_worker_died(state: State, ev: WorkerDied) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is not None and ev.device in sc.kv_waiting:  # it will not answer: the copied sequences are recomputed
        state, actions = _kv_answered(state, ev.now, ev.device, f"device {ev.device} died: {ev.detail}", 0)
        state, more = _on_worker_died(state, ev)
        return state, actions + more
    if sc is not None and not sc.switched and ev.device in sc.added:
        return _abort(state, ev.now, f"new worker(s) died: device {ev.device} ({ev.detail})")
    if ev.device in state.warm:
        return dataclasses.replace(state, warm=state.warm - {ev.device}), [RemoveWorkers((ev.device,))]
    active = ev.device in state.devices or (sc is not None and ev.device in sc.new_devices)
    if not active or (sc is not None and ev.device in sc.lost):
        return state, [RemoveWorkers((ev.device,))]  # a worker on its way out, lost already, or a stray
    error = f"worker process(es) died: device {ev.device} ({ev.detail})"
    if sc is None or not sc.switched:
        return _lose_device(state, ev.now, ev.device, error)
    actions: list[Action] = []
    rank = sc.old_devices.index(ev.device) if ev.device in sc.old_devices else -1
    if rank in sc.waiting:
        state, actions = _lose_rank(state, ev.now, rank, f"device {ev.device} died during the switch",
                                    f"device {ev.device} died: {ev.detail}")
    if ev.device not in sc.new_devices:
        return _kv_gone(state, ev.device), actions  # a departing device: the new configuration does not use it
    state, more = _degrade(state, error, hmm_lost=True, recover_at=None)
    return state, actions + more


def _on_request_arrived(state: State, ev: RequestArrived) -> tuple[State, list[Action]]:
    if not state.paused:
        # the pause ended between the shell's check and this event: route it right away
        return state, [Release((ev.request_id,))]
    return dataclasses.replace(state, held=state.held + (ev.request_id,)), []


def _on_expert_load(state: State, ev: ExpertLoadReported) -> tuple[State, list[Action]]:
    """Add up the routed tokens per expert (all of them, and decayed: `add_heat`): the next scale
    or recovery gives the redundant copies to the hottest. Any configuration's report counts
    (load is load); a report of another length than the model's experts (none is sent) is ignored."""
    n = state.facts.num_experts
    if len(ev.tokens) != n or not any(ev.tokens):
        return state, []
    total = state.expert_tokens or (0,) * n
    heat = add_heat(state.expert_heat, state.heat_at, ev.tokens, ev.now, state.facts.hotness_half_life_s)
    return dataclasses.replace(state, expert_tokens=tuple(a + b for a, b in zip(total, ev.tokens)), expert_heat=heat,
                               heat_at=ev.now if state.heat_at is None else max(state.heat_at, ev.now)), []


def _on_tick(state: State, ev: Tick) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is not None and sc.kv_waiting:  # every rank handed over; only the KV copy's deadline counts
        if ev.now < sc.kv_deadline:
            return state, []
        waiting = sorted(sc.kv_waiting)
        sc = dataclasses.replace(sc, kv_waiting=frozenset(), kv_failed=sc.kv_failed or (
            f"device(s) {waiting} did not finish the KV copy in time (timeout "
            f"{state.facts.kv_move_timeout_s:g} s)"))
        return _commit(dataclasses.replace(state, scale=sc), ev.now, failed_ranks=())
    if sc is not None and ev.now >= sc.deadline:
        waiting = sorted(sc.waiting)
        if not sc.switched:
            what = {WORKERS: "new workers to register", TRANSFER: "peer-to-peer transfers",
                    STANDBY: "standby executors"}[sc.stage]
            return _abort(state, ev.now, f"timed out after {sc.timeout_s:g} s waiting for {what} "
                                         f"(still waiting for device(s) {waiting})")
        return _commit(state, ev.now, tuple(waiting), f"rank(s) {waiting} did not hand over within "
                                                       f"{sc.timeout_s:g} s; their requests failed")
    if state.recover_at is not None and ev.now >= state.recover_at and sc is None:
        return _recover(state)
    return state, []


def _recover(state: State) -> tuple[State, list[Action]]:
    """An executor died but every HMM still holds its memory: a fresh set of executors (new
    configuration id, new collective group) on the same memory, which then recompute the
    suspended requests. Nothing is read from the checkpoint."""
    if state.hmm_lost:
        return dataclasses.replace(state, recover_at=None), []
    config_id = state.last_config_id + 1
    owner = owner_list(state.placement, state.devices)
    actions: list[Action] = [Recovering(config_id)]
    actions += [Send(hmm_dest(d), start_message(state.facts, config_id, r, state.num_devices, owner))
                for r, d in enumerate(state.devices)]
    return dataclasses.replace(state, config_id=config_id, last_config_id=config_id, recover_at=None,
                               recovering=frozenset(range(state.num_devices)), retired=None), actions


def _on_abort_requested(state: State, ev: AbortRequested) -> tuple[State, list[Action]]:
    sc = state.scale
    if sc is None or sc.switched or sc.lost:
        return state, []  # a recovery has nothing to go back to: it goes on
    return _abort(state, ev.now, ev.reason)


_HANDLERS = {
    ScaleRequested: _on_scale_requested, WorkerRegistered: _on_registered, WorkerDied: _on_worker_died,
    TransferReady: _on_transfer_ready, HMMFailed: _on_hmm_failed, ExecutorReady: _on_executor_ready,
    ExecutorFailed: _on_executor_failed, HandedOver: _on_handed_over, KVMoved: _on_kv_moved,
    RequestArrived: _on_request_arrived,
    ExpertLoadReported: _on_expert_load, Tick: _on_tick, AbortRequested: _on_abort_requested,
}
