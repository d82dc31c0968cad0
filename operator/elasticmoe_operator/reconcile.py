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

Not guaranteed: a worker pod that fails while serving is reported (Degraded), not replaced: the
coordinator has lost that device's memory and only a scale can repair it.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api

WAITING_FOR_WORKERS = "WaitingForWorkers"
SCALING = "Scaling"
RETRY_AFTER_FAILURE_S = 30


@dataclasses.dataclass
class Observed:
    name: str
    spec: api.ElasticMoESpec
    generation: int
    now: datetime.datetime
    pods: dict[int, str]  # device index -> pod phase (Pending, Running, Succeeded, Failed)
    coordinator: admin.AdminStatus | None  # GET /admin/status, None while unreachable or unusable
    scaling: api.ScalingStatus | None  # the scale in progress
    last_scale: api.ScaleRecord | None
    start_devices: int  # devices the coordinator Deployment starts with
    coordinator_error: str = ""  # why coordinator is None
    # Mode Slo: why the autoscaler asked for the desired count (the scale carries it), and the
    # MetricsAvailable condition its last evaluation left.
    desired_reason: str = ""
    metrics_condition: tuple[str, str, str] | None = None


@dataclasses.dataclass
class Decision:
    create_pods: list[int] = dataclasses.field(default_factory=list)
    delete_pods: list[int] = dataclasses.field(default_factory=list)
    post_scale: admin.ScaleRequest | None = None  # POST /admin/scale
    scaling: api.ScalingStatus | None = None
    finished: api.ScaleRecord | None = None  # a scale that ended now: lastScale + history
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
    return rec


def _step_target(active: int, desired: int, step: int) -> int:
    delta = max(-step, min(step, desired - active))
    return active + delta


def decide(obs: Observed) -> Decision:
    d = Decision()
    spec, coord, now = obs.spec, obs.coordinator, obs.now
    desired = spec.devices.desired
    live = {i for i, phase in obs.pods.items() if phase in ("Pending", "Running")}
    d.devices.desired = desired

    if coord is None or coord.phase == admin.Phase.STARTING:
        # Starting (or the coordinator is unreachable): make sure the workers it waits for exist.
        n = obs.scaling.from_devices if obs.scaling else obs.start_devices
        registered = set(coord.devices.registered) if coord is not None else set()
        d.create_pods = [i for i in range(n) if i not in obs.pods]
        d.scaling = obs.scaling
        d.devices.ready = len(registered & live)
        d.devices.warming = len(live - registered)
        d.phase = api.Phase.PENDING.value
        if coord is None:
            available = ("False", "CoordinatorUnreachable", "the coordinator's admin API does not answer yet"
                         + (f" ({obs.coordinator_error})" if obs.coordinator_error else ""))
        else:
            available = ("False", "Starting", f"{len(registered)} of {n} worker(s) registered")
        _conditions(d, obs, available=available, progressing=("True", "Starting", f"waiting for the coordinator "
                                                              f"and {n} worker(s)"))
        return d

    active = coord.devices.active
    registered = set(coord.devices.registered)
    healthy = coord.healthy
    d.devices.active = active
    d.devices.ready = len(registered & live)
    d.devices.warming = len(live - registered)
    par = coord.parallelism
    d.parallelism = api.ParallelismStatus(dp=par.dp, ep=par.ep, tp=par.tp)

    sc = obs.scaling
    if sc is None and coord.phase == admin.Phase.SCALING:
        sc = _followed(coord, now)
    backing_off = False
    if sc is None and desired != active and healthy:
        target = _step_target(active, desired, spec.devices.step)
        last = obs.last_scale
        ended = (_parse(last.started_at) or now) + datetime.timedelta(milliseconds=last.duration_ms) if last else None
        if (last is not None and last.outcome in (admin.Outcome.FAILED, admin.Outcome.ABORTED)
                and last.to_devices == target and ended is not None
                and (now - ended).total_seconds() < RETRY_AFTER_FAILURE_S):
            backing_off = True
        else:
            started_at = _iso(now)
            sc = api.ScalingStatus(**{"from": active, "to": target}, started_at=started_at,
                                   scale_id=scale_id(obs.name, active, target, started_at),
                                   reason=(f"Slo autoscaler: {obs.desired_reason}" if obs.desired_reason else
                                           f"spec.devices desired {desired}, active {active}")
                                          + (f", step {spec.devices.step}" if abs(desired - active) > spec.devices.step else ""),
                                   stage=WAITING_FOR_WORKERS if target > active else SCALING)
            d.events.append(("Normal", "ScalingUp" if target > active else "ScalingDown",
                             f"scaling {active} -> {target} devices: {sc.reason}"))

    if sc is not None:
        _advance(d, obs, sc, active, registered)
    else:
        # Steady: the workers of the active devices exist, and nothing else does.
        d.create_pods = [i for i in range(active) if i not in obs.pods]
        d.delete_pods = sorted(i for i in obs.pods if i >= active)

    failed = sorted(i for i, phase in obs.pods.items() if phase == "Failed" and i < active)
    if not healthy or failed:
        d.phase = api.Phase.DEGRADED.value
    elif d.scaling is not None:
        d.phase = api.Phase.SCALING.value
    else:
        d.phase = api.Phase.SERVING.value
    unhealthy = coord.error or "the coordinator reports unhealthy"
    available = ("True", "Serving", f"{active} device(s) serving") if healthy else ("False", "Unhealthy", unhealthy)
    progressing = (("True", "Scaling", f"{d.scaling.from_devices} -> {d.scaling.to_devices} devices, stage "
                    f"{d.scaling.stage}") if d.scaling is not None else ("False", "Stable", f"{active} of {desired} "
                                                                             "desired device(s) active"))
    degraded = None
    if not healthy:
        degraded = ("True", "Unhealthy", unhealthy)
    elif failed:
        degraded = ("True", "WorkerFailed", f"worker pod(s) of device(s) {failed} failed")
    _conditions(d, obs, available=available, progressing=progressing, degraded=degraded,
                scaling_active=("False", "BackingOff", f"the last scale failed; retrying after "
                                f"{RETRY_AFTER_FAILURE_S} s") if backing_off else None)
    return d


