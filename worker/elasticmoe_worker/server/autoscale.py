"""`elasticmoe serve --devices N --autoscale`: the SLO policy run against the server's own metrics.

Why it exists: on one machine there is no Prometheus and no operator, yet the instance should
still add devices when latency breaks its SLO and give them back when load is gone. This module
is the thin shell around the pure policy the operator uses too (`elasticmoe_operator.policy`):
observe -> decide -> act, every `interval_s`, on a thread of the serving process.

Observe: every evaluation takes a snapshot of the app's cumulative TTFT and TPOT histograms and
of its finished-requests counter, and compares it with the snapshot one window earlier, as
Prometheus' `histogram_quantile(0.9, rate(...[window]))` would: p90 with linear interpolation
inside the bucket. The device counts come from the instance's `status()`.
Decide: `policy.decide`; its clock is `time.monotonic()`.
Act: when the target differs from the active count and no scale runs, `start_scale`. Each
finished scale's measured duration is folded into the policy's time-to-ready (`policy.learn`).

One writer: the autoscaler is the only one that scales on its own, but `POST /admin/scale` (and
`elasticmoe scale`) still works while it runs, as a manual override. The autoscaler does not
undo it on purpose: its next evaluations start from the new device count and move it only as
the policy would move any count (a scale-down still needs the whole stabilization window; a
count outside [min, max] is brought back inside).

Every decision is logged with its reason (holds at debug unless the reason says something new),
counted in `elasticmoe_autoscaler_decisions_total{action}` and kept in `GET /admin/status`.

Not guaranteed: latencies are those this process measured (see `metrics`); with requests in
flight but none finished and no first token within the window, nothing can be said and the
count is held; a scale that the instance refuses (unhealthy, another scale) is retried only if
the next evaluations still ask for it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import logging
import pathlib
import re
import threading
import time
import uuid
from typing import Callable

from elasticmoe_operator import policy
from elasticmoe_worker import cliargs
from elasticmoe_worker.contract import admin

logger = logging.getLogger(__name__)

QUANTILE = 0.9
HISTORY_LIMIT = 10  # scale decisions kept, and as many notable holds (holds never push a scale out)

# (upper bound, cumulative count) per bucket, ascending, +Inf last: a Prometheus histogram.
Buckets = tuple[tuple[float, float], ...]


# -- the windowed quantile -------------------------------------------------------------------
def histogram_buckets(histogram) -> Buckets:
    """The cumulative buckets of an unlabelled `prometheus_client.Histogram`, now."""
    samples = [s for metric in histogram.collect() for s in metric.samples if s.name.endswith("_bucket")]
    return tuple(sorted((float(s.labels["le"]), s.value) for s in samples))


def counter_total(counter) -> float:
    """The sum over all label values of a `prometheus_client.Counter`."""
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative buckets; None without observations.
    A rank in the +Inf bucket gives the largest finite bound, as Prometheus does."""
    assert 0 <= q <= 1 and len(buckets) >= 2 and buckets[-1][0] == float("inf"), buckets
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    b = next((i for i, (_, count) in enumerate(buckets[:-1]) if count >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, (end, count) = 0.0, buckets[b]
    if b > 0:
        start, below = buckets[b - 1]
        count -= below
        rank -= below
    return start + (end - start) * rank / count


def window_quantile(q: float, newer: Buckets, older: Buckets | None) -> float | None:
    """The q-quantile of what was observed between two snapshots of one histogram (the rate's
    increase; `older=None`: since the start); None when nothing was observed."""
    if older is None:
        return quantile(q, newer)
    assert [le for le, _ in newer] == [le for le, _ in older], "snapshots of different histograms"
    return quantile(q, tuple((le, new - old) for (le, new), (_, old) in zip(newer, older)))


@dataclasses.dataclass(frozen=True)
class Sample:
    """Cumulative figures of one server at `at` (monotonic seconds)."""

    at: float
    ttft: Buckets
    tpot: Buckets  # per request (the SLO's definition; known only once a request ends)
    itl: Buckets  # per token (known as the tokens stream: the early sign of a growing batch)
    finished: float  # requests that ended, however
    queue_p90_s: float = 0.0  # of the requests waiting for a first token now


class Window:
    """The snapshots of the last `window_s`; `add` returns the one to diff against: the newest
    that is at least `window_s` old, else the oldest (the window is still filling)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: collections.deque[Sample] = collections.deque()

    def add(self, sample: Sample) -> Sample:
        self._samples.append(sample)
        while len(self._samples) > 1 and self._samples[1].at <= sample.at - self.window_s:
            self._samples.popleft()
        return self._samples[0]


def observe(newer: Sample, older: Sample, status: admin.AdminStatus) -> policy.Observation:
    """The policy's input from two snapshots and the instance's status."""
    elapsed_s = newer.at - older.at
    rate = (newer.finished - older.finished) / elapsed_s if elapsed_s > 0 else None
    in_flight = status.requests.running + status.requests.waiting
    if rate == 0 and in_flight > 0:
        rate = None  # not idle: requests run but none ended in the window; nothing can be said
    # Time per output token: the per-token gaps of the window when there are any (a batch that
    # grows shows in the next token; per-request TPOT only once those requests end), else TPOT.
    tpot = window_quantile(QUANTILE, newer.itl, older.itl)
    if tpot is None:
        tpot = window_quantile(QUANTILE, newer.tpot, older.tpot)
    return policy.Observation(
        at=newer.at, active=status.devices.active, warming=status.devices.warming, desired=status.devices.desired,
        ttft_p90_s=window_quantile(QUANTILE, newer.ttft, older.ttft), tpot_p90_s=tpot,
        queue_p90_s=newer.queue_p90_s or None, requests_per_s=rate, decoding=float(status.requests.running))


def reason_kind(reason: str) -> str:
    """The reason without its numbers: two holds of one kind differ only in these."""
    return re.sub(r"-?\d+(\.\d+)?", "#", reason)


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the loop --------------------------------------------------------------------------------
class Autoscaler:
    """Runs `policy.decide` on `metrics` (a `metrics.ServerMetrics`) every `interval_s` and
    scales `instance` (a `coordinator.Instance`: `status()`, `start_scale()`) to its target."""

    def __init__(self, instance, metrics, config: policy.Config, *, interval_s: float = 5.0,
                 window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0 or not window_s >= interval_s:
            raise ValueError(f"interval_s/window_s: got {interval_s}/{window_s}, expected 0 < interval <= window")
        self._instance = instance
        self._metrics = metrics
        self._decisions_total = metrics.track_autoscaler()
        self.config = config
        self.interval_s = interval_s
        self._clock = clock
        self._window = Window(window_s)
        self._policy_state = policy.State()
        self._own_scale_id = ""
        self._seen_scales: set[str] = set()
        self._lock = threading.Lock()  # guards what status() reads
        self._last: policy.Decision | None = None
        self._last_kind = ""
        self._evaluations = 0
        # (order, decision): the last scale decisions and the last notable holds, merged in status()
        self._scales: collections.deque[tuple[int, admin.AutoscalerDecision]] = collections.deque(maxlen=HISTORY_LIMIT)
        self._holds: collections.deque[tuple[int, admin.AutoscalerDecision]] = collections.deque(maxlen=HISTORY_LIMIT)
        self._recorded = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window.add(self._sample())  # the baseline of the first window: what came before is not judged

    def _sample(self) -> Sample:
        m = self._metrics
        return Sample(at=self._clock(), ttft=histogram_buckets(m.time_to_first_token_s),
                      tpot=histogram_buckets(m.time_per_output_token_s),
                      itl=histogram_buckets(m.inter_token_latency_s), finished=counter_total(m.requests_finished),
                      queue_p90_s=m.first_token_wait_p90_s())

    def start(self) -> "Autoscaler":
        assert self._thread is None, "start() once"
        c = self.config
        logger.info("autoscaler on: devices in [%d, %d], SLO p90 TTFT %.0f ms and TPOT %.0f ms, evaluated every "
                    "%g s over the last %g s; scale-up cooldown %g s, scale-down stabilization %s; %s",
                    c.min_devices, c.max_devices, c.ttft_p90_s * 1000, c.tpot_p90_s * 1000, self.interval_s,
                    self._window.window_s, c.scale_up_cooldown_s,
                    f"{c.stabilization_ready_multiple:g} x the measured time of a scale back up, within "
                    f"[{c.settle_s:g}, {c.scale_down_stabilization_s:g}] s" if c.stabilization_ready_multiple > 0
                    else f"{c.scale_down_stabilization_s:g} s",
                    (f"TPOT of fewer devices projected by the measured decode steps of {sorted(c.decode_step_s)} "
                     f"device(s)" if c.decode_step_s else "every latency of fewer devices projected x devices/fewer")
                    + ("; the TPOT seen at each count is learned and acted on" if c.learn_tpot else ""))
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # the next evaluation may succeed; serving goes on regardless
                logger.exception("autoscaler: evaluation failed; next one in %g s", self.interval_s)

    def tick(self) -> policy.Decision:
        """One evaluation: observe, decide, act, record; -> the decision."""
        status = self._instance.status()
        self._learn(status)
        sample = self._sample()
        obs = observe(sample, self._window.add(sample), status)
        before = self._policy_state
        decision, state = policy.decide(obs, before, self.config, sample.at)
        scale_id, not_started = "", ""
        if decision.action != policy.HOLD:  # without a running scale: target != active
            if status.current_scale is not None:
                not_started = f"scale {status.current_scale.scale_id} is running"
            else:
                scale_id = f"autoscaler-{uuid.uuid4().hex[:12]}"
                try:
                    self._instance.start_scale(decision.target, reason=f"autoscaler: {decision.reason}",
                                               scale_id=scale_id)
                    self._own_scale_id = scale_id
                except (ValueError, RuntimeError) as exc:  # out of bounds; ScaleInProgress, unhealthy
                    scale_id, not_started = "", str(exc)
            if not_started:
                # Nothing was actuated: no cooldown, no pending scale, the low streak goes on.
                state = dataclasses.replace(state, last_up_at=before.last_up_at, pending=before.pending,
                                            recommendations=before.recommendations,
                                            recommended_at=before.recommended_at)
        self._policy_state = state
        self._record(decision, scale_id, not_started)
        return decision

    def _learn(self, status: admin.AdminStatus) -> None:
        """Fold every scale that ended since the last evaluation into the time-to-ready."""
        for rec in [status.last_scale, *status.history]:
            if rec is None or rec.outcome not in admin.TERMINAL_OUTCOMES or rec.scale_id in self._seen_scales:
                continue
            self._seen_scales.add(rec.scale_id)
            if rec.outcome == admin.Outcome.SUCCEEDED and rec.duration_ms > 0:
                self._policy_state = policy.learn(self._policy_state, rec.from_devices, rec.to_devices,
                                                  rec.duration_ms / 1000)
                logger.info("autoscaler: scale %d -> %d took %.3f s; time-to-ready for that step now %.3f s",
                            rec.from_devices, rec.to_devices, rec.duration_ms / 1000,
                            self._policy_state.time_to_ready_s[(rec.from_devices, rec.to_devices)])
            elif rec.scale_id == self._own_scale_id:
                # Its effect will never come: do not wait for it before judging the next step.
                self._policy_state = dataclasses.replace(self._policy_state, pending=None)
                logger.warning("autoscaler: its scale %d -> %d %s: %s", rec.from_devices, rec.to_devices,
                               rec.outcome.value.lower(), rec.message)

    def _record(self, decision: policy.Decision, scale_id: str, not_started: str) -> None:
        self._decisions_total.labels(action=decision.action).inc()
        kind = reason_kind(decision.reason)
        notable = decision.action != policy.HOLD or kind != self._last_kind
        outcome = f", scale {scale_id}" if scale_id else (f", not started: {not_started}" if not_started else "")
        logger.log(logging.INFO if notable else logging.DEBUG, "autoscaler decision: %s, target %d device(s)%s: %s",
                   decision.action, decision.target, outcome, decision.reason)
        with self._lock:
            self._last, self._last_kind = decision, kind
            self._evaluations += 1
            if notable:
                values = {k: float(v) for k, v in decision.values.items()}
                self._recorded += 1
                kept = self._holds if decision.action == policy.HOLD else self._scales
                kept.append((self._recorded, admin.AutoscalerDecision(
                    time=_now_rfc3339(), action=decision.action, target=decision.target, reason=decision.reason,
                    values=values, scale_id=scale_id)))

    def status(self) -> admin.AutoscalerStatus:
        with self._lock:
            d = self._last
            return admin.AutoscalerStatus(
                min_devices=self.config.min_devices, max_devices=self.config.max_devices,
                evaluations=self._evaluations, action=d.action if d else "", target=d.target if d else None,
                reason=d.reason if d else "", signal=d.signal if d else None,
                metrics_available=d.metrics_available if d else False,
                metrics_reason=d.metrics_reason if d else "no evaluation yet",
                history=[entry for _, entry in sorted([*self._scales, *self._holds], key=lambda e: e[0])])


# -- command line ----------------------------------------------------------------------------
DEFAULT_MAX_DEVICES = 4  # or the model's routed experts, if fewer
_OPTIONS = ("min_devices", "max_devices", "slo_ttft_p90_ms", "slo_tpot_p90_ms", "slo_queue_p90_ms", "scale_up_cooldown_s",
            "scale_down_stabilization_s", "stabilization_ready_multiple", "autoscale_interval_s",
            "autoscale_window_s", "autoscale_profile", "no_autoscale_tpot_learning")
_DEFAULTS = {"min_devices": 1, "slo_ttft_p90_ms": 2000.0, "slo_tpot_p90_ms": 100.0, "slo_queue_p90_ms": 1000.0,
             "scale_up_cooldown_s": 30.0,
             "scale_down_stabilization_s": 300.0, "stabilization_ready_multiple": 10.0, "autoscale_interval_s": 5.0,
             "autoscale_window_s": 30.0}


def _seconds(positive: bool) -> Callable[[str], float]:
    expected = "a number > 0" if positive else "a number >= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {expected}") from None
        if not (value > 0 if positive else value >= 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"got {text}, expected {expected}")
        return value

    return parse


_positive_float, _non_negative_float = _seconds(True), _seconds(False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The autoscaling options of `serve` and `coordinator`; defaults are filled in by
    `config_from_args`, so that an option given without --autoscale can be named."""
    d = _DEFAULTS
    c = policy.Config(min_devices=1, max_devices=1, ttft_p90_s=1, tpot_p90_s=1)  # the thresholds' defaults
    g = p.add_argument_group("autoscaling", "With --autoscale the server scales its own devices on its p90 "
                             "TTFT and time per output token (per streamed token) over the last window and the p90 "
                             "wait of the requests still waiting for a first token: the SLO signal is the largest "
                             f"latency/target ratio, smoothed; up above {c.up_threshold:g}, down to the fewest "
                             f"devices whose projected signal stays under {c.down_threshold:g} for the whole "
                             "stabilization window; after the device count changes, nothing is decided until one "
                             "whole window holds only the new count's latencies. "
                             "Each decision is logged with its reason and shown in GET /admin/status.")
    g.add_argument("--autoscale", action="store_true",
                   help="scale the instance between --min-devices and --max-devices on the SLO signal "
                        "(needs --devices N)")
    g.add_argument("--min-devices", type=cliargs.positive_int, default=None, metavar="N",
                   help=f"never fewer devices (default: {d['min_devices']})")
    g.add_argument("--max-devices", type=cliargs.positive_int, default=None, metavar="N",
                   help=f"never more devices (default: {DEFAULT_MAX_DEVICES}, or the model's routed experts if fewer)")
    g.add_argument("--slo-ttft-p90-ms", type=_positive_float, default=None, metavar="MS",
                   help=f"target p90 time to first token (default: {d['slo_ttft_p90_ms']:g})")
    g.add_argument("--slo-tpot-p90-ms", type=_positive_float, default=None, metavar="MS",
                   help=f"target p90 time per output token (default: {d['slo_tpot_p90_ms']:g})")
    g.add_argument("--slo-queue-p90-ms", type=_positive_float, default=None, metavar="MS",
                   help="target p90 of how long the requests waiting for their first token have waited so far "
                        f"(the queue now; default: {d['slo_queue_p90_ms']:g})")
    g.add_argument("--scale-up-cooldown-s", type=_non_negative_float, default=None, metavar="S",
                   help=f"least time between two scale-ups (default: {d['scale_up_cooldown_s']:g})")
    g.add_argument("--scale-down-stabilization-s", type=_non_negative_float, default=None, metavar="S",
                   help="devices are removed only after every evaluation of this long a window found fewer enough "
                        "(their projected signal under the down threshold); then down to the largest count the "
                        f"window asked for; the most it lasts (default: {d['scale_down_stabilization_s']:g})")
    g.add_argument("--stabilization-ready-multiple", type=_non_negative_float, default=None, metavar="K",
                   help="the stabilization window is K x the measured time of a scale back up (n-1 -> n devices), "
                        "at least --autoscale-window-s and at most --scale-down-stabilization-s: a device that "
                        "comes back in a second is not held idle for minutes; until a scale-up was measured, K x "
                        f"{c.default_time_to_ready_s:g} s. 0: always --scale-down-stabilization-s "
                        f"(default: {d['stabilization_ready_multiple']:g})")
    g.add_argument("--autoscale-interval-s", type=_positive_float, default=None, metavar="S",
                   help=f"seconds between two evaluations (default: {d['autoscale_interval_s']:g})")
    g.add_argument("--autoscale-window-s", type=_positive_float, default=None, metavar="S",
                   help="the p90 latencies and the request rate are taken over this many last seconds "
                        f"(default: {d['autoscale_window_s']:g})")
    g.add_argument("--autoscale-profile", type=pathlib.Path, default=None, metavar="PATH",
                   help="a profile of this model on this hardware and CPU quota (`elasticmoe bench profile`): "
                        "the time per output token fewer devices would see is projected from its measured decode "
                        "steps at the sequences decoding now, instead of x devices/fewer (default: none)")
    g.add_argument("--no-autoscale-tpot-learning", action="store_true", default=None,
                   help="do not learn the p90 time per output token seen at each device count: by default a "
                        "TPOT breach that more devices were seen not to lower holds (ScaleUpWouldNotHelp), and "
                        "fewer devices seen to step faster are gone back to (FewerDevicesFaster) — on devices that "
                        "share cores, more of them step slower")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before the model is read; ValueError naming the option."""
    given = [name for name in _OPTIONS if getattr(args, name, None) is not None]
    if not args.autoscale:
        if given:
            raise ValueError(f"{_flag(given[0])} is an autoscaling option: add --autoscale")
        return
    if args.devices is None:
        raise ValueError("--autoscale needs --devices N (a multi-device instance)")
    if args.min_devices is not None and args.max_devices is not None and args.min_devices > args.max_devices:
        raise ValueError(f"--min-devices {args.min_devices} is above --max-devices {args.max_devices}; "
                         f"expected min <= max")


def config_from_args(args: argparse.Namespace, num_experts: int) -> tuple[policy.Config, float, float]:
    """-> (the policy's config, interval_s, window_s) for a model of `num_experts` routed
    experts; ValueError naming the option."""
    check_arguments(args)
    v = {name: getattr(args, name) if getattr(args, name) is not None else _DEFAULTS.get(name) for name in _OPTIONS}
    max_devices = v["max_devices"] if v["max_devices"] is not None else min(DEFAULT_MAX_DEVICES, num_experts)
    if max_devices > num_experts:
        raise ValueError(f"--max-devices {max_devices}: the model has {num_experts} routed experts; expected at most "
                         f"{num_experts} (one expert per device at least)")
    if v["min_devices"] > max_devices:
        raise ValueError(f"--min-devices {v['min_devices']} is above --max-devices {max_devices}; expected min <= max")
    if not v["min_devices"] <= args.devices <= max_devices:
        raise ValueError(f"--devices {args.devices} is outside [--min-devices {v['min_devices']}, --max-devices "
                         f"{max_devices}]; expected a starting count within the autoscaler's bounds")
    if v["autoscale_window_s"] < v["autoscale_interval_s"]:
        raise ValueError(f"--autoscale-window-s {v['autoscale_window_s']:g} is shorter than --autoscale-interval-s "
                         f"{v['autoscale_interval_s']:g}; expected a window of at least one interval")
    decode_model = {}
    if v["autoscale_profile"] is not None:
        from elasticmoe_worker.bench import profile as profile_mod

        if not v["autoscale_profile"].is_file():
            raise ValueError(f"--autoscale-profile {v['autoscale_profile']}: no such file; write one with "
                             "`elasticmoe bench profile` (same model, hardware and --cpu-per-device)")
        try:
            prof = profile_mod.load(v["autoscale_profile"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--autoscale-profile {v['autoscale_profile']}: {exc}") from None
        decode_model = prof.decode_model()
        quota = prof.measured.get("cpuPerDevice")
        if quota != getattr(args, "cpu_per_device", quota):
            logger.warning("--autoscale-profile %s was measured at %s cores per device, this server runs at %s: "
                           "its projections are off by as much", v["autoscale_profile"], quota,
                           getattr(args, "cpu_per_device", None))
    config = policy.Config(
        min_devices=v["min_devices"], max_devices=max_devices, ttft_p90_s=v["slo_ttft_p90_ms"] / 1000,
        tpot_p90_s=v["slo_tpot_p90_ms"] / 1000, queue_p90_s=v["slo_queue_p90_ms"] / 1000,
        scale_up_cooldown_s=v["scale_up_cooldown_s"],
        scale_down_stabilization_s=v["scale_down_stabilization_s"],
        stabilization_ready_multiple=v["stabilization_ready_multiple"], settle_s=v["autoscale_window_s"],
        decode_step_s=decode_model, learn_tpot=not v["no_autoscale_tpot_learning"],
    )
    return config, v["autoscale_interval_s"], v["autoscale_window_s"]
