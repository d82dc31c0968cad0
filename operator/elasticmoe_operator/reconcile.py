"""The operator's decision for one ElasticMoE: observed state in, actions and status out.

Pure (no I/O, no clock: `now` is an argument), so every branch is a unit test. The handler
observes (worker pods, the coordinator's /admin/status, the scale in progress), calls
`decide`, and acts: creates and deletes pods by device index, posts a scale, writes status
and events. Deciding again on the same observation gives the same actions, and every
action is idempotent, so running it twice, or after a restart, is safe.

A scale moves by at most `spec.devices.step` devices and goes through stages kept in
`status.scaling` (and the operator's memory), which is how a restarted operator resumes:
- up:   WaitingForWorkers (pods created, HMMs registering) -> Scaling (POST /admin/scale) -> done
- down: Scaling (POST /admin/scale, the coordinator drains the leaving devices) -> done, and
        exactly the released pods are deleted.
Each scale carries a `scaleId` derived from it (`scale_id`), posted with the request and kept in
`status.scaling`; the coordinator echoes it in its record, which is how the operator (restarted
or not) tells its scale's outcome from any other. Outcomes are the coordinator's vocabulary
(`admin.Outcome`). A scale that does not reach Scaling within `scaleTimeoutSeconds` is Aborted
(its new pods deleted).

Which pods serve is the coordinator's `devices.activeIds` (not 0..n-1: a recovery drops the
lost device's id), and a scale-up adds the ids the coordinator will take (`target_devices`).

A lost worker (its pod deleted, or Failed: restartPolicy Never) is replaced in three steps, each
a Degraded reason and an Event: the coordinator notices the loss (heartbeats stop) and recovers
onto the survivors (`Recovering`; the operator follows that recovery like any scale and records
it), then the operator scales back to the desired count the normal way (`ReplacingLostDevices`:
a new pod by the lost device's index, which pulls its weights from live peers), then `Recovered`.
NOTE: a pod is never created for a device the coordinator still holds (active or registered):
a new worker saying hello under the id of a device the coordinator still counts would keep that
device's heartbeats alive and hide its loss. A Failed or Succeeded worker pod is deleted at once
(its process is gone; the name is needed for the replacement).

A coordinator that stops answering, or answers Starting, after the instance has served
(`_served`) is a restart: its worker pods are left alone (a restarted coordinator adopts their
memory), and the instance is Degraded (`CoordinatorUnavailable`, `CoordinatorRestarting`) until
it serves again. With no worker pod left running, it gets new ones as at its first start.
Not handled: a worker pod lost while others wait for the restarted coordinator (it refuses an
incomplete configuration; starting afresh would throw away the others' memory, so the operator
leaves that to a person, and stays Degraded).

Not guaranteed: a lost device whose pod keeps running (cut off, or stopped) is only replaced
after the coordinator has dropped it (its heartbeat timeout); a worker pod lost while the
coordinator restarts is not replaced until the restarted coordinator serves (which it may not do
without that device's memory: it then reports why).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import re

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api, children

WAITING_FOR_WORKERS = "WaitingForWorkers"
SCALING = "Scaling"
RETRY_AFTER_FAILURE_S = 30
# NOTE: the coordinator names the scale records of its recoveries from a lost device so
# (reconfig._lose_device; README "Losing a device").
RECOVERY_PREFIX = "recovery-"
ENDED_PHASES = ("Failed", "Succeeded")

# Reasons of the Degraded condition (each change of reason is also an Event of that reason).
COORDINATOR_UNAVAILABLE = "CoordinatorUnavailable"
COORDINATOR_RESTARTING = "CoordinatorRestarting"
UNHEALTHY = "Unhealthy"
RECOVERING = "Recovering"
WORKER_LOST = "WorkerLost"
REPLACING = "ReplacingLostDevices"


@dataclasses.dataclass
class Observed:
    name: str
    spec: api.ElasticMoESpec
    generation: int
    now: datetime.datetime
    pods: dict[int, str]  # device index -> pod phase (Pending, Running, Succeeded, Failed, Terminating)
    coordinator: admin.AdminStatus | None  # GET /admin/status, None while unreachable or unusable
    scaling: api.ScalingStatus | None  # the scale in progress
    last_scale: api.ScaleRecord | None
    start_devices: int  # devices the coordinator Deployment starts with
    coordinator_error: str = ""  # why coordinator is None
    # Mode Slo: why the autoscaler asked for the desired count (the scale carries it), and the
    # MetricsAvailable condition its last evaluation left.
    desired_reason: str = ""
    metrics_condition: tuple[str, str, str] | None = None
    pod_details: dict[int, str] = dataclasses.field(default_factory=dict)  # ended pod -> e.g. "exit code 137"
    conditions: list[dict] = dataclasses.field(default_factory=list)  # status.conditions as last written
    recorded: set[str] = dataclasses.field(default_factory=set)  # scale ids in status.history


@dataclasses.dataclass
class Decision:
    create_pods: list[int] = dataclasses.field(default_factory=list)
    delete_pods: list[int] = dataclasses.field(default_factory=list)
    post_scale: admin.ScaleRequest | None = None  # POST /admin/scale
    scaling: api.ScalingStatus | None = None
    finished: api.ScaleRecord | None = None  # a scale that ended now: lastScale + history
    # A recovery of the coordinator's that began and ended between two ticks (never followed):
    # recorded in history before `finished`.
    unseen: api.ScaleRecord | None = None
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, reason, message)
    phase: str = api.Phase.PENDING.value
    devices: api.DevicesStatus = dataclasses.field(default_factory=api.DevicesStatus)
    parallelism: api.ParallelismStatus = dataclasses.field(default_factory=api.ParallelismStatus)
    conditions: dict[str, tuple[str, str, str]] = dataclasses.field(default_factory=dict)  # type -> (status, reason, message)


def _iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(t: str) -> datetime.datetime | None:
    """An RFC 3339 time (ours, or the coordinator's, which may carry fractions of a second)."""
    try:
        parsed = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.timezone.utc)


