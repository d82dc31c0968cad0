"""reconcile.decide on literal observations: no cluster, no clock."""

from __future__ import annotations

import datetime

import msgspec
import pytest

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api, reconcile

NOW = datetime.datetime(2026, 11, 24, 12, 0, 0, tzinfo=datetime.timezone.utc)


def _spec(**devices) -> api.ElasticMoESpec:
    return api.parse_spec({"devices": {"min": 1, "max": 8, "initial": 1, **devices}})


def _coord(active: int, registered=None, phase=admin.Phase.SERVING, desired=None, healthy=True, current=None,
           last=None, history=()) -> admin.AdminStatus:
    return admin.AdminStatus(
        phase=phase, healthy=healthy, error=None if healthy else "worker process(es) died",
        devices=admin.DeviceCounts(desired=desired or active, active=active,
                                   registered=list(range(active)) if registered is None else registered),
        parallelism=admin.Parallelism(dp=active, ep=active), current_scale=current, last_scale=last,
        history=list(history))


def _obs(spec, pods, coord, scaling=None, last_scale=None, now=NOW, start=1, error="") -> reconcile.Observed:
    return reconcile.Observed(name="demo", spec=spec, generation=3, now=now, pods=pods, coordinator=coord,
                              coordinator_error=error, scaling=scaling, last_scale=last_scale, start_devices=start)


def _scaling(frm: int, to: int, stage: str, started_at="2026-11-24T11:59:50Z") -> api.ScalingStatus:
    return api.ScalingStatus(**{"from": frm, "to": to}, reason="r", started_at=started_at, stage=stage,
                             scale_id=reconcile.scale_id("demo", frm, to, started_at))


def _record(sc: api.ScalingStatus, outcome: admin.Outcome, **fields) -> admin.ScaleRecord:
    """The coordinator's record of the scale the operator posted as `sc`."""
    return admin.ScaleRecord(from_devices=sc.from_devices, to_devices=sc.to_devices, reason=sc.reason,
                             scale_id=sc.scale_id, outcome=outcome, **fields)


def _running(*indices) -> dict[int, str]:
    return {i: "Running" for i in indices}


def test_starting_creates_the_workers_the_coordinator_waits_for():
    d = reconcile.decide(_obs(_spec(initial=2), {}, None, start=2, error="GET /admin/status: malformed body: x"))
    assert d.create_pods == [0, 1] and d.post_scale is None and d.phase == "Pending"
    assert d.conditions["Available"][:2] == ("False", "CoordinatorUnreachable")
    assert "malformed body" in d.conditions["Available"][2]


def test_a_starting_coordinator_is_waited_for_not_scaled():
    coord = _coord(0, registered=[0], phase=admin.Phase.STARTING, desired=2)
    d = reconcile.decide(_obs(_spec(initial=2), _running(0), coord, start=2))
    assert d.create_pods == [1] and d.post_scale is None and d.scaling is None and d.events == []
    assert d.phase == "Pending" and (d.devices.ready, d.devices.warming) == (1, 0)
    assert d.conditions["Available"][:2] == ("False", "Starting")


def test_steady_state_does_nothing_and_is_available():
    d = reconcile.decide(_obs(_spec(), _running(0), _coord(1)))
    assert (d.create_pods, d.delete_pods, d.post_scale, d.scaling, d.events) == ([], [], None, None, [])
    assert d.phase == "Serving" and d.devices == api.DevicesStatus(desired=1, ready=1, active=1, warming=0)
    assert d.conditions["Available"][0] == "True" and d.conditions["Degraded"][0] == "False"


def test_steady_state_removes_stray_pods_and_does_not_recreate_a_pod_the_coordinator_still_counts():
    d = reconcile.decide(_obs(_spec(initial=2), {1: "Running", 4: "Pending"}, _coord(2)))
    assert d.create_pods == [] and d.delete_pods == [4]
    assert d.phase == "Degraded" and d.conditions["Degraded"][:2] == ("True", "WorkerLost")
    assert "[0]" in d.conditions["Degraded"][2] and d.events[-1][:2] == ("Warning", "WorkerLost")


