"""The operator's kopf handlers against kmock's Kubernetes API-server emulator, calling a real
coordinator and CPU workers that a stand-in kubelet (`cluster.Kubelet`) starts from the
Deployment and Pods the operator creates."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import subprocess
import time

import httpx
import kmock
import pytest
import pytest_asyncio
from aiohttp import web

from elasticmoe_operator import api
import cluster
import testprocs

NS = "emoe-test"
NAME = "demo"
CR_PATH = f"/apis/elasticmoe.io/v1alpha1/namespaces/{NS}/elasticmoes"

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(400)]
# `--network-policy` in the shape the chart writes (its real peers: test_chart.py)
NETWORK_PEERS = json.dumps({"operator": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "op"}}}],
                            "prometheus": [], "apiClients": []})


def _resource(model, **devices) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": NAME, "namespace": NS},
            "spec": {"model": {"source": str(model), "servedName": "m"},
                     "devices": {"min": 1, "max": 3, "initial": 1, **devices},
                     "engine": {"kvCacheMb": 8, "maxNumSeqs": 8}}}


class Env:
    """The operator runs as the user runs it: `elasticmoe operator`, a process of its own."""

    def __init__(self, api_: cluster.Api, kubelet: cluster.Kubelet, kubeconfig, http_port: int) -> None:
        self.api, self.kubelet = api_, kubelet
        self.kubeconfig, self.http_port = kubeconfig, http_port
        self.operator: subprocess.Popen | None = None
        self.runs = 0

    async def start_operator(self, *extra: str) -> None:
        self.runs += 1
        self.operator = subprocess.Popen(
            testprocs.elasticmoe("operator", "--all-namespaces", "--standalone",
             "--image", "elasticmoe:test", "--coordinator-url", f"http://127.0.0.1:{self.http_port}",
             "--log-format", "text", *extra),
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            stdout=open(self.kubelet.tmp / f"operator-{self.runs}.log", "wb"), stderr=subprocess.STDOUT)

    async def kill_operator(self) -> None:
        self.operator.kill()  # SIGKILL: no cleanup, no last status write
        await asyncio.to_thread(self.operator.wait)

    async def stop_operator(self) -> None:
        if self.operator is None or self.operator.poll() is not None:
            return
        self.operator.terminate()
        try:
            await asyncio.to_thread(self.operator.wait, 20)
        except subprocess.TimeoutExpired:
            await self.kill_operator()

    async def cr(self) -> dict | None:
        return await self.api.get(f"{CR_PATH}/{NAME}")

    async def wait(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        obj = None
        while time.monotonic() < deadline:
            obj = await self.cr()
            if obj is not None and predicate(obj.get("status") or {}):
                return obj
            await asyncio.sleep(0.25)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.kubelet.tmp.glob("*.log")))
        raise AssertionError(f"timed out waiting for {what}; status: {(obj or {}).get('status')}\n{logs}")

    async def pods(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in await self.api.list(f"/api/v1/namespaces/{NS}/pods"))

    async def events(self) -> list[dict]:
        return await self.api.list(f"/api/v1/namespaces/{NS}/events")


@contextlib.asynccontextmanager
async def environment(tmp_path):
    """The emulator, the stand-in kubelet and the operator's `Env`; everything they started is
    stopped on exit (the chaos test checks what is left after it)."""
    async with cluster.Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.setup()
        kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig", str(server.url))
        http_port = testprocs.free_port()
        client = cluster.Api(str(server.url))
        try:
            async with cluster.Kubelet(client, NS, tmp_path, http_port) as kubelet:
                e = Env(client, kubelet, kubeconfig, http_port)
                try:
                    yield e
                finally:
                    await e.stop_operator()
        finally:
            await client.close()


@pytest_asyncio.fixture
async def env(tmp_path):
    async with environment(tmp_path) as e:
        yield e


def _condition(status: dict, ctype: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == ctype)


def _serving(active: int):
    return lambda s: s.get("phase") == "Serving" and s.get("devices", {}).get("active") == active \
        and not s.get("scaling")


async def test_create_scale_by_spec_and_subresource_then_delete(env, tiny_models):
    await env.start_operator("--network-policy", NETWORK_PEERS)
    await env.api.request("POST", CR_PATH, _resource(tiny_models["qwen3_moe"]), "application/json")
    obj = await env.wait(_serving(1), 180, "the instance to serve on 1 device")
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["devices"] == {"desired": 1, "ready": 1, "active": 1, "warming": 0}
    assert _condition(status, "Available")["status"] == "True"
    assert _condition(status, "Degraded")["status"] == "False"
    assert _condition(status, "MetricsAvailable")["reason"] == "AutoscalingDisabled"
    assert await env.pods() == ["demo-worker-0"]
    uid = obj["metadata"]["uid"]
    for path in (f"/apis/apps/v1/namespaces/{NS}/deployments/demo-coordinator",
                 f"/api/v1/namespaces/{NS}/services/demo-coordinator",
                 f"/api/v1/namespaces/{NS}/configmaps/demo-config",
                 f"/api/v1/namespaces/{NS}/secrets/demo-admin-token",
                 f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/demo-ingress",
                 f"/api/v1/namespaces/{NS}/pods/demo-worker-0"):
        child = await env.api.get(path)
        assert child is not None, path
        assert [o["uid"] for o in child["metadata"]["ownerReferences"]] == [uid], path
    secret = await env.api.get(f"/api/v1/namespaces/{NS}/secrets/demo-admin-token")
    token, worker_secret = (base64.b64decode(secret["data"][k]).decode() for k in ("token", "worker-secret"))
    assert token != worker_secret
    # the admin token reaches the coordinator only; the worker secret both
    assert (env.kubelet.env["demo-coordinator"]["ELASTICMOE_ADMIN_TOKEN"],
            env.kubelet.env["demo-coordinator"]["ELASTICMOE_WORKER_SECRET"]) == (token, worker_secret)
    assert env.kubelet.env["demo-worker-0"]["ELASTICMOE_WORKER_SECRET"] == worker_secret
    assert "ELASTICMOE_ADMIN_TOKEN" not in env.kubelet.env["demo-worker-0"]

    # spec change of the device count
    await env.api.request("PATCH", f"{CR_PATH}/{NAME}", {"spec": {"devices": {"replicas": 2}}})
    obj = await env.wait(_serving(2), 180, "2 active devices")
    last = obj["status"]["lastScale"]
    assert (last["from"], last["to"], last["outcome"]) == (1, 2, "Succeeded"), last
    assert last["scaleId"].startswith("demo-1-2-"), last
    assert last["phasesMs"].keys() >= {"workers", "transfer", "switch"} and last["durationMs"] > 0
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert await env.pods() == ["demo-worker-0", "demo-worker-1"]

    # the scale subresource, as `kubectl scale elasticmoe/demo --replicas 1` sends it
    await env.api.request("PATCH", f"{CR_PATH}/{NAME}/scale", {"spec": {"replicas": 1}})
    obj = await env.wait(_serving(1), 180, "1 active device again")
    assert [(h["from"], h["to"], h["outcome"]) for h in obj["status"]["history"]] == [(1, 2, "Succeeded"),
                                                                                      (1 + 1, 1, "Succeeded")]
    assert await env.pods() == ["demo-worker-0"]  # exactly the released pod went
    assert env.kubelet.started.count("demo-worker-0") == 1  # the staying worker was never restarted
    reasons = [e["reason"] for e in await env.events() if e.get("involvedObject", {}).get("name") == NAME]
    assert reasons.count("ScalingUp") == 1 and reasons.count("ScalingDown") == 1 and reasons.count("Scaled") == 2
    r = httpx.post(f"{obj['status']['coordinatorUrl']}/v1/completions",
                   json={"model": "m", "prompt": "hello", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text

    # delete: children carry owner references (the API server's garbage collector deletes
    # them); the operator stops reconciling and reports no error.
    await env.api.request("DELETE", f"{CR_PATH}/{NAME}", None, "application/json")
    for _ in range(40):
        if await env.cr() is None:
            break
        await asyncio.sleep(0.25)
    assert await env.cr() is None
    await asyncio.sleep(2)
    assert env.operator.poll() is None
    assert "Traceback" not in (env.kubelet.tmp / "operator-1.log").read_text()


async def test_invalid_spec_is_degraded_naming_the_field_and_creates_nothing(env, tiny_models):
    await env.start_operator()
    await env.api.request("POST", CR_PATH, _resource(tiny_models["qwen3_moe"], min=3, max=2, initial=2),
                          "application/json")
    obj = await env.wait(lambda s: s.get("phase") == "Degraded", 30, "the Degraded phase")
    degraded = _condition(obj["status"], "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.devices.min" in degraded["message"] and "3" in degraded["message"], degraded
    await asyncio.sleep(2)
    assert await env.pods() == []
    assert await env.api.list(f"/apis/apps/v1/namespaces/{NS}/deployments") == []
    warnings = [e for e in await env.events() if e.get("reason") == "InvalidSpec"]
    assert len(warnings) == 1 and "spec.devices.min" in warnings[0]["message"]

    # fixing the spec recovers
    await env.api.request("PATCH", f"{CR_PATH}/{NAME}", {"spec": {"devices": {"min": 1, "max": 3, "initial": 1}}})
    await env.wait(_serving(1), 180, "the fixed instance to serve")


async def test_operator_killed_mid_scale_resumes_from_status(env, tiny_models):
    await env.start_operator()
    await env.api.request("POST", CR_PATH, _resource(tiny_models["qwen3_moe"]), "application/json")
    await env.wait(_serving(1), 180, "the instance to serve on 1 device")
    await env.api.request("PATCH", f"{CR_PATH}/{NAME}", {"spec": {"devices": {"replicas": 2}}})
    obj = await env.wait(lambda s: bool(s.get("scaling")), 30, "the scale to start")
    assert obj["status"]["scaling"]["to"] == 2
    await env.kill_operator()  # mid-scale: pods created, the coordinator maybe scaling

    await env.start_operator()  # a new process would have an empty memory, so has this one
    obj = await env.wait(_serving(2), 90, "the resumed scale to finish")
    history = obj["status"]["history"]
    assert [(h["from"], h["to"], h["outcome"]) for h in history] == [(1, 2, "Succeeded")], history
    assert await env.pods() == ["demo-worker-0", "demo-worker-1"]
    assert env.kubelet.started.count("demo-worker-1") == 1  # no pod made twice


async def test_an_existing_secret_is_kept_and_completed_with_a_worker_secret(env, tiny_models):
    """A Secret from an operator that knew only the admin token: its token stays (running pods
    and clients hold it), a worker secret is added, and workers get that one only."""
    await env.api.request("POST", f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "demo-admin-token", "namespace": NS},
        "data": {"token": base64.b64encode(b"old-admin-token").decode()}}, "application/json")
    await env.start_operator()
    await env.api.request("POST", CR_PATH, _resource(tiny_models["qwen3_moe"]), "application/json")
    deadline = time.monotonic() + 30
    while "demo-worker-0" not in env.kubelet.env and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    secret = await env.api.get(f"/api/v1/namespaces/{NS}/secrets/demo-admin-token")
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert values["token"] == "old-admin-token" and values.get("worker-secret") not in (None, "", "old-admin-token")
    assert env.kubelet.env["demo-worker-0"]["ELASTICMOE_WORKER_SECRET"] == values["worker-secret"]
    assert "ELASTICMOE_ADMIN_TOKEN" not in env.kubelet.env["demo-worker-0"]
    assert env.kubelet.env["demo-coordinator"]["ELASTICMOE_ADMIN_TOKEN"] == "old-admin-token"



def _degraded_reason(status: dict) -> str:
    return next((c["reason"] for c in status.get("conditions", []) if c["type"] == "Degraded"), "")


async def _track(env, predicate, timeout_s: float, what: str) -> tuple[dict, list[tuple[str, str]]]:
    """`env.wait`, also returning the distinct (phase, Degraded reason) pairs seen on the way, in order."""
    seen: list[tuple[str, str]] = []

    def note(status: dict) -> bool:
        step = (status.get("phase", ""), _degraded_reason(status))
        if not seen or seen[-1] != step:
            seen.append(step)
        return predicate(status)

    return await env.wait(note, timeout_s, what), seen


def _replaced(times: int):
    """Serving on 2 devices, not degraded, after `times` replacements of a lost device."""
    def pred(s: dict) -> bool:
        replacements = [h for h in s.get("history", []) if h["reason"].startswith("replacing lost device(s)")
                        and h["outcome"] == "Succeeded"]
        return _serving(2)(s) and len(replacements) == times and _degraded_reason(s) == "AsExpected"
    return pred


async def _serving_two_under_load(env, tiny_models) -> testprocs.StreamingLoad:
    await env.start_operator()
    resource = _resource(tiny_models["qwen3_moe"], initial=2)
    resource["spec"]["engine"]["expertCopies"] = 2  # a lost device's experts come from the survivor
    await env.api.request("POST", CR_PATH, resource, "application/json")
    obj = await env.wait(_serving(2), 180, "the instance to serve on 2 devices")
    return testprocs.StreamingLoad(obj["status"]["coordinatorUrl"], "m", [[5, 6, 7, 8], [9, 10, 11]], max_tokens=6,
                                   clients=2)


async def _replaced_after_loss(env, device: int, times: int) -> list[str]:
    """Wait for the instance to serve on 2 devices again after losing `device`; check the status
    on the way and the records; -> the instance's Event reasons."""
    obj, seen = await _track(env, _replaced(times), 180, f"device {device} replaced and 2 devices serving again")
    assert seen[0] == ("Serving", "AsExpected") and seen[-1] == ("Serving", "AsExpected"), seen
    assert ("Degraded", "ReplacingLostDevices") in seen, seen
    # the loss shows as a Degraded reason while the coordinator recovers, or, where the recovery
    # ended between two of the operator's looks (~0.9 s once spares are forked: nothing to start),
    # as the Warning Event it records for the recovery
    reasons = [e["reason"] for e in await env.events() if e.get("involvedObject", {}).get("name") == NAME]
    assert {"WorkerLost", "Recovering"} & {r for _, r in seen} or reasons.count("RecoveredOnSurvivors") >= times, \
        (seen, reasons)
    recovery, replacement = obj["status"]["history"][-2:]
    assert recovery["scaleId"].startswith("recovery-") and (recovery["from"], recovery["to"]) == (2, 1), recovery
    assert f"device {device}" in recovery["reason"] and recovery["outcome"] == "Succeeded", recovery
    # the normal scale-up: the new worker got its weights from the live peer
    assert (replacement["from"], replacement["to"]) == (1, 2) and replacement["bytesTransferred"] > 0, replacement
    assert await env.pods() == ["demo-worker-0", "demo-worker-1"]
    assert env.kubelet.started.count(f"demo-worker-{device}") == 1 + times
    assert env.kubelet.started.count(f"demo-worker-{1 - device}") == 1
    reasons = [e["reason"] for e in await env.events() if e.get("involvedObject", {}).get("name") == NAME]
    for reason in ("ReplacingLostDevices", "Recovered", "Scaled"):
        assert reasons.count(reason) == times, (reason, reasons)
    # in order: lost (or recovering), replacing, scaling up, scaled, recovered
    assert reasons.index("ReplacingLostDevices") < reasons.index("ScalingUp") < reasons.index("Scaled") \
        < reasons.index("Recovered"), reasons
    return reasons