def scale_id(name: str, from_devices: int, to_devices: int, started_at: str) -> str:
    """The id a scale is posted under: the same for the same scale, whoever computes it."""
    return re.sub(r"[^A-Za-z0-9.-]", "", f"{name}-{from_devices}-{to_devices}-{started_at}")


def is_recovery(record: admin.ScaleRecord | api.ScaleRecord | api.ScalingStatus | None) -> bool:
    return record is not None and record.scale_id.startswith(RECOVERY_PREFIX)


def target_devices(active_ids: list[int], num_devices: int) -> list[int]:
    """The device ids the coordinator serves on after a scale to `num_devices`.
    NOTE: the coordinator's own choice (planner.resize): up adds the lowest unused ids, down
    removes the highest; the operator makes the pods of exactly these."""
    ids = sorted(active_ids)
    if num_devices <= len(ids):
        return ids[:num_devices]
    unused = (i for i in itertools.count() if i not in set(ids))
    return sorted(ids + list(itertools.islice(unused, num_devices - len(ids))))


def _active_ids(coord: admin.AdminStatus) -> list[int]:
    # [] from a coordinator that predates the field: its devices were always 0..active-1
    return sorted(coord.devices.active_ids) if coord.devices.active_ids else list(range(coord.devices.active))


def _record(scaling: api.ScalingStatus, outcome: admin.Outcome, message: str, now: datetime.datetime,
            coordinator_record: admin.ScaleRecord | None = None) -> api.ScaleRecord:
    """The operator's record: its own timing (it includes waiting for workers), the
    coordinator's measurements."""
    started = _parse(scaling.started_at) or now
    rec = api.ScaleRecord(**{"from": scaling.from_devices, "to": scaling.to_devices}, reason=scaling.reason,
                          scale_id=scaling.scale_id, started_at=scaling.started_at, outcome=outcome,
                          message=message, duration_ms=int((now - started).total_seconds() * 1000))
    if coordinator_record is not None:
        rec.phases_ms = dict(coordinator_record.phases_ms)
        rec.bytes_transferred = coordinator_record.bytes_transferred
        rec.transfer_data_ms = coordinator_record.transfer_data_ms
        rec.requests_handed_over = coordinator_record.requests_handed_over
        rec.tokens_recomputed = coordinator_record.tokens_recomputed
        rec.transport = coordinator_record.transport
        rec.sequences_kv_moved = coordinator_record.sequences_kv_moved
        rec.kv_bytes_moved = coordinator_record.kv_bytes_moved
        rec.kv_fallback = coordinator_record.kv_fallback
        if is_recovery(scaling) and coordinator_record.duration_ms:
            # the coordinator timed it from the loss (its record has no start time to time it by here)
            rec.duration_ms = coordinator_record.duration_ms
    return rec


