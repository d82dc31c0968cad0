"""The Alertmanager receiver: `alerts.Receiver` on literal payloads (webhook version 4, as
Alertmanager documents and sends it), then the operator's HTTP port on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import pathlib

import httpx
import pytest
import yaml

from elasticmoe_operator import alerts, autoscaler, httpserver
import testprocs

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKEN = b"alert-token-0123456789"
AUTH = "Bearer " + TOKEN.decode()


def alert(name="ElasticMoETTFTHigh", status="firing", namespace="ml", instance="moe", fingerprint="a1b2c3d4e5f60718",
          starts_at="2026-11-24T12:00:00.123456789Z") -> dict:
    return {"status": status, "labels": {"alertname": name, "namespace": namespace, "elasticmoe_instance": instance,
                                         "severity": "warning"},
            "annotations": {"summary": "time to first token above its SLO"}, "startsAt": starts_at,
            "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-24T12:05:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=...", "fingerprint": fingerprint}


def notification(*items: dict, status="firing") -> dict:
    return {"version": "4", "groupKey": '{}/{alertname=~"ElasticMoE.*"}:{alertname="ElasticMoETTFTHigh"}',
            "truncatedAlerts": 0, "status": status, "receiver": "elasticmoe-operator",
            "groupLabels": {"alertname": "ElasticMoETTFTHigh"}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": list(items) or [alert()]}


def body(payload: dict) -> bytes:
    return json.dumps(payload).encode()


class Triggers:
    """Stands in for the autoscaler's registry: which instances exist in mode Slo, what was triggered."""

    def __init__(self, known=(("ml", "moe"),)) -> None:
        self.known, self.calls = set(known), []

    def __call__(self, receipt: alerts.Receipt) -> bool:
        if (receipt.namespace, receipt.instance) not in self.known:
            return False
        self.calls.append(receipt)
        return True


def receiver(token=TOKEN, known=(("ml", "moe"),)) -> tuple[alerts.Receiver, Triggers]:
    triggers = Triggers(known)
    return alerts.Receiver(lambda: token, triggers), triggers


@pytest.mark.parametrize("authorization, token", [
    (None, TOKEN), ("", TOKEN), ("Bearer wrong-token", TOKEN), ("Basic " + TOKEN.decode(), TOKEN),
    ("Bearer " + TOKEN.decode()[:-1], TOKEN), (AUTH, None), ("Bearer ", b""),
], ids=["none", "empty", "wrong", "basic-scheme", "prefix", "no-token-configured", "empty-token"])
def test_without_the_bearer_token_401_and_nothing_triggers(authorization, token):
    r, triggers = receiver(token)
    code, reply, receipts = r.handle(authorization, body(notification()), now=10.0)
    assert code == 401 and "bearer token" in reply["error"] and receipts == [] and triggers.calls == []


def test_the_scheme_is_case_insensitive():
    r, triggers = receiver()
    assert r.handle("bearer " + TOKEN.decode(), body(notification()), now=1.0)[0] == 200


@pytest.mark.parametrize("mutate, field", [
    (lambda p: p.pop("version"), "version"),
    (lambda p: p.update(version="3"), "$.version"),
    (lambda p: p.update(version=4), "$.version"),
    (lambda p: p.pop("groupKey"), "groupKey"),
    (lambda p: p.update(status="pending"), "$.status"),
    (lambda p: p.update(alerts={}), "$.alerts"),
    (lambda p: p["alerts"][0].pop("fingerprint"), "fingerprint"),
    (lambda p: p["alerts"][0].update(fingerprint=""), "$.alerts[0].fingerprint"),
    (lambda p: p["alerts"][0].update(status="active"), "$.alerts[0].status"),
    (lambda p: p["alerts"][0].update(startsAt="yesterday"), "$.alerts[0].startsAt"),
    (lambda p: p["alerts"][0].pop("startsAt"), "startsAt"),
    (lambda p: p["alerts"][0].update(labels=["alertname"]), "$.alerts[0].labels"),
    (lambda p: p["alerts"][0]["labels"].update(namespace=7), "$.alerts[0].labels"),
], ids=["no-version", "version-3", "version-int", "no-groupKey", "bad-status", "alerts-not-list",
        "no-fingerprint", "empty-fingerprint", "bad-alert-status", "bad-startsAt", "no-startsAt",
        "labels-not-object", "label-not-string"])
def test_a_malformed_payload_is_400_naming_the_field(mutate, field):
    payload = copy.deepcopy(notification())
    mutate(payload)
    r, triggers = receiver()
    code, reply, _ = r.handle(AUTH, body(payload), now=1.0)
    assert code == 400 and field in reply["error"], reply
    assert triggers.calls == []


def test_a_body_that_is_not_json_is_400():
    r, _ = receiver()
    code, reply, _ = r.handle(AUTH, b"{not json", now=1.0)
    assert code == 400 and "not JSON" in reply["error"]


