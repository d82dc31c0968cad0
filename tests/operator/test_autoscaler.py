"""The Slo autoscaler's shell: `autoscaler.tick` and the reconcile tick around it, with a fake
Kubernetes API (it records writes), a literal coordinator status and httpx.MockTransport
standing in for Prometheus. What a user sees: who writes spec.devices.replicas in each mode,
the status history entry, the Event, the counter, the MetricsAvailable condition."""

from __future__ import annotations

import base64

import httpx
import kopf
import pytest

from elasticmoe_worker.contract import admin

from elasticmoe_operator import alerts, api, autoscaler, children, handlers, kube, metrics, policy, signals

NS, NAME = "ml", "moe"
NOW = 1_800_000_000.0
QUERIES = len(signals.queries("", 60))  # one evaluation asks Prometheus this many queries


class FakePrometheus:
    def __init__(self, ttft="0.5", tpot="0.02", rate="2", queue="0") -> None:
        self.answers = {signals.TTFT: ttft, signals.TPOT: tpot, signals.FINISHED: rate, signals.QUEUE: queue}
        self.queries: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        self.queries.append(query)
        value = next(v for m, v in self.answers.items() if m in query)
        return httpx.Response(200, json={"status": "success", "data": {
            "resultType": "vector", "result": [{"metric": {}, "value": [NOW, value]}]}})

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


class FakeKube:
    """Enough of kube.Kube for a reconcile tick of a serving instance; records every write."""

    def __init__(self, active: int = 1, conflict: bool = False, secrets: dict | None = None) -> None:
        self.patches: list[tuple[str, str, str, dict]] = []
        self.created: list[str] = []
        self.conflict = conflict
        self.active = active
        self.secrets = {children.secret_name(NAME): {children.TOKEN_KEY: "admin", children.WORKER_SECRET_KEY: "w"},
                        **(secrets or {})}

    async def get(self, kind, namespace, name):
        if kind == "Secret" and name in self.secrets:
            return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[name].items()}}
        if kind == "Deployment":
            return {"metadata": {"annotations": {handlers.START_DEVICES_ANNOTATION: "1"}}}
        return None

    async def list(self, kind, namespace, selector):
        return [{"metadata": {"name": children.worker_name(NAME, i),
                              "labels": {children.LABEL_DEVICE_INDEX: str(i)}}, "status": {"phase": "Running"}}
                for i in range(self.active)]

    async def create(self, obj):
        self.created.append(obj["metadata"]["name"])
        return False

    async def delete(self, kind, namespace, name):
        return False

    async def merge_patch(self, kind, namespace, name, patch):
        if self.conflict:
            raise kube.KubeError(409, "the object has been modified")
        self.patches.append((kind, namespace, name, patch))
        return {}

    def replicas_writes(self) -> list[int]:
        return [p["spec"]["devices"]["replicas"] for kind, *_, p in self.patches if kind == api.KIND]


def coordinator(active: int = 1, phase=admin.Phase.SERVING, waiting: int = 0) -> admin.AdminStatus:
    return admin.AdminStatus(phase=phase, healthy=True, devices=admin.DeviceCounts(
        desired=active, active=active, registered=list(range(active))),
        parallelism=admin.Parallelism(dp=active, ep=active), requests=admin.RequestCounts(waiting=waiting))


def spec(mode="Slo", replicas=None, **autoscaling) -> api.ElasticMoESpec:
    devices = {"min": 1, "max": 4, "initial": 1, **({"replicas": replicas} if replicas else {})}
    return api.parse_spec({"devices": devices, "slo": {"ttftP90Ms": 1000, "tpotP90Ms": 100},
                           "autoscaling": {"mode": mode, "prometheusUrl": "http://prometheus:9090",
                                           "scaleUpCooldownSeconds": 30, "scaleDownStabilizationSeconds": 60,
                                           "evaluationIntervalSeconds": 10, **autoscaling}})


def body(s: api.ElasticMoESpec, rv="7") -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": NAME, "namespace": NS, "uid": "u1", "resourceVersion": rv, "generation": 1},
            "spec": s.dump()}


def fresh_tracker() -> autoscaler.Tracker:
    """A tracker past the cooldown a rebuild starts with."""
    return autoscaler.Tracker(NS, NAME, policy.State())


def counter(action: str, reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("elasticmoe_operator_autoscale_decisions_total", {
        "namespace": NS, "elasticmoe_instance": NAME, "action": action, "reason": reason}) or 0.0


@pytest.fixture(autouse=True)
def _clean():
    yield
    autoscaler.forget(NS, NAME)
    handlers.CONFIG.kube = None
    handlers.CONFIG.prometheus_transport = None


# -- one writer per mode ------------------------------------------------------------------------
@pytest.mark.parametrize("mode, writes", [("Slo", True), ("External", False), ("Disabled", False)])
def test_only_slo_mode_writes_replicas(mode, writes):
    assert autoscaler.writes_replicas(mode) is writes


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str, str]]:
    posted = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append((type, reason, message)))
    return posted