def _step_target(active: int, desired: int, step: int) -> int:
    delta = max(-step, min(step, desired - active))
    return active + delta


def _previous(obs: Observed, ctype: api.ConditionType) -> dict:
    return next((c for c in obs.conditions if c.get("type") == ctype.value), {})


def _served(obs: Observed) -> bool:
    """Whether this instance's coordinator has served before (then no answer, or Starting, is a
    restart, not the first start); read from the conditions last written, so a restarted operator
    knows it too."""
    available, degraded = _previous(obs, api.ConditionType.AVAILABLE), _previous(obs, api.ConditionType.DEGRADED)
    return (available.get("reason") in ("Serving", UNHEALTHY)
            or (degraded.get("status") == "True"
                and degraded.get("reason") in (COORDINATOR_UNAVAILABLE, COORDINATOR_RESTARTING)))


def _lost_since(coord: admin.AdminStatus) -> admin.ScaleRecord | None:
    """The coordinator's recovery from a lost device, if nothing has scaled successfully since."""
    records = [*coord.history, *([coord.last_scale] if coord.last_scale is not None else [])]
    for rec in reversed(records):
        if rec.outcome == admin.Outcome.SUCCEEDED:
            return rec if is_recovery(rec) else None
    return None


def _ended_pods(d: Decision, obs: Observed, held: set[int]) -> None:
    """Worker pods whose process ended (restartPolicy Never) are deleted; a failure is an Event."""
    for i, phase in sorted(obs.pods.items()):
        if phase not in ENDED_PHASES:
            continue
        d.delete_pods = sorted(set(d.delete_pods) | {i})
        detail = f" ({obs.pod_details[i]})" if obs.pod_details.get(i) else ""
        pod = children.worker_name(obs.name, i)
        then = ("a replacement follows once the coordinator has recovered without it" if i in held
                else "its device serves nothing")
        if phase == "Failed":
            d.events.append(("Warning", "WorkerFailed", f"worker pod {pod} (device {i}) failed{detail}; "
                                                        f"deleted, {then}"))
        elif i in held:
            d.events.append(("Warning", "WorkerExited", f"worker pod {pod} (device {i}) exited{detail} while its "
                                                        f"device served; deleted, {then}"))