async def test_a_deleted_worker_pod_is_replaced_and_a_restarting_coordinator_keeps_its_workers(env, tiny_models):
    """Pod 1 deleted while a streaming load runs: the coordinator recovers onto device 0, the
    operator follows, then scales back to 2 the normal way (a new pod 1 whose worker pulls its
    weights from the live peer); status and Events show each step; no request fails. Then the
    coordinator's process is killed and its Deployment's pod restarts (the stand-in kubelet starts
    it again): Degraded with the reason and an Event, no worker pod deleted or made again, and the
    new coordinator serves on the same 2 workers (it adopts their memory)."""
    load = await _serving_two_under_load(env, tiny_models)
    try:
        await env.api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-worker-1", None, "application/json")
        await _replaced_after_loss(env, 1, 1)
    finally:
        load.stop()
    assert load.failed == [] and len(load.results) > 0, load.failed[:5]

    env.kubelet.kill("Deployment", "demo-coordinator")
    restarting = ("CoordinatorUnavailable", "CoordinatorRestarting")
    obj = await env.wait(lambda s: s.get("phase") == "Degraded" and _degraded_reason(s) in restarting, 60,
                         "Degraded for the coordinator restart")
    assert _condition(obj["status"], "Available")["status"] == "False"
    obj, seen = await _track(env, lambda s: _serving(2)(s) and _degraded_reason(s) == "AsExpected", 120,
                             "the restarted coordinator to serve on the 2 workers again")
    assert {r for _, r in seen[:-1]} <= set(restarting), seen  # degraded for the restart until it served
    assert env.kubelet.restarts.get("demo-coordinator", 0) == 1
    assert await env.pods() == ["demo-worker-0", "demo-worker-1"]
    assert env.kubelet.started.count("demo-worker-0") == 1 and env.kubelet.started.count("demo-worker-1") == 2
    reasons = [e["reason"] for e in await env.events() if e.get("involvedObject", {}).get("name") == NAME]
    assert set(restarting) & set(reasons) and reasons.count("Recovered") == 2, reasons
    r = httpx.post(f"{obj['status']['coordinatorUrl']}/v1/completions",
                   json={"model": "m", "prompt": "hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert "Traceback" not in (env.kubelet.tmp / "operator-1.log").read_text()


@pytest.mark.slow
async def test_a_failed_worker_pod_is_replaced_and_requests_keep_succeeding(env, tiny_models):
    """Pod 0's process killed (SIGKILL: the pod goes Failed, exit code 137): the operator deletes
    the pod with an Event saying so, and the instance gets back to 2 devices on ids 1 and then 0
    (the lowest unused id, the recreated pod's). Twice: the replacement's loss is seen too."""
    load = await _serving_two_under_load(env, tiny_models)
    try:
        for times in (1, 2):
            env.kubelet.kill("Pod", "demo-worker-0")
            await _replaced_after_loss(env, 0, times)
    finally:
        load.stop()
    assert load.failed == [] and len(load.results) > 0, load.failed[:5]
    failed = [e["message"] for e in await env.events() if e["reason"] == "WorkerFailed"]
    assert len(failed) == 2 and all("demo-worker-0" in m and "exit code 137" in m for m in failed), failed
    assert "Traceback" not in (env.kubelet.tmp / "operator-1.log").read_text()


class StandInPrometheus:
    """Prometheus's HTTP API on 127.0.0.1 answering the operator's queries with fixed values
    (a real Prometheus is the end-to-end test's): p90 TTFT and time per output token in seconds,
    the first-token wait (0: nobody waits), requests/s."""

    def __init__(self) -> None:
        self.values = {"elasticmoe_time_to_first_token_seconds": "0.1",
                       "elasticmoe_inter_token_latency_seconds": "0.01",
                       "elasticmoe_first_token_wait_p90_seconds": "0", "elasticmoe_requests_finished_total": "1"}
        self.queries: list[str] = []
        self.port = testprocs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def _query(self, request: web.Request) -> web.Response:
        query = request.query["query"]
        self.queries.append(query)
        value = next(v for metric, v in self.values.items() if metric in query)
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [time.time(), value]}]}})

    async def __aenter__(self) -> "StandInPrometheus":
        app = web.Application()
        app.router.add_get("/api/v1/query", self._query)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def _alert(status: str = "firing") -> dict:
    return {"version": "4", "groupKey": "{}:{alertname=\"ElasticMoETTFTHigh\"}", "status": status,
            "receiver": "elasticmoe-operator", "alerts": [{
                "status": status, "labels": {"alertname": "ElasticMoETTFTHigh", "namespace": NS,
                                             "elasticmoe_instance": NAME, "severity": "warning"},
                "annotations": {}, "startsAt": "2026-11-24T12:00:00.5Z", "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "c0ffee0123456789"}]}


async def test_slo_mode_a_firing_alert_makes_the_operator_scale_on_the_prometheus_signal(env, tiny_models,
                                                                                        tmp_path):
    token = "alerts-token-for-the-test"
    (tmp_path / "alerts-token").write_text(token + "\n")
    listen_port = testprocs.free_port()
    operator_url = f"http://127.0.0.1:{listen_port}"
    async with StandInPrometheus() as prom:
        await env.start_operator("--listen", f"127.0.0.1:{listen_port}",
                                 "--alerts-token-file", str(tmp_path / "alerts-token"))
        resource = _resource(tiny_models["qwen3_moe"])
        resource["spec"]["slo"] = {"ttftP90Ms": 2000, "tpotP90Ms": 100}
        # Only the alert can make it evaluate again within the test: the periodic evaluation is an
        # hour apart. No cooldown (the one a started operator restarts with included).
        resource["spec"]["autoscaling"] = {"mode": "Slo", "prometheusUrl": prom.url, "evaluationIntervalSeconds": 3600,
                                           "scaleUpCooldownSeconds": 0, "scaleDownStabilizationSeconds": 3600}
        await env.api.request("POST", CR_PATH, resource, "application/json")
        obj = await env.wait(lambda s: _serving(1)(s) and (s.get("autoscaler") or {}).get("lastEvaluation"), 180,
                             "the instance to serve and the first evaluation")
        first = obj["status"]["autoscaler"]["lastEvaluation"]
        assert (first["action"], first["code"]) == ("hold", "WithinDeadBand"), first
        assert _condition(obj["status"], "MetricsAvailable")["status"] == "True"
        assert 'elasticmoe_instance="demo"' in prom.queries[0] and 'namespace="emoe-test"' in prom.queries[0]
        assert obj["spec"]["devices"].get("replicas") is None, "a hold writes nothing"

        prom.values["elasticmoe_time_to_first_token_seconds"] = "6.0"  # the SLO is breached now
        async with httpx.AsyncClient(base_url=operator_url, timeout=10) as c:
            r = await c.post("/alerts", json=_alert())
            assert r.status_code == 401
            r = await c.post("/alerts", json=_alert(), headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json() == {"alerts": 1, "triggered": 1}, r.text
            obj = await env.wait(_serving(2), 180, "the autoscaler's scale to 2 devices")
            assert obj["spec"]["devices"]["replicas"] == 2  # the operator wrote it: the one writer in Slo
            (entry,) = obj["status"]["autoscaler"]["history"]
            assert (entry["from"], entry["to"], entry["action"], entry["code"]) == (1, 2, "up", "SloBreached")
            assert entry["signals"]["ttftP90Ms"] == "6000" and entry["trigger"]["fingerprint"] == "c0ffee0123456789"
            received = datetime.datetime.fromisoformat(entry["trigger"]["receivedAt"].replace("Z", "+00:00"))
            decided = datetime.datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
            assert 0 <= (decided - received).total_seconds() < 2.0, entry  # the timer runs every second
            scale = obj["status"]["history"][-1]
            assert (scale["from"], scale["to"], scale["outcome"]) == (1, 2, "Succeeded")
            assert scale["reason"].startswith("Slo autoscaler: SLO signal"), scale
            reasons = [e["reason"] for e in await env.events() if e.get("involvedObject", {}).get("name") == NAME]
            assert reasons.count("AutoscaleUp") == 1 and "Scaled" in reasons
            # the same notification again (an Alertmanager HA peer): nothing more happens
            r = await c.post("/alerts", json=_alert(), headers={"Authorization": f"Bearer {token}"})
            assert r.json() == {"alerts": 1, "duplicate": 1}
            # resolved, with the latency back under the SLO: no scale-down by itself
            prom.values["elasticmoe_time_to_first_token_seconds"] = "0.1"
            r = await c.post("/alerts", json=_alert("resolved"), headers={"Authorization": f"Bearer {token}"})
            assert r.json() == {"alerts": 1, "resolved": 1}
            await asyncio.sleep(3)
            obj = await env.cr()
            assert obj["spec"]["devices"]["replicas"] == 2 and len(obj["status"]["autoscaler"]["history"]) == 1
            text = (await c.get("/metrics")).text
            assert ('elasticmoe_operator_autoscale_decisions_total{action="up",elasticmoe_instance="demo",'
                    'namespace="emoe-test",reason="SloBreached"} 1.0') in text
    assert "Traceback" not in (env.kubelet.tmp / "operator-1.log").read_text()