async def _reconcile(s: api.ElasticMoESpec, k: FakeKube, prom: FakePrometheus, monkeypatch, status=None):
    async def status_of(self):
        return coordinator(k.active)
    monkeypatch.setattr(kube.Coordinator, "status", status_of)
    handlers.CONFIG.kube, handlers.CONFIG.prometheus_transport = k, prom.transport
    patch, memo = kopf.Patch(), kopf.Memo()
    await handlers.reconcile_once(body(s), s.dump(), dict(status or {}), 1, NAME, NS, patch, memo)
    return patch


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["Slo", "External", "Disabled"])
async def test_a_breached_slo_is_acted_on_in_slo_mode_only(mode, monkeypatch, events):
    prom, k = FakePrometheus(ttft="3.0"), FakeKube(active=1)
    if mode == "Slo":
        autoscaler.TRACKERS[(NS, NAME)] = fresh_tracker()
    before = counter("up", "SloBreached")
    patch = await _reconcile(spec(mode), k, prom, monkeypatch)
    status = patch.status
    metrics_condition = next(c for c in status["conditions"] if c["type"] == "MetricsAvailable")
    assert status["selector"] == children.worker_selector(NAME), "an HPA refuses a scale without a selector"
    if mode != "Slo":
        assert k.replicas_writes() == [] and prom.queries == [], "the operator writes no replicas here"
        assert "autoscaler" not in status and status["scaling"] is None
        assert metrics_condition["reason"] in ("ExternalAutoscaler", "AutoscalingDisabled")
        assert autoscaler.TRACKERS == {}
        return
    # the spec, written with the resourceVersion it was read at (a concurrent writer gets a 409)
    assert k.patches == [(api.KIND, NS, NAME, {"metadata": {"resourceVersion": "7"},
                                               "spec": {"devices": {"replicas": 2}}})]
    # carried out in the same tick: the scale to 2 starts and carries the policy's reason
    assert (status["scaling"]["from"], status["scaling"]["to"]) == (1, 2)
    assert status["scaling"]["reason"].startswith("Slo autoscaler: SLO signal 3.00 (TTFT p90 3000 ms / 1000")
    assert children.worker_name(NAME, 1) in k.created
    # history entry with the signal values and the reason
    (entry,) = status["autoscaler"]["history"]
    assert (entry["from"], entry["to"], entry["action"], entry["code"]) == (1, 2, "up", "SloBreached")
    assert entry["signals"]["ttftP90Ms"] == "3000" and entry["signals"]["ttftRatio"] == "3"
    assert entry["signals"]["requestsPerS"] == "2" and "trigger" not in entry
    assert status["autoscaler"]["lastEvaluation"] == entry
    assert api.AutoscalerStatus.model_validate(status["autoscaler"])  # the CRD's schema
    # an Event, then the reconcile's own
    assert [e[:2] for e in events] == [("Normal", "AutoscaleUp"), ("Normal", "ScalingUp")]
    assert "TTFT p90 3000 ms" in events[0][2]
    assert counter("up", "SloBreached") == before + 1
    assert (metrics_condition["status"], metrics_condition["reason"]) == ("True", "SloBreached")


@pytest.mark.asyncio
async def test_holds_write_nothing_and_record_no_history(monkeypatch, events):
    prom, k = FakePrometheus(ttft="0.5"), FakeKube(active=2)
    patch = await _reconcile(spec(replicas=2), k, prom, monkeypatch)
    assert k.replicas_writes() == [] and events == []
    assert patch.status["autoscaler"]["history"] == []
    assert patch.status["autoscaler"]["lastEvaluation"]["code"] == "WithinDeadBand"