def decide(obs: Observed) -> Decision:
    d = Decision()
    spec, coord, now = obs.spec, obs.coordinator, obs.now
    desired = spec.devices.desired
    live = {i for i, phase in obs.pods.items() if phase in ("Pending", "Running")}
    d.devices.desired = desired

    if coord is None or coord.phase == admin.Phase.STARTING:
        n = obs.scaling.from_devices if obs.scaling else obs.start_devices
        registered = set(coord.devices.registered) if coord is not None else set()
        # A restart keeps its workers; with none left running (all deleted, or exited) the new
        # coordinator has nothing to adopt and starts afresh: then its workers are made as at first.
        restart = _served(obs) and bool(live)
        _ended_pods(d, obs, set(live) if restart else set())
        d.scaling = obs.scaling
        d.devices.ready = len(registered & live)
        d.devices.warming = len(live - registered)
        unreachable = "the coordinator's admin API does not answer" + (
            f" ({obs.coordinator_error})" if obs.coordinator_error else "")
        if restart:
            # NOTE: no pod is created or deleted for a restarting coordinator: its workers keep their
            # memory and rejoin it (ended ones were deleted above and are replaced once it serves).
            d.phase = api.Phase.DEGRADED.value
            if coord is None:
                why = (COORDINATOR_UNAVAILABLE, f"{unreachable}; its {len(live)} worker pod(s) are kept for "
                                                "the restarted coordinator to adopt")
            else:
                why = (COORDINATOR_RESTARTING, f"the coordinator restarted: {len(registered)} worker(s) have "
                                               f"registered with it so far, of {len(live)} worker pod(s)"
                                               + (f" ({coord.error})" if coord.error else ""))
            _conditions(d, obs, available=("False", *why), degraded=("True", *why),
                        progressing=("True", why[0], "waiting for the coordinator to serve again"))
        elif _served(obs):
            # all at once, once no pod is left (not even an ended one being deleted): a first pod alone
            # would make this a restart again, and the rest would never come
            d.create_pods = [] if obs.pods else list(range(n))
            d.phase = api.Phase.DEGRADED.value
            why = (COORDINATOR_RESTARTING, f"the coordinator restarts and no worker pod is left to rejoin it: "
                                           f"{n} new worker(s) for it to start afresh")
            _conditions(d, obs, available=("False", *why), degraded=("True", *why),
                        progressing=("True", why[0], "waiting for the coordinator to serve again"))
        else:
            d.create_pods = [i for i in range(n) if i not in obs.pods]
            d.phase = api.Phase.PENDING.value
            if coord is None:
                available = ("False", "CoordinatorUnreachable", f"{unreachable} yet")
            else:
                available = ("False", "Starting", f"{len(registered)} of {n} worker(s) registered")
            _conditions(d, obs, available=available, progressing=("True", "Starting", f"waiting for the "
                                                                  f"coordinator and {n} worker(s)"))
        return d

    active = coord.devices.active
    active_ids = _active_ids(coord)
    registered = set(coord.devices.registered)
    held = set(active_ids) | registered  # never create a pod under one of these ids (see the module doc)
    healthy = coord.healthy
    d.devices.active = active
    d.devices.ready = len(registered & live)
    d.devices.warming = len(live - registered)
    par = coord.parallelism
    d.parallelism = api.ParallelismStatus(dp=par.dp, ep=par.ep, tp=par.tp)
    _ended_pods(d, obs, held)
    lost = _lost_since(coord) if active < desired else None
    recorded = obs.recorded | ({obs.last_scale.scale_id} if obs.last_scale is not None else set())
    if lost is not None and lost.scale_id not in recorded and (obs.scaling is None
                                                                or obs.scaling.scale_id != lost.scale_id):
        _unseen_recovery(d, lost, now)

    sc = obs.scaling
    if sc is None and coord.phase == admin.Phase.SCALING:
        sc = _followed(coord, now)
    backing_off = False
    # NOTE: an unseen recovery is recorded on its own tick, as a followed one is; the replacement starts next tick.
    if sc is None and desired != active and healthy and d.unseen is None:
        target = _step_target(active, desired, spec.devices.step)
        last = obs.last_scale
        ended = (_parse(last.started_at) or now) + datetime.timedelta(milliseconds=last.duration_ms) if last else None
        if (last is not None and last.outcome in (admin.Outcome.FAILED, admin.Outcome.ABORTED)
                and last.to_devices == target and ended is not None
                and (now - ended).total_seconds() < RETRY_AFTER_FAILURE_S):
            backing_off = True
        else:
            started_at = _iso(now)
            if lost is not None and target > active:
                reason = f"replacing lost device(s): {active} of {desired} desired serve since {lost.reason}"
            elif obs.desired_reason:
                reason = f"Slo autoscaler: {obs.desired_reason}"
            else:
                reason = f"spec.devices desired {desired}, active {active}"
            sc = api.ScalingStatus(**{"from": active, "to": target}, started_at=started_at,
                                   scale_id=scale_id(obs.name, active, target, started_at),
                                   reason=reason + (f", step {spec.devices.step}"
                                                    if abs(desired - active) > spec.devices.step else ""),
                                   stage=WAITING_FOR_WORKERS if target > active else SCALING)
            d.events.append(("Normal", "ScalingUp" if target > active else "ScalingDown",
                             f"scaling {active} -> {target} devices: {sc.reason}"))
            if target > active:  # leftovers (a lost device's pod still running, cut off): made afresh
                d.delete_pods = sorted(set(d.delete_pods) | {i for i in obs.pods if i not in held})

    if sc is not None:
        _advance(d, obs, sc, active_ids, registered, held)
    else:
        # Steady: the pods of the active devices stay (one that is gone is replaced once the
        # coordinator has dropped its device); the rest go, but registered spare workers while
        # below the desired count (the next scale-up takes them).
        d.delete_pods = sorted(set(d.delete_pods) | {i for i in obs.pods if i not in active_ids
                                                     and (i not in registered or active >= desired)})

    gone = sorted(i for i in active_ids if i not in live)
    unhealthy = coord.error or "the coordinator reports unhealthy"
    degraded = None
    if not healthy:
        degraded = ("True", UNHEALTHY, unhealthy)
    elif is_recovery(coord.current_scale):
        degraded = ("True", RECOVERING, f"the coordinator recovers onto the surviving devices "
                                        f"({coord.current_scale.from_devices} -> {coord.current_scale.to_devices}): "
                                        f"{coord.current_scale.reason}")
    elif gone:
        degraded = ("True", WORKER_LOST, f"the worker pod(s) of active device(s) {gone} are gone "
                                         f"({', '.join(obs.pods.get(i, 'deleted') for i in gone)}); the coordinator "
                                         "recovers onto the survivors once it notices, then they are replaced")
    elif lost is not None:
        degraded = ("True", REPLACING, f"{active} of {desired} desired device(s) serve since {lost.reason}; "
                    + (f"scaling {d.scaling.from_devices} -> {d.scaling.to_devices} (stage {d.scaling.stage})"
                       if d.scaling is not None else "the replacement waits to be started"))
    if degraded is not None:
        d.phase = api.Phase.DEGRADED.value
    elif d.scaling is not None:
        d.phase = api.Phase.SCALING.value
    else:
        d.phase = api.Phase.SERVING.value
    available = ("True", "Serving", f"{active} device(s) serving") if healthy else ("False", UNHEALTHY, unhealthy)
    progressing = (("True", "Scaling", f"{d.scaling.from_devices} -> {d.scaling.to_devices} devices, stage "
                    f"{d.scaling.stage}") if d.scaling is not None else ("False", "Stable", f"{active} of {desired} "
                                                                             "desired device(s) active"))
    _conditions(d, obs, available=available, progressing=progressing, degraded=degraded,
                scaling_active=("False", "BackingOff", f"the last scale failed; retrying after "
                                f"{RETRY_AFTER_FAILURE_S} s") if backing_off else None)
    return d