def test_scale_up_creates_pods_then_waits_for_registration():
    d = reconcile.decide(_obs(_spec(replicas=3, step=2), _running(0), _coord(1)))
    assert d.create_pods == [1, 2] and d.post_scale is None
    assert d.scaling.stage == reconcile.WAITING_FOR_WORKERS and (d.scaling.from_devices, d.scaling.to_devices) == (1, 3)
    assert d.scaling.scale_id == "demo-1-3-2026-11-24T120000Z" and d.scaling.started_at == "2026-11-24T12:00:00Z"
    assert d.events[0][:2] == ("Normal", "ScalingUp") and d.phase == "Scaling"


def test_scale_up_posts_once_every_new_worker_registered():
    sc = _scaling(1, 3, reconcile.WAITING_FOR_WORKERS)
    waiting = reconcile.decide(_obs(_spec(replicas=3), _running(0, 1, 2), _coord(1, registered=[0, 1]), scaling=sc))
    assert waiting.post_scale is None and waiting.devices.warming == 1
    ready = reconcile.decide(_obs(_spec(replicas=3), _running(0, 1, 2), _coord(1, registered=[0, 1, 2]), scaling=sc))
    assert ready.post_scale == admin.ScaleRequest(devices=3, reason="r", scale_id=sc.scale_id, wait=False)
    assert ready.scaling.stage == reconcile.SCALING and ready.scaling.scale_id == sc.scale_id


@pytest.mark.parametrize("name, frm, to, started_at, expected", [
    ("demo", 1, 2, "2026-11-24T12:00:00Z", "demo-1-2-2026-11-24T120000Z"),
    ("a.b", 12, 4, "2026-11-24T12:00:00.250+00:00", "a.b-12-4-2026-11-24T120000.2500000"),
    ("x", 1, 2, "", "x-1-2-"),
])
def test_scale_id_is_derived_from_the_scale_and_safe_to_log(name, frm, to, started_at, expected):
    assert reconcile.scale_id(name, frm, to, started_at) == expected


def test_a_restarted_operator_posts_under_the_same_scale_id():
    first = reconcile.decide(_obs(_spec(initial=3, replicas=2), _running(0, 1, 2), _coord(3)))
    restored = api.ScalingStatus.model_validate(first.scaling.dump())  # what status.scaling gives back
    again = reconcile.decide(_obs(_spec(initial=3, replicas=2), _running(0, 1, 2), _coord(3),
                                  scaling=restored, now=NOW + datetime.timedelta(seconds=40)))
    assert first.post_scale is not None and again.post_scale == first.post_scale


def test_scale_moves_by_at_most_step():
    d = reconcile.decide(_obs(_spec(replicas=8, step=2), _running(0), _coord(1)))
    assert d.scaling.to_devices == 3 and d.create_pods == [1, 2]


def test_scale_down_asks_first_then_deletes_exactly_the_released_pods():
    spec = _spec(initial=3, replicas=1, step=2)
    d = reconcile.decide(_obs(spec, _running(0, 1, 2), _coord(3)))
    assert d.post_scale.devices == 1 and d.post_scale.scale_id == d.scaling.scale_id
    assert d.delete_pods == [] and d.events[0][1] == "ScalingDown"
    running = _record(d.scaling, admin.Outcome.RUNNING)
    busy = reconcile.decide(_obs(spec, _running(0, 1, 2), _coord(3, phase=admin.Phase.SCALING, desired=1,
                                                                  current=running), scaling=d.scaling))
    assert busy.post_scale is None and busy.delete_pods == [] and busy.finished is None
    last = _record(d.scaling, admin.Outcome.SUCCEEDED, phases_ms={"switch": 12}, bytes_transferred=7,
                   transfer_data_ms=5, requests_handed_over=2)
    done = reconcile.decide(_obs(spec, _running(0, 1, 2), _coord(1, registered=[0], last=last), scaling=d.scaling))
    assert done.delete_pods == [1, 2] and done.scaling is None
    assert done.finished.outcome == "Succeeded" and done.finished.phases_ms == {"switch": 12}
    assert (done.finished.bytes_transferred, done.finished.transfer_data_ms, done.finished.requests_handed_over) == (7, 5, 2)
    assert done.finished.scale_id == d.scaling.scale_id and done.events[-1][1] == "Scaled"


def test_the_operator_waits_while_its_scale_runs():
    sc = _scaling(1, 2, reconcile.SCALING)
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(1, current=_record(sc, admin.Outcome.RUNNING)),
                              scaling=sc))
    assert d.post_scale is None and d.finished is None and d.scaling == sc


