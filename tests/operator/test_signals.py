"""PromQL answers -> policy.Observation, with httpx.MockTransport standing in for the Prometheus
HTTP API (its documented JSON shapes; a real Prometheus run is the end-to-end test's)."""

from __future__ import annotations

import json

import httpx
import pytest

from elasticmoe_operator import policy, signals

SEL = signals.default_selector("ml", "moe")


def vector(value: str | None, ts: float = 1700000000.0) -> dict:
    result = [] if value is None else [{"metric": {}, "value": [ts, value]}]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


class FakePrometheus:
    """Answers each query by the metric it reads; records what it was asked and with which headers."""

    def __init__(self, ttft="NaN", tpot="NaN", rate="0", queue=None, status=200, body=None) -> None:
        self.answers = {signals.TTFT: ttft, signals.TPOT: tpot, signals.FINISHED: rate, signals.QUEUE: queue}
        self.status, self.body = status, body
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.url.path == "/api/v1/query"
        if self.body is not None:
            return httpx.Response(self.status, content=self.body)
        query = request.url.params["query"]
        metric = next(m for m in self.answers if m in query)
        return httpx.Response(self.status, json=vector(self.answers[metric]))

    def client(self, token="") -> signals.Prometheus:
        return signals.Prometheus("http://prometheus:9090/", token, transport=httpx.MockTransport(self))


async def observe(fake: FakePrometheus, active=2, desired=2, waiting=0, token="") -> policy.Observation:
    return await signals.observe(fake.client(token), SEL, 60, at=100.0, active=active, desired=desired,
                                 waiting_requests=waiting)


def test_queries_select_the_instance_over_the_window():
    q = signals.queries(SEL, 30)
    assert q["ttft_p90_s"] == ('histogram_quantile(0.9, sum by (le) (rate(elasticmoe_time_to_first_token_seconds_'
                               'bucket{namespace="ml",elasticmoe_instance="moe"}[30s])))')
    assert "elasticmoe_inter_token_latency_seconds_bucket{" in q["tpot_p90_s"]
    assert q["queue_p90_s"] == f"max(elasticmoe_first_token_wait_p90_seconds{{{SEL}}})"
    assert q["requests_per_s"].startswith('sum(rate(elasticmoe_requests_finished_total{namespace="ml",'
                                          'elasticmoe_instance="moe"}[30s]))')
    assert signals.default_selector('a"b', "c\\d") == 'namespace="a\\"b",elasticmoe_instance="c\\\\d"'


@pytest.mark.asyncio
async def test_quantiles_and_rate_become_the_observation():
    fake = FakePrometheus(ttft="2.5", tpot="0.08", rate="3.25")
    o = await observe(fake, active=2, desired=3, token="s3cret")
    assert (o.ttft_p90_s, o.tpot_p90_s, o.requests_per_s, o.queue_p90_s) == (2.5, 0.08, 3.25, None)
    assert (o.at, o.active, o.warming, o.desired, o.error) == (100.0, 2, 1, 3, None)
    assert len(fake.requests) == 4
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in fake.requests)
    assert str(fake.requests[0].url).startswith("http://prometheus:9090/api/v1/query?query=")


@pytest.mark.asyncio
async def test_the_queue_gauge_is_the_queueing_signal_and_zero_means_no_queue():
    o = await observe(FakePrometheus(rate="1", queue="2.5"))
    assert o.queue_p90_s == 2.5
    assert (await observe(FakePrometheus(rate="1", queue="0"))).queue_p90_s is None, "nobody waits"


@pytest.mark.asyncio
async def test_no_token_sends_no_authorization_header():
    fake = FakePrometheus(rate="1")
    await observe(fake)
    assert all("Authorization" not in r.headers for r in fake.requests)


@pytest.mark.asyncio
async def test_nan_quantiles_are_no_samples_and_an_idle_instance_is_idle():
    o = await observe(FakePrometheus(ttft="NaN", tpot="NaN", rate="0"))
    assert (o.ttft_p90_s, o.tpot_p90_s, o.requests_per_s, o.error) == (None, None, 0.0, None)
    d, _ = policy.decide(o, policy.State(), policy.Config(min_devices=1, max_devices=4, ttft_p90_s=1,
                                                          tpot_p90_s=0.1), now=100.0)
    assert d.metrics_available and d.raw_signal == 0.0


@pytest.mark.asyncio
async def test_no_finished_request_while_requests_wait_is_not_idle():
    o = await observe(FakePrometheus(rate="0"), waiting=5)
    assert o.requests_per_s is None and o.error is None


@pytest.mark.asyncio
async def test_an_instance_prometheus_knows_nothing_of_is_an_error_naming_the_selector():
    o = await observe(FakePrometheus(ttft=None, tpot=None, rate=None))
    assert o.error is not None and SEL in o.error and "scraped" in o.error


@pytest.mark.asyncio
@pytest.mark.parametrize("fake, why", [
    (FakePrometheus(status=503, body=b"service unavailable"), "HTTP 503"),
    (FakePrometheus(status=400, body=json.dumps({"status": "error", "errorType": "bad_data",
                                                 "error": "parse error at char 5"}).encode()), "parse error"),
    (FakePrometheus(body=json.dumps({"status": "error", "errorType": "timeout",
                                     "error": "query timed out"}).encode()), "timeout: query timed out"),
    (FakePrometheus(body=b"<html>login</html>"), "not a JSON object"),
    (FakePrometheus(body=json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode()),
     "expected a vector or scalar"),
    (FakePrometheus(ttft="fast"), "not a number"),
    (FakePrometheus(ttft="+Inf"), "+Inf"),
], ids=["http-503", "http-400", "api-error", "not-json", "matrix", "not-a-number", "infinite"])
async def test_failures_become_an_error_with_the_reason(fake, why):
    o = await observe(fake)
    assert o.error is not None and why in o.error, o.error
    assert (o.ttft_p90_s, o.tpot_p90_s, o.requests_per_s) == (None, None, None)
    d, _ = policy.decide(o, policy.State(), policy.Config(min_devices=1, max_devices=4, ttft_p90_s=1,
                                                          tpot_p90_s=0.1), now=100.0)
    assert (d.target, d.metrics_available, d.code) == (2, False, "MetricsUnavailable")
    assert why in d.metrics_reason


@pytest.mark.asyncio
async def test_an_unreachable_prometheus_is_an_error():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)
    prom = signals.Prometheus("http://127.0.0.1:1", transport=httpx.MockTransport(refuse))
    o = await signals.observe(prom, SEL, 60, at=0.0, active=1, desired=1)
    assert "ConnectError" in o.error and "connection refused" in o.error


@pytest.mark.parametrize("body, expected", [
    (vector("0.5"), 0.5),
    (vector(None), None),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"pod": "a"}, "value": [1, "0.2"]}, {"metric": {"pod": "b"}, "value": [1, "0.7"]}]}}, 0.7),
    ({"status": "success", "data": {"resultType": "scalar", "result": [1, "1.5"]}}, 1.5),
    ({"status": "success", "data": {"resultType": "scalar", "result": [1, "NaN"]}}, None),
])
def test_parse_instant(body, expected):
    assert signals.parse_instant(body, "q") == expected
