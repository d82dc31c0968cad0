"""Prometheus metrics of one HTTP server, on that server's own registry.

Why this module exists: the autoscaler (operator) decides from these series (TTFT/TPOT p90,
queue depth, KV usage), so their names, types and units are an interface. Each app owns a
`CollectorRegistry` rather than the process-global one so several servers can run in one
process (tests, the embedded coordinator) without "Duplicated timeseries" errors.

Request-level series (latencies, token and outcome counters) are recorded by the HTTP layer as
requests progress. Engine-level series (running/waiting requests, KV blocks, health,
preemptions) are read from `engine.stats()` at scrape time by a custom collector, so they are
never stale and cost nothing between scrapes.

What it does not guarantee: latencies are measured in this process from the moment the
handler starts (network and JSON parsing before that are not included); TPOT is one
observation per request (the mean gap per output token after the first); the inter-token
latency is one observation per streamed token (vLLM's `inter_token_latency`), so it reacts to
a growing batch within one step, while TPOT waits for requests to end. The first-token wait is
what requests still waiting have waited so far (a lower bound of their TTFT): the queue now.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from elasticmoe_worker.contract import admin
from elasticmoe_worker.engine import types

logger = logging.getLogger(__name__)

# 1 ms .. 120 s, roughly 1-2.5-5 per decade: fine enough for a p90 of a few ms (TPOT on a
# small model) and for minute-long generations (e2e).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip

FINISH_OUTCOMES: tuple[str, ...] = tuple(r.value for r in types.FinishReason)

# Why a request was refused before the engine produced anything for it.
REJECT_INVALID_REQUEST = "invalid_request"  # malformed body, bad field, bad sampling value
REJECT_MODEL_NOT_FOUND = "model_not_found"
REJECT_CONTEXT_LENGTH = "context_length"  # prompt (+ max_tokens) does not fit max_model_len
REJECT_OVERLOADED = "overloaded"  # the engine's waiting queue is full
REJECT_QUEUE_TIMEOUT = "queue_timeout"  # waited longer than max_waiting_s for a first token
REJECT_ENGINE_DEAD = "engine_dead"
REJECT_REASONS: tuple[str, ...] = (
    REJECT_INVALID_REQUEST,
    REJECT_MODEL_NOT_FOUND,
    REJECT_CONTEXT_LENGTH,
    REJECT_OVERLOADED,
    REJECT_QUEUE_TIMEOUT,
    REJECT_ENGINE_DEAD,
)


class _FirstTokenWaitCollector(Collector):
    """The queue now, read at scrape time: a gauge that a scrape cannot see stale."""

    def __init__(self, p90_s: Callable[[], float]) -> None:
        self._p90_s = p90_s

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            FIRST_TOKEN_WAIT_P90, "p90 of how long the requests still waiting for their first token have waited so "
            "far (0 when none waits): the queueing signal of the autoscaler.", value=self._p90_s())


FIRST_TOKEN_WAIT_P90 = "elasticmoe_first_token_wait_p90_seconds"


class _EngineStatsCollector(Collector):
    """Reads `engine.stats()` once per scrape and turns it into gauges and a counter."""

    def __init__(self, stats: Callable[[], types.EngineStats]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        # Returning the families (without samples) lets the registry detect name clashes at
        # registration without calling the engine.
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # a scrape must never fail because the engine did
            logger.exception("engine.stats() failed during a metrics scrape; reporting unhealthy")
            stats = None
        return iter(self._families(stats))

    @staticmethod
    def _families(stats: types.EngineStats | None) -> list[Metric]:
        running = GaugeMetricFamily(
            "elasticmoe_num_requests_running", "Requests currently scheduled in the engine (prefill or decode)."
        )
        waiting = GaugeMetricFamily(
            "elasticmoe_num_requests_waiting", "Requests queued in the engine, waiting to be scheduled."
        )
        used = GaugeMetricFamily("elasticmoe_kv_cache_used_blocks", "KV-cache blocks currently held by requests.")
        total = GaugeMetricFamily("elasticmoe_kv_cache_total_blocks", "KV-cache blocks in the engine's pool.")
        healthy = GaugeMetricFamily("elasticmoe_healthy", "1 when the engine loop is alive and serving, else 0.")
        preemptions = CounterMetricFamily(
            "elasticmoe_preemptions", "Requests preempted (KV blocks freed, recomputed later) since engine start."
        )
        recomputed = CounterMetricFamily(
            "elasticmoe_recomputed_tokens", "Tokens computed again that were in a KV cache before (requests preempted, "
            "or adopted at a switch without their KV) since the serving executors started."
        )
        if stats is not None:
            running.add_metric([], stats.num_running)
            waiting.add_metric([], stats.num_waiting)
            used.add_metric([], stats.kv_blocks_used)
            total.add_metric([], stats.kv_blocks_total)
            healthy.add_metric([], 1.0 if stats.healthy else 0.0)
            preemptions.add_metric([], stats.num_preemptions_total)
            recomputed.add_metric([], stats.num_recomputed_tokens_total)
        else:
            healthy.add_metric([], 0.0)
        return [running, waiting, used, total, healthy, preemptions, recomputed]


AUTOSCALER_ACTIONS: tuple[str, ...] = ("up", "down", "hold")  # as `elasticmoe_operator.policy` names them

# Scale phases take milliseconds (a switch) to minutes (a cold worker's start).
SCALE_PHASE_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class _ScalingCollector(Collector):
    """Device counts and scale history of a multi-device instance (`scaling_counters()`); a
    single engine reports one active device and no scales."""

    def __init__(self, counters: Callable[[], admin.ScalingCounters] | None) -> None:
        self._counters = counters

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        counters = None
        if self._counters is not None:
            try:
                counters = self._counters()
            except Exception:  # a scrape must never fail because the instance did
                logger.exception("scaling_counters() failed during a metrics scrape")
        return iter(self._families(counters))

    @staticmethod
    def _families(c: admin.ScalingCounters | None) -> list[Metric]:
        devices = GaugeMetricFamily("elasticmoe_devices", "Devices of the instance by state: desired (the "
                                    "scale's target), active (serving), warming (joining in a scale).", labels=["state"])
        scales = CounterMetricFamily("elasticmoe_scales", "Scales that ended, by outcome.", labels=["outcome"])
        handed = CounterMetricFamily("elasticmoe_requests_handed_over",
                                     "Running requests handed from old to new executors at a switch.")
        phases = HistogramMetricFamily("elasticmoe_scale_phase_duration_seconds",
                                       "Duration of each phase of the scales that ended.", labels=["phase"])
        d = c.devices if c is not None else admin.DeviceCounts(desired=1, active=1)
        for state, value in (("desired", d.desired), ("active", d.active), ("warming", d.warming)):
            devices.add_metric([state], value)
        by_outcome = c.scales_by_outcome if c is not None else {}
        for outcome in admin.TERMINAL_OUTCOMES:
            scales.add_metric([outcome.value], by_outcome.get(outcome.value, 0))
        handed.add_metric([], c.requests_handed_over if c is not None else 0)
        by_phase: dict[str, list[float]] = {}
        for phase, seconds in (c.phase_seconds if c is not None else []):
            by_phase.setdefault(phase, []).append(seconds)
        for phase, values in sorted(by_phase.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in SCALE_PHASE_BUCKETS_S]
            buckets.append(("+Inf", len(values)))
            phases.add_metric([phase], buckets, sum(values))
        return [devices, scales, handed, phases]


class ServerMetrics:
    """All series of one server; `render()` gives the exposition text for GET /metrics."""

    def __init__(self, engine_stats: Callable[[], types.EngineStats],
                 scaling_counters: Callable[[], admin.ScalingCounters] | None = None) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token_s = prometheus_client.Histogram(
            "elasticmoe_time_to_first_token_seconds",
            "Time from the request reaching the handler to its first output token.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.time_per_output_token_s = prometheus_client.Histogram(
            "elasticmoe_time_per_output_token_seconds",
            "Per request: mean time per output token after the first (decode speed seen by the client).",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency_s = prometheus_client.Histogram(
            "elasticmoe_inter_token_latency_seconds",
            "Per streamed output token after the first: the gap since the previous token(s) of its request.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e_request_latency_s = prometheus_client.Histogram(
            "elasticmoe_e2e_request_latency_seconds",
            "Time from the request reaching the handler to its last output token, for finished requests.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = prometheus_client.Counter(
            "elasticmoe_prompt_tokens_total", "Prompt tokens of requests the engine started.", registry=r
        )
        self.generation_tokens = prometheus_client.Counter(
            "elasticmoe_generation_tokens_total", "Output tokens streamed back to clients.", registry=r
        )
        self.requests_finished = prometheus_client.Counter(
            "elasticmoe_requests_finished_total",
            "Requests that reached the engine, by how they ended (stop, length, abort, error).",
            ["outcome"],
            registry=r,
        )
        self.requests_rejected = prometheus_client.Counter(
            "elasticmoe_requests_rejected_total",
            "Requests refused before any output, by reason.",
            ["reason"],
            registry=r,
        )
        # Pre-create every label value so rates exist (at 0) before the first event.
        for outcome in FINISH_OUTCOMES:
            self.requests_finished.labels(outcome=outcome)
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason=reason)
        r.register(_EngineStatsCollector(engine_stats))
        r.register(_ScalingCollector(scaling_counters))
        self._waiting_lock = threading.Lock()  # the autoscaler's thread reads it too
        self._waiting_since: dict[str, float] = {}  # request id -> arrival (perf_counter), no first token yet
        r.register(_FirstTokenWaitCollector(self.first_token_wait_p90_s))
        self.autoscaler_decisions: prometheus_client.Counter | None = None

    def track_autoscaler(self) -> prometheus_client.Counter:
        """The decisions counter of `serve --autoscale`, registered on first call: a server
        without the autoscaler does not expose it."""
        if self.autoscaler_decisions is None:
            self.autoscaler_decisions = prometheus_client.Counter(
                "elasticmoe_autoscaler_decisions",
                "Decisions of the in-process SLO autoscaler, by action (up, down, hold).",
                ["action"],
                registry=self.registry,
            )
            for action in AUTOSCALER_ACTIONS:
                self.autoscaler_decisions.labels(action=action)
        return self.autoscaler_decisions

    def waiting(self, request_id: str, arrival_s: float) -> None:
        """A request waits for its first token since `arrival_s` (`time.perf_counter()`)."""
        with self._waiting_lock:
            self._waiting_since[request_id] = arrival_s

    def not_waiting(self, request_id: str) -> None:
        """Its first token came, or it ended without one; idempotent."""
        with self._waiting_lock:
            self._waiting_since.pop(request_id, None)

    def first_token_wait_p90_s(self) -> float:
        """p90 of how long the requests still waiting for a first token have waited so far
        (nearest rank); 0 when none waits."""
        now_s = time.perf_counter()
        with self._waiting_lock:
            ages = sorted(now_s - t for t in self._waiting_since.values())
        if not ages:
            return 0.0
        return ages[min(len(ages) - 1, max(0, -(-9 * len(ages) // 10) - 1))]

    def reject(self, reason: str) -> None:
        assert reason in REJECT_REASONS, reason
        self.requests_rejected.labels(reason=reason).inc()

    def finish(self, outcome: types.FinishReason) -> None:
        self.requests_finished.labels(outcome=outcome.value).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