@pytest.mark.parametrize("outcome, event", [(admin.Outcome.ABORTED, "ScaleAborted"),
                                            (admin.Outcome.FAILED, "ScaleFailed")])
def test_a_scale_up_that_ended_on_the_old_configuration_releases_its_new_pods_and_backs_off(outcome, event):
    sc = _scaling(1, 2, reconcile.SCALING)
    last = _record(sc, outcome, message="new worker(s) died")
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(1, last=last), scaling=sc))
    assert d.delete_pods == [1] and d.finished.outcome == outcome.value and d.finished.message == "new worker(s) died"
    assert d.events[-1][:2] == ("Warning", event) and d.post_scale is None
    again = reconcile.decide(_obs(_spec(replicas=2), _running(0), _coord(1), last_scale=d.finished))
    assert again.scaling is None and again.conditions["ScalingActive"][:2] == ("False", "BackingOff")
    later = reconcile.decide(_obs(_spec(replicas=2), _running(0), _coord(1), last_scale=d.finished,
                                  now=NOW + datetime.timedelta(seconds=reconcile.RETRY_AFTER_FAILURE_S + 5)))
    assert later.scaling is not None and later.create_pods == [1]


def test_the_record_of_another_scale_is_not_taken_for_ours():
    sc = _scaling(1, 2, reconcile.SCALING)
    other = admin.ScaleRecord(from_devices=1, to_devices=2, reason="r", scale_id="someone-else",
                              outcome=admin.Outcome.ABORTED, message="not ours")
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(1, last=other), scaling=sc))
    assert d.finished is None and d.post_scale.scale_id == sc.scale_id  # ours never started: ask again


def test_our_record_is_found_in_history_behind_later_scales():
    sc = _scaling(1, 2, reconcile.SCALING)
    ours = _record(sc, admin.Outcome.ABORTED, message="transfer timed out")
    later = admin.ScaleRecord(from_devices=1, to_devices=3, scale_id="later", outcome=admin.Outcome.FAILED)
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(1, last=later, history=[ours, later]),
                              scaling=sc))
    assert d.finished.outcome == "Aborted" and d.finished.message == "transfer timed out" and d.delete_pods == [1]


def test_a_failure_after_the_switch_keeps_the_pods_that_serve():
    sc = _scaling(1, 2, reconcile.SCALING)
    last = _record(sc, admin.Outcome.FAILED, message="commit failed")
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(2, last=last), scaling=sc))
    assert d.finished.outcome == "Failed" and d.delete_pods == [] and d.events[-1][1] == "ScaleFailed"


def test_a_refused_scale_fails_and_releases_its_new_pods():
    sc = _scaling(1, 2, reconcile.SCALING)
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(1, registered=[0, 1]), scaling=sc))
    assert d.post_scale is not None
    reconcile.refuse(d, _obs(_spec(replicas=2), _running(0, 1), _coord(1, registered=[0, 1]), scaling=sc),
                     "the coordinator refused the scale (HTTP 400): devices: got 2")
    assert d.post_scale is None and d.finished.outcome == "Failed" and d.delete_pods == [1]
    assert d.events[-1][:2] == ("Warning", "ScaleFailed")


def test_workers_that_never_register_abort_the_scale_after_the_timeout():
    sc = _scaling(1, 2, reconcile.WAITING_FOR_WORKERS, started_at="2026-11-24T11:00:00Z")
    d = reconcile.decide(_obs(_spec(replicas=2), {0: "Running", 1: "Pending"}, _coord(1), scaling=sc))
    assert d.finished.outcome == "Aborted" and d.delete_pods == [1] and d.scaling is None
    assert "[1]" in d.finished.message and d.events[-1][:2] == ("Warning", "ScaleAborted")


@pytest.mark.parametrize("stage", [reconcile.WAITING_FOR_WORKERS, reconcile.SCALING])
def test_a_resumed_scale_that_already_finished_is_recorded_once(stage):
    sc = _scaling(1, 2, stage)
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(2), scaling=sc))
    if stage == reconcile.SCALING:
        assert d.finished.outcome == "Succeeded" and d.post_scale is None
    else:  # registered already: the scale is posted again; the coordinator answers "already 2"
        assert d.post_scale.devices == 2 or d.finished is not None


