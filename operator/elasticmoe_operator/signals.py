"""The SLO signal of one instance, read from the Prometheus HTTP API, as a `policy.Observation`.

Why it exists: the Slo policy is pure; something has to turn "what Prometheus says about this
instance" into its input. Three instant queries (`GET /api/v1/query`) over the coordinator's
own series, selected by the instance's labels (the chart's ServiceMonitor attaches `namespace`
and `elasticmoe_instance`):
- p90 time to first token and p90 time per output token (the per-token gaps, which show a growing
  batch as the tokens stream, rather than the per-request TPOT that is known only once requests end):
  histogram_quantile(0.9, sum by (le) (rate(<histogram>_bucket{<selector>}[<window>])))
- the queue now: the largest `elasticmoe_first_token_wait_p90_seconds` (p90 of how long the
  requests still waiting for a first token have waited; 0, read as "no queue", when none waits)
- the request rate: sum(rate(elasticmoe_requests_finished_total{<selector>}[<window>])), or 0 when
  that counter has no series yet but the coordinator is scraped (its `elasticmoe_healthy` gauge is
  there): a fresh idle instance is idle, while a selector that matches nothing is an error.
Device counts come from the coordinator's /admin/status and the spec, not from Prometheus.

What it does not guarantee: the p90s are what Prometheus last scraped (one scrape interval old at
best); a quantile with no samples in the window (NaN, or an empty result) is "no sample", not an
error. Any failure (unreachable, HTTP error, a body that is not the API's, a non-finite quantile)
becomes `Observation.error` with the reason, and the policy holds. The queue gauge is an instant
value at the last scrape, not a window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import httpx

from elasticmoe_operator import policy

TTFT = "elasticmoe_time_to_first_token_seconds"
TPOT = "elasticmoe_inter_token_latency_seconds"
QUEUE = "elasticmoe_first_token_wait_p90_seconds"
FINISHED = "elasticmoe_requests_finished_total"
HEALTHY = "elasticmoe_healthy"  # a gauge every coordinator exports from its start
QUERY_PATH = "/api/v1/query"


class PrometheusError(Exception):
    """A query that did not give a usable answer; the message says why (it ends up in a condition)."""


def default_selector(namespace: str, name: str) -> str:
    """The label matchers of the chart's ServiceMonitor and alert rules for one ElasticMoE."""
    return f'namespace="{_escape(namespace)}",elasticmoe_instance="{_escape(name)}"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def queries(selector: str, window_s: int) -> dict[str, str]:
    """The PromQL of each signal; `selector` is label matchers without braces."""
    w = f"{int(window_s)}s"

    def p90(histogram: str) -> str:
        return f"histogram_quantile(0.9, sum by (le) (rate({histogram}_bucket{{{selector}}}[{w}])))"

    return {"ttft_p90_s": p90(TTFT), "tpot_p90_s": p90(TPOT), "queue_p90_s": f"max({QUEUE}{{{selector}}})",
            # NOTE: a labelled counter has no series before its first increment.
            "requests_per_s": f"sum(rate({FINISHED}{{{selector}}}[{w}])) or 0 * max({HEALTHY}{{{selector}}})"}


def parse_instant(body: object, query: str) -> float | None:
    """The value of an instant query's answer: None when it has no series or its value is NaN
    (no samples in the window); PrometheusError when the body is not the API's or the value is
    not a number. Several series (a selector that matches more than one instance): the largest."""
    if not isinstance(body, dict):
        raise PrometheusError(f"{query}: the answer is not a JSON object")
    if body.get("status") != "success":
        raise PrometheusError(f"{query}: {body.get('errorType') or 'error'}: {body.get('error') or body.get('status')}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise PrometheusError(f"{query}: the answer has no data object")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        samples = [result]
    elif kind == "vector" and isinstance(result, list):
        samples = [item.get("value") if isinstance(item, dict) else None for item in result]
    else:
        raise PrometheusError(f"{query}: expected a vector or scalar result, got {kind!r}")
    values = []
    for sample in samples:
        if not (isinstance(sample, list) and len(sample) == 2):
            raise PrometheusError(f"{query}: a sample is not [time, value]: {sample!r}"[:300])
        try:
            value = float(sample[1])
        except (TypeError, ValueError):
            raise PrometheusError(f"{query}: the value {sample[1]!r} is not a number") from None
        if math.isnan(value):
            continue
        if math.isinf(value):
            raise PrometheusError(f"{query}: the value is {sample[1]} (a bucket layout without finite bounds?)")
        values.append(value)
    return max(values) if values else None


@dataclasses.dataclass(frozen=True)
class Prometheus:
    """The HTTP API of one Prometheus (or Thanos, Mimir: anything that answers /api/v1/query)."""

    url: str
    bearer_token: str = ""
    timeout_s: float = 5.0
    transport: httpx.AsyncBaseTransport | None = None  # tests: httpx.MockTransport

    async def query_all(self, promql: dict[str, str]) -> dict[str, float | None]:
        """Every query at once; PrometheusError on the first that fails."""
        headers = {"Authorization": f"Bearer {self.bearer_token}"} if self.bearer_token else {}
        async with httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout_s,
                                     transport=self.transport) as client:
            answers = await asyncio.gather(*(self._query(client, q) for q in promql.values()))
        return dict(zip(promql, answers))

    async def _query(self, client: httpx.AsyncClient, promql: str) -> float | None:
        try:
            r = await client.get(QUERY_PATH, params={"query": promql})
        except httpx.HTTPError as exc:
            raise PrometheusError(f"GET {self.url.rstrip('/')}{QUERY_PATH}: {type(exc).__name__}: {exc}") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 200:
            detail = body.get("error") if isinstance(body, dict) else r.text[:200]
            raise PrometheusError(f"GET {QUERY_PATH}: HTTP {r.status_code}: {detail}")
        return parse_instant(body, promql)


async def observe(prometheus: Prometheus, selector: str, window_s: int, *, at: float, active: int, desired: int,
                  waiting_requests: int = 0, decoding: float | None = None) -> policy.Observation:
    """The observation the policy decides on. `desired` is the spec's count; devices asked for
    and not yet serving count as warming (their capacity is on its way). `waiting_requests` (the
    coordinator's running + waiting) tells "no request finished" apart from "idle"; `decoding`
    (the coordinator's running requests) places the TPOT seen on the decode model."""
    warming = max(0, desired - active)
    try:
        values = await prometheus.query_all(queries(selector, window_s))
    except PrometheusError as exc:
        return policy.Observation(at=at, active=active, warming=warming, desired=desired, error=str(exc))
    rate = values["requests_per_s"]
    if rate is None and values["ttft_p90_s"] is None and values["tpot_p90_s"] is None:
        return policy.Observation(at=at, active=active, warming=warming, desired=desired,
                                  error=f"Prometheus has no series matching {{{selector}}} (is the coordinator "
                                        f"scraped, with these labels?)")
    if rate == 0 and waiting_requests > 0:
        rate = None  # requests are in, none finished in the window: busy, not idle
    return policy.Observation(at=at, active=active, warming=warming, desired=desired,
                              ttft_p90_s=values["ttft_p90_s"], tpot_p90_s=values["tpot_p90_s"],
                              queue_p90_s=values["queue_p90_s"] or None, requests_per_s=rate, decoding=decoding)