@pytest.mark.asyncio
async def test_prometheus_down_holds_and_says_why(monkeypatch, events):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)
    k = FakeKube(active=1)
    handlers.CONFIG.prometheus_transport = None
    prom = FakePrometheus()
    monkeypatch.setattr(FakePrometheus, "transport", property(lambda self: httpx.MockTransport(refuse)))
    patch = await _reconcile(spec(), k, prom, monkeypatch)
    cond = next(c for c in patch.status["conditions"] if c["type"] == "MetricsAvailable")
    assert (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable")
    assert "connection refused" in cond["message"] and k.replicas_writes() == []


# -- autoscaler.tick ---------------------------------------------------------------------------
async def _tick(t, k, s, prom, now=NOW, coord=None, rv="7"):
    return await autoscaler.tick(t, k, body(s, rv), s, coord or coordinator(k.active), now, transport=prom.transport)


@pytest.mark.asyncio
async def test_evaluates_every_interval_and_at_once_on_a_firing_alert():
    prom, k, s, t = FakePrometheus(ttft="0.5"), FakeKube(active=1), spec(), fresh_tracker()
    out = await _tick(t, k, s, prom)
    assert out.evaluation is not None and len(prom.queries) == QUERIES
    out = await _tick(t, k, s, prom, now=NOW + 1)
    assert out.evaluation is None and len(prom.queries) == QUERIES, "not due before evaluationIntervalSeconds"
    # a firing SLO alert through the receiver: evaluated on the next tick, not by itself a scale
    autoscaler.TRACKERS[(NS, NAME)] = t
    receiver = alerts.Receiver(lambda: b"tok", autoscaler.trigger)
    payload = (b'{"version":"4","groupKey":"g","status":"firing","alerts":[{"status":"firing","labels":'
               b'{"alertname":"ElasticMoETTFTHigh","namespace":"ml","elasticmoe_instance":"moe"},'
               b'"startsAt":"2026-11-24T12:00:00Z","fingerprint":"fp1"}]}')
    assert receiver.handle("Bearer tok", payload, now=NOW + 1.5)[0] == 200
    hist_before = metrics.ALERT_TO_EVALUATION.collect()[0].samples
    out = await _tick(t, k, s, prom, now=NOW + 2)
    assert out.evaluation is not None and out.evaluation.trigger.fingerprint == "fp1"
    assert out.evaluation.trigger.received_at.endswith("Z") and out.evaluation.action == "hold"
    assert k.replicas_writes() == [], "the policy decides on the signal; the alert alone scales nothing"
    assert t.triggers == [] and metrics.ALERT_TO_EVALUATION.collect()[0].samples != hist_before
    # a duplicate of it triggers nothing
    receiver.handle("Bearer tok", payload, now=NOW + 3)
    assert (await _tick(t, k, s, prom, now=NOW + 4)).evaluation is None


@pytest.mark.asyncio
async def test_a_resolved_alert_never_scales_down():
    prom, k, s, t = FakePrometheus(ttft="0.01", rate="0"), FakeKube(active=3), spec(replicas=3), fresh_tracker()
    autoscaler.TRACKERS[(NS, NAME)] = t
    await _tick(t, k, s, prom)  # low load starts the stabilization window
    receiver = alerts.Receiver(lambda: b"tok", autoscaler.trigger)
    payload = (b'{"version":"4","groupKey":"g","status":"resolved","alerts":[{"status":"resolved","labels":'
               b'{"alertname":"ElasticMoETTFTHigh","namespace":"ml","elasticmoe_instance":"moe"},'
               b'"startsAt":"2026-11-24T12:00:00Z","endsAt":"2026-11-24T12:05:00Z","fingerprint":"fp1"}]}')
    assert receiver.handle("Bearer tok", payload, now=NOW + 1)[0] == 200
    assert t.triggers == []
    out = await _tick(t, k, s, prom, now=NOW + 2)
    assert out.evaluation is None and k.replicas_writes() == []
    # only the stabilization window (60 s) brings it down, one device at a time
    out = await _tick(t, k, s, prom, now=NOW + 61)
    assert (out.evaluation.action, out.evaluation.code, k.replicas_writes()) == ("down", "SurvivorsUnderTarget", [2])
    assert out.events[0][1] == "AutoscaleDown"


@pytest.mark.asyncio
async def test_a_conflicting_write_is_not_committed_and_is_evaluated_again():
    prom, s, t = FakePrometheus(ttft="3.0"), spec(), fresh_tracker()
    k = FakeKube(active=1, conflict=True)
    out = await _tick(t, k, s, prom)
    assert out.evaluation is None and out.replicas == 1 and out.events == []
    assert t.state == policy.State(), "the policy's state advances only with a write"
    k.conflict = False
    out = await _tick(t, k, s, prom, now=NOW + 1)
    assert out.replicas == 2 and k.replicas_writes() == [2]


@pytest.mark.asyncio
async def test_our_write_not_yet_in_the_timers_copy_is_no_override_but_another_writer_is():
    prom, k, s, t = FakePrometheus(ttft="3.0"), FakeKube(active=1), spec(), fresh_tracker()
    assert (await _tick(t, k, s, prom, rv="7")).replicas == 2
    prom.answers[signals.TTFT] = "0.9"
    out = await _tick(t, k, s, prom, now=NOW + 1, rv="7")  # the watch has not delivered our write yet
    assert out.replicas == 2 and out.events == []
    out = await _tick(t, k, spec(replicas=2), prom, now=NOW + 2, rv="9")
    assert out.replicas == 2 and out.events == []
    out = await _tick(t, k, spec(replicas=4), prom, now=NOW + 3, rv="12")  # `kubectl scale --replicas 4`
    assert [e[:2] for e in out.events] == [("Warning", "AutoscaleOverridden")]
    assert "another writer" in out.events[0][2] and out.replicas == 4 and t.reason == ""


@pytest.mark.asyncio
async def test_a_starting_coordinator_is_not_evaluated():
    prom, k, s, t = FakePrometheus(ttft="3.0"), FakeKube(active=0), spec(), fresh_tracker()
    out = await _tick(t, k, s, prom, coord=coordinator(0, phase=admin.Phase.STARTING))
    assert out.evaluation is None and prom.queries == [] and out.condition[0] == "Unknown"


@pytest.mark.asyncio
async def test_the_prometheus_token_comes_from_the_secret_the_spec_names():
    seen = []

    def answer(request):
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})
    s = spec(prometheusBearerTokenSecret={"name": "prom", "key": "tok"})
    t = fresh_tracker()
    out = await autoscaler.tick(t, FakeKube(secrets={"prom": {"tok": "s3cret"}}), body(s), s, coordinator(1), NOW,
                                transport=httpx.MockTransport(answer))
    assert seen == ["Bearer s3cret"] * QUERIES and out.condition[1] == "MetricsUnavailable"
    t = fresh_tracker()
    out = await autoscaler.tick(t, FakeKube(), body(s), s, coordinator(1), NOW, transport=httpx.MockTransport(answer))
    assert out.condition[:2] == ("False", "MetricsUnavailable")
    assert "prometheusBearerTokenSecret" in out.condition[2] and "ml/prom not found" in out.condition[2]