def test_a_failed_worker_pod_degrades_the_instance():
    d = reconcile.decide(_obs(_spec(initial=2), {0: "Running", 1: "Failed"}, _coord(2, healthy=False)))
    assert d.phase == "Degraded" and d.conditions["Degraded"][:2] == ("True", "Unhealthy")
    assert d.conditions["Available"][0] == "False" and d.scaling is None


def test_a_scale_started_outside_the_operator_is_followed_not_fought():
    d = reconcile.decide(_obs(_spec(), _running(0, 1), _coord(1, phase=admin.Phase.SCALING, desired=2)))
    assert d.post_scale is None and d.scaling.to_devices == 2 and d.delete_pods == []
    theirs = admin.ScaleRecord(from_devices=1, to_devices=2, reason="load test", scale_id="cli-7",
                               started_at="2026-11-24T11:59:58.5Z")
    d = reconcile.decide(_obs(_spec(), _running(0, 1), _coord(1, phase=admin.Phase.SCALING, desired=2,
                                                              current=theirs)))
    assert (d.scaling.scale_id, d.scaling.started_at) == ("cli-7", "2026-11-24T11:59:58.5Z") and d.post_scale is None
    assert "load test" in d.scaling.reason
    ended = msgspec.structs.replace(theirs, outcome=admin.Outcome.SUCCEEDED)
    done = reconcile.decide(_obs(_spec(), _running(0, 1), _coord(2, last=ended), scaling=d.scaling))
    assert done.finished.outcome == "Succeeded" and done.finished.scale_id == "cli-7"
    assert done.finished.duration_ms == 1500  # from its own start


