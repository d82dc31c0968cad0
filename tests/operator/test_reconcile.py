"""reconcile.decide on literal observations: no cluster, no clock."""

from __future__ import annotations

import datetime

import pytest

from elasticmoe_operator import api, reconcile

NOW = datetime.datetime(2026, 11, 24, 12, 0, 0, tzinfo=datetime.timezone.utc)


def _spec(**devices) -> api.ElasticMoESpec:
    return api.parse_spec({"devices": {"min": 1, "max": 8, "initial": 1, **devices}})


def _coord(active: int, registered=None, phase="Serving", desired=None, healthy=True, last=None) -> dict:
    return {"phase": phase, "healthy": healthy, "error": None if healthy else "worker process(es) died",
            "devices": {"desired": desired or active, "active": active, "warming": 0,
                        "registered": list(range(active)) if registered is None else registered},
            "parallelism": {"dp": active, "ep": active, "tp": 1}, "lastScale": last}


def _obs(spec, pods, coord, scaling=None, last_scale=None, now=NOW, start=1) -> reconcile.Observed:
    return reconcile.Observed(spec=spec, generation=3, now=now, pods=pods, coordinator=coord, scaling=scaling,
                              last_scale=last_scale, start_devices=start)


def _running(*indices) -> dict[int, str]:
    return {i: "Running" for i in indices}


def test_starting_creates_the_workers_the_coordinator_waits_for():
    d = reconcile.decide(_obs(_spec(initial=2), {}, None, start=2))
    assert d.create_pods == [0, 1] and d.post_scale is None and d.phase == "Pending"
    assert d.conditions["Available"][:2] == ("False", "CoordinatorUnreachable")


def test_steady_state_does_nothing_and_is_available():
    d = reconcile.decide(_obs(_spec(), _running(0), _coord(1)))
    assert (d.create_pods, d.delete_pods, d.post_scale, d.scaling, d.events) == ([], [], None, None, [])
    assert d.phase == "Serving" and d.devices == api.DevicesStatus(desired=1, ready=1, active=1, warming=0)
    assert d.conditions["Available"][0] == "True" and d.conditions["Degraded"][0] == "False"


def test_steady_state_removes_stray_pods_and_recreates_missing_ones():
    d = reconcile.decide(_obs(_spec(initial=2), {1: "Running", 4: "Pending"}, _coord(2)))
    assert d.create_pods == [0] and d.delete_pods == [4]


def test_scale_up_creates_pods_then_waits_for_registration():
    d = reconcile.decide(_obs(_spec(replicas=3, step=2), _running(0), _coord(1)))
    assert d.create_pods == [1, 2] and d.post_scale is None
    assert d.scaling.stage == reconcile.WAITING_FOR_WORKERS and (d.scaling.from_devices, d.scaling.to_devices) == (1, 3)
    assert d.events[0][:2] == ("Normal", "ScalingUp") and d.phase == "Scaling"


def test_scale_up_posts_once_every_new_worker_registered():
    sc = api.ScalingStatus(**{"from": 1, "to": 3}, reason="r", started_at="2026-11-24T11:59:50Z",
                           stage=reconcile.WAITING_FOR_WORKERS)
    waiting = reconcile.decide(_obs(_spec(replicas=3), _running(0, 1, 2), _coord(1, registered=[0, 1]), scaling=sc))
    assert waiting.post_scale is None and waiting.devices.warming == 1
    ready = reconcile.decide(_obs(_spec(replicas=3), _running(0, 1, 2), _coord(1, registered=[0, 1, 2]), scaling=sc))
    assert ready.post_scale == 3 and ready.scaling.stage == reconcile.SCALING
    assert ready.scale_reason.endswith(reconcile.scale_tag(sc))


def test_scale_moves_by_at_most_step():
    d = reconcile.decide(_obs(_spec(replicas=8, step=2), _running(0), _coord(1)))
    assert d.scaling.to_devices == 3 and d.create_pods == [1, 2]