def _followed(coord: admin.AdminStatus, now: datetime.datetime) -> api.ScalingStatus:
    """A scale another client of the admin API started, or the coordinator's recovery from a lost
    device: followed, not fought."""
    cur = coord.current_scale
    if cur is None:
        return api.ScalingStatus(**{"from": coord.devices.active, "to": coord.devices.desired},
                                 reason="started outside the operator (admin API)", started_at=_iso(now), stage=SCALING)
    return _as_followed(cur, now)


def _as_followed(cur: admin.ScaleRecord, now: datetime.datetime) -> api.ScalingStatus:
    """The operator's view of a scale of the coordinator's record (its recovery, or another client's)."""
    reason = "started outside the operator (admin API)"
    if is_recovery(cur):
        reason = f"the coordinator's {cur.reason}" if cur.reason else "the coordinator's recovery"
    elif cur.reason:
        reason = f"{reason}: {cur.reason}"
    return api.ScalingStatus(**{"from": cur.from_devices, "to": cur.to_devices}, reason=reason,
                             scale_id=cur.scale_id, started_at=cur.started_at or _iso(now), stage=SCALING)


def _request(sc: api.ScalingStatus) -> admin.ScaleRequest:
    return admin.ScaleRequest(devices=sc.to_devices, reason=sc.reason, scale_id=sc.scale_id)


