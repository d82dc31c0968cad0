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
A scale that does not reach Scaling within `scaleTimeoutSeconds` is rolled back (its new pods
deleted). Not guaranteed: a worker pod that fails while serving is reported (Degraded), not
replaced: the coordinator has lost that device's memory and only a scale can repair it.
"""

from __future__ import annotations

import dataclasses
import datetime

from elasticmoe_operator import api

WAITING_FOR_WORKERS = "WaitingForWorkers"
SCALING = "Scaling"
RETRY_AFTER_FAILURE_S = 30


@dataclasses.dataclass
class Observed:
    spec: api.ElasticMoESpec
    generation: int
    now: datetime.datetime
    pods: dict[int, str]  # device index -> pod phase (Pending, Running, Succeeded, Failed)
    coordinator: dict | None  # GET /admin/status, None while unreachable
    scaling: api.ScalingStatus | None  # the scale in progress
    last_scale: api.ScaleRecord | None
    start_devices: int  # devices the coordinator Deployment starts with


@dataclasses.dataclass
class Decision:
    create_pods: list[int] = dataclasses.field(default_factory=list)
    delete_pods: list[int] = dataclasses.field(default_factory=list)
    post_scale: int | None = None  # POST /admin/scale {"devices": post_scale, "reason": scale_reason}
    scale_reason: str = ""
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
    try:
        return datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return None


def scale_tag(scaling: api.ScalingStatus) -> str:
    """Marks the coordinator's record of this scale (its reason ends with it)."""
    return f"[elasticmoe-operator {scaling.from_devices}->{scaling.to_devices} {scaling.started_at}]"


def _record(scaling: api.ScalingStatus, outcome: str, message: str, now: datetime.datetime,
            coordinator_record: dict | None = None) -> api.ScaleRecord:
    started = _parse(scaling.started_at) or now
    rec = api.ScaleRecord(**{"from": scaling.from_devices, "to": scaling.to_devices}, reason=scaling.reason,
                          started_at=scaling.started_at, outcome=outcome, message=message,
                          duration_ms=int((now - started).total_seconds() * 1000))
    if coordinator_record:
        rec.phases_ms = {k: int(round(v * 1000)) for k, v in (coordinator_record.get("phases") or {}).items()}
        rec.bytes_transferred = int(coordinator_record.get("bytes_transferred") or 0)
        rec.requests_handed_over = int(coordinator_record.get("requests_handed_over") or 0)
    return rec


def _ours(coordinator: dict, scaling: api.ScalingStatus) -> dict | None:
    """The coordinator's last record if it is of this scale."""
    last = coordinator.get("lastScale") or {}
    return last if str(last.get("reason", "")).endswith(scale_tag(scaling)) else None


def _step_target(active: int, desired: int, step: int) -> int:
    delta = max(-step, min(step, desired - active))
    return active + delta