def _followed(coord: admin.AdminStatus, now: datetime.datetime) -> api.ScalingStatus:
    """A scale another client of the admin API started: followed, not fought."""
    reason = "started outside the operator (admin API)"
    cur = coord.current_scale
    if cur is None:
        return api.ScalingStatus(**{"from": coord.devices.active, "to": coord.devices.desired}, reason=reason,
                                 started_at=_iso(now), stage=SCALING)
    return api.ScalingStatus(**{"from": cur.from_devices, "to": cur.to_devices},
                             reason=f"{reason}: {cur.reason}" if cur.reason else reason, scale_id=cur.scale_id,
                             started_at=cur.started_at or _iso(now), stage=SCALING)


def _request(sc: api.ScalingStatus) -> admin.ScaleRequest:
    return admin.ScaleRequest(devices=sc.to_devices, reason=sc.reason, scale_id=sc.scale_id)


def _advance(d: Decision, obs: Observed, sc: api.ScalingStatus, active: int, registered: set[int]) -> None:
    """One step of a scale in progress."""
    coord, now = obs.coordinator, obs.now
    started = _parse(sc.started_at) or now
    up = sc.to_devices > sc.from_devices
    timed_out = (now - started).total_seconds() > obs.spec.scale_timeout_seconds
    d.scaling = sc
    if up and sc.stage == WAITING_FOR_WORKERS:
        if timed_out:
            waiting = [i for i in range(sc.to_devices) if i not in registered]
            return _end(d, sc, admin.Outcome.ABORTED, f"workers of device(s) {waiting} did not register within "
                        f"{obs.spec.scale_timeout_seconds} s", now, None,
                        delete=list(range(sc.from_devices, sc.to_devices)))
        d.create_pods = [i for i in range(sc.to_devices) if i not in obs.pods]
        if all(i in registered for i in range(sc.to_devices)):
            sc = d.scaling = sc.model_copy(update={"stage": SCALING})
            d.post_scale = _request(sc)
        return
    # stage Scaling: the coordinator moves the weights and switches traffic
    ours = coord.find_scale(sc.scale_id)
    if coord.phase == admin.Phase.SCALING or (ours is not None and ours.outcome == admin.Outcome.RUNNING):
        return
    # NOTE: which pods go is decided by what serves (`active`), never by the outcome alone.
    if active == sc.to_devices:  # the new configuration serves; down: the released devices idle
        _end(d, sc, ours.outcome if ours else admin.Outcome.SUCCEEDED, ours.message if ours else "", now, ours,
             delete=list(range(sc.to_devices, sc.from_devices)))
    elif active != sc.from_devices:
        _end(d, sc, admin.Outcome.FAILED, f"the coordinator has {active} active devices, neither "
             f"{sc.from_devices} nor {sc.to_devices}", now, ours, delete=[])
    elif ours is None:
        # Not started yet (or the POST was lost with a restarted operator): ask (again).
        d.post_scale = _request(sc)
    else:  # ended on the old configuration; up: the new pods serve nothing
        _end(d, sc, ours.outcome, ours.message or f"the coordinator reports {ours.outcome.value}", now, ours,
             delete=list(range(sc.from_devices, sc.to_devices)) if up else [])


def refuse(d: Decision, sc: api.ScalingStatus, message: str, now: datetime.datetime) -> None:
    """The coordinator refused the scale (HTTP 400): end it as failed, release new pods."""
    d.post_scale = None
    up = sc.to_devices > sc.from_devices
    _end(d, sc, admin.Outcome.FAILED, message, now, None,
         delete=list(range(sc.from_devices, sc.to_devices)) if up else [])


_EVENTS = {admin.Outcome.SUCCEEDED: ("Normal", "Scaled"), admin.Outcome.ABORTED: ("Warning", "ScaleAborted"),
           admin.Outcome.FAILED: ("Warning", "ScaleFailed")}


def _end(d: Decision, sc: api.ScalingStatus, outcome: admin.Outcome, message: str, now: datetime.datetime,
         coordinator_record: admin.ScaleRecord | None, delete: list[int]) -> None:
    assert outcome in admin.TERMINAL_OUTCOMES, outcome
    d.scaling = None
    d.delete_pods = sorted(set(d.delete_pods) | set(delete))
    d.finished = _record(sc, outcome, message, now, coordinator_record)
    etype, reason = _EVENTS[admin.Outcome(outcome)]
    if outcome == admin.Outcome.SUCCEEDED:
        text = (f"scaled {sc.from_devices} -> {sc.to_devices} devices in {d.finished.duration_ms / 1000:.1f} s "
                f"({sc.reason})")
    else:
        text = f"scale {sc.from_devices} -> {sc.to_devices} devices: {message}"
    d.events.append((etype, reason, text))


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