def _advance(d: Decision, obs: Observed, sc: api.ScalingStatus, active_ids: list[int], registered: set[int],
             held: set[int]) -> None:
    """One step of a scale in progress."""
    coord, now = obs.coordinator, obs.now
    active = len(active_ids)
    started = _parse(sc.started_at) or now
    up = sc.to_devices > sc.from_devices
    timed_out = (now - started).total_seconds() > obs.spec.scale_timeout_seconds
    d.scaling = sc
    if up and sc.stage == WAITING_FOR_WORKERS:
        wanted = target_devices(active_ids, sc.to_devices)
        if timed_out:
            waiting = [i for i in wanted if i not in registered]
            return _end(d, obs, sc, admin.Outcome.ABORTED, f"workers of device(s) {waiting} did not register "
                        f"within {obs.spec.scale_timeout_seconds} s", None)
        d.create_pods = [i for i in wanted if i not in obs.pods and i not in held]
        if all(i in registered for i in wanted):
            sc = d.scaling = sc.model_copy(update={"stage": SCALING})
            d.post_scale = _request(sc)
        return
    # stage Scaling: the coordinator moves the weights and switches traffic
    ours = coord.find_scale(sc.scale_id)
    if coord.phase == admin.Phase.SCALING or (ours is not None and ours.outcome == admin.Outcome.RUNNING):
        return
    # NOTE: which pods go is decided by what serves (`active_ids`), never by the outcome alone.
    if active == sc.to_devices:  # the new configuration serves; down: the released devices idle
        _end(d, obs, sc, ours.outcome if ours else admin.Outcome.SUCCEEDED, ours.message if ours else "", ours)
    elif active != sc.from_devices:
        _end(d, obs, sc, admin.Outcome.FAILED, f"the coordinator has {active} active devices, neither "
             f"{sc.from_devices} nor {sc.to_devices}", ours)
    elif ours is None:
        # Not started yet (or the POST was lost with a restarted operator): ask (again).
        d.post_scale = _request(sc)
    else:  # ended on the old configuration; up: the new pods serve nothing
        _end(d, obs, sc, ours.outcome, ours.message or f"the coordinator reports {ours.outcome.value}", ours)


def _unseen_recovery(d: Decision, rec: admin.ScaleRecord, now: datetime.datetime) -> None:
    """The coordinator recovered from a lost device between two ticks (a tiny model's recovery
    takes well under the 1 s interval): recorded and announced as if followed."""
    sc = _as_followed(rec, now)
    d.unseen = _record(sc, admin.Outcome(rec.outcome), rec.message, now, rec)
    d.events.append(_recovered_event(sc, d.unseen))


def refuse(d: Decision, obs: Observed, message: str) -> None:
    """The coordinator refused the scale (HTTP 400): end it as failed, release new pods."""
    d.post_scale = None
    _end(d, obs, d.scaling, admin.Outcome.FAILED, message, None)


_EVENTS = {admin.Outcome.SUCCEEDED: ("Normal", "Scaled"), admin.Outcome.ABORTED: ("Warning", "ScaleAborted"),
           admin.Outcome.FAILED: ("Warning", "ScaleFailed")}


def _end(d: Decision, obs: Observed, sc: api.ScalingStatus, outcome: admin.Outcome, message: str,
         coordinator_record: admin.ScaleRecord | None) -> None:
    """The scale is over: record it, and delete the pods of every device that does not serve
    (up: the new ones if it failed; down: the released ones; a recovery: the lost one)."""
    assert outcome in admin.TERMINAL_OUTCOMES, outcome
    now = obs.now
    d.scaling = None
    d.delete_pods = sorted(set(d.delete_pods) | {i for i in obs.pods if i not in _active_ids(obs.coordinator)})
    d.finished = _record(sc, outcome, message, now, coordinator_record)
    etype, reason = _EVENTS[admin.Outcome(outcome)]
    seconds = d.finished.duration_ms / 1000
    if outcome == admin.Outcome.SUCCEEDED and is_recovery(sc):
        d.events.append(_recovered_event(sc, d.finished))
        return
    if outcome == admin.Outcome.SUCCEEDED:
        text = f"scaled {sc.from_devices} -> {sc.to_devices} devices in {seconds:.1f} s ({sc.reason})"
    else:
        text = f"scale {sc.from_devices} -> {sc.to_devices} devices: {message}"
    d.events.append((etype, reason, text))