def test_merge_conditions_keeps_transition_time_while_status_holds():
    old = [{"type": "Available", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    new = reconcile.merge_conditions(old, {"Available": ("True", "Serving", ""), "Degraded": ("False", "AsExpected", "")},
                                     7, NOW)
    assert new[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and new[0]["observedGeneration"] == 7
    assert new[1]["lastTransitionTime"] == "2026-11-24T12:00:00Z"
    flipped = reconcile.merge_conditions(new, {"Available": ("False", "Unhealthy", "x")}, 7, NOW)
    assert flipped[0]["lastTransitionTime"] == "2026-11-24T12:00:00Z"


@pytest.mark.parametrize("mode, status, reason", [("Disabled", "False", "AutoscalingDisabled"),
                                                  ("External", "True", "ExternalAutoscaler")])
def test_metrics_condition_says_who_scales(mode, status, reason):
    spec = api.parse_spec({"autoscaling": {"mode": mode}})
    d = reconcile.decide(_obs(spec, _running(0), _coord(1)))
    assert d.conditions["MetricsAvailable"][:2] == (status, reason)


def test_in_slo_mode_the_condition_is_the_policys_and_the_scale_carries_its_reason():
    spec = api.parse_spec({"devices": {"min": 1, "max": 4, "initial": 1, "replicas": 2},
                           "autoscaling": {"mode": "Slo", "prometheusUrl": "http://p:9090"}})
    d = reconcile.decide(_obs(spec, _running(0), _coord(1)))
    assert d.conditions["MetricsAvailable"][:2] == ("Unknown", "NotEvaluated")
    assert d.scaling.reason == "spec.devices desired 2, active 1"
    obs = _obs(spec, _running(0), _coord(1))
    obs.desired_reason = "SLO signal 1.50 (TTFT p90 3000 ms / 2000) above 1.00: 1 -> 2 devices"
    obs.metrics_condition = ("True", "SloBreached", obs.desired_reason)
    d = reconcile.decide(obs)
    assert d.conditions["MetricsAvailable"] == obs.metrics_condition
    assert d.scaling.reason == f"Slo autoscaler: {obs.desired_reason}"
    assert d.events[0][1] == "ScalingUp" and obs.desired_reason in d.events[0][2]


# -- a lost worker is replaced; a restarting coordinator keeps its workers -----------------------
def _conditions(**by_type) -> list[dict]:
    """status.conditions as the last tick wrote them: type -> (status, reason)."""
    return [{"type": t, "status": s, "reason": r, "message": "m", "lastTransitionTime": "2026-11-24T11:59:30Z"}
            for t, (s, r) in by_type.items()]


SERVING_BEFORE = _conditions(Available=("True", "Serving"), Degraded=("False", "AsExpected"))


def _ids(active_ids, registered=None, **kw) -> admin.AdminStatus:
    coord = _coord(len(active_ids), registered=sorted(active_ids) if registered is None else registered, **kw)
    coord.devices.active_ids = list(active_ids)
    return coord


def _recovery(frm: int, to: int, outcome=admin.Outcome.SUCCEEDED, device=1) -> admin.ScaleRecord:
    return admin.ScaleRecord(from_devices=frm, to_devices=to, scale_id="recovery-7", outcome=outcome,
                             reason=f"recovery: worker process(es) died: device {device} (heartbeats stopped for 5 s)",
                             duration_ms=6590 if outcome == admin.Outcome.SUCCEEDED else 0, tokens_recomputed=40)


@pytest.mark.parametrize("active, n", [([0, 1, 2], 4), ([0, 2], 3), ([1, 2], 3), ([1, 2], 4), ([0, 3, 5], 5),
                                       ([1, 2], 1), ([0, 2, 4], 2)])
def test_target_devices_are_the_ones_the_coordinator_takes(active, n):
    from elasticmoe_worker import planner
    assert reconcile.target_devices(active, n) == list(planner.resize(active, n))


def test_a_failed_worker_pod_is_deleted_with_an_event_and_replaced_only_after_the_coordinator_dropped_it():
    obs = _obs(_spec(initial=2), {0: "Running", 1: "Failed"}, _ids([0, 1]))
    obs.pod_details, obs.conditions = {1: "exit code 137, Error"}, SERVING_BEFORE
    d = reconcile.decide(obs)
    assert d.delete_pods == [1] and d.create_pods == [] and d.scaling is None
    assert ("Warning", "WorkerFailed") == d.events[0][:2] and "demo-worker-1" in d.events[0][2]
    assert "exit code 137" in d.events[0][2]
    assert d.phase == "Degraded" and d.conditions["Degraded"][:2] == ("True", "WorkerLost")
    # deleted now; the coordinator still counts device 1: no pod under its id yet
    gone = _obs(_spec(initial=2), _running(0), _ids([0, 1]))
    gone.conditions = _conditions(Available=("True", "Serving"), Degraded=("True", "WorkerLost"))
    d = reconcile.decide(gone)
    assert (d.create_pods, d.delete_pods, d.events) == ([], [], [])  # the same reason: no second event


def test_the_coordinators_recovery_is_followed_and_recorded_then_the_lost_device_is_replaced():
    spec = _spec(initial=3)
    lost_before = _conditions(Available=("True", "Serving"), Degraded=("True", "WorkerLost"))
    running = _recovery(3, 2, admin.Outcome.RUNNING)
    obs = _obs(spec, _running(0, 2), _ids([0, 1, 2], phase=admin.Phase.SCALING, desired=2, current=running))
    obs.conditions = lost_before
    d = reconcile.decide(obs)
    assert d.scaling.scale_id == "recovery-7" and d.post_scale is None and (d.create_pods, d.delete_pods) == ([], [])
    assert d.scaling.reason.startswith("the coordinator's recovery: worker process(es) died: device 1")
    assert d.conditions["Degraded"][:2] == ("True", "Recovering") and d.events[-1][:2] == ("Warning", "Recovering")

    # it ended: serving on the survivors 0 and 2; recorded, and the operator scales back to 3
    done = _recovery(3, 2)
    obs = _obs(spec, _running(0, 2), _ids([0, 2], last=done, history=[done]), scaling=d.scaling)
    obs.conditions = _conditions(Available=("True", "Serving"), Degraded=("True", "Recovering"))
    d = reconcile.decide(obs)
    assert d.finished.scale_id == "recovery-7" and d.finished.outcome == "Succeeded"
    assert d.finished.tokens_recomputed == 40 and d.scaling is None and d.finished.duration_ms == 6590
    assert ("Warning", "RecoveredOnSurvivors") in [e[:2] for e in d.events]
    assert d.conditions["Degraded"][:2] == ("True", "ReplacingLostDevices") and d.phase == "Degraded"

    obs = _obs(spec, _running(0, 2), _ids([0, 2], last=done, history=[done]), last_scale=d.finished)
    obs.conditions = _conditions(Available=("True", "Serving"), Degraded=("True", "ReplacingLostDevices"))
    d = reconcile.decide(obs)
    assert (d.scaling.from_devices, d.scaling.to_devices) == (2, 3) and d.create_pods == [1]
    assert d.scaling.reason.startswith("replacing lost device(s): 2 of 3 desired serve since recovery: ")
    assert d.events == [("Normal", "ScalingUp", f"scaling 2 -> 3 devices: {d.scaling.reason}")]
    assert d.conditions["Degraded"][:2] == ("True", "ReplacingLostDevices") and "scaling 2 -> 3" in \
        d.conditions["Degraded"][2]
    sc = d.scaling
    obs = _obs(spec, _running(0, 1, 2), _ids([0, 2], registered=[0, 1, 2], last=done, history=[done]), scaling=sc)
    d = reconcile.decide(obs)
    assert d.post_scale.devices == 3

    # the replacement scale served: Degraded clears with an event
    ours = _record(sc, admin.Outcome.SUCCEEDED)
    obs = _obs(spec, _running(0, 1, 2), _ids([0, 1, 2], last=ours, history=[done, ours]), scaling=d.scaling)
    obs.conditions = _conditions(Available=("True", "Serving"), Degraded=("True", "ReplacingLostDevices"))
    d = reconcile.decide(obs)
    assert d.finished.outcome == "Succeeded" and d.phase == "Serving" and d.delete_pods == []
    assert d.conditions["Degraded"][0] == "False"
    assert [e[1] for e in d.events] == ["Scaled", "Recovered"] and "after 30 s degraded" in d.events[1][2]


def test_after_device_0_was_lost_the_survivors_pods_are_kept():
    """Device 0 was lost: 1 and 2 serve. Steady at 2 desired: no pod of a serving device goes
    (a count-based rule would have deleted pod 2); a scale down releases the highest id."""
    spec = _spec(initial=2)
    d = reconcile.decide(_obs(spec, _running(1, 2), _ids([1, 2])))
    assert (d.create_pods, d.delete_pods, d.phase) == ([], [], "Serving")
    down = _spec(initial=2, replicas=1)
    d = reconcile.decide(_obs(down, _running(1, 2), _ids([1, 2])))
    sc = d.scaling
    done = reconcile.decide(_obs(down, _running(1, 2), _ids([1], last=_record(sc, admin.Outcome.SUCCEEDED)),
                                 scaling=sc))
    assert done.delete_pods == [2] and done.finished.outcome == "Succeeded"


def test_a_lost_devices_pod_still_running_after_the_recovery_is_made_afresh():
    """Cut off (say SIGSTOP) past the heartbeat timeout: the coordinator dropped device 1 but its
    pod still runs; the replacement deletes it first and creates it again next tick."""
    done = _recovery(2, 1)
    obs = _obs(_spec(initial=2), _running(0, 1), _ids([0], last=done, history=[done]))
    obs.recorded = {done.scale_id}  # the operator has recorded the recovery
    d = reconcile.decide(obs)
    assert d.scaling.to_devices == 2 and d.delete_pods == [1] and d.create_pods == []
    again = reconcile.decide(_obs(_spec(initial=2), _running(0), _ids([0], last=done, history=[done]),
                                  scaling=d.scaling))
    assert again.create_pods == [1] and again.delete_pods == []


def test_a_recovery_that_began_and_ended_between_two_ticks_is_recorded_then_the_device_replaced():
    """A tiny model recovers in well under the 1 s tick: the operator never saw it run. It is
    recorded (history, lastScale, an Event) on the tick that finds it, as a followed one is;
    the replacement starts on the next tick, and the record is not made twice."""
    done = _recovery(2, 1)
    obs = _obs(_spec(initial=2), _running(0), _ids([0], last=done, history=[done]))
    obs.conditions = _conditions(Available=("True", "Serving"), Degraded=("True", "WorkerLost"))
    d = reconcile.decide(obs)
    assert d.unseen.scale_id == "recovery-7" and d.unseen.outcome == "Succeeded" and d.finished is None
    assert (d.unseen.from_devices, d.unseen.to_devices, d.unseen.duration_ms) == (2, 1, 6590)
    assert d.unseen.tokens_recomputed == 40 and d.unseen.reason.startswith("the coordinator's recovery: ")
    assert d.scaling is None and d.create_pods == [] and d.post_scale is None
    assert [e[:2] for e in d.events] == [("Warning", "RecoveredOnSurvivors"), ("Warning", "ReplacingLostDevices")]
    assert d.conditions["Degraded"][:2] == ("True", "ReplacingLostDevices")

    obs = _obs(_spec(initial=2), _running(0), _ids([0], last=done, history=[done]), last_scale=d.unseen)
    obs.recorded = {done.scale_id}
    obs.conditions = _conditions(Available=("True", "Serving"), Degraded=("True", "ReplacingLostDevices"))
    d = reconcile.decide(obs)
    assert d.unseen is None and (d.scaling.from_devices, d.scaling.to_devices) == (1, 2) and d.create_pods == [1]
    assert [e[1] for e in d.events] == ["ScalingUp"]


def test_a_registered_device_without_its_pod_gets_no_new_pod_while_the_coordinator_holds_it():
    sc = _scaling(1, 2, reconcile.WAITING_FOR_WORKERS)
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0), _ids([0], registered=[0, 1]), scaling=sc))
    assert d.create_pods == [] and d.post_scale is not None  # registered already: the scale goes on