def decide(obs: Observed) -> Decision:
    d = Decision()
    spec, coord, now = obs.spec, obs.coordinator, obs.now
    desired = spec.devices.desired
    live = {i for i, phase in obs.pods.items() if phase in ("Pending", "Running")}
    d.devices.desired = desired

    if coord is None:
        # Starting (or the coordinator is unreachable): make sure the workers it waits for exist.
        n = obs.scaling.from_devices if obs.scaling else obs.start_devices
        d.create_pods = [i for i in range(n) if i not in obs.pods]
        d.scaling = obs.scaling
        d.devices.warming = len(live)
        d.phase = api.Phase.PENDING.value
        _conditions(d, obs, available=("False", "CoordinatorUnreachable", "the coordinator's admin API does not "
                                       "answer yet"), progressing=("True", "Starting", f"waiting for the coordinator "
                                       f"and {n} worker(s)"))
        return d

    active = int(coord["devices"]["active"])
    registered = set(coord["devices"].get("registered") or [])
    healthy = bool(coord.get("healthy"))
    d.devices.active = active
    d.devices.ready = len(registered & live)
    d.devices.warming = len(live - registered)
    par = coord.get("parallelism") or {}
    d.parallelism = api.ParallelismStatus(dp=par.get("dp", 0), ep=par.get("ep", 0), tp=par.get("tp", 0))

    sc = obs.scaling
    if sc is None and coord.get("phase") == "Scaling":
        # A scale we did not start (another client of the admin API): follow it, do not fight it.
        sc = api.ScalingStatus(**{"from": active, "to": int(coord["devices"]["desired"])}, reason="started outside "
                               "the operator (admin API)", started_at=_iso(now), stage=SCALING)
    backing_off = False
    if sc is None and desired != active and healthy:
        last = obs.last_scale
        ended = (_parse(last.started_at) or now) + datetime.timedelta(milliseconds=last.duration_ms) if last else None
        if (last is not None and last.outcome in ("Failed", "RolledBack") and last.to_devices ==
                _step_target(active, desired, spec.devices.step) and ended is not None
                and (now - ended).total_seconds() < RETRY_AFTER_FAILURE_S):
            backing_off = True
        else:
            target = _step_target(active, desired, spec.devices.step)
            sc = api.ScalingStatus(**{"from": active, "to": target}, started_at=_iso(now),
                                   reason=f"spec.devices desired {desired}, active {active}"
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
    available = ("True", "Serving", f"{active} device(s) serving") if healthy else (
        "False", "Unhealthy", str(coord.get("error") or "the coordinator reports unhealthy"))
    progressing = (("True", "Scaling", f"{d.scaling.from_devices} -> {d.scaling.to_devices} devices, stage "
                    f"{d.scaling.stage}") if d.scaling is not None else ("False", "Stable", f"{active} of {desired} "
                                                                             "desired device(s) active"))
    degraded = None
    if not healthy:
        degraded = ("True", "Unhealthy", str(coord.get("error") or "the coordinator reports unhealthy"))
    elif failed:
        degraded = ("True", "WorkerFailed", f"worker pod(s) of device(s) {failed} failed")
    _conditions(d, obs, available=available, progressing=progressing, degraded=degraded,
                scaling_active=("False", "BackingOff", f"the last scale failed; retrying after "
                                f"{RETRY_AFTER_FAILURE_S} s") if backing_off else None)
    return d


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
            return _end(d, sc, "RolledBack", f"workers of device(s) {waiting} did not register within "
                        f"{obs.spec.scale_timeout_seconds} s", now, None,
                        delete=list(range(sc.from_devices, sc.to_devices)))
        d.create_pods = [i for i in range(sc.to_devices) if i not in obs.pods]
        if all(i in registered for i in range(sc.to_devices)):
            sc = d.scaling = sc.model_copy(update={"stage": SCALING})
            d.post_scale, d.scale_reason = sc.to_devices, f"{sc.reason} {scale_tag(sc)}"
        return
    # stage Scaling: the coordinator moves the weights and switches traffic
    ours = _ours(coord, sc)
    if coord.get("phase") == "Scaling":
        return
    if active == sc.to_devices:
        _end(d, sc, "Succeeded", "", now, ours, delete=list(range(sc.to_devices, sc.from_devices)))
        return
    if ours is not None and ours.get("outcome") in ("aborted", "failed"):
        _end(d, sc, "Failed", str(ours.get("error") or ours.get("outcome")), now, ours,
             delete=list(range(sc.from_devices, sc.to_devices)) if up else [])
        return
    if active != sc.from_devices:
        _end(d, sc, "Failed", f"the coordinator has {active} active devices, neither {sc.from_devices} nor "
             f"{sc.to_devices}", now, ours, delete=[])
        return
    # Not started yet (or the POST was lost with a restarted operator): ask (again).
    d.post_scale, d.scale_reason = sc.to_devices, f"{sc.reason} {scale_tag(sc)}"


def refuse(d: Decision, sc: api.ScalingStatus, message: str, now: datetime.datetime) -> None:
    """The coordinator refused the scale (HTTP 400): end it as failed, release new pods."""
    d.post_scale = None
    up = sc.to_devices > sc.from_devices
    _end(d, sc, "Failed", message, now, None, delete=list(range(sc.from_devices, sc.to_devices)) if up else [])


def _end(d: Decision, sc: api.ScalingStatus, outcome: str, message: str, now: datetime.datetime,
         coordinator_record: dict | None, delete: list[int]) -> None:
    d.scaling = None
    d.delete_pods = sorted(set(d.delete_pods) | set(delete))
    d.finished = _record(sc, outcome, message, now, coordinator_record)
    if outcome == "Succeeded":
        d.events.append(("Normal", "Scaled", f"scaled {sc.from_devices} -> {sc.to_devices} devices in "
                         f"{d.finished.duration_ms / 1000:.1f} s ({sc.reason})"))
    else:
        d.events.append(("Warning", "ScaleFailed" if outcome == "Failed" else "ScaleRolledBack",
                         f"scale {sc.from_devices} -> {sc.to_devices} devices: {message}"))


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
        api.AutoscalingMode.SLO.value: ("False", "PolicyNotImplemented", "the built-in SLO policy is not "
                                        "implemented in this version; use mode External with an HPA or KEDA"),
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