def _recovered_event(sc: api.ScalingStatus, rec: api.ScaleRecord) -> tuple[str, str, str]:
    return ("Warning", "RecoveredOnSurvivors",
            f"serving on {sc.to_devices} surviving device(s) after {rec.duration_ms / 1000:.1f} s ({sc.reason})")


def _conditions(d: Decision, obs: Observed, available, progressing, degraded=None, scaling_active=None) -> None:
    T = api.ConditionType
    d.conditions[T.AVAILABLE.value] = available
    d.conditions[T.PROGRESSING.value] = progressing
    d.conditions[T.DEGRADED.value] = degraded or ("False", "AsExpected", "")
    d.conditions[T.SCALING_ACTIVE.value] = scaling_active or (
        "True", "ScalingPossible", f"devices in [{obs.spec.devices.min}, {obs.spec.devices.max}], "
        f"step {obs.spec.devices.step}")
    mode = obs.spec.autoscaling.mode
    d.conditions[T.METRICS_AVAILABLE.value] = {
        api.AutoscalingMode.DISABLED.value: ("False", "AutoscalingDisabled", "autoscaling.mode is Disabled: "
                                             "the device count follows spec and the scale subresource"),
        api.AutoscalingMode.EXTERNAL.value: ("True", "ExternalAutoscaler", "an HPA or KEDA scales through the "
                                             "scale subresource"),
        api.AutoscalingMode.SLO.value: obs.metrics_condition or ("Unknown", "NotEvaluated", "the Slo policy "
                                                                 "evaluates once the coordinator serves"),
    }[mode]
    _degraded_events(d, obs)


def _degraded_events(d: Decision, obs: Observed) -> None:
    """An Event for every change of the Degraded condition: each new reason while degraded
    (Warning, that reason), and `Recovered` when it clears."""
    prev = _previous(obs, api.ConditionType.DEGRADED)
    status, reason, message = d.conditions[api.ConditionType.DEGRADED.value]
    if status == "True" and (prev.get("status") != "True" or prev.get("reason") != reason):
        d.events.append(("Warning", reason, message))
    elif status != "True" and prev.get("status") == "True" and prev.get("reason") != "InvalidSpec":
        since = _parse(prev.get("lastTransitionTime") or "")
        took = f" after {(obs.now - since).total_seconds():.0f} s degraded" if since is not None else ""
        d.events.append(("Normal", "Recovered", f"{d.conditions[api.ConditionType.AVAILABLE.value][2]}, "
                                                f"{d.devices.desired} desired{took}; last: {prev.get('reason')}: "
                                                f"{prev.get('message', '')}"))


def invalid_spec_conditions(error: api.SpecError) -> dict[str, tuple[str, str, str]]:
    T = api.ConditionType
    return {T.DEGRADED.value: ("True", "InvalidSpec", str(error)),
            T.SCALING_ACTIVE.value: ("False", "InvalidSpec", str(error)),
            T.PROGRESSING.value: ("False", "InvalidSpec", "nothing is created until the spec is fixed")}


def merge_conditions(old: list[dict], new: dict[str, tuple[str, str, str]], generation: int,
                     now: datetime.datetime) -> list[dict]:
    """Conditions with lastTransitionTime kept while a condition's status does not change."""
    by_type = {c.get("type"): c for c in old or []}
    out = []
    for ctype, (status, reason, message) in new.items():
        prev = by_type.get(ctype)
        when = prev.get("lastTransitionTime") if prev and prev.get("status") == status else _iso(now)
        out.append(api.Condition(type=ctype, status=status, reason=reason, message=message,
                                 last_transition_time=when or _iso(now), observed_generation=generation).dump())
    for ctype, prev in by_type.items():
        if ctype not in new:
            out.append(prev)
    return out
