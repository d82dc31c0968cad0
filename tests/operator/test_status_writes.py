"""What the reconcile tick writes to status when kopf's copy of the object lags the operator's
own last patch (a timer gets the latest copy the watch delivered; under load our previous
patch may not be in it yet), and when a recovery of the coordinator's began and ended between
two ticks. A fake Kubernetes API records the writes; the coordinator's status is literal."""

from __future__ import annotations

import kopf
import pytest

from elasticmoe_worker.contract import admin

from elasticmoe_operator import api, handlers, kube
from test_autoscaler import NAME, NS, FakeKube, body, spec

RECOVERY = admin.ScaleRecord(from_devices=2, to_devices=1, scale_id="recovery-3", outcome=admin.Outcome.SUCCEEDED,
                             reason="recovery: worker process(es) died: device 1", duration_ms=900,
                             started_at="2026-11-28T10:00:00Z")


@pytest.fixture(autouse=True)
def _clean():
    yield
    handlers.CONFIG.kube = None


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str, str]]:
    posted = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append((type, reason, message)))
    return posted


def _serving_on_one_after_losing_device_1(monkeypatch) -> None:
    """Desired 2; the coordinator recovered onto device 0 (its record says so) and serves on it."""
    async def status_of(self):
        return admin.AdminStatus(phase=admin.Phase.SERVING, healthy=True, last_scale=RECOVERY, history=[RECOVERY],
                                 devices=admin.DeviceCounts(desired=1, active=1, registered=[0], active_ids=[0]),
                                 parallelism=admin.Parallelism(dp=1, ep=1))
    monkeypatch.setattr(kube.Coordinator, "status", status_of)
    handlers.CONFIG.kube = FakeKube(active=1)


@pytest.mark.asyncio
async def test_an_unseen_recovery_is_recorded_once_although_the_timers_copy_lags_our_patch(monkeypatch, events):
    _serving_on_one_after_losing_device_1(monkeypatch)
    s = spec(mode="Disabled").model_copy(update={"devices": api.parse_spec(
        {"devices": {"min": 1, "max": 4, "initial": 2}}).devices})
    memo = kopf.Memo()
    first = kopf.Patch()
    await handlers.reconcile_once(body(s), s.dump(), {}, 1, NAME, NS, first, memo)
    assert [h["scaleId"] for h in first.status["history"]] == ["recovery-3"]
    assert first.status["lastScale"]["scaleId"] == "recovery-3" and first.status["scaling"] is None
    assert ("Warning", "RecoveredOnSurvivors") in [e[:2] for e in events]

    # the next tick gets the object as it was before the first patch: nothing recorded twice,
    # and the replacement starts
    events.clear()
    second = kopf.Patch()
    await handlers.reconcile_once(body(s), s.dump(), {}, 1, NAME, NS, second, memo)
    assert "history" not in second.status and "RecoveredOnSurvivors" not in [e[1] for e in events]
    assert (second.status["scaling"]["from"], second.status["scaling"]["to"]) == (1, 2)
    assert [e[1] for e in events] == ["ScalingUp"]  # the Degraded reason did not change: no second Event
    degraded = next(c for c in second.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "ReplacingLostDevices"


@pytest.mark.asyncio
async def test_a_fresh_operator_reads_the_history_from_the_object(monkeypatch, events):
    """Empty memo (a restarted operator): the object's status is the truth, the recovery it
    holds is not recorded again."""
    _serving_on_one_after_losing_device_1(monkeypatch)
    s = spec(mode="Disabled").model_copy(update={"devices": api.parse_spec(
        {"devices": {"min": 1, "max": 4, "initial": 2}}).devices})
    written = {"history": [{"from": 2, "to": 1, "scaleId": "recovery-3", "outcome": "Succeeded", "reason": "r",
                            "startedAt": "2026-11-28T10:00:00Z", "durationMs": 900}]}
    patch = kopf.Patch()
    await handlers.reconcile_once(body(s), s.dump(), written, 1, NAME, NS, patch, kopf.Memo())
    assert "history" not in patch.status and (patch.status["scaling"]["from"], patch.status["scaling"]["to"]) == (1, 2)