def test_a_firing_slo_alert_triggers_its_instance_once_duplicates_are_ignored():
    r, triggers = receiver()
    code, reply, receipts = r.handle(AUTH, body(notification()), now=100.0)
    assert code == 200 and reply == {"alerts": 1, "triggered": 1}
    assert [(c.namespace, c.instance, c.alertname, c.received_at) for c in triggers.calls] == [
        ("ml", "moe", "ElasticMoETTFTHigh", 100.0)]
    # the same notification again (an HA peer, a retry, repeat_interval): nothing more
    for now in (100.5, 400.0):
        code, reply, receipts = r.handle(AUTH, body(notification()), now=now)
        assert code == 200 and reply == {"alerts": 1, "duplicate": 1}
    assert len(triggers.calls) == 1
    assert r.receipt("a1b2c3d4e5f60718", "2026-11-24T12:00:00.123456789Z").received_at == 100.0
    # the same alert firing again later is a new alert (another startsAt): it triggers
    r.handle(AUTH, body(notification(alert(starts_at="2026-11-24T13:00:00Z"))), now=500.0)
    assert len(triggers.calls) == 2


def test_resolved_never_triggers_and_other_alerts_and_instances_are_only_noted():
    r, triggers = receiver()
    code, reply, receipts = r.handle(AUTH, body(notification(
        alert(status="resolved"), alert(name="ElasticMoEUnhealthy", fingerprint="f2"),
        alert(instance="other", fingerprint="f3"), alert(namespace="", instance="", fingerprint="f4"),
        status="resolved")), now=1.0)
    assert code == 200 and triggers.calls == []
    assert [x.outcome for x in receipts] == [alerts.RESOLVED_NOTED, alerts.NOT_SLO, alerts.UNKNOWN_INSTANCE,
                                             alerts.UNKNOWN_INSTANCE]
    # an instance unknown at first (a restarted operator that has not seen it yet) triggers on a retry
    triggers.known.add(("ml", "other"))
    r.handle(AUTH, body(notification(alert(instance="other", fingerprint="f3"))), now=2.0)
    assert [c.instance for c in triggers.calls] == ["other"]


@pytest.mark.parametrize("name", sorted(alerts.SLO_ALERTS))
def test_every_slo_alert_of_the_chart_triggers(name):
    r, triggers = receiver()
    r.handle(AUTH, body(notification(alert(name=name))), now=1.0)
    assert len(triggers.calls) == 1


def test_the_slo_alerts_are_the_charts_and_name_their_instance():
    rules = yaml.safe_load((REPO / "charts/elasticmoe/files/rules.yaml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts.SLO_ALERTS < set(by_name) and "ElasticMoEUnhealthy" not in alerts.SLO_ALERTS
    for name in alerts.SLO_ALERTS:  # every SLO alert keeps the labels the receiver matches on
        assert f"{alerts.LABEL_NAMESPACE}_{alerts.LABEL_INSTANCE}:" in by_name[name]["expr"] \
            or f"by ({alerts.LABEL_NAMESPACE}, {alerts.LABEL_INSTANCE})" in by_name[name]["expr"], name


def test_remembers_a_bounded_number_of_alerts():
    r = alerts.Receiver(lambda: TOKEN, lambda _: True, remember=2)
    for i in range(3):
        r.handle(AUTH, body(notification(alert(fingerprint=f"f{i}"))), now=float(i))
    assert r.receipt("f0", "2026-11-24T12:00:00.123456789Z") is None
    assert r.receipt("f2", "2026-11-24T12:00:00.123456789Z") is not None


# -- the HTTP port -------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_http_port_receives_alerts_into_the_autoscaler_and_serves_metrics(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN.decode() + "\n")  # as a Secret volume may hold it
    t = autoscaler.tracker("ml", "moe", {}, now_s=0.0)
    port = testprocs.free_port()
    runner = await httpserver.start(f"127.0.0.1:{port}",
                                    alerts.Receiver(httpserver.TokenFile(str(token_file)), autoscaler.trigger))
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/alerts", content=body(notification()))
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            r = await c.post("/alerts", content=body(notification(alert(fingerprint="zz"))), headers={
                "Authorization": AUTH, "Content-Type": "application/json"})
            assert r.status_code == 200 and r.json() == {"alerts": 1, "triggered": 1}
            assert [x.fingerprint for x in t.triggers] == ["zz"]
            r = await c.post("/alerts", content=b'{"version": "4"}', headers={"Authorization": AUTH})
            assert r.status_code == 400 and "groupKey" in r.json()["error"]
            token_file.write_text("rotated")  # a rotated Secret takes effect without a restart
            r = await c.post("/alerts", content=body(notification()), headers={"Authorization": AUTH})
            assert r.status_code == 401
            m = (await c.get("/metrics")).text
            assert 'elasticmoe_operator_alerts_received_total{alertname="ElasticMoETTFTHigh",outcome="triggered",' \
                   'status="firing"}' in m
            assert 'elasticmoe_operator_alert_notifications_total{code="401"}' in m
            assert "process_cpu_seconds_total" in m
            assert (await c.get("/healthz")).status_code == 200
    finally:
        await runner.cleanup()
        autoscaler.forget("ml", "moe")


def test_listen_address_is_checked():
    assert httpserver.parse_address("0.0.0.0:8081") == ("0.0.0.0", 8081)
    assert httpserver.parse_address("[::]:8081") == ("::", 8081)
    assert httpserver.parse_address(":8081") == ("0.0.0.0", 8081)
    with pytest.raises(ValueError, match="--listen"):
        httpserver.parse_address("8081x")