# -- restart -----------------------------------------------------------------------------------
def _scale(frm, to, ms, outcome="Succeeded") -> dict:
    return api.ScaleRecord(**{"from": frm, "to": to}, outcome=outcome, duration_ms=ms,
                           started_at="2026-11-24T12:00:00Z").dump()


@pytest.mark.asyncio
async def test_a_restarted_operator_rebuilds_conservatively_from_status():
    status = {"history": [_scale(1, 2, 20_000), _scale(2, 3, 9_000, "Aborted"), _scale(1, 2, 40_000)],
              "autoscaler": {"history": [{"from": 1, "to": 2, "action": "up", "code": "SloBreached"}]}}
    t = autoscaler.tracker(NS, NAME, status, now_s=NOW)
    assert dict(t.state.time_to_ready_s) == {(1, 2): 30.0}, "learned from the measured, succeeded scales"
    assert t.history == status["autoscaler"]["history"]
    prom, k, s = FakePrometheus(ttft="3.0"), FakeKube(active=2), spec(replicas=2)
    out = await _tick(t, k, s, prom, now=NOW + 1)
    assert (out.evaluation.code, k.replicas_writes()) == ("Cooldown", []), "the cooldown restarted"
    out = await _tick(t, k, s, prom, now=NOW + 31)
    assert (out.evaluation.code, k.replicas_writes()) == ("SloBreached", [3])
    assert "ready in about 30 s" in out.evaluation.reason, "the learned time-to-ready, scaled per device"


def test_the_spec_sizes_the_stabilization_window_from_the_measured_scales():
    cfg = autoscaler.config(spec(metricsWindowSeconds=20))
    assert (cfg.stabilization_ready_multiple, cfg.scale_down_stabilization_s, cfg.settle_s) == (10.0, 60.0, 20.0)
    learned = autoscaler.tracker(NS, NAME, {"history": [_scale(1, 2, 4_000)]}, now_s=NOW).state
    assert policy.stabilization_s(learned, cfg, 2) == 40.0  # 10 x 4 s, within [20, 60]
    off = autoscaler.config(spec(stabilizationReadyMultiple=0))
    assert policy.stabilization_s(learned, off, 2) == 60.0
    with pytest.raises(api.SpecError, match="stabilizationReadyMultiple"):
        spec(stabilizationReadyMultiple=-1)


def test_status_history_holds_count_changes_only_at_most_ten():
    t = fresh_tracker()
    hold = api.AutoscaleDecision(**{"from": 2, "to": 2}, action="hold", code="WithinDeadBand")
    assert autoscaler.status_patch(t, hold)["history"] == []
    for i in range(12):
        patch = autoscaler.status_patch(t, api.AutoscaleDecision(**{"from": i, "to": i + 1}, action="up"))
    assert [h["from"] for h in patch["history"]] == list(range(2, 12))
    assert api.AutoscalerStatus.model_validate(patch).history[-1].to_devices == 12