def test_scale_down_asks_first_then_deletes_exactly_the_released_pods():
    d = reconcile.decide(_obs(_spec(initial=3, replicas=1, step=2), _running(0, 1, 2), _coord(3)))
    assert d.post_scale == 1 and d.delete_pods == [] and d.events[0][1] == "ScalingDown"
    busy = reconcile.decide(_obs(_spec(initial=3, replicas=1, step=2), _running(0, 1, 2), _coord(3, phase="Scaling",
                                                                                          desired=1), scaling=d.scaling))
    assert busy.post_scale is None and busy.delete_pods == []
    last = {"reason": d.scale_reason, "outcome": "succeeded", "phases": {"switch": 0.0123}, "bytes_transferred": 7}
    done = reconcile.decide(_obs(_spec(initial=3, replicas=1, step=2), _running(0, 1, 2), _coord(1, registered=[0], last=last),
                                 scaling=d.scaling))
    assert done.delete_pods == [1, 2] and done.scaling is None
    assert done.finished.outcome == "Succeeded" and done.finished.phases_ms == {"switch": 12}
    assert done.finished.bytes_transferred == 7 and done.events[-1][1] == "Scaled"


def test_a_failed_scale_up_releases_its_new_pods_and_backs_off():
    sc = api.ScalingStatus(**{"from": 1, "to": 2}, reason="r", started_at="2026-11-24T11:59:50Z", stage=reconcile.SCALING)
    last = {"reason": f"r {reconcile.scale_tag(sc)}", "outcome": "aborted", "error": "new worker(s) died"}
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(1, last=last), scaling=sc))
    assert d.delete_pods == [1] and d.finished.outcome == "Failed" and "died" in d.finished.message
    assert d.events[-1][:2] == ("Warning", "ScaleFailed")
    again = reconcile.decide(_obs(_spec(replicas=2), _running(0), _coord(1), last_scale=d.finished))
    assert again.scaling is None and again.conditions["ScalingActive"][:2] == ("False", "BackingOff")
    later = reconcile.decide(_obs(_spec(replicas=2), _running(0), _coord(1), last_scale=d.finished,
                                  now=NOW + datetime.timedelta(seconds=reconcile.RETRY_AFTER_FAILURE_S + 5)))
    assert later.scaling is not None and later.create_pods == [1]


def test_workers_that_never_register_are_rolled_back_after_the_timeout():
    sc = api.ScalingStatus(**{"from": 1, "to": 2}, reason="r", started_at="2026-11-24T11:00:00Z",
                           stage=reconcile.WAITING_FOR_WORKERS)
    d = reconcile.decide(_obs(_spec(replicas=2), {0: "Running", 1: "Pending"}, _coord(1), scaling=sc))
    assert d.finished.outcome == "RolledBack" and d.delete_pods == [1] and d.scaling is None
    assert "[1]" in d.finished.message


@pytest.mark.parametrize("stage", [reconcile.WAITING_FOR_WORKERS, reconcile.SCALING])
def test_a_resumed_scale_that_already_finished_is_recorded_once(stage):
    sc = api.ScalingStatus(**{"from": 1, "to": 2}, reason="r", started_at="2026-11-24T11:59:50Z", stage=stage)
    d = reconcile.decide(_obs(_spec(replicas=2), _running(0, 1), _coord(2), scaling=sc))
    if stage == reconcile.SCALING:
        assert d.finished.outcome == "Succeeded" and d.post_scale is None
    else:  # registered already: the scale is posted again; the coordinator answers "already 2"
        assert d.post_scale == 2 or d.finished is not None


def test_a_failed_worker_pod_degrades_the_instance():
    d = reconcile.decide(_obs(_spec(initial=2), {0: "Running", 1: "Failed"}, _coord(2, healthy=False)))
    assert d.phase == "Degraded" and d.conditions["Degraded"][:2] == ("True", "Unhealthy")
    assert d.conditions["Available"][0] == "False" and d.scaling is None


def test_a_scale_started_outside_the_operator_is_followed_not_fought():
    d = reconcile.decide(_obs(_spec(), _running(0, 1), _coord(1, phase="Scaling", desired=2)))
    assert d.post_scale is None and d.scaling.to_devices == 2 and d.delete_pods == []


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