def test_a_scale_up_by_the_user_after_serving_is_not_degraded():
    ok = admin.ScaleRecord(from_devices=1, to_devices=2, scale_id="x", outcome=admin.Outcome.SUCCEEDED)
    coord = _ids([0, 1], history=[_recovery(2, 1), ok])
    d = reconcile.decide(_obs(_spec(initial=2, replicas=3), _running(0, 1), coord))
    assert d.phase == "Scaling" and d.conditions["Degraded"][0] == "False"
    assert d.scaling.reason == "spec.devices desired 3, active 2"


@pytest.mark.parametrize("coord, reason", [
    (None, "CoordinatorUnavailable"),
    (_coord(0, registered=[1], phase=admin.Phase.STARTING, desired=2), "CoordinatorRestarting")])
def test_a_restarting_coordinator_keeps_its_workers_and_degrades_the_instance(coord, reason):
    obs = _obs(_spec(initial=1, replicas=3), _running(1, 2), coord, start=1, error="connection refused")
    obs.conditions = SERVING_BEFORE
    d = reconcile.decide(obs)
    assert (d.create_pods, d.delete_pods, d.post_scale) == ([], [], None)  # pod 0 is missing: not made now
    assert d.phase == "Degraded" and d.conditions["Degraded"][:2] == ("True", reason)
    assert d.conditions["Available"][:2] == ("False", reason) and d.events[-1][:2] == ("Warning", reason)
    # still down on the next tick (a restarted operator reads the same from status): no event again
    obs.conditions = _conditions(Available=("False", reason), Degraded=("True", reason))
    again = reconcile.decide(obs)
    assert again.phase == "Degraded" and again.events == [] and again.create_pods == []
    # it serves again with the workers it adopted
    back = _obs(_spec(initial=1, replicas=3), _running(1, 2), _ids([1, 2]), start=1)
    back.conditions = obs.conditions
    d = reconcile.decide(back)
    assert d.delete_pods == [] and d.scaling.to_devices == 3 and d.create_pods == [0]
    assert d.conditions["Degraded"][0] == "False" and ("Normal", "Recovered") in [e[:2] for e in d.events]


def test_a_restarting_coordinator_with_no_worker_left_gets_new_ones_as_at_first():
    obs = _obs(_spec(initial=2), {0: "Succeeded"}, None, start=2, error="connection refused")
    obs.conditions = _conditions(Available=("False", "CoordinatorUnavailable"),
                                 Degraded=("True", "CoordinatorUnavailable"))
    d = reconcile.decide(obs)
    assert d.delete_pods == [0] and d.create_pods == []  # all at once, when the ended one is gone
    assert d.phase == "Degraded" and d.conditions["Degraded"][:2] == ("True", "CoordinatorRestarting")
    assert "no worker pod is left" in d.conditions["Degraded"][2]
    obs.pods = {}
    assert reconcile.decide(obs).create_pods == [0, 1]


@pytest.mark.parametrize("status, detail", [
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
     "exit code 137, OOMKilled"),
    ({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."},
     "Evicted, The node was low on resource: memory."),
    ({"phase": "Succeeded"}, ""),
])
def test_an_ended_pods_detail_is_what_the_kubelet_reported(status, detail):
    from elasticmoe_operator import handlers
    assert handlers._pod_detail({"metadata": {}, "status": status}) == detail
